"""A synth pair on the built-in model: a teacher trained on the dates task writes answers for 640 prompts, a student
learns from them; the same student recipe trained on the original labels of those prompts is the comparison.

    python scripts/evidence_synth.py [--out runs/evidence-synth]    # prints a markdown table

Each step is the ftcli command a user types (recipes/synth-teacher.yaml, `ftcli synth`, recipes/synth-student.yaml);
scores are exact match on the 199 validation rows (greedy, 16 new tokens), read from the runs' reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYNTH = ["--prompts", "recipes/data/dates_train.jsonl", "--limit", "640", "--temperature", "0", "--max-new-tokens", "16",
         "--regex", r"^\d{4}-\d{2}-\d{2}$"]


def ftcli(*args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ftcli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:])
        raise SystemExit(f"ftcli {' '.join(args)} failed")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/evidence-synth")
    ap.add_argument("--synth-out", default="recipes/data/dates_synth.jsonl", help="where the teacher's rows go")
    args = ap.parse_args()
    out = Path(args.out)
    walls = {}
    walls["teacher"] = ftcli("train", "recipes/synth-teacher.yaml", "--output", str(out / "teacher"), "--overwrite")
    walls["synth"] = ftcli("synth", str(out / "teacher"), *SYNTH, "--out", args.synth_out, "--overwrite")
    walls["student"] = ftcli("train", "recipes/synth-student.yaml", "--output", str(out / "student"), "--overwrite",
                             "--set", f"data.train={ROOT / args.synth_out}")
    walls["labels"] = ftcli("train", "recipes/synth-student.yaml", "--output", str(out / "labels"), "--overwrite",
                            "--set", f"data.train={ROOT / 'recipes/data/dates_train.jsonl'}", "--set", "data.limit=640")
    record = json.loads((ROOT / (args.synth_out + ".synth.json")).read_text())
    rows = ["| run | trained on | validation exact match (before → after) | validation loss after | wall s |",
            "| --- | --- | --- | ---: | ---: |"]
    what = {"teacher": "dates_train, original labels (80 steps × 8 rows)",
            "student": f"the teacher's answers to 640 prompts ({record['counts']['kept']} kept)",
            "labels": "the same 640 prompts, original labels"}
    for name in ("teacher", "student", "labels"):
        rep = json.loads((out / name / "report.json").read_text())
        b, a = rep["before"], rep["after"]
        rows.append(f"| {name} | {what[name]} | {b['exact_match']:.3f} → {a['exact_match']:.3f} | {a['loss']:.4f} | "
                    f"{walls[name]:.0f} |")
    dropped = {k: v for k, v in record["counts"]["dropped"].items() if v}
    print("\n".join(rows))
    print(f"\nsynth: {record['counts']['generated']} generations, {record['counts']['kept']} kept, dropped {dropped}, "
          f"{walls['synth']:.0f} s")


if __name__ == "__main__":
    main()
