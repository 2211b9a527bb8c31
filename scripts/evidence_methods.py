"""Evidence for issue 17's low-memory optimisers, Synaptic Intelligence and pruning on the built-in model: runs the
real `ftcli` commands and prints markdown tables (docs/strategies.md). Heavy: run under the shared lock.

    flock /tmp/ftcli-heavy.lock python scripts/evidence_methods.py optimizers|forgetting|prune --out runs/evidence-17

`python -m ftcli` runs the package of the working directory when it has one: run from a copy of the repository to
keep edits away from a long evidence job.

optimizers: full fine-tuning with each training.optimizer, same data/steps/seed: peak RSS and validation loss.
forgetting: task 1 SST-2 (full, record_si), then task 2 Alpaca from it with full, ewc and si; SST-2 accuracy
            (retention set, scored before and after task 2) is the forgetting of task 1.
prune:      magnitude and wanda at several sparsities and 2:4: perplexity on Alpaca test rows before and after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

DATA = Path("/work/shared/data")
FTCLI = [sys.executable, "-m", "ftcli"]  # the package of the working directory first (a snapshot, see --help)


def train(out: Path, name: str, doc: dict) -> dict:
    folder = out / name
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({**doc, "output": str(folder)}))
    t0 = time.time()
    subprocess.run([*FTCLI, "train", str(recipe), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    report = json.loads((folder / "report.json").read_text())
    report["_wall"] = time.time() - t0
    return report


def optimizers(out: Path, steps: int) -> None:
    print("| optimizer | lr | peak RSS MB | validation loss (before → after) | tokens/s | s/step |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for opt, lr in (("adamw", 1e-5), ("adamw_8bit", 1e-5), ("adafactor", 1e-3), ("lomo", 1e-2)):
        r = train(out, f"opt-{opt}", {
            "strategy": {"name": "full"},
            "data": {"train": str(DATA / "alpaca/train.jsonl"), "format": "alpaca", "limit": 400,
                     "validation": 0.1, "max_len": 256},
            "training": {"max_steps": steps, "batch_size": 4, "lr": lr, "optimizer": opt, "seed": 0,
                         "warmup": 0.1},
            "eval": {"metrics": ["loss"]}})
        t = r["throughput"]
        print(f"| {opt} | {lr:g} | {t['peak_rss_mb']:.0f} | {r['before']['loss']:.4f} → {r['after']['loss']:.4f} | "
              f"{t['tokens_per_s']:.0f} | {t['s_per_step']:.2f} |", flush=True)


def forgetting(out: Path, steps: int) -> None:
    sst_val = {"data": str(DATA / "sst2/validation.jsonl"), "format": "classification", "metric": "accuracy",
               "limit": 100, "name": "sst2", "fields": {"label": "label_text"}}
    task1 = train(out, "task1-sst2", {
        "strategy": {"name": "full"},
        "data": {"train": str(DATA / "sst2/train.jsonl"), "format": "classification", "limit": 2000,
                 "validation": None, "fields": {"label": "label_text"}},
        "training": {"max_steps": steps, "batch_size": 8, "lr": 1e-5, "seed": 0, "record_si": True},
        "eval": {"retention": [sst_val]}})
    acc1 = task1["retention"][0]
    print(f"task 1 (SST-2, full, {steps} steps): SST-2 validation accuracy {acc1['before']:.3f} → "
          f"{acc1['after']:.3f}\n")
    print("| task 2 strategy | SST-2 accuracy after task 1 → after task 2 (forgetting) | Alpaca validation loss "
          "(before → after) | peak RSS MB | wall s |")
    print("| --- | --- | --- | ---: | ---: |")
    run1 = str(out / "task1-sst2")
    for name, strategy in (("full", {"name": "full"}),
                           ("ewc λ=1", {"name": "ewc", "lambda": 1.0, "fisher_rows": 16, "inner": {"name": "full"},
                                        "fisher_data": str(DATA / "sst2/train.jsonl"),
                                        "fisher_format": "classification", "fisher_fields": {"label": "label_text"}}),
                           ("si c=1", {"name": "si", "from_run": run1, "c": 1.0, "inner": {"name": "full"}})):
        r = train(out, "task2-" + name.split()[0], {
            "base_model": run1, "strategy": strategy,
            "data": {"train": str(DATA / "alpaca/train.jsonl"), "format": "alpaca", "limit": 400,
                     "validation": 0.1, "max_len": 256},
            "training": {"max_steps": steps, "batch_size": 4, "lr": 5e-5, "seed": 0},
            "eval": {"metrics": ["loss"], "retention": [sst_val]}})
        ret = r["retention"][0]
        print(f"| {name} | {ret['before']:.3f} → {ret['after']:.3f} ({ret['after'] - ret['before']:+.3f}) | "
              f"{r['before']['loss']:.4f} → {r['after']['loss']:.4f} | {r['throughput']['peak_rss_mb']:.0f} | "
              f"{r['_wall']:.0f} |", flush=True)


def prune(out: Path, eval_rows: int, calibration_rows: int, cases: str) -> None:
    print("| method | sparsity | perplexity before → after | s |")
    print("| --- | --- | --- | ---: |")
    for case in cases.split(","):
        method, _, amount = case.partition("@")
        args = ["--pattern", amount] if ":" in amount else ["--sparsity", amount]
        folder = out / f"prune-{method}-{args[1]}"
        t0 = time.time()
        subprocess.run([*FTCLI, "prune", "smollm2-135m-instruct", "--method", method, *args, "--out",
                        str(folder), "--data", str(DATA / "alpaca/test.jsonl"), "--eval-rows", str(eval_rows),
                        "--calibration-rows", str(calibration_rows), "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL)
        r = json.loads((folder / "prune.json").read_text())
        print(f"| {method} | {args[1]} | {r['before']['perplexity']:.3f} → {r['after']['perplexity']:.3f} | "
              f"{time.time() - t0:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["optimizers", "forgetting", "prune"])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence-17"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-rows", type=int, default=50)
    ap.add_argument("--calibration-rows", type=int, default=16)
    ap.add_argument("--cases", default="magnitude@0.2,magnitude@0.4,magnitude@0.5,magnitude@2:4,wanda@0.2,wanda@0.4,"
                    "wanda@0.5,wanda@2:4", help="prune: METHOD@SPARSITY or METHOD@N:M, comma-separated")
    a = ap.parse_args()
    if a.what == "optimizers":
        optimizers(a.out, a.steps)
    elif a.what == "forgetting":
        forgetting(a.out, a.steps)
    else:
        prune(a.out, a.eval_rows, a.calibration_rows, a.cases)


if __name__ == "__main__":
    main()
