"""`sft`: supervised fine-tuning, the negative log-likelihood of the trained span (every assistant turn's content
and end-of-turn token; the whole text for completion rows), as a mean over every trained token of the step."""

from __future__ import annotations

from typing import Literal

from ftcli.objectives.base import Objective, ObjectiveParams


class SftParams(ObjectiveParams):
    """Next-token NLL of the trained span."""

    name: Literal["sft"] = "sft"


class Sft(Objective):
    name = "sft"

    def loss_sum(self, model, batch):
        from ftcli.loss import nll_sum

        return nll_sum(model, batch), {}

    def evaluate(self, model, units, *, batch_size, pad_id, packing, pack_len, autocast):
        from ftcli.evaluate import loss_metrics

        return loss_metrics(model, units, batch_size=batch_size, pad_id=pad_id, packing=packing, pack_len=pack_len,
                            autocast=autocast)
