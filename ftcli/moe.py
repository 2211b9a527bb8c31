"""Mixture-of-experts bases: which weights are routed experts, shared experts and routers, what a LoRA target names
on them, and the router's load-balancing loss.

transformers 5 keeps the routed experts of a block as 3-D parameters of one module: `mlp.experts.gate_up_proj`
[experts, 2 × intermediate, hidden] (each expert's gate projection in the first half of its rows, its up projection
in the second) and `mlp.experts.down_proj` [experts, hidden, intermediate]. The router is a module with a 2-D
`weight` [experts, hidden] (`mlp.gate`), not a linear layer. Qwen-MoE adds a shared expert every token passes
through (`mlp.shared_expert`, an ordinary MLP of linear layers) and a 1-output linear gate that scales it
(`mlp.shared_expert_gate`, counted with the shared expert). Mixtral-style and Qwen-MoE-style models are the ones
tested; others that follow the same layout work the same way.

LoRA on a 3-D expert parameter is PEFT's `target_parameters` (a `ParamWrapper`: per expert an A of rank r and a B,
stored as lora_A [experts·r, in] and lora_B [out, experts·r]); on the router's 2-D weight it is the same wrapper
with one "expert"; on linear layers (attention, shared experts, the shared expert's gate) it is the usual LoRA.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager

from ftcli.errors import UserError

GROUPS = ("attention", "mlp", "experts", "shared_experts", "router", "norm", "embeddings", "other")
TARGET_GROUPS = ("attention", "mlp", "experts", "shared_experts", "router")  # words target_modules may use
EXPERT_MEMBERS = ("gate", "up", "down")  # the matrices of one expert (hft's MLP category)
_ROUTER = re.compile(r"\.(?:mlp|block_sparse_moe|moe)\.(?:gate|router)(?:\.|$)")
_PEFT_PARTS = (".base_layer", ".lora_A", ".lora_B", ".lora_magnitude_vector", ".default")


def group_of(name: str) -> str:
    """The group of a module or parameter name (LoRA factor names included)."""
    n = name.removeprefix("base_model.model.")
    for part in _PEFT_PARTS:
        n = n.replace(part, "")
    if _ROUTER.search(n):
        return "router"
    if ".shared_expert" in n:
        return "shared_experts"
    if ".experts." in f"{n}.":
        return "experts"
    if any(k in n for k in ("embed_tokens", "lm_head", "wte", "embed_out")):
        return "embeddings"
    if "norm" in n:
        return "norm"
    if any(k in n for k in ("self_attn", ".attn.", ".attention.")):
        return "attention"
    if ".mlp." in n:
        return "mlp"
    return "other"


def is_experts(module) -> bool:
    return type(module).__name__.endswith("Experts") and any(p.ndim == 3 for p in module.parameters(recurse=False))


def is_router(module) -> bool:
    return type(module).__name__.endswith("Router")


def is_moe(model) -> bool:
    return any(is_experts(m) or is_router(m) for m in model.modules())


def expert_count(model) -> tuple[int, int] | None:
    """(routed experts per block, experts per token) of an MoE model, else None."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    return (int(n), int(k)) if n and k and is_moe(model) else None


# ------------------------------------------------------------------------------------------------------------
# LoRA targets


def lora_targets(model, entries) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """`strategy.target_modules` → (linear module names for PEFT's target_modules, parameter names for its
    target_parameters, {group: matched names}). An entry is `all-linear` (every linear layer but the output head),
    a group word (attention, mlp, experts, shared_experts, router), or a name: a module or parameter whose name
    ends with it (PEFT's rule) or matches it as a pattern with * and ?."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    params = {}  # the weights LoRA reaches as parameters: experts' 3-D tensors, routers' 2-D weights
    for n, m in model.named_modules():
        if is_experts(m) or is_router(m):
            for pn, p in m.named_parameters(recurse=False):
                if p.ndim in (2, 3):
                    params[f"{n}.{pn}"] = m
    return match_targets(entries, linear, params)


def match_targets(entries, linear, params) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """`lora_targets` over names: `linear`, the linear layers' module names; `params`, the expert and router
    parameters' names (`ftcli check` matches a model's names read from its files, ftcli/shapes.py)."""
    entries = [entries] if isinstance(entries, str) else list(entries)
    modules, parameters = set(), set()
    for entry in entries:
        found_m, found_p = _match(entry, linear, params)
        if not found_m and not found_p:
            words = ", ".join(g for g in TARGET_GROUPS if _match(g, linear, params) != (set(), set()))
            example = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear})[:6])
            raise UserError(f"strategy.target_modules: {entry!r} matches no linear layer or expert weight of this "
                            f"model. Use all-linear, a group ({words}), or names such as {example}")
        modules |= found_m
        parameters |= found_p
    matched: dict[str, list[str]] = {}
    for name in sorted(modules | parameters):
        matched.setdefault(group_of(name), []).append(name)
    return sorted(modules), sorted(parameters), matched


def _match(entry: str, linear: dict, params: dict) -> tuple[set, set]:
    if entry == "all-linear":
        return set(linear), set()
    if entry in TARGET_GROUPS:
        return ({n for n in linear if group_of(n) == entry},
                {n for n in params if group_of(n) == entry})
    wild = any(c in entry for c in "*?[")

    def hit(name: str) -> bool:
        return fnmatch.fnmatchcase(name, entry) if wild else name == entry or name.endswith("." + entry)

    return {n for n in linear if hit(n)}, {n for n in params if hit(n)}


# ------------------------------------------------------------------------------------------------------------
# the experts' matrices (hft)


def expert_matrices(model) -> list[tuple[str, int, int, str, tuple]]:
    """Every routed expert's matrices as slices of the 3-D parameters: (parameter name, block, expert, member,
    index) with member gate/up/down and `index` the slice of the parameter holding it."""
    from ftcli.strategies.frozen import block_index

    out = []
    for n, m in model.named_modules():
        if not is_experts(m):
            continue
        for pn, p in m.named_parameters(recurse=False):
            name, block = f"{n}.{pn}", block_index(f"{n}.{pn}")
            if p.ndim != 3 or block is None:
                continue
            if pn == "gate_up_proj":
                half = p.shape[1] // 2
                for e in range(p.shape[0]):
                    out.append((name, block, e, "gate", (e, slice(0, half))))
                    out.append((name, block, e, "up", (e, slice(half, None))))
            elif pn == "down_proj":
                out += [(name, block, e, "down", (e,)) for e in range(p.shape[0])]
    return out


# ------------------------------------------------------------------------------------------------------------
# the router's load-balancing loss


class RouterBalance:
    """The Switch-Transformer load-balancing loss of every router, for the forward passes run inside `capture()`
    with gradients on (a reference or teacher pass without gradients is not counted, nor the recomputation of
    gradient checkpointing, which runs outside it). transformers' own `load_balancing_loss_func` computes it
    from the captured router logits, padding excluded: n_experts · Σ_e (top-k picks of e per token) · (mean router
    probability of e), pooled over the layers; it is the number of experts per token when the routing is perfectly
    balanced and grows as it concentrates."""

    def __init__(self, model, coef: float):
        self.coef = coef
        self.experts, self.top_k = expert_count(model) or (0, 0)
        self.logits: list = []
        self.on = False
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if is_router(m)]

    @classmethod
    def attach(cls, model, coef: float | None) -> "RouterBalance | None":
        """A balance for an MoE model (coef None: the model config's router_aux_loss_coef), else None."""
        if expert_count(model) is None:
            return None
        if coef is None:
            coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
        return cls(model, coef) if coef > 0 else None

    def _hook(self, module, inputs, output):
        import torch

        if self.on and torch.is_grad_enabled():
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    @contextmanager
    def capture(self):
        self.logits, self.on = [], True
        try:
            yield self
        finally:
            self.on = False

    def loss(self, batch):
        """The loss of the passes captured so far, over the real tokens of `batch`; None when nothing routed."""
        if not self.logits:
            return None
        import torch
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        rows, width = batch.input_ids.shape
        mask = torch.zeros(rows, width, dtype=torch.long, device=batch.input_ids.device)
        for r, n in enumerate(batch.row_tokens or [width] * rows):
            mask[r, :n] = 1
        logits = tuple(x.float() for x in self.logits)
        self.logits = []
        return load_balancing_loss_func(logits, self.experts, self.top_k, mask)


# ------------------------------------------------------------------------------------------------------------
# what trains, by group (`ftcli check`, the report)


def trainable_by_group(named_sizes) -> dict[str, dict]:
    """{group: {"weights": weights trained or adapted, "trainable": parameters}} over the (name, elements) of the
    trainable tensors; a LoRA factor counts toward the weight it adapts (one adapted weight per module or expert
    tensor)."""
    out: dict[str, dict] = {}
    for name, n in named_sizes:
        weight = name.split(".lora_", 1)[0] if ".lora_" in name else name
        g = out.setdefault(group_of(name), {"weights": set(), "trainable": 0})
        g["weights"].add(weight)
        g["trainable"] += n
    return {g: {"weights": len(v["weights"]), "trainable": v["trainable"]} for g, v in
            sorted(out.items(), key=lambda kv: GROUPS.index(kv[0]))}
