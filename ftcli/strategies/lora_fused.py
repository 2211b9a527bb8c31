"""A fused LoRA linear layer for training: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with the adapter accumulated in place.

PEFT's LoRA layer computes the adapter's output as a tensor of its own, scales it into a second one and adds that
to the base output (a third); autograd walks the same chain back. Here the adapter's product is added into the
base output in place (`addmm_`, alpha s) and the backward pass is written out: dX = dY·W + s·(dY·B)·A (in place
too), dB = s·dYᵀ·(X·Aᵀ), dA = s·(dY·B)ᵀ·X. With dropout p (training only), as PEFT does it, the input of A is
X' = X ⊙ M/(1−p) for one Bernoulli mask M per call (the base product sees X unchanged): X'·Aᵀ replaces X·Aᵀ, X'
replaces X in dA, and the adapter's part of dX is masked: s·((dY·B)·A) ⊙ M/(1−p). The mask is drawn on the
input in its own dtype, as PEFT's nn.Dropout does, but on the CPU by ftcli's counter-based generator
(strategies/dropout.py: ≈ 4× faster than torch's, other draws for the same seed). PEFT offers no such path;
measured on the built-in model (LoRA r=16 on every linear layer, one 456-token packed row, forward + backward,
15 alternating repetitions in one process): median 2.95 s with PEFT's layer, 2.82 s with this one (−4.4%).

`FusedLinear` is a PEFT LoRA `Linear` (same parameters, names, saving and loading) that PEFT itself creates,
through its custom-module mapping (`LoraConfig._register_custom_module`, PEFT's documented, experimental way to
supply LoRA layers). It takes the fused path only where it computes what PEFT's layer computes: one active
adapter, not merged, no DoRA or other variant, a plain float `nn.Linear` base, no extra arguments (dropout or not).
Under autocast (`training.precision: bf16`) every product runs in bf16, as autocast would run PEFT's layer; the
frozen base weight may be stored in bf16 already (lora.py), which saves the cast per call and half its memory.
Anything else goes through PEFT's own forward. tests/test_strategies.py compares the two. While training, the q, k
and v layers of one attention block compute together where they can (lora_siblings.py, `siblings`).

`strategy.fp32_branch: true` keeps only the base product in bf16: X·Aᵀ, its product with Bᵀ, the layer's output
(base product + adapter, which bf16 would round at the scale of the whole output) and the adapter's gradients
(from the float32 dY) are float32. On the built-in model the validation loss of a bf16 run then lands within
fp32's seed spread instead of 0.0022–0.0030 above it, at the same speed and ≈ 0.3 GB more peak RSS; but the
last-bit differences between the adapters of runs on different numbers of processes reach the residual stream
and part their losses at bf16's scale (9.8e-5 on issue 8's check, 6.8e-7 without), so it is not the default
(docs/benchmarks.md, "bf16 LoRA's validation loss against fp32's seed spread").
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLinear

from ftcli.strategies.dropout import dropout


class _LoraLinear(torch.autograd.Function):
    """The base product in `dtype`: the parameters' dtype, or autocast's (bf16) with the frozen weight stored in it
    or cast per call, as autocast would. The adapter's branch in `dtype` too, or in float32 with `fp32_branch`
    (below); its gradients are summed in float32 at least either way."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, dtype: torch.dtype, p: float = 0.0,
                fp32_branch: bool = False):
        branch = torch.promote_types(dtype, torch.float32) if fp32_branch else dtype
        x2 = x.reshape(-1, x.shape[-1])
        xin, mask = x2, None
        if p > 0:  # A's input dropped out as PEFT's nn.Dropout does it: in x's own dtype, one mask
            xin, mask = dropout(x2, p)
        xin = xin.to(branch)
        xb = xin if xin.dtype == dtype and mask is None else x2.to(dtype)  # one cast of X where one is enough
        weight, a, b = weight.to(dtype), a.to(branch), b.to(branch)
        with torch.autocast(x.device.type, enabled=False):
            xa = xin @ a.t()  # [tokens, r]
            y = xb @ weight.t() if bias is None else torch.addmm(bias.to(dtype), xb, weight.t())
            y = y.to(branch).addmm_(xa, b.t(), alpha=scale)  # in place: the base output is ours alone
        ctx.save_for_backward(xin, xa, weight, a, b, mask)
        ctx.scale, ctx.x_shape, ctx.p = scale, x.shape, p
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xin, xa, weight, a, b, mask = ctx.saved_tensors
        s, branch = ctx.scale, xin.dtype
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            dyr = dy2.to(branch)
            dyb = dyr @ b  # [tokens, r]
            dx = None
            if ctx.needs_input_grad[0]:
                dx = ((dyr if branch == weight.dtype else dy2.to(weight.dtype)) @ weight).to(branch)
                if mask is None:
                    dx.addmm_(dyb, a, alpha=s)
                else:
                    dx.add_((dyb @ a).mul_(mask).mul_(s / (1 - ctx.p)))
                dx = dx.view(ctx.x_shape)
            # The adapter's gradients are sums over every token. Under autocast they are summed in float32 from
            # the bf16 operands of the forward (X or its dropped-out copy, X·Aᵀ, dY, dY·B), never rounded to
            # bf16 as autocast's own product rounds them: a product of two bf16 numbers is exact in float32,
            # so a batch's gradient is the sum of its parts' to float32 rounding whatever the order, and
            # several processes end where one does (issue 8). The price: the casts of X and dY and float32 thin
            # products, ≈ 3% of a bf16 LoRA step on the built-in model (docs/benchmarks.md).
            acc = torch.promote_types(branch, torch.float32)
            da = (dyb.t().to(acc) @ xin.to(acc)).mul_(s) if ctx.needs_input_grad[3] else None
            db = (xa.t().to(acc) @ dyr.to(acc)).mul_(s).t() if ctx.needs_input_grad[4] else None  # (X·Aᵀ)ᵀ·dY, ᵀ
        return dx, None, None, da, db, None, None, None, None


class FusedLinear(PeftLinear):
    """PEFT's LoRA Linear with a fused training path (see the module docstring)."""

    fp32_branch = False  # strategy.fp32_branch (lora.py sets it on every fused layer of the model)
    siblings = None  # lora_siblings.Siblings: q, k and v of one attention block computed together

    def _fused_adapter(self) -> str | None:
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.get_base_layer()
        if (name not in self.lora_A or self.use_dora.get(name) or getattr(self, "lora_variant", {}).get(name)
                or not isinstance(self.lora_dropout[name], (torch.nn.Identity, torch.nn.Dropout))
                or type(base) is not torch.nn.Linear):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter() if not args and not kwargs else None
        dtype = compute_dtype(x, self.lora_A[name].weight) if name is not None else None
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        if self.siblings is not None and self.training:
            out = self.siblings.output(self, x, name, dtype)
            if out is not None:
                return out
        base = self.get_base_layer()
        return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 float(self.scaling[name]), dtype, self.dropout_p(name), self.fp32_branch)

    def dropout_p(self, name: str) -> float:
        """The adapter's dropout probability as this call applies it (0 outside training)."""
        drop = self.lora_dropout[name]
        return float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0


def compute_dtype(x: torch.Tensor, adapter_weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the layer computes in: autocast's where it is on for x's device, else the adapter's when x has it;
    None (PEFT's path) for anything else."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return adapter_weight.dtype if x.dtype == adapter_weight.dtype else None
