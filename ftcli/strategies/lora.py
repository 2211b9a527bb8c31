"""`lora` (and later `dora`, `qlora`): low-rank adapters beside chosen linear layers, through PEFT."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from ftcli.strategies.base import Context, Params, Strategy


class LoraParams(Params):
    """Low-rank adapters A (r×k), B (d×r) beside chosen linear layers; the base stays frozen."""

    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or module names"
    )
    rslora: bool = Field(False, description="scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)")


class Lora(Strategy):
    name = "lora"
    artifact = "adapter"
    use_dora = False

    def lora_config(self, ctx: Context):
        from peft import LoraConfig

        p = self.params
        return LoraConfig(
            r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            target_modules=p.target_modules,
            use_rslora=p.rslora,
            use_dora=self.use_dora,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def prepare(self, model, ctx: Context):
        from peft import get_peft_model

        from ftcli.errors import UserError

        try:
            peft_model = get_peft_model(model, self.lora_config(ctx))
        except ValueError as e:  # PEFT names the missing target modules
            raise UserError(f"strategy.target_modules: {e}") from None
        peft_model.peft_config["default"].base_model_name_or_path = ctx.recipe.base_model
        return peft_model

    def save(self, model, folder):
        # save_embedding_layers=False: embeddings are never adapted here, and PEFT's "auto" would look the base
        # model up on the hub to compare vocabularies (a warning offline)
        model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
