"""The objective registry: name → (settings model, implementation). Adding an objective is one line here."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ftcli.objectives.base import Objective, ObjectiveParams
from ftcli.objectives.distill import Distill, DistillParams
from ftcli.objectives.dpo import Dpo, DpoParams
from ftcli.objectives.sft import Sft, SftParams

REGISTRY: dict[str, tuple[type, type[Objective]]] = {
    "sft": (SftParams, Sft),
    "dpo": (DpoParams, Dpo),
    "distill": (DistillParams, Distill),
}

# The union a recipe's `objective:` validates against, discriminated on `name`.
_members = tuple(params for params, _ in REGISTRY.values())
ObjectiveSettings = (Annotated[Union[_members], Field(discriminator="name")] if len(_members) > 1 else _members[0])


def get(params) -> Objective:
    """The objective object for validated settings (`recipe.objective`)."""
    return REGISTRY[params.name][1](params)


def of(params) -> type[Objective]:
    return REGISTRY[params.name][1]


__all__ = ["REGISTRY", "ObjectiveSettings", "Objective", "ObjectiveParams", "get", "of"]
