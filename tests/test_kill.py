"""Killed runs lose nothing: `ftcli train` as a subprocess on the tiny model, killed with SIGKILL at random moments
(and inside a checkpoint being written), resumed with --resume each time, ends with the adapter of an uninterrupted
run, bit for bit; SIGTERM and SIGINT finish the step, checkpoint, exit 1 and print the command that resumes."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_recipe, write_jsonl

# one thread, so that every run (straight, killed, resumed) sums in the same order
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STEPS, EVERY = 36, 3
pytestmark = pytest.mark.slow  # 15 processes of ftcli train: a minute or two

# Run by `python -c` instead of `-m ftcli`: SIGKILL the process itself inside the Nth checkpoint write, at the
# point KILL_AT names, so the test also kills while a checkpoint is half-written, deterministically.
KILLER = """
import os, signal, sys
kill_in, at = int(os.environ["KILL_IN"]), os.environ["KILL_AT"]
from ftcli import atomic, checkpoint
calls = {"n": 0}
def die():
    os.kill(os.getpid(), signal.SIGKILL)
real_save, real_manifest, real_tree = checkpoint.save, checkpoint.write_manifest, atomic.fsync_tree
def save(*a, **k):
    calls["n"] += 1
    return real_save(*a, **k)
def manifest(*a, **k):
    if calls["n"] == kill_in and at == "before-manifest":
        die()
    return real_manifest(*a, **k)
def tree(*a, **k):
    if calls["n"] == kill_in and at == "before-rename":
        die()
    return real_tree(*a, **k)
checkpoint.save, checkpoint.write_manifest, atomic.fsync_tree = save, manifest, tree
import torch
real_torch_save = torch.save
def torch_save(obj, f, *a, **k):
    if calls["n"] == kill_in and at == "mid-write" and str(f).endswith("optimizer.pt"):
        die()
    return real_torch_save(obj, f, *a, **k)
torch.save = torch_save
sys.argv = ["ftcli"] + sys.argv[1:]
from ftcli.cli import main
main()
"""

# Lower the file-size limit (ulimit -f) to 4 KiB just before the Nth checkpoint: its first file cannot be written.
LIMITER = """
import os, resource, sys
limit_in = int(os.environ["LIMIT_IN"])
from ftcli import checkpoint
calls = {"n": 0}
real_save = checkpoint.save
def save(*a, **k):
    calls["n"] += 1
    if calls["n"] == limit_in:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    return real_save(*a, **k)
checkpoint.save = save
sys.argv = ["ftcli"] + sys.argv[1:]
from ftcli.cli import main
main()
"""


def rows(n=120, seed=3):
    rng = random.Random(seed)
    words = "alpha bravo charlie delta echo foxtrot golf hotel".split()
    out = []
    for i in range(n):
        w = [rng.choice(words) for _ in range(rng.randint(1, 5))]
        out.append({"instruction": f"reverse the words ({i})", "input": " ".join(w), "output": " ".join(w[::-1])})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """A recipe (dropout on, so the RNG state matters; eval and checkpoints every few steps) and its straight run."""
    folder = tmp_path_factory.mktemp("kill")
    data = write_jsonl(folder / "rows.jsonl", rows())
    recipe = make_recipe(folder, tiny_model_dir, data, strategy={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                         data={"validation": 0.1, "max_len": 64},
                         training={"max_steps": STEPS, "batch_size": 4, "lr": 5e-3, "checkpoint_every": EVERY,
                                   "keep_checkpoints": 2},
                         eval={"every": 7})
    straight = folder / "straight"
    done = ftcli("train", recipe, "--output", straight)
    assert done.returncode == 0, done.stderr[-2000:]
    return recipe, straight


def ftcli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcli", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=600)


class Proc:
    """`ftcli train ...` in the background, its output in a file (read while it runs)."""

    def __init__(self, log: Path, *args, killer: dict | None = None):
        cmd = [sys.executable, "-c", KILLER] if killer else [sys.executable, "-m", "ftcli"]
        self.log = log
        self.out = open(log, "w")
        self.p = subprocess.Popen([*cmd, *map(str, args)], env=dict(ENV, **(killer or {})), stdout=self.out,
                                  stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        return self.log.read_text()

    def step(self) -> int:
        """The newest 'step K/N' progress line this process printed (every 5% of the run), or 0."""
        lines = [x for x in self.text().splitlines() if x.startswith("step ") and "/" in x]
        return int(lines[-1].split()[1].split("/")[0]) if lines else 0

    def wait_until(self, cond, timeout=300.0) -> bool:
        """True once cond() holds; False if the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            if self.p.poll() is not None:
                return cond()
            time.sleep(0.005)
        raise AssertionError(f"timed out; output:\n{self.text()[-2000:]}")

    def signal(self, sig) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self) -> int:
        rc = self.p.wait(timeout=600)
        self.out.close()
        return rc


def steps_in(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*")) if root.is_dir() else []


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def train_losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def assert_same_run(run: Path, straight: Path) -> None:
    """Bitwise: every adapter tensor torch.equal to the uninterrupted run's, and every step's training loss equal
    (so each step trained on the same examples in the same order); nothing half-written left behind."""
    a, b = adapter(straight), adapter(run)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}: max {(a[differ[0]] - b[differ[0]]).abs().max()}"
    assert train_losses(run) == train_losses(straight)
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


def signalled(proc: Proc, sig, out: Path) -> list[str]:
    """A SIGTERM or SIGINT ends the run with exit 1 after a checkpoint, saying so and how to resume; returns the
    printed command (without `ftcli`)."""
    assert proc.wait() == 1, proc.text()[-2000:]
    message = " ".join(proc.text().split())
    name = signal.Signals(sig).name
    assert f"interrupted ({name}) at step" in message and "Traceback" not in message, message[-2000:]
    step = int(message.split(f"interrupted ({name}) at step ")[1].split(";")[0])
    assert f"checkpoint step-{step} written" in message and step == max(steps_in(out))
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["status"] == "interrupted" and report["run"]["steps"] == step
    assert not (out / "adapter").exists()
    command = shlex.split(message.split("continue with: ")[1].split(" (run folder")[0])
    assert command[:2] == ["ftcli", "train"] and command[-1] == "--resume"
    return command[1:]


def test_killed_at_random_moments_and_signalled_then_resumed_equals_the_uninterrupted_run(setup, tmp_path):
    """One run, stopped nine times and resumed each time, ends with the uninterrupted run's adapter, bit for bit:
    SIGKILL at random moments (a random step, then a random delay: mid-step, mid-validation or mid-checkpoint,
    wherever it lands); SIGKILL from inside a checkpoint being written (half-way through its files, before its
    manifest, before its rename); SIGTERM and SIGINT (the step finishes, a checkpoint is written, exit 1, and the
    printed command resumes)."""
    recipe, straight = setup
    out = tmp_path / "run"
    rng = random.Random(14)
    plan = ["SIGTERM", "SIGKILL", "mid-write", "SIGKILL", "before-manifest", "SIGINT", "SIGKILL", "before-rename",
            "SIGKILL"]
    # targets end well before the last step and the random delay is a step or two (a tiny-model step takes ~30 ms):
    # a delay of up to 0.2 s once let the last killed process finish the run first (CI, 2026-11-30: 6 kills of 7)
    targets = iter(sorted(rng.sample(range(2 * EVERY, STEPS - 4 * EVERY), sum(p.startswith("SIG") for p in plan))))
    command = ["train", recipe, "--output", out]
    kills, codes, logs, seen = 0, [], [], []
    for n, how in enumerate(plan):
        if how.startswith("SIG"):
            proc = Proc(tmp_path / f"{n}.log", *command)
            target = next(targets)
            if proc.wait_until(lambda: proc.step() >= target):
                time.sleep(rng.uniform(0.0, 0.05) if how == "SIGKILL" else 0.0)
            proc.signal(getattr(signal, how))
            if how == "SIGKILL":
                codes.append(proc.wait())
                kills += codes[-1] == -signal.SIGKILL
            else:
                printed = signalled(proc, getattr(signal, how), out)
                assert printed[1:] == [str(a) for a in [recipe, "--output", out, "--resume"]]
        else:  # the first checkpoint this resumed process writes is killed half-way
            proc = Proc(tmp_path / f"{n}.log", *command, killer={"KILL_IN": "1", "KILL_AT": how})
            assert proc.wait() == -signal.SIGKILL, proc.text()[-2000:]
            kills += 1
            assert list((out / "checkpoints").glob(".step-*.tmp")), f"{how}: no half-written checkpoint"
        logs.append(proc.text())
        seen.append(max(steps_in(out), default=0))
        command = ["train", recipe, "--output", out, "--resume"]
    done = ftcli(*command)
    assert done.returncode == 0, done.stderr[-3000:]
    logs.append(done.stdout)
    assert_same_run(out, straight)
    text = "\n".join(logs)
    resumed_from = [int(x.split(" from step ")[1].split()[0]) for x in text.splitlines() if x.startswith("resuming ")]
    cleaned, skipped = text.count("left half-written"), text.count("skipping checkpoint")
    # the three half-written checkpoints made on purpose are each removed; a random SIGKILL can land inside a
    # checkpoint's writing too (it did on 2026-11-30, at every commit of that day), leaving one more to remove
    assert kills == 7, f"exit codes of the processes meant to be SIGKILLed at random: {codes}"
    assert 3 <= cleaned <= 3 + plan.count("SIGKILL") and len(resumed_from) == len(plan)
    print(f"\n{len(plan)} stops ({', '.join(plan)}); newest checkpoint on disk after each: {seen}; "
          f"{len(resumed_from)} resumes, each from the newest checkpoint, verified by its manifest (steps "
          f"{resumed_from}); {cleaned} half-written checkpoint folders removed, {skipped} checkpoints skipped; the "
          "final adapter bitwise equal (torch.equal on every tensor) and every step's loss equal to the "
          "uninterrupted run's")


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_resume(setup, tmp_path, run_cli):
    recipe, straight = setup
    out = tmp_path / "run"
    proc = Proc(tmp_path / "log", "train", recipe, "--output", out)
    assert proc.wait_until(lambda: (out / "recipe.resolved.yaml").is_file())
    proc.signal(signal.SIGKILL)
    proc.wait()
    assert not steps_in(out)
    code, _, err = run_cli("train", recipe, "--output", out)
    assert code == 2
    message = " ".join(err.split())
    assert "holds no checkpoint" in message and "--resume starts it again from step 0" in message
    done = ftcli("train", recipe, "--output", out, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "starting again from step 0" in done.stdout
    assert_same_run(out, straight)


def test_a_file_size_limit_mid_run_exits_1_naming_the_file_and_keeps_the_last_checkpoint(setup, tmp_path):
    """RLIMIT_FSIZE (what a full disk looks like to a writer: EFBIG instead of ENOSPC) hit while the third checkpoint
    is written: exit 1, the file and the cause named, step-6 intact and verified, nothing half-written; a resume
    without the limit ends as the uninterrupted run."""
    from ftcli import checkpoint

    recipe, straight = setup
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", LIMITER, "train", recipe, "--output", out],
                          env=dict(ENV, LIMIT_IN="3"), capture_output=True, text=True, timeout=600)
    message = " ".join(done.stderr.split())
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"could not write {out / 'checkpoints' / f'step-{3 * EVERY}' / 'trainable.safetensors'}: File too large: " \
           "the file-size limit (ulimit -f) is 4,096 bytes" in message
    assert f"the last good checkpoint, {out / 'checkpoints' / f'step-{2 * EVERY}'}, is intact" in message
    assert steps_in(out) == [EVERY, 2 * EVERY] and checkpoint.verify(checkpoint.path(out, 2 * EVERY)) is None
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    resumed = ftcli("train", recipe, "--output", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(out, straight)
