"""Strategies on the real model: task accuracy against forgetting, one table.

Trains the built-in SmolLM2-135M-Instruct with several strategies for the same steps on SST-2 sentiment (train
split, formatted as instructions), then reads each run's report: SST-2 validation accuracy before/after, and the
retention sets scored before/after: loss on Alpaca test responses and accuracy on a fixed seeded sample of MMLU
test. The data comes from the workspace's ../shared/data (never copied into the project); recipes are written to
the output folder.

    python scripts/evidence_strategies.py --steps 40 --out runs/evidence     # then see runs/evidence/strategies.md
    python scripts/evidence_strategies.py --strategies full,hft,ewc@1 --lr 5e-5 --out runs/evidence-5e-5
    python scripts/evidence_strategies.py --strategies lora,head:lora,ia3,vera,loha,lokr,oft,bottleneck

`ewc@L` is ewc (inner full) at λ = L (plain `ewc`: λ = 100). `head:S` trains strategy S with `task:
classification`: a new classification head over the last prompt token instead of answering by generation (the
same rows, prompts, steps and learning rate as S). `mix@W` is full fine-tuning on a weighted mixture: SST-2 at
weight 1 − W and Alpaca train rows (general instructions, not the Alpaca test rows scored for retention) at weight
W, for the same steps and batch (so it sees fewer SST-2 rows). `--lr` sets the learning rate of full, hft, ewc and
mix (the adapter strategies keep their own, in LR).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

STRATEGIES = {
    "full": {"name": "full"},
    "hft": {"name": "hft"},
    "ewc": {"name": "ewc", "inner": {"name": "full"}, "lambda": 100.0, "fisher_rows": 16},
    "lora": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
    "ia3": {"name": "ia3"},
    "vera": {"name": "vera", "r": 256, "target_modules": "all-linear"},
    "loha": {"name": "loha", "r": 8, "alpha": 8, "target_modules": "all-linear"},
    "lokr": {"name": "lokr", "r": 8, "alpha": 8, "target_modules": "all-linear"},
    "oft": {"name": "oft", "block_size": 32, "target_modules": "all-linear"},
    "bottleneck": {"name": "bottleneck", "reduction_factor": 16, "placement": "houlsby"},
}
# the adapter families at the learning rates their papers use for language models (lora's, 5e-4, where they give
# none for this scale); full fine-tuning and its regularised variants at 1e-5 (--lr changes those)
LR = {"full": 1e-5, "hft": 1e-5, "ewc": 1e-5, "lora": 5e-4, "ia3": 3e-3, "vera": 4e-3, "loha": 5e-4, "lokr": 5e-4,
      "oft": 5e-4, "bottleneck": 1e-3}
FULL_LIKE = ("full", "hft", "ewc")


def strategy(name: str) -> dict:
    """A strategy of the table, `ewc@L`: ewc at λ = L, `head:S`: strategy S (trained with a classification head),
    or `mix@W`: full on a mixture."""
    name = name.removeprefix("head:")
    if name.startswith("ewc@"):
        return {**STRATEGIES["ewc"], "lambda": float(name[4:])}
    if name.startswith("mix@"):
        return STRATEGIES["full"]
    return STRATEGIES[name]


def learning_rate(name: str, args) -> float:
    base = name.removeprefix("head:").split("@")[0]
    base = "full" if base == "mix" else base
    return args.lr if args.lr is not None and base in FULL_LIKE else LR[base]


def data(name: str, args) -> dict:
    rows = args.steps * args.batch
    sst2 = {"data": str(SHARED / "sst2" / "train.jsonl"), "validation": str(args.val),
            "format": "classification", "fields": {"label": "label_text"}}
    if not name.startswith("mix@"):
        return {"train": sst2["data"], "validation": sst2["validation"], "format": "classification",
                "fields": sst2["fields"], "limit": rows, "max_len": 256}
    general = float(name[4:])
    return {"train": [{**sst2, "name": "sst2", "weight": 1 - general, "limit": rows},
                      {"data": str(SHARED / "alpaca" / "train.jsonl"), "name": "alpaca", "format": "alpaca",
                       "weight": general, "limit": rows, "sample": 0, "validation": None}],
            "max_len": 256}


def recipe(name: str, args) -> dict:
    task = "classification" if name.startswith("head:") else "causal_lm"
    return {
        "base_model": "smollm2-135m-instruct",
        "task": task,
        "strategy": strategy(name),
        "data": data(name, args),
        "training": {"max_steps": args.steps, "batch_size": args.batch, "lr": learning_rate(name, args), "warmup": 0.1,
                     "seed": 0,
                     "precision": args.precision},
        "eval": {"metrics": ["loss", "accuracy", "macro_f1"], "limit": args.val_limit, "retention": [
            {"name": "alpaca test (loss)", "data": str(SHARED / "alpaca" / "test.jsonl"), "format": "alpaca",
             "metric": "loss", "limit": args.retention_limit},
            {"name": "mmlu test (choice)", "data": str(args.mmlu), "format": "choice",
             "metric": "choice", "limit": args.retention_limit, "sample": 0},
        ]},
        "output": str(Path(args.out) / folder_name(name)),
    }


def folder_name(name: str) -> str:
    return name.replace("@", "-").replace(":", "-")


def readable_copy(src: Path, dst: Path) -> int:
    """Copy the JSON lines of `src` that parse (the shared MMLU test file has a truncated line, 10752, which
    ftcli rightly refuses); returns how many were left out."""
    good, bad = [], 0
    for line in src.read_text(encoding="utf-8").splitlines():
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            bad += 1
    dst.write_text("\n".join(good) + "\n", encoding="utf-8")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--val-limit", type=int, default=200, help="SST-2 validation rows scored for accuracy")
    ap.add_argument("--retention-limit", type=int, default=100)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--lr", type=float, help="learning rate of full, hft and ewc (default 1e-5)")
    ap.add_argument("--out", default="runs/evidence")
    ap.add_argument("--markdown", type=Path, help="also write the table and the command to this file")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.mmlu = (out / "mmlu-test.readable.jsonl").resolve()
    dropped = readable_copy(SHARED / "mmlu" / "test.jsonl", args.mmlu)
    # the first val_limit validation rows, as a file: a head scores every validation row and generation scores the
    # first eval.limit, so both are given exactly these
    args.val = (out / f"sst2-validation-first{args.val_limit}.jsonl").resolve()
    args.val.write_text("".join((SHARED / "sst2" / "validation.jsonl").read_text().splitlines(True)[: args.val_limit]))
    rows = []
    for name in args.strategies.split(","):
        path = out / f"{folder_name(name)}.yaml"
        path.write_text(yaml.safe_dump(recipe(name, args), sort_keys=False))
        print(f"training {name} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ftcli", "train", str(path), "--overwrite"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        rep = json.loads((out / folder_name(name) / "report.json").read_text())
        ret = {r["name"]: r for r in rep["retention"]}
        rows.append((name, rep, ret, time.perf_counter() - t0))
        print(f"  done in {rows[-1][3]:.0f} s", flush=True)
    head = ["| strategy | lr | trainable params | SST-2 val accuracy (before → after) | macro-F1 after "
            "| Alpaca test loss (before → after) | MMLU sample accuracy (before → after) | peak RSS MB | tokens/s "
            "| wall s |", "| --- | ---: | ---: | --- | ---: | --- | --- | ---: | ---: | ---: |"]
    lines = list(head)
    for name, rep, ret, wall in rows:
        b, a = rep["before"], rep["after"]
        al, mm = ret["alpaca test (loss)"], ret["mmlu test (choice)"]
        label = (f"ewc λ={name[4:]}" if name.startswith("ewc@") else
                 f"full + mix (Alpaca weight {name[4:]})" if name.startswith("mix@") else
                 name.replace("head:", "head + "))
        thr = rep["throughput"]
        lines.append(f"| {label} | {learning_rate(name, args):g} | {rep['parameters']['trainable']:,} | {b['accuracy']:.3f} → {a['accuracy']:.3f} | "
                     f"{a.get('macro_f1', float('nan')):.3f} | "
                     f"{al['before']:.4f} → {al['after']:.4f} ({al['change']:+.4f}) | "
                     f"{mm['before']:.3f} → {mm['after']:.3f} ({mm['change']:+.3f}) | {thr['peak_rss_mb']:,.0f} | "
                     f"{thr['tokens_per_s']:.0f} | {wall:.0f} |")
    cmd = "python scripts/evidence_strategies.py " + " ".join(sys.argv[1:])
    text = (f"Command: `{cmd.strip()}`\n\n{args.steps} steps × batch {args.batch} SST-2 training rows; accuracy on the "
            f"first {args.val_limit} SST-2 validation rows; retention: {args.retention_limit} Alpaca test rows (loss on "
            f"responses) and a seeded sample of {args.retention_limit} MMLU test rows (choice by log-likelihood; "
            f"{dropped} unreadable line(s) of the shared test file left out).\n\n"
            + "\n".join(lines) + "\n")
    (out / "strategies.md").write_text(text)
    if args.markdown:
        args.markdown.write_text("# Strategies on the built-in model: task accuracy against forgetting\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
