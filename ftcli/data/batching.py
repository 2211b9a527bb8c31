"""Which examples go in which step, and how a micro-batch becomes tensors.

An optimiser step takes `batch_size × grad_accum` examples; they are split into `grad_accum` micro-batches of
`batch_size` examples. The same examples land in the same step whatever the split, so accumulation changes
nothing but memory (the loss is normalised by the trained tokens of the whole step, in train.py).

Rows are right-padded and carry no attention mask: attention is causal, so no real token ever sees a pad token.
With packing, a micro-batch's examples are laid end to end in rows of at most `pack_len` tokens; position ids
restart at 0 for every example, and transformers turns restarting position ids into a block-diagonal causal mask,
so no example attends to another. Pad tokens continue the positions of the row's last example, which keeps a row
that holds one example on the plain causal path.
Without packing, examples are bucketed by length (per step window) so a micro-batch pads to little.

On N processes the epoch is planned once for the global batch (`batch_size × N` per micro-batch: the plan one
process with that batch would make) and every micro-batch is dealt out across the ranks (`shard_step`): rank r
takes its examples r, r + N, ... Every row is used once per epoch across the ranks, and as a micro-batch's
examples are sorted by length, each rank gets a similar share of tokens. The last step of an epoch may be short:
its examples are dealt the same way, so a rank may get fewer, or none (it then runs a pass that counts zero).

A row's unit is an example: one sequence, or for preference rows a pair (chosen, rejected) laid end to end in one
row, so that both go through the model in the same pass and a pass split never separates them. Every position
knows its sequence (`seq_ids`, numbered in row order; pad: -1) and the batch keeps the encoded sequences in that
order (`sequences`), which is how objectives sum log-probabilities per sequence and find what was precomputed
for it (a reference's log-probs, a teacher's top-k).

A packed batch also carries each example's [start, end) span per row (`example_bounds`), so attention can run on
each example alone instead of over a masked row (ftcli/attention.py). A micro-batch wider than a forward pass
should be (`split`) runs as several passes of whole rows, trimmed to their own longest row: the summed loss and
its gradient are the same, the activation memory is that of one pass. Where attention runs on those spans, the
rows of a pass are laid end to end in one row and their padding dropped (`flat`): rows are only the packing's
unit, so a pass of several short rows computes no pad position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ftcli.data.tokenize import Encoded, EncodedPair

Unit = "Encoded | EncodedPair"

BUCKET_WINDOW_STEPS = 32  # steps whose examples are sorted by length together when packing is off


@dataclass
class Batch:
    input_ids: "object"  # LongTensor [rows, length]
    labels: "object"  # LongTensor, -100 where no loss
    position_ids: "object"
    n_examples: int  # units (rows of data): examples, or pairs
    n_tokens: int  # real (non-pad) tokens
    n_trained: int
    n_positions: int  # rows × length: what the model computes, padding included
    row_tokens: list[int] | None = None  # real tokens per row (rows are right-padded)
    example_bounds: list[list[tuple[int, int]]] | None = None  # packed rows: each example's [start, end)
    seq_ids: "object" = None  # LongTensor [rows, length]: the sequence of each position (row order), pad -1
    sequences: list[Encoded] | None = None  # the encoded sequences, in seq_ids order

    @property
    def n_sequences(self) -> int:
        return len(self.sequences) if self.sequences is not None else 0

    def trained_sequence(self):
        """The sequence of every trained token [n], in row-major order (the order of loss.trained_hidden)."""
        return self.seq_ids[:, 1:][self.labels[:, 1:] != -100]

    def split(self, max_positions: int, flat: bool = False) -> list["Batch"]:
        """Consecutive whole rows in parts of at most `max_positions` positions (at least one row each), each
        cut to its own longest row; the parts' counts add up to the batch's. `flat` (packed rows, attention that
        keeps each example to its own span): each part's rows are laid end to end in one row without their
        padding, so a part of several rows computes no pad position and runs as one longer product."""
        import torch

        rows, width = self.input_ids.shape
        if self.row_tokens is None:
            return [self]
        flat = flat and self.example_bounds is not None
        if not flat and rows * width <= max_positions:
            return [self]
        groups: list[list[int]] = []
        if flat:  # greedy: as many consecutive rows as fit in max_positions real tokens
            room = 0
            for r, n in enumerate(self.row_tokens):
                if groups and n <= room:
                    groups[-1].append(r)
                    room -= n
                else:
                    groups.append([r])
                    room = max_positions - n
        else:
            per_part = max(1, max_positions // width)
            groups = [list(range(r, min(r + per_part, rows))) for r in range(0, rows, per_part)]
        parts = []
        for group in groups:
            sl = slice(group[0], group[-1] + 1)
            if flat:
                cut = [(r, self.row_tokens[r]) for r in group]
                ids, labels, pos, seq = (torch.cat([t[r, :n] for r, n in cut])[None]
                                         for t in (self.input_ids, self.labels, self.position_ids, self.seq_ids))
                bounds, at = [[]], 0
                for r, n in cut:
                    bounds[0] += [(at + s, at + e) for s, e in self.example_bounds[r] if s < n]
                    at += n
            else:
                w = max(self.row_tokens[sl])
                ids, labels, pos, seq = (t[sl, :w] for t in (self.input_ids, self.labels, self.position_ids,
                                                              self.seq_ids))
                bounds = None
                if self.example_bounds is not None:
                    bounds = [[(s, min(e, w)) for s, e in spans if s < w] for spans in self.example_bounds[sl]]
            live = seq[seq >= 0]  # rows hold consecutive sequence numbers: renumber from 0
            lo, hi = (int(live.min()), int(live.max()) + 1) if live.numel() else (0, 0)
            row_tokens = [sum(self.row_tokens[sl])] if flat else self.row_tokens[sl]
            parts.append(Batch(ids, labels, pos, self.units_in(lo, hi), sum(self.row_tokens[sl]),
                               int((labels != -100).sum()), ids.numel(), row_tokens, bounds,
                               torch.where(seq >= 0, seq - lo, seq), self.sequences[lo:hi]))
        return parts

    def units_in(self, lo: int, hi: int) -> int:
        per_unit = len(self.sequences) // max(self.n_examples, 1)
        return (hi - lo) // max(per_unit, 1)


def plan_epoch(lengths: list[int], batch_size: int, grad_accum: int, seed: int, epoch: int,
               bucket: bool, order: list[int] | None = None) -> list[list[list[int]]]:
    """Steps → micro-batches → example indices for one epoch; a pure function of its arguments (exact resume).
    `order`: the epoch's examples as a mixture draws them (an index may repeat); default every row once,
    shuffled."""
    if order is None:
        order = list(range(len(lengths)))
        random.Random(f"{seed}/{epoch}").shuffle(order)
    else:
        order = list(order)
    per_step = batch_size * grad_accum
    if bucket:
        window = per_step * BUCKET_WINDOW_STEPS
        bucketed = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
            steps_in_window = [chunk[s : s + per_step] for s in range(0, len(chunk), per_step)]
            random.Random(f"{seed}/{epoch}/{w}").shuffle(steps_in_window)
            bucketed.extend(i for step in steps_in_window for i in step)
        order = bucketed
    steps = []
    for s in range(0, len(order), per_step):
        step = sorted(order[s : s + per_step], key=lambda i: (lengths[i], i))
        steps.append([step[m : m + batch_size] for m in range(0, len(step), batch_size)])
    return steps


def shard_step(step: list[list[int]], rank: int, processes: int) -> list[list[int]]:
    """Rank `rank`'s micro-batches of one step of a plan made for the global batch (see the module docstring);
    micro-batches left empty on this rank are dropped."""
    parts = [mb[rank::processes] for mb in step]
    return [p for p in parts if p]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: positions into `lengths`, grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(examples: list[Unit], pad_id: int, packing: bool, pack_len: int) -> Batch:
    """Tensors for one micro-batch (see the module docstring for the layout). `examples` are units: an `Encoded`
    example, or an `EncodedPair` whose two sequences share a row."""
    import torch

    if packing:
        rows = pack([e.length for e in examples], pack_len)
    else:
        rows = [[i] for i in range(len(examples))]
    groups = [[s for i in row for s in examples[i].sequences] for row in rows]
    width = max(sum(len(e.input_ids) for e in g) for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    labels = torch.full((len(groups), width), -100, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    seq_ids = torch.full((len(groups), width), -1, dtype=torch.long)
    n_tokens = n_trained = 0
    row_tokens, bounds, sequences = [], [], []
    for r, group in enumerate(groups):
        at = 0
        spans = []
        for e in group:
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at : at + n] = torch.tensor(e.labels())
            pos[r, at : at + n] = torch.arange(n)
            seq_ids[r, at : at + n] = len(sequences)
            sequences.append(e)
            spans.append((at, at + n))
            at += n
            n_tokens += n
            n_trained += e.n_trained
        if at < width:  # padding continues the last example's positions (see module docstring)
            last = pos[r, at - 1] + 1 if at else 0
            pos[r, at:] = torch.arange(width - at) + last
            spans.append((at, width))  # the pad tail attends only to itself
        row_tokens.append(at)
        bounds.append(spans)
    two_per_row = not packing and any(len(g) > 1 for g in groups)  # pairs: their two sequences need bounds too
    return Batch(ids, labels, pos, len(examples), n_tokens, n_trained, len(groups) * width, row_tokens,
                 bounds if packing or two_per_row else None, seq_ids, sequences)


def eval_batches(examples: list[Unit], batch_size: int, pad_id: int, packing: bool, pack_len: int,
                 collate=collate) -> list[Batch]:
    """Deterministic batches for validation: sorted by length so little is padded."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    return [
        collate([examples[i] for i in order[s : s + batch_size]], pad_id, packing, pack_len)
        for s in range(0, len(order), batch_size)
    ]
