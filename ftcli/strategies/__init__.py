"""The strategy registry: name → (settings model, implementation). Adding a strategy is one line here."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ftcli.errors import UserError
from ftcli.strategies.base import Context, Strategy
from ftcli.strategies.bottleneck import Bottleneck, BottleneckParams
from ftcli.strategies.ewc import Ewc, EwcParams
from ftcli.strategies.frozen import Frozen, FrozenParams
from ftcli.strategies.full import Full, FullParams
from ftcli.strategies.hft import Hft, HftParams
from ftcli.strategies.lora import Dora, DoraParams, Lora, LoraParams, Qlora, QloraParams
from ftcli.strategies.si import Si, SiParams
from ftcli.strategies.peft_adapters import (Ia3, Ia3Params, Loha, LohaParams, Lokr, LokrParams, Oft, OftParams, Vera,
                                            VeraParams)

REGISTRY: dict[str, tuple[type, type[Strategy]]] = {
    "full": (FullParams, Full),
    "frozen": (FrozenParams, Frozen),
    "lora": (LoraParams, Lora),
    "dora": (DoraParams, Dora),
    "qlora": (QloraParams, Qlora),
    "hft": (HftParams, Hft),
    "ewc": (EwcParams, Ewc),
    "si": (SiParams, Si),
    "ia3": (Ia3Params, Ia3),
    "vera": (VeraParams, Vera),
    "loha": (LohaParams, Loha),
    "lokr": (LokrParams, Lokr),
    "oft": (OftParams, Oft),
    "bottleneck": (BottleneckParams, Bottleneck),
}

# The union a recipe's `strategy:` validates against, discriminated on `name`.
StrategyParams = Annotated[Union[tuple(params for params, _ in REGISTRY.values())], Field(discriminator="name")]


def get(params) -> Strategy:
    """The strategy object for validated settings (`recipe.strategy`)."""
    return REGISTRY[params.name][1](params)


def refuse_unsupported(strategy: Strategy, recipe=None) -> None:
    """A strategy that cannot run here, or cannot be sharded as the recipe asks (training.distributed: fsdp), or
    a watcher of the updates (training.keep_zeros, record_si) that cannot work with it, is refused before any
    weight is loaded, saying what is needed."""
    problem = strategy.unsupported()
    if problem:
        raise UserError(f"strategy {strategy.name}: {problem}")
    if recipe is None:
        return
    t = recipe.training
    if t.distributed == "fsdp":
        problem = strategy.unshardable()
        if problem:
            raise UserError(f"training.distributed fsdp with strategy {strategy.name}: {problem}")
    if t.keep_zeros and strategy.artifact == "adapter":
        raise UserError(f"training.keep_zeros: strategy {strategy.name} trains an adapter, whose ΔW is dense and "
                        "would fill the zeros when folded; use a strategy that trains the weights themselves "
                        "(full, frozen, hft, or ewc/si around them)")
    if t.distributed == "fsdp" and (t.keep_zeros or t.record_si):
        key = "training.keep_zeros" if t.keep_zeros else "training.record_si"
        raise UserError(f"{key} reads and writes whole weights after every update, which FSDP splits across "
                        "processes; use training.distributed: ddp")


__all__ = ["REGISTRY", "StrategyParams", "Strategy", "Context", "get", "refuse_unsupported"]
