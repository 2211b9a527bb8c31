"""Checkpoints: everything an exact resume needs, in `checkpoints/step-N/`.

- `trainable.safetensors`: the values of the parameters the optimiser owns (adapter or weights), by name;
- `optimizer.pt`, `scheduler.pt`: their state dicts (tensors and numbers only; loaded with weights_only=True);
- `rng.pt`: the torch (and CUDA) generator states; `state.json`: step, data position, Python's RNG, the
  strategy's own state and the metrics so far;
- `extra.safetensors` (when the run records them): the SI path integral so far.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftcli import atomic

PREFIX = "step-"
EXTRA = "extra.safetensors"


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


def save(run_dir: Path, step: int, named_params, optimizer, scheduler, state: dict, keep: int,
         extra: dict | None = None) -> Path:
    """`extra`: tensors of what else watched the run (the SI path integral so far), in `extra.safetensors`."""
    target = folder(run_dir) / f"{PREFIX}{step}"
    with atomic.folder(target) as tmp:
        tensors = {name: p.detach().to("cpu").contiguous().clone() for name, p in named_params}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        if extra:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in extra.items()}, str(tmp / EXTRA))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        state = dict(state, step=step, python_rng=_py_rng_to_json(random.getstate()))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    for old in list_steps(run_dir)[:-keep]:
        shutil.rmtree(folder(run_dir) / f"{PREFIX}{old}", ignore_errors=True)
    return target


def load(run_dir: Path, named_params, optimizer, scheduler) -> dict:
    """Restore the newest checkpoint into the given objects; returns its state dict."""
    steps = list_steps(run_dir)
    src = folder(run_dir) / f"{PREFIX}{steps[-1]}"
    tensors = load_file(str(src / "trainable.safetensors"))
    params = dict(named_params)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise KeyError(f"checkpoint {src} lacks {len(missing)} trained tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(src / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(src / "scheduler.pt", weights_only=True))
    rng = torch.load(src / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((src / "state.json").read_text())
    random.setstate(_py_rng_from_json(state["python_rng"]))
    return state


def load_extra(run_dir: Path) -> dict:
    """The newest checkpoint's `extra` tensors (empty when it has none)."""
    f = folder(run_dir) / f"{PREFIX}{list_steps(run_dir)[-1]}" / EXTRA
    return load_file(str(f)) if f.is_file() else {}


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
