"""Training throughput, side by side: HF Trainer + PEFT (the standard stack) against `ftcli train`.

Same rows (../shared/data/alpaca train, chat-templated with the model's template, loss on the responses), same
model (the built-in SmolLM2-135M-Instruct), same hyperparameters, same number of examples. Every run is its own
process, so peak RSS is that run's alone. The first WARMUP steps of each run are excluded from the timings.

    python scripts/bench_train.py                       # lora and full, HF and ftcli, fp32; prints the table
    python scripts/bench_train.py --variants             # also ftcli with each of its optimisations turned off alone
    python scripts/bench_train.py --markdown docs/benchmarks.md
    python scripts/bench_train.py --strategies lora --dropout 0.05     # LoRA dropout on both sides
    python scripts/bench_train.py --strategies lora --grad-accum 2     # 2 micro-batches per optimiser step

The HF side is the standard way: DataCollatorForSeq2Seq padding to the longest row of the batch, the Trainer's
defaults (AdamW, linear schedule, fp32), `Trainer.train()`. Both sides tokenise with ftcli's encoder so the token
ids and masks are identical; validation loss is computed by the same function for both after training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "alpaca"
WARMUP = 2
LR = 2e-4


def encoded_rows(tokenizer, path: Path, start: int, n: int, max_len: int):
    from ftcli.data import load_examples
    from ftcli.data.tokenize import Encoder

    examples = load_examples(str(path), "alpaca", {}, limit=start + n)[start:]
    encoder = Encoder(tokenizer, None, max_len, "truncate", "alpaca")
    return [e for e in encoder.encode_all(examples)[0] if e is not None]


def worker_hf(args) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from ftcli import models

    torch.manual_seed(args.seed)
    folder = args.base or str(models.builtin_folder("smollm2-135m-instruct"))
    tokenizer = models.load_tokenizer(folder)
    compute = "bfloat16" if args.precision == "bf16" else "float32"
    model = models.load_model(folder, **({"quantization": "nf4", "compute_dtype": compute}
                                         if args.strategy == "qlora" else {}))
    if args.strategy == "qlora":  # the standard QLoRA stack: 4-bit NF4 base (double quantisation), then LoRA
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.strategy in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    rows = encoded_rows(tokenizer, Path(args.data) / "train.jsonl", 0, args.rows, args.max_len)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels(), "attention_mask": [1] * len(e.input_ids)} for e in rows]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    seen: list[tuple[int, int]] = []  # per batch: (non-pad tokens, computed positions)

    def collate(features):
        batch = collator(features)
        seen.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(output_dir=args.tmp, per_device_train_batch_size=args.batch, learning_rate=LR,
                              num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[],
                              use_cpu=not torch.cuda.is_available(),
                              seed=args.seed, disable_tqdm=True, bf16=args.precision == "bf16",
                              gradient_accumulation_steps=args.grad_accum)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    n = args.grad_accum  # the clock times optimiser steps; collate sees micro-batches
    seen = [tuple(map(sum, zip(*seen[i : i + n]))) for i in range(0, len(seen), n)]
    return finish(args, model, tokenizer, times, [s[0] for s in seen], [s[1] for s in seen], losses)


def worker_ftcli(args) -> dict:
    import yaml

    from ftcli import recipe as recipe_mod
    from ftcli import train

    tmp = Path(args.tmp)
    from ftcli import models

    tokenizer = models.load_tokenizer(args.base or str(models.builtin_folder("smollm2-135m-instruct")))
    rows = [json.loads(line) for line in (Path(args.data) / "train.jsonl").read_text().splitlines()[: args.rows]]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    strategy = {"name": "full"}
    if args.strategy in ("lora", "qlora"):
        strategy = {"name": args.strategy, "r": 16, "alpha": 32, "target_modules": "all-linear",
                    "dropout": args.dropout}
        if args.fp32_branch:
            strategy["fp32_branch"] = True
    if args.strategy == "qlora":
        strategy["compute_dtype"] = "bfloat16" if args.precision == "bf16" else "float32"
    doc = {"base_model": args.base or "smollm2-135m-instruct", "strategy": strategy,
           "data": {"train": str(tmp / "train.jsonl"), "format": "alpaca", "validation": None, "max_len": args.max_len,
                    "packing": not args.no_packing},
           "training": {"epochs": 1, "batch_size": args.batch, "lr": LR, "schedule": "linear", "warmup": 0,
                        "weight_decay": 0.0, "precision": args.precision, "compile": args.compile, "seed": args.seed,
                        "pass_tokens": args.pass_tokens, "grad_accum": args.grad_accum},
           "eval": {"metrics": ["loss"], **({"retention": []} if args.no_retention else {})},
           "output": str(tmp / "run")}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(doc))
    r = recipe_mod.load(tmp / "recipe.yaml")
    if args.no_packed_attention:
        import ftcli.attention

        ftcli.attention.install = lambda model: False
    if args.peft_layer:
        from ftcli.strategies.lora import Lora

        Lora.fused = False
    if args.plain_loss:
        import ftcli.loss

        ftcli.loss.nll_sum = full_logits_nll_sum  # what the sft objective calls
    from ftcli.runtime import tune_process

    tune_process()  # as `ftcli train` does
    holder = {}
    run_dir = train.run(r, output=tmp / "run", progress=False,
                        hooks=train.Hooks(at_end=[lambda m: holder.setdefault("model", m)]))
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in recs if x["kind"] == "train"]
    positions = json.loads((run_dir / "report.json").read_text())["throughput"]
    pad = positions["padding_fraction"]
    toks = [x["tokens"] for x in recs]
    return finish(args, holder["model"], tokenizer, [x["step_s"] for x in recs], toks,
                  [t / max(1 - pad, 1e-9) for t in toks], [x["loss"] for x in recs])


def full_logits_nll_sum(model, batch):
    """ftcli's loss the textbook way: logits at every position, then the masked cross-entropy (--plain-loss)."""
    import torch.nn.functional as F

    from ftcli.loss import causal_lm, hidden_states

    h = hidden_states(model, batch.input_ids, batch.position_ids, example_bounds=batch.example_bounds)
    logits = causal_lm(model).get_output_embeddings()(h).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def finish(args, model, tokenizer, times, tokens, positions, losses) -> dict:
    """Timings without the warm-up steps, and validation loss on held-back rows by one shared function."""
    import torch

    from ftcli.evaluate import loss_metrics
    from ftcli.runtime import autocast as autocast_for
    from ftcli.runtime import peak_gpu_mb, peak_rss_mb

    val = encoded_rows(tokenizer, Path(args.data) / "test.jsonl", 0, args.val_rows, args.max_len)
    pad = tokenizer.pad_token_id
    vloss = loss_metrics(model, val, batch_size=8, pad_id=pad, packing=False, pack_len=args.max_len,
                         autocast=autocast_for(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
                         )["loss"]  # at the run's own precision
    t, n = sum(times[WARMUP:]), sum(tokens[WARMUP:])
    return {"steps": len(times), "measured_steps": len(times) - WARMUP, "tokens_per_s": n / t,
            "s_per_step": t / max(len(times) - WARMUP, 1),
            "padding": 1 - sum(tokens) / max(sum(positions), 1), "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(),
            "final_train_loss": sum(losses[-5:]) / len(losses[-5:]), "val_loss": vloss}


# -------------------------------------------------------------------------------------------------------------
# driver


def run_one(system: str, strategy: str, args, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", system, "--strategy", strategy, "--rows", str(args.rows),
               "--val-rows", str(args.val_rows), "--batch", str(args.batch), "--max-len", str(args.max_len),
               "--tmp", tmp, "--result", str(out), "--seed", str(args.seed), "--dropout", str(args.dropout),
               "--grad-accum", str(args.grad_accum), "--data", args.data,
               *(["--base", args.base] if args.base else []), *(["--no-retention"] if args.no_retention else []),
               *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.update(kv.split("=", 1) for flag, kv in zip(extra, extra[1:]) if flag == "--env")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"{system} {strategy} failed")
        res = json.loads(out.read_text())
        res["wall_s"] = time.perf_counter() - t0
        return res


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def summarise(runs: list[dict]) -> dict:
    """One row from the repeats of a run: medians of the timings and memory (the losses repeat exactly)."""
    out = dict(runs[0])
    for key in ("tokens_per_s", "s_per_step", "peak_rss_mb", "peak_gpu_mb"):
        if out.get(key) is None:
            continue
        out[key] = median([r[key] for r in runs])
    out["all_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    return out


def bf16_units() -> str:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "none"


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def precision_of(extra: list[str]) -> str:
    return extra[extra.index("--precision") + 1] if "--precision" in extra else "fp32"


def table(results: list[tuple[str, str, list[dict], str]], ref: dict) -> str:
    """Ratios against the standard stack in fp32 (the Trainer's default) and at the row's own precision."""
    repeats = max(len(runs) for _, _, runs, _ in results)
    gpu = any(r.get("peak_gpu_mb") is not None for _, _, runs, _ in results for r in runs)
    head = ("| strategy | system | non-pad tokens/s | s/step | padding | peak RSS MB | final train loss | val loss "
            "| tokens/s ÷ HF fp32 | tokens/s ÷ HF same precision | RSS ÷ HF fp32 |"
            + (" peak GPU MB |" if gpu else "") + (" ÷ HF per repeat |" if repeats > 1 else ""))
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
             + (" ---: |" if gpu else "") + (" --- |" if repeats > 1 else "")]
    for strategy, system, runs, precision in results:
        r, hf = summarise(runs), summarise(ref[strategy])
        same = summarise(ref.get((strategy, precision), ref[strategy]))
        line = (f"| {strategy} | {system} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.2f} | {r['padding'] * 100:.0f}% | "
                f"{r['peak_rss_mb']:.0f} | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} | "
                f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}× | {r['tokens_per_s'] / same['tokens_per_s']:.2f}× | "
                f"{r['peak_rss_mb'] / hf['peak_rss_mb']:.2f}× |")
        if gpu:
            line += f" {r['peak_gpu_mb']:.0f} |" if r.get("peak_gpu_mb") is not None else " – |"
        if repeats > 1:  # each repeat against the HF fp32 run of the same round
            line += " " + ", ".join(f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}" for a, b in zip(runs, ref[strategy])) + " |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="lora,full")
    ap.add_argument("--rows", type=int, default=96, help="training examples (each system sees the same ones)")
    ap.add_argument("--val-rows", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs; the table gives medians")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="each runs the standard stack and ftcli (bf16: autocast; pays on CPUs with AMX or AVX-512 BF16)")
    ap.add_argument("--variants", action="store_true", help="also ftcli with one optimisation turned off at a time")
    ap.add_argument("--slow-variants", action="store_true",
                    help="also ftcli with training.compile, at each precision")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides (PEFT's lora_dropout)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step on both sides")
    ap.add_argument("--base", help="a model folder instead of the built-in model (e.g. random weights of its shape "
                    "on a machine without it: scripts/gpu_bench.sh)")
    ap.add_argument("--data", default=str(DATA), help="a folder with alpaca train.jsonl and test.jsonl")
    ap.add_argument("--no-retention", action="store_true",
                    help="ftcli's runs skip the built-in retention probe (scored before and after training, outside "
                    "the timed steps): on a new base model it first generates the base's answers, minutes on a CPU")
    ap.add_argument("--env", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--markdown", type=Path, help="write the table and the command to this file")
    ap.add_argument("--worker", choices=["hf", "ftcli"], help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-packing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-packed-attention", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plain-loss", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peft-layer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pass-tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fp32-branch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps = -(-args.rows // (args.batch * args.grad_accum))  # both sides take one optimiser step per batch·accum rows
    if steps <= WARMUP:
        ap.error(f"--rows {args.rows} at --batch {args.batch} and --grad-accum {args.grad_accum} is {steps} optimiser "
                 f"step(s), and the first {WARMUP} are warm-up, left out of the timings: give at least "
                 f"{args.batch * args.grad_accum * WARMUP + 1} rows")
    if args.worker:
        sys.path.insert(0, str(ROOT))
        from ftcli.logs import quiet

        quiet()
        res = (worker_hf if args.worker == "hf" else worker_ftcli)(args)
        Path(args.result).write_text(json.dumps(res))
        return
    if not (Path(args.data) / "train.jsonl").is_file():
        raise SystemExit(f"needs {args.data}/train.jsonl (the workspace's shared data, or --data)")
    results, ref = [], {}
    for strategy in args.strategies.split(","):
        hf = "HF Trainer + PEFT" if strategy in ("lora", "qlora") else "HF Trainer"
        runs = []
        for precision in args.precisions.split(","):  # each precision: the standard stack, then ftcli
            extra = [] if precision == "fp32" else ["--precision", precision]
            tag = "" if precision == "fp32" else f", {precision} autocast"
            runs += [(hf + tag, "hf", extra), ("ftcli" + tag, "ftcli", extra)]
            if args.slow_variants:  # training.compile: a few seconds of compiling, a few percent per step
                runs += [("ftcli" + tag + ", training.compile", "ftcli", extra + ["--compile"])]
        if args.variants:  # each of ftcli's optimisations turned off alone
            runs += [("ftcli, packing off", "ftcli", ["--no-packing"]),
                     ("ftcli, masked attention over packed rows", "ftcli", ["--no-packed-attention"]),
                     ("ftcli, full logits (plain loss)", "ftcli", ["--plain-loss"]),
                     ("ftcli, glibc allocator defaults", "ftcli", ["--env", "FTCLI_ALLOCATOR=default"]),
                     ("ftcli, PEFT's LoRA layer", "ftcli", ["--peft-layer"]),
                     ("ftcli, one pass per micro-batch", "ftcli", ["--pass-tokens", "100000"])]
        done: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
        for rep in range(args.repeat):  # rounds of every run in turn, so slow spells of the machine hit all alike
            for label, system, extra in runs:
                print(f"running {strategy} · {label}" + (f" · repeat {rep + 1}" if args.repeat > 1 else "") + " ...",
                      flush=True)
                r = run_one(system, strategy, args, extra)
                print(f"  {r['tokens_per_s']:.1f} tok/s · {r['s_per_step']:.2f} s/step · RSS {r['peak_rss_mb']:.0f} "
                      f"MB · val loss {r['val_loss']:.4f} · wall {r['wall_s']:.0f} s", flush=True)
                done[label].append(r)
        for label, system, extra in runs:  # the reference of a row: the standard stack at the row's precision
            if system == "hf":
                ref[(strategy, precision_of(extra))] = done[label]
        ref[strategy] = done[runs[0][0]]
        results += [(strategy, label, done[label], precision_of(extra)) for label, _, extra in runs]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    cmd = "python scripts/bench_train.py " + " ".join(sys.argv[1:])
    text = table(results, ref)
    info = (f"{args.rows} alpaca training rows, batch {args.batch}, max length {args.max_len}, "
            + (f"LoRA dropout {args.dropout}, " if args.dropout else "")
            + (f"{args.grad_accum} micro-batches per step, " if args.grad_accum > 1 else "")
            + "fp32 unless said "
            "(bf16: torch autocast on both sides; ftcli also keeps the frozen LoRA base in bf16), "
            f"{WARMUP} warm-up steps excluded; validation loss on {args.val_rows} alpaca test rows. "
            + (f"Each run {args.repeat} times, in rounds; timings and RSS are medians. " if args.repeat > 1 else "")
            + f"Machine: {os.cpu_count()} cores, {cpu}, bf16 units: {bf16_units()}"
            + (f"; GPU {gpu} (peak GPU MB: torch.cuda.max_memory_allocated)." if (gpu := gpu_name()) else "."))
    print()
    print(text)
    print()
    print(info)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"# Training throughput\n\nCommand: `{cmd.strip()}`\n\n{info}\n\n{text}\n")


if __name__ == "__main__":
    main()
