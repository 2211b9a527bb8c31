"""`classify`: a classification head over the last hidden state (`task: classification` selects it).

The base loads as a sequence classifier (AutoModelForSequenceClassification): the decoder as it is, and a new linear
head `score` [labels × hidden] (transformers' initialisation) in place of the language-model head. The labels are
the data's: every distinct value of the label column of the training rows (`data.fields` maps it, e.g.
`{label: label_text}`), sorted; they become the head's outputs in that order, the model config's id2label, and
`labels.json` beside the artifact, so eval, export and a loaded run know them.

A row is its prompt, exactly as the generation run would see it (the user turn with `data.instruction` and the
text, rendered with the chat template and the assistant header), and the head reads the hidden state of its last
token: the same position HF's ForSequenceClassification reads, and the one a generating model would answer from.
That position is marked as the row's one trained position (`check` shows it between ⟦ ⟧), so the step's `count` is
its number of rows and the loss is the mean cross-entropy of the head over the rows of the step. Packed rows work as
for SFT: each example attends only to itself and the head reads each example's last token.

The head always trains: a strategy that froze it (frozen, bottleneck) gets it switched back on; PEFT strategies
save it beside their adapter (PEFT's SEQ_CLS task: modules_to_save). Metrics: loss, accuracy, macro-F1 of the
predicted label (the largest logit), the same functions as for scoring by candidates (evaluate.label_metrics).
Retention sets score the trained decoder with the base's language-model head (models.language_model_view): how
much of its language modelling the classifier's decoder kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ftcli.errors import UserError
from ftcli.objectives.base import Objective, ObjectiveParams

LABELS_FILE = "labels.json"


class ClassifyParams(ObjectiveParams):
    """Cross-entropy of a classification head over the last hidden state."""

    name: Literal["classify"] = "classify"


def encode(encoder, examples, label_ids: dict[str, int]):
    """(rows, stats): each example's prompt ids, its last position marked, its label id in `aux`. Rows over the
    encoder's max_len keep their first max_len tokens, or are dropped under `overlong: drop`."""
    from ftcli.data.tokenize import Encoded, EncodeStats

    stats = EncodeStats(rows=len(examples))
    rows = []
    for ex in examples:
        name = ex.choices[ex.gold]
        if name not in label_ids:
            raise UserError(f"label {name!r} is not one of the model's labels ({', '.join(label_ids)})")
        ids = encoder.prompt_ids(ex.prompt)
        truncated = len(ids) > encoder.max_len
        if truncated and encoder.overlong == "drop":
            stats.dropped_overlong += 1
            rows.append(None)
            continue
        ids = ids[: encoder.max_len]
        enc = Encoded(ids, [False] * (len(ids) - 1) + [True], truncated, aux={"label": label_ids[name]})
        stats.kept += 1
        stats.truncated += truncated
        stats.tokens += len(ids)
        stats.trained_tokens += 1
        rows.append(enc)
    return rows, stats


def head_logits(model, batch):
    """(logits [rows of data, labels] float32, label ids [rows of data]) of the head at each example's last token,
    in the batch's sequence order."""
    import torch

    from ftcli.loss import hidden_states

    h = hidden_states(model, batch.input_ids, batch.position_ids, example_bounds=batch.example_bounds)
    keep = batch.labels != -100  # one marked position per example: its last token
    logits = head_module(model)(h[keep]).float()
    labels = torch.tensor([s.aux["label"] for s in batch.sequences], device=logits.device)[batch.seq_ids[keep]]
    return logits, labels


def head_module(model):
    """The classification head of a (PEFT-wrapped) sequence classifier."""
    from ftcli.loss import causal_lm
    from ftcli.models import classifier_head

    return classifier_head(causal_lm(model))


def evaluate_head(model, units, *, batch_size: int, pad_id: int, packing: bool, pack_len: int, autocast) -> dict:
    """loss (mean cross-entropy), accuracy and macro-F1 of the head's predictions over encoded rows."""
    import torch
    import torch.nn.functional as F

    from ftcli.data.batching import eval_batches
    from ftcli.evaluate import eval_mode, label_metrics, model_device, to_device

    device = model_device(model)
    total, predicted, gold = 0.0, [], []
    with torch.no_grad(), eval_mode(model):
        for batch in eval_batches(units, batch_size, pad_id, packing, pack_len):
            with autocast():
                logits, labels = head_logits(model, to_device(batch, device))
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            predicted += logits.argmax(-1).tolist()
            gold += labels.tolist()
    return {"loss": total / max(len(gold), 1), **label_metrics(predicted, gold), "count": len(gold)}


def score_head(model, tokenizer, examples, metrics: list[str], *, template: str | None, max_len: int,
               batch_size: int, autocast) -> dict:
    """`ftcli eval` of a classifier: its head's loss, accuracy and macro-F1 on classification rows, their labels
    matched to the model's by name."""
    from ftcli.data.tokenize import Encoder, pad_id
    from ftcli.loss import causal_lm

    other = [m for m in metrics if m not in Classify.eval_metrics]
    if other:
        raise UserError(f"metrics {', '.join(other)}: a classification model has no language-model head; it is "
                        f"scored by {', '.join(Classify.eval_metrics)}")
    encoder = Encoder(tokenizer, template, max_len, "truncate", "classification")
    rows, _ = encode(encoder, examples, dict(causal_lm(model).config.label2id))
    out = evaluate_head(model, rows, batch_size=batch_size, pad_id=pad_id(tokenizer), packing=False, pack_len=max_len,
                        autocast=autocast)
    return {m: out[m] for m in metrics}


def saved_labels(folder) -> list[str] | None:
    """The label set written beside an artifact (`labels.json`), or None when the artifact has no head."""
    f = Path(folder) / LABELS_FILE
    return json.loads(f.read_text())["labels"] if f.is_file() else None


class Classify(Objective):
    name = "classify"
    task = "classification"
    formats = ("classification",)
    metrics = ("accuracy",)  # per training step: the fraction of the step's rows the head got right
    eval_metrics = ("loss", "accuracy", "macro_f1")
    count_name = "rows"

    def __init__(self, params: ClassifyParams):
        super().__init__(params)
        self.labels: list[str] = []

    def encode(self, encoder, examples):
        if not self.labels and examples:
            self.labels = list(examples[0].choices)  # the training rows' label set (data.build reads train first)
        return encode(encoder, examples, {name: i for i, name in enumerate(self.labels)})

    def base_loading(self, data) -> dict:
        from ftcli.data.tokenize import pad_id

        if len(self.labels) < 2:
            raise UserError(f"task classification: the training rows have {len(self.labels)} label(s) "
                            f"({', '.join(self.labels) or 'none'}); a classifier needs at least 2")
        return {"labels": self.labels, "pad_token_id": pad_id(data.encoder.tokenizer)}

    def prepare(self, model, ctx, data) -> None:
        self.base_model = ctx.recipe.base_model
        head = list(head_module(model).parameters())
        if not any(p.requires_grad for p in head):  # the strategy froze it (frozen, bottleneck): the head trains
            for p in head:
                p.requires_grad_(True)

    def language_model(self, model):
        from ftcli.models import language_model_view

        return language_model_view(model, self.base_model)

    def loss_sum(self, model, batch):
        import torch.nn.functional as F

        logits, labels = head_logits(model, batch)
        return F.cross_entropy(logits, labels, reduction="sum"), {"accuracy": (logits.argmax(-1) == labels).sum()}

    def evaluate(self, model, units, *, batch_size, pad_id, packing, pack_len, autocast):
        return evaluate_head(model, units, batch_size=batch_size, pad_id=pad_id, packing=packing, pack_len=pack_len,
                             autocast=autocast)

    def save(self, folder: Path) -> None:
        from ftcli import atomic

        atomic.write_json(Path(folder) / LABELS_FILE, {"labels": self.labels})

    def describe(self) -> dict:
        return {"labels": self.labels, "head": "a linear layer over the last token's hidden state"}
