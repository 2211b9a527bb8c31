"""The training loop, on accelerate: one loop for every strategy.

Per optimiser step: the step's micro-batches are collated first, their trained tokens counted, and each
micro-batch's summed NLL is divided by that count before backward, so the gradient is that of the mean loss over
every trained token of the step, whatever `grad_accum` is. A micro-batch of more than `training.pass_tokens`
positions runs as several forward/backward passes of whole rows (the same sum, the memory of one pass). Then clipping, AdamW, the schedule. Validation every
`eval.every` steps and at the end; checkpoints every `training.checkpoint_every` steps and at the end; a NaN or inf
loss stops the run before the bad update is applied; Ctrl-C finishes the step, writes a checkpoint and exits.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ftcli import checkpoint, report, scoring
from ftcli.runtime import autocast as autocast_for
from ftcli.runtime import peak_rss_mb, tune_allocator
from ftcli.data import DataBundle
from ftcli.data.batching import collate, plan_epoch
from ftcli.data.tokenize import Encoder, marked_text, show_mask
from ftcli.errors import RunError, UserError
from ftcli.evaluate import choice_accuracy, generation_metrics, loss_metrics, to_device
from ftcli.loss import causal_lm, nll_sum
from ftcli.strategies import Context, Strategy

# recipe keys that may differ between a run and its --resume (they change how long, not what, is trained)
RESUMABLE_CHANGES = {"training.max_steps", "training.epochs", "eval.every", "training.checkpoint_every",
                     "training.keep_checkpoints", "training.log_every", "training.pass_tokens", "output"}


@dataclass
class Hooks:
    """Test and tooling hooks: `after_step(step, loss)` after each optimiser step; `at_end(model)` when done."""

    after_step: list[Callable[[int, float], None]] = field(default_factory=list)
    at_end: list[Callable[[object], None]] = field(default_factory=list)


@dataclass
class Setup:
    """Everything built before the loop: kept together so `ftcli check` and `ftcli train` share it."""

    recipe: object
    strategy: Strategy
    model: object
    tokenizer: object
    data: DataBundle
    ctx: Context


def build(recipe, *, run_dir: Path | None = None, allow_pickle: bool = False, log=print) -> Setup:
    """Load the base, the data and the strategy, in the order DESIGN.md draws."""
    from ftcli import data as data_mod
    from ftcli import models, strategies

    strategy = strategies.get(recipe.strategy)
    strategies.refuse_unsupported(recipe)  # before any weight is loaded
    tokenizer = models.load_tokenizer(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                                      allow_pickle=allow_pickle, log=log)
    bundle = data_mod.build(recipe, tokenizer)
    model = models.load_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                              allow_pickle=allow_pickle, quantization=strategy.quantization,
                              compute_dtype=getattr(recipe.strategy, "compute_dtype", "float32"),
                              double_quant=getattr(recipe.strategy, "double_quant", True), log=log)
    ctx = Context(recipe=recipe, tokenizer=tokenizer, run_dir=run_dir, train_data=bundle.train, log=log)
    model = strategy.prepare(model, ctx)
    if recipe.training.gradient_checkpointing:
        lm = causal_lm(model)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(lm, "enable_input_require_grads"):
            lm.enable_input_require_grads()
    return Setup(recipe, strategy, model, tokenizer, bundle, ctx)


def total_steps(recipe, n_train: int) -> tuple[int, int]:
    """(steps in the run, steps per epoch)."""
    t = recipe.training
    per_epoch = math.ceil(n_train / (t.batch_size * t.grad_accum))
    steps = t.max_steps if t.max_steps else max(1, math.floor(per_epoch * t.epochs))
    return steps, per_epoch


def warmup_steps(recipe, steps: int) -> int:
    w = recipe.training.warmup
    return int(round(w * steps)) if w < 1 else int(w)


def make_optimizer(recipe, named_params):
    """AdamW; no weight decay on biases, norms and other 1-D parameters. torch's fused kernel where it applies
    (float parameters on the CPU or CUDA): one pass over each tensor and no temporaries, which matters for full
    fine-tuning (figures in docs/benchmarks.md). The HF Trainer's default is the same fused AdamW."""
    t = recipe.training
    decay = [p for n, p in named_params if p.ndim >= 2]
    no_decay = [p for n, p in named_params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for _, p in named_params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=1e-8, fused=fused or None)


def make_scheduler(recipe, optimizer, steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.training.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(recipe, steps), num_training_steps=steps)


class _Interrupt:
    """First Ctrl-C: finish the step, checkpoint, exit. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def resume_conflicts(run_dir: Path, recipe) -> list[str]:
    """Recipe keys that differ from the run being resumed (other than how long it runs)."""
    import yaml

    saved = yaml.safe_load((run_dir / report.RECIPE_FILE).read_text())
    saved.pop("versions", None)
    now = recipe.model_dump(mode="json", exclude={"source"}, by_alias=True)  # as written (ewc's `lambda`)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k != "fields":
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flat(saved), flat(now)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def schedule_change_note(run_dir: Path, recipe) -> str | None:
    """A resumed run whose length changed keeps its steps so far, but a warm-up or decaying schedule is laid out
    again over the new length: say so, since the result then differs from a run planned that long from the start."""
    import yaml

    saved = (yaml.safe_load((run_dir / report.RECIPE_FILE).read_text()) or {}).get("training", {})
    t = recipe.training
    if (saved.get("max_steps"), saved.get("epochs")) == (t.max_steps, t.epochs):
        return None
    if t.schedule == "constant" and (not t.warmup or t.warmup >= 1):  # warm-up in steps: unchanged
        return None
    return (f"the run's length changed (training.max_steps {saved.get('max_steps')} → {t.max_steps}, "
            f"training.epochs {saved.get('epochs')} → {t.epochs}); the {t.schedule} schedule with warm-up "
            f"{t.warmup} is laid out again over the new length, so the steps already taken followed the old one "
            "and the run differs from one planned at the new length from the start")


def run(recipe, *, output: Path, resume: bool = False, overwrite: bool = False, allow_pickle: bool = False,
        console=None, hooks: Hooks | None = None, progress: bool = True) -> Path:
    """Train a recipe into the run folder `output`; returns the folder."""
    tune_allocator()
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    hooks = hooks or Hooks()
    log = console.print if console is not None else print
    run_dir = report.prepare_run_dir(output, resume=resume, overwrite=overwrite)
    if resume:
        if not checkpoint.list_steps(run_dir):
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
        conflicts = resume_conflicts(run_dir, recipe)
        if conflicts:
            raise UserError(f"--resume: the recipe differs from the run's in {', '.join(conflicts)}; "
                            "resume with the same recipe (only lengths, eval and checkpoint cadence may change)")
        note = schedule_change_note(run_dir, recipe)
        if note:
            log(f"note: {note}")
    report.write_resolved_recipe(run_dir, recipe)
    t = recipe.training
    set_seed(t.seed)
    started = time.time()

    setup = build(recipe, run_dir=run_dir, allow_pickle=allow_pickle, log=log)
    strategy, model, tokenizer, data = setup.strategy, setup.model, setup.tokenizer, setup.data
    # bf16 is torch's autocast, entered here (not accelerate's mixed_precision, a process-wide setting that a
    # second run in the same process could not change)
    accelerator = Accelerator()
    named = strategy.train_params(model)
    if not named:
        raise UserError(f"strategy {strategy.name}: no parameter is trainable")
    optimizer = make_optimizer(recipe, named)
    steps, per_epoch = total_steps(recipe, len(data.train))
    scheduler = make_scheduler(recipe, optimizer, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if t.compile:
        causal_lm(model).get_decoder().compile(dynamic=True)
    device = accelerator.device
    autocast = autocast_for(t.precision, device.type)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    d = recipe.data
    pack_len = d.max_len
    pass_tokens = recipe.pass_positions()

    from ftcli.models import count_parameters

    trainable, total = count_parameters(model)
    metrics_log = report.MetricsLog(run_dir)

    def validate(step: int, generation: bool) -> dict:
        if data.validation is None:
            return {}
        out = loss_metrics(model, data.validation.encoded, batch_size=t.batch_size, pad_id=pad_id,
                           packing=d.packing, pack_len=pack_len, autocast=autocast)
        if generation and {"accuracy", "choice"} & set(recipe.eval.metrics) and data.validation.examples[0].choices:
            rows = data.validation.examples[: recipe.eval.limit] if recipe.eval.limit else data.validation.examples
            whole = Encoder(tokenizer, d.chat_template, scoring.EVAL_MAX_LEN, "truncate", d.format)  # answers uncut
            acc = choice_accuracy(model, whole, rows, batch_size=t.batch_size, autocast=autocast)["accuracy"]
            out.update({m: acc for m in ("accuracy", "choice") if m in recipe.eval.metrics})
        if generation:
            gen = generation_metrics(model, tokenizer, data.encoder, data.validation.examples, recipe.eval.metrics,
                                     max_new_tokens=recipe.eval.max_new_tokens, limit=recipe.eval.limit,
                                     autocast=autocast)
            out.update(gen)
        metrics_log.append({"kind": "eval", "step": step, "val_loss": out["loss"], "val_ppl": out["perplexity"],
                            **{k: v for k, v in out.items() if k in ("exact_match", "rougeL", "numeric", "accuracy", "choice")}})
        return out

    retention = scoring.retention_sets(recipe)

    def score_retention() -> list[dict]:
        return [scoring.score(model, tokenizer, es, template=d.chat_template, batch_size=t.batch_size,
                              max_new_tokens=recipe.eval.max_new_tokens, autocast=autocast)
                for es in retention]

    state: dict = {"best": None, "before": None, "retention_before": None, "tokens": 0, "trained_tokens": 0, "positions": 0,
                   "train_seconds": 0.0, "resumed_from": None}
    start_step = 0
    if resume:
        loaded = checkpoint.load(run_dir, strategy.train_params(model), optimizer, scheduler)
        start_step = loaded["step"]
        strategy.load_state_dict(loaded.get("strategy", {}))
        state.update({k: loaded[k] for k in state if k in loaded})
        state["resumed_from"] = start_step
        metrics_log.truncate_after(start_step)
        log(f"resuming {run_dir} from step {start_step}")
    else:
        state["before"] = validate(0, generation=True)
        if retention:
            log(f"scoring {len(retention)} retention set(s) on the base model")
            state["retention_before"] = score_retention()

    def save_checkpoint(step: int) -> Path:
        return checkpoint.save(run_dir, step, strategy.train_params(model), optimizer, scheduler,
                               dict(state, strategy=strategy.state_dict()), keep=t.keep_checkpoints)

    status, message = "finished", ""
    step = start_step
    plans: dict[int, list] = {}
    lengths = data.train.lengths
    model.train()
    # a live bar on a terminal; in a log file (not a terminal) a plain line every 5% of the run instead
    bar = _progress(console, progress and console is not None and console.is_terminal)
    line_every = max(1, steps // 20) if progress and bar is None else 0
    task = bar.add_task("training", total=steps, completed=start_step, loss=float("nan"), tps=0.0) if bar else None
    last_checkpoint = checkpoint.list_steps(run_dir)[-1] if resume else None
    try:
        with _Interrupt() as interrupt, (bar or _null()):
            while step < steps:
                epoch, index = divmod(step, per_epoch)
                if epoch not in plans:
                    plans = {epoch: plan_epoch(lengths, t.batch_size, t.grad_accum, t.seed, epoch,
                                               bucket=not d.packing)}
                micro = plans[epoch][index]
                strategy.on_step(step + 1, model)
                t0 = time.perf_counter()
                batches = [to_device(collate([data.train.encoded[i] for i in mb], pad_id, d.packing, pack_len), device)
                           for mb in micro]
                n_trained = sum(b.n_trained for b in batches)
                step_loss = torch.zeros((), device=device)
                passes = [part for b in batches for part in b.split(pass_tokens)]
                for part in passes:
                    with autocast():
                        loss = nll_sum(model, part) / n_trained
                    accelerator.backward(loss)
                    step_loss += loss.detach()
                step_nll = float(step_loss)  # the step's one host sync (the NaN guard needs the value)
                extra = strategy.extra_loss(model, batches)
                penalty = None
                if extra is not None:
                    accelerator.backward(extra)
                    penalty = float(extra.detach())
                if not math.isfinite(step_nll) or (penalty is not None and not math.isfinite(penalty)):
                    optimizer.zero_grad(set_to_none=True)
                    if last_checkpoint != step:
                        save_checkpoint(step)
                        last_checkpoint = step
                    status = "stopped: non-finite loss"
                    what = f"the loss became {step_nll}" if not math.isfinite(step_nll) else \
                        f"the {strategy.name} penalty became {penalty}"
                    message = (f"{what} at step {step + 1}; the update was not applied and "
                               f"the last good state (step {step}) is checkpointed. Try a lower training.lr, "
                               "training.precision: fp32, or check the data of this step.")
                    break
                grad_norm = None
                if t.max_grad_norm:
                    grad_norm = float(accelerator.clip_grad_norm_([p for _, p in named], t.max_grad_norm))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                n_tok = sum(b.n_tokens for b in batches)
                state["tokens"] += n_tok
                state["trained_tokens"] += n_trained
                state["positions"] += sum(p.n_positions for p in passes)
                state["train_seconds"] += dt
                if step % t.log_every == 0 or step == steps:
                    rec = {"kind": "train", "step": step, "epoch": round(step / per_epoch, 4), "loss": step_nll,
                           "lr": lr, "tokens_per_s": n_tok / dt, "trained_tokens": n_trained, "tokens": n_tok,
                           "grad_norm": grad_norm, "step_s": dt, "rss_mb": round(peak_rss_mb(), 1)}
                    if penalty is not None:
                        rec["penalty"] = penalty
                    metrics_log.append(rec)
                for fn in hooks.after_step:
                    fn(step, step_nll)
                if line_every and (step % line_every == 0 or step == steps):
                    rate = state["tokens"] / state["train_seconds"]
                    left = (steps - step) * state["train_seconds"] / max(step - start_step, 1)
                    log(f"step {step}/{steps} · loss {step_nll:.4f} · {rate:.0f} tok/s · {left:.0f} s left")
                if bar:
                    bar.update(task, completed=step, loss=step_nll, tps=state["tokens"] / state["train_seconds"])
                if recipe.eval.every and step % recipe.eval.every == 0 and step < steps:
                    _note_best(state, step, validate(step, generation=False))
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps:
                    save_checkpoint(step)
                    last_checkpoint = step
                if interrupt.requested:
                    save_checkpoint(step)
                    status = "interrupted"
                    message = f"interrupted at step {step}; continue with: ftcli train RECIPE --resume"
                    break
    except KeyboardInterrupt:
        status, message = "interrupted", f"stopped at once during step {step + 1}; resume from the last checkpoint"

    after, retention_after = {}, []
    if status == "finished":
        after = validate(step, generation=True)
        retention_after = score_retention()
        _note_best(state, step, after)
        save_checkpoint(step)
        artifact = run_dir / strategy.artifact
        from ftcli import atomic

        with atomic.folder(artifact) as tmp:
            strategy.save(accelerator.unwrap_model(model), tmp)
            tokenizer.save_pretrained(str(tmp))
    for fn in hooks.at_end:
        fn(accelerator.unwrap_model(model))
    summary = _summary(recipe, run_dir, strategy, model, data, state, status, message, step, steps, started,
                       trainable, total, after)
    summary["retention"] = _retention_rows(retention, state.get("retention_before") or [], retention_after)
    report.write_report(run_dir, summary, metrics_log.read())
    if status != "finished":
        raise RunError(f"{message} (run folder: {run_dir})")
    return run_dir


def _note_best(state: dict, step: int, metrics: dict) -> None:
    if metrics and (state["best"] is None or metrics["loss"] < state["best"]["loss"]):
        state["best"] = {"step": step, "loss": metrics["loss"]}


def _retention_rows(sets, before: list[dict], after: list[dict]) -> list[dict]:
    """One row per retention set: its metric on the base (before) and on the tuned model (after)."""
    rows = []
    for i, es in enumerate(sets):
        b = before[i] if i < len(before) else {}
        a = after[i] if i < len(after) else {}
        m = es.metrics[0]
        rows.append({"name": es.name, "data": es.data, "metric": m, "rows": (a or b).get("rows"),
                     "before": b.get(m), "after": a.get(m),
                     "change": a[m] - b[m] if m in a and m in b else None})
    return rows


def _summary(recipe, run_dir, strategy, model, data, state, status, message, step, steps, started, trainable,
             total, after) -> dict:
    before = state.get("before") or {}
    secs = max(state["train_seconds"], 1e-9)
    splits = {"train": data.train.stats.as_dict()}
    if data.validation is not None:
        splits["validation"] = data.validation.stats.as_dict()
    example = marked_text(show_mask(data.encoder.tokenizer, data.train.encoded[0]))
    strip = lambda m: {k: v for k, v in m.items() if k != "samples"}  # noqa: E731
    return {
        "run": {"name": Path(run_dir).name, "folder": str(run_dir), "status": status, "strategy": strategy.name,
                "base_model": recipe.base_model, "steps": step, "total_steps": steps,
                "wall_s": time.time() - started, "resumed_from": state.get("resumed_from"),
                "artifact": strategy.artifact if status == "finished" else None},
        "message": message,
        "parameters": {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)},
        "before": strip(before),
        "after": strip(after),
        "best": state.get("best"),
        "samples": after.get("samples") or [],
        "throughput": {
            "tokens_per_s": state["tokens"] / secs,
            "trained_tokens_per_s": state["trained_tokens"] / secs,
            "s_per_step": secs / max(step - (state.get("resumed_from") or 0), 1) if step else None,
            "padding_fraction": 1 - state["tokens"] / state["positions"] if state["positions"] else 0.0,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "train_seconds": state["train_seconds"],
            "tokens": state["tokens"],
        },
        "data": {"splits": splits, "example": example},
        "strategy_details": strategy.describe(model),
        "recipe_yaml": recipe.to_yaml(),
    }


def _progress(console, enabled: bool):
    if not enabled or console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console, transient=False,
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
