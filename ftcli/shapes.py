"""A model's parameters from its files alone: `config.json` and the JSON headers of its safetensors files.

`ftcli check` plans a run (parameter counts, what trains by group, memory) from these instead of building a
weightless model, so it imports neither torch nor transformers' model classes nor PEFT: a safetensors file starts
with the 8-byte length of a JSON header that names every tensor's dtype and shape. Strategies that can say what
they train from the shapes alone do so (`Strategy.plan`); for the others, and for any model this module does not
know the layout of, `check` builds the weightless model as before. tests/test_shapes.py holds both ways equal.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

# decoder-only architectures whose parameters are the embedding, norms, the output head and, in every block, the
# attention and MLP projections as linear layers (no fused or 3-D expert tensors): every 2-D weight in a block is
# an nn.Linear, as PEFT's all-linear reads it
KNOWN_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "granite")
HEAD = "lm_head.weight"


@dataclass
class Planned:
    """What a strategy trains, from the shapes alone: the tensors that train from the first step (by the name they
    get in the prepared model, shape), the ones the optimiser owns where that set is larger (hft: every matrix that
    trains in some round; None: the same), and how many parameters the strategy adds beside the base's (adapters)."""

    trainable: dict[str, tuple[int, ...]]
    added: int = 0
    owned: dict[str, tuple[int, ...]] | None = None

    @property
    def count(self) -> int:
        return sum(math.prod(s) for s in self.trainable.values())

    @property
    def optimised(self) -> dict[str, tuple[int, ...]]:
        return self.trainable if self.owned is None else self.owned


@dataclass
class WeightShapes:
    config: dict
    tensors: dict[str, tuple[int, ...]]  # the model's parameters (a tied head once, as model.parameters() has it)
    linear: list[str] = field(default_factory=list)  # module names of the blocks' linear layers

    @property
    def total(self) -> int:
        return sum(math.prod(s) for s in self.tensors.values())

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def block_linear(self) -> int:
        """Elements of the blocks' linear weights (what bf16 storage or 4-bit quantisation shrinks)."""
        return sum(math.prod(self.tensors[m + ".weight"]) for m in self.linear)

    def out_in(self, module: str) -> tuple[int, int]:
        out_features, in_features = self.tensors[module + ".weight"]
        return out_features, in_features


def header(path: Path) -> dict:
    """The JSON header of a safetensors file: {tensor name: {"dtype", "shape", "data_offsets"}}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        out = json.loads(f.read(n))
    out.pop("__metadata__", None)
    return out


def read(folder: Path) -> WeightShapes | None:
    """The shapes of the model in `folder` (a transformers folder of safetensors weights), or None where this
    module cannot say them exactly (another layout, a mixture of experts, no safetensors, a head missing)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("model_type") not in KNOWN_LAYOUTS or any("expert" in k for k in config):
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    tensors: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            tensors.update({k: tuple(v["shape"]) for k, v in header(f).items()})
        except (OSError, ValueError, struct.error, KeyError, TypeError):
            return None
    tied = config.get("tie_word_embeddings", True)  # transformers' default
    if tied:
        tensors.pop(HEAD, None)  # one tensor in the model, whether or not the file repeats it
    elif HEAD not in tensors:
        return None  # transformers would initialise a head at random: not a plan we can count from files
    linear = [k.removesuffix(".weight") for k, s in tensors.items()
              if len(s) == 2 and ".layers." in k and k.endswith(".weight")]
    return WeightShapes(config, tensors, linear)
