"""The one interface every strategy implements, and the context it is given.

The training loop knows only this interface: `prepare` freezes/wraps the model, `train_params` names what the
optimiser updates, `extra_loss` adds a term to the loss (EWC), `on_step` runs before each optimiser step (HFT
rounds), `save` writes the artifact (PEFT adapter or a transformers model folder). What differs in how a base is
loaded (4-bit for qlora), what the strategy costs in memory, and whether switching the adapter off gives back the
untrained model (a DPO reference without a second copy) is the strategy's to say too, so no module outside
`strategies/` asks for a strategy by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ftcli.recipe import Recipe
    from ftcli.shapes import Planned, WeightShapes


class Params(BaseModel):
    """Base of every strategy's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def resolve_paths(self, fix_model) -> None:
        """Make the models or runs these settings name absolute with `fix_model` (as the recipe's base_model)."""


@dataclass
class Context:
    """What a strategy may look at while preparing: the recipe, the tokenizer, where the run lives."""

    recipe: "Recipe"
    tokenizer: Any = None
    run_dir: Path | None = None
    train_data: Any = None  # ftcli.data.Split of the training rows, for strategies that need data (EWC)
    log: Any = print  # a function taking one string, for strategy messages (Fisher progress, HFT rounds)
    dry_run: bool = False  # `ftcli check`: a weightless (meta) model; skip work that needs real weights or data
    strategy: Any = None  # the run's strategy (objectives ask it how to get a reference model)
    processes: int = 1  # processes sharing the run (each optimiser step takes batch × accumulation × processes rows)


class Strategy:
    """Default behaviour shared by all strategies; each subclass overrides what defines it."""

    name: ClassVar[str]
    artifact: ClassVar[str] = "model"  # "adapter" (PEFT layout) or "model" (transformers folder)
    adapter_off_is_base: ClassVar[bool] = False  # True: with the adapter switched off the model is the base
    trainable_set_changes: ClassVar[bool] = False  # True: which parameters train changes during the run (hft rounds)
    # activations a pass keeps for backward, against a plain or fused-LoRA model's (`ftcli check`'s estimate)
    activation_factor: ClassVar[float] = 1.0

    def __init__(self, params: Params):
        self.params = params

    # -- the interface ---------------------------------------------------------------------------------
    def unsupported(self) -> str | None:
        """Why this strategy cannot run on this machine (checked before any weight loads), or None."""
        return None

    def unshardable(self) -> str | None:
        """Why FSDP cannot shard this strategy's model (training.distributed: fsdp), or None; checked before any
        weight loads."""
        return None

    def base_loading(self, *, for_export: bool = False) -> dict:
        """Keyword arguments for `models.load_model` that load the base as this strategy trains it (qlora: 4-bit);
        `for_export`: the base an adapter is folded into (float32 products)."""
        return {}

    def memory(self, *, total: int, trainable: int, block_linear: int, recipe: "Recipe") -> dict[str, float]:
        """Bytes by part that depend on the strategy: the weights as stored, plus anything it keeps (EWC's Fisher).
        `block_linear`: elements of the blocks' linear weights (what quantisation or bf16 storage shrinks)."""
        return {"weights": total * 4}

    def plan(self, shapes: "WeightShapes", recipe: "Recipe") -> "Planned | None":
        """What this strategy would train on the model of `shapes` (`ftcli/shapes.py`: names and shapes read from
        its files), with the errors `prepare` would raise about the model; None: not known without building the
        model (`ftcli check` then builds a weightless one). Must agree with `prepare` (tests/test_shapes.py)."""
        return None

    def unfoldable(self) -> str | None:
        """Why the trained adapter cannot be folded into the base's weights (export, a run used as a base), or None."""
        return None

    def prepare(self, model: "torch.nn.Module", ctx: Context) -> "torch.nn.Module":
        raise NotImplementedError

    def train_params(self, model: "torch.nn.Module") -> list[tuple[str, "torch.nn.Parameter"]]:
        """(name, parameter) pairs the optimiser owns. Default: those that require a gradient."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def extra_loss(self, model: "torch.nn.Module", batch: Any) -> "torch.Tensor | None":
        return None

    def on_step(self, step: int, model: "torch.nn.Module") -> None:
        """Called before optimiser step `step` (1-based) is computed."""

    def after_step(self, step: int, model: "torch.nn.Module") -> None:
        """Called after optimiser step `step` (1-based) is applied (hft: frozen expert slices put back)."""

    def save(self, model: "torch.nn.Module", folder: Path, state_dict: dict | None = None) -> None:
        """Write the trained artifact to `folder` (which does not exist yet). `state_dict`: the model's whole state
        when its parameters are sharded across processes (FSDP), gathered from every rank; None: the model's own."""
        from ftcli.models import save_model_folder

        save_model_folder(model, folder, state_dict=state_dict)

    def describe(self, model: "torch.nn.Module") -> dict:
        """Facts for the report (HFT rounds, EWC penalty); default nothing."""
        return {}

    def state_dict(self) -> dict:
        """Strategy state a checkpoint must hold so that resume is exact (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
