"""`hft`: Half Fine-Tuning (Hui et al. 2024, arXiv 2404.18466).

Every round, in every transformer block, half of the parameter matrices are frozen, by category: 2 of the 4
attention projections, 1 of the 2 norms, and of the 3 MLP projections 2 in one block and 1 in the next (the
parity alternates from a random start each round, so the whole model freezes half of its MLP matrices). The
choice is random, seeded by (seed, round), and re-drawn every round: `round_steps` optimiser steps, or one epoch.
Embeddings and the output head follow `embeddings`: `freeze` (never trained; the default, as the paper keeps
them frozen), `train` (always), or `half` (trained in odd rounds only).

Frozen parameters have requires_grad off for their round, so they get no gradient; AdamW skips a parameter whose
gradient is None entirely — no step, no weight decay, moments untouched. Weights that fit no category (biases of
other modules, extra norms of other architectures) train always and are listed in the run's strategy details.
The selection of every round is appended to `hft_rounds.jsonl` in the run folder and summarised in the report.
"""

from __future__ import annotations

import json
import random
import re
from typing import Literal

from pydantic import Field

from ftcli.strategies.base import Context, Params, Strategy
from ftcli.strategies.frozen import block_index

CATEGORIES = {  # category → (member module names, how many are frozen per block)
    "attention": (("q_proj", "k_proj", "v_proj", "o_proj"), 2),
    "norm": (("input_layernorm", "post_attention_layernorm"), 1),
    "mlp": (("gate_proj", "up_proj", "down_proj"), None),  # 2 or 1, alternating across blocks
}
_MODULE = re.compile(r"layers\.\d+\.(?:[a-z_]+\.)?([a-z_]+)\.(?:weight|bias)$")
_EMBEDDING = ("embed_tokens", "lm_head", "wte", "embed_out")


class HftParams(Params):
    """Half Fine-Tuning: half of each block's matrices frozen per round, re-drawn every round."""

    name: Literal["hft"] = "hft"
    round_steps: int | None = Field(None, ge=1, description="optimiser steps per round; null: one epoch")
    embeddings: Literal["freeze", "train", "half"] = Field(
        "freeze", description="embeddings and output head: never trained, always trained, or in odd rounds")
    seed: int | None = Field(None, description="selection seed; null: training.seed")


def module_of(name: str) -> str | None:
    m = _MODULE.search(name)
    return m.group(1) if m else None


def select(blocks: int, seed: int, round_: int) -> dict[int, list[str]]:
    """Block → the module names frozen in this round (a pure function of its arguments)."""
    rng = random.Random(f"hft/{seed}/{round_}")
    mlp_two_first = rng.random() < 0.5
    out = {}
    for b in range(blocks):
        frozen = []
        for cat, (members, k) in CATEGORIES.items():
            if k is None:
                k = 2 if (b % 2 == 0) == mlp_two_first else 1
            frozen += sorted(rng.sample(members, k))
        out[b] = frozen
    return out


class Hft(Strategy):
    name = "hft"
    artifact = "model"
    trainable_set_changes = True

    def __init__(self, params: HftParams):
        super().__init__(params)
        self.round: int | None = None
        self.round_steps = 1
        self.seed = 0
        self.blocks = 0
        self.run_dir = None
        self.frozen_now: dict[int, list[str]] = {}
        self.history: list[dict] = []

    def prepare(self, model, ctx: Context):
        p: HftParams = self.params
        self.seed = p.seed if p.seed is not None else ctx.recipe.training.seed
        self.blocks = int(model.config.num_hidden_layers)
        rows = len(ctx.train_data) if ctx.train_data is not None else 1
        self.round_steps = p.round_steps or ctx.recipe.total_steps(rows, ctx.processes)[1]
        self.run_dir = ctx.run_dir
        for name, param in model.named_parameters():
            param.requires_grad_(p.embeddings != "freeze" or not _is_embedding(name))
        self.always = [n for n, _ in model.named_parameters()
                       if block_index(n) is not None and module_of(n) not in _members()]
        self._apply(model, 0, record=False)  # on_step(1) records it (after a resume has restored the history)
        self.round = None
        return model

    def train_params(self, model):
        """Every parameter that trains in some round (the optimiser owns them all; frozen ones get no grad)."""
        p: HftParams = self.params
        return [(n, q) for n, q in model.named_parameters() if p.embeddings != "freeze" or not _is_embedding(n)]

    def on_step(self, step: int, model) -> None:
        round_ = (step - 1) // self.round_steps
        if round_ != self.round:
            self._apply(model, round_)

    def _apply(self, model, round_: int, record: bool = True) -> None:
        p: HftParams = self.params
        self.round = round_
        self.frozen_now = select(self.blocks, self.seed, round_)
        for name, param in model.named_parameters():
            b = block_index(name)
            if _is_embedding(name):
                train = p.embeddings == "train" or (p.embeddings == "half" and round_ % 2 == 1)
            elif b is not None and module_of(name) in _members():
                train = module_of(name) not in self.frozen_now[b]
            else:
                train = True
            param.requires_grad_(train)
            if not train:
                param.grad = None
        entry = {"round": round_, "from_step": round_ * self.round_steps + 1,
                 "frozen": {str(b): v for b, v in self.frozen_now.items()}}
        if record and not any(h["round"] == round_ for h in self.history):
            self.history.append(entry)
            if self.run_dir is not None:
                with open(self.run_dir / "hft_rounds.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

    def describe(self, model) -> dict:
        total = sum(q.numel() for _, q in model.named_parameters())
        frozen = sum(q.numel() for _, q in model.named_parameters() if not q.requires_grad)
        return {"round_steps": self.round_steps, "rounds": len(self.history), "seed": self.seed,
                "embeddings": self.params.embeddings, "frozen_fraction_last_round": round(frozen / max(total, 1), 4),
                "selection_file": "hft_rounds.jsonl", "always_trained": self.always[:20],
                "rounds_selected": self.history}

    def state_dict(self) -> dict:
        return {"round": self.round, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state.get("history", [])
        self.round = None  # on_step re-applies the (deterministic) selection of the resumed round


def _members() -> set[str]:
    return {m for members, _ in CATEGORIES.values() for m in members}


def _is_embedding(name: str) -> bool:
    return any(part in name for part in _EMBEDDING)
