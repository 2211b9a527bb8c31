"""Synaptic Intelligence importance (Zenke et al. 2017, arXiv 1703.04200): the path integral a run records
(`training.record_si`), and reading it back for `strategy: si` (strategies/si.py).

While the run trains, for every trained weight θ_k

    ω_k = Σ_t −g_k(t) · Δθ_k(t)

with g(t) the gradient of the task loss at step t (before clipping, without a strategy's penalty: the paper's code
takes the unregularised gradient) and Δθ(t) the update the optimiser applied at that step: each weight's share of
the drop in the loss along the path training took. At the end of the run `importance.safetensors` in the run folder
holds, per weight, `omega.<name>` (ω) and `delta.<name>` (Δ = θ(end) − θ(start), the total change), and
`importance.json` the totals. A later run normalises by the total change,

    Ω_k = max(ω_k, 0) / (Δ_k² + ξ)

(ξ the damping; a negative ω, a weight whose moves raised the loss on balance, counts as unimportant rather than as a
reward for drifting away), and adds the Ω of the runs before it in a chain of tasks, as the paper does.

Recording keeps, per trained weight, the start, ω, and during the step the gradient and the weights before the update:
16 bytes per weight in fp32. A run with `optimizer: lomo` cannot record (it never holds a gradient).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FILE = "importance.safetensors"
SUMMARY = "importance.json"


class PathIntegral:
    """A Trainer watcher: `before_update` after the task's backward, `after_update` after the optimiser step."""

    def __init__(self, named_params):
        self.start = {n: p.detach().float().clone() for n, p in named_params}
        self.omega = {n: torch.zeros_like(t) for n, t in self.start.items()}
        self.steps = 0
        self._grad: dict = {}
        self._before: dict = {}

    def before_update(self, named_params) -> None:
        self._grad = {n: p.grad.detach().float().clone() for n, p in named_params if p.grad is not None}
        self._before = {n: p.detach().float().clone() for n, p in named_params if n in self._grad}

    def after_update(self, named_params) -> None:
        for n, p in named_params:
            if n in self._grad:
                self.omega[n].sub_(self._grad[n] * (p.detach().float() - self._before[n]))
        self._grad, self._before = {}, {}
        self.steps += 1

    # -- checkpoints and the run folder ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"si.omega.{n}": t for n, t in self.omega.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        for n in self.omega:
            self.omega[n].copy_(tensors[f"si.omega.{n}"])
        self.steps = steps

    def finish(self, run_dir: Path, named_params) -> None:
        """Write importance.safetensors (ω and Δ per weight) and importance.json into the run folder."""
        from safetensors.torch import save_file

        from ftcli import atomic

        tensors = {}
        for n, p in named_params:
            tensors[f"omega.{n}"] = self.omega[n].contiguous()
            tensors[f"delta.{n}"] = (p.detach().float() - self.start[n]).contiguous()
        with atomic.file(Path(run_dir) / FILE) as tmp:
            save_file(tensors, str(tmp))
        omega = torch.cat([t.flatten() for t in self.omega.values()])
        atomic.write_json(Path(run_dir) / SUMMARY, {
            "steps": self.steps, "weights": int(omega.numel()), "omega_sum": float(omega.sum()),
            "omega_positive_fraction": float((omega > 0).float().mean()),
            "delta_sq_mean": float(torch.cat([t.flatten() for k, t in tensors.items()
                                              if k.startswith("delta.")]).pow(2).mean()),
        })


def read(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ω, Δ) by parameter name, as a run recorded them."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(run_dir) / FILE))
    omega = {k.removeprefix("omega."): v for k, v in tensors.items() if k.startswith("omega.")}
    delta = {k.removeprefix("delta."): v for k, v in tensors.items() if k.startswith("delta.")}
    return omega, delta


def normalised(omega: dict, delta: dict, damping: float) -> dict[str, torch.Tensor]:
    """Ω = max(ω, 0) / (Δ² + ξ) per weight."""
    return {n: omega[n].clamp_min(0) / (delta[n].pow(2) + damping) for n in omega}


def recorded(run_dir: Path) -> bool:
    return (Path(run_dir) / FILE).is_file()


def summary(run_dir: Path) -> dict:
    f = Path(run_dir) / SUMMARY
    return json.loads(f.read_text()) if f.is_file() else {}
