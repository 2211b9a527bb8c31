"""The strategy table: each strategy trains exactly its documented set, frozen weights stay bit-identical,
and the saved artifact reloads to the same logits.

Adding a strategy adds one row to STRATEGIES: its settings and the rule for which base parameters it trains.
"""

import pytest
import torch
from safetensors.torch import load_file

from ftcli.run_folder import RunFolder
from ftcli import models
from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.data.batching import collate
from ftcli.loss import nll_sum

from conftest import make_recipe

from ftcli.strategies.frozen import block_index
from ftcli.strategies.hft import module_of, select

_HFT_ROUND0 = select(2, 0, 0)  # the tiny model has 2 blocks; training.seed 0; one round covers the 3 steps


def hft_trains(n: str) -> bool:
    if "embed_tokens" in n or "lm_head" in n:
        return False  # embeddings: freeze (the default policy)
    b = block_index(n)
    return b is None or module_of(n) not in _HFT_ROUND0[b]


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
# name → (strategy settings, predicate on a base parameter name: is it trained?, artifact folder)
STRATEGIES = {
    "full": ({"name": "full"}, lambda n: True, "model"),
    "frozen": ({"name": "frozen", "last_n_blocks": 1, "modules": ["model.norm.*"]},
               lambda n: n.startswith("model.layers.1.") or n.startswith("model.norm."), "model"),
    "lora": ({"name": "lora", **LORA}, lambda n: False, "adapter"),
    "dora": ({"name": "dora", **LORA}, lambda n: False, "adapter"),
    "qlora": ({"name": "qlora", **LORA}, lambda n: False, "adapter"),
    "hft": ({"name": "hft", "round_steps": 100}, hft_trains, "model"),
    "ewc-full": ({"name": "ewc", "inner": {"name": "full"}, "fisher_rows": 4}, lambda n: True, "model"),
    "ewc-lora": ({"name": "ewc", "inner": {"name": "lora", **LORA}, "fisher_rows": 4}, lambda n: False, "adapter"),
    "ia3": ({"name": "ia3"}, lambda n: False, "adapter"),
    "vera": ({"name": "vera", "r": 8}, lambda n: False, "adapter"),
    "loha": ({"name": "loha", "r": 4, "alpha": 8}, lambda n: False, "adapter"),
    "lokr": ({"name": "lokr", "r": 4, "alpha": 8}, lambda n: False, "adapter"),
    "oft": ({"name": "oft", "block_size": 8}, lambda n: False, "adapter"),
    "bottleneck": ({"name": "bottleneck", "reduction_factor": 4}, lambda n: False, "adapter"),
}
ADAPTER_FAMILIES = [n for n, (s, _, art) in STRATEGIES.items() if art == "adapter" and s["name"] != "ewc"]


def start_weights(name, tiny_model_dir) -> dict:
    """The base weights as the strategy received them (qlora: the 4-bit codes of a fresh quantised load)."""
    if name == "qlora":
        return {n: p.detach().clone() for n, p in models.load_model(str(tiny_model_dir), quantization="nf4")
                .named_parameters()}
    return load_file(str(tiny_model_dir / "model.safetensors"))


def base_name(name: str) -> str:
    """PEFT's name for a wrapped base weight → the plain transformers name."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def is_adapter(name: str, tiny_model_dir) -> bool:
    """A parameter the strategy added (LoRA factors, IA3 vectors, OFT blocks, ...): not a weight of the base."""
    if "keys" not in _BASE:
        _BASE["keys"] = set(load_file(str(tiny_model_dir / "model.safetensors")))
    return base_name(name) not in _BASE["keys"]


_BASE: dict = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """Train every strategy for 3 steps once; keep the final in-memory model of each."""
    from conftest import addition_rows, write_jsonl

    out = {}
    for name, (settings, _, _) in STRATEGIES.items():
        folder = tmp_path_factory.mktemp(name)
        data = write_jsonl(folder / "d.jsonl", addition_rows(48))
        path = make_recipe(folder, tiny_model_dir, data, strategy=settings,
                           training={"max_steps": 3, "batch_size": 8, "lr": 1e-2})
        r = recipe_mod.load(path)
        holder = {}
        run_dir = train.run(r, output=recipe_mod.default_output(r), progress=False,
                            hooks=train.Hooks(at_end=[lambda m: holder.setdefault("model", m)]))
        out[name] = (run_dir, holder["model"], r)
    return out


@pytest.mark.parametrize("name", STRATEGIES)
def test_trainable_set_is_as_documented(name, tiny_model_dir):
    settings, trains, _ = STRATEGIES[name]
    r = recipe_mod.validate({"base_model": str(tiny_model_dir), "strategy": settings, "data": {"train": "x.jsonl"}})
    from ftcli import strategies

    model = strategies.get(r.strategy).prepare(models.load_model(str(tiny_model_dir)),
                                               strategies.Context(recipe=r, dry_run=True))
    added = 0
    for n, p in model.named_parameters():
        if is_adapter(n, tiny_model_dir):
            assert p.requires_grad, n
            added += 1
        else:
            assert p.requires_grad == trains(base_name(n)), n
    assert (added > 0) == (STRATEGIES[name][2] == "adapter")


@pytest.mark.parametrize("name", STRATEGIES)
def test_frozen_weights_get_no_gradient_and_stay_bit_identical(name, trained, tiny_model_dir, tiny_tokenizer):
    _, trains, _ = STRATEGIES[name]
    run_dir, model, _ = trained[name]
    start = start_weights(name, tiny_model_dir)
    changed = 0
    for n, p in model.named_parameters():
        key = base_name(n)
        if is_adapter(n, tiny_model_dir):
            continue
        if trains(key):
            changed += not torch.equal(p.detach(), start[key])
        else:
            assert torch.equal(p.detach(), start[key]), f"{name}: frozen {key} changed"
    if STRATEGIES[name][2] == "model":
        assert changed > 0
    # a backward pass leaves frozen parameters without any gradient
    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder

    enc = Encoder(tiny_tokenizer).encode(Example(messages=[{"role": "user", "content": "what is 2 + 2"},
                                                           {"role": "assistant", "content": "4"}]))
    model.zero_grad(set_to_none=True)
    nll_sum(model, collate([enc], tiny_tokenizer.pad_token_id, False, 64)).backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif trains(base_name(n)):
            assert p.grad is not None, n
        if is_adapter(n, tiny_model_dir):  # every adapted module of every block really learns (qlora too)
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n


@pytest.mark.parametrize("name", STRATEGIES)
def test_saved_artifact_reloads_to_the_same_logits(name, trained):
    run_dir, model, _ = trained[name]
    _, _, artifact = STRATEGIES[name]
    assert (run_dir / artifact).is_dir()
    reloaded, tok = RunFolder(run_dir).load()
    ids = torch.tensor([tok("what is 3 + 4").input_ids])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("name", ADAPTER_FAMILIES)
def test_adapter_starts_as_the_base_model(name, tiny_model_dir):
    """Before any step the adapted model computes the base model's logits exactly (IA3 vectors at 1, VeRA's b at 0,
    one LoHa/LoKr factor at 0, OFT's rotation at the identity, LoRA's B at 0)."""
    from ftcli import strategies

    settings = STRATEGIES[name][0]
    r = recipe_mod.validate({"base_model": str(tiny_model_dir), "strategy": settings, "data": {"train": "x.jsonl"},
                             "training": {"precision": "fp32"}})  # (bf16 stores lora's frozen weights in bf16)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        base = models.load_model(str(tiny_model_dir)).eval()(input_ids=ids).logits
        adapted = strategies.get(r.strategy).prepare(models.load_model(str(tiny_model_dir)),
                                                     strategies.Context(recipe=r)).eval()(input_ids=ids).logits
    assert torch.equal(base, adapted)


@pytest.mark.parametrize("name", ["ia3", "vera", "loha", "lokr", "oft"])
def test_export_folds_each_adapter_family(name, trained, tmp_path):
    """`ftcli export` folds the trained adapter into the base with PEFT's merge; the written folder reloads to the
    logits of base + adapter (export checks it, and it is checked again here against the in-memory model)."""
    from ftcli import export

    run_dir, model, _ = trained[name]
    res = export.export(run=run_dir, out=tmp_path / "out", log=lambda *_: None)
    assert res.max_diff <= res.tolerance
    folded = models.load_model(str(tmp_path / "out")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    model.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, folded(input_ids=ids).logits
    assert not any(hasattr(m, "base_layer") for m in folded.modules())  # plain linear layers, nothing left to unfold
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()


def test_dora_magnitudes_get_gradient_and_change(trained, tiny_model_dir):
    _, model, _ = trained["dora"]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    mags = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert mags and all(p.requires_grad for p in mags.values())
    for n, p in mags.items():
        # DoRA starts each magnitude at the row norms of its base weight; training moved them
        w = base[base_name(n.split(".lora_magnitude_vector")[0]) + ".weight"]
        assert not torch.allclose(p.detach(), w.norm(dim=1), atol=1e-6), n


def test_qlora_base_is_4bit_and_the_report_says_how_small(trained):
    run_dir, model, _ = trained["qlora"]
    import json

    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    details = json.loads((run_dir / "report.json").read_text())["strategy_details"]
    assert details["quantization"] == "nf4" and details["base_weight_bytes"] < details["base_weight_bytes_fp32"]
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert losses[-1] < losses[0]


class _FtcliDropout(torch.nn.Dropout):
    """PEFT's dropout module drawing its masks as ftcli's fused layer does (strategies/dropout.py), so that PEFT's
    layer is the reference for the fused one's arithmetic with the same masks."""

    def forward(self, x):
        from ftcli.strategies.dropout import dropout

        return dropout(x, self.p)[0] if self.training and self.p else x


def draw_masks_as_ftcli(model) -> int:
    """Swap every PEFT LoRA dropout of `model` for _FtcliDropout; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        for name, drop in getattr(module, "lora_dropout", {}).items():
            if isinstance(drop, torch.nn.Dropout):
                module.lora_dropout[name] = _FtcliDropout(drop.p)
                swapped += 1
    return swapped


@pytest.mark.parametrize("dropout, mode", [(0.0, "eval"), (0.1, "eval"), (0.1, "train")])
def test_fused_lora_layer_equals_peft_layer(tiny_model_dir, tiny_tokenizer, dropout, mode, monkeypatch):
    """ftcli's fused LoRA layer (lora strategy) gives PEFT's outputs and gradients, with and without dropout (in
    training the same seed draws the same masks on both sides: PEFT's dropout modules draw them as ftcli does),
    and takes the fused path for every layer."""
    from peft import LoraConfig, get_peft_model

    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder
    from ftcli.strategies import lora_fused
    from ftcli.strategies.lora import Lora, LoraParams

    strategy = Lora(LoraParams(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    config = strategy.peft_config()
    fused = get_peft_model(models.load_model(str(tiny_model_dir)), config)
    plain = get_peft_model(models.load_model(str(tiny_model_dir)), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
    layers = [m for m in fused.modules() if isinstance(m, lora_fused.FusedLinear)]
    assert len(layers) == 2 * 7  # every linear layer of both blocks
    assert draw_masks_as_ftcli(plain) == (14 if dropout else 0)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.1 for k, v in plain.state_dict().items() if "lora_" in k}  # B ≠ 0
    plain.load_state_dict(state, strict=False)
    fused.load_state_dict(state, strict=False)
    calls = {"n": 0}
    real = lora_fused._LoraLinear.apply
    monkeypatch.setattr(lora_fused._LoraLinear, "apply", lambda *a: calls.__setitem__("n", calls["n"] + 1) or real(*a))
    enc = Encoder(tiny_tokenizer).encode(Example(messages=[{"role": "user", "content": "what is 2 + 2"},
                                                           {"role": "assistant", "content": "four, I think"}]))
    batch = collate([enc, enc], tiny_tokenizer.pad_token_id, True, 64)
    results = []
    for model in (plain, fused):
        model.train(mode == "train")
        torch.manual_seed(1)  # the same dropout masks, layer by layer, on both sides
        loss = nll_sum(model, batch)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert calls["n"] == 14
    if mode == "train" and dropout:  # the masks really dropped something: the loss differs from eval's
        fused.eval()
        assert float(nll_sum(fused, batch).detach()) != pytest.approx(results[1][0], rel=1e-6)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for n, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][n], rtol=1e-4, atol=1e-7), n


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_layer_under_bf16_autocast_matches_peft(tiny_model_dir, tiny_tokenizer, dropout):
    """training.precision bf16: the fused layer computes in bf16 over base weights stored in bf16 (the rounding
    autocast applies anyway); loss and adapter gradients match PEFT's layer under the same autocast. Embeddings
    and norms stay float32."""
    from peft import LoraConfig, get_peft_model

    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder
    from ftcli.strategies.lora import Lora, LoraParams, store_frozen_in_bf16

    fused = get_peft_model(models.load_model(str(tiny_model_dir)),
                           Lora(LoraParams(r=4, alpha=8, dropout=dropout, target_modules="all-linear")).peft_config())
    plain = get_peft_model(models.load_model(str(tiny_model_dir)), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert draw_masks_as_ftcli(plain) == (14 if dropout else 0)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.1 for k, v in plain.state_dict().items() if "lora_" in k}
    plain.load_state_dict(state, strict=False)
    fused.load_state_dict(state, strict=False)
    assert store_frozen_in_bf16(fused) == 14
    dtypes = {n: p.dtype for n, p in fused.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n.endswith("base_layer.weight"))
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "norm" in n or "embed" in n)
    enc = Encoder(tiny_tokenizer).encode(Example(messages=[{"role": "user", "content": "what is 2 + 2"},
                                                           {"role": "assistant", "content": "four, I think"}]))
    batch = collate([enc, enc], tiny_tokenizer.pad_token_id, True, 64)
    results = []
    for model in (plain, fused):
        model.train()
        torch.manual_seed(1)  # the same dropout masks on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nll_sum(model, batch)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert results[0][0] == pytest.approx(results[1][0], rel=2e-3)
    for n, g in results[0][1].items():
        other = results[1][1][n]
        assert other.dtype == torch.float32
        assert float((g - other).norm() / g.norm()) < 3e-2, n


def lora_layer_operands():
    """One fused LoRA layer's operands, seeded: X (96×64), a bf16 base W (48×64), A (4×64) and B (48×4) that train,
    the output's gradient dY, and the scale s."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, r = 96, 64, 48, 4
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g).bfloat16()
    a = (torch.randn(r, d_in, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(d_out, r, generator=g) * 0.3).requires_grad_()
    return x, w, a, b, torch.randn(n, d_out, generator=g), 2.0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_branch_under_bf16_computes_the_adapter_in_float32(dropout):
    """strategy.fp32_branch: under bf16 autocast only the base product is bf16; the layer's output is that product
    plus the adapter's float32 contribution, in float32, and the adapter's gradients are float32 sums of float32
    operands (dY, X, dY·B, X·Aᵀ), equal to float64 to float32 rounding. Rounding the adapter's operands to bf16,
    as the default path and autocast in PEFT's layer do, misses the references by ≈ 1e-2."""
    from ftcli.strategies.dropout import dropout as ftcli_dropout
    from ftcli.strategies.lora_fused import _LoraLinear

    x, w, a, b, dy, s = lora_layer_operands()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _LoraLinear.apply(x, w, None, a, b, s, torch.bfloat16, dropout, True)
    (y * dy).sum().backward()
    assert y.dtype == a.grad.dtype == b.grad.dtype == torch.float32
    # the references in float64: the base product of the bf16-rounded X and W, rounded to bf16 as oneDNN returns
    # it; the adapter's branch on X itself or its dropped-out copy (the same mask, drawn again from the same seed)
    torch.manual_seed(1)
    xin = (ftcli_dropout(x, dropout)[0] if dropout else x).double()
    A, B, D = a.detach().double(), b.detach().double(), dy.double()
    base = (x.bfloat16().double() @ w.double().T).bfloat16().double()
    close = lambda got, want: torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)  # noqa: E731
    assert close(y.detach(), base + s * (xin @ A.T) @ B.T)
    assert close(a.grad, s * (D @ B).T @ xin) and close(b.grad, s * D.T @ (xin @ A.T))
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    assert not close(a.grad, s * bf(bf(D) @ bf(B)).T @ bf(xin))  # what bf16 operands would give


def test_fp32_branch_reaches_every_fused_layer_and_belongs_to_lora_alone(tiny_model_dir, tmp_path, run_cli):
    """The recipe key sets every fused layer of a bf16 run, whose outputs are then float32; dora and qlora, which
    train through PEFT's own layers, reject it by name."""
    from conftest import addition_rows, write_jsonl
    from ftcli.strategies.base import Context
    from ftcli.strategies.lora import Lora
    from ftcli.strategies.lora_fused import FusedLinear

    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(16))
    recipe = recipe_mod.load(make_recipe(tmp_path, tiny_model_dir, data, training={"precision": "bf16"},
                                         strategy={"name": "lora", "r": 4, "fp32_branch": True}))
    model = Lora(recipe.strategy).prepare(models.load_model(str(tiny_model_dir)), Context(recipe=recipe))
    layers = [m for m in model.modules() if isinstance(m, FusedLinear)]
    assert len(layers) == 14 and all(m.fp32_branch for m in layers)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers[0](torch.randn(3, layers[0].in_features)).dtype == torch.float32
    for name in ("dora", "qlora"):
        (tmp_path / name).mkdir()
        bad = make_recipe(tmp_path / name, tiny_model_dir, data, strategy={"name": name, "fp32_branch": True})
        code, _, err = run_cli("check", str(bad))
        assert code == 2 and "fp32_branch" in " ".join(err.split()), err


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_gradients_under_bf16_are_sums_in_float32(dropout):
    """Under bf16 autocast the adapter's gradients are summed over tokens in float32: the gradient of a batch
    equals the sum of its two halves' to float32 rounding (what makes 2 processes × batch 4 end where 1 × 8 does),
    and equals the float64 sum of the same bf16 operands. A bf16 product rounds each sum to 8 bits (≈ 4e-3)."""
    from ftcli.strategies.dropout import dropout as ftcli_dropout
    from ftcli.strategies.lora_fused import _LoraLinear

    x, w, a, b, dy, s = lora_layer_operands()
    n = x.shape[0]

    def grads(rows):
        a.grad = b.grad = None
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = _LoraLinear.apply(x[rows], w, None, a, b, s, torch.bfloat16, dropout)
        (y.float() * dy[rows]).sum().backward()
        return a.grad.clone(), b.grad.clone()

    whole = grads(slice(None))
    assert all(t.dtype == torch.float32 for t in whole)
    if not dropout:  # (the masks of two halves are other draws than the whole's)
        halves = [grads(slice(0, n // 2)), grads(slice(n // 2, n))]
        for i in range(2):
            parts = halves[0][i] + halves[1][i]
            assert float((parts - whole[i]).abs().max() / whole[i].abs().max()) < 1e-5
    # the reference: float64 sums of the bf16 operands autocast makes (dY, dY·B, X·Aᵀ and A's input X
    # or its dropped-out copy: the same mask, drawn again from the same seed)
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    torch.manual_seed(1)
    xin = bf(ftcli_dropout(x, dropout)[0] if dropout else x)
    dyb = bf(bf(dy) @ bf(b.detach()))
    xa = bf(bf(xin) @ bf(a.detach()).T)
    assert torch.allclose(whole[0].double(), s * dyb.T @ xin, rtol=1e-5, atol=1e-5)
    assert torch.allclose(whole[1].double(), s * bf(dy).T @ xa, rtol=1e-5, atol=1e-5)
