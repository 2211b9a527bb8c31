"""Durability: fsync before the rename and of the folder after it; checkpoint manifests verified on resume with a
fall-back to the newest checkpoint that verifies; a write that fails for want of space or permission ends the run
with exit 1, names the path and leaves the last good checkpoint intact."""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftcli import atomic, checkpoint, train
from ftcli import recipe as recipe_mod
from ftcli.errors import RunError

from conftest import make_recipe, write_jsonl
from test_train import varied_rows


@pytest.fixture
def journal(monkeypatch):
    """Every fsync (by the path of its descriptor) and every rename, in order."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b)

    def replace(a, b):
        events.append(("rename", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, journal):
    target = tmp_path / "report.json"
    atomic.write_json(target, {"a": 1})
    (kind, tmp, dest), = [e for e in journal if e[0] == "rename"]
    assert dest == str(target) and Path(tmp).parent == tmp_path
    assert journal == [("fsync", tmp), ("rename", tmp, str(target)), ("fsync", str(tmp_path))]
    assert json.loads(target.read_text()) == {"a": 1}


def test_a_folder_is_fsynced_file_by_file_then_renamed_then_its_parent(tmp_path, journal):
    target = tmp_path / "ckpt"
    with atomic.folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    renames = [i for i, e in enumerate(journal) if e[0] == "rename"]
    assert len(renames) == 1 and journal[renames[0]][2] == str(target)
    before = {e[1] for e in journal[: renames[0]]}
    assert before == {str(tmp / "a.bin"), str(tmp / "sub" / "b.bin"), str(tmp / "sub"), str(tmp)}
    assert journal[renames[0] + 1:] == [("fsync", str(tmp_path))]
    # replacing an existing folder: the old one is moved aside, the new one renamed in, the old one removed
    journal.clear()
    with atomic.folder(target) as tmp:
        (tmp / "c.bin").write_bytes(b"c")
    assert sorted(p.name for p in target.iterdir()) == ["c.bin"] and sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert journal[-1] == ("fsync", str(tmp_path))


def test_a_failed_writer_leaves_nothing_and_a_bug_stays_a_bug(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic.folder(tmp_path / "x") as tmp:
            (tmp / "half").write_text("half")
            1 / 0
    with pytest.raises(ZeroDivisionError):
        with atomic.file(tmp_path / "y") as tmp:
            1 / 0
    assert os.listdir(tmp_path) == []


def test_leftovers_of_a_kill_are_removed_and_a_folder_moved_aside_is_put_back(tmp_path):
    (tmp_path / ".step-4.k2j4_x9a.tmp").mkdir()
    (tmp_path / ".report.json.ab12cd34.tmp").write_text("{")
    (tmp_path / ".adapter.old").mkdir()  # killed between the two renames of a replacement
    (tmp_path / ".adapter.old" / "adapter_config.json").write_text("{}")
    (tmp_path / ".step-2.old").mkdir()  # the replacement arrived: the old one goes
    (tmp_path / "step-2").mkdir()
    (tmp_path / ".hidden.tmp").write_text("not ours")  # not one of our temporary names
    (tmp_path / "notes.txt").write_text("the user's")
    removed = atomic.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".report.json.ab12cd34.tmp", ".step-2.old", ".step-4.k2j4_x9a.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".hidden.tmp", "adapter", "notes.txt", "step-2"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def run(path, *sets, **kwargs):
    r = recipe_mod.load(path, list(sets))
    return train.run(r, output=recipe_mod.default_output(r), progress=False, **kwargs)


SECTIONS = dict(strategy={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                training={"max_steps": 12, "batch_size": 4, "lr": 5e-3, "checkpoint_every": 3, "keep_checkpoints": 3})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("straight")
    data = write_jsonl(folder / "d.jsonl", varied_rows(40))
    return run(make_recipe(folder, tiny_model_dir, data, **SECTIONS)), data


def interrupted(tmp_path, tiny_model_dir, data, at: int) -> Path:
    """The recipe of a run stopped by SIGTERM after step `at` (checkpoints every 3 steps)."""
    path = make_recipe(tmp_path, tiny_model_dir, data, **SECTIONS)

    def term(step, loss):
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunError, match=rf"interrupted \(SIGTERM\) at step {at}"):
        run(path, hooks=train.Hooks(after_step=[term]))
    return path


def resume_saying(path) -> tuple[Path, str]:
    """Resume the run of recipe `path`; returns its folder and what it said (joined by ' | ')."""
    said = []
    console = type("C", (), {"print": staticmethod(said.append), "is_terminal": False})()
    return run(path, resume=True, console=console), " | ".join(map(str, said))


def same_adapter(a: Path, b: Path) -> bool:
    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def damage(kind: str, ckpt: Path) -> str:
    """Damage a checkpoint as a disk or a kill could; returns the words verify() must say."""
    f = ckpt / checkpoint.TRAINABLE
    if kind == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "cut short or damaged"
    if kind == "flipped":
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x40
        f.write_bytes(bytes(data))
        return "does not match its sha256"
    if kind == "missing file":
        (ckpt / "optimizer.pt").unlink()
        return "optimizer.pt is missing"
    if kind == "no manifest":
        (ckpt / checkpoint.MANIFEST).unlink()
        return "no manifest.json"
    (ckpt / checkpoint.MANIFEST).write_text('{"files": ')
    return "manifest.json is damaged"


@pytest.mark.parametrize("kind", ["truncated", "flipped", "missing file", "no manifest", "bad manifest"])
def test_verify_names_what_is_wrong_with_a_checkpoint(straight, tmp_path, kind):
    import shutil

    run_dir, _ = straight
    ckpt = tmp_path / "step-12"
    shutil.copytree(run_dir / "checkpoints" / "step-12", ckpt)
    assert checkpoint.verify(ckpt) is None
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    assert set(manifest["files"]) == {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
    names = load_file(str(ckpt / checkpoint.TRAINABLE))
    assert {n: v["shape"] for n, v in manifest["tensors"].items()} == {n: list(t.shape) for n, t in names.items()}
    words = damage(kind, ckpt)
    assert words in checkpoint.verify(ckpt)


def test_resume_skips_a_damaged_newest_checkpoint_says_so_and_ends_equal(straight, tmp_path, tiny_model_dir):
    straight_run, data = straight
    path = interrupted(tmp_path, tiny_model_dir, data, at=9)
    out = tmp_path / "run"
    assert checkpoint.list_steps(out) == [3, 6, 9]
    damage("truncated", out / "checkpoints" / "step-9")
    resumed, said = resume_saying(path)
    assert "skipping checkpoint step-9: trainable.safetensors has" in said and "resuming" in said
    assert f"resuming {out} from step 6" in said
    assert same_adapter(resumed, straight_run)
    assert all(checkpoint.verify(checkpoint.path(out, s)) is None for s in checkpoint.list_steps(out))


def test_resume_with_no_checkpoint_that_verifies_starts_again_from_step_0(straight, tmp_path, tiny_model_dir):
    straight_run, data = straight
    path = interrupted(tmp_path, tiny_model_dir, data, at=3)
    out = tmp_path / "run"
    damage("flipped", out / "checkpoints" / "step-3")
    resumed, said = resume_saying(path)
    assert "skipping checkpoint step-3" in said and "starting again from step 0" in said
    assert same_adapter(resumed, straight_run)
    train_steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x)["kind"] == "train"]
    assert train_steps == list(range(1, 13))


def test_a_permission_error_while_checkpointing_exits_1_naming_the_path(straight, tmp_path, tiny_model_dir,
                                                                        monkeypatch, run_cli):
    """The third checkpoint cannot be created (as on a folder made read-only mid-run; root ignores modes, so the
    refusal is simulated): exit 1, the path and the cause named, step-6 intact, nothing half-written."""
    _, data = straight
    path = make_recipe(tmp_path, tiny_model_dir, data, **SECTIONS)
    real = tempfile.mkdtemp
    calls = {"n": 0}

    def mkdtemp(*a, **k):
        if ".step-" in k.get("prefix", ""):
            calls["n"] += 1
            if calls["n"] == 3:
                raise PermissionError(errno.EACCES, "Permission denied", k["dir"])
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    code, out, err = run_cli("train", path)
    message = " ".join(err.split())
    out_dir = tmp_path / "run"
    assert code == 1 and "Traceback" not in err
    assert f"could not write {out_dir / 'checkpoints' / 'step-9'}: Permission denied" in message
    assert f"the last good checkpoint, {out_dir / 'checkpoints' / 'step-6'}, is intact" in message
    assert f"continue with: ftcli train {path} --resume" in message
    assert checkpoint.list_steps(out_dir) == [3, 6]
    assert checkpoint.verify(checkpoint.path(out_dir, 6)) is None
    assert not [p for p in out_dir.rglob("*") if atomic.is_temporary(p.name)]


def test_write_failure_words():
    assert "the disk is full" in atomic.write_failure(Path("/x/y"), OSError(errno.ENOSPC, "No space left"))
    assert "the disk is full" in atomic.write_failure(
        Path("/x/y"), Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert "no permission" in atomic.write_failure(Path("/x"), PermissionError(errno.EACCES, "Permission denied"))
    assert atomic.write_failure(Path(tempfile.gettempdir()) / "f", ValueError("a bug")) is None


def test_data_order_after_a_mid_epoch_resume_is_the_uninterrupted_order(tmp_path, tiny_model_dir, monkeypatch):
    """By example id (the row of the source file each example came from): the steps of a run stopped mid-epoch
    (in epoch 2 of 2) and resumed take the same examples, in the same micro-batches, as the uninterrupted run."""
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(40))
    seen: list[tuple[int, list[list[int]]]] = []
    real = train.Trainer.micro_batches

    def recording(self, step):
        out = real(self, step)
        epoch, index = divmod(step, self.per_epoch)
        rows = self.setup.data.train.examples
        seen.append((step, [[rows[i].row for i in mb] for mb in self._plans[epoch][index]]))
        return out

    monkeypatch.setattr(train.Trainer, "micro_batches", recording)
    sections = dict(SECTIONS, training={**SECTIONS["training"], "max_steps": None, "epochs": 2, "batch_size": 3,
                                        "grad_accum": 2, "checkpoint_every": 4})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run(make_recipe(tmp_path / "a", tiny_model_dir, data, **sections))
    straight, seen[:] = list(seen), []
    path = make_recipe(tmp_path / "b", tiny_model_dir, data, **sections)
    per_epoch = 5  # 30 training rows (40 less a validation quarter) in steps of 6
    at = per_epoch + 2  # mid-epoch 2

    def term(step, loss):
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunError, match=rf"interrupted \(SIGTERM\) at step {at}"):
        run(path, hooks=train.Hooks(after_step=[term]))
    run(path, resume=True)
    assert len(straight) == 2 * per_epoch and sorted({r for _, mbs in straight[:per_epoch] for mb in mbs for r in mb}) \
        == sorted(r for _, mbs in straight[:per_epoch] for mb in mbs for r in mb)  # an epoch takes each row once
    assert seen == straight
