"""Security: pickle weights only with --allow-pickle; remote code only when the recipe asks, with a warning that names
it; no recipe string reaches a shell or eval; a run folder outside the current folder is shown in `check`; offline,
no hub id is contacted and the error names it."""

from __future__ import annotations

import ast
import json
import shutil
import socket
from pathlib import Path

import pytest

from conftest import make_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_no_code_in_ftcli_reaches_eval_exec_or_a_shell():
    """Every call in the package: no eval/exec/compile/os.system/os.popen, no shell=True, and the one subprocess
    (git, for the run's commit) takes a literal argument list."""
    calls = []
    for f in sorted((ROOT / "ftcli").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f"{f.relative_to(ROOT)}:{node.lineno}"
            assert name not in ("eval", "exec", "compile", "os.system", "os.popen", "__import__"), where
            assert not any(k.arg == "shell" for k in node.keywords), where
            if name.startswith("subprocess."):
                calls.append(where)
                assert isinstance(node.args[0], ast.List) and all(isinstance(a, ast.Constant) for a in node.args[0].elts), where
    assert calls == ["ftcli/report.py:31", "ftcli/report.py:32"]


@pytest.fixture
def recipe_path(tmp_path, tiny_model_dir, addition_data):
    def make(model=None, **sections):
        (tmp_path / "r").mkdir(exist_ok=True)
        return make_recipe(tmp_path / "r", model or tiny_model_dir, addition_data, **sections)
    return make


def test_pickle_only_base_model_needs_allow_pickle(tmp_path, tiny_model_dir, recipe_path, run_cli):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    for command in ("check", "train"):
        code, out, err = run_cli(command, recipe_path(model=folder))
        assert code == 2 and "pytorch_model.bin" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "run").exists()
    code, out, err = run_cli("check", recipe_path(model=folder), "--allow-pickle")
    assert code == 0, err


def test_pickle_only_adapter_needs_allow_pickle(tmp_path, tiny_model_dir, addition_data, run_cli):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"],
                                                             "base_model_name_or_path": str(tiny_model_dir)}))
    (adapter / "adapter_model.bin").write_bytes(b"not even a pickle")  # never opened
    code, out, err = run_cli("eval", adapter, "--data", addition_data)
    assert code == 2 and "adapter_model.bin" in err and "--allow-pickle" in err


def test_remote_code_is_off_by_default_and_named_when_on(tmp_path, tiny_model_dir, recipe_path, run_cli):
    folder = tmp_path / "with-code"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "modeling_custom.py").write_text("raise SystemExit('this must not run')\n")
    code, out, err = run_cli("check", recipe_path(model=folder))
    assert code == 0, err
    assert "trust_remote_code" not in out.replace("trust_remote_code: false", "")
    code, out, err = run_cli("check", recipe_path(model=folder), "--set", "trust_remote_code=true")
    assert code == 0, err
    text = " ".join(out.split())
    assert f"warning: trust_remote_code is on: transformers will run Python code from {folder}: modeling_custom.py" \
        in text


def test_check_shows_a_run_folder_outside_the_current_folder(recipe_path, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for output, shown in (("../elsewhere/run", True), ("/tmp/somewhere/run", True), ("runs/mine", False)):
        code, out, err = run_cli("check", recipe_path(output=output))
        assert code == 0, err
        text = " ".join(out.split())
        where = (tmp_path / output).resolve()
        assert f"run folder: {where}" in text
        assert ("writes its run folder outside the current folder" in text) == shown, output


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode as a user sets it; any attempt to open a connection is recorded (and refused)."""
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("network use in a test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))
    return attempts


def test_offline_a_hub_model_id_is_not_contacted_and_is_named(recipe_path, run_cli, no_network):
    code, out, err = run_cli("check", recipe_path(model="someorg/some-model"))
    assert code == 2 and "'someorg/some-model'" in err and "offline mode is on" in err and "Traceback" not in err
    assert no_network == []


def test_offline_a_hub_dataset_id_is_not_contacted_and_is_named(recipe_path, run_cli, no_network):
    code, out, err = run_cli("check", recipe_path(data={"train": "someorg/some-set"}))
    assert code == 2 and "'someorg/some-set'" in err and "offline mode is on" in err and "Traceback" not in err
    assert no_network == []
