"""Synaptic Intelligence: the recorded importance equals a hand-computed path integral; a run records it into its
folder; an si run's penalty gradient is 2·c·Ω·(θ−θ*) and a strong c holds the weights; what cannot work is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ftcli import importance
from ftcli import recipe as recipe_mod
from ftcli import strategies, train

from conftest import addition_rows, make_recipe, nudge_and_backprop_penalty, write_jsonl


def test_importance_equals_a_hand_computed_path_integral(tmp_path):
    """L(a, b) = a² + 3b², SGD with lr 0.1 from (1, 1), three steps: a ← 0.8a, b ← 0.4b, so
    ω_a = Σ 2a·0.2a = 0.4·(1 + 0.64 + 0.4096) = 0.81984, ω_b = Σ 6b·0.6b = 3.6·(1 + 0.16 + 0.0256) = 4.26816,
    Δ_a = 0.512 − 1 = −0.488, Δ_b = 0.064 − 1 = −0.936; Ω = ω / (Δ² + ξ)."""
    a = torch.nn.Parameter(torch.tensor(1.0))
    b = torch.nn.Parameter(torch.tensor(1.0))
    named = [("a", a), ("b", b)]
    opt = torch.optim.SGD([a, b], lr=0.1)
    pi = importance.PathIntegral(named)
    for _ in range(3):
        (a ** 2 + 3 * b ** 2).backward()
        pi.before_update(named)
        opt.step()
        opt.zero_grad()
        pi.after_update(named)
    pi.finish(tmp_path, named)
    omega, delta = importance.read(tmp_path)
    assert float(omega["a"]) == pytest.approx(0.81984, rel=1e-6)
    assert float(omega["b"]) == pytest.approx(4.26816, rel=1e-6)
    assert float(delta["a"]) == pytest.approx(-0.488, rel=1e-6)
    assert float(delta["b"]) == pytest.approx(-0.936, rel=1e-6)
    big_omega = importance.normalised(omega, delta, damping=0.1)
    assert float(big_omega["a"]) == pytest.approx(0.81984 / (0.488 ** 2 + 0.1), rel=1e-6)
    assert float(big_omega["b"]) == pytest.approx(4.26816 / (0.936 ** 2 + 0.1), rel=1e-6)
    assert json.loads((tmp_path / importance.SUMMARY).read_text())["steps"] == 3


def _run(tmp_path, tiny_model_dir, name, base, strategy, **training):
    data = write_jsonl(tmp_path / f"{name}.jsonl", addition_rows(48, seed=hash(name) % 100))
    folder = tmp_path / name
    folder.mkdir()
    path = make_recipe(folder, tiny_model_dir, data, base_model=str(base), strategy=strategy,
                       training={"max_steps": 6, "batch_size": 8, "lr": 5e-3, "warmup": 0, **training})
    return train.run(recipe_mod.load(path), output=folder / "run", progress=False), path


def test_a_run_records_si_and_an_si_run_holds_what_mattered(tmp_path, tiny_model_dir, run_cli):
    from ftcli.models import load_model

    task1, _ = _run(tmp_path, tiny_model_dir, "task1", tiny_model_dir, {"name": "full"}, record_si=True)
    omega, delta = importance.read(task1)
    base = dict(load_model(str(tiny_model_dir)).named_parameters())
    trained = load_file(str(task1 / "model" / "model.safetensors"))
    assert set(omega) == set(delta) == set(base)
    for n in base:  # Δ is the whole change of the run
        assert torch.allclose(delta[n], trained[n] - base[n].detach(), atol=1e-6), n
    assert sum(float(v.clamp_min(0).sum()) for v in omega.values()) > 0

    # an si run from task 1: the penalty's gradient is 2·c·Ω·(θ − θ*), Ω normalised to mean 1
    r = recipe_mod.load(make_recipe(tmp_path, tiny_model_dir, tmp_path / "task1.jsonl", base_model=str(task1),
                                    strategy={"name": "si", "from_run": str(task1), "c": 2.0, "damping": 1e-3}))
    setup = train.build(r, log=lambda m: None)
    s, model = setup.strategy, setup.model
    star = nudge_and_backprop_penalty(s, model)
    raw = {n: omega[n].clamp_min(0) / (delta[n].pow(2) + 1e-3) for n in omega}
    mean = torch.cat([v.flatten() for v in raw.values()]).mean()
    for n, p in model.named_parameters():
        expected = 2 * 2.0 * raw[n] / mean * (p.detach() - star[n])
        assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-9), n
    assert s.describe(model)["penalised_values"] == sum(v.numel() for v in omega.values())

    # task 2 with full vs si (a strong c): si stays nearer task 1's weights where task 1's importance is high
    full2, _ = _run(tmp_path, tiny_model_dir, "full2", task1, {"name": "full"}, lr=1e-2)
    si2, _ = _run(tmp_path, tiny_model_dir, "si2", task1, {"name": "si", "c": 1e4, "inner": {"name": "full"}},
                  lr=1e-2, record_si=True)

    def weighted_drift(run):
        w = load_file(str(run / "model" / "model.safetensors"))
        return sum(float((raw[n] * (w[n] - trained[n]).pow(2)).sum()) for n in raw)

    assert weighted_drift(si2) < 0.5 * weighted_drift(full2)
    report = json.loads((si2 / "report.json").read_text())
    assert report["strategy_details"]["from_run"] == str(task1)
    # a chain: task 3 from the si run adds task 1's Ω to task 2's
    from ftcli.strategies.si import consolidated

    chain = consolidated(si2, 1e-3)
    own = importance.normalised(*importance.read(si2), 1e-3)
    n = next(iter(raw))
    assert torch.allclose(chain[n], own[n] + raw[n])

    # refusals, before any training: no importance recorded; base_model is not the from_run
    code, out, err = run_cli("train", make_recipe(tmp_path / "full2", tiny_model_dir, tmp_path / "task1.jsonl",
                                                  base_model=str(full2), strategy={"name": "si"},
                                                  output=str(tmp_path / "x")))
    assert code == 2 and "training.record_si: true" in err
    code, out, err = run_cli("check", make_recipe(tmp_path / "full2", tiny_model_dir, tmp_path / "task1.jsonl",
                                                  strategy={"name": "si", "from_run": str(task1)}))
    assert code == 2 and f"set base_model: {task1}" in err


def test_si_recording_survives_resume_exactly(tmp_path, tiny_model_dir):
    from test_train import run, straight_and_interrupted

    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(40))
    sections = dict(strategy={"name": "full"}, training={"max_steps": 6, "batch_size": 4, "lr": 5e-3,
                                                         "checkpoint_every": 3, "record_si": True})
    straight, path = straight_and_interrupted(tmp_path, tiny_model_dir, data, sections, at=3)
    resumed = run(path, resume=True)
    a, b = importance.read(straight)[0], importance.read(resumed)[0]
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-7), n
    assert importance.summary(resumed)["steps"] == 6


def test_si_params_are_in_the_registry_with_the_inner_strategies():
    assert "si" in strategies.REGISTRY
    with pytest.raises(Exception, match="cannot be used here"):
        recipe_mod.validate({"data": {"train": "x.jsonl"}, "strategy": {"name": "si", "inner": {"name": "si"}}})
