"""`frozen`: train the last N transformer blocks and/or named modules; the rest is frozen."""

from __future__ import annotations

import fnmatch
import re
from typing import Literal

from pydantic import Field, model_validator

from ftcli.errors import UserError
from ftcli.strategies.base import Context, Params, Strategy

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class FrozenParams(Params):
    """Train the last N transformer blocks and/or parameters matching name patterns."""

    name: Literal["frozen"] = "frozen"
    last_n_blocks: int = Field(2, ge=0, description="train the last N transformer blocks")
    modules: list[str] = Field(
        default_factory=list,
        description="parameter-name patterns (fnmatch) to train too, e.g. 'model.norm.*' or 'lm_head.*'",
    )

    @model_validator(mode="after")
    def _something_trains(self) -> "FrozenParams":
        if self.last_n_blocks == 0 and not self.modules:
            raise ValueError("nothing would train: set last_n_blocks > 0 or list modules")
        return self


def block_index(param_name: str) -> int | None:
    """The transformer block a parameter belongs to (`...layers.7.mlp...` → 7), or None."""
    m = _BLOCK.search(param_name)
    return int(m.group(1)) if m else None


def num_blocks(model) -> int:
    return int(model.config.num_hidden_layers)


class Frozen(Strategy):
    name = "frozen"
    artifact = "model"

    def trainable_name(self, name: str, n_blocks: int) -> bool:
        p: FrozenParams = self.params
        idx = block_index(name)
        if idx is not None and idx >= n_blocks - p.last_n_blocks:
            return True
        return any(fnmatch.fnmatchcase(name, pat) for pat in p.modules)

    def trainable_names(self, names: list[str], n_blocks: int) -> list[str]:
        """Of the model's parameter `names`, those that train; the recipe's errors about this model raised here."""
        p: FrozenParams = self.params
        if p.last_n_blocks > n_blocks:
            raise UserError(f"strategy.last_n_blocks: {p.last_n_blocks} exceeds the model's {n_blocks} blocks")
        for pat in p.modules:
            if not any(fnmatch.fnmatchcase(name, pat) for name in names):
                example = ", ".join(sorted(names)[:3])
                raise UserError(f"strategy.modules: pattern {pat!r} matches no parameter (names look like {example})")
        return [name for name in names if self.trainable_name(name, n_blocks)]

    def prepare(self, model, ctx: Context):
        trains = set(self.trainable_names([name for name, _ in model.named_parameters()], num_blocks(model)))
        for name, param in model.named_parameters():
            param.requires_grad_(name in trains)
        return model

    def plan(self, shapes, recipe):
        from ftcli.shapes import Planned

        return Planned({n: shapes.tensors[n] for n in self.trainable_names(list(shapes.tensors), shapes.layers)})
