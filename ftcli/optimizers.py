"""The optimiser of a run (`training.optimizer`), in one place: how it is built, how a step's gradient becomes an
update, and what it keeps in memory.

- `adamw` (default): torch's fused AdamW; no weight decay on biases, norms and other 1-D parameters. 8 bytes of
  state and 4 of gradient per trained weight. The HF Trainer's default is the same fused AdamW.
- `adafactor`: torch.optim.Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): the second moment of a matrix kept
  as one row and one column vector, no first moment, so almost no state. Its `lr` is a *relative* step (the update's
  RMS against the weight's RMS, capped by 1/√step), so it wants larger values than AdamW (1e-3 … 1e-2).
  `training.betas` does not apply.
- `adamw_8bit`: bitsandbytes' AdamW8bit (Dettmers et al. 2022, arXiv 2110.02861): both moments stored blockwise in
  8 bits (2 bytes of state per weight instead of 8); tensors under 4,096 elements keep 32-bit state. It runs on the
  CPU here (bitsandbytes 0.50; measured against fp32 AdamW in tests/test_optimizers.py).
- `lomo`: LOMO (Lv et al. 2023, arXiv 2306.09782): plain SGD whose update is applied inside the backward pass, one
  parameter at a time as soon as its gradient is complete (`Tensor.register_post_accumulate_grad_hook`), after
  which the gradient is dropped: no optimiser state and no stored gradients, only the one being applied. We use
  our own hooks rather than the `lomo-optim` package: its optimiser replaces `backward` with its own
  `fused_backward(loss, lr)` and carries DeepSpeed and fp16 loss-scaling paths we do not use; torch's
  post-accumulate hook (2.1+) is the documented way to fuse an optimiser into backward and is about 40 lines.
  As in the paper, gradient clipping costs a second backward: the first measures the whole gradient's norm
  (nothing applied, the graph kept), the second applies the clipped update. Gradient accumulation cannot be had
  (a micro-batch's update is applied before the next one is computed), so `grad_accum > 1` is refused, and each
  micro-batch runs as one forward/backward pass. It runs in one process (a data-parallel all-reduce would come
  after the update). `lr` is SGD's: LOMO used 1e-2 … 3e-2 on LLaMA.

The module imports torch only where it builds or steps an optimiser: `ftcli check` reads `memory` without it. LOMO's
optimiser lives in ftcli/lomo.py.

The Trainer only calls `Updates.backward(loss)` for every pass and `Updates.apply()` once per step, so its step
is the same for every optimiser.
"""

from __future__ import annotations

import math


def param_groups(recipe, named_params) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms and other 1-D parameters)."""
    decay = [p for n, p in named_params if p.ndim >= 2]
    no_decay = [p for n, p in named_params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": recipe.training.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def make(recipe, named_params) -> "torch.optim.Optimizer":
    """The torch optimiser of `training.optimizer` over `named_params` (the scheduler and checkpoints use it)."""
    import torch

    t = recipe.training
    groups = param_groups(recipe, named_params)
    if t.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=t.lr)
    if t.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except (ImportError, RuntimeError) as e:
            from ftcli.errors import UserError

            raise UserError(f"training.optimizer adamw_8bit: bitsandbytes cannot run here ({e}); use adafactor or "
                            "lomo for a low-memory optimiser") from None
        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=t.betas, eps=1e-8)
    if t.optimizer == "lomo":
        from ftcli.lomo import Lomo

        return Lomo(groups, lr=t.lr, max_grad_norm=t.max_grad_norm)
    # torch's fused kernel where it applies (float parameters on the CPU or CUDA): one pass over each tensor and no
    # temporaries, which matters for full fine-tuning (figures in docs/benchmarks.md)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for _, p in named_params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=1e-8, fused=fused or None)


def clips_in_step(optimizer, params) -> bool:
    """Can the optimiser's own step apply the clipping? torch's fused AdamW divides each gradient by its
    `grad_scale` attribute (the hook GradScaler uses to unscale) inside the pass that reads it anyway, which saves
    clip_grad_norm_'s pass multiplying every gradient (one read and write of 4 bytes per trained weight: ≈ 3% of a
    full fine-tuning step of the built-in model, docs/benchmarks.md). Not for FSDP2's sharded (DTensor)
    parameters, whose norm is a DTensor."""
    import torch

    return (isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))
            and not any(hasattr(p, "full_tensor") for p in params))


def updates(optimizer, params, max_grad_norm: float | None, processes: int = 1) -> "Updates":
    """How the Trainer turns a step's backward passes into an update with `optimizer`."""
    from ftcli.lomo import Lomo

    if isinstance(optimizer, Lomo):
        if processes > 1:
            from ftcli.errors import UserError

            raise UserError("training.optimizer lomo runs in one process: its update is applied inside backward, "
                            "before a data-parallel all-reduce of the gradient could happen. Use adamw_8bit or "
                            "adafactor for a low-memory multi-process run.")
        return InBackward(optimizer)
    return Updates(optimizer, params, max_grad_norm)


def _backward(loss, **kwargs) -> None:
    loss.backward(**kwargs)


class Updates:
    """Gradients accumulate over the step's backward passes (DDP or FSDP2 synchronise them in the last); then clip,
    step, zero. A non-finite gradient norm is not applied (returned as it is, so the loop stops with the last good
    weights)."""

    one_backward = False  # True: the whole step must be one backward pass (the update happens inside it)

    def __init__(self, optimizer, params, max_grad_norm):
        self.optimizer, self.params, self.max_grad_norm = optimizer, params, max_grad_norm
        self.clips_in_step = bool(max_grad_norm) and clips_in_step(optimizer, params)

    def backward(self, loss) -> None:
        _backward(loss)

    def apply(self) -> float | None:
        import torch

        norm = None
        if self.max_grad_norm:
            if self.clips_in_step:
                total = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            else:
                total = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            # under FSDP2 the norm is a DTensor reduced across ranks: its whole value is the same on every rank
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
            if not math.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return norm
            if self.clips_in_step:  # what clip_grad_norm_ multiplies by, as the divisor the fused step applies
                self.optimizer.grad_scale = (total + 1e-6).div_(self.max_grad_norm).clamp_(min=1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def discard(self) -> None:
        """Drop what the passes so far accumulated (a non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)


class InBackward(Updates):
    """LOMO: the update happens during `backward`; `apply` only reports the gradient norm it clipped with."""

    one_backward = True

    def __init__(self, lomo):
        self.lomo = self.optimizer = lomo

    def backward(self, loss) -> None:
        self.lomo.fused_backward(loss, _backward)

    def apply(self) -> float | None:
        self.optimizer.step()  # nothing to do; the schedule counts it
        return self.lomo.last_norm

    def discard(self) -> None:
        pass  # nothing is kept between passes


def memory(name: str, trainable: int, shapes: list) -> dict[str, float]:
    """Bytes the optimiser costs beyond the weights, by part: gradients of the `trainable` weights (those with a
    gradient at once) and the state kept for tensors of `shapes` (all it updates; hft: every round's), fp32."""
    numel = [math.prod(s) for s in shapes]
    if name == "lomo":  # one gradient at a time, while it is applied
        return {"gradients (one tensor at a time)": max(numel, default=0) * 4, "optimizer (lomo)": 0}
    if name == "adafactor":  # a row and a column vector per matrix
        state = sum((s[-2] + s[-1]) * 4 if len(s) >= 2 else math.prod(s) * 4 for s in shapes)
        return {"gradients": trainable * 4, "optimizer (adafactor)": state}
    if name == "adamw_8bit":  # two 8-bit moments and a float absmax per block of 256; small tensors stay 32-bit
        state = sum(k * 2 + 2 * 4 * math.ceil(k / 256) if k >= 4096 else k * 8 for k in numel)
        return {"gradients": trainable * 4, "optimizer (adamw_8bit)": state}
    return {"gradients": trainable * 4, "optimizer (AdamW)": sum(numel) * 8}
