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

ALL_METRICS = ("loss", "perplexity", "exact_match", "rougeL", "numeric", "accuracy", "choice")
DEFAULT_METRICS = {"classification": ["accuracy"], "choice": ["choice"], "completion": ["loss", "perplexity"],
                   "alpaca": ["loss", "perplexity"], "chat": ["loss", "perplexity"]}
EVAL_MAX_LEN = 4096  # rows are never truncated for scoring below this length (a cut answer would score wrong)


@dataclass
class EvalSet:
    """One dataset and what to measure on it."""

    data: str
    format: str = "alpaca"
    metrics: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    name: str = ""
    limit: int | None = None
    sample_seed: int | None = None  # with limit: a seeded random sample instead of the first rows
    instruction: str | None = None
    split: str = "train"

    def __post_init__(self):
        self.metrics = list(self.metrics or DEFAULT_METRICS[self.format])
        self.name = self.name or Path(self.data).parent.name + "/" + Path(self.data).stem
        check_metrics(self.format, self.metrics, where=self.name)


def check_metrics(fmt: str, metrics: list[str], where: str) -> None:
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise UserError(f"{where}: unknown metric {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    if fmt not in ("classification", "choice"):
        bad = [m for m in metrics if m in ("accuracy", "choice")]
        if bad:
            raise UserError(f"{where}: metric {bad[0]} scores candidate answers, so it needs format classification "
                            f"(text, label) or choice (question, choices, answer); the format is {fmt}")
    if fmt == "completion":
        bad = [m for m in metrics if m not in ("loss", "perplexity")]
        if bad:
            raise UserError(f"{where}: metric {bad[0]} needs a prompt and a reference answer; format completion "
                            "has neither (use alpaca or chat)")


@dataclass
class Target:
    model: object
    tokenizer: object
    template: str | None  # the chat template the model was trained with, when the run names one
    kind: str  # "base", "run", "adapter"


def load_target(spec: str, *, base: str | None = None, allow_pickle: bool = False, log=print) -> Target:
    """A built-in alias, a model folder, a run folder, or an adapter (folder or its .safetensors) with `base`."""
    from ftcli import models

    path = Path(spec).expanduser()
    adapter = path.parent if path.is_file() and path.name.endswith(".safetensors") else path
    if path.is_dir() and ((path / "recipe.resolved.yaml").is_file() or (path / "adapter").is_dir()
                          or (path / "model").is_dir()):
        if base:
            raise UserError("--base applies to an adapter; a run folder names its own base model")
        model, tok = models.load_run(path, allow_pickle=allow_pickle, log=log)
        return Target(_merged(model), tok, _run_template(path), "run")
    if (adapter / "adapter_config.json").is_file():
        model, tok = models.load_adapter(adapter, base or models.adapter_base(adapter), allow_pickle=allow_pickle,
                                         log=log)
        return Target(_merged(model), tok, None, "adapter")
    if base:
        raise UserError(f"--base applies to an adapter; {spec} is not one (no adapter_config.json)")
    model, tok = models.load_base(spec, allow_pickle=allow_pickle, log=log)
    return Target(model, tok, None, "base")


def _merged(model):
    """For scoring only: fold a PEFT adapter into its base weights (same function up to float rounding; the
    separate low-rank matmuls of every adapted layer cost as much time again on a CPU)."""
    quantized = any(hasattr(p, "quant_state") for p in model.parameters())  # folding into 4-bit would re-round
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") and not quantized else model


def _run_template(run_dir: Path) -> str | None:
    import yaml

    f = run_dir / "recipe.resolved.yaml"
    if not f.is_file():
        return None
    return ((yaml.safe_load(f.read_text()) or {}).get("data") or {}).get("chat_template")


def score(model, tokenizer, es: EvalSet, *, template: str | None = None, batch_size: int = 8,
          max_new_tokens: int = 64, autocast=nullcontext, examples=None) -> dict:
    """Every metric of `es` for one model; also rows, seconds and rows per second."""
    from ftcli.data import load_examples
    from ftcli.data.tokenize import Encoder
    from ftcli.evaluate import choice_accuracy, generation_metrics, loss_metrics

    if examples is None:
        examples = load_examples(es.data, es.format, es.fields, split=es.split, limit=es.limit,
                                 instruction=es.instruction, sample_seed=es.sample_seed)
    encoder = Encoder(tokenizer, template, EVAL_MAX_LEN, "truncate", es.format)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    out: dict = {"rows": len(examples)}
    if {"loss", "perplexity"} & set(es.metrics):
        encoded = [e for e in encoder.encode_all(examples)[0] if e is not None]
        lm = loss_metrics(model, encoded, batch_size=batch_size, pad_id=pad, packing=False, pack_len=EVAL_MAX_LEN,
                          autocast=autocast)
        out.update({k: lm[k] for k in ("loss", "perplexity") if k in es.metrics}, trained_tokens=lm["trained_tokens"])
    for m in ("accuracy", "choice"):
        if m in es.metrics:
            out[m] = choice_accuracy(model, encoder, examples, batch_size=batch_size, autocast=autocast)["accuracy"]
    gen = generation_metrics(model, tokenizer, encoder, examples, es.metrics, max_new_tokens=max_new_tokens,
                             limit=None, batch_size=batch_size, autocast=autocast)
    if gen:
        out.update({k: v for k, v in gen.items() if k in es.metrics or k == "samples"})
    out["seconds"] = time.perf_counter() - t0
    out["rows_per_s"] = len(examples) / max(out["seconds"], 1e-9)
    return out


def retention_sets(recipe) -> list[EvalSet]:
    """The recipe's `eval.retention` entries as evaluation sets (one metric each)."""
    return [EvalSet(data=r.data, format=r.format, metrics=[r.metric], fields=r.fields, name=r.name or "",
                    limit=r.limit, sample_seed=r.sample, instruction=r.instruction) for r in recipe.eval.retention]


def headline(es: EvalSet, result: dict) -> float | None:
    """The one number of a set (its first metric) for tables of many sets."""
    return result.get(es.metrics[0])


def run_eval(specs: list[str], es: EvalSet, *, base: str | None = None, template: str | None = None,
             batch_size: int = 8, max_new_tokens: int = 64, precision: str = "fp32", allow_pickle: bool = False,
             log=print) -> dict:
    """Score each model of `specs` (one at a time, freed in between) on the same rows of `es`."""
    import gc

    from ftcli.data import load_examples
    from ftcli.runtime import autocast as autocast_for
    from ftcli.runtime import tune_allocator

    tune_allocator()

    examples = load_examples(es.data, es.format, es.fields, split=es.split, limit=es.limit,
                             instruction=es.instruction, sample_seed=es.sample_seed)
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
    return {"data": es.data, "format": es.format, "metrics": es.metrics, "rows": len(examples),
            "limit": es.limit, "sample_seed": es.sample_seed, "models": results}
