"""Start-up: `ftcli --help` and `ftcli check RECIPE` against `python -c "import torch"`, as whole processes.

Each command runs REPEATS times, alternating, with the converted built-in model already cached; printed: the
median and the range of wall times, and check's median divided by import torch's.

    python scripts/bench_startup.py [--repeats 7] [--recipe recipes/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    args = ap.parse_args()
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "ftcli --help": [sys.executable, "-m", "ftcli", "--help"],
        f"ftcli check {args.recipe}": [sys.executable, "-m", "ftcli", "check", args.recipe],
    }
    for cmd in commands.values():  # once untimed: the page cache and the tokenized-data cache warm
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    print(f"{args.repeats} runs each, alternating; {cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores\n")
    print("| command | median s | min–max s |")
    print("| --- | ---: | --- |")
    for name, ts in times.items():
        print(f"| `{name}` | {statistics.median(ts):.2f} | {min(ts):.2f}–{max(ts):.2f} |")
    torch_s = statistics.median(times["python -c 'import torch'"])
    check_s = statistics.median(times[f"ftcli check {args.recipe}"])
    print(f"\ncheck ÷ import torch: {check_s / torch_s:.2f}×")


if __name__ == "__main__":
    main()
