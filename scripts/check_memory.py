"""`ftcli check`'s memory estimate against the peak RSS of real steps, for every shipped recipe.

Runs `ftcli check RECIPE --probe K` (K real steps of a whole run cut short, in a temporary folder: loading, the
validation loss before and after, generation metrics and retention sets on 16 rows each, saving) in a fresh
process per recipe, and tabulates the estimate,
the measured peak RSS and the relative error, plus the probe's step time.

    python scripts/check_memory.py [--steps 2] [--repeat 1] [--recipes quickstart,full,...] [--set KEY=VALUE ...]

The peak RSS of the same recipe moves between runs (recipes/distill.yaml: 3,122 MB in one run, 2,519 in the next;
why was not established); with --repeat N each recipe runs N times, the error is against the median and the range
is printed.

Needs the recipes' data: `make data` (recipes/data) first.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=1, help="runs per recipe (the median peak and its range)")
    args = ap.parse_args()
    print(f"| recipe | estimate MB | peak RSS MB ({args.steps} steps{', median' if args.repeat > 1 else ''}) | "
          f"{'range MB | ' if args.repeat > 1 else ''}estimate error | s/step | probe s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if args.repeat > 1 else ""), flush=True)
    for name in args.recipes.split(","):
        runs = [probe(name, args) for _ in range(args.repeat)]
        if any(isinstance(r, str) for r in runs):
            print(next(r for r in runs if isinstance(r, str)), flush=True)
            continue
        peaks = sorted(r[1] for r in runs)
        measured, estimate = statistics.median_high(peaks), runs[0][0]
        spread = f"{peaks[0]:,.0f}–{peaks[-1]:,.0f} | " if args.repeat > 1 else ""
        print(f"| {name} | {estimate:,.0f} | {measured:,.0f} | {spread}{(estimate - measured) / measured:+.0%} | "
              f"{statistics.median(r[2] for r in runs):.2f} | {statistics.median(r[3] for r in runs):.0f} |",
              flush=True)


def probe(name: str, args):
    """One `ftcli check --probe` run: (estimate MB, peak RSS MB, s/step, wall s), or a failed table row."""
    cmd = [sys.executable, "-m", "ftcli", "check", str(ROOT / "recipes" / f"{name}.yaml"), "--probe",
           str(args.steps), *[x for o in args.overrides for x in ("--set", o)]]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"COLUMNS": "400", **os.environ})
    wall = time.time() - t0
    m = re.search(r"peak RSS ([\d,]+) MB measured; the estimate above says ([\d,]+) MB", proc.stdout)
    s = re.search(r"median ([\d.]+) s per step", proc.stdout)
    if proc.returncode or not m:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return f"| {name} | failed: {tail[0][:200]} | | | | {wall:.0f} |"
    measured, estimate = (float(x.replace(",", "")) for x in m.groups())
    return estimate, measured, float(s.group(1)), wall


if __name__ == "__main__":
    main()
