"""DPO step throughput, side by side: TRL's DPOTrainer (+ PEFT) against `ftcli train` with objective dpo.

Same pairs (the first ROWS of ../shared/data/hh_rlhf/train.jsonl whose prompt and longer reply fit in MAX_LEN
tokens, so neither side truncates), same model (the built-in SmolLM2-135M-Instruct), LoRA r=16 on every linear
layer, sigmoid loss with β 0.1, the reference as each tool does it for an adapter (the adapter switched off, every
step), the same batch and learning rate, one pass over the rows. Each run is its own process. Throughput counts the
non-pad tokens of both completions' sequences (prompt + chosen, prompt + rejected) over the whole run's step time,
the first WARMUP steps excluded. TRL is needed for this script only (`pip install trl`); it is not a dependency.

    python scripts/bench_dpo.py [--rows 64 --batch 4 --max-len 256 --precisions fp32,bf16 --markdown docs/objectives-bench.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "hh_rlhf" / "train.jsonl"
WARMUP = 2
LR = 5e-5
BETA = 0.1


def pairs(tokenizer, n: int, max_len: int) -> tuple[list[dict], list, list[int]]:
    """The first n HH pairs that fit max_len untruncated (as chat turns): (rows as in the file, their examples,
    each pair's non-pad token count)."""
    from ftcli.data.formats import to_example
    from ftcli.data.tokenize import Encoder

    raw = [json.loads(x) for x in DATA.read_text(encoding="utf-8").split("\n")[: n * 4] if x.strip()]
    examples = [to_example(r, "preference", {}, where=str(i), prompt_style="transcript") for i, r in enumerate(raw)]
    encoder = Encoder(tokenizer, None, 10**6, "truncate", "preference")
    kept = []
    for row, ex, enc in zip(raw, examples, encoder.encode_all(examples)[0]):
        if enc is not None and max(enc.chosen.length, enc.rejected.length) <= max_len:
            kept.append((row, ex, enc.length))
        if len(kept) == n:
            break
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ftcli import models

    torch.manual_seed(0)
    folder = str(models.builtin_folder("smollm2-135m-instruct"))
    tokenizer = models.load_tokenizer(folder)
    _, examples, tokens = pairs(tokenizer, args.rows, args.max_len)
    rows = [{"prompt": ex.prompt, "chosen": ex.messages[ex.n_prompt:], "rejected": ex.rejected[ex.n_prompt:]}
            for ex in examples]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    cfg = DPOConfig(output_dir=args.tmp, beta=BETA, learning_rate=LR, per_device_train_batch_size=args.batch,
                    num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0, report_to=[], use_cpu=True,
                    logging_steps=1000, save_strategy="no", seed=0, max_length=args.max_len * 2,
                    bf16=args.precision == "bf16", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                                task_type="CAUSAL_LM"),
                         callbacks=[Clock()])
    trainer.train()
    return finish(times, tokens, args)


def worker_ftcli(args) -> dict:
    import yaml

    from ftcli import models
    from ftcli import recipe as recipe_mod
    from ftcli import train
    from ftcli.runtime import tune_process

    tune_process()  # as `ftcli train` does
    tmp = Path(args.tmp)
    tokenizer = models.load_tokenizer(str(models.builtin_folder("smollm2-135m-instruct")))
    keep, _, tokens = pairs(tokenizer, args.rows, args.max_len)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    doc = {"base_model": "smollm2-135m-instruct",
           "strategy": {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
           "objective": {"name": "dpo", "beta": BETA, "reference": "adapter_off"},
           "data": {"train": str(tmp / "pairs.jsonl"), "format": "preference", "prompt_style": "transcript",
                    "validation": None, "max_len": args.max_len},
           "training": {"epochs": 1, "batch_size": args.batch, "lr": LR, "schedule": "linear", "warmup": 0,
                        "precision": args.precision, "seed": 0},
           "eval": {"metrics": ["loss"]}, "output": str(tmp / "run")}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(doc))
    run_dir = train.run(recipe_mod.load(tmp / "recipe.yaml"), output=tmp / "run", progress=False)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return finish([x["step_s"] for x in recs if x["kind"] == "train"], tokens, args)


def finish(times: list[float], tokens: list[int], args) -> dict:
    """Tokens per second over the steps after WARMUP (those steps' share of the rows' tokens, in proportion)."""
    measured = times[WARMUP:]
    share = len(measured) / max(len(times), 1)
    return {"steps": len(times), "tokens_per_s": sum(tokens) * share / sum(measured),
            "s_per_step": sum(measured) / len(measured),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_one(system: str, precision: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", system, "--precision", precision, "--rows", str(args.rows),
               "--batch", str(args.batch), "--max-len", str(args.max_len), "--tmp", tmp, "--result", str(out)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"{system} {precision} failed")
        res = json.loads(out.read_text())
        res["wall_s"] = time.perf_counter() - t0
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--worker", choices=["trl", "ftcli"], help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        from ftcli.logs import quiet

        quiet()
        res = (worker_trl if args.worker == "trl" else worker_ftcli)(args)
        Path(args.result).write_text(json.dumps(res))
        return
    lines = ["| precision | system | non-pad tokens/s | s/step | peak RSS MB | ÷ TRL |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for precision in args.precisions.split(","):
        for rep in range(args.repeat):
            trl = run_one("trl", precision, args)
            ours = run_one("ftcli", precision, args)
            for name, r in (("TRL DPOTrainer + PEFT", trl), ("ftcli", ours)):
                lines.append(f"| {precision} | {name} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.2f} | "
                             f"{r['peak_rss_mb']:.0f} | {r['tokens_per_s'] / trl['tokens_per_s']:.2f}× |")
            print("\n".join(lines[-2:]), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = (f"{args.rows} HH-RLHF pairs, batch {args.batch}, max length {args.max_len} per sequence, one epoch, "
            f"{WARMUP} warm-up steps excluded. Machine: {os.cpu_count()} cores, {cpu}.")
    text = "\n".join(lines)
    print(text + "\n\n" + info)
    if args.markdown:
        args.markdown.write_text(f"Command: `python scripts/bench_dpo.py {' '.join(sys.argv[1:])}`\n\n{info}\n\n{text}\n")


if __name__ == "__main__":
    main()
