"""`ftcli check --probe K`: run K real optimiser steps of a recipe and project the whole run from them.

The probe is the run cut to K steps, in a temporary folder: the model loads, the validation loss is computed
before and after, K steps train and the artifact is written; generation metrics (exact_match, accuracy by
candidates) and the retention sets are left out, because on a small model they cost minutes, more than the steps
being timed. So the load and the save are measured as they will cost, what a run does per step or per loss pass
is measured once and multiplied, and what was left out is named, not guessed:

    projected = probe wall time + (steps − K) × median step time + passes between steps × loss-pass time
                (+ generation metrics before and after, + retention sets: not timed)

The median leaves out the first step (allocator warm-up, a compiled graph) unless K is 1. Checkpoints between
steps are not timed either (one costs about what the final save did). The probe writes nothing outside its
temporary folder except the caches a run fills anyway (tokenized data, a DPO reference, a Fisher matrix), which
make the real run's start faster than projected.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Forecast:
    probe_steps: int
    probe_wall_s: float  # the whole probe run: load, the validation loss twice, K steps, save
    step_s: float  # the median optimiser step
    tokens_per_s: float
    peak_rss_mb: float  # measured over the probe (the process's peak)
    steps: int  # of the recipe as it stands
    passes_between: int  # validation passes between steps (eval.every)
    loss_pass_s: float  # one of them: the loss over the validation split
    not_timed: list[str]  # what the run does that the probe left out

    @property
    def projected_s(self) -> float:
        return (self.probe_wall_s + max(self.steps - self.probe_steps, 0) * self.step_s
                + self.passes_between * self.loss_pass_s)


def probe(recipe, steps: int, k: int, *, allow_pickle: bool = False) -> Forecast:
    """Train `recipe` (validated) for `k` steps in a temporary folder and project its `steps`."""
    from rich.console import Console

    from ftcli import train

    every = recipe.eval.every
    short = recipe.model_copy(deep=True)
    short.training.max_steps = k
    short.training.checkpoint_every = None
    short.eval.metrics = [m for m in recipe.eval.metrics if m in ("loss", "perplexity")] or ["loss"]
    short.eval.retention = []
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
    return Forecast(
        probe_steps=len(train_rows), probe_wall_s=wall, step_s=statistics.median(timed),
        tokens_per_s=report["throughput"]["tokens_per_s"], peak_rss_mb=report["throughput"]["peak_rss_mb"],
        steps=steps, passes_between=len([s for s in range(1, steps) if every and s % every == 0]),
        loss_pass_s=statistics.median(r["loss_eval_s"] for r in evals) if evals else 0.0,
        not_timed=not_timed(recipe, steps))


def not_timed(recipe, steps: int) -> list[str]:
    from ftcli.vocab import CANDIDATES

    every = recipe.training.checkpoint_every
    saves = len([s for s in range(1, steps) if every and s % every == 0])
    out = [f"{saves} checkpoint(s) between steps (each about the final save)"] if saves else []
    generated = [m for m in recipe.eval.metrics if m not in ("loss", "perplexity")]
    if generated:
        out.append(f"{', '.join(generated)} before and after (on up to {recipe.eval.limit} validation rows"
                   + (", by candidates" if set(generated) <= set(CANDIDATES) else "") + ")")
    if recipe.eval.retention:
        out.append(f"{len(recipe.eval.retention)} retention set(s) scored before and after")
    return out


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"
