"""Rows → examples → token ids + labels → train / validation splits (see DESIGN.md, the flow of one run)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftcli.data.formats import Example, check_fields, label_set, numbers_as_text, to_example
from ftcli.data.sources import read_rows
from ftcli.data.tokenize import Encoded, Encoder, EncodeStats
from ftcli.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ftcli.data.mixture import Mixture


@dataclass
class BadRows:
    """`data.on_bad_rows`: `error` refuses a bad row (a missing field, a pair that prefers nothing) naming it;
    `skip` drops it and counts it here, with the first few reasons, for `check` and the report."""

    policy: str = "error"
    count: int = 0
    first: list[str] = field(default_factory=list)  # the first reasons, each naming its row
    at: list[str] = field(default_factory=list)  # where those rows are ("train.jsonl line 12")
    SHOWN = 10

    def handle(self, error: UserError, place: str) -> None:
        """Raise `error` under policy error; count it under skip."""
        if self.policy != "skip":
            raise UserError(f"{error} (data.on_bad_rows: skip drops such rows and counts them)") from None
        self.note(str(error), place)

    def note(self, reason: str, place: str) -> None:
        self.count += 1
        if len(self.first) < self.SHOWN:
            self.first.append(reason)
            self.at.append(place)

    def summary(self) -> str:
        """One line for `check` and the report: how many rows were skipped, where the first are, the first why."""
        more = ", …" if self.count > len(self.at) else ""
        return (f"data.on_bad_rows: skip — {self.count} bad row{'s' if self.count != 1 else ''} skipped, at "
                f"{', '.join(self.at)}{more}; the first: {self.first[0] if self.first else '?'}")

    def as_dict(self) -> dict:
        return {"policy": self.policy, "skipped": self.count, "at": self.at, "first": self.first}


@dataclass
class NumbersAsText:
    """Rows that held a number (or true/false) where text is expected: read as its text, counted for `check` and
    the report with the first places."""

    count: int = 0
    first: list[str] = field(default_factory=list)  # "train.jsonl line 3: output: 42"
    SHOWN = 5

    def note(self, place: str, changed: list[str]) -> None:
        self.count += 1
        if len(self.first) < self.SHOWN:
            self.first.append(f"{place}: {', '.join(changed)}")

    def summary(self) -> str:
        return (f"{self.count} row{'s' if self.count != 1 else ''} had a number where text is expected, read as text "
                f"({'; '.join(self.first)}{'; …' if self.count > len(self.first) else ''})")

    def as_dict(self) -> dict:
        return {"rows": self.count, "first": self.first}


@dataclass
class Split:
    """One split, encoded: the kept rows and the examples they came from (for generation metrics). A mixture's
    split holds every dataset's rows one after the other (`mixture` says where each starts and how they are
    drawn)."""

    name: str
    encoded: list[Encoded]
    examples: list[Example]
    stats: EncodeStats
    source: str = ""
    mixture: "Mixture | None" = None

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def lengths(self) -> list[int]:
        return [e.length for e in self.encoded]

    @property
    def epoch_size(self) -> int:
        """Examples one epoch draws: the rows, or what the mixture's weights or repeats make of them."""
        return self.mixture.epoch_size if self.mixture is not None else len(self.encoded)

    def epoch_order(self, seed: int, epoch: int) -> list[int] | None:
        """The examples of `epoch` in the order a mixture draws them; None: every row once, shuffled by the plan."""
        return self.mixture.epoch_order(seed, epoch) if self.mixture is not None else None


@dataclass
class DataBundle:
    train: Split
    validation: Split | None
    encoder: Encoder
    bad_rows: BadRows = field(default_factory=BadRows)
    numbers: NumbersAsText = field(default_factory=NumbersAsText)


def infer_source_format(source: str, fields: dict[str, str], *, split: str = "train",
                        where: str = "data") -> tuple[str, list[str]]:
    """`format: auto` for one source: (the format its rows' fields fit, the fields of its first row)."""
    from ftcli.data.formats import INFER_ROWS, infer_format

    rows = read_rows(source, split=split, limit=INFER_ROWS)
    return infer_format(rows, fields, f"{where}: {source}"), sorted(rows[0])


def load_examples(source: str, fmt: str, fields: dict[str, str], *, split: str = "train", limit: int | None = None,
                  system_prompt: str | None = None, instruction: str | None = None,
                  labels: list[str] | None = None, sample_seed: int | None = None, prompt_style: str = "text",
                  bad_rows: BadRows | None = None, numbers: NumbersAsText | None = None) -> list[Example]:
    """Read and format rows: the first `limit`, or with `sample_seed` a seeded random sample of `limit` rows.
    Classification rows take their label set from `labels`, else from every row of the source. A row that cannot
    be formatted is an error naming it, or with `bad_rows` (policy skip) counted there and left out."""
    check_fields(fmt, fields)
    whole = fmt == "classification" or sample_seed is not None
    rows = read_rows(source, split=split, limit=None if whole else limit)
    if fmt == "classification" and labels is None:
        labels = label_set(rows, fields)
    index = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        index = sorted(random.Random(sample_seed).sample(index, limit)) if sample_seed is not None else index[:limit]
    examples = []
    for i in index:
        place = rows.place(i)
        row, changed = numbers_as_text(rows[i], fmt, fields)
        if changed and numbers is not None:
            numbers.note(f"{Path(source).name} {place}", changed)
        try:
            ex = to_example(row, fmt, fields, where=f"{source} {place}", system_prompt=system_prompt,
                            instruction=instruction, labels=labels, prompt_style=prompt_style)
        except UserError as e:
            if bad_rows is None:
                raise
            bad_rows.handle(e, f"{Path(source).name} {place}")
            continue
        ex.row, ex.place = i, f"{Path(source).name} {place}"
        examples.append(ex)
    if not examples:
        raise UserError(f"data {source}: every one of its {len(index)} rows was bad and skipped "
                        f"(first: {bad_rows.first[0] if bad_rows and bad_rows.first else '?'})")
    return examples


def encode_split(name: str, examples: list[Example], encoder: Encoder, source: str, encode=None) -> Split:
    """`encode(encoder, examples)`: the objective's encoding (Objective.encode); default the encoder's masks."""
    try:
        encoded, stats = encode(encoder, examples) if encode else encoder.encode_all(examples)
    except UserError as e:  # a bad row: name its source
        raise UserError(f"{name} split ({source}): {e}") from None
    kept = [(enc, ex) for enc, ex in zip(encoded, examples) if enc is not None]
    if not kept:
        raise UserError(
            f"{name} split ({source}): 0 trainable tokens in {stats.rows} rows "
            f"({stats.dropped_overlong} over max_len dropped, {stats.dropped_untrained} with nothing to train, "
            f"{stats.dropped_bad} bad pairs skipped). "
            "Check data.format, data.fields and data.max_len (`ftcli check` shows a decoded example)."
        )
    return Split(name, [k[0] for k in kept], [k[1] for k in kept], stats, source)


def build(recipe, tokenizer, objective=None) -> DataBundle:
    """Read, format, encode and split the recipe's data (a mixture: data/mixture.py); `objective` encodes the rows
    its own way (a classification head reads each prompt's last token instead of training an answer)."""
    d = recipe.data
    if isinstance(d.train, list):
        from ftcli.data.mixture import build_mixture

        return build_mixture(recipe, tokenizer, objective)
    bad, numbers = BadRows(d.on_bad_rows), NumbersAsText()
    encoder = Encoder(tokenizer, d.chat_template, d.max_len, d.overlong, d.format, bad_rows=bad)
    examples = load_examples(d.train, d.format, d.fields, split=d.split, limit=d.limit, system_prompt=d.system_prompt,
                             instruction=d.instruction, prompt_style=d.prompt_style, bad_rows=bad, numbers=numbers)
    labels = examples[0].choices if d.format == "classification" and examples else None
    validation_examples: list[Example] = []
    val_source = ""
    if isinstance(d.validation, float):
        order = list(range(len(examples)))
        random.Random(recipe.training.seed).shuffle(order)
        n_val = max(1, math.ceil(len(examples) * d.validation))
        if n_val >= len(examples):
            raise UserError(f"data.validation: {d.validation} of {len(examples)} rows leaves nothing to train on")
        held = set(order[:n_val])
        validation_examples = [examples[i] for i in sorted(held)]
        examples = [ex for i, ex in enumerate(examples) if i not in held]
        val_source = f"{d.validation:g} of {d.train} (seed {recipe.training.seed})"
    elif isinstance(d.validation, str):
        validation_examples = load_examples(d.validation, d.format, d.fields, system_prompt=d.system_prompt,
                                            instruction=d.instruction, labels=labels, prompt_style=d.prompt_style,
                                            bad_rows=bad, numbers=numbers)
        val_source = d.validation
    encode = objective.encode if objective is not None else None
    train = encode_split("train", examples, encoder, d.train, encode)
    validation = (encode_split("validation", validation_examples, encoder, val_source, encode)
                  if validation_examples else None)
    return DataBundle(train, validation, encoder, bad, numbers)
