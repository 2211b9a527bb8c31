"""A quadratic penalty that keeps weights near where they started, around an inner strategy: what `ewc` and `si`
share. loss += scale · Σᵢ wᵢ (θᵢ − θ*ᵢ)², θ* the weights when training starts and w a weight per parameter (EWC's
Fisher, SI's importance Ω). With a full-like inner strategy the penalty is on the trained weights themselves; with
a LoRA inner on the effective change of each adapted module, θ − θ* = ΔW = s·B·A, weighted by the w of that
module's base weight. Subclasses say what w is (`weights`) and what multiplies the sum (`scale`).
"""

from __future__ import annotations

import functools

from typing import Annotated, ClassVar, Union

from pydantic import Field

from ftcli.strategies.base import Context, Strategy
from ftcli.strategies.frozen import FrozenParams
from ftcli.strategies.full import FullParams
from ftcli.strategies.hft import HftParams
from ftcli.strategies.lora import LoraParams

InnerParams = Annotated[Union[FullParams, FrozenParams, HftParams, LoraParams], Field(discriminator="name")]


class Anchored(Strategy):
    anchor_label: ClassVar[str] = "penalty weights + anchor"

    def __init__(self, params):
        super().__init__(params)
        from ftcli import strategies

        self.inner = strategies.get(params.inner)
        self.artifact = self.inner.artifact
        self.adapter_off_is_base = self.inner.adapter_off_is_base
        self.trainable_set_changes = self.inner.trainable_set_changes
        self.activation_factor = self.inner.activation_factor
        self.terms: list = []  # (w, θ*, parameter) for full-like inners; (w, A, B, scale) for lora
        self.lora = params.inner.name == "lora"
        self.info: dict = {}

    # -- what a subclass says ---------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        raise NotImplementedError

    def weights(self, model, ctx: Context) -> dict:
        """w by parameter name of the base model (before the inner strategy wraps it)."""
        raise NotImplementedError

    # -- the interface ------------------------------------------------------------------------------------------
    def prepare(self, model, ctx: Context):
        from ftcli.models import is_classifier, language_model_view

        # a classifier (task: classification): the weights of its decoder as the base language model it starts as
        lm = language_model_view(model, ctx.recipe.base_model) if is_classifier(model) and not ctx.dry_run else model
        w = None if ctx.dry_run else self.weights(lm, ctx)
        model = self.inner.prepare(model, ctx)
        if w is not None:
            self.terms = self._lora_terms(model, w) if self.lora else self._full_terms(model, w)
            self.info["penalised_values"] = sum(t[0].numel() for t in self.terms)
        return model

    def train_params(self, model):
        return self.inner.train_params(model)

    def plan(self, shapes, recipe):
        return self.inner.plan(shapes, recipe)

    def unsupported(self):
        return self.inner.unsupported()

    def unshardable(self):
        return ("its penalty reads whole parameters (θ − θ*), which FSDP splits across processes; use "
                "training.distributed: ddp")

    def base_loading(self, *, for_export: bool = False) -> dict:
        return self.inner.base_loading(for_export=for_export)

    def memory(self, *, total, trainable, block_linear, recipe):
        out = self.inner.memory(total=total, trainable=trainable, block_linear=block_linear, recipe=recipe)
        # w for every base weight; full-like inners also keep θ* (a LoRA inner's anchor is ΔW = 0)
        out[self.anchor_label] = (total - trainable) * 4 if self.lora else total * 4 * 2
        return out

    def on_step(self, step: int, model) -> None:
        self.inner.on_step(step, model)

    def after_step(self, step: int, model) -> None:
        self.inner.after_step(step, model)

    def save(self, model, folder, state_dict=None) -> None:
        self.inner.save(model, folder, state_dict)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def extra_loss(self, model, batch):
        if not self.terms or self.scale == 0:
            return None
        penalty = lora_penalty if self.lora else weight_penalty
        return self.scale * sum(penalty(*term) for term in self.terms)

    # -- the penalised tensors ---------------------------------------------------------------------------------
    def _full_terms(self, model, w: dict) -> list:
        return [(w[name].to(p.device), p.detach().clone(), p) for name, p in self.inner.train_params(model)
                if name in w]

    def _lora_terms(self, model, w: dict) -> list:
        from peft.tuners.lora import LoraLayer

        terms = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                key = name.removeprefix("base_model.model.") + ".weight"
                if key in w:
                    terms.append((w[key], module.lora_A["default"].weight, module.lora_B["default"].weight,
                                  module.scaling["default"]))
        return terms


# -- the penalty's arithmetic ------------------------------------------------------------------------------------
# Written as autograd functions that keep nothing for the backward pass but the tensors they read: the plain
# expression (w * (p − θ*).pow(2)).sum() keeps p − θ* (or ΔW = s·B·A, a d×k matrix per module) alive from the
# start of the step, when the penalty is computed, to its backward at the end, one copy of every trained weight
# (full fine-tuning of the built-in model: 513 MB). Here the gradient recomputes the difference, one tensor at a
# time. Float32 throughout, whatever autocast says (the penalty is a sum of many small squares).


def weight_penalty(w, star, p):
    """Σ w·(p − θ*)²; its gradient with respect to p: 2·w·(p − θ*)."""
    return _functions()[0].apply(w, star, p)


def lora_penalty(w, a, b, scale: float):
    """Σ w·ΔW², ΔW = s·B·A; with G = 2·s²·w·(B·A) its gradients are Bᵀ·G for A and G·Aᵀ for B."""
    return _functions()[1].apply(w, a, b, float(scale))


@functools.cache
def _functions():
    """The two autograd functions, defined on first use (strategies are imported by `check`, which needs no
    torch). Their forward and backward run without autograd recording, so they work on the tensors directly."""
    import torch

    class WeightPenalty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, star, p):
            ctx.save_for_backward(w, star, p)
            with torch.autocast(p.device.type, enabled=False):
                return (p - star).square_().mul_(w).sum()

        @staticmethod
        def backward(ctx, g):
            w, star, p = ctx.saved_tensors
            return None, None, (p - star).mul_(w).mul_(2 * g)

    class LoraPenalty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, a, b, scale):
            ctx.save_for_backward(w, a, b)
            ctx.scale = scale
            with torch.autocast(a.device.type, enabled=False):
                return (b @ a).mul_(scale).square_().mul_(w).sum()

        @staticmethod
        def backward(ctx, g):
            w, a, b = ctx.saved_tensors
            with torch.autocast(a.device.type, enabled=False):
                G = (b @ a).mul_(w).mul_(2 * ctx.scale * ctx.scale * g)
                return None, b.t() @ G, G @ a.t(), None

    return WeightPenalty, LoraPenalty
