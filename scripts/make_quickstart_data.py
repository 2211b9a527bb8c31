"""Generate the quickstart task, deterministically: rewrite a date written in words as ISO 8601 (YYYY-MM-DD).

The built-in SmolLM2-135M-Instruct gets few of these exactly right out of the box (it answers in prose, keeps
the words, or gets the month number or zero-padding wrong); a few minutes of LoRA make it reliable. Exact match
is a fair metric here because there is exactly one right answer.

    python scripts/make_quickstart_data.py [OUT_DIR]      # default: recipes/data

Writes dates_train.jsonl and dates_validation.jsonl (alpaca format: instruction, input, output), and the preference
pairs of recipes/dpo.yaml: dates_pairs_train.jsonl and dates_pairs_validation.jsonl (prompt, chosen: the ISO date,
rejected: a near miss a model makes — US order, no zero-padding, day and month swapped, or the words echoed).
The same seed gives byte-identical files; the tests check that the committed files are what this script writes.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys
from pathlib import Path

INSTRUCTION = "Rewrite the date in ISO 8601 format (YYYY-MM-DD). Answer with the date only."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell(d: dt.date, style: int) -> str:
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    weekday = d.strftime("%A")
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{short} {d.day} {d.year}",
        f"the {ordinal(d.day)} of {month}, {d.year}",
        f"{weekday}, {month} {d.day}, {d.year}",
        f"{month} {ordinal(d.day)} {d.year}",
        f"{d.day} {short}. {d.year}",
    ][style]


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1).toordinal(), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    out = []
    for _ in range(n):
        d = dt.date.fromordinal(start + rng.randrange(span))
        out.append({"instruction": INSTRUCTION, "input": spell(d, rng.randrange(7)), "output": d.isoformat()})
    return out


def near_miss(row: dict, rng: random.Random) -> str:
    """A wrong answer of the kinds the base model gives: the right date in the wrong shape, or the words echoed."""
    d = dt.date.fromisoformat(row["output"])
    misses = [f"{d.month:02d}/{d.day:02d}/{d.year}", f"{d.year}-{d.month}-{d.day}", row["input"],
              f"The date is {d.isoformat()}."]
    if d.day <= 12 and d.day != d.month:
        misses.append(f"{d.year}-{d.day:02d}-{d.month:02d}")
    return rng.choice([m for m in misses if m != row["output"]])  # no padding to drop: 2021-11-23 stays right


def pairs(data: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"], "rejected": near_miss(r, rng)}
            for r in data]


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = rows(3000, seed=1), rows(200, seed=2)
    seen = {r["input"] for r in train}
    val = [r for r in val if r["input"] not in seen]  # no validation date is seen in training
    paths = []
    files = (("dates_train.jsonl", train), ("dates_validation.jsonl", val),
             ("dates_pairs_train.jsonl", pairs(train[:600], seed=3)), ("dates_pairs_validation.jsonl", pairs(val[:100], seed=4)))
    for name, data in files:
        path = out_dir / name
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "recipes" / "data"):
        print(p)
