"""`ftcli check` counts from a model's files (config.json, safetensors headers) what it used to count on a weightless
model: both ways must give the same numbers, groups, optimiser shapes and errors, for every strategy that plans
from files; and a check that plans from files does not import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import make_tiny_model
from conftest import addition_rows, make_recipe, write_jsonl
from ftcli import models, plan, shapes, strategies
from ftcli import recipe as recipe_mod
from ftcli.errors import UserError
from ftcli.strategies import Context

STRATEGIES = [
    {"name": "full"},
    {"name": "frozen", "last_n_blocks": 1},
    {"name": "frozen", "last_n_blocks": 0, "modules": ["model.norm.*", "*.self_attn.q_proj.*"]},
    {"name": "lora", "r": 4, "alpha": 8},
    {"name": "lora", "r": 3, "target_modules": ["q_proj", "down_proj"]},
    {"name": "lora", "r": 2, "target_modules": ["attention", "*.mlp.up_proj"]},
    {"name": "dora", "r": 4},
    {"name": "qlora", "r": 4},
    {"name": "hft"},
    {"name": "hft", "embeddings": "half", "seed": 3},
    {"name": "hft", "embeddings": "train"},
    {"name": "ewc", "inner": {"name": "full"}},
    {"name": "ewc", "inner": {"name": "lora", "r": 4}},
    {"name": "ewc", "inner": {"name": "hft", "seed": 5}},
    {"name": "loha", "r": 4},
    {"name": "vera", "r": 8},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The tiny Llama (untied head), a tied one, and tiny Qwen2 (q/k/v biases) and Mistral models."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("shapes")
    out = {"llama": tiny_model_dir, "llama-tied": make_tiny_model.build(root / "tied", tie=True)}
    tok = make_tiny_model.build_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    for name, config, cls in (("qwen2", Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM),
                              ("mistral", MistralConfig(**common, tie_word_embeddings=False), MistralForCausalLM)):
        cls(config).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def both_ways(folder: Path, strategy_doc: dict):
    r = recipe_mod.validate({"base_model": str(folder), "strategy": strategy_doc, "data": {"train": "x.jsonl"},
                             "training": {"precision": "fp32"}})
    strategy = strategies.get(r.strategy)
    if strategy.unsupported():
        pytest.skip(f"{strategy.name} cannot run on this machine: {strategy.unsupported()}")
    files = plan.from_files(r, strategy, allow_pickle=False, log=lambda *_: None)
    model = models.load_model(str(folder), meta=True, log=lambda *_: None, **strategy.base_loading())
    weightless = plan.from_model(strategy.prepare(model, Context(recipe=r, dry_run=True, log=lambda *_: None)),
                                 strategy)
    return files, weightless


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "mistral"])
@pytest.mark.parametrize("doc", STRATEGIES, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_counts_from_files_equal_the_weightless_model(folders, arch, doc):
    files, weightless = both_ways(folders[arch], doc)
    assert files is not None and files.how == "files"
    assert (files.trainable, files.total) == (weightless.trainable, weightless.total)
    assert sorted(files.shapes) == sorted(weightless.shapes)
    assert (files.layers, files.hidden, files.block_linear) == (weightless.layers, weightless.hidden,
                                                               weightless.block_linear)
    from ftcli import moe

    assert moe.trainable_by_group(files.named_sizes) == moe.trainable_by_group(weightless.named_sizes)


@pytest.mark.parametrize("doc, key", [({"name": "frozen", "last_n_blocks": 5}, "strategy.last_n_blocks"),
                                      ({"name": "frozen", "last_n_blocks": 0, "modules": ["nothing.*"]},
                                       "strategy.modules"),
                                      ({"name": "lora", "target_modules": ["qkv_proj"]}, "strategy.target_modules")])
def test_both_ways_refuse_a_strategy_that_does_not_fit_the_model_alike(folders, doc, key):
    with pytest.raises(UserError) as from_files:
        both_ways(folders["llama"], doc)
    r = recipe_mod.validate({"base_model": str(folders["llama"]), "strategy": doc, "data": {"train": "x.jsonl"}})
    strategy = strategies.get(r.strategy)
    with pytest.raises(UserError) as on_model:
        strategy.prepare(models.load_model(str(folders["llama"]), meta=True, log=lambda *_: None),
                         Context(recipe=r, dry_run=True))
    assert key in str(from_files.value) and str(from_files.value) == str(on_model.value)


def test_what_files_cannot_say_goes_the_weightless_way(folders, tmp_path):
    """A strategy without a plan (lokr, oft, ia3), a PEFT family's list of target names (its errors are PEFT's), an
    unknown layout or a mixture of experts: no counts from files."""
    for doc in ({"name": "lokr"}, {"name": "oft"}, {"name": "ia3"}, {"name": "loha", "target_modules": ["q_proj"]}):
        r = recipe_mod.validate({"base_model": str(folders["llama"]), "strategy": doc, "data": {"train": "x.jsonl"}})
        assert plan.from_files(r, strategies.get(r.strategy), allow_pickle=False, log=print) is None, doc
    moe = make_tiny_model.build(tmp_path / "moe", arch="mixtral")
    assert shapes.read(moe) is None
    assert shapes.read(tmp_path) is None  # no config.json


def test_a_check_planned_from_files_imports_neither_torch_nor_peft(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(16))
    path = make_recipe(tmp_path, tiny_model_dir, data)
    code = ("import sys\nfrom ftcli.cli import main\nsys.argv = ['ftcli', 'check', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'peft', 'transformers.modeling_utils') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "parameters: " in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "IMPORTED []", out.stdout[-500:]


@pytest.mark.slow
@pytest.mark.parametrize("doc", [{"name": "full"}, {"name": "lora", "r": 16, "alpha": 32},
                                 {"name": "frozen", "last_n_blocks": 2}], ids=lambda d: d["name"])
def test_the_built_in_model_counts_the_same_from_its_files(doc):
    folder = Path(models.resolve("smollm2-135m-instruct"))
    files, weightless = both_ways(folder, doc)
    assert (files.trainable, files.total, files.block_linear) == (weightless.trainable, weightless.total,
                                                                  weightless.block_linear)
    adapter = files.trainable if doc["name"] == "lora" else 0  # the parameters lora adds beside the base
    assert files.total - adapter == 134_515_008  # the tied head counted once, as docs/strategies.md says
