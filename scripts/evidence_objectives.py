"""Objectives on the real model: DPO (and SimPO) on HH-RLHF pairs, and distillation from a fine-tuned teacher.

Everything runs through `ftcli train` / `ftcli export` on the built-in SmolLM2-135M-Instruct, with data from the
workspace's ../shared/data (never copied into the project: the subsets this script needs are written into the
output folder). Each run's recipe is written beside it, and a markdown table of the results to OUT/objectives.md.

    python scripts/evidence_objectives.py dpo --out runs/evidence-dpo [--train-rows 800 --steps 100]
    python scripts/evidence_objectives.py distill --out runs/evidence-distill

dpo: lora r=16 on all linear layers; sigmoid DPO (β 0.1, reference precomputed) and SimPO (β 2, γ 0.5) on the
first TRAIN_ROWS pairs of hh_rlhf/train.jsonl (the "Human:/Assistant:" prompts split into turns); validation on the
first TEST_ROWS pairs of hh_rlhf/test.jsonl: reward accuracy and margin, and log-prob accuracy (does the model
itself prefer the chosen reply?) before and after; retention: loss on 100 Alpaca test responses.

distill: a teacher (lora on 1,920 SST-2 rows, 120 steps, exported), then two students from the base model on the
same 480 other SST-2 prompts for the same steps: one trained by SFT on the labels, one distilled from the teacher's
own answers (no labels read: `answers: teacher`, α = 0, forward KL, T = 2). SST-2 validation accuracy (first 300
rows) and Alpaca retention for each.
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
FTCLI = [sys.executable, "-m", "ftcli"]
ALPACA = {"data": str(SHARED / "alpaca" / "test.jsonl"), "format": "alpaca", "metric": "loss", "limit": 100,
          "name": "alpaca-test"}


def rows(path: Path, start: int, n: int) -> list[dict]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(x) for x in lines[start : start + n] if x.strip()]


def write_rows(path: Path, data: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return path


REUSE: set[str] = set()  # --reuse: runs whose finished report is taken as it is when their recipe is unchanged


def train(out: Path, name: str, doc: dict) -> tuple[dict, float]:
    """Write the recipe, run `ftcli train` on it, return (report.json, wall seconds)."""
    recipe = out / f"{name}.yaml"
    doc = {"base_model": "smollm2-135m-instruct", **doc, "output": str(out / name)}
    text = yaml.safe_dump(doc, sort_keys=False)
    report = out / name / "report.json"
    if name in REUSE and report.is_file() and recipe.is_file() and recipe.read_text() == text:
        print(f"{name}: reusing the finished run {out / name}")
        rep = json.loads(report.read_text())
        return rep, rep["run"]["wall_s"]
    recipe.write_text(text)
    t0 = time.time()
    subprocess.run([*FTCLI, "train", str(recipe), "--overwrite"], check=True)
    return json.loads((out / name / "report.json").read_text()), time.time() - t0


def retention(report: dict) -> tuple[float, float]:
    r = report["retention"][0]
    return r["before"], r["after"]


def dpo(args) -> list[str]:
    out = args.out
    train_file = write_rows(out / "data" / "hh_train.jsonl", rows(SHARED / "hh_rlhf" / "train.jsonl", 0, args.train_rows))
    test_file = write_rows(out / "data" / "hh_test.jsonl", rows(SHARED / "hh_rlhf" / "test.jsonl", 0, args.test_rows))
    base = {
        "strategy": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": str(train_file), "validation": str(test_file), "format": "preference",
                 "prompt_style": "transcript", "max_len": args.max_len},
        "training": {"max_steps": args.steps, "batch_size": 8, "lr": args.lr, "warmup": 0.1, "seed": 0,
                     "precision": args.precision},
        "eval": {"metrics": ["loss"], "retention": [ALPACA]},
    }
    runs = {"dpo (sigmoid, β 0.1)": {"name": "dpo", "beta": 0.1, "reference": "precompute"},
            "simpo (β 2, γ 0.5)": {"name": "dpo", "loss": "simpo", "beta": 2.0, "gamma": 0.5}}
    lines = [f"Command: `python scripts/evidence_objectives.py dpo --out {out} --train-rows {args.train_rows} "
             f"--test-rows {args.test_rows} --steps {args.steps} --lr {args.lr} --max-len {args.max_len} "
             f"--precision {args.precision}`", "",
             "| objective | reward accuracy (held-out) | reward margin | log-prob accuracy before → after | "
             "Alpaca test loss before → after | tokens/s | wall s |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for label, objective in runs.items():
        slug = objective.get("loss", "sigmoid")
        report, wall = train(out, slug, {**base, "objective": objective})
        b, a = report["before"], report["after"]
        rb, ra = retention(report)
        lines.append(f"| {label} | {a['reward_accuracy']:.3f} | {a['reward_margin']:+.3f} | "
                     f"{b['logp_accuracy']:.3f} → {a['logp_accuracy']:.3f} | {rb:.4f} → {ra:.4f} ({ra - rb:+.4f}) | "
                     f"{report['throughput']['tokens_per_s']:.0f} | {wall:.0f} |")
    return lines


def distill(args) -> list[str]:
    out = args.out
    sst = SHARED / "sst2" / "train.jsonl"
    teacher_rows = write_rows(out / "data" / "sst2_teacher.jsonl", rows(sst, 0, 1920))
    student_rows = write_rows(out / "data" / "sst2_student.jsonl", rows(sst, 1920, 480))
    common = {"format": "classification", "fields": {"label": "label_text"}, "max_len": 128}
    val = {"validation": str(SHARED / "sst2" / "validation.jsonl")}
    evals = {"metrics": ["loss", "accuracy"], "limit": 300, "retention": [ALPACA]}
    lora = {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
    t = {"batch_size": 16, "lr": 5e-4, "warmup": 0.1, "seed": 0, "precision": args.precision}
    teacher, twall = train(out, "teacher", {"strategy": lora, "data": {"train": str(teacher_rows), **common, **val},
                                            "training": {**t, "max_steps": 120}, "eval": evals})
    subprocess.run([*FTCLI, "export", str(out / "teacher"), "--out", str(out / "teacher-model"), "--overwrite"],
                   check=True)
    steps = {**t, "max_steps": args.steps}
    sft, swall = train(out, "student-sft", {"strategy": lora, "data": {"train": str(student_rows), **common, **val},
                                            "training": steps, "eval": evals})
    kd, kwall = train(out, "student-distill", {
        "strategy": lora, "data": {"train": str(student_rows), **common, **val}, "training": steps, "eval": evals,
        "objective": {"name": "distill", "teacher": str(out / "teacher-model"), "alpha": 0.0, "temperature": 2.0,
                      "answers": "teacher", "answer_tokens": 8}})
    lines = [f"Command: `python scripts/evidence_objectives.py distill --out {out} --steps {args.steps} "
             f"--precision {args.precision}`", "",
             "| model | trained on | SST-2 val accuracy (before → after) | Alpaca test loss (before → after) | wall s |",
             "| --- | --- | --- | --- | ---: |"]
    for label, what, rep, wall in (("teacher", "1,920 rows, labels, 120 steps", teacher, twall),
                                   ("student, SFT", f"480 other rows, labels, {args.steps} steps", sft, swall),
                                   ("student, distilled", f"the same 480 prompts, teacher's answers and KL (no labels), "
                                    f"{args.steps} steps", kd, kwall)):
        rb, ra = retention(rep)
        lines.append(f"| {label} | {what} | {rep['before']['accuracy']:.3f} → {rep['after']['accuracy']:.3f} | "
                     f"{rb:.4f} → {ra:.4f} ({ra - rb:+.4f}) | {wall:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dpo", "distill"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-rows", type=int, default=800)
    p.add_argument("--test-rows", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--reuse", default="", help="comma-separated run names (e.g. teacher,student-sft) whose "
                   "finished run is reused when its recipe is unchanged (after a code change, rerun them)")
    args = p.parse_args()
    REUSE.update(n for n in args.reuse.split(",") if n)
    args.out = args.out.resolve()  # the recipes name their data by absolute path (a recipe resolves against its folder)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = dpo(args) if args.what == "dpo" else distill(args)
    md = args.out / "objectives.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
