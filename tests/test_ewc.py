"""EWC: the penalty's gradient is λ·F·(θ−θ*); λ = 0 is the inner strategy exactly; a huge λ pins the weights;
the Fisher is cached and reused; with LoRA the penalty is on ΔW = s·B·A."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ftcli import recipe as recipe_mod
from ftcli import strategies, train
from ftcli.models import load_model

from conftest import addition_rows, make_recipe, nudge_and_backprop_penalty, write_jsonl


def run(tmp_path, tiny_model_dir, strategy, name, steps=4):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(64))
    folder = tmp_path / name
    folder.mkdir()
    path = make_recipe(folder, tiny_model_dir, data, strategy=strategy,
                       training={"max_steps": steps, "batch_size": 8, "lr": 1e-2})
    holder = {}
    run_dir = train.run(recipe_mod.load(path), output=folder / "run", progress=False,
                        hooks=train.Hooks(at_end=[lambda m: holder.setdefault("model", m)]))
    return run_dir, holder["model"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_penalty_gradient_is_lambda_fisher_delta(tmp_path, tiny_model_dir, tiny_tokenizer, cache):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(16))
    r = recipe_mod.load(make_recipe(tmp_path, tiny_model_dir, data,
                                    strategy={"name": "ewc", "lambda": 3.0, "inner": {"name": "full"},
                                              "fisher_rows": 4}))
    from ftcli import data as data_mod

    bundle = data_mod.build(r, tiny_tokenizer)
    s = strategies.get(r.strategy)
    model = s.prepare(load_model(str(tiny_model_dir)), strategies.Context(recipe=r, tokenizer=tiny_tokenizer,
                                                                          train_data=bundle.train, log=lambda m: None))
    star = nudge_and_backprop_penalty(s, model)
    fisher = {id(p): f for f, _, p in s.terms}
    assert len(fisher) == len(list(model.parameters()))
    assert any(f.abs().sum() > 0 for f in fisher.values())
    for n, p in model.named_parameters():
        expected = 3.0 * fisher[id(p)] * (p.detach() - star[n])
        assert torch.allclose(p.grad, expected, rtol=1e-5, atol=1e-9), n


def test_lambda_zero_is_the_inner_strategy_exactly(tmp_path, tiny_model_dir, cache):
    lora = {"name": "lora", "r": 4, "alpha": 8}
    plain_dir, plain = run(tmp_path, tiny_model_dir, lora, "plain")
    ewc_dir, ewc = run(tmp_path, tiny_model_dir, {"name": "ewc", "lambda": 0.0, "inner": lora, "fisher_rows": 4},
                       "ewc")
    a = load_file(str(plain_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ewc_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in (plain_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    lb = [json.loads(x)["loss"] for x in (ewc_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert la == lb


def test_huge_lambda_pins_weights_and_penalty_is_logged(tmp_path, tiny_model_dir, tiny_tokenizer, cache):
    base = load_model(str(tiny_model_dir))
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    _, free = run(tmp_path, tiny_model_dir, {"name": "ewc", "lambda": 0.0, "inner": {"name": "full"},
                                             "fisher_rows": 4}, "free", steps=12)
    pinned_dir, pinned = run(tmp_path, tiny_model_dir, {"name": "ewc", "lambda": 1e6, "inner": {"name": "full"},
                                                        "fisher_rows": 4}, "pinned", steps=12)
    fisher = load_file(str(next((cache / "fisher").glob("*.safetensors"))))

    def drift(model):  # the Fisher-weighted distance from θ*: what the penalty bounds
        return sum(float((fisher[n] * (p.detach() - start[n]).pow(2)).sum()) for n, p in model.named_parameters())

    print("drift free", drift(free), "pinned", drift(pinned))
    assert drift(pinned) < 0.1 * drift(free)
    recs = [json.loads(x) for x in (pinned_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("penalty" in x and "loss" in x for x in recs if x["kind"] == "train")
    # the second run reused the Fisher computed by the first (same base, rows, settings)
    assert len(list((cache / "fisher").glob("*.safetensors"))) == 1
    details = json.loads((pinned_dir / "report.json").read_text())["strategy_details"]
    assert details["fisher_cached"] is True and details["fisher_rows"] == 4


def test_lora_inner_penalises_the_effective_weight_change(tmp_path, tiny_model_dir, tiny_tokenizer, cache):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(16))
    r = recipe_mod.load(make_recipe(tmp_path, tiny_model_dir, data, strategy={
        "name": "ewc", "lambda": 2.0, "fisher_rows": 4, "inner": {"name": "lora", "r": 4, "alpha": 8,
                                                                   "target_modules": ["q_proj"]}}))
    from ftcli import data as data_mod

    s = strategies.get(r.strategy)
    model = s.prepare(load_model(str(tiny_model_dir)), strategies.Context(
        recipe=r, tokenizer=tiny_tokenizer, train_data=data_mod.build(r, tiny_tokenizer).train, log=lambda m: None))
    assert s.extra_loss(model, None).item() == 0.0  # B starts at zero: ΔW = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    expected = 0.0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            f = next(t[0] for t in s.terms if t[1] is module.lora_A["default"].weight)
            assert f.shape == delta.shape, key
            expected += float((f * delta.pow(2)).sum().detach())
    assert s.extra_loss(model, None).item() == pytest.approx(0.5 * 2.0 * expected, rel=1e-5)
    assert len(s.terms) == 2  # q_proj of both blocks


def test_fisher_answers_are_sampled_from_the_base_reproducibly(tiny_model_dir, tiny_tokenizer):
    """With no retention set named, the Fisher uses the base model's own answers, sampled (not greedy): the same
    seed gives the same answers, another seed other ones, and greedy decoding is unchanged."""
    from ftcli.evaluate import generate

    model = load_model(str(tiny_model_dir))
    prompts = [tiny_tokenizer(f"what is {i} + 1").input_ids for i in range(6)]
    greedy = generate(model, tiny_tokenizer, prompts, max_new_tokens=8)
    a = generate(model, tiny_tokenizer, prompts, max_new_tokens=8, sample_seed=0)
    b = generate(model, tiny_tokenizer, prompts, max_new_tokens=8, sample_seed=0)
    c = generate(model, tiny_tokenizer, prompts, max_new_tokens=8, sample_seed=1)
    assert a == b and a != c and a != greedy
    assert generate(model, tiny_tokenizer, prompts, max_new_tokens=8) == greedy


@pytest.mark.parametrize("autocast", [False, True])
def test_penalty_functions_equal_the_plain_expression_and_its_autograd(autocast):
    """The penalty keeps nothing for backward (its gradient is recomputed there); value and gradients equal those
    of the plain expression autograd differentiates, in float32 even under bf16 autocast."""
    from ftcli.strategies.penalty import lora_penalty, weight_penalty

    g = torch.Generator().manual_seed(0)
    w, star, p0 = (torch.rand(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g))
    a0, b0 = torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g)
    plain_p, ours_p = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    plain_a, plain_b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    ours_a, ours_b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    (3.0 * (w * (plain_p - star).pow(2)).sum() + (w * ((plain_b @ plain_a) * 1.7).pow(2)).sum()).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = 3.0 * weight_penalty(w, star, ours_p) + lora_penalty(w, ours_a, ours_b, 1.7)
    ours.backward()
    expected = 3.0 * (w * (p0 - star).pow(2)).sum() + (w * ((b0 @ a0) * 1.7).pow(2)).sum()
    assert ours.dtype == torch.float32 and torch.allclose(ours, expected, rtol=1e-6)
    for mine, theirs in ((ours_p, plain_p), (ours_a, plain_a), (ours_b, plain_b)):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)
