"""Several datasets in one run: `data.train` as a list of datasets, each shaped like a retention set plus how
often it is drawn.

```yaml
data:
  train:
    - {data: sst2.jsonl, name: sst2, fields: {label: label_text}, weight: 0.8}
    - {data: alpaca.jsonl, name: alpaca, weight: 0.2, limit: 2000, sample: 0}
  validation: 0.1          # each dataset holds out its own 10% (or give one its own `validation:`)
```

Each dataset is read in its own format (auto: inferred from its fields), limited and sampled on its own, and split
into training and validation rows on its own; the training rows of all datasets lie one after the other in one
split. An epoch draws as many examples as the datasets have rows together:

- **weight** (on every dataset): each example comes from dataset d with probability w_d / Σw, drawn with a seeded
  RNG per epoch; the k-th example drawn from d is row k of a seeded permutation of d's rows (a new permutation for
  every pass over them), so a small dataset with a large weight repeats and a large one with a small weight is
  sampled.
- **repeat** (no weights; default 1): every row of d appears `repeat` times per epoch (a fraction: that share of its
  rows, a seeded sample), and the epoch is shuffled.

The epoch's order is a pure function of (seed, epoch), like the plain plan (batching.plan_epoch), so a resumed run
draws exactly what an uninterrupted one does; packing and bucketing apply to the drawn examples as to any others.
The report counts what the run drew from each dataset against what was asked, and the validation loss of each.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass, field, fields

from ftcli.data.tokenize import EncodeStats


@dataclass
class Part:
    """One dataset's rows inside a mixture's split: rows [start, start + rows)."""

    name: str
    source: str
    format: str
    start: int
    rows: int
    weight: float | None = None
    repeat: float | None = None
    stats: EncodeStats = field(default_factory=EncodeStats)


@dataclass
class Mixture:
    parts: list[Part]

    @property
    def weighted(self) -> bool:
        return any(p.weight is not None for p in self.parts)

    def passes(self, p: Part) -> int:
        """Examples of `p` in one epoch (repeat mode)."""
        whole, frac = divmod(p.repeat or 1.0, 1.0)
        return int(whole) * p.rows + round(frac * p.rows)

    @property
    def epoch_size(self) -> int:
        if self.weighted:
            return sum(p.rows for p in self.parts)
        return sum(self.passes(p) for p in self.parts)

    def asked(self) -> dict[str, float]:
        """The share of an epoch each dataset was asked for."""
        if self.weighted:
            total = sum(p.weight for p in self.parts)
            return {p.name: p.weight / total for p in self.parts}
        return {p.name: self.passes(p) / max(self.epoch_size, 1) for p in self.parts}

    def part_of(self, index: int) -> Part:
        return self.parts[bisect_right([p.start for p in self.parts], index) - 1]

    @staticmethod
    def _perm(p: Part, seed: int, epoch: int, n_pass: int) -> list[int]:
        order = list(range(p.rows))
        random.Random(f"mixture/{seed}/{epoch}/{p.name}/{n_pass}").shuffle(order)
        return order

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """The examples (indices into the split) epoch `epoch` draws, in the order drawn."""
        rng = random.Random(f"mixture/{seed}/{epoch}")
        if self.weighted:
            labels = rng.choices(range(len(self.parts)), weights=[p.weight for p in self.parts], k=self.epoch_size)
            taken = [0] * len(self.parts)
            perms: dict[tuple[int, int], list[int]] = {}
            order = []
            for d in labels:
                p = self.parts[d]
                n_pass, j = divmod(taken[d], p.rows)
                taken[d] += 1
                if (d, n_pass) not in perms:
                    perms[d, n_pass] = self._perm(p, seed, epoch, n_pass)
                order.append(p.start + perms[d, n_pass][j])
            return order
        order = []
        for p in self.parts:
            whole, frac = divmod(p.repeat or 1.0, 1.0)
            for n_pass in range(int(whole) + (1 if frac else 0)):
                perm = self._perm(p, seed, epoch, n_pass)
                if n_pass == int(whole):
                    perm = perm[: round(frac * p.rows)]
                order += [p.start + i for i in perm]
        rng.shuffle(order)
        return order

    def counts(self, indices) -> dict[str, int]:
        """How many of `indices` belong to each dataset."""
        out = {p.name: 0 for p in self.parts}
        for i in indices:
            out[self.part_of(i).name] += 1
        return out

    def subsets(self, units: list) -> dict[str, list]:
        """The split's rows by dataset."""
        return {p.name: units[p.start : p.start + p.rows] for p in self.parts}

    def summary(self, drawn: dict[str, int], validation: "Mixture | None", before: dict, after: dict) -> dict:
        """The report's mixture section: drawn against asked first (counts keyed by dataset), then per dataset."""
        total = max(sum(drawn.values()), 1)
        asked = self.asked()
        val = {p.name: p for p in validation.parts} if validation else {}
        datasets = {}
        for p in self.parts:
            d = {"source": p.source, "format": p.format, "rows": p.rows, "tokens": p.stats.tokens,
                 "trained_tokens": p.stats.trained_tokens, "truncated": p.stats.truncated,
                 "dropped": p.stats.dropped_overlong + p.stats.dropped_untrained + p.stats.dropped_bad,
                 "weight": p.weight, "repeat": p.repeat, "asked_share": round(asked[p.name], 4),
                 "drawn": drawn.get(p.name, 0), "drawn_share": round(drawn.get(p.name, 0) / total, 4)}
            if p.name in val:
                d["validation_rows"] = val[p.name].rows
                d["validation_loss_before"] = (before.get(p.name) or {}).get("loss")
                d["validation_loss_after"] = (after.get(p.name) or {}).get("loss")
            datasets[p.name] = d
        return {"drawn": dict(drawn), "asked_share": {k: round(v, 4) for k, v in asked.items()},
                "drawn_share": {k: round(v / total, 4) for k, v in drawn.items()},
                "mode": "weight" if self.weighted else "repeat", "datasets": datasets}


def _sum_stats(parts: list[EncodeStats]) -> EncodeStats:
    out = EncodeStats()
    for f in fields(EncodeStats):
        setattr(out, f.name, sum(getattr(s, f.name) for s in parts))
    return out


def build_mixture(recipe, tokenizer, objective=None):
    """data.build for a list of datasets: one DataBundle whose splits carry a Mixture each."""
    from ftcli.data import BadRows, DataBundle, NumbersAsText, Split, encode_split, load_examples
    from ftcli.data.tokenize import Encoder

    d = recipe.data
    bad, numbers = BadRows(d.on_bad_rows), NumbersAsText()
    encode = objective.encode if objective is not None else None
    encoders: dict[str, Encoder] = {}
    train_parts, val_parts, train_splits, val_splits = [], [], [], []
    for e in d.entries:
        if e.format not in encoders:
            encoders[e.format] = Encoder(tokenizer, d.chat_template, d.max_len, d.overlong, e.format, bad_rows=bad)
        encoder = encoders[e.format]
        instruction = e.instruction or d.instruction
        examples = load_examples(e.data, e.format, e.fields, split=e.split, limit=e.limit, sample_seed=e.sample,
                                 system_prompt=d.system_prompt, instruction=instruction, prompt_style=d.prompt_style,
                                 bad_rows=bad, numbers=numbers)
        held: list = []
        if isinstance(e.validation, float):
            order = list(range(len(examples)))
            random.Random(recipe.training.seed).shuffle(order)
            n_val = max(1, math.ceil(len(examples) * e.validation))
            if n_val >= len(examples):
                from ftcli.errors import UserError

                raise UserError(f"data.train ({e.name}): validation {e.validation} of {len(examples)} rows leaves "
                                "nothing to train on")
            keep = set(order[:n_val])
            held = [examples[i] for i in sorted(keep)]
            examples = [ex for i, ex in enumerate(examples) if i not in keep]
        elif isinstance(e.validation, str):
            labels = examples[0].choices if e.format == "classification" and examples else None
            held = load_examples(e.validation, e.format, e.fields, system_prompt=d.system_prompt,
                                 instruction=instruction, labels=labels, prompt_style=d.prompt_style, bad_rows=bad,
                                 numbers=numbers)
        train = encode_split(f"train ({e.name})", examples, encoder, e.data, encode)
        train_parts.append(Part(e.name, e.data, e.format, sum(len(s) for s in train_splits), len(train), e.weight,
                                e.repeat, train.stats))
        train_splits.append(train)
        if held:
            val = encode_split(f"validation ({e.name})", held, encoder, e.validation if isinstance(e.validation, str)
                               else e.data, encode)
            val_parts.append(Part(e.name, val.source, e.format, sum(len(s) for s in val_splits), len(val),
                                  stats=val.stats))
            val_splits.append(val)

    def combine(name: str, splits: list[Split], parts: list[Part]) -> Split:
        return Split(name, [x for s in splits for x in s.encoded], [x for s in splits for x in s.examples],
                     _sum_stats([s.stats for s in splits]), " + ".join(p.name for p in parts), Mixture(parts))

    train = combine("train", train_splits, train_parts)
    validation = combine("validation", val_splits, val_parts) if val_splits else None
    chat = [enc for fmt, enc in encoders.items() if fmt != "completion"]
    return DataBundle(train, validation, (chat or list(encoders.values()))[0], bad, numbers)
