"""One process against two, on the built-in model: the same rows, the same global batch, one thread per process.

Trains SmolLM2-135M-Instruct on Alpaca training rows (../shared/data, never copied into the project) with each
configuration below, one after another, through `ftcli train [--nproc 2]` as a user runs it, then reads each run's
report and metrics: tokens/s (non-pad tokens of all processes per second of training steps), peak RSS of every
process, the wall time, and the per-step training loss, plotted on one figure. The 1-process run takes batch B; the
2-process runs take batch B/2 each, so every step trains the same rows and the loss curves should coincide.

    flock /tmp/ftcli-heavy.lock python scripts/bench_distributed.py --steps 20 --out runs/bench-distributed \\
        --plot docs/distributed-loss.png

`--strategies lora,full` picks the strategies (each runs as 1 process, 2 × DDP and 2 × FSDP2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
STRATEGIES = {"lora": ({"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}, 5e-4),
              "full": ({"name": "full"}, 1e-5)}
SETUPS = (("1 process", 1, "ddp"), ("2 × DDP", 2, "ddp"), ("2 × FSDP2", 2, "fsdp"))


def recipe(strategy: str, processes: int, mode: str, args, out: Path) -> Path:
    params, lr = STRATEGIES[strategy]
    doc = {
        "base_model": "smollm2-135m-instruct",
        "strategy": params,
        "data": {"train": str(SHARED / "alpaca" / "train.jsonl"), "format": "alpaca", "validation": None,
                 "limit": args.steps * args.batch, "max_len": args.max_len},
        "training": {"max_steps": args.steps, "batch_size": args.batch // processes, "lr": lr, "warmup": 0.1,
                     "seed": 0, "distributed": mode},
        "eval": {"metrics": ["loss"]},
        "output": str(out / f"{strategy}-{processes}-{mode}"),
    }
    path = out / f"{strategy}-{processes}-{mode}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="the global batch (1 process: all of it; 2: half each)")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--strategies", default="lora")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distributed")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows, curves = [], {}
    for strategy in args.strategies.split(","):
        for label, processes, mode in SETUPS:
            path = recipe(strategy, processes, mode, args, args.out)
            cmd = [sys.executable, "-m", "ftcli", "train", str(path), "--overwrite"]
            if processes > 1:
                cmd += ["--nproc", str(processes)]
            t0 = time.time()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            wall = time.time() - t0
            if done.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            run = Path(yaml.safe_load(path.read_text())["output"])
            report = json.loads((run / "report.json").read_text())
            losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            curves[f"{strategy}, {label}"] = [(r["step"], r["loss"]) for r in losses if r["kind"] == "train"]
            thr = report["throughput"]
            rows.append({"strategy": strategy, "setup": label, "tokens_per_s": thr["tokens_per_s"],
                         "s_per_step": thr["s_per_step"], "rss": thr.get("peak_rss_mb_per_process") or [thr["peak_rss_mb"]],
                         "wall": wall, "final_loss": curves[f"{strategy}, {label}"][-1][1]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; OMP_NUM_THREADS=1 per process;"
          f" {args.steps} steps, global batch {args.batch}, max_len {args.max_len}\n")
    print("| strategy | processes | tokens/s | s/step | peak RSS per process (MB) | wall s | loss at the last step |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        rss = " / ".join(f"{m:,.0f}" for m in r["rss"])
        print(f"| {r['strategy']} | {r['setup']} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | {rss} | "
              f"{r['wall']:.0f} | {r['final_loss']:.4f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
        styles = {"1 process": ("-", 3.0), "2 × DDP": ("--", 1.8), "2 × FSDP2": (":", 1.8)}
        for name, points in curves.items():
            xs, ys = zip(*points)
            ls, lw = styles[name.split(", ", 1)[1]]
            ax.plot(xs, ys, ls, linewidth=lw, label=name)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("training loss (nats per trained token)")
        ax.set_title(f"SmolLM2-135M, Alpaca rows, global batch {args.batch}: 1 process vs 2", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
