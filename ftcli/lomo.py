"""LOMO's optimiser (Lv et al. 2023, arXiv 2306.09782): SGD fused into the backward pass through gradient hooks.
How it is chosen, clipped and refused is said in ftcli/optimizers.py (`training.optimizer: lomo`)."""

from __future__ import annotations

import math

import torch


class Lomo(torch.optim.Optimizer):
    """SGD fused into backward (LOMO). A torch optimiser so that the schedule sets its `lr` and checkpoints hold it
    (it has no state); `step()` does nothing, the update happened in `fused_backward`."""

    def __init__(self, groups, lr: float, max_grad_norm: float | None = None):
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0})
        self.max_grad_norm = max_grad_norm
        self.last_norm: float | None = None
        self._measuring = False
        self._square = torch.zeros(())
        self._scale = 1.0
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(group))
                         for group in self.param_groups for p in group["params"]]

    def _hook(self, group):
        def hook(p: torch.Tensor) -> None:
            grad, p.grad = p.grad, None  # the gradient lives only while it is applied
            if self._measuring:
                self._square += grad.detach().float().pow(2).sum().cpu()
                return
            with torch.no_grad():
                lr = group["lr"]
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])  # SGD with L2: the same as decoupled decay
                p.add_(grad.to(p.dtype), alpha=-lr * self._scale)

        return hook

    def fused_backward(self, loss: torch.Tensor, backward) -> None:
        """One optimiser step: with `max_grad_norm` a first backward (the graph kept) measures the whole gradient's
        norm, the second applies the update scaled by min(1, max_norm / norm), as LOMO clips. A non-finite norm
        applies nothing."""
        self._scale, self.last_norm = 1.0, None
        if self.max_grad_norm:
            self._measuring, self._square = True, torch.zeros(())
            try:
                backward(loss, retain_graph=True)
            finally:
                self._measuring = False
            norm = float(self._square.sqrt())
            self.last_norm = norm
            if not math.isfinite(norm):
                return
            self._scale = min(1.0, self.max_grad_norm / (norm + 1e-6))
        backward(loss)

    @torch.no_grad()
    def step(self, closure=None):
        return None

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
