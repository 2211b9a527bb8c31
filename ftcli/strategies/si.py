"""`si`: Synaptic Intelligence (Zenke et al. 2017, arXiv 1703.04200) around another strategy.

A run that trained task 1 with `training.record_si: true` wrote its path integral ω and total change Δ per weight
(ftcli/importance.py). A later run that continues from it (`base_model:` that run) penalises changing what mattered
for task 1:

    loss += c · Σᵢ Ωᵢ (θᵢ − θ*ᵢ)²,   Ωᵢ = max(ωᵢ, 0) / (Δᵢ² + ξ)

θ* the weights task 1 ended with (the model this run starts from). In a chain of tasks Ω adds up: a `from_run` that
was itself an si run contributes its own Ω plus that of the run it continued from, as the paper consolidates. With
`normalize` (default) Ω is divided by its mean, so `c` means the same on any model (as ewc's fisher_normalize).
Penalised: the inner strategy's trained weights that have a recorded importance (full, frozen, hft), or for a LoRA
inner the ΔW of each adapted module weighted by its base weight's Ω, as ewc does. The importance must be of the
weights themselves: a run that trained a LoRA adapter recorded the adapter's path integral, not the base weights'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ftcli.errors import UserError
from ftcli.strategies.base import Context, Params
from ftcli.strategies.full import FullParams
from ftcli.strategies.penalty import Anchored, InnerParams


class SiParams(Params):
    """SI penalty around an inner strategy (full, frozen, hft or lora), from a run that recorded its importance."""

    name: Literal["si"] = "si"
    inner: InnerParams = Field(default_factory=FullParams, description="the strategy that trains: full, frozen, hft, lora")
    from_run: str | None = Field(None, description="the run (trained with training.record_si) whose task to protect; "
                                                   "null: base_model, which must be that run")
    c: float = Field(1.0, ge=0, description="penalty strength c")
    damping: float = Field(1e-3, gt=0, description="ξ in Ω = ω / (Δ² + ξ) (the paper's value)")
    normalize: bool = Field(True, description="divide Ω by its mean so c is comparable across models")

    def resolve_paths(self, fix_model) -> None:
        if self.from_run:
            self.from_run = fix_model(self.from_run)


class Si(Anchored):
    name = "si"
    anchor_label = "SI importance + anchor"

    @property
    def scale(self) -> float:
        return self.params.c

    def prepare(self, model, ctx: Context):
        self.source = source_run(self.params, ctx.recipe.base_model)  # checked in `ftcli check` too
        return super().prepare(model, ctx)

    def plan(self, shapes, recipe):
        source_run(self.params, recipe.base_model)  # what `prepare` checks first
        return super().plan(shapes, recipe)

    def weights(self, model, ctx: Context) -> dict:
        import torch

        omega = consolidated(self.source, self.params.damping)
        names = {n for n, _ in model.named_parameters()}
        if not names & set(omega):
            raise UserError(f"strategy.from_run {self.source}: its recorded importance names none of this model's "
                            "weights (a run that trained an adapter records the adapter's path integral); record it "
                            "with a strategy that trains the weights themselves (full, frozen, hft)")
        flat = torch.cat([v.flatten() for v in omega.values()])
        self.info.update({"from_run": str(self.source), "importance_mean_raw": float(flat.mean()),
                          "importance_nonzero_fraction": float((flat > 0).float().mean())})
        if self.params.normalize:
            mean = flat.mean().clamp_min(1e-30)
            omega = {k: v / mean for k, v in omega.items()}
        return omega

    def describe(self, model) -> dict:
        return {"inner": self.params.inner.name, "c": self.params.c, "damping": self.params.damping, **self.info,
                "inner_details": self.inner.describe(model)}


def source_run(params: SiParams, base_model: str) -> Path:
    """The run whose importance the penalty uses: `from_run`, which must be the base model (its weights are θ*)."""
    from ftcli import importance
    from ftcli.run_folder import RunFolder

    base = Path(base_model).expanduser()
    run = Path(params.from_run).expanduser() if params.from_run else base
    if not RunFolder.holds_run(run):
        raise UserError(f"strategy si: {run} is not a run folder; set strategy.from_run (or base_model) to the run "
                        "that trained the earlier task with training.record_si: true")
    if not importance.recorded(run):
        raise UserError(f"strategy si: {run} has no {importance.FILE}; train the earlier task with "
                        "training.record_si: true")
    if params.from_run and base.resolve() not in (run.resolve(), (run / RunFolder(run).kind).resolve()
                                                  if RunFolder(run).kind else run.resolve()):
        raise UserError(f"strategy.from_run {run}: base_model is {base_model}, but SI anchors to the weights that run "
                        f"ended with; set base_model: {run}")
    return run


def consolidated(run: Path, damping: float, depth: int = 0) -> dict:
    """Ω of `run`, plus that of the runs before it when it was itself an si run (a chain of tasks)."""
    from ftcli import importance
    from ftcli.run_folder import RunFolder

    omega, delta = importance.read(run)
    total = importance.normalised(omega, delta, damping)
    strategy = RunFolder(run).recipe.strategy
    if isinstance(strategy, SiParams) and depth < 64:
        earlier = consolidated(source_run(strategy, RunFolder(run).recipe.base_model), damping, depth + 1)
        for k, v in earlier.items():
            total[k] = total[k] + v if k in total else v
    return total
