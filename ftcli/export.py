"""`ftcli export`: fold a run's adapter into its base and write a standard transformers folder, then prove it.

The folder holds config.json, model.safetensors, the tokenizer with the chat template used in training, and a
generation_config.json whose eos_token_id lists the stop tokens used in training (end-of-turn and EOS). The folded
weights are always float32, never 4-bit (merging into 4-bit weights rounds ΔW away: PEFT #2368, transformers
#31293). A qlora adapter was trained against the 4-bit base, so it is folded into that base de-quantised to
float32 (transformers' `dequantize()`), which is the model it was trained with, not into the original weights.

After writing, the folder is loaded again (a causal LM, or a classifier under task: classification) and its logits
on a few chat prompts are compared with base + adapter (PEFT, unmerged; for qlora the 4-bit base computing in
float32). Bottleneck adapters cannot be folded (a non-linearity between their projections): refused. The export fails
(exit 1, nothing written) when the largest absolute difference exceeds TOLERANCE · max(1, largest |logit|).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftcli.errors import RunError, UserError

TOLERANCE = 1e-4  # relative to the largest |logit| (at least 1); folding in float32 measured ≈3e-6 of it on the
# built-in model, while merging into 4-bit weights or a wrong scale moves logits by 1e-2 of it and more
PROMPTS = (
    "What is 7 + 5?",
    "Write one sentence about the sea.",
    "Convert 'March 3rd, 2021' to ISO 8601.",
)
EXPORT_FILE = "export.json"


@dataclass
class ExportResult:
    out: Path
    max_diff: float
    tolerance: float
    prompts: int
    stop_ids: list[int]
    source: str


def export(run=None, out=None, adapter=None, base: Optional[str] = None, overwrite: bool = False,
           allow_pickle: bool = False, log=print) -> ExportResult:
    from ftcli import models
    from ftcli.run_folder import RunFolder

    if (run is None) == (adapter is None):
        raise UserError("give a run folder (ftcli export RUN --out DIR) or --adapter FILE --base MODEL, not both")
    if out is None:
        raise UserError("--out is required (the model folder to write)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")

    template, fmt, strategy, model_dir, adapter_dir, loading = None, "chat", None, None, None, {}
    if run is not None:
        folder = RunFolder(run)
        artifact = folder.require_artifact()
        if folder.saved:
            recipe = folder.recipe
            template, fmt, strategy = recipe.data.chat_template, recipe.data.format, recipe.strategy.name
            loading = folder.strategy.base_loading(for_export=True)  # the base as trained, products in float32
            if folder.kind == "adapter" and folder.strategy.unfoldable():
                raise UserError(f"cannot export {run}: {folder.strategy.unfoldable()}")
        if folder.kind == "model":
            model_dir = artifact
        else:
            adapter_dir = artifact
            base = base or folder.base_model
        source = str(run)
    else:
        from ftcli.merge import adapter_paths
        from ftcli.strategies.bottleneck import CONFIG_FILE, NOT_FOLDABLE

        given = Path(adapter)
        if ((given if given.is_dir() else given.parent) / CONFIG_FILE).is_file():
            raise UserError(f"cannot export {adapter}: {NOT_FOLDABLE}")
        weights, config = adapter_paths(adapter)
        adapter_dir = weights.parent
        if weights.name != "adapter_model.safetensors":  # PEFT reads only the standard file name
            adapter_dir = Path(tempfile.mkdtemp(prefix="ftcli-adapter-"))
            (adapter_dir / "adapter_model.safetensors").symlink_to(weights.resolve())
            (adapter_dir / "adapter_config.json").symlink_to(config.resolve())
        base = base or models.adapter_base(adapter_dir)
        source = str(adapter)
    quantized = bool(loading.get("quantization"))

    if model_dir is not None:
        log(f"{run}: a full-weights run; nothing to fold, re-saving {model_dir} with its generation settings")
        model = models.load_model(str(model_dir), allow_pickle=allow_pickle, log=log)
        tokenizer = models.load_tokenizer(str(model_dir), log=log)
    else:
        if quantized:
            log("4-bit base: folding the adapter into it de-quantised to float32, not into 4-bit weights")
        from ftcli.objectives.classify import saved_labels

        tok_src = str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base
        tokenizer = models.load_tokenizer(tok_src, allow_pickle=allow_pickle, log=log)
        if saved_labels(adapter_dir):  # trained with a classification head: the base gets that head
            loading = {**loading, "labels": saved_labels(adapter_dir), "pad_token_id": tokenizer.pad_token_id}
        model = models.load_model(base, allow_pickle=allow_pickle, log=log, **loading)
    template_text = _chat_template(tokenizer, template, fmt)
    if template_text:
        tokenizer.chat_template = template_text
    stop_ids = _stop_ids(tokenizer, template_text)
    prompts = _prompt_ids(tokenizer, template_text)

    import torch

    if model_dir is not None:
        reference = _logits(model, prompts)
        folded = model
    else:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        reference = _logits(peft_model, prompts)  # base + adapter, unmerged
        if quantized:  # the same 4-bit base, de-quantised to float32, then the adapter folded in
            del peft_model, model
            model = models.load_model(base, allow_pickle=allow_pickle, log=log, **loading).dequantize(
                dtype=torch.float32)
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        folded = peft_model.merge_and_unload()
    folded.config.use_cache = True
    if folded.can_generate():  # a classifier (task: classification) predicts labels and has no generation settings
        gen = folded.generation_config
        gen.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
        gen.pad_token_id = tokenizer.pad_token_id

    from ftcli import atomic

    with atomic.folder(out) as tmp:
        models.save_model_folder(folded, tmp, tokenizer)
        del folded, model
        reloaded = models.load_model(str(tmp), log=log)
        got = _logits(reloaded, prompts)
        max_diff = max(float((a - b).abs().max()) for a, b in zip(reference, got))
        scale = max(1.0, max(float(a.abs().max()) for a in reference))
        if not max_diff <= TOLERANCE * scale:
            raise RunError(f"export check failed: the written model's logits differ from base + adapter by "
                           f"{max_diff:.3e} (tolerance {TOLERANCE:g} × {scale:.1f}); nothing was written to {out}")
        atomic.write_json(tmp / EXPORT_FILE, {
            "source": source, "base": base, "strategy": strategy, "dtype": "float32",
            "check": {"prompts": len(prompts), "max_abs_logit_diff": max_diff, "tolerance": TOLERANCE * scale},
            "stop_token_ids": stop_ids,
        })
    return ExportResult(out=out, max_diff=max_diff, tolerance=TOLERANCE * scale, prompts=len(prompts),
                        stop_ids=stop_ids, source=source)


def _chat_template(tokenizer, template: Optional[str], fmt: str) -> Optional[str]:
    from ftcli.data.tokenize import resolve_template

    if fmt == "completion" and template is None:
        return getattr(tokenizer, "chat_template", None)
    if template is None and not getattr(tokenizer, "chat_template", None):
        return None
    return resolve_template(tokenizer, template)


def _stop_ids(tokenizer, template: Optional[str]) -> list[int]:
    """Training's stop tokens: the template's end-of-turn token and EOS (evaluate.stop_token_ids)."""
    from ftcli.data.tokenize import Encoder
    from ftcli.evaluate import stop_token_ids

    encoder = Encoder(tokenizer, template, format="chat" if template else "completion")
    ids = stop_token_ids(tokenizer, encoder)
    if not ids:
        raise UserError("the tokenizer has no EOS token and the template no end-of-turn token: no stop tokens")
    return ids


def _prompt_ids(tokenizer, template: Optional[str]):
    import torch

    out = []
    for text in PROMPTS:
        if template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=template,
                                                 tokenize=False, add_generation_prompt=True)
        out.append(torch.tensor([tokenizer(text, add_special_tokens=False).input_ids]))
    return out


def _logits(model, prompts):
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in prompts]
