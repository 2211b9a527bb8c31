"""`bottleneck`: bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751), a small module of ours.

In every block, after the attention and/or the MLP, and before their residual addition: h ← h + up(f(down(h))),
down a hidden → hidden/reduction_factor projection, f the non-linearity, up the projection back. The base stays
frozen. `placement: houlsby` puts one adapter after the attention and one after the MLP of every block (the paper's
placement); `pfeiffer` only the one after the MLP (Pfeiffer et al. 2020, arXiv 2005.00247: as good, half the
adapters). The up-projection starts at zero, so the adapted model starts as the base model exactly.

The AdapterHub `adapters` package pins transformers 4.x and cannot be installed beside transformers 5, and PEFT has
no bottleneck adapter, so the adapter is a module here: each one is a child (`adapter`) of the attention or MLP
module it follows, applied by a forward hook on that module (torch's public extension point; the base's own
modules and weight names are untouched).

Saved layout (the run's `adapter/` folder; `ftcli eval`, `generate` and `--resume` read it):
- `bottleneck_config.json`: {"format": "ftcli-bottleneck", "version": 1, "base_model_name_or_path", "hidden_size",
  "bottleneck_size", "reduction_factor", "placement", "non_linearity", "modules": [the hooked modules' names]}
- `bottleneck.safetensors`: every trained tensor under the base model's own names, e.g.
  `model.layers.0.self_attn.adapter.down.weight` [bottleneck, hidden], `.down.bias`, `.up.weight` [hidden,
  bottleneck], `.up.bias` (and a classification head's `score.weight` under `task: classification`).
A non-linearity sits between the two projections, so the adapter cannot be folded into the base's linear weights:
`ftcli export` refuses a bottleneck run and says so (a standard transformers folder cannot hold the modules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from ftcli.errors import UserError
from ftcli.strategies.base import Context, Params, Strategy

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck.safetensors"
FORMAT = "ftcli-bottleneck"
NOT_FOLDABLE = ("a bottleneck adapter has a non-linearity between its two projections, so it cannot be folded into "
                "the base's linear weights, and a standard transformers folder has no place for its modules. Use the "
                "run folder itself with ftcli eval / generate / chat, or train a foldable strategy (lora, ia3, ...)")
PLACES = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}


class BottleneckParams(Params):
    """Bottleneck adapters after the attention and/or MLP of every block; the base frozen."""

    name: Literal["bottleneck"] = "bottleneck"
    reduction_factor: int = Field(16, ge=1, description="hidden size / bottleneck size (576/16 = 36 on the built-in "
                                                         "model)")
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after the attention and after the MLP of every block; pfeiffer: after the MLP")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"


def _adapter_class():
    import torch

    class Adapter(torch.nn.Module):
        """h + up(f(down(h))), up initialised to zero (the identity at the start)."""

        def __init__(self, hidden: int, size: int, non_linearity: str, device=None):
            super().__init__()
            self.down = torch.nn.Linear(hidden, size, device=device)
            self.up = torch.nn.Linear(size, hidden, device=device)
            self.act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU,
                        "tanh": torch.nn.Tanh}[non_linearity]()
            if device is None or torch.device(device).type != "meta":
                # down keeps torch's Linear initialisation (Kaiming-uniform) and up starts at zero: the identity at
                # the start, as LoRA and AdapterHub's "mam_adapter" init do. (AdapterHub's "bert" init, both at
                # N(0, 0.02²), is only near the identity, and its tiny down-projection learns slowly.)
                torch.nn.init.zeros_(self.down.bias)
                torch.nn.init.zeros_(self.up.weight)
                torch.nn.init.zeros_(self.up.bias)

        def forward(self, h):
            return h + self.up(self.act(self.down(h)))

    return Adapter


def _apply_adapter(module, args, output):
    """Forward hook on an attention or MLP module: pass its output (the first item of a tuple) through its adapter.
    A module-level function reading the adapter from the module, so a copied model applies its own adapters."""
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def _targets(model, placement: str) -> list[tuple[str, object]]:
    """(name, module) of every attention / MLP the placement adapts: the named children of each decoder block."""
    places = PLACES[placement]
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if all(p in children for p in ("self_attn", "mlp")):  # a decoder block
            found += [(f"{name}.{p}" if name else p, children[p]) for p in places]
    if not found:
        raise UserError("strategy bottleneck: the model has no decoder blocks with self_attn and mlp modules to "
                        "place adapters after")
    return found


def attach(model, *, reduction_factor: int, placement: str, non_linearity: str) -> list[str]:
    """Add an adapter after every targeted module (hooked, trainable); returns the targeted modules' names."""
    hidden = int(model.config.hidden_size)
    size = max(1, hidden // reduction_factor)
    Adapter = _adapter_class()
    names = []
    for name, module in _targets(model, placement):
        device = next(module.parameters()).device
        module.adapter = Adapter(hidden, size, non_linearity, device=device)
        module.register_forward_hook(_apply_adapter)
        names.append(name)
    return names


def load_saved(model, folder: Path):
    """A base model (as loaded for the run) with a saved bottleneck adapter folder applied; every saved tensor must
    find its parameter."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg.get("format") != FORMAT:
        raise UserError(f"{folder / CONFIG_FILE}: not an ftcli bottleneck adapter (format {cfg.get('format')!r})")
    if int(model.config.hidden_size) != cfg["hidden_size"]:
        raise UserError(f"{folder}: the adapter is for hidden size {cfg['hidden_size']}, the base model has "
                        f"{model.config.hidden_size}")
    attach(model, reduction_factor=cfg["reduction_factor"], placement=cfg["placement"],
           non_linearity=cfg["non_linearity"])
    tensors = load_file(str(folder / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise UserError(f"{folder / WEIGHTS_FILE}: tensors {missing[:3]} have no place in the model")
    import torch

    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Bottleneck(Strategy):
    name = "bottleneck"
    artifact = "adapter"

    def unfoldable(self) -> str | None:
        return NOT_FOLDABLE

    def prepare(self, model, ctx: Context):
        p: BottleneckParams = self.params
        for param in model.parameters():
            param.requires_grad_(False)
        self.adapted = attach(model, reduction_factor=p.reduction_factor, placement=p.placement,
                              non_linearity=p.non_linearity)
        self.base_model = ctx.recipe.base_model
        self.hidden = int(model.config.hidden_size)
        return model

    def save(self, model, folder: Path, state_dict=None) -> None:
        """Every trained tensor (the adapters, and a classification head when one trains) and the config.
        `state_dict`: the model's whole tensors (under FSDP), by the same names."""
        from safetensors.torch import save_file

        from ftcli import atomic

        p: BottleneckParams = self.params
        folder.mkdir(parents=True, exist_ok=True)
        whole = state_dict if state_dict is not None else {}
        save_file({n: whole.get(n, t).detach().contiguous() for n, t in model.named_parameters() if t.requires_grad},
                  str(folder / WEIGHTS_FILE))
        atomic.write_json(folder / CONFIG_FILE, {
            "format": FORMAT, "version": 1, "base_model_name_or_path": self.base_model, "hidden_size": self.hidden,
            "bottleneck_size": max(1, self.hidden // p.reduction_factor), "reduction_factor": p.reduction_factor,
            "placement": p.placement, "non_linearity": p.non_linearity, "modules": self.adapted})

    def describe(self, model) -> dict:
        p: BottleneckParams = self.params
        return {"placement": p.placement, "adapters": len(self.adapted),
                "bottleneck_size": max(1, self.hidden // p.reduction_factor), "non_linearity": p.non_linearity}
