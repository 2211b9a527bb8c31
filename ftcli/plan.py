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


def describe(recipe, *, allow_pickle: bool = False, log=print) -> Plan:
    from ftcli import data as data_mod
    from ftcli import models, strategies
    from ftcli.models import count_parameters
    from ftcli.strategies import Context
    from ftcli.train import total_steps

    strategy = strategies.get(recipe.strategy)
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
    return Plan(splits, trainable, total, steps, show_mask(tokenizer, bundle.train.encoded[0]), notes)
