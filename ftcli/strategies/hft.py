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

Mixture-of-experts blocks: every expert is an MLP of its own, so the MLP rule applies within each expert: of its
gate, up and down matrices 2 are frozen in one expert and 1 in the next (alternating from a random start per block
and round), a shared expert taking its turn after the routed ones. Routed experts live as slices of 3-D tensors
(ftcli/moe.py), so freezing a slice cannot be requires_grad: a gradient hook zeroes the frozen slices' gradients,
and after every optimiser step the frozen slices are put back to their values at the start of the round (AdamW's
moments of earlier rounds and weight decay would move them otherwise). That copy of the frozen slices costs about
half of the experts' weights in memory. The router trains always (it fits no category) and is listed as such.
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


_SHARED = re.compile(r"\.shared_experts?\.([a-z_]+)\.(?:weight|bias)$")


def module_of(name: str) -> str | None:
    m = _MODULE.search(name)
    return m.group(1) if m else None


def shared_member(name: str) -> str | None:
    """gate_proj / up_proj / down_proj of a shared expert's weight, else None."""
    m = _SHARED.search(name)
    return m.group(1) if m and m.group(1) in CATEGORIES["mlp"][0] else None


def select_experts(experts: dict[int, int], seed: int, round_: int) -> dict[int, dict[int, list[str]]]:
    """Block → expert → its frozen members (gate/up/down) in this round: 2 and 1 alternating over the block's
    experts from a random start (index `experts[b]` is the shared expert, when the block has one). A pure function
    of its arguments, drawn apart from `select` so dense blocks draw the same as without experts."""
    from ftcli.moe import EXPERT_MEMBERS

    rng = random.Random(f"hft/{seed}/{round_}/experts")
    out = {}
    for b in sorted(experts):
        two_first = rng.random() < 0.5
        out[b] = {e: sorted(rng.sample(EXPERT_MEMBERS, 2 if (e % 2 == 0) == two_first else 1))
                  for e in range(experts[b])}
    return out


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
        self.slices: list = []  # moe.expert_matrices: (parameter, block, expert, member, index)
        self.shared: dict[int, int] = {}  # block → the shared expert's index (after the routed ones)
        self.masks: dict[str, object] = {}  # expert parameter → bool tensor, True where frozen this round
        self.saved: dict[str, object] = {}  # expert parameter → its frozen values at the round's start
        self.dry_run = False
        self.present: dict[int, set] = {}

    def prepare(self, model, ctx: Context):
        p: HftParams = self.params
        self.seed = self._seed(ctx.recipe)
        self.blocks = int(model.config.num_hidden_layers)
        rows = ctx.train_data.epoch_size if ctx.train_data is not None else 1
        self.round_steps = p.round_steps or ctx.recipe.total_steps(rows, ctx.processes)[1]
        self.run_dir = ctx.run_dir
        self.dry_run = ctx.dry_run
        for name, param in model.named_parameters():
            param.requires_grad_(p.embeddings != "freeze" or not _is_embedding(name))
        from ftcli.moe import expert_matrices

        self.present = {}  # block → the category members it has (an MoE block has no dense MLP)
        for n, _ in model.named_parameters():
            if block_index(n) is not None and module_of(n) in _members():
                self.present.setdefault(block_index(n), set()).add(module_of(n))
        self.slices = expert_matrices(model)
        routed = self._routed()
        self.shared = {block_index(n): routed.get(block_index(n), 0) for n, _ in model.named_parameters()
                       if shared_member(n)}
        params = dict(model.named_parameters())
        for name in {s[0] for s in self.slices}:
            params[name].register_hook(lambda g, name=name: g.masked_fill(self.masks[name], 0)
                                       if name in self.masks else g)
        sliced = {s[0] for s in self.slices}
        self.always = [n for n, _ in model.named_parameters()
                       if block_index(n) is not None and module_of(n) not in _members() and not shared_member(n)
                       and n not in sliced]
        self._apply(model, 0, record=False)  # on_step(1) records it (after a resume has restored the history)
        self.round = None
        return model

    def plan(self, shapes, recipe):
        """Round 0 as `prepare` leaves it, and every matrix of some round for the optimiser (dense blocks: the
        files' plan refuses mixtures of experts)."""
        from ftcli.shapes import Planned

        p: HftParams = self.params
        frozen = select(shapes.layers, self._seed(recipe), 0)
        owned = {n: s for n, s in shapes.tensors.items() if p.embeddings != "freeze" or not _is_embedding(n)}
        return Planned({n: s for n, s in owned.items() if trains(n, frozen, 0, p.embeddings)}, owned=owned)

    def _seed(self, recipe) -> int:
        return self.params.seed if self.params.seed is not None else recipe.training.seed

    def train_params(self, model):
        """Every parameter that trains in some round (the optimiser owns them all; frozen ones get no grad)."""
        p: HftParams = self.params
        return [(n, q) for n, q in model.named_parameters() if p.embeddings != "freeze" or not _is_embedding(n)]

    def on_step(self, step: int, model) -> None:
        round_ = (step - 1) // self.round_steps
        if round_ != self.round:
            self._apply(model, round_)

    def after_step(self, step: int, model) -> None:
        """Put the frozen expert slices back (see the module docstring)."""
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].masked_scatter_(mask, self.saved[name])

    def _apply(self, model, round_: int, record: bool = True) -> None:
        import torch

        p: HftParams = self.params
        self.round = round_
        self.frozen_now = {b: [m for m in names if m in self.present.get(b, ())]
                           for b, names in select(self.blocks, self.seed, round_).items()}
        routed = self._routed()
        experts = {b: routed.get(b, 0) + (b in self.shared) for b in set(routed) | set(self.shared)}
        frozen_experts = select_experts(experts, self.seed, round_)
        params = dict(model.named_parameters())
        for name, param in params.items():
            if shared_member(name):
                b = block_index(name)
                train = shared_member(name).removesuffix("_proj") not in frozen_experts[b][self.shared[b]]
            else:
                train = trains(name, self.frozen_now, round_, p.embeddings)
            param.requires_grad_(train)
            if not train:
                param.grad = None
        self.masks, self.saved = {}, {}
        for name, b, e, member, index in self.slices:
            if member in frozen_experts[b][e]:
                if name not in self.masks:
                    self.masks[name] = torch.zeros(params[name].shape, dtype=torch.bool, device=params[name].device)
                self.masks[name][index] = True
        if not self.dry_run:
            self.saved = {n: params[n].detach()[m].clone() for n, m in self.masks.items()}
        for b, per_expert in frozen_experts.items():
            self.frozen_now[b] = self.frozen_now[b] + [
                f"{'shared_expert' if e == self.shared.get(b) else f'experts.{e}'}.{m}"
                for e, members in per_expert.items() for m in members]
        entry = {"round": round_, "from_step": round_ * self.round_steps + 1,
                 "frozen": {str(b): v for b, v in self.frozen_now.items()}}
        if record and not any(h["round"] == round_ for h in self.history):
            self.history.append(entry)
            if self.run_dir is not None:
                with open(self.run_dir / "hft_rounds.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

    def _routed(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, b, e, _, _ in self.slices:
            out[b] = max(out.get(b, 0), e + 1)
        return out

    def describe(self, model) -> dict:
        total = sum(q.numel() for _, q in model.named_parameters())
        frozen = sum(q.numel() for _, q in model.named_parameters() if not q.requires_grad)
        frozen += sum(int(m.sum()) for m in self.masks.values())
        return {"round_steps": self.round_steps, "rounds": len(self.history), "seed": self.seed,
                "embeddings": self.params.embeddings, "frozen_fraction_last_round": round(frozen / max(total, 1), 4),
                "selection_file": "hft_rounds.jsonl", "always_trained": self.always[:20],
                "rounds_selected": self.history}

    def state_dict(self) -> dict:
        return {"round": self.round, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state.get("history", [])
        self.round = None  # on_step re-applies the (deterministic) selection of the resumed round


def trains(name: str, frozen: dict[int, list[str]], round_: int, embeddings: str) -> bool:
    """Whether parameter `name` (not a shared expert's) trains in round `round_`, given each block's frozen modules."""
    if _is_embedding(name):
        return embeddings == "train" or (embeddings == "half" and round_ % 2 == 1)
    b = block_index(name)
    if b is not None and module_of(name) in _members():
        return module_of(name) not in frozen[b]
    return True


def _members() -> set[str]:
    return {m for members, _ in CATEGORIES.values() for m in members}


def _is_embedding(name: str) -> bool:
    return any(part in name for part in _EMBEDDING)
