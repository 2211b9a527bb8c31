"""A synth pair on the built-in model: a teacher trained on the dates task writes answers for 640 prompts, a student
learns from them alone; the same student recipe trained on the original labels of those prompts is the comparison.

    python scripts/evidence_synth.py --teacher-steps 80 --shipped    # the pair in recipes/ (writes dates_synth.jsonl)
    python scripts/evidence_synth.py --teacher-steps 8                # a weaker teacher, for contrast

Each step is the ftcli command a user types (recipes/synth-teacher.yaml, `ftcli synth`, recipes/synth-student.yaml);
scores are exact match on the 199 validation rows (greedy, 16 new tokens), read from the runs' reports. Runs whose
report exists are reused. When the teacher's answers equal the labels row for row, the student's data is the labels
run's data byte for byte, so that run is not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "recipes" / "data" / "dates_train.jsonl"
N = 640
SYNTH = ["--prompts", PROMPTS, "--limit", str(N), "--temperature", "0", "--max-new-tokens", "16",
         "--regex", r"^\d{4}-\d{2}-\d{2}$"]


def rel(arg) -> str:
    """Paths under the project as the relative paths a user types (they land in the synth record)."""
    return os.path.relpath(arg, ROOT) if isinstance(arg, Path) and arg.is_relative_to(ROOT) else str(arg)


def ftcli(*args) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ftcli", *map(rel, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:])
        raise SystemExit(f"ftcli {' '.join(map(str, args))} failed")
    return time.perf_counter() - t0


def train(recipe: str, out: Path, *sets: str) -> float | None:
    if (out / "report.json").is_file():
        return None
    return ftcli("train", recipe, "--output", out, "--overwrite", *[x for s in sets for x in ("--set", s)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/evidence-synth")
    ap.add_argument("--teacher-steps", type=int, default=80)
    ap.add_argument("--shipped", action="store_true", help="write the rows to recipes/data/dates_synth.jsonl")
    args = ap.parse_args()
    out = ROOT / args.out
    k = args.teacher_steps
    synth_out = ROOT / "recipes" / "data" / "dates_synth.jsonl" if args.shipped else out / f"synth-{k}.jsonl"
    walls = {"teacher": train("recipes/synth-teacher.yaml", out / f"teacher-{k}", f"training.max_steps={k}")}
    walls["synth"] = ftcli("synth", out / f"teacher-{k}", *SYNTH, "--out", synth_out, "--overwrite")
    gold = [json.loads(line) for line in PROMPTS.read_text().splitlines()][:N]
    rows = [json.loads(line) for line in synth_out.read_text().splitlines()]
    by_input = {r["input"]: r["output"] for r in rows}
    agree = sum(by_input.get(g["input"]) == g["output"] for g in gold)
    labels_data = [{"instruction": g["instruction"], "input": g["input"], "output": g["output"]} for g in gold]
    same = rows == labels_data
    walls["student"] = train("recipes/synth-student.yaml", out / f"student-{k}", f"data.train={synth_out}")
    labels = out / f"student-{k}" if same else out / "labels"
    if not same:
        walls["labels"] = train("recipes/synth-student.yaml", labels, f"data.train={PROMPTS}", f"data.limit={N}")
    record = json.loads(Path(str(synth_out) + ".synth.json").read_text())

    def report(d: Path) -> dict:
        return json.loads((d / "report.json").read_text())

    lines = ["| run | trained on | validation exact match (before → after) | built-in probe loss (before → after) |",
             "| --- | --- | --- | --- |"]
    for name, d, what in ((f"teacher ({k} steps)", out / f"teacher-{k}", f"dates_train, labels ({k} steps × 8 rows)"),
                          ("student", out / f"student-{k}", f"the teacher's answers to {N} prompts "
                                                            f"({record['counts']['kept']} kept)"),
                          ("labels", labels, f"the same {N} prompts, original labels")):
        rep = report(d)
        probe = next((r for r in rep["retention"] if r["data"] == "builtin:probe"), None)
        pr = f"{probe['before']:.4f} → {probe['after']:.4f} ({probe['change']:+.4f})" if probe else "–"
        lines.append(f"| {name} | {what} | {rep['before']['exact_match']:.3f} → {rep['after']['exact_match']:.3f} | "
                     f"{pr} |")
    dropped = {key: v for key, v in record["counts"]["dropped"].items() if v}
    print("\n".join(lines))
    print(f"\nteacher answers equal to the labels: {agree} of {N}" + (" (so the student's data is the labels run's "
                                                                      "data, byte for byte; not run twice)" if same
                                                                      else ""))
    print(f"synth: {record['counts']['generated']} generations, {record['counts']['kept']} kept, dropped "
          f"{dropped or 'none'}, {record['seconds']:.0f} s")
    print("wall s (this machine, shared):", {key: round(v) for key, v in walls.items() if v is not None})


if __name__ == "__main__":
    main()
