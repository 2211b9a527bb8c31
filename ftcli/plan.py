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
    example: list[tuple[str, list[tuple[str, bool]]]]  # (title, decoded (text, trained) segments) per sequence
    notes: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)  # MB per part and process, an estimate
    output: str = ""  # the run folder train would write, absolute
    processes: int = 1
    groups: dict[str, dict] = field(default_factory=dict)  # what trains by group (attention, experts, router, ...)


@dataclass
class Counts:
    """The parameters of a prepared model, as `check` plans with them: counted on the weightless model or
    computed from the model's files (ftcli/shapes.py), the same numbers either way."""

    trainable: int
    total: int
    shapes: list[tuple[int, ...]]  # of the tensors the optimiser owns
    named_sizes: list[tuple[str, int]]  # (name, elements) of every trainable tensor, for the groups table
    layers: int
    hidden: int
    block_linear: int  # elements of the blocks' frozen linear weights
    experts: tuple[int, int] | None = None  # (routed experts per block, per token) of a mixture of experts
    how: str = "model"  # "files": from config.json and the safetensors headers; "model": a weightless model


def from_model(model, strategy) -> Counts:
    import torch

    from ftcli import moe
    from ftcli.models import count_parameters

    trainable, total = count_parameters(model)
    block_linear = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".layers." in n and "lora_" not in n)
    return Counts(trainable, total, [tuple(q.shape) for _, q in strategy.train_params(model)],
                  [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad],
                  int(model.config.num_hidden_layers), int(model.config.hidden_size), block_linear,
                  moe.expert_count(model))


def from_files(recipe, strategy, *, allow_pickle: bool, log) -> Counts | None:
    """The counts from the base's files where the strategy can say what it trains from shapes alone (no torch);
    None where it or the model's layout cannot (a run as the base, remote code, another architecture)."""
    import math

    from pathlib import Path

    from ftcli import models, shapes
    from ftcli.run_folder import RunFolder

    if recipe.trust_remote_code or RunFolder.holds_run(recipe.base_model):
        return None
    ws = shapes.read(Path(models.resolve(recipe.base_model, allow_pickle=allow_pickle, log=log)))
    planned = strategy.plan(ws, recipe) if ws is not None else None
    if planned is None:
        return None
    sizes = [(n, math.prod(s)) for n, s in planned.trainable.items()]
    return Counts(planned.count, ws.total + planned.added, list(planned.optimised.values()), sizes, ws.layers,
                  ws.hidden, ws.block_linear, how="files")


# Activation memory kept for the backward pass, in bytes per (token × block × hidden unit), fp32. Measured on the
# built-in SmolLM2-135M with LoRA on all linear layers: 2.05 GB for 1,152 tokens × 30 blocks × 576 → ≈ 104.
ACTIVATION_BYTES = 104
# What a training process holds before any model: Python, torch, transformers, PEFT, the tokenizer and the encoded
# data. Measured as the peak RSS of a process that imported them and loaded the built-in tokenizer (torch 2.13 CPU,
# transformers 5): ≈ 460 MB.
RUNTIME_BYTES = 460 * 2**20


def memory_estimate(recipe, strategy, counts: "Counts", objective=None, processes: int = 1) -> dict[str, float]:
    """Training memory by part, in MB: weights as the strategy stores them, gradients and optimiser state (of
    `training.optimizer`), activations (of one forward/backward pass: batch × max_len positions, every row full, at
    most `training.pass_tokens`: an upper bound), and what the strategy and the objective keep besides (EWC's Fisher
    and anchor, a DPO reference copy, a teacher). `counts.shapes`: of the tensors the optimiser owns (hft: every
    parameter that trains in some round). Per process: on `processes` processes with training.distributed fsdp, weights,
    gradients and optimiser state are split across them (plus one decoder block gathered whole at a time, not
    counted)."""
    import math

    from ftcli import optimizers

    c = counts
    hidden, shapes = c.hidden, c.shapes
    parts = strategy.memory(total=c.total, trainable=c.trainable, block_linear=c.block_linear, recipe=recipe)
    if objective is not None:
        parts.update(objective.memory(total=c.total, strategy=strategy))
    tokens = min(recipe.training.batch_size * recipe.data.max_len, recipe.pass_positions())  # one pass is live
    layers = layers_in_graph(c)  # autograd keeps nothing for the blocks before the first that trains
    if recipe.training.gradient_checkpointing:
        activations = tokens * hidden * 4 * layers + tokens * hidden * ACTIVATION_BYTES
    else:
        activations = tokens * layers * hidden * ACTIVATION_BYTES
    activations *= strategy.activation_factor
    shards = processes if processes > 1 and recipe.training.distributed == "fsdp" else 1
    optimizer = {k: v / shards for k, v in optimizers.memory(recipe.training.optimizer, c.trainable, shapes).items()}
    out = {"runtime (Python, torch, transformers, tokenizer)": RUNTIME_BYTES, "weights": parts.pop("weights") / shards,
           **optimizer, "activations (upper bound)": activations, **parts}
    if recipe.training.record_si:
        out["SI path integral"] = sum(math.prod(s) for s in shapes) * 16 / shards
    out = {k: v / 2**20 for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def layers_in_graph(counts: Counts) -> int:
    """Blocks whose activations the backward pass keeps: from the first block with a trained tensor to the last
    (all of them when the embedding trains; none when only the final norm or the head does)."""
    from ftcli import moe
    from ftcli.strategies.frozen import block_index

    first = counts.layers
    for name, _ in counts.named_sizes:
        i = block_index(name)
        if i is None and moe.group_of(name) == "embeddings" and "lm_head" not in name:
            return counts.layers
        if i is not None:
            first = min(first, i)
    return counts.layers - first


def build(recipe, *, allow_pickle: bool = False, log=print, processes: int = 1) -> Plan:
    from ftcli import data as data_mod
    from ftcli import models, objectives, scoring, strategies, trackers
    from ftcli.strategies import Context

    from ftcli.recipe import resolve_formats

    resolve_formats(recipe)
    strategy = strategies.get(recipe.strategy)
    strategies.refuse_unsupported(strategy, recipe)
    trackers.check(recipe)
    objective = objectives.get(recipe.objective)
    tokenizer = models.load_tokenizer(recipe.base_model, trust_remote_code=recipe.trust_remote_code,
                                      allow_pickle=allow_pickle, log=log)
    objective.preflight(recipe, tokenizer)
    bundle = data_mod.build(recipe, tokenizer, objective)
    retention = scoring.retention_sets(recipe, load=True)  # as train reads them: a bad set fails here too
    loading = objective.base_loading(bundle)
    counts = from_files(recipe, strategy, allow_pickle=allow_pickle, log=log) if not loading else None
    if counts is None:  # the weightless model, prepared as train prepares it
        ctx = Context(recipe=recipe, tokenizer=tokenizer, train_data=bundle.train, log=log, dry_run=True,
                      strategy=strategy, processes=processes)
        counts = from_model(strategy.prepare(models.load_model(
            recipe.base_model, trust_remote_code=recipe.trust_remote_code, allow_pickle=allow_pickle, meta=True,
            log=log, **loading), ctx), strategy)
    trainable, total = counts.trainable, counts.total
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
    if bundle.bad_rows.count:
        notes.append(bundle.bad_rows.summary())
    if bundle.numbers.count:
        notes.append(bundle.numbers.summary())
    from ftcli import moe, probe

    for es in retention:
        if es.data == probe.PROBE:
            notes.append(f"retention: the {probe.NAME}, {len(probe.asked(es.limit))} general prompts answered "
                         "by the base model at the start of training (cached), loss before and after "
                         "(eval.retention: [] switches it off)")
        else:
            notes.append(f"retention set {es.name}: {len(es.examples)} rows, metric {es.metrics[0]}")
    groups = moe.trainable_by_group(counts.named_sizes)
    experts = counts.experts
    if experts:
        missing = [g for g in ("experts", "router") if g not in groups]
        per = groups.get("experts", {}).get("trainable", 0) // experts[0]
        notes.append(f"mixture of experts: {experts[0]} routed experts per block, {experts[1]} per token"
                     + (f"; {per:,} trainable parameters per expert (all blocks)" if per else "")
                     + (f"; not trained: {', '.join(missing)} (name them in strategy.target_modules)"
                        if missing and strategy.artifact == "adapter" else ""))
    for key, what in recipe.inferred.items():
        notes.append(f"{key}: auto → {what}")
    mixture = bundle.train.mixture
    if mixture is not None:
        asked = mixture.asked()
        for p in mixture.parts:
            how = f"weight {p.weight:g}" if p.weight is not None else f"repeat {p.repeat:g}"
            notes.append(f"mixture: {p.name} ({p.format}, {p.rows:,} training rows, {p.stats.tokens:,} tokens): "
                         f"{how}, {asked[p.name]:.1%} of the {mixture.epoch_size:,} examples an epoch draws")
    output = output_note(recipe)
    if output:
        notes.append(output)
    steps, _ = recipe.total_steps(bundle.train.epoch_size, processes)
    memory = memory_estimate(recipe, strategy, counts, objective, processes)
    unit = bundle.train.encoded[0]
    titles = ["chosen", "rejected"] if len(unit.sequences) == 2 else [""]
    example = [(title, show_mask(tokenizer, enc)) for title, enc in zip(titles, unit.sequences)]
    from ftcli.recipe import default_output

    return Plan(splits, trainable, total, steps, example, notes, memory, str(default_output(recipe).resolve()),
                processes, groups)


def output_note(recipe) -> str | None:
    """A recipe from someone else that writes its run folder outside the current folder (an absolute `output`,
    a `..` or a `~` in it) is said in `check`, where it can be read before `train` writes anything."""
    from pathlib import Path

    if not recipe.output:
        return None
    raw = Path(recipe.output)
    if raw.is_absolute() or ".." in raw.parts or recipe.output.startswith("~"):
        where = Path(recipe.output).expanduser().resolve()
        return (f"this recipe writes its run folder outside the current folder: output {recipe.output!r} is {where} "
                "(--output DIR writes elsewhere)")
    return None
