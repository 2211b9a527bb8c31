"""`ftcli check`'s memory estimate against the peak RSS of real steps, for every shipped recipe.

Runs `ftcli check RECIPE --probe K` (K real steps of a whole run cut short, in a temporary folder: loading,
validation and retention before and after, saving) in a fresh process per recipe, and tabulates the estimate,
the measured peak RSS and the relative error, plus the probe's step time.

    python scripts/check_memory.py [--steps 2] [--recipes quickstart,full,...] [--set KEY=VALUE ...]

Needs the recipes' data: `make data` (recipes/data) first.
"""

from __future__ import annotations

import argparse
import re
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
    args = ap.parse_args()
    print(f"| recipe | estimate MB | peak RSS MB ({args.steps} steps) | estimate error | s/step | probe s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for name in args.recipes.split(","):
        cmd = [sys.executable, "-m", "ftcli", "check", str(ROOT / "recipes" / f"{name}.yaml"), "--probe",
               str(args.steps), *[x for o in args.overrides for x in ("--set", o)]]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"COLUMNS": "400",
                                                                                   **__import__("os").environ})
        wall = time.time() - t0
        m = re.search(r"peak RSS ([\d,]+) MB measured; the estimate above says ([\d,]+) MB", proc.stdout)
        s = re.search(r"median ([\d.]+) s per step", proc.stdout)
        if proc.returncode or not m:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"| {name} | failed: {tail[0][:200]} | | | | {wall:.0f} |", flush=True)
            continue
        measured, estimate = (float(x.replace(",", "")) for x in m.groups())
        print(f"| {name} | {estimate:,.0f} | {measured:,.0f} | {(estimate - measured) / measured:+.0%} | "
              f"{float(s.group(1)):.2f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
