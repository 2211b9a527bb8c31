"""`ftcli eval` and retention sets: a model (base, run, adapter or merged) + a dataset → the requested metrics.

The metrics themselves live in evaluate.py; this module decides what to load, which metrics a data format
allows, and scores one model on one set. Training uses `score` for its retention sets (forgetting), so a number
in a run's report and the same number from `ftcli eval` come from the same code.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ftcli.errors import UserError
from ftcli.vocab import AUTO, CANDIDATES, DEFAULT_METRICS, SFT_FORMATS, check_metrics

EVAL_MAX_LEN = 4096  # rows are never truncated for scoring below this length (a cut answer would score wrong)


@dataclass
class EvalSet:
    """One dataset and what to measure on it."""

    data: str
    format: str = AUTO
    metrics: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    name: str = ""
    limit: int | None = None
    sample_seed: int | None = None  # with limit: a seeded random sample instead of the first rows
    instruction: str | None = None
    split: str = "train"
    examples: list | None = field(default=None, repr=False)  # the rows, once `load` has read them
    prepared_s: float = 0.0  # making the rows beyond reading them (the built-in probe: the base model's answers)

    def load(self) -> list:
        """Read and format the rows (once): errors name the file, the row and the field."""
        if self.examples is None:
            from ftcli.data import load_examples

            self.examples = load_examples(self.data, self.format, self.fields, split=self.split, limit=self.limit,
                                          instruction=self.instruction, sample_seed=self.sample_seed)
        return self.examples

    def __post_init__(self):
        if self.format == AUTO:  # the format the rows' fields fit
            from ftcli.data import infer_source_format

            self.format, _ = infer_source_format(self.data, self.fields, split=self.split, where="--format auto")
        if self.format not in SFT_FORMATS:
            raise UserError(f"format {self.format!r}: choose from {', '.join(SFT_FORMATS)}")
        self.metrics = list(self.metrics or DEFAULT_METRICS[self.format])
        self.name = self.name or Path(self.data).parent.name + "/" + Path(self.data).stem
        check_metrics(self.format, self.metrics, where=self.name)


@dataclass
class Target:
    model: object
    tokenizer: object
    template: str | None  # the chat template the model was trained with, when the run names one
    kind: str  # "base", "run", "adapter"
    format: str | None = None  # a run's data format (completion: plain text, no chat template)
    system_prompt: str | None = None  # a run's data.system_prompt


def load_target(spec: str, *, base: str | None = None, allow_pickle: bool = False, log=print) -> Target:
    """A built-in alias, a model folder, a run folder, or an adapter (folder or its .safetensors) with `base`."""
    from ftcli import models
    from ftcli.run_folder import RunFolder

    path = Path(spec).expanduser()
    adapter = path.parent if path.is_file() and path.name.endswith(".safetensors") else path
    if RunFolder.holds_run(path):
        if base:
            raise UserError("--base applies to an adapter; a run folder names its own base model")
        run = RunFolder(path)
        model, tok = run.load(allow_pickle=allow_pickle, log=log)
        data = run.recipe.data if run.saved else None
        return Target(_merged(model), tok, run.chat_template, "run", data and data.format,
                      data and data.system_prompt)
    if models.adapter_config(adapter) is not None:
        model, tok = models.load_adapter(adapter, base or models.adapter_base(adapter), allow_pickle=allow_pickle,
                                         log=log)
        return Target(_merged(model), tok, None, "adapter")
    if base:
        raise UserError(f"--base applies to an adapter; {spec} is not one (no {' or '.join(models.ADAPTER_CONFIGS)})")
    model, tok = models.load_base(spec, allow_pickle=allow_pickle, log=log, key="model")
    return Target(model, tok, None, "base")


def _merged(model):
    """For scoring only: fold a PEFT adapter into its base weights (same function up to float rounding; the
    separate low-rank matmuls of every adapted layer cost as much time again on a CPU)."""
    quantized = any(hasattr(p, "quant_state") for p in model.parameters())  # folding into 4-bit would re-round
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") and not quantized else model


def score(model, tokenizer, es: EvalSet, *, template: str | None = None, batch_size: int = 8,
          max_new_tokens: int = 64, autocast=nullcontext, examples=None) -> dict:
    """Every metric of `es` for one model; also rows, seconds and rows per second."""
    from ftcli import models
    from ftcli.data.tokenize import Encoder, pad_id
    from ftcli.evaluate import choice_accuracy, generation_metrics, loss_metrics

    if examples is None:
        examples = es.load()
    t0 = time.perf_counter()
    out: dict = {"rows": len(examples)}
    if models.is_classifier(model):  # a classification head (task: classification) predicts labels itself
        from ftcli.objectives.classify import score_head

        out.update(score_head(model, tokenizer, examples, es.metrics, template=template, max_len=EVAL_MAX_LEN,
                              batch_size=batch_size, autocast=autocast))
        out["seconds"] = time.perf_counter() - t0
        out["rows_per_s"] = len(examples) / max(out["seconds"], 1e-9)
        return out
    encoder = Encoder(tokenizer, template, EVAL_MAX_LEN, "truncate", es.format)
    pad = pad_id(tokenizer)
    if {"loss", "perplexity"} & set(es.metrics):
        encoded = [e for e in encoder.encode_all(examples)[0] if e is not None]
        lm = loss_metrics(model, encoded, batch_size=batch_size, pad_id=pad, packing=False, pack_len=EVAL_MAX_LEN,
                          autocast=autocast)
        out.update({k: lm[k] for k in ("loss", "perplexity") if k in es.metrics}, trained_tokens=lm["trained_tokens"])
    by_candidates = [m for m in CANDIDATES if m in es.metrics]
    if by_candidates:
        res = choice_accuracy(model, encoder, examples, batch_size=batch_size, autocast=autocast)
        out.update({m: res["macro_f1" if m == "macro_f1" else "accuracy"] for m in by_candidates})
    gen = generation_metrics(model, tokenizer, encoder, examples, es.metrics, max_new_tokens=max_new_tokens,
                             limit=None, batch_size=batch_size, autocast=autocast)
    if gen:
        out.update({k: v for k, v in gen.items() if k in es.metrics or k == "samples"})
    out["seconds"] = time.perf_counter() - t0
    out["rows_per_s"] = len(examples) / max(out["seconds"], 1e-9)
    return out


def retention_sets(recipe, *, load: bool = False) -> list[EvalSet]:
    """The recipe's `eval.retention` entries as evaluation sets (one metric each); `load` reads their rows now,
    so a missing file or field is an error before any model loads (in `check` as in `train`)."""
    from ftcli.probe import PROBE

    sets = []
    for i, r in enumerate(recipe.eval.retention):
        try:
            es = EvalSet(data=r.data, format=r.format, metrics=[r.metric], fields=r.fields, name=r.name or "",
                         limit=r.limit, sample_seed=r.sample, instruction=r.instruction)
            if load and r.data != PROBE:  # the probe's rows are the base model's answers: made once it is loaded
                es.load()
        except UserError as e:
            raise UserError(f"eval.retention[{i}]: {e}") from None
        sets.append(es)
    return sets


def run_eval(specs: list[str], es: EvalSet, *, base: str | None = None, template: str | None = None,
             batch_size: int = 8, max_new_tokens: int = 64, precision: str = "auto", allow_pickle: bool = False,
             log=print) -> dict:
    """Score each model of `specs` (one at a time, freed in between) on the same rows of `es`."""
    import gc

    from ftcli.runtime import autocast as autocast_for
    from ftcli.runtime import resolve_precision

    examples = es.load()
    precision, why = resolve_precision(precision)
    log(f"precision {precision} ({why})")
    autocast = autocast_for(precision)
    results = {}
    for spec in specs:
        target = load_target(spec, base=base if spec == specs[0] else None, allow_pickle=allow_pickle, log=log)
        log(f"scoring {spec} ({target.kind}) on {len(examples)} rows of {es.data}")
        results[spec] = score(target.model, target.tokenizer, es, template=template or target.template,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, autocast=autocast,
                              examples=examples)
        del target
        gc.collect()
    return {"data": es.data, "format": es.format, "metrics": es.metrics, "rows": len(examples), "precision": precision,
            "limit": es.limit, "sample_seed": es.sample_seed, "models": results}
