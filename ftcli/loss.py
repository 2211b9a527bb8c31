"""Losses over the trained positions of a batch: summed next-token NLL, and per-token log-probabilities.

The output head runs only at positions whose next token is trained, so the [rows, length, vocab] logits tensor
is never built (for a 49k vocabulary that tensor and its gradient dominate memory). Long selections go through
the head in chunks under activation checkpointing, which bounds the logits memory to one chunk (`map_head`; the
objectives compute their own per-token terms through it). `plain_nll_sum` is the textbook computation (full
logits, shifted labels) kept as the reference the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

HEAD_CHUNK = 1024  # trained positions per chunk through the output head (fp32 logits: 1024 × vocab × 4 bytes)
SCORE_CHUNK = 256  # the same without gradients: no recomputation to amortise, so smaller chunks cost nothing


def causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, input_ids, position_ids, attention_mask=None, example_bounds=None) -> torch.Tensor:
    """The decoder's last hidden states; `attention_mask` may be a 4-D boolean mask (True: attend).
    `example_bounds` (packed rows) lets ftcli's attention run on each example alone (ftcli/attention.py)."""
    from ftcli.attention import installed

    lm = causal_lm(model)
    extra = {"example_bounds": example_bounds} if example_bounds is not None and installed(lm) else {}
    out = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=False, **extra)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def trained_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [n, hidden] of the positions that predict a trained token, those tokens [n]), in row-major
    order: the order of `batch.trained_sequence()`."""
    h = hidden_states(model, batch.input_ids, batch.position_ids, example_bounds=batch.example_bounds)[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != -100
    return h[keep], targets[keep]


def _apply_head(head, fn, h, *aligned):
    logits = head(h)
    return fn(logits if logits.dtype == torch.float64 else logits.float(), *aligned)  # at least float32


def map_head(model, h: torch.Tensor, fn, *aligned: torch.Tensor) -> torch.Tensor:
    """`fn(logits [n, vocab] float32 (float64 for a float64 model), *aligned[n, ...])` over chunks of the positions `h`; per-token results are
    concatenated, scalar results summed. With gradients each chunk is checkpointed (its logits are recomputed in
    backward instead of kept)."""
    head = causal_lm(model).get_output_embeddings()
    grad = torch.is_grad_enabled()
    chunk = HEAD_CHUNK if grad else SCORE_CHUNK
    if h.shape[0] <= chunk:
        return _apply_head(head, fn, h, *aligned)
    parts = []
    for s in range(0, h.shape[0], chunk):
        args = (head, fn, h[s : s + chunk], *(a[s : s + chunk] for a in aligned))
        parts.append(checkpoint(_apply_head, *args, use_reentrant=False) if grad else _apply_head(*args))
    return torch.cat(parts) if parts[0].ndim else torch.stack(parts).sum()


def _nll(logits, targets):
    return F.cross_entropy(logits, targets, reduction="sum")


def _logp(logits, targets):
    return -F.cross_entropy(logits, targets, reduction="none")


def nll_sum(model, batch) -> torch.Tensor:
    """Σ −log p(token) over the batch's trained tokens (each predicted from the positions before it)."""
    h, targets = trained_hidden(model, batch)
    return map_head(model, h, _nll, targets)


def token_logps(model, batch) -> torch.Tensor:
    """log p(token) of every trained token [n], in the order of `batch.trained_sequence()`."""
    h, targets = trained_hidden(model, batch)
    return map_head(model, h, _logp, targets)


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p over each sequence's trained tokens [sequences], trained tokens per sequence [sequences])."""
    seq = batch.trained_sequence()
    logp = token_logps(model, batch)
    n = batch.n_sequences
    sums = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    return sums, torch.bincount(seq, minlength=n)


def plain_nll_sum(model, batch) -> torch.Tensor:
    """Reference: the model's full logits, shifted labels, summed cross-entropy."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum",
    )
