"""The training loop, on accelerate: one loop for every strategy and every objective.

`run` reads top to bottom: open the run folder (and check a resume), build the model, data, strategy and
objective, build the evaluator once (validation + retention sets), restore or score the start, train, finish.

Per optimiser step (`Trainer.step`): the step's micro-batches are collated first and the objective's count of
them taken (trained tokens for sft and distill, pairs for dpo); each micro-batch's loss sum is divided by that
count before backward, so the gradient is that of the mean over the whole step, whatever `grad_accum` is. A
micro-batch of more than `training.pass_tokens` positions runs as several forward/backward passes of whole rows
(the same sum, the memory of one pass). The strategy's penalty (ewc, si) gets a backward of its own after the
task's, or joins the step's one pass under an optimiser that updates inside backward (lomo). Then the optimiser's
update (`optimizers.Updates`: clipping and the step of `training.optimizer`), what watches every update (zeros kept
after pruning, the SI path integral), the schedule. Validation every `eval.every` steps and at the end;
checkpoints every `training.checkpoint_every` steps and at the end; a NaN or inf loss or gradient norm stops the
run before the bad update is applied; Ctrl-C or SIGTERM finishes the step, writes a checkpoint and exits 1 with
the command that resumes; --resume continues from the newest checkpoint that verifies (ftcli/checkpoint.py). A
write that fails (disk full, size limit, permission) ends the run naming the file, the last checkpoint intact.
Every record of metrics.jsonl also goes to the trackers of `report_to`.

On several processes (`ftcli train --nproc N`, torchrun; ftcli/distributed.py) the same loop runs on every rank.
Each epoch is planned for the global batch and dealt out across the ranks (data/batching.py); the step's count is
summed over micro-batches and ranks before any backward, so N processes compute the gradient one process would with
the same global batch; DDP or FSDP2 synchronise it (ftcli/parallel.py). Every rank runs as many passes per step as
the busiest (the extra ones count zero), so FSDP's per-pass collectives line up. Only rank 0 writes the run folder
(recipe, metrics, checkpoints, artifact, report) and prints; validation and retention sets are sharded across the
ranks and gathered; an interrupt on any rank stops every rank at the same step.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ftcli import atomic, attention, checkpoint, distributed, optimizers, parallel, report, scoring, trackers
from ftcli.compiled import compile_layers, eager
from ftcli.data import DataBundle
from ftcli.data.batching import plan_epoch, shard_step
from ftcli.data.tokenize import Encoder, marked_text, pad_id, show_mask
from ftcli.errors import RunError, UserError
from ftcli.evaluate import choice_accuracy, generation_metrics, to_device
from ftcli.loss import causal_lm
from ftcli.objectives import Objective
from ftcli.run_folder import RunFolder
from ftcli.runtime import autocast as autocast_for
from ftcli.runtime import peak_gpu_mb, peak_rss_mb
from ftcli.strategies import Context, Strategy
from ftcli.vocab import CANDIDATES


class _NoLog:
    """metrics.jsonl on ranks other than 0: only rank 0 writes the run folder."""

    def append(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        return []

    def truncate_after(self, step: int) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self, status: str) -> None:
        pass


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
    processes: int = 1  # the run's plan is laid out for this many processes: a resume needs as many
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


def build(recipe, *, run_dir: Path | None = None, allow_pickle: bool = False, log=print, processes: int = 1) -> Setup:
    """Load the base, the data and the strategy, in the order DESIGN.md draws. Every file is read (and every
    retention set checked) before the model is loaded."""
    from ftcli import data as data_mod
    from ftcli import models, objectives, strategies

    from ftcli.recipe import resolve_formats

    resolve_formats(recipe)  # format: auto (a recipe from recipe.load is resolved already; this is a no-op then)
    strategy = strategies.get(recipe.strategy)
    strategies.refuse_unsupported(strategy, recipe)  # before any weight is loaded
    trackers.check(recipe)
    objective = objectives.get(recipe.objective)
    tokenizer = models.load_tokenizer(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                                      allow_pickle=allow_pickle, log=log)
    objective.preflight(recipe, tokenizer)
    bundle = data_mod.build(recipe, tokenizer, objective)
    retention = scoring.retention_sets(recipe, load=True)
    model = models.load_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                              allow_pickle=allow_pickle, log=log, **strategy.base_loading(),
                              **objective.base_loading(bundle))
    retention = _probe_rows(recipe, model, tokenizer, retention, log)
    ctx = Context(recipe=recipe, tokenizer=tokenizer, run_dir=run_dir, train_data=bundle.train, log=log,
                  strategy=strategy, processes=processes)
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
                started = time.perf_counter()
                es.examples = probe.examples(model, tokenizer, base=recipe.base_model,
                                             template=recipe.data.chat_template, limit=es.limit,
                                             batch_size=max(recipe.training.batch_size, 16), log=log)
                es.prepared_s = time.perf_counter() - started
            except UserError as e:
                log(f"note: the built-in retention probe is skipped: {e}")
                continue
        out.append(es)
    return out


def make_scheduler(recipe, optimizer, steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.training.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.warmup_steps(steps), num_training_steps=steps)


def watchers(recipe, strategy, named) -> list:
    """What watches every update besides the optimiser: zeros kept (pruned models), the SI path integral."""
    from ftcli import importance, prune

    out = []
    if recipe.training.keep_zeros:
        out.append(prune.KeepZeros(named))  # first: the path integral sees the update as applied
    if recipe.training.record_si:
        out.append(importance.PathIntegral(named))
    return out


class _Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM (what a cluster scheduler sends before it kills): the first finishes the step,
    writes a checkpoint and exits 1 with the command that resumes; a second stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None  # the name of the signal received
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


def resume_command(recipe, folder: Path) -> str:
    """The command line that continues this run."""
    import shlex

    from ftcli.recipe import default_output

    parts = ["ftcli", "train", str(recipe.source) if recipe.source else "RECIPE"]
    for item in recipe.overrides:
        parts += ["--set", item]
    if Path(folder).resolve() != default_output(recipe).resolve():
        parts += ["--output", str(folder)]
    processes = distributed.world().size
    return shlex.join(parts + ["--resume"] + (["--nproc", str(processes)] if processes > 1 else []))


# ------------------------------------------------------------------------------------------------------------
# the run, top to bottom


def run(recipe, *, output: Path, resume: bool = False, overwrite: bool = False, allow_pickle: bool = False,
        console=None, hooks: Hooks | None = None, progress: bool = True) -> Path:
    """Train a recipe into the run folder `output`; returns the folder. Under torchrun every rank calls this."""
    from accelerate.utils import set_seed

    world = distributed.init()
    hooks = hooks or Hooks()
    log = (console.print if console is not None else print) if world.main else _silent
    folder, start = open_run_folder(recipe, output, resume=resume, overwrite=overwrite, log=log)
    set_seed(recipe.training.seed)  # the same on every rank: the same initial weights (LoRA A included)
    started = time.time()
    with _Interrupt() as interrupt:  # from here: a signal during loading or the first validation is kept for the loop
        try:
            setup = build(recipe, run_dir=folder.path if world.main else None, allow_pickle=allow_pickle, log=log,
                          processes=world.size)
            if world.size > 1:  # each rank its own dropout draws from here on
                set_seed(recipe.training.seed + world.rank)
            trainer = Trainer(setup, folder)
            evaluator = Evaluator(setup, trainer.model, trainer.autocast, trainer.metrics_log,
                                  trainer.parallel.gathered)
            if start is not None:
                state = trainer.restore(start)
                log(f"resuming {folder.path} from step {state.step}")
            else:
                state = TrainState(before=evaluator.validate(0, generation=True), processes=world.size)
                if evaluator.retention:
                    log(f"scoring {len(evaluator.retention)} retention set(s) on the base model")
                    state.retention_before = evaluator.score_retention()
        except BaseException:
            folder.abandon()  # bad input found while building: no run folder left behind (a replaced one put back)
            raise
        folder.keep()
        if world.size > 1:
            log(f"{world.size} processes ({recipe.training.distributed}): global batch "
                f"{recipe.global_batch(world.size)} = batch_size {recipe.training.batch_size} × grad_accum "
                f"{recipe.training.grad_accum} × {world.size}" + trainer.short_step_note())
        try:
            bar = _progress(console, progress) if world.main else None
            # a live bar on a terminal; in a log file (not a terminal) a plain line every 5% of the run instead
            status, message = trainer.train(state, evaluator, hooks, bar, log if progress and bar is None else None,
                                            interrupt)
            return finish(setup, trainer, evaluator, state, status, message, hooks, started)
        except atomic.WriteFailed as e:
            raise RunError(trainer.write_failed(e)) from None


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def open_run_folder(recipe, output: Path, *, resume: bool, overwrite: bool, log=print) -> tuple[RunFolder, int | None]:
    """The run folder, created (or checked for --resume: the same recipe, the same number of processes), with the
    resolved recipe written into it; and the checkpoint step to resume from: the newest that verifies (damaged
    newer ones are named and removed), or None to start from step 0 (a new run, or one stopped before its first
    checkpoint). On several processes rank 0 does this and the others learn its outcome."""
    problem, start, world = None, None, distributed.world()
    folder = RunFolder(output)
    if world.main:
        try:
            folder = RunFolder.create(output, resume=resume, overwrite=overwrite)
            if resume:
                start = _resume_point(recipe, folder, world.size, log)
            folder.write_recipe(recipe)
        except UserError as e:
            problem = str(e)
    problem, start = distributed.broadcast((problem, start))
    if problem:
        raise UserError(problem)
    return folder, start


def _resume_point(recipe, folder: RunFolder, processes: int, log) -> int | None:
    """--resume: the recipe checked against the run's, leftovers of a kill removed, the newest checkpoint that
    verifies (newer damaged ones removed), trained on as many processes as now."""
    note = folder.resume_check(recipe)
    for leftover in checkpoint.remove_leftovers(folder.path):
        log(f"removed {leftover.name}, left half-written by the interrupted run")
    start = checkpoint.newest_verified(folder.path, log=log)
    if start is not None:
        before = checkpoint.state_of(folder.path, start).get("processes", 1)
        if before != processes:  # the plan deals each step's rows out to that many
            raise UserError(f"--resume: {folder.path} was trained on {before} process(es), each step a global batch "
                            f"of {recipe.global_batch(before)} rows; resume it on as many (--nproc {before})")
    if note:
        log(f"note: {note}")
    for step in folder.checkpoints:
        if start is None or step > start:
            shutil.rmtree(checkpoint.path(folder.path, step))  # named as skipped above
    if start is None:
        log(f"note: {folder.path} holds no usable checkpoint (the run stopped before its first): "
            "starting again from step 0")
        report.MetricsLog(folder.path).truncate_after(-1)
    return start


class Evaluator:
    """Validation (the objective's loss and metrics, and the generation or candidate metrics of eval.metrics) and
    the retention sets, built once for the run. On several processes each rank scores its share of the rows (the
    metric functions shard and gather: evaluate.py) with whole parameters (`gathered`: FSDP unshards)."""

    def __init__(self, setup: Setup, model, autocast, metrics_log, gathered=nullcontext):
        self.recipe, self.objective, self.data = setup.recipe, setup.objective, setup.data
        self.tokenizer, self.model, self.autocast, self.metrics_log = setup.tokenizer, model, autocast, metrics_log
        self.retention = setup.retention
        self.pad_id = pad_id(setup.tokenizer)
        self.gathered = gathered

    def validate(self, step: int, generation: bool) -> dict:
        if self.data.validation is None:
            return {}
        with self.gathered(), eager():  # compiled blocks (training.compile) run eagerly: the numbers of every run
            return self._validate(step, generation)

    def _validate(self, step: int, generation: bool) -> dict:
        split = self.data.validation
        r, d = self.recipe, self.recipe.data
        started = time.perf_counter()
        out = self.objective.evaluate(self.model, split.encoded, batch_size=r.training.batch_size, pad_id=self.pad_id,
                                      packing=d.packing, pack_len=d.max_len, autocast=self.autocast)
        loss_s = time.perf_counter() - started
        wanted = r.eval.metrics
        by_candidates = [m for m in CANDIDATES if m in wanted and m not in out]  # unless the objective scored them
        rows = [ex for ex in split.examples if ex.choices]  # a mixture: its classification / choice rows
        rows = rows[: r.eval.limit] if r.eval.limit else rows
        if generation and by_candidates and rows:  # no candidates to score: no accuracy (not a 0)
            whole = Encoder(self.tokenizer, d.chat_template, scoring.EVAL_MAX_LEN, "truncate", d.format)  # answers uncut
            res = choice_accuracy(self.model, whole, rows, batch_size=r.training.batch_size, autocast=self.autocast)
            out.update({m: res["macro_f1" if m == "macro_f1" else "accuracy"] for m in by_candidates})
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
        # what the pass cost: the whole of it, and the loss part alone (all a pass between steps computes)
        record.update(eval_s=time.perf_counter() - started, loss_eval_s=loss_s)
        self.metrics_log.append(record)
        return out

    def score_retention(self) -> list[dict]:
        r = self.recipe
        lm = self.objective.language_model(self.model) if self.retention else None
        with self.gathered(), eager():
            return [scoring.score(lm, self.tokenizer, es, template=r.data.chat_template,
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
        return (math.isfinite(self.loss) and (self.penalty is None or math.isfinite(self.penalty))
                and (self.grad_norm is None or math.isfinite(self.grad_norm)))


class Trainer:
    """The model, optimiser and schedule of one run, and the step."""

    def __init__(self, setup: Setup, folder: RunFolder):
        self.setup, self.folder, self.recipe = setup, folder, setup.recipe
        self.strategy, self.objective = setup.strategy, setup.objective
        t = self.recipe.training
        self.world = distributed.world()
        self.device = distributed.device()
        self.model = setup.model.to(self.device)
        # packed rows whose examples attention keeps apart by their spans (ftcli/attention.py) can be laid end to
        # end in one row per pass, padding dropped (data/batching.py, Batch.split)
        self.flat_passes = attention.installed(causal_lm(self.model))
        self.pad_id = pad_id(setup.tokenizer)
        # bf16 is torch's autocast, entered here (not a process-wide mixed-precision setting that a second run in
        # the same process could not change)
        self.autocast = autocast_for(t.precision, self.device.type)
        first = to_device(self.objective.collate([setup.data.train.encoded[0]], self.pad_id, self.recipe.data.packing,
                                                 self.recipe.data.max_len), self.device)
        self.parallel = parallel.wrap(self.model, self.objective, self.strategy, t.distributed, first, self.autocast)
        self.filler = first  # what a rank with fewer passes than the step's busiest runs, counting zero
        self.named = self.strategy.train_params(self.model)  # after wrapping: FSDP replaces the parameters
        if not self.named:
            raise UserError(f"strategy {self.strategy.name}: no parameter is trainable")
        optimizer = optimizers.make(self.recipe, self.named)
        self.steps, self.per_epoch = self.recipe.total_steps(setup.data.train.epoch_size, self.world.size)
        self.scheduler = make_scheduler(self.recipe, optimizer, self.steps)
        self.optimizer = optimizer
        self.updates = optimizers.updates(optimizer, [p for _, p in self.named], t.max_grad_norm,
                                          self.world.size)
        # what watches every update (taken from the freshly loaded weights, so a resumed run sees the same start)
        self.watchers = watchers(self.recipe, self.strategy, self.named)
        if t.compile:
            compile_layers(self.model)
        self.metrics_log = (report.MetricsLog(folder.path, trackers.open_all(self.recipe, folder.path))
                            if self.world.main else _NoLog())
        self._plans: dict[int, list] = {}
        self.last_saved: int | None = None  # the step of the newest checkpoint written or resumed from
        from ftcli.moe import RouterBalance

        self.router = RouterBalance.attach(causal_lm(self.model), t.router_aux_loss)  # None unless mixture of experts

    def short_step_note(self) -> str:
        """What the epoch's last step holds when it is short (said once at the start of a run on several ranks)."""
        n, per_step = self.setup.data.train.epoch_size, self.recipe.global_batch(self.world.size)
        if n % per_step == 0:
            return ""
        return (f"; each epoch's last step holds {n % per_step} of {per_step} rows, dealt out across the ranks "
                "(a rank without any counts zero in it)")

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, state: TrainState) -> Path:
        """Every rank takes part (FSDP gathers whole tensors); rank 0 writes."""
        state.strategy = self.strategy.state_dict()
        extra = {k: v for w in self.watchers for k, v in w.state_tensors().items()}
        with self.parallel.gathered():
            tensors = {n: p.detach().to("cpu").clone() for n, p in self.strategy.train_params(self.model)}
        optimizer = self.parallel.optimizer_state(self.optimizer)
        ranks = distributed.gather_objects(checkpoint.rng_state()) if self.world.size > 1 else None
        out = checkpoint.path(self.folder.path, state.step)
        if self.world.main:
            self.metrics_log.sync()  # the log up to this step reaches the disk with the checkpoint
            out = checkpoint.save(self.folder.path, state.step, tensors, optimizer, self.scheduler.state_dict(),
                                  asdict(state), keep=self.recipe.training.keep_checkpoints, ranks=ranks, extra=extra)
        self.last_saved = state.step
        return out

    def restore(self, step: int) -> TrainState:
        saved = checkpoint.load(self.folder.path, step, self.named)
        state = TrainState.from_checkpoint(saved.state)
        self.parallel.load_full(self.named, saved.tensors)
        self.parallel.load_optimizer_state(self.optimizer, saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        saved.restore_rng(self.world.rank)
        self.strategy.load_state_dict(state.strategy)
        extra = checkpoint.load_extra(self.folder.path, step)
        for w in self.watchers:
            w.load_state_tensors(extra, state.step)
        state.resumed_from = self.last_saved = state.step
        self.metrics_log.truncate_after(state.step)
        return state

    def write_failed(self, e: "atomic.WriteFailed") -> str:
        """The message of a run stopped by a write that failed (full disk, size limit, permission)."""
        last = (f"the last good checkpoint, {checkpoint.path(self.folder.path, self.last_saved)}, is intact"
                if self.last_saved is not None else "no checkpoint had been written yet")
        return (f"{e}; {last}. Free space (or fix the permission), then continue with: "
                f"{resume_command(self.recipe, self.folder.path)}")

    # -- one optimiser step --------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list:
        """This rank's collated micro-batches of optimiser step `step` (0-based): the epoch's seeded plan for the
        global batch, dealt out across the ranks."""
        d, train = self.recipe.data, self.setup.data.train
        epoch, index = divmod(step, self.per_epoch)
        mine = shard_step(self.plan(epoch)[index], self.world.rank, self.world.size)
        return [to_device(self.objective.collate([train.encoded[i] for i in mb], self.pad_id, d.packing, d.max_len),
                          self.device)
                for mb in mine]

    def plan(self, epoch: int) -> list:
        """Epoch `epoch`'s steps → micro-batches → row indices, for the global batch (batching.plan_epoch; a mixture
        draws the order)."""
        t, d, train = self.recipe.training, self.recipe.data, self.setup.data.train
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(train.lengths, t.batch_size * self.world.size, t.grad_accum, t.seed,
                                             epoch, bucket=not d.packing, order=train.epoch_order(t.seed, epoch))}
        return self._plans[epoch]

    def drawn(self, steps: int) -> dict[str, int]:
        """A mixture: how many examples the first `steps` optimiser steps took from each dataset (all ranks)."""
        mixture = self.setup.data.train.mixture
        indices = []
        for step in range(steps):
            epoch, index = divmod(step, self.per_epoch)
            indices += [i for mb in self.plan(epoch)[index] for i in mb]
        return mixture.counts(indices)

    def step(self, step: int) -> StepResult:
        """Compute optimiser step `step` (0-based) and apply it, unless its loss or gradient is not finite."""
        self.strategy.on_step(step + 1, self.model)
        t0 = time.perf_counter()
        batches = self.micro_batches(step)
        passes = [part for b in batches for part in b.split(self.recipe.pass_positions(), flat=self.flat_passes)]
        local = [sum(self.objective.count(b) for b in batches), sum(b.n_tokens for b in batches),
                 sum(b.n_trained for b in batches), sum(p.n_positions for p in passes), len(passes)]
        *sums, n_passes = distributed.all_gather_numbers(local)
        count, tokens, trained, positions = (int(sum(v)) for v in sums)
        n_passes = int(max(n_passes))
        # DDP and FSDP average gradients over the ranks: scaled back, the gradient is that of the whole step's mean
        weight = self.parallel.grad_scale / count
        # the strategy's penalty (ewc, si) depends on the weights only; an optimiser that updates inside backward
        # (lomo: one process, one pass) takes it in the step's one pass, any other in a backward of its own after
        # the task's gradient is synchronised (the same on every rank)
        extra = self.strategy.extra_loss(self.model, batches)
        penalty = None if extra is None else float(extra.detach())
        joined = extra is not None and self.updates.one_backward
        step_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        metric_sums: dict[str, torch.Tensor] = {}
        for i in range(n_passes):
            real = i < len(passes)
            part = passes[i] if real else (passes[-1] if passes else self.filler)
            last = i == n_passes - 1
            with self.parallel.accumulating(last=last):
                with self.autocast(), (self.router.capture() if self.router else nullcontext()):
                    loss_sum, metrics = self.parallel.module(part)
                    loss = loss_sum * (weight if real else 0.0)
                    aux = self.router.loss(part) if self.router else None
                    if aux is not None:  # the router's load-balancing loss, a token-weighted mean over the step
                        share = (part.n_tokens / max(tokens, 1)) if real else 0.0
                        metrics = {**metrics, "router_aux": aux.detach() * share * count}  # /count below
                        loss = loss + self.router.coef * aux * share * self.parallel.grad_scale
                if self.world.size == 1:  # stop before anything of this step is applied (lomo applies in backward)
                    early = StepResult(float(step_loss + loss_sum.detach().double() / count), {}, penalty, count,
                                       tokens, trained, positions, 0.0)
                    if not early.finite:
                        self.updates.discard()
                        return early
                self.updates.backward(loss + extra if joined and last else loss)
            for k, v in metrics.items():  # every rank names every metric, passes that count zero included
                metric_sums[k] = metric_sums.get(k, 0) + (v.detach().double() / count if real else 0.0)
            if real:
                step_loss += loss_sum.detach().double() / count
        names = sorted(metric_sums)
        total = distributed.all_sum([float(step_loss), *(float(metric_sums.get(k, 0.0)) for k in names)])
        result = StepResult(total[0], dict(zip(names, total[1:])), penalty, count, tokens, trained, positions, 0.0)
        if not result.finite:  # on several ranks: every rank learns it from the summed loss
            self.updates.discard()
            return result
        for w in self.watchers:
            w.before_update(self.named)  # the task's gradient, before the penalty's joins it
        if extra is not None and not joined:
            extra.backward()
        result.lr = self.scheduler.get_last_lr()[0]
        result.grad_norm = self.updates.apply()
        if result.grad_norm is not None and not math.isfinite(result.grad_norm):
            return result  # not applied
        self.strategy.after_step(step + 1, self.model)
        for w in self.watchers:
            w.after_update(self.named)
        self.scheduler.step()
        result.seconds = time.perf_counter() - t0
        return result

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self, state: TrainState, evaluator: Evaluator, hooks: Hooks, bar, lines,
              interrupt: _Interrupt | None = None) -> tuple[str, str]:
        """Steps until the end, an interrupt or a non-finite loss; returns (status, message). Progress goes to a
        rich `bar`, or to `lines` (a print function: a line every 5% of the run), or nowhere."""
        t, steps = self.recipe.training, self.steps
        start = state.step
        line_every = max(1, steps // 20) if lines else 0
        task = bar.add_task("training", total=steps, completed=start, loss=float("nan"), tps=0.0) if bar else None
        last_checkpoint = state.resumed_from
        self.model.train()
        try:
            with (nullcontext(interrupt) if interrupt else _Interrupt()) as interrupt, (bar or nullcontext()):
                while state.step < steps:
                    res = self.step(state.step)
                    if not res.finite:
                        if last_checkpoint != state.step:
                            self.save_checkpoint(state)
                            last_checkpoint = state.step
                        what = (f"the loss became {res.loss}" if not math.isfinite(res.loss)
                                else f"the {self.strategy.name} penalty became {res.penalty}"
                                if res.penalty is not None and not math.isfinite(res.penalty)
                                else f"the gradient norm became {res.grad_norm}")
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
                    # a signal reaches the ranks at different moments: they stop together
                    if self.world.size > 1 and distributed.any_rank(bool(interrupt.requested)):
                        interrupt.requested = interrupt.requested or "a signal to another process"
                    if interrupt.requested:
                        if last_checkpoint != state.step:
                            self.save_checkpoint(state)
                        return "interrupted", (
                            f"interrupted ({interrupt.requested}) at step {state.step}; checkpoint step-{state.step} "
                            f"written; continue with: {resume_command(self.recipe, self.folder.path)}")
        except KeyboardInterrupt:
            last = f"step-{self.last_saved}" if self.last_saved is not None else "step 0 (no checkpoint yet)"
            return "interrupted", (f"stopped at once during step {state.step + 1}; continue from {last} with: "
                                   f"{resume_command(self.recipe, self.folder.path)}")
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
    folder, model, world = trainer.folder, trainer.model, trainer.world
    after, retention_after = {}, []
    if status == "finished":
        after = evaluator.validate(state.step, generation=True)
        retention_after = evaluator.score_retention()
        state.note_validation(state.step, after)
        trainer.save_checkpoint(state)
        whole = trainer.parallel.full_state_dict()  # FSDP: whole tensors, never a rank's slice
        if world.main:
            with atomic.folder(folder.path / setup.strategy.artifact) as tmp:
                setup.strategy.save(model, tmp, whole)
                setup.objective.save(tmp)
                setup.tokenizer.save_pretrained(str(tmp))
            for w in trainer.watchers:
                w.finish(folder.path, trainer.named)
    trainer.metrics_log.close(status)
    for fn in hooks.at_end:
        fn(model)
    rss = distributed.gather_objects(round(peak_rss_mb(), 1))
    if world.main:
        summary = _summary(setup, trainer, state, status, message, started, after)
        summary["throughput"]["peak_rss_mb_per_process"] = rss
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
                     "change": a[m] - b[m] if m in a and m in b else None,
                     # what scoring took, and making the rows (the probe's answers: ≈ 0 s when cached)
                     "before_s": b.get("seconds"), "after_s": a.get("seconds"), "prepared_s": es.prepared_s})
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
                "precision": recipe.training.precision, "precision_why": recipe.precision_why,
                "resumed_from": state.resumed_from, "artifact": strategy.artifact if status == "finished" else None,
                "processes": trainer.world.size,
                "distributed": recipe.training.distributed if trainer.world.size > 1 else None,
                "global_batch": recipe.global_batch(trainer.world.size)},
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
            "peak_gpu_mb": None if (gpu := peak_gpu_mb()) is None else round(gpu, 1),
            "train_seconds": state.train_seconds,
            "tokens": state.tokens,
        },
        "data": {"format": recipe.data.format, "inferred": dict(recipe.inferred), "splits": splits,
                 "bad_rows": data.bad_rows.as_dict(), "numbers_as_text": data.numbers.as_dict(),
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
