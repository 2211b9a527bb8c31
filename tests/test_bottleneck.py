"""Bottleneck adapters (Houlsby 2019; Pfeiffer placement): where they sit, what they compute, the saved layout that
eval and --resume read back, and export's refusal. The strategy table (test_strategies.py) covers the trainable
set, frozen weights staying bit-identical, the start as the base model, and save → reload logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ftcli import models
from ftcli import recipe as recipe_mod
from ftcli import strategies
from ftcli.strategies import bottleneck

from conftest import addition_rows, make_recipe, write_jsonl
from test_train import run, straight_and_interrupted, train_losses, varied_rows


def prepared(tiny_model_dir, **settings):
    r = recipe_mod.validate({"base_model": str(tiny_model_dir), "data": {"train": "x.jsonl"},
                             "strategy": {"name": "bottleneck", **settings}})
    strategy = strategies.get(r.strategy)
    return strategy, strategy.prepare(models.load_model(str(tiny_model_dir)), strategies.Context(recipe=r))


@pytest.mark.parametrize("placement, places", [("houlsby", ("self_attn", "mlp")), ("pfeiffer", ("mlp",))])
def test_placement_puts_one_adapter_after_each_attention_and_or_mlp(tiny_model_dir, placement, places):
    _, model = prepared(tiny_model_dir, placement=placement, reduction_factor=4)
    adapters = sorted({n.rsplit(".adapter.", 1)[0] for n, _ in model.named_parameters() if ".adapter." in n})
    assert adapters == sorted(f"model.layers.{b}.{p}" for b in range(2) for p in places)
    down = dict(model.named_parameters())[f"model.layers.0.{places[0]}.adapter.down.weight"]
    assert down.shape == (32 // 4, 32)  # hidden / reduction_factor
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".adapter." in n}


@pytest.mark.parametrize("act, fn", [("relu", torch.relu), ("tanh", torch.tanh),
                                     ("gelu", torch.nn.functional.gelu), ("silu", torch.nn.functional.silu)])
def test_adapter_adds_up_of_f_of_down_to_the_module_output(tiny_model_dir, act, fn):
    """The hooked MLP returns mlp(x) + up(f(down(mlp(x)))), computed here independently from the weights."""
    _, model = prepared(tiny_model_dir, non_linearity=act, reduction_factor=4)
    mlp = model.model.layers[1].mlp
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mlp.adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        x = torch.randn(2, 5, 32)
        h = torch.nn.functional.linear(x, mlp.gate_proj.weight)
        h = torch.nn.functional.silu(h) * torch.nn.functional.linear(x, mlp.up_proj.weight)
        base = torch.nn.functional.linear(h, mlp.down_proj.weight)
        a = mlp.adapter
        want = base + fn(base @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias
        assert torch.allclose(mlp(x), want, atol=1e-5)


def test_run_saves_the_documented_layout_eval_reads_it_and_export_refuses(tmp_path, tiny_model_dir, run_cli):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(48))
    path = make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "bottleneck", "reduction_factor": 4},
                       training={"max_steps": 4, "batch_size": 8, "lr": 1e-2})
    code, out, err = run_cli("train", path)
    assert code == 0, err
    folder = tmp_path / "run" / "adapter"
    cfg = json.loads((folder / bottleneck.CONFIG_FILE).read_text())
    assert cfg["format"] == "ftcli-bottleneck" and cfg["placement"] == "houlsby" and cfg["bottleneck_size"] == 8
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and len(cfg["modules"]) == 4
    tensors = load_file(str(folder / bottleneck.WEIGHTS_FILE))
    assert set(tensors) == {f"{m}.adapter.{p}.{w}" for m in cfg["modules"] for p in ("down", "up")
                            for w in ("weight", "bias")}
    assert any(float(tensors[k].abs().max()) > 0 for k in tensors if ".up." in k)  # trained: no longer identity
    # eval of the run equals the in-memory model (loss after training in the report)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    val = tmp_path / "val.jsonl"
    write_jsonl(val, addition_rows(12, seed=1))
    code, out, err = run_cli("eval", tmp_path / "run", "--data", val, "--metrics", "loss", "--json", tmp_path / "e.json")
    assert code == 0, err
    tuned = json.loads((tmp_path / "e.json").read_text())["models"][str(tmp_path / "run")]["loss"]
    code, out, err = run_cli("eval", str(tiny_model_dir), "--data", val, "--metrics", "loss", "--json",
                             tmp_path / "b.json")
    base = json.loads((tmp_path / "b.json").read_text())["models"][str(tiny_model_dir)]["loss"]
    assert tuned < base and report["after"]["loss"] < report["before"]["loss"]
    # export refuses, for the run and for the adapter folder alone, and writes nothing
    for args in (["export", tmp_path / "run"], ["export", "--adapter", folder, "--base", str(tiny_model_dir)]):
        code, out, err = run_cli(*args, "--out", tmp_path / "exported")
        assert code == 2 and "cannot be folded" in err, err
        assert not (tmp_path / "exported").exists()
    # a bottleneck run as the base of another run is refused the same way (it cannot become a plain model)
    with pytest.raises(Exception, match="cannot be folded"):
        models.load_model(str(tmp_path / "run"))


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(40))
    sections = dict(strategy={"name": "bottleneck", "reduction_factor": 4, "placement": "pfeiffer"},
                    training={"max_steps": 8, "batch_size": 4, "lr": 5e-3, "checkpoint_every": 4})
    straight, path = straight_and_interrupted(tmp_path, tiny_model_dir, data, sections, at=5)
    resumed = run(path, resume=True)
    assert train_losses(resumed) == pytest.approx(train_losses(straight), abs=1e-6)
    a, b = (load_file(str(f / "adapter" / bottleneck.WEIGHTS_FILE)) for f in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
