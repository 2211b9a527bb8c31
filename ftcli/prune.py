"""`ftcli prune MODEL_OR_RUN --method magnitude|wanda --sparsity S [--pattern N:M] --out DIR`, and keeping a pruned
model's zeros through recovery training (`training.keep_zeros`).

What is pruned: every linear layer inside the transformer blocks (attention and MLP projections); embeddings, norms
and the output head stay dense, as in Wanda. How many: exactly `round(S · n)` weights of each comparison group,
the weights with the lowest score (ties broken by position, so the count is exact):

- `magnitude`: score |W|, one group per layer (the layer-wise magnitude baseline of the Wanda paper).
- `wanda` (Sun et al. 2023, arXiv 2306.11695): score |W_ij| · ‖X_j‖₂, X_j the j-th input feature of the layer over
  every token of the calibration rows; one group per output row, as the paper compares. Blocks are pruned in order
  and each block's calibration inputs are the outputs of the blocks already pruned, as the paper's code does. Each
  row runs alone (no padding enters the norms).
- `--pattern N:M`: in every run of M consecutive weights along a row's inputs, the M−N lowest-scoring are zeroed
  (2:4 is the pattern sparse tensor cores run); the sparsity is then 1 − N/M.

Perplexity (and loss) on `--data` rows are measured before and after; calibration rows are taken after the rows
scored, so the two do not overlap. The result is a transformers folder (safetensors) with `prune.json`: method,
sparsity per layer, perplexity before and after, calibration rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ftcli.errors import UserError

METHODS = ("magnitude", "wanda")
REPORT = "prune.json"


@dataclass
class PruneResult:
    out: Path
    method: str
    sparsity: float
    pattern: str | None
    layers: int
    pruned: int  # weights set to zero
    total: int  # weights in the pruned layers
    worst_layer_error: float  # max |layer sparsity − asked|
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    calibration_rows: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0
    per_layer: dict = field(default_factory=dict)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    if pattern is None:
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise UserError(f"--pattern {pattern!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise UserError(f"--pattern {pattern!r}: needs 0 < N < M (keep N of every M weights)")
    return n, m


def resolve_sparsity(sparsity: float | None, pattern: tuple[int, int] | None) -> float:
    if pattern:
        implied = 1 - pattern[0] / pattern[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise UserError(f"--sparsity {sparsity} contradicts --pattern {pattern[0]}:{pattern[1]} "
                            f"(which prunes {implied:g}); give one of them")
        return implied
    if sparsity is None:
        raise UserError("give --sparsity S (0 < S < 1) or --pattern N:M")
    if not 0 < sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be between 0 and 1 (exclusive)")
    return sparsity


# ------------------------------------------------------------------------------------------------------------
# the masks


def prune_mask(score: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """True where a weight is pruned: the lowest scores of each group (the whole matrix, each row, or each run of M
    inputs), exactly round(sparsity · group size) of them (N:M: M − N of each M)."""
    rows, cols = score.shape
    if pattern:
        n, m = pattern
        if cols % m:
            raise UserError(f"--pattern {n}:{m}: a layer has {cols} inputs, not a multiple of {m}")
        groups = score.reshape(rows, cols // m, m)
        order = groups.argsort(dim=-1, stable=True)[..., : m - n]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)
    if per_row:
        k = round(sparsity * cols)
        order = score.argsort(dim=1, stable=True)[:, :k]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
    k = round(sparsity * score.numel())
    order = score.flatten().argsort(stable=True)[:k]
    return torch.zeros(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, order, True).view_as(score)


def block_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every linear layer inside the decoder blocks."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def decoder_blocks(model):
    from ftcli.loss import causal_lm

    blocks = getattr(causal_lm(model).get_decoder(), "layers", None)
    if blocks is None:
        raise UserError(f"{type(model).__name__}: no decoder blocks (model.layers) found to prune")
    return blocks


@torch.no_grad()
def magnitude(model, sparsity: float, pattern) -> dict[str, float]:
    out = {}
    for name, lin in block_linears(model):
        mask = prune_mask(lin.weight.abs(), sparsity, pattern, per_row=False)
        lin.weight[mask] = 0
        out[name] = float(mask.float().mean())
    return out


@torch.no_grad()
def wanda(model, rows: list[list[int]], sparsity: float, pattern, log=print) -> dict[str, float]:
    """Wanda, block by block: catch every row's input to the first block, then for each block gather ‖X_j‖² of
    each linear layer's inputs, prune, and run the pruned block to get the next block's inputs."""
    blocks = decoder_blocks(model)
    caught: list[tuple[torch.Tensor, dict]] = []

    class _Caught(Exception):
        pass

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in rows:
            try:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    out = {}
    prefix = {id(m): n for n, m in model.named_modules()}
    for b, block in enumerate(blocks):
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        sq = {id(m): torch.zeros(m.in_features, dtype=torch.float32, device=device) for _, m in linears}

        def gather(module, args):
            x = args[0].detach().float()
            sq[id(module)] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)

        handles = [m.register_forward_pre_hook(gather) for _, m in linears]
        try:
            for hidden, kwargs in caught:
                block(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for _, m in linears:
            score = m.weight.abs().float() * sq[id(m)].sqrt().unsqueeze(0)
            mask = prune_mask(score, sparsity, pattern, per_row=True)
            m.weight[mask] = 0
            out[prefix[id(m)]] = float(mask.float().mean())
        caught = [(_hidden(block(hidden, **kwargs)), kwargs) for hidden, kwargs in caught]
        log(f"wanda: block {b + 1}/{len(blocks)} pruned")
    return out


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


# ------------------------------------------------------------------------------------------------------------
# the command


def prune(spec: str, *, method: str, sparsity: float | None, pattern: str | None, out: Path, data: Path | None,
          fmt: str = "alpaca", eval_rows: int = 100, calibration_rows: int = 32, max_len: int = 512,
          template: str | None = None, overwrite: bool = False, allow_pickle: bool = False, log=print) -> PruneResult:
    """Prune `spec` (a built-in alias, a model folder or a run) into the transformers folder `out`."""
    from ftcli import atomic, scoring
    from ftcli.data.tokenize import Encoder
    from ftcli.models import save_model_folder

    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose from {', '.join(METHODS)}")
    nm = parse_pattern(pattern)
    sparsity = resolve_sparsity(sparsity, nm)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    if method == "wanda" and data is None:
        raise UserError("--method wanda needs calibration rows: give --data FILE")
    es = calibration = None
    if data is not None:
        es = scoring.EvalSet(data=str(data), format=fmt, metrics=["loss", "perplexity"],
                             limit=eval_rows + (calibration_rows if method == "wanda" else 0))
        rows = es.load()
        if method == "wanda" and len(rows) <= eval_rows:
            raise UserError(f"--data {data}: {len(rows)} rows; wanda calibrates on the rows after the "
                            f"{eval_rows} scored ones (lower --eval-rows or give more rows)")
        calibration, es.examples = rows[eval_rows:], rows[:eval_rows]
    t0 = time.perf_counter()
    model, tokenizer, template = _load(spec, template, allow_pickle=allow_pickle, log=log)
    result = PruneResult(out=out, method=method, sparsity=sparsity, pattern=pattern, layers=0, pruned=0, total=0,
                         worst_layer_error=0.0)
    if es is not None:
        log(f"perplexity before, on {len(es.examples)} rows of {data}")
        result.before = _ppl(scoring.score(model, tokenizer, es, template=template, examples=es.examples))
    if method == "wanda":
        encoder = Encoder(tokenizer, template, max_len, "truncate", fmt)
        ids = [e.input_ids for e in encoder.encode_all(calibration)[0] if e is not None]
        result.calibration_rows, result.calibration_tokens = len(ids), sum(map(len, ids))
        log(f"wanda: {len(ids)} calibration rows, {result.calibration_tokens} tokens")
        per_layer = wanda(model, ids, sparsity, nm, log=log)
    else:
        per_layer = magnitude(model, sparsity, nm)
    if not per_layer:
        raise UserError(f"{spec}: no linear layer inside decoder blocks to prune")
    sizes = {n: m.weight.numel() for n, m in block_linears(model)}
    result.per_layer = per_layer
    result.layers = len(per_layer)
    result.total = sum(sizes[n] for n in per_layer)
    result.pruned = sum(int((m.weight == 0).sum()) for n, m in block_linears(model) if n in per_layer)
    result.worst_layer_error = max(abs(s - sparsity) for s in per_layer.values())
    if es is not None:
        log("perplexity after")
        result.after = _ppl(scoring.score(model, tokenizer, es, template=template, examples=es.examples))
    result.seconds = time.perf_counter() - t0
    with atomic.folder(out) as tmp:
        save_model_folder(model, tmp, tokenizer)
        atomic.write_json(tmp / REPORT, {**asdict(result), "out": str(out), "model": spec,
                                         "data": str(data) if data else None, "format": fmt})
    return result


def _load(spec: str, template: str | None, *, allow_pickle: bool, log):
    """(model, tokenizer, chat template): a run's model with its adapter folded into the float32 base (a 4-bit
    base de-quantised first), or a base model; float32, in eval mode."""
    from ftcli import models
    from ftcli.run_folder import RunFolder

    if RunFolder.holds_run(spec):
        run = RunFolder(spec)
        model, tokenizer = run.load_merged(allow_pickle=allow_pickle, log=log)
        return model.float().eval(), tokenizer, template or run.chat_template
    model, tokenizer = models.load_base(spec, allow_pickle=allow_pickle, log=log)
    return model.float().eval(), tokenizer, template


def _ppl(scores: dict) -> dict:
    return {k: scores[k] for k in ("loss", "perplexity", "rows") if k in scores}


def sparsity_of(model) -> float:
    """Fraction of zeros over the block linear weights."""
    z = n = 0
    for _, m in block_linears(model):
        z += int((m.weight == 0).sum())
        n += m.weight.numel()
    return z / max(n, 1)


# ------------------------------------------------------------------------------------------------------------
# recovery training


class KeepZeros:
    """A Trainer watcher (`training.keep_zeros`): every weight that is exactly zero when training starts is set back
    to zero after each update, whatever the optimiser did (AdamW's decay and moments would move it)."""

    def __init__(self, named_params):
        self.masks = {n: p.detach() != 0 for n, p in named_params if bool((p.detach() == 0).any())}
        self.zeros = sum(int((~m).sum()) for m in self.masks.values())

    def before_update(self, named_params) -> None:
        pass

    @torch.no_grad()
    def after_update(self, named_params) -> None:
        for n, p in named_params:
            if n in self.masks:
                p.mul_(self.masks[n])

    def state_tensors(self) -> dict:
        return {}

    def load_state_tensors(self, tensors: dict, steps: int) -> None:
        pass

    def finish(self, run_dir: Path, named_params) -> None:
        pass
