"""q, k and v of an attention block as one fused LoRA product while training.

The three projections read the same input. Done apart (lora_fused.py), each casts it, multiplies it by its own
frozen weight and by its own A, and its backward pass adds its own share of the input's gradient. Done together,
the input is cast once, meets the frozen weights as one [q;k;v] matrix and the A factors as one [A_q;A_k;A_v], the
B factors act as one block-diagonal matrix (each B scaled by the layer's s), and the backward pass forms the
input's gradient from one product with the weights and one with the adapters:
    y = X·[W]ᵀ + (X·[A]ᵀ)·[sB]ᵀ,   dX = dY·[W] + (dY·[sB])·[A]  (the second term added in float32),
    dA_i = s(dY_i·B_i)ᵀ·X  (one product for the three),   dB_i = s·dY_iᵀ·(X·A_iᵀ)  (one each).
The adapters' gradients are summed in float32 from the bf16 operands as in lora_fused.py, so that several processes
still end where one does (issue 8's check: 7.9e-7; adding the adapters' part of dX into the bf16 product instead,
as one addmm_, made it 5.0e-5).

The frozen weights stay the three layers' own parameters (PEFT's names, saving, merging): they are made views of
one [q;k;v] tensor, remade if something replaced them (a move to another device). Whichever member the model
calls first with an input computes all three and keeps the other two outputs for their calls with that same
input; the attention block's forward hook drops what is left. The group is used only where each member would
take the fused path with no dropout (one mask per member, as PEFT draws them) and no `fp32_branch`, with equal
scales, in training with gradients; everything else goes through the members one by one.

Measured on the built-in model (docs/benchmarks.md, "q, k and v as one product"; `scripts/bench_siblings.py`):
bf16 LoRA +5.0–6.0% tokens/s, fp32 +1.4%. Gate and up (the MLP's two projections of one input) are not grouped:
with one backward product ([tokens×3072]·[3072×576], which oneDNN runs at 1.1 TFLOP/s against 2.5 for each half)
the pair took 3.4 ms against 3.3 one by one, with dX per member 3.0 ms (≈ 1.5% of a step), and the MLP is what
`training.compile` compiles, where this module's state would not trace.
"""

from __future__ import annotations

import torch

MEMBERS = ("q_proj", "k_proj", "v_proj")


class _Siblings(torch.autograd.Function):
    """Outputs of the members for input x (views of one [tokens, Σ out] product, one per member)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype: torch.dtype, scale: float, splits: tuple, ranks: tuple, *factors):
        a = torch.cat(factors[: len(splits)])  # [Σr, in]
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            xb, a = x2.to(dtype), a.to(dtype)
            b = torch.block_diag(*factors[len(splits):]).mul_(scale).to(dtype)  # [Σ out, Σr], s folded in
            xa = xb @ a.t()
            y = xb @ weight.to(dtype).t() if bias is None else torch.addmm(bias.to(dtype), xb, weight.to(dtype).t())
            y.addmm_(xa, b.t())
        ctx.save_for_backward(xb, xa, weight, a, b)
        ctx.splits, ctx.ranks, ctx.scale, ctx.x_shape = splits, ranks, scale, x.shape
        return tuple(part.view(*x.shape[:-1], n) for part, n in zip(y.split(splits, dim=-1), splits))

    @staticmethod
    def backward(ctx, *grads):
        xb, xa, weight, a, b = ctx.saved_tensors
        tokens, dtype = xb.shape[0], xb.dtype
        dy = torch.cat([g.reshape(tokens, n).to(dtype) if g is not None else xb.new_zeros(tokens, n)
                        for g, n in zip(grads, ctx.splits)], dim=-1)
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(xb.device.type, enabled=False):
            dyb = dy @ b  # [tokens, Σr]: s·dY_i·B_i side by side
            # the adapters' part of dX added in float32: rounding the sum to bf16 (as one addmm_ would) made 2
            # processes differ from 1 by 5e-5 on issue 8's check instead of 7.9e-7
            dx = (dy @ weight.to(dtype)).to(acc).add_(dyb @ a).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
            # the adapters' gradients: float32 sums of exact products, as in lora_fused.py
            da = (dyb.t().to(acc) @ xb.to(acc)).split(ctx.ranks)
            db = [(xa_i.t().to(acc) @ dy_i.to(acc)).mul_(ctx.scale).t()
                  for xa_i, dy_i in zip(xa.split(ctx.ranks, dim=-1), dy.split(ctx.splits, dim=-1))]
        return (dx, None, None, None, None, None, None, *da, *db)


class Siblings:
    """The fused LoRA layers of one attention block that read one input, and the outputs not yet taken."""

    def __init__(self, members: list, hold: bool = True):
        self.members = members
        self.hold = hold  # keep one [q;k;v] tensor across calls (the members' weights its views), or cat per call
        self.weight: torch.Tensor | None = None
        self.pointers: list[int] = []
        self.pending: tuple | None = None  # (x, x's version, {member: output})

    def drop(self, *_) -> None:
        self.pending = None

    def output(self, member, x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """`member`'s output for x through the group, or None where the group does not apply."""
        pending = self.pending
        if pending is not None and pending[0] is x and pending[1] == x._version and member in pending[2]:
            out = pending[2].pop(member)
            if not pending[2]:
                self.pending = None
            return out
        if not torch.is_grad_enabled() or any(m._fused_adapter() != name or m.fp32_branch or m.dropout_p(name)
                                              for m in self.members):
            return None
        scales = {float(m.scaling[name]) for m in self.members}
        weight = self._weight()
        biases = [m.get_base_layer().bias for m in self.members]
        if weight is None or len(scales) != 1 or len({b is None for b in biases}) != 1:
            return None
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        outs = _Siblings.apply(x, weight, bias, dtype, scales.pop(),
                               tuple(m.get_base_layer().weight.shape[0] for m in self.members),
                               tuple(m.lora_A[name].weight.shape[0] for m in self.members),
                               *(m.lora_A[name].weight for m in self.members),
                               *(m.lora_B[name].weight for m in self.members))
        mine = dict(zip(self.members, outs))
        out = mine.pop(member)
        self.pending = (x, x._version, mine)
        return out

    def _weight(self) -> torch.Tensor | None:
        """The members' frozen weights as one tensor whose row blocks they are (made on first use, remade when a
        member's weight is no longer its view); None where they cannot be (different dtypes or devices, sharded)."""
        weights = [m.get_base_layer().weight for m in self.members]
        if self.hold and [w.data_ptr() for w in weights] == self.pointers:
            return self.weight
        if any(type(w) is not torch.nn.Parameter or w.requires_grad for w in weights) or \
                len({(w.dtype, w.device) for w in weights}) != 1:
            return None
        stacked = torch.cat([w.detach() for w in weights])
        if not self.hold:
            return stacked
        self.weight = stacked
        for w, view in zip(weights, stacked.split([w.shape[0] for w in weights])):
            w.data = view
        self.pointers = [w.data_ptr() for w in weights]
        return self.weight


def group(model, hold: bool = True) -> int:
    """Give every attention block whose q, k and v are fused LoRA layers one `Siblings`; returns the count.
    `hold`: False where something else owns the weights' storage between calls (FSDP2 gathers each block's weights
    for its forward and frees them after): the stacked weights are then made per call instead."""
    from ftcli.strategies.lora_fused import FusedLinear

    n = 0
    for module in model.modules():
        members = [getattr(module, name, None) for name in MEMBERS]
        if all(isinstance(m, FusedLinear) for m in members):
            siblings = Siblings(members, hold)
            for m in members:
                m.siblings = siblings
            module.register_forward_hook(siblings.drop)
            n += 1
    return n
