"""The training loss: summed next-token NLL over trained positions only.

The output head runs only at positions whose next token is trained, so the [rows, length, vocab] logits tensor
is never built (for a 49k vocabulary that tensor and its gradient dominate memory). Long selections go through
the head in chunks under activation checkpointing, which bounds the logits memory to one chunk. `plain_nll_sum`
is the textbook computation (full logits, shifted labels) kept as the reference the tests compare against.
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


def _head_nll(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def nll_sum(model, batch) -> torch.Tensor:
    """Σ −log p(token) over the batch's trained tokens (each predicted from the positions before it)."""
    lm = causal_lm(model)
    h = hidden_states(model, batch.input_ids, batch.position_ids, example_bounds=batch.example_bounds)[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != -100
    h, targets = h[keep], targets[keep]
    head = lm.get_output_embeddings()
    grad = torch.is_grad_enabled()  # without gradients (scoring) the chunks need no checkpoint
    chunk = HEAD_CHUNK if grad else SCORE_CHUNK
    if h.shape[0] <= chunk:
        return _head_nll(head, h, targets)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        part = (head, h[s : s + chunk], targets[s : s + chunk])
        total = total + (checkpoint(_head_nll, *part, use_reentrant=False) if grad else _head_nll(*part))
    return total


def plain_nll_sum(model, batch) -> torch.Tensor:
    """Reference: the model's full logits, shifted labels, summed cross-entropy."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum",
    )

