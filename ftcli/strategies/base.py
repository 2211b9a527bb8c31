"""The one interface every strategy implements, and the context it is given.

The training loop knows only this interface: `prepare` freezes/wraps the model, `train_params` names what the
optimiser updates, `extra_loss` adds a term to the loss (EWC), `on_step` runs before each optimiser step (HFT
rounds), `save` writes the artifact (PEFT adapter or a transformers model folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ftcli.recipe import Recipe


class Params(BaseModel):
    """Base of every strategy's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class Context:
    """What a strategy may look at while preparing: the recipe, the tokenizer, where the run lives."""

    recipe: "Recipe"
    tokenizer: Any = None
    run_dir: Path | None = None
    train_data: Any = None  # ftcli.data.Split of the training rows, for strategies that need data (EWC)
    log: Any = print  # a function taking one string, for strategy messages (Fisher progress, HFT rounds)
    dry_run: bool = False  # `ftcli check`: a weightless (meta) model; skip work that needs real weights or data
    extras: dict = field(default_factory=dict)


class Strategy:
    """Default behaviour shared by all strategies; each subclass overrides what defines it."""

    name: ClassVar[str]
    artifact: ClassVar[str] = "model"  # "adapter" (PEFT layout) or "model" (transformers folder)
    quantization: ClassVar[str | None] = None  # "nf4" for qlora: models.load_base quantises the base

    def __init__(self, params: Params):
        self.params = params

    # -- the interface ---------------------------------------------------------------------------------
    def prepare(self, model: "torch.nn.Module", ctx: Context) -> "torch.nn.Module":
        raise NotImplementedError

    def train_params(self, model: "torch.nn.Module") -> list[tuple[str, "torch.nn.Parameter"]]:
        """(name, parameter) pairs the optimiser owns. Default: those that require a gradient."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def extra_loss(self, model: "torch.nn.Module", batch: Any) -> "torch.Tensor | None":
        return None

    def on_step(self, step: int, model: "torch.nn.Module") -> None:
        """Called before optimiser step `step` (1-based) is computed."""

    def save(self, model: "torch.nn.Module", folder: Path) -> None:
        """Write the trained artifact to `folder` (which does not exist yet)."""
        from ftcli.models import save_model_folder

        save_model_folder(model, folder)

    def describe(self, model: "torch.nn.Module") -> dict:
        """Facts for the report (HFT rounds, EWC penalty); default nothing."""
        return {}

    def state_dict(self) -> dict:
        """Strategy state a checkpoint must hold so that resume is exact (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
