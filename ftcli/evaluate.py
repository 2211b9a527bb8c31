"""Metrics, each defined here once and used by `ftcli eval`, validation during training and retention sets.

- loss / perplexity: token-weighted over all rows: Σ NLL / Σ trained tokens, perplexity = exp(loss).
- exact_match: greedy generation (batched, left-padded, the model's chat template and stop tokens) compared with
  the reference after normalisation: lower-cased, punctuation removed, the articles a/an/the removed, whitespace
  collapsed (the SQuAD normalisation).
- rougeL: ROUGE-L F-measure of the generation against the reference (`rouge-score`, stemming on), mean over rows.
- numeric: the last number in the generation equals the last number in the reference (thousands separators
  dropped; "#### 72" in GSM8K answers is their last number).
- accuracy / choice: no free generation. Each candidate answer (a label, or a multiple-choice option) is scored as
  the assistant's reply, end-of-turn token included, by its summed log-likelihood given the prompt; the highest
  wins. `accuracy` on classification rows and `choice` on multiple-choice rows are the same computation.
"""

from __future__ import annotations

import math
import re
import string
import time
from contextlib import nullcontext

import torch

from ftcli.data.batching import eval_batches
from ftcli.loss import nll_sum, row_nll

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@torch.no_grad()
def loss_metrics(model, encoded, *, batch_size: int, pad_id: int, packing: bool, pack_len: int,
                 autocast=nullcontext) -> dict:
    """Token-weighted loss and perplexity over `encoded` rows."""
    was_training = model.training
    model.eval()
    device = _device(model)
    total, n = 0.0, 0
    try:
        for batch in eval_batches(encoded, batch_size, pad_id, packing, pack_len):
            batch = to_device(batch, device)
            with autocast():
                total += float(nll_sum(model, batch))
            n += batch.n_trained
    finally:
        model.train(was_training)
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "trained_tokens": n}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 16,
             stop_ids: list[int] | None = None, autocast=nullcontext) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids or [tokenizer.eos_token_id]
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            with autocast():
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, eos_token_id=stops, pad_token_id=pad, use_cache=True,
                )
            for r, i in enumerate(idx):
                outputs[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def stop_token_ids(tokenizer, encoder) -> list[int]:
    """The ids that end an assistant turn: the template's end-of-turn token and the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id}
    if encoder.eot:
        eot = tokenizer.convert_tokens_to_ids(encoder.eot)
        if isinstance(eot, int) and eot != tokenizer.unk_token_id:
            ids.add(eot)
    return sorted(i for i in ids if i is not None)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(predictions: list[str], references: list[str]) -> float:
    hits = 0
    for p, r in zip(predictions, references):
        a, b = last_number(p), last_number(r)
        hits += a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return hits / max(len(references), 1)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


GENERATION_METRICS = {"exact_match": exact_match, "rougeL": rouge_l, "numeric": numeric_match}
CHOICE_METRICS = ("accuracy", "choice")


def generation_metrics(model, tokenizer, encoder, examples, metrics: list[str], *, max_new_tokens: int,
                       limit: int | None, batch_size: int = 16, autocast=nullcontext) -> dict:
    """Generate for the first `limit` examples' prompts and score the answers with each generation metric."""
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    if not wanted:
        return {}
    rows = examples[:limit] if limit else examples
    t0 = time.perf_counter()
    preds = generate(model, tokenizer, [encoder.prompt_ids(ex.prompt) for ex in rows], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, stop_ids=stop_token_ids(tokenizer, encoder), autocast=autocast)
    refs = [ex.answer for ex in rows]
    out = {m: GENERATION_METRICS[m](preds, refs) for m in wanted}
    out.update({"rows": len(rows), "rows_per_s": len(rows) / max(time.perf_counter() - t0, 1e-9)})
    out["samples"] = [{"prompt": rows[i].prompt[-1]["content"], "reference": refs[i], "prediction": preds[i]}
                      for i in range(min(3, len(rows)))]
    return out


@torch.no_grad()
def choice_scores(model, encoder, examples, *, batch_size: int = 16, autocast=nullcontext) -> list[list[float]]:
    """Per example, the summed log-likelihood of each of its `choices` as the assistant's reply."""
    from dataclasses import replace

    from ftcli.data.batching import collate

    candidates = []  # (example index, choice index, Encoded)
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError("choice scoring needs rows with choices (format classification or choice)")
        variants = [replace(ex, messages=ex.prompt + [{"role": "assistant", "content": c}]) for c in ex.choices]
        encoded, _ = encoder.encode_all(variants)
        candidates += [(i, j, enc) for j, enc in enumerate(encoded) if enc is not None]
    scores = [[-math.inf] * len(ex.choices) for ex in examples]
    was_training = model.training
    model.eval()
    device = _device(model)
    pad = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else encoder.eos_id
    order = sorted(range(len(candidates)), key=lambda k: len(candidates[k][2].input_ids))
    try:
        for s in range(0, len(order), batch_size):
            chunk = [candidates[k] for k in order[s : s + batch_size]]
            batch = to_device(collate([c[2] for c in chunk], pad, False, 0), device)
            with autocast():
                nll = row_nll(model, batch).tolist()
            for (i, j, _), v in zip(chunk, nll):
                scores[i][j] = -v
    finally:
        model.train(was_training)
    return scores


def choice_accuracy(model, encoder, examples, *, batch_size: int = 16, autocast=nullcontext) -> dict:
    """The fraction of examples whose gold choice has the highest log-likelihood (ties go to the first)."""
    t0 = time.perf_counter()
    scores = choice_scores(model, encoder, examples, batch_size=batch_size, autocast=autocast)
    hits = sum(max(range(len(s)), key=s.__getitem__) == ex.gold for s, ex in zip(scores, examples))
    return {"accuracy": hits / max(len(examples), 1), "rows": len(examples),
            "rows_per_s": len(examples) / max(time.perf_counter() - t0, 1e-9)}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def to_device(batch, device):
    if batch.input_ids.device == device:
        return batch
    from dataclasses import replace

    return replace(batch, input_ids=batch.input_ids.to(device), labels=batch.labels.to(device),
                   position_ids=batch.position_ids.to(device))
