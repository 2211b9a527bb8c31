"""Checkpoints: everything an exact resume needs, in `checkpoints/step-N/`.

- `trainable.safetensors`: the values of the parameters the optimiser owns (adapter or weights), by name;
- `optimizer.pt`, `scheduler.pt`: their state dicts (tensors and numbers only; loaded with weights_only=True);
- `rng.pt`: the torch (and CUDA) generator states, and on several processes every rank's (`ranks`);
  `state.json`: step, data position, Python's RNG, the strategy's own state and the metrics so far;
- `extra.safetensors` (when the run records them): the SI path integral so far;
- `manifest.json`, written last: every file's size and sha256, and the name, shape and dtype of every trained
  tensor. A checkpoint is used only when its manifest verifies; `--resume` takes the newest that does and says
  which it skipped and why (a file cut short by a full disk, damaged on disk, or missing).

A checkpoint folder is written under a temporary name, fsync'ed and renamed (ftcli/atomic.py), so a kill while it
is written leaves at most a temporary folder that the next `--resume` removes. Tensors and optimiser state are
whole (gathered from every rank under FSDP: ftcli/parallel.py), so a checkpoint reads the same whatever wrote it;
only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftcli import atomic
from ftcli.errors import UserError

PREFIX = "step-"
MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
MANIFEST_FORMAT = 1
EXTRA = "extra.safetensors"


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def path(run_dir: Path, step: int) -> Path:
    return folder(run_dir) / f"{PREFIX}{step}"


def list_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoint folders present (verified or not), oldest first."""
    root = folder(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and p.is_dir():
            steps.append(int(p.name[len(PREFIX):]))
    return sorted(steps)


def rng_state() -> dict:
    """This process's random generators: torch, CUDA, Python."""
    rng = {"torch": torch.get_rng_state(), "python": _py_rng_to_json(random.getstate())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save(run_dir: Path, step: int, tensors: dict, optimizer_state: dict, scheduler_state: dict, state: dict,
         keep: int, ranks: list[dict] | None = None, extra: dict | None = None) -> Path:
    """Write checkpoint `step` (the manifest last): whole `tensors` by name, the optimiser and schedule states, this
    process's RNG (and `ranks`: every rank's `rng_state()`, on several processes), `state`, and `extra`: tensors of
    what else watched the run (the SI path integral so far); then remove all but the newest `keep`."""
    target = path(run_dir, step)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    own = rng_state()
    rng = {"torch": own["torch"], **({"cuda": own["cuda"]} if "cuda" in own else {})}
    if ranks:
        rng["ranks"] = ranks
    state = dict(state, step=step, python_rng=own["python"])
    with atomic.folder(target) as tmp:
        writers = {TRAINABLE: lambda f: save_file(tensors, str(f)),
                   EXTRA: lambda f: save_file({k: v.detach().to("cpu").contiguous() for k, v in extra.items()},
                                              str(f)),
                   "optimizer.pt": lambda f: torch.save(optimizer_state, f),
                   "scheduler.pt": lambda f: torch.save(scheduler_state, f),
                   "rng.pt": lambda f: torch.save(rng, f),
                   "state.json": lambda f: f.write_text(json.dumps(state, indent=1, default=str)),
                   MANIFEST: lambda f: write_manifest(tmp, step, tensors)}  # last: it lists the others
        if not extra:
            del writers[EXTRA]
        for name, write in writers.items():
            with atomic.writing(target / name):  # a failure names the file as it would have been called
                write(tmp / name)
    for old in list_steps(run_dir)[:-keep]:
        shutil.rmtree(path(run_dir, old), ignore_errors=True)
    return target


def write_manifest(ckpt: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
             for f in sorted(ckpt.iterdir()) if f.is_file() and f.name != MANIFEST}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files,
                "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                            for n, t in tensors.items()}}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1))


def sha256(f: Path) -> str:
    with open(f, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify(ckpt: Path) -> str | None:
    """None when the checkpoint folder is whole (every file as its manifest says); else why not, in words."""
    try:
        return _verify(ckpt)
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"{MANIFEST} is damaged"
    except Exception as e:  # safetensors' own errors for a header that does not parse
        return f"{TRAINABLE} cannot be read ({type(e).__name__}: {e})"


def _verify(ckpt: Path) -> str | None:
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files, tensors = manifest["files"], manifest["tensors"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the checkpoint was not completely written)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    if manifest.get("step") != int(ckpt.name[len(PREFIX):]):
        return f"{MANIFEST} names step {manifest.get('step')}"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, the manifest says {want['bytes']:,} (cut short or damaged)"
        if sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (damaged on disk)"
    if TRAINABLE not in files:
        return f"the manifest lists no {TRAINABLE}"
    with safe_open(str(ckpt / TRAINABLE), framework="pt") as st:
        found = {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
    if found != {k: v["shape"] for k, v in tensors.items()}:
        return f"{TRAINABLE} holds other tensors than the manifest lists"
    return None


def newest_verified(run_dir: Path, log=print) -> int | None:
    """The newest checkpoint step whose manifest verifies, saying which newer ones were skipped and why;
    None when there is none."""
    for step in reversed(list_steps(run_dir)):
        problem = verify(path(run_dir, step))
        if problem is None:
            return step
        log(f"skipping checkpoint step-{step}: {problem}")
    return None


@dataclass
class Saved:
    """A checkpoint, read back."""

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


def state_of(run_dir: Path, step: int) -> dict:
    """state.json of checkpoint `step`."""
    return json.loads((path(run_dir, step) / "state.json").read_text())


def load(run_dir: Path, step: int, named_params) -> Saved:
    """Read checkpoint `step` (verified by `newest_verified`). Trained tensors that differ in name or shape from
    `named_params` (this run's; whole shapes, sharded or not) are a UserError naming one of them."""
    src = path(run_dir, step)
    tensors = load_file(str(src / TRAINABLE))
    params = dict(named_params)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    wrong = sorted(n for n in set(params) & set(tensors) if tuple(params[n].shape) != tuple(tensors[n].shape))
    if missing or extra or wrong:
        what = (f"lacks {len(missing)} of this run's trained tensors, e.g. {missing[0]}" if missing else
                f"has {len(extra)} tensors this run does not train, e.g. {extra[0]}" if extra else
                f"has {wrong[0]} in shape {tuple(tensors[wrong[0]].shape)}, this run's is "
                f"{tuple(params[wrong[0]].shape)}")
        raise UserError(f"checkpoint {src} {what}: it belongs to a different model or strategy")
    return Saved(src, tensors, torch.load(src / "optimizer.pt", weights_only=True),
                 torch.load(src / "scheduler.pt", weights_only=True), torch.load(src / "rng.pt", weights_only=True),
                 state_of(run_dir, step))


def load_extra(run_dir: Path, step: int) -> dict:
    """Checkpoint `step`'s `extra` tensors (empty when it has none)."""
    f = path(run_dir, step) / EXTRA
    return load_file(str(f)) if f.is_file() else {}


def remove_leftovers(run_dir: Path) -> list[Path]:
    """What a killed run left half-written (temporary files and folders) in the run folder and its checkpoints."""
    return atomic.remove_leftovers(Path(run_dir)) + atomic.remove_leftovers(folder(run_dir))


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
