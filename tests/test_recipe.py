"""Recipe validation: errors name the key path and what is allowed; overrides; paths; shipped recipes."""

from pathlib import Path

import pytest
import yaml

from ftcli import recipe as recipe_mod
from ftcli.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def error_of(doc: dict) -> str:
    with pytest.raises(UserError) as e:
        recipe_mod.validate(doc)
    return str(e.value)


def test_defaults_are_filled():
    r = recipe_mod.validate({"data": {"train": "x.jsonl"}})
    assert r.base_model == "smollm2-135m-instruct"
    assert r.strategy.name == "lora" and r.strategy.r == 16
    assert r.training.batch_size == 8 and r.training.grad_accum == 1 and r.training.seed == 0
    assert r.data.packing is True and r.data.validation == 0.1


def test_misspelt_key_names_path_and_suggests():
    msg = error_of({"data": {"train": "x.jsonl", "fromat": "chat"}})
    assert "data.fromat" in msg and "did you mean 'format'" in msg


def test_key_in_wrong_section_says_where_it_belongs():
    msg = error_of({"data": {"train": "x.jsonl"}, "lr": 0.1})
    assert "lr: unknown key" in msg and "belongs under 'training'" in msg


def test_strategy_keys_are_checked_per_strategy():
    msg = error_of({"data": {"train": "x.jsonl"}, "strategy": {"name": "lora", "rank": 8}})
    assert "strategy.rank" in msg and "did you mean 'r'" in msg
    msg = error_of({"data": {"train": "x.jsonl"}, "strategy": {"name": "full", "r": 8}})
    assert "strategy.r: unknown key" in msg


def test_unknown_strategy_lists_choices():
    msg = error_of({"data": {"train": "x.jsonl"}, "strategy": {"name": "lorra"}})
    assert "strategy" in msg and "lorra" in msg and "lora" in msg and "full" in msg


def test_wrong_type_and_bad_value():
    msg = error_of({"data": {"train": "x.jsonl"}, "training": {"lr": "fast", "batch_size": 0}})
    assert "training.lr: expected a number, got 'fast'" in msg
    assert "training.batch_size" in msg and "greater than or equal to 1" in msg
    msg = error_of({"data": {"train": "x.jsonl", "format": "sharegpt"}})
    assert "data.format" in msg and "'alpaca', 'chat', 'completion', 'classification', 'choice' or 'preference'" in msg


def test_missing_required_key():
    assert "data: required key is missing" in error_of({})


def test_nested_list_path():
    msg = error_of({"data": {"train": "x.jsonl"}, "eval": {"retention": [{"data": "a.jsonl", "metrc": "loss"}]}})
    assert "eval.retention[0].metrc" in msg and "did you mean 'metric'" in msg


def test_set_overrides_are_typed_like_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "d.jsonl"}}))
    r = recipe_mod.load(path, ["training.lr=1e-3", "training.max_steps=7", "data.packing=false",
                               "strategy.target_modules=[q_proj, v_proj]", "strategy.name=lora"])
    assert r.training.lr == pytest.approx(1e-3) and r.training.max_steps == 7 and r.data.packing is False
    assert r.strategy.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="training.lrr"):
        recipe_mod.load(path, ["training.lrr=1"])


def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "data").mkdir()
    (folder / "data" / "t.jsonl").write_text('{"text": "a row"}\n')  # read at load: format auto → completion
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "data/t.jsonl", "validation": "data/v.jsonl"},
                                    "eval": {"retention": "data/keep.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    r = recipe_mod.load(path)
    assert r.data.train == str((folder / "data" / "t.jsonl").resolve())
    assert r.data.validation == str((folder / "data" / "v.jsonl").resolve())
    assert r.eval.retention[0].data == str((folder / "data" / "keep.jsonl").resolve())


def test_bad_recipe_exits_2_with_key_path_and_no_traceback(tmp_path, run_cli):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "d.jsonl"}, "training": {"batch_sise": 4}}))
    code, out, err = run_cli("train", path)
    assert code == 2
    assert "training.batch_sise" in err and "did you mean 'batch_size'" in err
    assert "Traceback" not in err + out


def test_debug_shows_the_traceback_and_python_m_runs_the_same_cli(tmp_path):
    """`ftcli --debug` shows the traceback of a bad recipe; `python -m ftcli` is the same command."""
    import subprocess
    import sys

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "d.jsonl"}, "training": {"batch_sise": 4}}))
    plain = subprocess.run([sys.executable, "-m", "ftcli", "check", str(path)], capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "ftcli", "--debug", "check", str(path)], capture_output=True,
                           text=True)
    assert plain.returncode == 2 and "training.batch_sise" in plain.stderr and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "training.batch_sise" in debug.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = recipe_mod.load(path)
    assert r.strategy.name
    if not r.data.train.startswith(("http", "hf:")) and "/" in r.data.train:
        assert Path(r.data.train).is_file(), f"{path.name}: data.train {r.data.train} is missing"


def test_the_objective_is_sft_by_default_and_its_keys_are_checked():
    assert recipe_mod.validate({"data": {"train": "x.jsonl"}}).objective.name == "sft"
    msg = error_of({"data": {"train": "x.jsonl"}, "objective": {"name": "sft", "beta": 0.1}})
    assert "objective.beta: unknown key" in msg
    msg = error_of({"data": {"train": "x.jsonl"}, "objective": {"name": "ppo"}})
    assert "objective" in msg and "'ppo'" in msg and "sft" in msg


@pytest.mark.parametrize("doc, where, why", [
    ({"data": {"train": "x.jsonl", "format": "alpaca"}, "eval": {"metrics": ["accuracy"]}},
     "eval.metrics", "classification"),
    ({"data": {"train": "x.jsonl", "format": "completion"}, "eval": {"metrics": ["exact_match"]}},
     "eval.metrics", "completion"),
    ({"data": {"train": "x.jsonl"}, "eval": {"retention": [{"data": "k.jsonl", "format": "alpaca",
                                                            "metric": "choice"}]}},
     "eval.retention[0]", "choice"),
], ids=["accuracy-on-alpaca", "generation-on-completion", "retention-choice-on-alpaca"])
def test_a_metric_the_format_cannot_score_is_refused_by_the_recipe(doc, where, why):
    """One vocabulary, checked once during validation: what `train` could not score, `check` refuses too."""
    msg = error_of(doc)
    assert where in msg and why in msg


def test_check_opens_the_retention_sets_before_loading_weights(tmp_path, tiny_model_dir, addition_data, run_cli,
                                                               monkeypatch):
    """A missing retention file fails `check` (as `train`), naming the set, before any weight is read."""
    import ftcli.models

    from conftest import make_recipe

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(ftcli.models, "load_model", no_weights)
    path = make_recipe(tmp_path, tiny_model_dir, addition_data,
                       eval={"retention": [{"data": str(tmp_path / "gone.jsonl"), "metric": "loss"}]})
    for command in ("check", "train"):
        code, out, err = run_cli(command, path)
        assert code == 2 and "eval.retention[0]" in err and "gone.jsonl" in err, (command, err)


@pytest.mark.parametrize("units, expected", [(None, "fp32"), ("the CPU's AMX units", "bf16"),
                                             ("CUDA GPU H200", "bf16")])
def test_precision_auto_is_bf16_where_the_machine_has_bf16_units(monkeypatch, units, expected):
    import ftcli.runtime

    monkeypatch.setattr(ftcli.runtime, "bf16_units", lambda: units)
    r = recipe_mod.validate({"data": {"train": "x.jsonl"}})
    assert r.training.precision == expected and r.precision_why.startswith("auto")
    assert (units or "no bf16 matrix units") in r.precision_why
    fixed = recipe_mod.validate({"data": {"train": "x.jsonl"}, "training": {"precision": "fp32"}})
    assert fixed.training.precision == "fp32" and fixed.precision_why == "as the recipe asks"
    assert "precision: " + expected in r.to_yaml()  # the resolved recipe records the choice


def test_a_precision_flag_outside_the_vocabulary_is_refused_by_name(tmp_path, run_cli):
    """`--precision fp16` to generate (or eval) is exit 2 naming the choices, not a silent fp32 run."""
    code, out, err = run_cli("generate", "smollm2-135m-instruct", "--prompt", "hi", "--precision", "fp16")
    assert code == 2 and "--precision 'fp16'" in err and "auto, fp32, bf16" in err, err


def test_the_cpu_flags_decide_bf16(monkeypatch):
    import torch

    import ftcli.runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ftcli.runtime, "gpu_driver", lambda: True)
    for flags, want in (({"avx2"}, None), ({"avx512_bf16"}, "AVX-512 BF16"), ({"amx_bf16", "avx512_bf16"}, "AMX")):
        monkeypatch.setattr(ftcli.runtime, "cpu_flags", lambda flags=flags: flags)
        got = ftcli.runtime.bf16_units()
        assert (got is None) if want is None else (want in got)


def test_a_cpu_machine_resolves_the_precision_without_importing_torch(tmp_path):
    """No GPU driver: `auto` is decided from the CPU flags alone, and loading a recipe does not import torch
    (what keeps `ftcli check` fast)."""
    import subprocess
    import sys

    code = ("import sys, ftcli.runtime as rt; rt.gpu_driver = lambda: False; rt.cpu_flags = lambda: {'amx_bf16'}\n"
            "from ftcli import recipe\n"
            "r = recipe.validate({'data': {'train': 'x.jsonl'}})\n"
            "print(r.training.precision, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["bf16", "False"], out
