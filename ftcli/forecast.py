"""`ftcli check --probe K`: run K real optimiser steps of a recipe and project the whole run from them.

The probe is the run cut to K steps, in a temporary folder: the model loads, the validation loss is computed
before and after, K steps train and the artifact is written. What costs time by the row outside the steps runs on
a sample: generation metrics (exact_match, accuracy by candidates, ...) before and after on the first SAMPLE
validation rows, each retention set before and after on its first SAMPLE rows; the run's rows are counted and
their time projected from the sample's. So the load and the save are measured as they will cost, what a run does
per step, per loss pass or per scored row is measured and multiplied, and what is left out is named, not guessed:

    projected = probe wall time + (steps − K) × median step time + passes between steps × loss-pass time
                + Σ over generation and each retention set: its time on the sample × (run's rows ÷ sample's − 1)

The median leaves out the first step (allocator warm-up, a compiled graph) unless K is 1. Generation's rows are
counted from the validation split (a mixture generates for its chat rows alone, so there it is an upper bound).
On a base model's first run the base model's answers to the built-in probe's prompts are projected from the
probe's sample of them (where a probe ran before, its sample is cached and they are named instead). Not timed,
and named: checkpoints between steps (one costs about what the final save did). The probe writes nothing
outside its temporary folder except the caches a run fills anyway (tokenized data, a DPO reference, a Fisher
matrix, the probe's answers for its sample), which make the real run's start faster than projected.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


SAMPLE = 16  # rows the probe generates for or scores, before and after: one batch of generation (evaluate.py)


@dataclass
class Sampled:
    """Work the run does by the row outside its steps, timed in the probe on a sample of the rows."""

    kind: str  # "generation metrics", "retention sets" or "the probe's answers"
    what: str  # e.g. "exact_match before and after on 100 validation rows"
    seconds: float  # the sample's, before and after (inside the probe's wall time)
    sample_rows: int
    run_rows: int

    @property
    def run_s(self) -> float:
        return self.seconds * self.run_rows / self.sample_rows if self.sample_rows else 0.0


@dataclass
class Forecast:
    probe_steps: int
    probe_wall_s: float  # the whole probe run: load, the validation loss twice, K steps, samples, save
    step_s: float  # the median optimiser step
    tokens_per_s: float
    peak_rss_mb: float  # measured over the probe (the process's peak)
    steps: int  # of the recipe as it stands
    passes_between: int  # validation passes between steps (eval.every)
    loss_pass_s: float  # one of them: the loss over the validation split
    not_timed: list[str]  # what the run does that the probe left out
    sampled: list[Sampled] = field(default_factory=list)  # generation metrics, each retention set

    @property
    def projected_s(self) -> float:
        return (self.probe_wall_s + max(self.steps - self.probe_steps, 0) * self.step_s
                + self.passes_between * self.loss_pass_s + sum(x.run_s - x.seconds for x in self.sampled))


def probe(recipe, steps: int, k: int, *, allow_pickle: bool = False) -> Forecast:
    """Train `recipe` (validated) for `k` steps in a temporary folder and project its `steps`."""
    from rich.console import Console

    from ftcli import train

    every = recipe.eval.every
    short = recipe.model_copy(deep=True)
    short.training.max_steps = k
    short.training.checkpoint_every = None
    limit = recipe.eval.limit
    short.eval.limit = min(limit, SAMPLE) if limit else SAMPLE
    short.eval.retention = [rs.model_copy(update={"limit": min(rs.limit or SAMPLE, SAMPLE)})
                            for rs in recipe.eval.retention]
    answers = _answers(recipe, allow_pickle)  # before the probe caches its sample's
    with tempfile.TemporaryDirectory(prefix="ftcli-probe-") as tmp:
        started = time.perf_counter()
        folder = train.run(short, output=Path(tmp) / "run", allow_pickle=allow_pickle,
                           console=Console(quiet=True), progress=False)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        report = json.loads((folder / "report.json").read_text())
    train_rows = [r for r in rows if r.get("kind") == "train"]
    timed = [r["step_s"] for r in train_rows[1:]] or [r["step_s"] for r in train_rows]
    evals = [r for r in rows if r.get("kind") == "eval" and "loss_eval_s" in r]
    generated = [m for m in recipe.eval.metrics if m not in ("loss", "perplexity")]
    pool = report["data"]["splits"].get("validation", {}).get("kept", 0) if generated else 0
    sampled = []
    if pool:  # before and after: the passes that generate (the first at step 0, the last at the last step)
        ends = [r for r in evals[:1] if r["step"] == 0] + [r for r in evals[-1:] if r["step"] == len(train_rows)]
        run_rows = min(limit, pool) if limit else pool
        sampled.append(Sampled("generation metrics",
                               f"{', '.join(generated)} before and after on {run_rows} validation rows",
                               sum(r["eval_s"] - r["loss_eval_s"] for r in ends), min(short.eval.limit, pool),
                               run_rows))
    retention, named = _retention(recipe, report.get("retention") or [], answers)
    return Forecast(
        probe_steps=len(train_rows), probe_wall_s=wall, step_s=statistics.median(timed),
        tokens_per_s=report["throughput"]["tokens_per_s"], peak_rss_mb=report["throughput"]["peak_rss_mb"],
        steps=steps, passes_between=len([s for s in range(1, steps) if every and s % every == 0]),
        loss_pass_s=statistics.median(r["loss_eval_s"] for r in evals) if evals else 0.0,
        not_timed=not_timed(recipe, steps) + named, sampled=sampled + retention)


def _retention(recipe, scored: list[dict], answers: list[str]) -> tuple[list[Sampled], list[str]]:
    """Each retention set the probe scored, on its sample and in the run (a run leaves the built-in probe out
    where the model has no chat template: so does the probe); and the base model's answers to the built-in probe's
    prompts where the run will make them: projected from the probe's where it made its sample's, else named."""
    from ftcli import probe as builtin
    from ftcli import scoring

    sampled, named, rows, states = [], [], iter(scored), iter(answers)
    row = next(rows, None)
    for es in scoring.retention_sets(recipe, load=True):
        state = next(states) if es.data == builtin.PROBE else "cached"
        if row is None or row["data"] != es.data:
            continue
        n = len(es.examples) if es.examples is not None else len(builtin.asked(es.limit))
        what = f"the base model's answers to the {builtin.NAME}'s {n} prompts (its first run on this base model " \
               "and template; cached after)"
        if state == "sampled":
            sampled.append(Sampled("the probe's answers", what, row.get("prepared_s") or 0.0, min(n, SAMPLE), n))
        elif state == "named":
            named.append(what)
        sampled.append(Sampled("retention sets", f"retention set {row['name']} before and after on {n} rows",
                               (row.get("before_s") or 0.0) + (row.get("after_s") or 0.0), row["rows"] or 0, n))
        row = next(rows, None)
    return sampled, named


def _answers(recipe, allow_pickle: bool) -> list[str]:
    """For each built-in probe set of `recipe`, before the probe runs: "cached" (the run finds its answers),
    "sampled" (the probe will make its sample's answers: timed) or "named" (the sample's are cached, the run's
    are not: not timed)."""
    from ftcli import models
    from ftcli import probe as builtin

    limits = [rs.limit for rs in recipe.eval.retention if rs.data == builtin.PROBE]
    if not limits:
        return []
    tokenizer = models.load_tokenizer(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                                      allow_pickle=allow_pickle, log=lambda m: None)

    def cached(limit: int | None) -> bool:
        return builtin.cached(tokenizer, base=recipe.base_model, template=recipe.data.chat_template, limit=limit)

    return ["cached" if cached(limit) else "named" if cached(min(limit or SAMPLE, SAMPLE)) else "sampled"
            for limit in limits]


def not_timed(recipe, steps: int) -> list[str]:
    every = recipe.training.checkpoint_every
    saves = len([s for s in range(1, steps) if every and s % every == 0])
    return [f"{saves} checkpoint(s) between steps (each about the final save)"] if saves else []


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"
