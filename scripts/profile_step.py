"""Where the time of one LoRA (or full fine-tuning) step goes, by category, on the built-in model (torch.profiler).

Builds the same Trainer as `ftcli train` (LoRA r=16 on every linear layer, or full fine-tuning with --strategy
full; packed rows of alpaca training data), runs WARMUP steps, then profiles STEPS steps at each precision and
prints a table: self CPU time per category of operator (big matmuls, LoRA's rank-r products, attention forward
and backward, norms and activations, dtype casts, the output head and loss, the optimiser, everything else), and the
step's wall time. The categories come from the operators' names and shapes (see `category`); "Python and other" is
the step's wall time not inside any operator. --dropout sets LoRA's dropout.

    python scripts/profile_step.py [--precisions fp32,bf16] [--strategy lora|full] [--batch 4] [--max-len 512]
                                   [--steps 3] [--top N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "alpaca" / "train.jsonl"
sys.path.insert(0, str(ROOT))


def category(name: str, shapes: list, rank: int) -> str:
    """A profiler event → the row of the table it belongs to."""
    n = name.lower()
    if "adamw" in n or "_fused_adam" in n or "foreach" in n:
        return "optimiser"
    if "scaled_dot_product" in n or "flash_attention" in n or "_efficient_attention" in n or "sdpa" in n:
        return "attention (forward + backward)"
    if "cross_entropy" in n or "log_softmax" in n or "nll_loss" in n:
        return "head: softmax and loss"
    if n in ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::linear", "aten::addmm_"):
        dims = [d for s in shapes if s for d in s]
        if rank in dims:
            return "LoRA rank-r products"
        if any(d >= 40000 for d in dims):
            return "head: output projection"
        return "big matmuls (the model's weights)"
    if n in ("aten::to", "aten::_to_copy", "aten::copy_") :
        return "dtype casts and copies"
    if any(k in n for k in ("rsqrt", "pow", "mean", "silu", "mul", "add", "sigmoid", "neg", "cat", "cos", "sin",
                            "div", "sum", "where")):
        return "norms, activations, rotary, elementwise"
    return "other operators"


def build_trainer(precision: str, *, strategy: str = "lora", dropout: float = 0.0, batch: int = 4, max_len: int = 512,
                 rows: int = 64):
    """The Trainer `ftcli train` builds for LoRA r=16 on every linear layer (or full fine-tuning) of the built-in
    model over the first `rows` alpaca training rows, in training mode, in a temporary folder."""
    import yaml

    from ftcli import recipe as recipe_mod
    from ftcli import train
    from ftcli.logs import quiet
    from ftcli.run_folder import RunFolder
    from ftcli.runtime import tune_process

    quiet()
    tune_process()
    tmp = Path(tempfile.mkdtemp(prefix="profile-step-"))
    data = [json.loads(x) for x in DATA.read_text().split("\n")[:rows] if x.strip()]
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    doc = {"base_model": "smollm2-135m-instruct",
           "strategy": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear", "dropout": dropout}
           if strategy == "lora" else {"name": "full"},
           "data": {"train": str(tmp / "d.jsonl"), "format": "alpaca", "validation": None, "max_len": max_len},
           "training": {"max_steps": 1000, "batch_size": batch, "lr": 1e-4, "precision": precision},
           "output": str(tmp / precision)}
    (tmp / f"{precision}.yaml").write_text(yaml.safe_dump(doc))
    folder = RunFolder.create(tmp / precision, resume=False, overwrite=True)
    trainer = train.Trainer(train.build(recipe_mod.load(tmp / f"{precision}.yaml"), run_dir=folder.path,
                                         log=lambda *a: None), folder)
    trainer.model.train()
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--strategy", choices=("lora", "full"), default="lora")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--top", type=int, default=0, help="also print torch.profiler's N operators with most self time")
    ap.add_argument("--time-only", action="store_true", help="no profiler: step times alone, precisions alternated")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    results = {}
    rank = 16 if args.strategy == "lora" else -1  # the LoRA products are the matmuls with a side of this size
    for precision in args.precisions.split(","):
        trainer = build_trainer(precision, strategy=args.strategy, dropout=args.dropout, batch=args.batch,
                               max_len=args.max_len, rows=args.rows)
        for step in range(args.warmup):
            trainer.step(step)
        if args.time_only:
            secs = [trainer.step(step).seconds for step in range(args.warmup, args.warmup + args.steps)]
            print(f"{precision}: step seconds {[round(x, 2) for x in secs]}", flush=True)
            continue
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            tokens = 0
            for step in range(args.warmup, args.warmup + args.steps):
                tokens += trainer.step(step).tokens
            wall = time.perf_counter() - t0
        if args.top:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        by = defaultdict(float)
        for ev in prof.key_averages(group_by_input_shape=True):
            by[category(ev.key, ev.input_shapes or [], rank)] += ev.self_cpu_time_total / 1e6
        covered = sum(by.values())
        by["Python and other (wall − operators)"] = max(wall - covered, 0.0)
        results[precision] = {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
                              "rows": dict(sorted(by.items(), key=lambda kv: -kv[1]))}
    if args.time_only:
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    what = "LoRA r=16 all-linear" if args.strategy == "lora" else "full fine-tuning"
    print(f"# one {args.strategy} step by category (built-in model, {what}, batch {args.batch}, max_len {args.max_len}, "
          f"{args.steps} steps after {args.warmup} warm-up; {os.cpu_count()} cores, {cpu}, torch {torch.__version__})")
    for precision, res in results.items():
        print(f"\n{precision}: {res['wall_s'] / args.steps:.2f} s/step, {res['tokens_per_s']:.0f} non-pad tokens/s")
        print("| category | s per step | share |\n| --- | ---: | ---: |")
        for name, secs in res["rows"].items():
            print(f"| {name} | {secs / args.steps:.3f} | {secs / res['wall_s'] * 100:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
