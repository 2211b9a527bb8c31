"""`dpo`: preference tuning on (prompt, chosen, rejected) pairs — DPO and its family.

Per pair, with π the summed log-probability of a completion's trained tokens under the policy and r under the
reference (h = (π_c − r_c) − (π_r − r_r)):

| loss | per pair | reference |
| --- | --- | --- |
| sigmoid | −(1−ε)·log σ(β·h) − ε·log σ(−β·h) (ε = label_smoothing; Rafailov et al. 2023, arXiv 2305.18290) | yes |
| ipo | (h̄ − 1/(2β))², h̄ from per-token mean log-probs (Azar et al., arXiv 2310.12036; as TRL computes it) | yes |
| hinge | max(0, 1 − β·h) (SLiC) | yes |
| simpo | −log σ(β·(π̄_c − π̄_r) − γ), π̄ the per-token mean log-probability (Meng et al., arXiv 2405.14734) | no |
| orpo | NLL̄_c − β·log σ(log odds_c − log odds_r), odds = p̄/(1−p̄), p̄ = exp(π̄) (Hong et al., arXiv 2403.07691) | no |

Rewards (logged): β·(π − r) with a reference; β·π̄ for simpo and orpo. Reward accuracy: chosen reward > rejected.
Log-prob accuracy: π_c > π_r, whether the model itself prefers the chosen completion (no reference involved).
The loss of a step is the mean over its pairs (the loop's count), so accumulation does not change it.

The reference (`reference:`): `adapter_off` — the policy with its adapter switched off (adapter strategies; no second
copy of the weights); `copy` — a frozen copy of the model as loaded (full, frozen, hft, ewc); `precompute` — the
reference log-probs of every pair computed once before training, cached on disk keyed by the reference model, the
precision and the pairs, and reused on resume; `auto` — adapter_off where the strategy has an adapter, else copy.
The reference is always the model the run starts from: a run whose base_model is an SFT run starts from (and
refers to) that SFT model, not the bare base.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from ftcli.errors import UserError
from ftcli.objectives.base import Objective, ObjectiveParams

WITH_REFERENCE = ("sigmoid", "ipo", "hinge")
REFERENCE_CACHE_VERSION = "1"
STUCK_AFTER = 10  # steps after which a reward margin still exactly 0 is worth a warning


class DpoParams(ObjectiveParams):
    """Preference tuning on (prompt, chosen, rejected) rows."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="β: the strength of the preference (orpo: the weight λ of its term)")
    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid: ε, the assumed rate of flipped labels")
    gamma: float | None = Field(None, ge=0, description="simpo: the target reward margin γ (null: 0.5)")
    reference: Literal["auto", "adapter_off", "copy", "precompute"] = Field(
        "auto", description="the reference model of sigmoid/ipo/hinge (see ftcli/objectives/dpo.py)")

    @model_validator(mode="after")
    def _keys_fit_the_loss(self) -> "DpoParams":
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss sigmoid, not {self.loss}")
        if self.gamma is not None and self.loss != "simpo":
            raise ValueError(f"gamma applies to loss simpo, not {self.loss}")
        return self


def pair_losses(p: DpoParams, c, r, n_c, n_r, ref_c=None, ref_r=None):
    """(loss per pair, chosen reward, rejected reward) from summed log-probs `c`, `r` of the chosen and rejected
    completions, their trained-token counts `n_c`, `n_r`, and the reference's summed log-probs."""
    import torch
    import torch.nn.functional as F

    beta = p.beta
    if p.loss in ("simpo", "orpo"):
        mc, mr = c / n_c, r / n_r
        if p.loss == "simpo":
            loss = -F.logsigmoid(beta * (mc - mr) - (0.5 if p.gamma is None else p.gamma))
        else:  # log odds = log p̄ − log(1 − p̄)
            log_odds = (mc - torch.log1p(-torch.exp(mc).clamp(max=1 - 1e-7))) - (
                mr - torch.log1p(-torch.exp(mr).clamp(max=1 - 1e-7)))
            loss = -mc - beta * F.logsigmoid(log_odds)
        return loss, beta * mc.detach(), beta * mr.detach()
    h_c, h_r = c - ref_c, r - ref_r
    if p.loss == "sigmoid":
        h = beta * (h_c - h_r)
        loss = -(1 - p.label_smoothing) * F.logsigmoid(h) - p.label_smoothing * F.logsigmoid(-h)
    elif p.loss == "ipo":
        loss = (h_c / n_c - h_r / n_r - 1 / (2 * beta)) ** 2
    else:  # hinge
        loss = torch.relu(1 - beta * (h_c - h_r))
    return loss, beta * h_c.detach(), beta * h_r.detach()


class Dpo(Objective):
    name = "dpo"
    formats = ("preference",)
    metrics = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp",
               "logp_accuracy")
    count_name = "pairs"

    def __init__(self, params: DpoParams):
        super().__init__(params)
        self.mode: str | None = None  # how the reference is computed, once prepared
        self.reference = None  # the frozen copy (mode copy)
        self.info: dict = {}

    def count(self, batch) -> int:
        return batch.n_sequences // 2

    # -- the reference ---------------------------------------------------------------------------------------
    def prepare(self, model, ctx, data) -> None:
        p: DpoParams = self.params
        if p.loss not in WITH_REFERENCE:
            self.info = {"reference": f"none ({p.loss} needs none)"}
            return
        off = ctx.strategy.adapter_off_is_base
        mode = p.reference if p.reference != "auto" else ("adapter_off" if off else "copy")
        if mode == "adapter_off" and not off:
            raise UserError(f"objective.reference: adapter_off needs an adapter strategy; strategy "
                            f"{ctx.strategy.name} trains the weights themselves (use copy or precompute)")
        self.mode = mode
        self.info = {"reference": mode, "of": ctx.recipe.base_model}
        if ctx.dry_run:
            return
        if mode == "copy":
            import copy

            self.reference = copy.deepcopy(model).eval()
            self.reference.requires_grad_(False)
        elif mode == "precompute":
            self._precompute(model, ctx, data)

    def _reference_sums(self, model, batch) -> torch.Tensor:
        import torch

        from ftcli.loss import sequence_logps

        if self.mode == "precompute":
            return torch.tensor([s.aux["ref_logp"] for s in batch.sequences], device=batch.input_ids.device)
        with torch.no_grad():
            if self.mode == "copy":
                from ftcli.evaluate import model_device

                if model_device(self.reference) != batch.input_ids.device:  # the policy moved after prepare
                    self.reference.to(batch.input_ids.device)
                return sequence_logps(self.reference, batch)[0]
            with model.disable_adapter():
                return sequence_logps(model, batch)[0]

    def _precompute(self, model, ctx, data) -> None:
        """Reference log-probs of every pair of every split, from the model as loaded (before any resume restores
        trained weights), with the adapter off where there is one; cached on disk by content."""
        import torch

        from contextlib import nullcontext

        from safetensors.torch import load_file, save_file

        from ftcli import atomic
        from ftcli.data.batching import eval_batches
        from ftcli.data.tokenize import pad_id
        from ftcli.evaluate import eval_mode, model_device, to_device
        from ftcli.loss import sequence_logps
        from ftcli.models import cache_root
        from ftcli.runtime import autocast as autocast_for

        r = ctx.recipe
        splits = [s for s in (data.train, data.validation) if s is not None]
        key = self._cache_key(ctx, splits)
        path = cache_root() / "dpo-reference" / f"{key}.safetensors"
        self.info.update({"cache": str(path), "cached": path.is_file()})
        if path.is_file():
            saved = load_file(str(path))
        else:
            device = model_device(model)
            autocast = autocast_for(r.training.precision, device.type)
            off = model.disable_adapter() if ctx.strategy.adapter_off_is_base else nullcontext()
            saved = {}
            ctx.log(f"dpo: reference log-probs of {sum(len(s) for s in splits)} pairs, once (cached in {path})")
            with torch.no_grad(), eval_mode(model), off:
                for split in splits:
                    for seqs in _sequences_in_batches(split.encoded, r.training.batch_size):
                        batch = to_device(self.collate(seqs, pad_id(ctx.tokenizer), r.data.packing, r.data.max_len),
                                          device)
                        with autocast():
                            sums = sequence_logps(model, batch)[0].float().cpu()
                        for enc, v in zip(batch.sequences, sums.tolist()):
                            enc.aux["ref_logp"] = v
                    saved[split.name] = torch.tensor([s.aux["ref_logp"] for u in split.encoded for s in u.sequences])
            with atomic.file(path) as tmp:
                save_file(saved, str(tmp))
        for split in splits:
            values = saved[split.name].tolist()
            for enc, v in zip((s for u in split.encoded for s in u.sequences), values):
                enc.aux["ref_logp"] = v

    def _cache_key(self, ctx, splits) -> str:
        from ftcli.models import fingerprint

        r = ctx.recipe
        h = hashlib.sha256(json.dumps({
            "v": REFERENCE_CACHE_VERSION, "model": fingerprint(r.base_model),
            "loading": ctx.strategy.base_loading(), "precision": r.training.precision,
        }, sort_keys=True).encode())
        for split in splits:
            h.update(split.name.encode())
            for unit in split.encoded:
                for s in unit.sequences:
                    h.update(json.dumps([s.input_ids, s.trained]).encode())
        return h.hexdigest()[:40]

    # -- the loss --------------------------------------------------------------------------------------------
    def loss_sum(self, model, batch):
        from ftcli.loss import sequence_logps

        p: DpoParams = self.params
        sums, counts = sequence_logps(model, batch)
        c, r, n_c, n_r = sums[0::2], sums[1::2], counts[0::2], counts[1::2]
        ref_c = ref_r = None
        if p.loss in WITH_REFERENCE:
            ref = self._reference_sums(model, batch).to(sums.dtype)
            ref_c, ref_r = ref[0::2], ref[1::2]
        losses, chosen_reward, rejected_reward = pair_losses(p, c, r, n_c, n_r, ref_c, ref_r)
        c, r = c.detach(), r.detach()
        return losses.sum(), {
            "reward_accuracy": (chosen_reward > rejected_reward).float().sum(),
            "reward_margin": (chosen_reward - rejected_reward).sum(),
            "chosen_reward": chosen_reward.sum(), "rejected_reward": rejected_reward.sum(),
            "chosen_logp": c.sum(), "rejected_logp": r.sum(),
            "logp_accuracy": (c > r).float().sum()}  # does the policy itself prefer chosen (summed log-prob)?

    def memory(self, *, total, strategy):
        p: DpoParams = self.params
        uses_copy = p.reference == "copy" or (p.reference == "auto" and not strategy.adapter_off_is_base)
        return {"DPO reference copy": total * 4} if p.loss in WITH_REFERENCE and uses_copy else {}

    def notice(self, step: int, metrics: dict) -> str | None:
        if step == STUCK_AFTER and self.params.loss in WITH_REFERENCE and metrics.get("reward_margin") == 0.0:
            return (f"dpo: the reward margin is still exactly 0 after {step} steps: the policy has not moved from "
                    "the reference (is the learning rate 0, or does nothing train?)")
        return None

    def describe(self) -> dict:
        p: DpoParams = self.params
        return {"loss": p.loss, "beta": p.beta, **({"label_smoothing": p.label_smoothing} if p.loss == "sigmoid"
                                                  else {}), **({"gamma": 0.5 if p.gamma is None else p.gamma} if p.loss == "simpo" else {}),
                **self.info}


def _sequences_in_batches(units: list, batch_size: int):
    for s in range(0, len(units), batch_size):
        yield units[s : s + batch_size]
