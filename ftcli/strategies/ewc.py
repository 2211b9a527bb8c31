"""`ewc`: Elastic Weight Consolidation (Kirkpatrick et al. 2017, arXiv 1612.00796) around another strategy.

loss += λ/2 · Σᵢ Fᵢ (θᵢ − θ*ᵢ)², θ* the base weights and F the diagonal empirical Fisher of the base model: the
mean over rows of the squared gradient of each row's mean answer-token NLL, one row at a time (a batch gradient
squared is not a mean of squared gradients). The rows are a retention set named in the recipe (`fisher_data`),
or else the base model's own answers to the training prompts, sampled with the training seed (the Fisher is an
expectation over the model's own distribution). F is cached on disk, keyed by the base
weights, the rows and the settings, so a second run reuses it. With `fisher_normalize` (default) F is divided by
its mean, so λ means the same on any model; the stored F is what the penalty uses either way.

With a LoRA inner strategy the penalty applies to the effective weight change of each adapted module,
θ − θ* = ΔW = s·B·A, weighted by the Fisher of that module's base weight. The loop logs the task loss and the
penalty separately (`loss` and `penalty` in metrics.jsonl).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import ConfigDict, Field

from ftcli.strategies.base import Context, Params, Strategy
from ftcli.strategies.frozen import FrozenParams
from ftcli.strategies.full import FullParams
from ftcli.strategies.hft import HftParams
from ftcli.strategies.lora import LoraParams

FISHER_VERSION = "2"  # 2: self-generated answers are sampled, not greedy
InnerParams = Annotated[Union[FullParams, FrozenParams, HftParams, LoraParams], Field(discriminator="name")]


class EwcParams(Params):
    """EWC penalty around an inner strategy (full, frozen, hft or lora)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    name: Literal["ewc"] = "ewc"
    inner: InnerParams = Field(default_factory=FullParams, description="the strategy that trains: full, frozen, hft, lora")
    lambda_: float = Field(1.0, ge=0, alias="lambda", description="penalty strength λ")
    fisher_data: str | None = Field(None, description="retention rows for the Fisher; null: the base model's own "
                                                      "answers to the training prompts")
    fisher_format: Literal["alpaca", "chat", "completion", "classification", "choice"] = "alpaca"
    fisher_fields: dict[str, str] = Field(default_factory=dict)
    fisher_rows: int = Field(64, ge=1, description="rows the Fisher is averaged over")
    fisher_max_new_tokens: int = Field(64, ge=1, description="length of self-generated answers")
    fisher_normalize: bool = Field(True, description="divide F by its mean so λ is comparable across models")


class Ewc(Strategy):
    name = "ewc"

    def __init__(self, params: EwcParams):
        super().__init__(params)
        from ftcli import strategies

        self.inner = strategies.get(params.inner)
        self.artifact = self.inner.artifact
        self.adapter_off_is_base = self.inner.adapter_off_is_base
        self.terms: list = []  # (F, θ*, parameter) for full-like inners; (F, A, B, scale) for lora
        self.lora = params.inner.name == "lora"
        self.info: dict = {}

    # -- the interface -------------------------------------------------------------------------------------
    def prepare(self, model, ctx: Context):
        fisher = None if ctx.dry_run else self._fisher(model, ctx)
        model = self.inner.prepare(model, ctx)
        if fisher is not None:
            self.terms = self._lora_terms(model, fisher) if self.lora else self._full_terms(model, fisher)
            self.info["penalised_values"] = sum(t[0].numel() for t in self.terms)
        return model

    def train_params(self, model):
        return self.inner.train_params(model)

    def unsupported(self):
        return self.inner.unsupported()

    def base_loading(self, *, for_export: bool = False) -> dict:
        return self.inner.base_loading(for_export=for_export)

    def memory(self, *, total, trainable, block_linear, recipe):
        out = self.inner.memory(total=total, trainable=trainable, block_linear=block_linear, recipe=recipe)
        # F for every base weight; full-like inners also keep θ* (a LoRA inner's anchor is ΔW = 0)
        out["EWC Fisher + anchor"] = (total - trainable) * 4 if self.lora else total * 4 * 2
        return out

    def on_step(self, step: int, model) -> None:
        self.inner.on_step(step, model)

    def after_step(self, step: int, model) -> None:
        self.inner.after_step(step, model)

    def save(self, model, folder: Path) -> None:
        self.inner.save(model, folder)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def extra_loss(self, model, batch):
        if not self.terms or self.params.lambda_ == 0:
            return None
        total = None
        for term in self.terms:
            if self.lora:
                f, a, b, scale = term
                delta = (b @ a) * scale
            else:
                f, star, p = term
                delta = p - star
            t = (f * delta.pow(2)).sum()
            total = t if total is None else total + t
        return 0.5 * self.params.lambda_ * total

    def describe(self, model) -> dict:
        return {"inner": self.params.inner.name, "lambda": self.params.lambda_, **self.info,
                "inner_details": self.inner.describe(model)}

    # -- Fisher ----------------------------------------------------------------------------------------------
    def _fisher(self, model, ctx: Context) -> dict:
        import torch
        from safetensors.torch import load_file, save_file

        from ftcli import atomic
        from ftcli.models import cache_root

        examples, source = self._fisher_examples(model, ctx)
        key = self._cache_key(ctx, examples)
        path = cache_root() / "fisher" / f"{key}.safetensors"
        self.info.update({"fisher_source": source, "fisher_rows": len(examples), "fisher_cache": str(path)})
        if path.is_file():
            ctx.log(f"ewc: Fisher from cache {path}")
            fisher = load_file(str(path))
            self.info["fisher_cached"] = True
        else:
            fisher = estimate_fisher(model, self._encoder(ctx), examples, log=ctx.log)
            with atomic.file(path) as tmp:
                save_file(fisher, str(tmp))
            self.info["fisher_cached"] = False
        if self.params.fisher_normalize:
            mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
            fisher = {k: v / mean for k, v in fisher.items()}
            self.info["fisher_mean_raw"] = float(mean)
        return fisher

    def _encoder(self, ctx: Context):
        from ftcli.data.tokenize import Encoder

        d = ctx.recipe.data
        fmt = self.params.fisher_format if self.params.fisher_data else d.format
        return Encoder(ctx.tokenizer, d.chat_template, d.max_len, "truncate", fmt)

    def _fisher_examples(self, model, ctx: Context):
        from dataclasses import replace

        from ftcli.data import load_examples
        from ftcli.evaluate import generate, stop_token_ids

        p: EwcParams = self.params
        if p.fisher_data:
            rows = load_examples(p.fisher_data, p.fisher_format, p.fisher_fields, limit=p.fisher_rows)
            return rows, p.fisher_data
        train = ctx.train_data.examples[: p.fisher_rows]
        if train[0].messages is None:  # completion data: no prompt to answer; the text itself
            return train, "training text (completion format)"
        encoder = self._encoder(ctx)
        seed = ctx.recipe.training.seed
        ctx.log(f"ewc: sampling the base model's answers to {len(train)} training prompts for the Fisher")
        # sampled, not greedy: the Fisher is an expectation over the model's own distribution (Kirkpatrick et al.)
        answers = generate(model, ctx.tokenizer, [encoder.prompt_ids(ex.prompt) for ex in train],
                           max_new_tokens=p.fisher_max_new_tokens, stop_ids=stop_token_ids(ctx.tokenizer, encoder),
                           sample_seed=seed)
        rows = [replace(ex, messages=ex.prompt + [{"role": "assistant", "content": a or "."}], choices=None, gold=None)
                for ex, a in zip(train, answers)]
        return rows, f"base model's own sampled answers to the training prompts (seed {seed})"

    def _cache_key(self, ctx: Context, examples) -> str:
        from ftcli.models import fingerprint

        p: EwcParams = self.params
        h = hashlib.sha256(json.dumps({"v": FISHER_VERSION, "base": fingerprint(ctx.recipe.base_model),
                                       "template": ctx.recipe.data.chat_template, "max_len": ctx.recipe.data.max_len,
                                       }, sort_keys=True).encode())
        for ex in examples:
            h.update(json.dumps([ex.messages, ex.text], sort_keys=True).encode())
        return h.hexdigest()[:32] + f"-{p.fisher_rows}"

    # -- the penalised tensors ---------------------------------------------------------------------------------
    def _full_terms(self, model, fisher: dict) -> list:
        terms = []
        for name, p in self.inner.train_params(model):
            if name in fisher:
                terms.append((fisher[name].to(p.device), p.detach().clone(), p))
        return terms

    def _lora_terms(self, model, fisher: dict) -> list:
        from peft.tuners.lora import LoraLayer

        terms = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                key = name.removeprefix("base_model.model.") + ".weight"
                if key in fisher:
                    terms.append((fisher[key], module.lora_A["default"].weight, module.lora_B["default"].weight,
                                  module.scaling["default"]))
        return terms


def estimate_fisher(model, encoder, examples, *, log=print) -> dict:
    """Diagonal empirical Fisher: mean over rows of (∂ mean answer NLL / ∂θ)², one row at a time."""
    import torch

    from ftcli.data.batching import collate
    from ftcli.data.tokenize import pad_id
    from ftcli.evaluate import eval_mode
    from ftcli.loss import nll_sum

    encoded = [e for e in encoder.encode_all(examples)[0] if e is not None]
    named = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
    flags = [p.requires_grad for _, p in named]
    for _, p in named:
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    pad = pad_id(encoder.tokenizer)
    try:
        with eval_mode(model), torch.random.fork_rng():
            for i, enc in enumerate(encoded):
                batch = collate([enc], pad, False, len(enc.input_ids))
                loss = nll_sum(model, batch) / max(batch.n_trained, 1)
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                for (n, _), g in zip(named, grads):
                    if g is not None:
                        fisher[n].add_(g.float().pow(2))
                if (i + 1) % 16 == 0:
                    log(f"ewc: Fisher {i + 1}/{len(encoded)} rows")
    finally:
        for (_, p), f in zip(named, flags):
            p.requires_grad_(f)
    return {n: (f / max(len(encoded), 1)).contiguous() for n, f in fisher.items()}
