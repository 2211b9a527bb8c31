"""Mixture-of-experts bases, on a tiny Mixtral-style and a tiny Qwen-MoE-style model built offline: lora (experts,
shared experts and router targeted separately), dora, full, frozen and hft train; frozen weights (and hft's frozen
expert slices) stay bit-identical; saved artifacts reload to the same logits; the router's load-balancing loss is
the model's own; check shows what trains by group; merge and export work on expert adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file

import make_tiny_model
from ftcli import moe
from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.run_folder import RunFolder
from ftcli.strategies.frozen import block_index

from conftest import addition_rows, make_recipe, write_jsonl

ARCHS = ("mixtral", "qwen2_moe")
ALL_GROUPS = ["attention", "experts", "shared_experts", "router"]
STRATEGIES = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ALL_GROUPS},
    "dora": {"name": "dora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
    "full": {"name": "full"},
    "frozen": {"name": "frozen", "last_n_blocks": 1},
    "hft": {"name": "hft", "round_steps": 100},
}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    return {a: make_tiny_model.build(tmp_path_factory.mktemp(a) / a, arch=a) for a in ARCHS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, moe_dirs):
    """Each case, 3 steps; the run folder and the final in-memory model."""
    out = {}
    for arch, name in CASES:
        settings = STRATEGIES[name]
        if name == "lora" and arch == "mixtral":  # no shared expert: naming one is an error (tested below)
            settings = {**settings, "target_modules": ["attention", "experts", "router"]}
        folder = tmp_path_factory.mktemp(f"{arch}-{name}")
        data = write_jsonl(folder / "d.jsonl", addition_rows(48))
        r = recipe_mod.load(make_recipe(folder, moe_dirs[arch], data, strategy=settings,
                                        training={"max_steps": 3, "batch_size": 8, "lr": 1e-2}))
        holder = {}
        run_dir = train.run(r, output=recipe_mod.default_output(r), progress=False,
                            hooks=train.Hooks(at_end=[lambda m: holder.setdefault("model", m)]))
        out[arch, name] = (run_dir, holder["model"])
    return out


# lora and hft (what MoE changes most) on both; full, dora and frozen on one each, to keep the suite short
CASES = [("mixtral", "lora"), ("mixtral", "hft"), ("mixtral", "full"), ("mixtral", "dora"),
         ("qwen2_moe", "lora"), ("qwen2_moe", "hft"), ("qwen2_moe", "frozen")]


def start_weights(folder) -> dict:
    """The base weights as loaded (transformers 5 writes MoE checkpoints per expert and stacks them on loading)."""
    from ftcli import models

    return {n: p.detach() for n, p in models.load_model(str(folder)).named_parameters()}


def base_name(n: str) -> str:
    return n.replace("base_model.model.", "").replace(".base_layer", "").replace(".parametrizations", "") \
        .replace(".original", "")


@pytest.mark.parametrize("arch,name", CASES)
def test_moe_strategies_train_and_reload_to_the_same_logits(arch, name, trained, moe_dirs):
    run_dir, model = trained[arch, name]
    start = start_weights(moe_dirs[arch])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all(r["router_aux"] > 0 for r in steps)  # the model routes: the aux loss is added and logged
    params = {base_name(n): p for n, p in model.named_parameters() if "lora_" not in n}
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), start[n])}
    if name in ("lora", "dora"):
        assert not changed  # the base stays bit-identical
    elif name == "frozen":
        assert changed and all(block_index(n) == 1 for n in changed)
    else:
        assert any(moe.group_of(n) == "experts" for n in changed)
    reloaded, tok = RunFolder(run_dir).load()
    ids = torch.tensor([tok("what is 3 + 4").input_ids])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_each_group_and_every_factor_learns(arch, trained):
    run_dir, model = trained[arch, "lora"]
    learned = {}
    for n, p in model.named_parameters():
        if "lora_B" in n:
            learned.setdefault(moe.group_of(n), []).append(float(p.detach().abs().sum()) > 0)  # B starts at 0
    want = {"attention", "experts", "router"} | ({"shared_experts"} if arch == "qwen2_moe" else set())
    assert set(learned) == want and all(all(v) for v in learned.values()), learned
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{b}.mlp.{p}" for b in (0, 1) for p in ("experts.gate_up_proj", "experts.down_proj",
                                                                "gate.weight"))


def test_lora_target_words_and_patterns(moe_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(moe_dirs["qwen2_moe"]))
    mods, params, groups = moe.lora_targets(model, ["*.experts.down_proj", "shared_experts"])
    assert params == ["model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    assert set(groups) == {"experts", "shared_experts"} and all(".shared_expert" in m for m in mods)
    assert "model.layers.1.mlp.shared_expert_gate" in mods and len(mods) == 2 * 4
    mods, params, groups = moe.lora_targets(model, ["router"])
    assert params == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"] and mods == []
    assert moe.lora_targets(model, ["q_proj"])[0] == ["model.layers.0.self_attn.q_proj",
                                                      "model.layers.1.self_attn.q_proj"]
    from ftcli.errors import UserError

    with pytest.raises(UserError, match="'w1' matches no linear layer or expert weight.*experts, shared_experts"):
        moe.lora_targets(model, ["w1"])


@pytest.mark.parametrize("arch", ARCHS)
def test_hft_freezes_half_of_each_experts_matrices(arch, trained, moe_dirs):
    run_dir, model = trained[arch, "hft"]
    start = start_weights(moe_dirs[arch])
    rounds = [json.loads(line) for line in (run_dir / "hft_rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1
    params = dict(model.named_parameters())
    frozen_count = trained_count = 0
    for name, b, e, member, index in moe.expert_matrices(model):
        now, before = params[name].detach()[index], start[name][index]
        if f"experts.{e}.{member}" in rounds[0]["frozen"][str(b)]:
            assert torch.equal(now, before), (name, e, member)  # bit-identical through 3 AdamW steps
            frozen_count += 1
        else:
            assert not torch.equal(now, before), (name, e, member)
            trained_count += 1
    assert frozen_count == trained_count  # 4 experts, 2 and 1 of 3 matrices alternating: exactly half
    if arch == "qwen2_moe":
        for b in (0, 1):
            for m in ("gate", "up", "down"):
                n = f"model.layers.{b}.mlp.shared_expert.{m}_proj.weight"
                frozen = f"shared_expert.{m}" in rounds[0]["frozen"][str(b)]
                assert torch.equal(params[n].detach(), start[n]) == frozen, n


def test_router_aux_equals_the_models_own(moe_dirs):
    from transformers import AutoModelForCausalLM

    from ftcli.data.batching import collate
    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder
    from ftcli.loss import nll_sum
    from ftcli.models import load_tokenizer

    path = moe_dirs["mixtral"]
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = load_tokenizer(str(path))
    enc = Encoder(tok)
    rows = [enc.encode(Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
            for q, a in (("what is 2 + 2", "4"), ("name the capital of france please", "paris"))]
    batch = collate(rows, tok.pad_token_id, False, 64)  # two rows of different lengths: padding is excluded
    balance = moe.RouterBalance.attach(model, None)
    assert balance.coef == model.config.router_aux_loss_coef
    with balance.capture():
        nll_sum(model, batch)
        ours = balance.loss(batch)
    mask = (torch.arange(batch.input_ids.shape[1])[None] < torch.tensor(batch.row_tokens)[:, None]).long()
    theirs = model(input_ids=batch.input_ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    with torch.no_grad(), balance.capture():  # a pass without gradients (a reference model) is not counted
        nll_sum(model, batch)
        assert balance.loss(batch) is None
    assert moe.RouterBalance.attach(model, 0.0) is None


def test_check_shows_groups_and_dora_refuses_experts(run_cli, moe_dirs, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(16))
    recipe = make_recipe(tmp_path, moe_dirs["qwen2_moe"], data, strategy=STRATEGIES["lora"])
    code, out, err = run_cli("check", recipe)
    assert code == 0, err
    table = out[out.index("what trains, by group"):]
    for group in ALL_GROUPS:
        assert group in table
    assert "4 routed experts per block, 2 per token" in out and "per expert" in out
    recipe = make_recipe(tmp_path, moe_dirs["qwen2_moe"], data, strategy={"name": "lora", "r": 4})
    code, out, _ = run_cli("check", recipe)
    assert "not trained: experts, router" in out  # all-linear on an MoE: the experts are parameters, not layers
    recipe = make_recipe(tmp_path, moe_dirs["mixtral"], data,
                         strategy={"name": "dora", "r": 4, "target_modules": ["experts"]})
    code, _, err = run_cli("check", recipe)
    assert code == 2 and "DoRA adapts linear layers only" in err


def test_merge_and_export_expert_adapters(run_cli, trained, moe_dirs, tmp_path):
    from ftcli import models

    run_dir, model = trained["qwen2_moe", "lora"]
    adapter = run_dir / "adapter"
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])

    def logits(folder):
        m, _ = models.load_adapter(folder, str(moe_dirs["qwen2_moe"]))
        with torch.no_grad():
            return m.eval()(input_ids=ids).logits

    code, _, err = run_cli("merge", adapter, "--method", "cat", "--out", tmp_path / "one")
    assert code == 0, err
    # one adapter through split and pack: A unchanged, B with its scale alpha/r = 2 folded in, per expert
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(after[k], before[k] * (2 if "lora_B" in k else 1)), k
    code, _, err = run_cli("merge", adapter, adapter, "--method", "cat", "--weights", "0.5,0.5",
                           "--out", tmp_path / "cat")
    assert code == 0, err
    assert torch.allclose(logits(tmp_path / "cat"), logits(adapter), atol=1e-5)  # ½ΔW + ½ΔW = ΔW, per expert
    code, _, err = run_cli("merge", adapter, adapter, "--method", "svd", "--weights", "1,-1", "--out",
                           tmp_path / "zero")
    assert code == 0, err
    base = models.load_model(str(moe_dirs["qwen2_moe"]))
    with torch.no_grad():
        assert torch.allclose(logits(tmp_path / "zero"), base.eval()(input_ids=ids).logits, atol=1e-5)
    code, _, err = run_cli("export", run_dir, "--out", tmp_path / "exported")
    assert code == 0, err  # export checks the folded model's logits against base + adapter itself
    folded = models.load_model(str(tmp_path / "exported"))
    with torch.no_grad():
        assert torch.allclose(folded.eval()(input_ids=ids).logits, logits(adapter), atol=1e-4)
