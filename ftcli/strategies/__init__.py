"""The strategy registry: name → (settings model, implementation). Adding a strategy is one line here."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ftcli.strategies.base import Context, Strategy
from ftcli.strategies.frozen import Frozen, FrozenParams
from ftcli.strategies.full import Full, FullParams
from ftcli.strategies.lora import Lora, LoraParams

REGISTRY: dict[str, tuple[type, type[Strategy]]] = {
    "full": (FullParams, Full),
    "frozen": (FrozenParams, Frozen),
    "lora": (LoraParams, Lora),
}

# The union a recipe's `strategy:` validates against, discriminated on `name`.
StrategyParams = Annotated[Union[tuple(params for params, _ in REGISTRY.values())], Field(discriminator="name")]


def get(params) -> Strategy:
    """The strategy object for validated settings (`recipe.strategy`)."""
    return REGISTRY[params.name][1](params)


__all__ = ["REGISTRY", "StrategyParams", "Strategy", "Context", "get"]
