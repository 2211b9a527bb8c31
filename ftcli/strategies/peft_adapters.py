"""PEFT's adapter families beside LoRA: `ia3`, `vera`, `loha`, `lokr`, `oft`, one settings model each over one
shared implementation (`PeftAdapter`, which `lora`, `dora` and `qlora` build on too).

| strategy | what trains, per adapted linear layer W (d×k) | reference |
| --- | --- | --- |
| `ia3` | a vector l that rescales W's output (attention keys and values) or, for feed-forward layers, its input | Liu et al. 2022, arXiv 2205.05638 |
| `vera` | two vectors b (d) and d (r) around frozen random matrices A (r×k), B (d×r) shared by every layer: ΔW = Λb·B·Λd·A | Kopiczko et al. 2023, arXiv 2310.11454 |
| `loha` | ΔW = (B₁A₁) ⊙ (B₂A₂), a Hadamard product of two rank-r products, scaled by alpha/r | Hyeon-Woo et al. 2021 (FedPara), arXiv 2108.06098 |
| `lokr` | ΔW = C ⊗ (BA), a Kronecker product of a small full matrix and a rank-r product, scaled by alpha/r | Edalati et al. 2022, arXiv 2212.10650 |
| `oft` | a block-diagonal orthogonal R (Cayley transform of skew-symmetric blocks) so that W' = W·R | Qiu et al. 2023, arXiv 2306.07280 |

Each starts as the base model exactly (l = 1, b = 0, one factor zero, R = I), keeps the base frozen, writes PEFT's
adapter layout (`adapter_model.safetensors` + `adapter_config.json`, loadable by `PeftModel.from_pretrained`), and
`ftcli export` folds it into the base with PEFT's `merge_and_unload` (all five can be merged), checked by logits.
Under `task: classification` the adapter is PEFT's sequence-classification kind: the new head trains in full and
is saved beside the adapter (PEFT's modules_to_save).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field

from ftcli.strategies.base import Context, Params, Strategy

TargetModules = Union[Literal["all-linear"], list[str]]


def targets():
    """The `target_modules` key of a family (a fresh pydantic field each time)."""
    return Field("all-linear", description="'all-linear' (every linear layer but the output head) or module names")


# the PEFT task type of each recipe task: a classification run is PEFT's SEQ_CLS (its head saved with the adapter)
PEFT_TASK = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


# PEFT's own adapter layers (not ftcli's fused LoRA layer) keep their intermediate products for backward: the
# peak RSS of 2 real steps of recipes/{dora,loha,lokr,oft,qlora,vera}.yaml (`python scripts/check_memory.py --repeat
# 2`, Intel Xeon with AMX, 2026-11-30, oneDNN's kernel caches capped as `ftcli train` caps them) needed 1.5–1.9× the
# activations of the fused path (median 1.6). Fitted on those runs (before the cap they needed 2.1–2.8×).
PEFT_LAYER_ACTIVATIONS = 1.6


class PeftAdapter(Strategy):
    """A PEFT tuner around the frozen base: `peft_config(model)` says which; prepare, save and loading are shared."""

    artifact = "adapter"
    adapter_off_is_base = True
    activation_factor = PEFT_LAYER_ACTIVATIONS

    def peft_config(self, model=None):
        raise NotImplementedError

    def prepare(self, model, ctx: Context):
        import torch
        from peft import get_peft_model

        from ftcli.errors import UserError

        config = self.peft_config(model)
        config.task_type = PEFT_TASK[ctx.recipe.task]
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:  # PEFT names the missing target modules or the shapes it cannot adapt; we add which
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()  # linear layers there are
                            if isinstance(m, torch.nn.Linear) and n != "lm_head"} | {"all-linear"})
            raise UserError(f"strategy.target_modules ({self.name}): {str(e).split('. Please')[0]}; this model's "
                            f"linear layers are: {', '.join(names)}") from None
        peft_model.peft_config["default"].base_model_name_or_path = ctx.recipe.base_model
        return peft_model

    def plan_per_layer(self, shapes, tensors) -> "Planned | None":
        """`plan` for a family whose trained tensors are a function of each adapted layer's (out, in) alone:
        `tensors(out, in)` → {suffix: shape}. Only for `target_modules: all-linear` (every linear layer of the
        blocks); a list of names goes the weightless way, so that its errors stay PEFT's."""
        from ftcli.shapes import Planned

        if getattr(self.params, "target_modules", None) != "all-linear":
            return None
        planned = Planned({f"{m}.{suffix}": shape for m in shapes.linear
                           for suffix, shape in tensors(*shapes.out_in(m)).items()})
        planned.added = planned.count
        return planned

    def save(self, model, folder, state_dict=None):
        # save_embedding_layers=False: embeddings are never adapted here, and PEFT's "auto" would look the base
        # model up on the hub to compare vocabularies (a warning offline). `state_dict`: whole tensors under FSDP
        model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False,
                              state_dict=state_dict)


# -- IA3 ----------------------------------------------------------------------------------------------------------
class Ia3Params(Params):
    """(IA)³: learned vectors rescaling attention keys and values and the feed-forward activations."""

    name: Literal["ia3"] = "ia3"
    target_modules: Optional[list[str]] = Field(
        None, description="module names; null: PEFT's choice for the architecture (Llama: k_proj, v_proj, down_proj)")
    feedforward_modules: Optional[list[str]] = Field(
        None, description="those of target_modules whose input (not output) is rescaled; null: PEFT's choice "
        "(Llama: down_proj)")


class Ia3(PeftAdapter):
    name = "ia3"
    activation_factor = 1.0  # rescaling vectors keep little: measured −16% at 1.0 (quickstart-like recipe)

    def peft_config(self, model=None):
        from peft import IA3Config

        p: Ia3Params = self.params
        return IA3Config(target_modules=p.target_modules, feedforward_modules=p.feedforward_modules)


# -- VeRA ---------------------------------------------------------------------------------------------------------
class VeraParams(Params):
    """VeRA: frozen random projections shared by every layer; per layer, two trained scaling vectors."""

    name: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="rank of the shared random projections (larger than a LoRA rank)")
    target_modules: TargetModules = targets()
    d_initial: float = Field(0.1, gt=0, description="initial value of the vector d (b starts at 0)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    projection_seed: int = Field(0, description="seed of the shared random projections A and B")


class Vera(PeftAdapter):
    name = "vera"

    def peft_config(self, model=None):
        from peft import VeraConfig

        p: VeraParams = self.params
        # save_projection: the adapter file carries A and B, so it does not depend on torch's RNG to be read back
        return VeraConfig(r=p.r, target_modules=p.target_modules, d_initial=p.d_initial, vera_dropout=p.dropout,
                          projection_prng_key=p.projection_seed, save_projection=True)

    def plan(self, shapes, recipe):
        """Two vectors per layer (the shared random projections are buffers, not parameters)."""
        r = self.params.r
        return self.plan_per_layer(shapes, lambda out, _: {"vera_lambda_b": (out,), "vera_lambda_d": (r,)})


# -- LoHa and LoKr ------------------------------------------------------------------------------------------------
class LohaParams(Params):
    """LoHa: ΔW as the Hadamard product of two low-rank products."""

    name: Literal["loha"] = "loha"
    r: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0, description="scale alpha/r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout over the rank dimension while training")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of skipping a whole adapted module")
    target_modules: TargetModules = targets()


class Loha(PeftAdapter):
    name = "loha"

    def peft_config(self, model=None):
        from peft import LoHaConfig

        p: LohaParams = self.params
        return LoHaConfig(r=p.r, alpha=p.alpha, rank_dropout=p.rank_dropout, module_dropout=p.module_dropout,
                          target_modules=p.target_modules)

    def plan(self, shapes, recipe):
        """Two rank-r products per layer."""
        r = self.params.r
        return self.plan_per_layer(shapes, lambda out, in_: {"hada_w1_a": (out, r), "hada_w1_b": (r, in_),
                                                            "hada_w2_a": (out, r), "hada_w2_b": (r, in_)})


class LokrParams(LohaParams):
    """LoKr: ΔW as the Kronecker product of a small matrix and a low-rank product."""

    name: Literal["lokr"] = "lokr"
    decompose_both: bool = Field(False, description="factor the small left matrix of the product too")
    decompose_factor: int = Field(-1, description="size of the Kronecker factors; -1: as square as possible")


class Lokr(PeftAdapter):
    name = "lokr"

    def peft_config(self, model=None):
        from peft import LoKrConfig

        p: LokrParams = self.params
        return LoKrConfig(r=p.r, alpha=p.alpha, rank_dropout=p.rank_dropout, module_dropout=p.module_dropout,
                          decompose_both=p.decompose_both, decompose_factor=p.decompose_factor,
                          target_modules=p.target_modules)


# -- OFT ----------------------------------------------------------------------------------------------------------
class OftParams(Params):
    """OFT: a block-diagonal orthogonal rotation of each adapted weight's input side."""

    name: Literal["oft"] = "oft"
    block_size: int = Field(32, ge=1, description="size of each orthogonal block; must divide every adapted layer's "
                                                  "input size")
    target_modules: TargetModules = targets()
    coft: bool = Field(False, description="constrained OFT: keep R within eps of the identity")
    eps: float = Field(6e-5, gt=0, description="coft: how far R may move from the identity")
    block_share: bool = Field(False, description="one block shared by all blocks of a layer")
    cayley_neumann: bool = Field(True, description="approximate the Cayley transform's inverse by a Neumann series "
                                                   "(faster; false: the exact inverse)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of an identity block while training")


class Oft(PeftAdapter):
    name = "oft"

    def peft_config(self, model=None):
        from peft import OFTConfig

        p: OftParams = self.params
        return OFTConfig(r=0, oft_block_size=p.block_size, target_modules=p.target_modules, coft=p.coft, eps=p.eps,
                         block_share=p.block_share, use_cayley_neumann=p.cayley_neumann,
                         module_dropout=p.module_dropout)
