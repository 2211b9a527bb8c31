"""Metrics: loss and perplexity on the trained span, and generation metrics (exact match and friends).

- loss / perplexity: token-weighted over all rows: Σ NLL / Σ trained tokens, perplexity = exp(loss).
- exact_match: greedy generation (batched, left-padded, the model's chat template and stop tokens) compared with
  the reference after normalisation: lower-cased, punctuation removed, the articles a/an/the removed, whitespace
  collapsed (the SQuAD normalisation).
"""

from __future__ import annotations

import math
import re
import string
import time
from contextlib import nullcontext

import torch

from ftcli.data.batching import eval_batches
from ftcli.loss import nll_sum

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


def generation_metrics(model, tokenizer, encoder, examples, metrics: list[str], *, max_new_tokens: int,
                       limit: int | None, batch_size: int = 16, autocast=nullcontext) -> dict:
    """Generate for the first `limit` examples' prompts and score the answers."""
    wanted = [m for m in metrics if m == "exact_match"]
    if not wanted:
        return {}
    rows = examples[:limit] if limit else examples
    t0 = time.perf_counter()
    preds = generate(model, tokenizer, [encoder.prompt_ids(ex.prompt) for ex in rows], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, stop_ids=stop_token_ids(tokenizer, encoder), autocast=autocast)
    refs = [ex.answer for ex in rows]
    out = {"exact_match": exact_match(preds, refs), "rows": len(rows),
           "rows_per_s": len(rows) / max(time.perf_counter() - t0, 1e-9)}
    out["samples"] = [{"prompt": rows[i].prompt[-1]["content"], "reference": refs[i], "prediction": preds[i]}
                      for i in range(min(3, len(rows)))]
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def to_device(batch, device):
    if batch.input_ids.device == device:
        return batch
    from dataclasses import replace

    return replace(batch, input_ids=batch.input_ids.to(device), labels=batch.labels.to(device),
                   position_ids=batch.position_ids.to(device))
