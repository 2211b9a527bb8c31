"""The training loop, on accelerate: one loop for every strategy and every objective.

`run` reads top to bottom: open the run folder (and check a resume), build the model, data, strategy and
objective, build the evaluator once (validation + retention sets), restore or score the start, train, finish.

Per optimiser step (`Trainer.step`): the step's micro-batches are collated first and the objective's count of
them taken (trained tokens for sft and distill, pairs for dpo); each micro-batch's loss sum is divided by that
count before backward, so the gradient is that of the mean over the whole step, whatever `grad_accum` is. A
micro-batch of more than `training.pass_tokens` positions runs as several forward/backward passes of whole rows
(the same sum, the memory of one pass). Then clipping, AdamW, the schedule. Validation every `eval.every` steps and
at the end; checkpoints every `training.checkpoint_every` steps and at the end; a NaN or inf loss stops the run
before the bad update is applied; Ctrl-C finishes the step, writes a checkpoint and exits.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ftcli import checkpoint, report, scoring
from ftcli.data import DataBundle
from ftcli.data.batching import plan_epoch
from ftcli.data.tokenize import Encoder, marked_text, pad_id, show_mask
from ftcli.errors import RunError, UserError
from ftcli.evaluate import choice_accuracy, generation_metrics, to_device
from ftcli.loss import causal_lm
from ftcli.objectives import Objective
from ftcli.run_folder import RunFolder
from ftcli.runtime import autocast as autocast_for
from ftcli.runtime import peak_rss_mb
from ftcli.strategies import Context, Strategy
from ftcli.vocab import CANDIDATES


@dataclass
class Hooks:
    """Test and tooling hooks: `after_step(step, loss)` after each optimiser step; `at_end(model)` when done."""

    after_step: list[Callable[[int, float], None]] = field(default_factory=list)
    at_end: list[Callable[[object], None]] = field(default_factory=list)


@dataclass
class TrainState:
    """What a run has done so far; written into every checkpoint (state.json) and read back on --resume."""

    step: int = 0
    best: dict | None = None  # {"step", "loss"} of the best validation
    before: dict | None = None  # validation of the untrained model
    retention_before: list | None = None
    tokens: int = 0  # non-pad tokens trained on
    trained_tokens: int = 0
    positions: int = 0  # computed positions, padding included
    train_seconds: float = 0.0
    resumed_from: int | None = None
    strategy: dict = field(default_factory=dict)  # Strategy.state_dict()
    objective: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "TrainState":
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def note_validation(self, step: int, metrics: dict) -> None:
        if metrics and (self.best is None or metrics["loss"] < self.best["loss"]):
            self.best = {"step": step, "loss": metrics["loss"]}


@dataclass
class Setup:
    """Everything built before the loop: kept together so `ftcli check` and `ftcli train` share it."""

    recipe: object
    strategy: Strategy
    objective: Objective
    model: object
    tokenizer: object
    data: DataBundle
    ctx: Context
    retention: list = field(default_factory=list)  # scoring.EvalSet per eval.retention entry, rows loaded


def build(recipe, *, run_dir: Path | None = None, allow_pickle: bool = False, log=print) -> Setup:
    """Load the base, the data and the strategy, in the order DESIGN.md draws. Every file is read (and every
    retention set checked) before the model is loaded."""
    from ftcli import data as data_mod
    from ftcli import models, objectives, strategies

    from ftcli.recipe import resolve_formats

    resolve_formats(recipe)  # format: auto (a recipe from recipe.load is resolved already; this is a no-op then)
    strategy = strategies.get(recipe.strategy)
    strategies.refuse_unsupported(strategy)  # before any weight is loaded
    objective = objectives.get(recipe.objective)
    tokenizer = models.load_tokenizer(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                                      allow_pickle=allow_pickle, log=log)
    objective.preflight(recipe, tokenizer)
    bundle = data_mod.build(recipe, tokenizer)
    retention = scoring.retention_sets(recipe, load=True)
    model = models.load_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                              allow_pickle=allow_pickle, log=log, **strategy.base_loading())
    retention = _probe_rows(recipe, model, tokenizer, retention, log)
    ctx = Context(recipe=recipe, tokenizer=tokenizer, run_dir=run_dir, train_data=bundle.train, log=log,
                  strategy=strategy)
    model = strategy.prepare(model, ctx)
    if recipe.training.gradient_checkpointing:
        lm = causal_lm(model)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(lm, "enable_input_require_grads"):
            lm.enable_input_require_grads()
    objective.prepare(model, ctx, bundle)
    return Setup(recipe, strategy, objective, model, tokenizer, bundle, ctx, retention)


def _probe_rows(recipe, model, tokenizer, retention: list, log) -> list:
    """The built-in probe's rows: the base model's own answers (before any strategy touches it). A model that
    has no chat template (and a recipe that names none) cannot be asked: the probe is left out, with a note."""
    from ftcli import probe

    out = []
    for es in retention:
        if es.data == probe.PROBE:
            try:
                es.examples = probe.examples(model, tokenizer, base=recipe.base_model,
                                             template=recipe.data.chat_template, limit=es.limit,
                                             batch_size=max(recipe.training.batch_size, 16), log=log)
            except UserError as e:
                log(f"note: the built-in retention probe is skipped: {e}")
                continue
        out.append(es)
    return out


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
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.warmup_steps(steps), num_training_steps=steps)


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


# ------------------------------------------------------------------------------------------------------------
# the run, top to bottom


def run(recipe, *, output: Path, resume: bool = False, overwrite: bool = False, allow_pickle: bool = False,
        console=None, hooks: Hooks | None = None, progress: bool = True) -> Path:
    """Train a recipe into the run folder `output`; returns the folder."""
    from accelerate.utils import set_seed

    hooks = hooks or Hooks()
    log = console.print if console is not None else print
    folder = open_run_folder(recipe, output, resume=resume, overwrite=overwrite, log=log)
    set_seed(recipe.training.seed)
    started = time.time()
    setup = build(recipe, run_dir=folder.path, allow_pickle=allow_pickle, log=log)
    trainer = Trainer(setup, folder)
    evaluator = Evaluator(setup, trainer.model, trainer.autocast, trainer.metrics_log)
    if resume:
        state = trainer.restore()
        log(f"resuming {folder.path} from step {state.step}")
    else:
        state = TrainState(before=evaluator.validate(0, generation=True))
        if evaluator.retention:
            log(f"scoring {len(evaluator.retention)} retention set(s) on the base model")
            state.retention_before = evaluator.score_retention()
    bar = _progress(console, progress)
    # a live bar on a terminal; in a log file (not a terminal) a plain line every 5% of the run instead
    status, message = trainer.train(state, evaluator, hooks, bar, log if progress and bar is None else None)
    return finish(setup, trainer, evaluator, state, status, message, hooks, started)


def open_run_folder(recipe, output: Path, *, resume: bool, overwrite: bool, log=print) -> RunFolder:
    """The run folder, created (or checked for --resume: the same recipe, a checkpoint to resume from), with the
    resolved recipe written into it."""
    folder = RunFolder.create(output, resume=resume, overwrite=overwrite)
    if resume:
        note = folder.resume_check(recipe)
        if note:
            log(f"note: {note}")
    folder.write_recipe(recipe)
    return folder


class Evaluator:
    """Validation (the objective's loss and metrics, and the generation or candidate metrics of eval.metrics) and
    the retention sets, built once for the run."""

    def __init__(self, setup: Setup, model, autocast, metrics_log):
        self.recipe, self.objective, self.data = setup.recipe, setup.objective, setup.data
        self.tokenizer, self.model, self.autocast, self.metrics_log = setup.tokenizer, model, autocast, metrics_log
        self.retention = setup.retention
        self.pad_id = pad_id(setup.tokenizer)

    def validate(self, step: int, generation: bool) -> dict:
        split = self.data.validation
        if split is None:
            return {}
        r, d = self.recipe, self.recipe.data
        out = self.objective.evaluate(self.model, split.encoded, batch_size=r.training.batch_size, pad_id=self.pad_id,
                                      packing=d.packing, pack_len=d.max_len, autocast=self.autocast)
        wanted = r.eval.metrics
        if generation and set(CANDIDATES) & set(wanted):
            rows = [ex for ex in split.examples if ex.choices]  # a mixture: its classification / choice rows
            rows = rows[: r.eval.limit] if r.eval.limit else rows
            whole = Encoder(self.tokenizer, d.chat_template, scoring.EVAL_MAX_LEN, "truncate", d.format)  # answers uncut
            acc = choice_accuracy(self.model, whole, rows, batch_size=r.training.batch_size,
                                  autocast=self.autocast)["accuracy"]
            out.update({m: acc for m in CANDIDATES if m in wanted})
        if generation:
            prompted = [ex for ex in split.examples if ex.messages is not None]  # a mixture: not its completion rows
            out.update(generation_metrics(self.model, self.tokenizer, self.data.encoder, prompted, wanted,
                                          max_new_tokens=r.eval.max_new_tokens, limit=r.eval.limit,
                                          autocast=self.autocast))
        if generation and split.mixture is not None:  # a mixture: the loss of each dataset's held-out rows too
            out["datasets"] = {
                name: {"loss": self.objective.evaluate(self.model, units, batch_size=r.training.batch_size,
                                                       pad_id=self.pad_id, packing=d.packing, pack_len=d.max_len,
                                                       autocast=self.autocast)["loss"]}
                for name, units in split.mixture.subsets(split.encoded).items() if units}
        record = {"kind": "eval", "step": step}
        for k, v in out.items():
            if isinstance(v, float) and k not in ("rows_per_s", "count"):
                record[f"val_{k}" if k in ("loss", "perplexity") or k in self.objective.metrics else k] = v
        self.metrics_log.append(record)
        return out

    def score_retention(self) -> list[dict]:
        r = self.recipe
        return [scoring.score(self.model, self.tokenizer, es, template=r.data.chat_template,
                              batch_size=r.training.batch_size, max_new_tokens=r.eval.max_new_tokens,
                              autocast=self.autocast, examples=es.examples)
                for es in self.retention]


@dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]
    penalty: float | None
    count: int  # the objective's normaliser: trained tokens, or pairs
    tokens: int  # non-pad tokens
    trained: int  # trained tokens
    positions: int  # computed positions, padding included
    seconds: float
    lr: float = 0.0
    grad_norm: float | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and (self.penalty is None or math.isfinite(self.penalty))


class Trainer:
    """The model, optimiser and schedule of one run, and the step."""

    def __init__(self, setup: Setup, folder: RunFolder):
        from accelerate import Accelerator

        self.setup, self.folder, self.recipe = setup, folder, setup.recipe
        self.strategy, self.objective = setup.strategy, setup.objective
        t = self.recipe.training
        # bf16 is torch's autocast, entered here (not accelerate's mixed_precision, a process-wide setting that a
        # second run in the same process could not change)
        self.accelerator = Accelerator()
        self.named = self.strategy.train_params(setup.model)
        if not self.named:
            raise UserError(f"strategy {self.strategy.name}: no parameter is trainable")
        optimizer = make_optimizer(self.recipe, self.named)
        self.steps, self.per_epoch = self.recipe.total_steps(setup.data.train.epoch_size)
        scheduler = make_scheduler(self.recipe, optimizer, self.steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(setup.model, optimizer, scheduler)
        if t.compile:
            causal_lm(self.model).get_decoder().compile(dynamic=True)
        self.device = self.accelerator.device
        self.autocast = autocast_for(t.precision, self.device.type)
        self.pad_id = pad_id(setup.tokenizer)
        self.metrics_log = report.MetricsLog(folder.path)
        self._plans: dict[int, list] = {}
        from ftcli.moe import RouterBalance

        self.router = RouterBalance.attach(causal_lm(self.model), t.router_aux_loss)  # None unless mixture of experts

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, state: TrainState) -> Path:
        state.strategy = self.strategy.state_dict()
        return checkpoint.save(self.folder.path, state.step, self.strategy.train_params(self.model), self.optimizer,
                               self.scheduler, asdict(state), keep=self.recipe.training.keep_checkpoints)

    def restore(self) -> TrainState:
        saved = checkpoint.load(self.folder.path, self.strategy.train_params(self.model), self.optimizer,
                                self.scheduler)
        state = TrainState.from_checkpoint(saved)
        self.strategy.load_state_dict(state.strategy)
        state.resumed_from = state.step
        self.metrics_log.truncate_after(state.step)
        return state

    # -- one optimiser step --------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        """The collated micro-batches of optimiser step `step` (0-based), from the epoch's seeded plan."""
        d, train = self.recipe.data, self.setup.data.train
        epoch, index = divmod(step, self.per_epoch)
        return [to_device(self.objective.collate([train.encoded[i] for i in mb], self.pad_id, d.packing, d.max_len),
                          self.device)
                for mb in self.plan(epoch)[index]]

    def plan(self, epoch: int) -> list:
        """Epoch `epoch`'s steps → micro-batches → row indices (batching.plan_epoch; a mixture draws the order)."""
        t, d, train = self.recipe.training, self.recipe.data, self.setup.data.train
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(train.lengths, t.batch_size, t.grad_accum, t.seed, epoch,
                                             bucket=not d.packing, order=train.epoch_order(t.seed, epoch))}
        return self._plans[epoch]

    def drawn(self, steps: int) -> dict[str, int]:
        """A mixture: how many examples the first `steps` optimiser steps took from each dataset."""
        mixture = self.setup.data.train.mixture
        indices = []
        for step in range(steps):
            epoch, index = divmod(step, self.per_epoch)
            indices += [i for mb in self.plan(epoch)[index] for i in mb]
        return mixture.counts(indices)

    def step(self, step: int) -> StepResult:
        """Compute optimiser step `step` (0-based) and apply it, unless its loss is not finite."""
        self.strategy.on_step(step + 1, self.model)
        t0 = time.perf_counter()
        batches = self.micro_batches(step)
        count = sum(self.objective.count(b) for b in batches)
        step_loss = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        passes = [part for b in batches for part in b.split(self.recipe.pass_positions())]
        step_tokens = sum(p.n_tokens for p in passes)
        for part in passes:
            with self.autocast(), (self.router.capture() if self.router else nullcontext()):
                loss_sum, metrics = self.objective.loss_sum(self.model, part)
                loss = loss_sum / count
                step_loss += loss.detach()
                aux = self.router.loss(part) if self.router else None
                if aux is not None:  # the router's load-balancing loss, a token-weighted mean over the passes
                    share = part.n_tokens / max(step_tokens, 1)
                    sums["router_aux"] = sums.get("router_aux", 0) + aux.detach() * share
                    loss = loss + self.router.coef * aux * share
            self.accelerator.backward(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach() / count
        result = StepResult(float(step_loss), {k: float(v) for k, v in sums.items()}, None, count,
                            sum(b.n_tokens for b in batches), sum(b.n_trained for b in batches),
                            sum(p.n_positions for p in passes), 0.0)
        extra = self.strategy.extra_loss(self.model, batches)
        if extra is not None:
            self.accelerator.backward(extra)
            result.penalty = float(extra.detach())
        if not result.finite:
            self.optimizer.zero_grad(set_to_none=True)
            return result
        t = self.recipe.training
        if t.max_grad_norm:
            result.grad_norm = float(self.accelerator.clip_grad_norm_([p for _, p in self.named], t.max_grad_norm))
        result.lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.strategy.after_step(step + 1, self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        result.seconds = time.perf_counter() - t0
        return result

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, state: TrainState, evaluator: Evaluator, hooks: Hooks, bar, lines) -> tuple[str, str]:
        """Steps until the end, an interrupt or a non-finite loss; returns (status, message). Progress goes to a
        rich `bar`, or to `lines` (a print function: a line every 5% of the run), or nowhere."""
        t, steps = self.recipe.training, self.steps
        start = state.step
        line_every = max(1, steps // 20) if lines else 0
        task = bar.add_task("training", total=steps, completed=start, loss=float("nan"), tps=0.0) if bar else None
        last_checkpoint = self.folder.checkpoints[-1] if state.resumed_from is not None else None
        self.model.train()
        try:
            with _Interrupt() as interrupt, (bar or _null()):
                while state.step < steps:
                    res = self.step(state.step)
                    if not res.finite:
                        if last_checkpoint != state.step:
                            self.save_checkpoint(state)
                            last_checkpoint = state.step
                        what = (f"the loss became {res.loss}" if not math.isfinite(res.loss)
                                else f"the {self.strategy.name} penalty became {res.penalty}")
                        return "stopped: non-finite loss", (
                            f"{what} at step {state.step + 1}; the update was not applied and the last good state "
                            f"(step {state.step}) is checkpointed. Try a lower training.lr, training.precision: fp32, "
                            "or check the data of this step.")
                    state.step += 1
                    state.tokens += res.tokens
                    state.trained_tokens += res.trained
                    state.positions += res.positions
                    state.train_seconds += res.seconds
                    self._log_step(state, res)
                    notice = self.objective.notice(state.step, res.metrics)
                    if notice:
                        self.setup.ctx.log(f"warning: {notice}")
                    for fn in hooks.after_step:
                        fn(state.step, res.loss)
                    rate = state.tokens / max(state.train_seconds, 1e-9)
                    if line_every and (state.step % line_every == 0 or state.step == steps):
                        left = (steps - state.step) * state.train_seconds / max(state.step - start, 1)
                        lines(f"step {state.step}/{steps} · loss {res.loss:.4f} · {rate:.0f} tok/s · {left:.0f} s left")
                    if bar:
                        bar.update(task, completed=state.step, loss=res.loss, tps=rate)
                    if self.recipe.eval.every and state.step % self.recipe.eval.every == 0 and state.step < steps:
                        state.note_validation(state.step, evaluator.validate(state.step, generation=False))
                    if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.step < steps:
                        self.save_checkpoint(state)
                        last_checkpoint = state.step
                    if interrupt.requested:
                        self.save_checkpoint(state)
                        return "interrupted", (f"interrupted at step {state.step}; continue with: ftcli train RECIPE "
                                               "--resume")
        except KeyboardInterrupt:
            return "interrupted", f"stopped at once during step {state.step + 1}; resume from the last checkpoint"
        return "finished", ""

    def _log_step(self, state: TrainState, res: StepResult) -> None:
        t = self.recipe.training
        if state.step % t.log_every and state.step != self.steps:
            return
        rec = {"kind": "train", "step": state.step, "epoch": round(state.step / self.per_epoch, 4), "loss": res.loss,
               **res.metrics, "lr": res.lr, "tokens_per_s": res.tokens / res.seconds, "trained_tokens": res.trained,
               "tokens": res.tokens, "grad_norm": res.grad_norm, "step_s": res.seconds,
               "rss_mb": round(peak_rss_mb(), 1)}
        rec.setdefault(self.objective.count_name, res.count)
        if res.penalty is not None:
            rec["penalty"] = res.penalty
        self.metrics_log.append(rec)


def finish(setup: Setup, trainer: Trainer, evaluator: Evaluator, state: TrainState, status: str, message: str,
           hooks: Hooks, started: float) -> Path:
    """After the loop: on success the last validation, retention after, a checkpoint and the artifact; in every
    case the report. A run that did not finish raises RunError after its report is written."""
    from ftcli import atomic

    folder, model = trainer.folder, trainer.accelerator.unwrap_model(trainer.model)
    after, retention_after = {}, []
    if status == "finished":
        after = evaluator.validate(state.step, generation=True)
        retention_after = evaluator.score_retention()
        state.note_validation(state.step, after)
        trainer.save_checkpoint(state)
        with atomic.folder(folder.path / setup.strategy.artifact) as tmp:
            setup.strategy.save(model, tmp)
            setup.tokenizer.save_pretrained(str(tmp))
    for fn in hooks.at_end:
        fn(model)
    summary = _summary(setup, trainer, state, status, message, started, after)
    mixture = setup.data.train.mixture
    if mixture is not None:  # right after the run: the counts a reader looks for first
        validation = setup.data.validation.mixture if setup.data.validation is not None else None
        section = mixture.summary(trainer.drawn(state.step), validation, (state.before or {}).get("datasets", {}),
                                  after.get("datasets", {}))
        summary = {"run": summary.pop("run"), "mixture": section, **summary}
    summary["retention"] = _retention_rows(evaluator.retention, state.retention_before or [], retention_after)
    report.write_report(folder.path, summary, trainer.metrics_log.read())
    if status != "finished":
        raise RunError(f"{message} (run folder: {folder.path})")
    return folder.path


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


def _summary(setup: Setup, trainer: Trainer, state: TrainState, status: str, message: str, started: float,
             after: dict) -> dict:
    from ftcli.models import count_parameters

    recipe, data, strategy = setup.recipe, setup.data, setup.strategy
    trainable, total = count_parameters(trainer.model)
    secs = max(state.train_seconds, 1e-9)
    splits = {"train": data.train.stats.as_dict()}
    if data.validation is not None:
        splits["validation"] = data.validation.stats.as_dict()
    strip = lambda m: {k: v for k, v in (m or {}).items() if k != "samples"}  # noqa: E731
    done = state.step - (state.resumed_from or 0)
    return {
        "run": {"name": trainer.folder.path.name, "folder": str(trainer.folder.path), "status": status,
                "strategy": strategy.name, "objective": setup.objective.name, "base_model": recipe.base_model,
                "steps": state.step, "total_steps": trainer.steps, "wall_s": time.time() - started,
                "resumed_from": state.resumed_from, "artifact": strategy.artifact if status == "finished" else None},
        "message": message,
        "parameters": {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)},
        "before": strip(state.before),
        "after": strip(after),
        "best": state.best,
        "samples": after.get("samples") or [],
        "throughput": {
            "tokens_per_s": state.tokens / secs,
            "trained_tokens_per_s": state.trained_tokens / secs,
            "s_per_step": secs / max(done, 1) if state.step else None,
            "padding_fraction": 1 - state.tokens / state.positions if state.positions else 0.0,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "train_seconds": state.train_seconds,
            "tokens": state.tokens,
        },
        "data": {"format": recipe.data.format, "inferred": dict(recipe.inferred), "splits": splits,
                 "bad_rows": data.bad_rows.as_dict(),
                 "example": "\n".join(marked_text(show_mask(data.encoder.tokenizer, enc))
                                      for enc in data.train.encoded[0].sequences)},
        "strategy_details": strategy.describe(trainer.model),
        "objective_details": setup.objective.describe(),
        "recipe_yaml": recipe.to_yaml(),
    }


def _progress(console, enabled: bool):
    if not enabled or console is None or not console.is_terminal:
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
