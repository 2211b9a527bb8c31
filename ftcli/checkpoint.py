"""Checkpoints: everything an exact resume needs, in `checkpoints/step-N/`.

- `trainable.safetensors`: the values of the parameters the optimiser owns (adapter or weights), by name;
- `optimizer.pt`, `scheduler.pt`: their state dicts (tensors and numbers only; loaded with weights_only=True);
- `rng.pt`: the torch (and CUDA) generator states, and on several processes every rank's (`ranks`);
  `state.json`: step, data position, Python's RNG, the strategy's own state and the metrics so far.

Tensors and optimiser state are whole (gathered from every rank under FSDP: ftcli/parallel.py), so a checkpoint
reads the same whatever wrote it; only rank 0 writes.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftcli import atomic

PREFIX = "step-"


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_steps(run_dir: Path) -> list[int]:
    root = folder(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        if p.name.startswith(PREFIX) and (p / "state.json").is_file():
            steps.append(int(p.name[len(PREFIX):]))
    return sorted(steps)


def rng_state() -> dict:
    """This process's random generators: torch, CUDA, Python."""
    rng = {"torch": torch.get_rng_state(), "python": _py_rng_to_json(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save(run_dir: Path, step: int, tensors: dict, optimizer_state: dict, scheduler_state: dict, state: dict,
         keep: int, ranks: list[dict] | None = None) -> Path:
    """Write checkpoint `step`: whole `tensors` by name, the optimiser and schedule states, this process's RNG
    (and `ranks`: every rank's `rng_state()`, on several processes) and `state`; keep the newest `keep`."""
    target = folder(run_dir) / f"{PREFIX}{step}"
    with atomic.folder(target) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        own = rng_state()
        rng = {"torch": own["torch"], **({"cuda": own["cuda"]} if "cuda" in own else {})}
        if ranks:
            rng["ranks"] = ranks
        torch.save(rng, tmp / "rng.pt")
        state = dict(state, step=step, python_rng=own["python"])
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    for old in list_steps(run_dir)[:-keep]:
        shutil.rmtree(folder(run_dir) / f"{PREFIX}{old}", ignore_errors=True)
    return target


@dataclass
class Saved:
    """The newest checkpoint of a run, read back."""

    path: Path
    tensors: dict
    optimizer: dict
    scheduler: dict
    rng: dict
    state: dict

    def restore_rng(self, rank: int = 0) -> None:
        """Set this process's generators as rank `rank`'s were."""
        mine = self.rng["ranks"][rank] if "ranks" in self.rng else {**self.rng, "python": self.state["python_rng"]}
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])
        random.setstate(_py_rng_from_json(mine["python"]))


def newest_state(run_dir: Path) -> dict:
    """state.json of the newest checkpoint."""
    return json.loads((folder(run_dir) / f"{PREFIX}{list_steps(run_dir)[-1]}" / "state.json").read_text())


def load(run_dir: Path, names) -> Saved:
    """Read the newest checkpoint; `names`: the trained tensors it must hold."""
    steps = list_steps(run_dir)
    src = folder(run_dir) / f"{PREFIX}{steps[-1]}"
    tensors = load_file(str(src / "trainable.safetensors"))
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise KeyError(f"checkpoint {src} lacks {len(missing)} trained tensors, e.g. {missing[0]}")
    return Saved(src, tensors, torch.load(src / "optimizer.pt", weights_only=True),
                 torch.load(src / "scheduler.pt", weights_only=True), torch.load(src / "rng.pt", weights_only=True),
                 json.loads((src / "state.json").read_text()))


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
