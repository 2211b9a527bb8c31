"""What a recipe would do, without training: `ftcli check`.

Validates and resolves the recipe, encodes the data (rows, tokens, trained tokens per split; zero trained tokens is
an error), and counts parameters on a weightless (meta-device) copy of the model, so nothing heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftcli.data.tokenize import show_mask


@dataclass
class Plan:
    splits: dict[str, dict]
    trainable: int
    total: int
    steps: int
    example: list[tuple[str, bool]]
    notes: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)  # MB per part, an estimate


# Activation memory kept for the backward pass, in bytes per (token × block × hidden unit), fp32. Measured on the
# built-in SmolLM2-135M with LoRA on all linear layers: 2.05 GB for 1,152 tokens × 30 blocks × 576 → ≈ 104.
ACTIVATION_BYTES = 104
QUANTIZED_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes + one fp32 scale per block of 64 (double quant: less)


def memory_estimate(recipe, model, trainable: int, total: int, optimized: int | None = None) -> dict[str, float]:
    """Training memory by part, in MB: weights, gradients, AdamW state, activations (of one forward/backward pass:
    batch × max_len positions, every row full, at most `training.pass_tokens`: an upper bound), and EWC's Fisher
    and anchor copies. `optimized`: parameters AdamW keeps state for, when more than train at once (hft: every
    parameter that trains in some round)."""
    import torch

    cfg = model.config
    layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    s = recipe.strategy
    linear = sum(m.weight.numel() for n, m in model.named_modules()  # the blocks' frozen linear weights
                 if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n)
    if s.name == "qlora":
        weights = linear * QUANTIZED_BYTES_PER_WEIGHT + (total - trainable - linear) * 4 + trainable * 4
    elif s.name == "lora" and recipe.training.precision == "bf16":  # stored in bf16 (strategies/lora.py)
        weights = linear * 2 + (total - linear) * 4
    else:
        weights = total * 4
    tokens = min(recipe.training.batch_size * recipe.data.max_len, recipe.pass_positions())  # one pass is live
    if recipe.training.gradient_checkpointing:
        activations = tokens * hidden * 4 * layers + tokens * hidden * ACTIVATION_BYTES
    else:
        activations = tokens * layers * hidden * ACTIVATION_BYTES
    out = {"weights": weights, "gradients": trainable * 4, "optimizer (AdamW)": (optimized or trainable) * 8,
           "activations (upper bound)": activations}
    if s.name == "ewc":
        anchored = total if s.inner.name != "lora" else total - trainable
        out["EWC Fisher + anchor"] = anchored * 4 * (2 if s.inner.name != "lora" else 1)
    out = {k: v / 2**20 for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def describe(recipe, *, allow_pickle: bool = False, log=print) -> Plan:
    from ftcli import data as data_mod
    from ftcli import models, strategies
    from ftcli.models import count_parameters
    from ftcli.strategies import Context
    from ftcli.train import total_steps

    strategy = strategies.get(recipe.strategy)
    strategies.refuse_unsupported(recipe)
    tokenizer = models.load_tokenizer(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                                      allow_pickle=allow_pickle, log=log)
    bundle = data_mod.build(recipe, tokenizer)
    model = models.load_model(recipe.base_model, trust_remote_code=recipe.trust_remote_code, allow_pickle=allow_pickle,
                              meta=True, log=log)
    ctx = Context(recipe=recipe, tokenizer=tokenizer, train_data=bundle.train, log=log, dry_run=True)
    model = strategy.prepare(model, ctx)
    trainable, total = count_parameters(model)
    splits = {"train": bundle.train.stats.as_dict()}
    if bundle.validation is not None:
        splits["validation"] = bundle.validation.stats.as_dict()
    notes = []
    for name, st in splits.items():
        if st["truncated"] or st["dropped_overlong"]:
            notes.append(f"{name}: {st['truncated']} rows truncated and {st['dropped_overlong']} dropped at "
                         f"data.max_len={recipe.data.max_len} (data.overlong: {recipe.data.overlong})")
        if st["dropped_untrained"]:
            notes.append(f"{name}: {st['dropped_untrained']} rows had no trained token and were dropped")
    steps, _ = total_steps(recipe, len(bundle.train))
    optimized = sum(q.numel() for _, q in strategy.train_params(model))
    memory = memory_estimate(recipe, model, trainable, total, optimized)
    return Plan(splits, trainable, total, steps, show_mask(tokenizer, bundle.train.encoded[0]), notes, memory)
