"""The one interface every objective implements: what the loop optimises (the strategy says what trains).

The loop knows only this: the data formats an objective trains on, how a micro-batch is collated, the loss of a
micro-batch as a sum (the loop divides it by the step's `count`, summed over every micro-batch of the step), the
metrics it reports beside the loss (sums too, divided by the same count), and what it needs besides the model
(`prepare`: a reference model, a teacher, or their outputs precomputed once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ftcli.vocab import SFT_FORMATS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ftcli.data import DataBundle
    from ftcli.data.batching import Batch
    from ftcli.strategies import Context


class ObjectiveParams(BaseModel):
    """Base of every objective's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def resolve_paths(self, fix) -> None:
        """Resolve the model paths among the settings (a teacher) with `fix`, as recipe.resolve_paths does
        base_model; default none."""


class Objective:
    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]] = SFT_FORMATS  # data formats it trains on; the first is the default
    metrics: ClassVar[tuple[str, ...]] = ()  # what `loss_sum` reports beside the loss (metrics.jsonl, report)
    count_name: ClassVar[str] = "trained_tokens"  # what `count` counts, as metrics.jsonl names it

    def __init__(self, params: ObjectiveParams):
        self.params = params

    # -- the interface ---------------------------------------------------------------------------------------
    def preflight(self, recipe, tokenizer) -> None:
        """Refuse what cannot work before any weight loads (a teacher with another tokenizer); `check` runs it."""

    def prepare(self, model: "torch.nn.Module", ctx: "Context", data: "DataBundle") -> None:
        """Build what the objective needs besides the model. Called once the strategy has prepared the model and
        before a resume restores trained weights, so `model` is still the untrained one here."""

    def collate(self, units: list, pad_id: int, packing: bool, pack_len: int) -> "Batch":
        from ftcli.data.batching import collate

        return collate(units, pad_id, packing, pack_len)

    def count(self, batch: "Batch") -> int:
        """What the step's loss is a mean over: trained tokens by default."""
        return batch.n_trained

    def loss_sum(self, model: "torch.nn.Module", batch: "Batch") -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        """(Σ of the loss over the batch, {metric: Σ over the batch}) — sums, divided by the step's count."""
        raise NotImplementedError

    def memory(self, *, total: int, strategy) -> dict[str, float]:
        """Bytes by part that the objective keeps besides the model (a reference copy, a teacher); default none."""
        return {}

    def notice(self, step: int, metrics: dict[str, float]) -> str | None:
        """A warning worth printing after optimiser step `step` (1-based), given its metrics; default none."""
        return None

    def describe(self) -> dict:
        """Facts for the report (the reference used, the teacher, caches); default nothing."""
        return {}

    # -- shared ------------------------------------------------------------------------------------------------
    def evaluate(self, model, units: list, *, batch_size: int, pad_id: int, packing: bool, pack_len: int,
                 autocast) -> dict[str, Any]:
        """The loss and metrics over `units` (validation), as means over `count`, without gradients."""
        import torch

        from ftcli.data.batching import eval_batches
        from ftcli.evaluate import eval_mode, model_device, to_device

        device = model_device(model)
        total, n, sums = 0.0, 0, {}
        with torch.no_grad(), eval_mode(model):
            for batch in eval_batches(units, batch_size, pad_id, packing, pack_len, collate=self.collate):
                batch = to_device(batch, device)
                with autocast():
                    loss, metrics = self.loss_sum(model, batch)
                total += float(loss)
                n += self.count(batch)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        n = max(n, 1)
        return {"loss": total / n, **{k: v / n for k, v in sums.items()}, "count": n}
