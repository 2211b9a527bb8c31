"""Data parallelism for the training step, on PyTorch's own engines: DDP or FSDP2 (`training.distributed`).

The step's forward is one module, `StepModule`: the objective's loss sum of the model on a batch. DDP and FSDP2 wrap
that module rather than the bare model, because ftcli's losses run the decoder and the output head separately
(loss.py) and never call `model.forward`: a wrapper around the model would not see the forward, and DDP would then
silently leave gradients unsynchronised.

- one process (`Replica`): the step module as is.
- `ddp` (`Ddp`): every process holds the whole model; torch's DistributedDataParallel all-reduces the gradients in
  buckets during the backward of the step's last pass (earlier passes run under `no_sync`). Buffers are not
  broadcast per forward, so processes may run different numbers of passes. A strategy whose trainable set changes
  during the run (hft) gets `find_unused_parameters`: a parameter frozen on every rank keeps no gradient, as in one
  process. DDP copies rank 0's weights to every rank when it wraps (identical start, whatever each rank drew).
- `fsdp` (`Fsdp`): `fully_shard` on every decoder block (the classes the model names in `_no_split_modules`) and on
  the step module (embeddings, final norm, head): parameters, gradients and AdamW state are split across ranks and
  gathered block by block for each pass, freed after it. Parameters are gathered in the dtype they are stored in and
  gradients reduced in float32; `training.precision: bf16` is torch's autocast on top, exactly as in one process (a
  bf16 `param_dtype` would also put the embeddings and the residual stream in bf16: other numbers).
  For evaluation and saving, `gathered()` unshards every unit (whole parameters on every rank, no collective per
  forward), so validation can be sharded and the artifact is written from whole tensors, never a rank's slice.

Both DDP and FSDP2 average gradients over ranks; `grad_scale` (the number of ranks) undoes that, so the loop's
division by the step's count summed over ranks gives N processes the gradient of one process with the same
global batch.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from ftcli.errors import UserError


class StepModule(torch.nn.Module):
    """The objective's (loss sum, metric sums) of `model` on a batch, as one module's forward."""

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: a plain attribute

    def forward(self, batch):
        return self.objective.loss_sum(self.model, batch)


class Replica:
    """One process: nothing is distributed."""

    grad_scale = 1

    def __init__(self, model, objective, strategy=None, warmup_batch=None, autocast=nullcontext):
        self.model = model
        self.module = StepModule(model, objective)

    def accumulating(self, last: bool):
        """Around a pass that is not the step's last (`last` False): no gradient communication yet."""
        return nullcontext()

    def gathered(self):
        """Around evaluation and saving: whole parameters on every rank, registered in the model."""
        return nullcontext()

    def load_full(self, named, tensors: dict) -> None:
        """Copy whole tensors (from a checkpoint) into the parameters `named`, sharded or not."""
        with torch.no_grad():
            for name, p in named:
                p.copy_(tensors[name].to(p.device, p.dtype))

    def full_state_dict(self) -> dict | None:
        """The model's state with whole tensors (on rank 0), for `Strategy.save`; None: the model's own will do."""
        return None

    def optimizer_state(self, optimizer) -> dict:
        """The optimiser's state, whole (on rank 0 at least)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


@contextmanager
def _all_trainable(named):
    """Every parameter the optimiser owns requires a gradient while DDP registers its hooks (hft freezes some per
    round; DDP only ever synchronises parameters that required a gradient when it wrapped the model)."""
    saved = [(p, p.requires_grad) for _, p in named]
    for p, _ in saved:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class Ddp(Replica):
    def __init__(self, model, objective, strategy, warmup_batch=None, autocast=nullcontext):
        from torch.nn.parallel import DistributedDataParallel

        from ftcli import distributed

        super().__init__(model, objective)
        self.grad_scale = distributed.world().size
        dev = next(model.parameters()).device
        with _all_trainable(strategy.train_params(model)):
            self.module = DistributedDataParallel(
                StepModule(model, objective), device_ids=[dev] if dev.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=strategy.trainable_set_changes)

    def accumulating(self, last: bool):
        return nullcontext() if last else self.module.no_sync()


def block_classes(model) -> set[str]:
    """The decoder block classes a transformers model names as never to be split across devices."""
    from ftcli.loss import causal_lm

    return set(getattr(causal_lm(model), "_no_split_modules", None) or [])


class Fsdp(Replica):
    def __init__(self, model, objective, strategy, warmup_batch, autocast=nullcontext):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from ftcli import distributed
        from ftcli.evaluate import eval_mode

        super().__init__(model, objective)
        self.grad_scale = distributed.world().size
        names = block_classes(model)
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if not blocks:
            raise UserError(f"training.distributed fsdp: {type(model).__name__} names no decoder block class "
                            "(_no_split_modules) to shard by; use training.distributed: ddp")
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        self.module = fully_shard(StepModule(model, objective), mp_policy=policy)
        self.units = [*blocks, self.module]
        # FSDP2 takes the first module forwarded as its root: forward the step module once (no gradient, eval mode,
        # the RNG untouched, the step's precision), so that evaluation, which calls the model's parts directly,
        # never becomes the root
        with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(model), autocast():
            self.module(warmup_batch)
        for unit in self.units:  # the root keeps its parameters whole after a forward until the backward
            unit.reshard()

    @contextmanager
    def gathered(self):
        self.module.set_reshard_after_forward(False)
        for unit in self.units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in self.units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not self.module, recurse=False)  # the root keeps its own

    def load_full(self, named, tensors: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.no_grad():
            for name, p in named:
                t = tensors[name].to(p.device, p.dtype)
                if isinstance(p, DTensor):  # every rank read the whole tensor: each keeps its own slice
                    t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
                p.copy_(t)

    def full_state_dict(self) -> dict:
        # FSDP2's state-dict hooks hand out each rank's slice (a DTensor) even while unsharded: gather whole tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))


MODES = {"ddp": Ddp, "fsdp": Fsdp}


def wrap(model, objective, strategy, mode: str, warmup_batch, autocast=nullcontext) -> Replica:
    """The step module for this process: as is in one process, else under DDP or FSDP2 (`mode`). `warmup_batch`
    and `autocast`: one batch and the step's precision, for FSDP's first forward."""
    from ftcli import distributed

    if distributed.world().size == 1:
        return Replica(model, objective)
    return MODES[mode](model, objective, strategy, warmup_batch, autocast)
