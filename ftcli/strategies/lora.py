"""`lora`, `dora` and `qlora`: low-rank adapters beside chosen linear layers, through PEFT.

dora adds a trained magnitude vector per adapted layer (PEFT `use_dora`, Liu et al. 2024). qlora quantises the
frozen base to 4-bit NF4 with bitsandbytes (double quantisation of the scales by default) and trains LoRA over it,
after PEFT's `prepare_model_for_kbit_training` (norms and other small weights in fp32, input gradients enabled).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftcli.strategies.base import Context, Params
from ftcli.strategies.peft_adapters import PeftAdapter, TargetModules


class LowRankParams(Params):
    """What lora, dora and qlora share: low-rank adapters A (r×k), B (d×r) beside chosen linear layers."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head), or a list of: module or "
        "parameter names (a name's end, or a pattern with *), all-linear, and on mixture-of-experts models the "
        "groups experts, shared_experts, router (also attention, mlp)"
    )
    rslora: bool = Field(False, description="scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)")


class LoraParams(LowRankParams):
    """Low-rank adapters A (r×k), B (d×r) beside chosen linear layers; the base stays frozen."""

    name: Literal["lora"] = "lora"
    fp32_branch: bool = Field(
        False, description="with training.precision bf16: the adapter's branch (x·Aᵀ·Bᵀ, the layer's output and "
        "the adapter's gradients) in float32, only the base product in bf16. On the built-in model the validation "
        "loss then matches fp32's (0.002-0.003 lower than without) at the same speed and ~0.3 GB more memory; "
        "N processes then differ from one at bf16's rounding (~1e-4 in the loss) instead of ~1e-6"
    )


class DoraParams(LowRankParams):
    """LoRA plus a trained magnitude vector per adapted layer (weight-decomposed LoRA)."""

    name: Literal["dora"] = "dora"


class QloraParams(LowRankParams):
    """LoRA over a base quantised to 4 bits with bitsandbytes."""

    name: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantise the quantisation scales too (saves ~0.4 bit/weight)")
    compute_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the de-quantised matmuls")


class Lora(PeftAdapter):
    name = "lora"
    use_dora = False
    fused = True  # plain float linear layers train through ftcli's fused LoRA layer (lora_fused.py)

    @property
    def activation_factor(self) -> float:
        """The fused layer keeps only its input; PEFT's own layers (dora, qlora) keep their products too. With
        fp32_branch (a bf16 setting) the layers' outputs, and what the MLP keeps of them, are float32: measured
        +0.33–0.39 GB peak RSS on the built-in model at batch 4 × 512, ≈ 0.4 of the planned activations."""
        from ftcli.strategies.peft_adapters import PEFT_LAYER_ACTIVATIONS

        if not self.fused:
            return PEFT_LAYER_ACTIVATIONS
        return 1.4 if self.fp32_branch else 1.0

    @property
    def fp32_branch(self) -> bool:
        """strategy.fp32_branch (lora's key; dora and qlora have none)."""
        return getattr(self.params, "fp32_branch", False)

    def memory(self, *, total, trainable, block_linear, recipe):
        if self.fused and recipe.training.precision == "bf16":  # frozen linear weights stored in bf16 (below)
            return {"weights": block_linear * 2 + (total - block_linear) * 4}
        return {"weights": total * 4}

    def targets(self, model) -> tuple[list[str] | str, list[str]]:
        """(PEFT's target_modules, its target_parameters): `all-linear` alone as PEFT reads it; a list resolved on
        `model` to the exact linear layers and expert/router parameters it names (ftcli/moe.py)."""
        from ftcli import moe
        from ftcli.errors import UserError

        p = self.params
        if p.target_modules == "all-linear" or model is None:
            return p.target_modules, []
        modules, parameters, _ = moe.lora_targets(model, p.target_modules)
        if parameters and self.use_dora:
            raise UserError(f"strategy {self.name}: DoRA adapts linear layers only; {parameters[0]} (the "
                            f"{moe.group_of(parameters[0])}) is a parameter tensor. Use strategy lora for the experts "
                            "and the router, or leave them out of target_modules")
        if parameters and self.params.dropout:
            raise UserError(f"strategy.dropout: LoRA on the {moe.group_of(parameters[0])} (parameter tensors) "
                            "cannot apply dropout (PEFT's ParamWrapper); set dropout: 0")
        return modules, parameters

    def plan(self, shapes, recipe):
        """A (r×in) and B (out×r) per adapted linear layer, and DoRA's magnitude (out) beside them; the targets
        matched as on the model (ftcli/moe.py), errors included."""
        from ftcli import moe
        from ftcli.shapes import Planned

        p = self.params
        modules = shapes.linear if p.target_modules == "all-linear" else \
            moe.match_targets(p.target_modules, shapes.linear, {})[0]
        out = {}
        for m in modules:
            o, i = shapes.out_in(m)
            out[f"{m}.lora_A.weight"], out[f"{m}.lora_B.weight"] = (p.r, i), (o, p.r)
            if self.use_dora:
                out[f"{m}.lora_magnitude_vector.weight"] = (o,)
        planned = Planned(out)
        planned.added = planned.count
        return planned

    def peft_config(self, model=None):
        import torch
        from peft import LoraConfig

        p = self.params
        modules, parameters = self.targets(model)
        config = LoraConfig(
            r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            target_modules=modules or None,
            target_parameters=parameters or None,
            use_rslora=p.rslora,
            use_dora=self.use_dora,
            bias="none",
        )
        if self.fused:
            from ftcli.strategies.lora_fused import FusedLinear

            config._register_custom_module({torch.nn.Linear: FusedLinear})
        return config

    def prepare(self, model, ctx: Context):
        peft_model = super().prepare(model, ctx)
        if self.fused and ctx.recipe.training.precision == "bf16":
            store_frozen_in_bf16(peft_model)
        if self.fused:
            from ftcli.strategies import lora_siblings

            # (under FSDP2 a [q;k;v] tensor held across steps would keep every block's weights whole on every rank)
            lora_siblings.group(peft_model, hold=not (ctx.processes > 1 and ctx.recipe.training.distributed == "fsdp"))
        if self.fp32_branch:
            from ftcli.strategies.lora_fused import FusedLinear

            for module in peft_model.modules():
                if isinstance(module, FusedLinear):
                    module.fp32_branch = True
        return peft_model


def store_frozen_in_bf16(model) -> int:
    """Under `training.precision: bf16`, keep the frozen base weight of every fused LoRA layer in bf16: autocast
    rounds it to bf16 for every product anyway, so the numbers are the same, the cast per call is gone and the
    weights take half the memory. A frozen output head gets the same (its own bf16 copy where it is tied to the
    embedding, which the lookup reads in float32): measured +1–2% tokens/s on the built-in model at the same peak
    RSS. Embeddings and norms stay float32, copied out of the memory-mapped weights file so that its pages (all
    read by the cast) leave memory. Returns the count of linear layers."""
    import torch

    from ftcli.strategies.lora_fused import FusedLinear

    n = 0
    for module in model.modules():
        if isinstance(module, FusedLinear):
            weight = module.get_base_layer().weight
            if weight.dtype == torch.float32 and not weight.requires_grad:
                weight.data = weight.data.to(torch.bfloat16)
                n += 1
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and not head.weight.requires_grad and head.weight.dtype == torch.float32:
        # the output head's own bf16 copy (a tied head's embedding stays float32 for the lookup): autocast cast
        # the whole [vocab × hidden] matrix every step (≈ 10 ms a step on the built-in model)
        head.weight = torch.nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
    for t in [*model.parameters(), *model.buffers()]:
        if t.dtype == torch.float32:
            t.data = t.data.clone()
    return n


class Dora(Lora):
    name = "dora"
    use_dora = True
    fused = False


QUANTIZED_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes + one fp32 scale per block of 64 (double quant: less)


class Qlora(Lora):
    name = "qlora"
    fused = False  # 4-bit bases keep PEFT's bitsandbytes layers

    def unsupported(self) -> str | None:
        return qlora_support()

    def base_loading(self, *, for_export: bool = False) -> dict:
        """The base in 4-bit as trained; for export the same 4-bit base computing in float32 (export.py folds
        the adapter into it de-quantised)."""
        p: QloraParams = self.params
        return {"quantization": p.quant_type, "double_quant": p.double_quant,
                "compute_dtype": "float32" if for_export else p.compute_dtype}

    def memory(self, *, total, trainable, block_linear, recipe):
        return {"weights": block_linear * QUANTIZED_BYTES_PER_WEIGHT + (total - trainable - block_linear) * 4
                + trainable * 4}

    def prepare(self, model, ctx: Context):
        if not ctx.dry_run:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=ctx.recipe.training.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        return super().prepare(model, ctx)

    def describe(self, model) -> dict:
        stored, fp32 = quantized_bytes(model)
        return {"quantization": self.params.quant_type, "double_quant": self.params.double_quant,
                "compute_dtype": self.params.compute_dtype, "base_weight_bytes": stored,
                "base_weight_bytes_fp32": fp32, "ratio": round(stored / max(fp32, 1), 4)}


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes the base weights take as stored, bytes they would take in fp32); quantisation state included."""
    import math

    stored = fp32 = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            fp32 += math.prod(qs.shape) * 4
            stored += p.numel() * p.element_size() + _state_bytes(qs)
        else:
            fp32 += p.numel() * 4
            stored += p.numel() * p.element_size()
    return stored, fp32


def _state_bytes(qs) -> int:
    total = qs.absmax.numel() * qs.absmax.element_size() if qs.absmax is not None else 0
    if getattr(qs, "state2", None) is not None:
        total += _state_bytes(qs.state2)
    return total


def qlora_support() -> str | None:
    """None when bitsandbytes can quantise here; otherwise what is needed (checked before any weight loads)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return f"qlora needs the bitsandbytes package ({e}); pip install bitsandbytes"
    from importlib.metadata import version

    import torch

    if torch.cuda.is_available():
        return None
    major, minor = (int(x) for x in version("bitsandbytes").split(".")[:2])
    if (major, minor) < (0, 48):
        return (f"qlora on a CPU needs bitsandbytes >= 0.48 (its CPU backend for 4-bit); this is "
                f"{version('bitsandbytes')}. Upgrade it, or use a CUDA GPU, or strategy lora")
    return None
