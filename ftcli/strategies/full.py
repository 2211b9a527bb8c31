"""`full`: every weight trains."""

from __future__ import annotations

from typing import Literal

from ftcli.strategies.base import Context, Params, Strategy


class FullParams(Params):
    """Train every weight."""

    name: Literal["full"] = "full"


class Full(Strategy):
    name = "full"
    artifact = "model"

    def prepare(self, model, ctx: Context):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def plan(self, shapes, recipe):
        from ftcli.shapes import Planned

        return Planned(dict(shapes.tensors))
