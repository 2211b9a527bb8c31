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
- macro_f1 (classification rows): per label, F1 = 2·TP / (2·TP + FP + FN) of the predicted labels, averaged over
  the labels that occur in the gold or the predicted labels (scikit-learn's `f1_score(average="macro")`).
  A model with a classification head (`task: classification`) predicts the label with the largest logit; the
  metrics are the same functions of its predictions (`label_metrics`).

On several processes (training under torchrun) each rank scores its share of the rows and the results are
gathered (ftcli/distributed.py): the numbers are those of one process; in one process nothing changes.
"""

from __future__ import annotations

import math
import re
import string
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ftcli import distributed
from ftcli.data.batching import eval_batches
from ftcli.loss import causal_lm, hidden_states, nll_sum

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@contextmanager
def eval_mode(model):
    """The model in eval mode for the block, its training flag restored after (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@torch.no_grad()
def loss_metrics(model, encoded, *, batch_size: int, pad_id: int, packing: bool, pack_len: int,
                 autocast=nullcontext) -> dict:
    """Token-weighted loss and perplexity over `encoded` rows."""
    device = model_device(model)
    total, n = 0.0, 0
    with eval_mode(model):
        for batch in eval_batches(distributed.shard(encoded), batch_size, pad_id, packing, pack_len):
            batch = to_device(batch, device)
            with autocast():
                total += float(nll_sum(model, batch))
            n += batch.n_trained
    total, n = distributed.all_sum([total, n])
    n = int(n)
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "trained_tokens": n}


@dataclass(frozen=True)
class Sampling:
    """How each next token is drawn: greedy (temperature 0), or sampled at `temperature` from the smallest set of
    tokens whose probability reaches `top_p` and at most `top_k` of them (0: no limit)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def kwargs(self) -> dict:
        """The settings as `model.generate` keywords (every one given, so the model's own defaults never apply)."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {self.top_k or 'off'}"


@dataclass
class Generation:
    text: str  # decoded, special tokens dropped, stripped
    raw: str  # the same, unstripped (a plain-text continuation joins its prompt as it is)
    tokens: int  # new tokens, the stop token included
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)


@torch.no_grad()
def generate_all(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 16,
                 stop_ids: list[int] | None = None, autocast=nullcontext, sampling: Sampling = Sampling(),
                 seed: int | None = None, samples: int = 1, streamer=None) -> list[list[Generation]]:
    """`samples` continuations of each token-id prompt (per prompt, a list), batched with left padding.

    Prompts are sorted by length and cut into batches of `batch_size` prompts; each batch is one `model.generate`
    call with exactly these settings. With `seed` the draws are reproducible: the RNG is seeded once before the
    first batch (inside a forked RNG state, so the caller's stream is untouched), which makes one prompt alone
    the same as `torch.manual_seed(seed); model.generate(...)`. `streamer` (one prompt, one sample) receives the
    tokens as they come."""
    from ftcli.data.tokenize import pad_id

    device = model_device(model)
    pad = pad_id(tokenizer)
    stops = stop_ids or [tokenizer.eos_token_id]
    outputs: list[list[Generation]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()  # callers' RNG untouched
    with eval_mode(model), rng:
        if seed is not None:
            torch.manual_seed(seed)
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
                    eos_token_id=stops, pad_token_id=pad, use_cache=True, num_return_sequences=samples,
                    streamer=streamer, **sampling.kwargs(),
                )
            for r, i in enumerate(idx):
                for k in range(samples):
                    new = out[r * samples + k, width:].tolist()
                    cut = next((t + 1 for t, tok in enumerate(new) if tok in stops), None)
                    new = new[:cut] if cut else new
                    raw = tokenizer.decode(new, skip_special_tokens=True)
                    outputs[i].append(Generation(raw.strip(), raw, len(new), cut is not None))
    return outputs


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 16,
             stop_ids: list[int] | None = None, autocast=nullcontext, sample_seed: int | None = None) -> list[str]:
    """Greedy continuations of token-id prompts (decoded text). With `sample_seed`: sampled from the model's own
    distribution instead (temperature 1, no top-k/top-p), reproducibly for the seed."""
    sampling = Sampling() if sample_seed is None else Sampling(temperature=1.0)
    gens = generate_all(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        stop_ids=stop_ids, autocast=autocast, sampling=sampling, seed=sample_seed)
    return [g[0].text for g in gens]


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


def generation_metrics(model, tokenizer, encoder, examples, metrics: list[str], *, max_new_tokens: int,
                       limit: int | None, batch_size: int = 16, autocast=nullcontext) -> dict:
    """Generate for the first `limit` examples' prompts and score the answers with each generation metric."""
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    if not wanted:
        return {}
    rows = examples[:limit] if limit else examples
    t0 = time.perf_counter()
    prompts = distributed.shard([encoder.prompt_ids(ex.prompt) for ex in rows])
    preds = distributed.gather(generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        stop_ids=stop_token_ids(tokenizer, encoder), autocast=autocast))
    refs = [ex.answer for ex in rows]
    out = {m: GENERATION_METRICS[m](preds, refs) for m in wanted}
    out.update({"rows": len(rows), "rows_per_s": len(rows) / max(time.perf_counter() - t0, 1e-9)})
    out["samples"] = [{"prompt": rows[i].prompt[-1]["content"], "reference": refs[i], "prediction": preds[i]}
                      for i in range(min(3, len(rows)))]
    return out


@torch.no_grad()
def choice_scores(model, encoder, examples, *, batch_size: int = 16, autocast=nullcontext) -> list[list[float]]:
    """Per example, the summed log-likelihood of each of its `choices` as the assistant's reply.

    The candidates of one example share their prompt, so each example is one row laid out as a tree: the shared
    prefix once, then every candidate's tail, each tail attending to the prefix and to itself only (a 4-D mask;
    its positions continue from the prefix). Two labels cost one prompt, not two; four options, one, not four.
    """
    from dataclasses import replace

    from ftcli.data.tokenize import pad_id

    trees = []
    for ex in examples:
        if not ex.choices:
            raise ValueError("choice scoring needs rows with choices (format classification or choice)")
        variants = [replace(ex, messages=ex.prompt + [{"role": "assistant", "content": c}]) for c in ex.choices]
        trees.append(_tree([e for e in encoder.encode_all(variants)[0]]))
    scores = [[-math.inf] * len(ex.choices) for ex in examples]
    device = model_device(model)
    pad = pad_id(encoder.tokenizer)
    order = sorted(range(len(trees)), key=lambda i: len(trees[i][0]))
    with eval_mode(model):
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(trees[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            pos = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.eye(width, dtype=torch.bool).repeat(len(idx), 1, 1)  # pads see themselves (no NaN rows)
            src, tgt, slot = [], [], []
            for r, i in enumerate(idx):
                row_ids, row_pos, row_mask, scored = trees[i]
                n = len(row_ids)
                ids[r, :n], pos[r, :n], mask[r, :n, :n] = torch.tensor(row_ids), torch.tensor(row_pos), row_mask
                for choice, source, target in scored:
                    src.append(r * width + source)
                    tgt.append(target)
                    slot.append((i, choice))
            with autocast():
                h = hidden_states(model, ids.to(device), pos.to(device), mask[:, None].to(device))
                logits = causal_lm(model).get_output_embeddings()(h.reshape(-1, h.shape[-1])[torch.tensor(src)])
            logp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(tgt, device=device)[:, None])
            for (i, choice), v in zip(slot, logp[:, 0].tolist()):
                scores[i][choice] = (0.0 if scores[i][choice] == -math.inf else scores[i][choice]) + v
    return scores


def _tree(encoded: list) -> tuple[list[int], list[int], torch.Tensor, list[tuple[int, int, int]]]:
    """One example's candidates as a prefix tree row: (ids, position ids, [n, n] attention mask, and per scored
    token (candidate, index of the position that predicts it, token id))."""
    live = [(j, e) for j, e in enumerate(encoded) if e is not None]
    first = min(e.trained.index(True) for _, e in live)  # shared up to the first scored token of any candidate
    k = 0
    while k < first and all(k < len(e.input_ids) and e.input_ids[k] == live[0][1].input_ids[k] for _, e in live):
        k += 1
    ids, pos = list(live[0][1].input_ids[:k]), list(range(k))
    spans, scored = [], []
    for j, e in live:
        last = max(t for t, m in enumerate(e.trained) if m)  # the tail ends at its last scored token
        tail = e.input_ids[k : last + 1]
        start = len(ids)
        for t in range(k, last + 1):
            if e.trained[t]:
                scored.append((j, k - 1 if t == k else start + (t - k) - 1, e.input_ids[t]))
        ids += tail
        pos += range(k, k + len(tail))
        spans.append((start, len(ids)))
    n = len(ids)
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for s0, e0 in spans:  # a tail does not see the tails before it
        mask[s0:e0, k:s0] = False
    return ids, pos, mask, scored


def label_metrics(predicted: list[int], gold: list[int]) -> dict:
    """accuracy and macro-F1 of predicted label indices against the gold ones (see the module docstring)."""
    n = max(len(gold), 1)
    f1 = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        wrong = sum((p == label) != (g == label) for p, g in zip(predicted, gold))  # FP + FN
        f1.append(2 * tp / (2 * tp + wrong))
    return {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / n, "macro_f1": sum(f1) / max(len(f1), 1)}


def choice_accuracy(model, encoder, examples, *, batch_size: int = 16, autocast=nullcontext) -> dict:
    """The fraction of examples whose gold choice has the highest log-likelihood (ties go to the first), and the
    macro-F1 of those predictions (meaningful where every row has the same choices: classification rows)."""
    t0 = time.perf_counter()
    scores = distributed.gather(choice_scores(model, encoder, distributed.shard(examples), batch_size=batch_size,
                                              autocast=autocast))
    predicted = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return {**label_metrics(predicted, [ex.gold for ex in examples]), "rows": len(examples),
            "rows_per_s": len(examples) / max(time.perf_counter() - t0, 1e-9)}


def to_device(batch, device):
    if batch.input_ids.device == device:
        return batch
    from dataclasses import replace

    return replace(batch, input_ids=batch.input_ids.to(device), labels=batch.labels.to(device),
                   position_ids=batch.position_ids.to(device),
                   seq_ids=batch.seq_ids.to(device) if batch.seq_ids is not None else None)
