"""`ftcli merge` and `ftcli export`: every merge method against a dense reference Σ w_i s_i B_i A_i, the identities
(weight 1 = itself, 1 and −1 cancel, cat/full-rank svd = dense), errors that name the module, and exports whose
logits match base + adapter."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftcli.run_folder import RunFolder
from ftcli import merge
from ftcli.errors import UserError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(folder, base_dir, *, r=4, alpha=8.0, rslora=False, seed=0, targets=TARGETS, base_name=None,
                 **extra):
    """A PEFT adapter over the tiny model with random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                                                  **extra))
    peft_model.peft_config["default"].base_model_name_or_path = base_name or str(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


def deltas(folder) -> dict:
    """Module → s B A (float64), read back from an adapter folder."""
    a = merge.read_adapter(folder)
    return {m: a.scale(m) * (B.double() @ A.double()) for m, (A, B, _) in a.factors.items()}


def reference(folders, weights) -> dict:
    ds = [deltas(f) for f in folders]
    return {m: sum(w * d[m] for w, d in zip(weights, ds)) for m in ds[0]}


def rel(a, b) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """Three adapters over the same modules: different ranks, alphas and scaling rules."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", tiny_model_dir, r=4, alpha=8, seed=1),
        "b": make_adapter(root / "b", tiny_model_dir, r=2, alpha=3, rslora=True, seed=2),
        "c": make_adapter(root / "c", tiny_model_dir, r=3, alpha=5, seed=3),
    }


ALL = merge.METHODS
DENSITY = {"ties": 1.0, "dare_linear": 1.0, "dare_ties": 1.0}


# ------------------------------------------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("method,rank", [("cat", None), ("linear", None), ("svd", 9), ("svd", 50), ("linear", 9)])
def test_exact_methods_equal_the_dense_reference(method, rank, adapters, tmp_path):
    folders, weights = [adapters["a"], adapters["b"], adapters["c"]], [0.7, -1.3, 2.0]
    res = merge.merge_adapters(folders, method, weights, rank=rank, out=tmp_path / "m")
    ref, got = reference(folders, weights), deltas(tmp_path / "m")
    assert set(got) == set(ref)
    for m in ref:
        assert rel(got[m], ref[m]) <= 1e-5, (m, rel(got[m], ref[m]))
    assert res.max_error <= 1e-6
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == res.rank and not cfg["use_rslora"]
    assert res.rank == 9  # Σr: 4 + 2 + 3


def test_svd_on_two_threads_equals_one_thread_and_gives_the_threads_back(adapters, monkeypatch):
    """The shape groups split across torch's threads, each part single-threaded: the factors are those of one
    thread (to float rounding: the same modules factored in batches of another size round differently on an AMD
    EPYC, bit for bit on the Intel machine), every module is there once, and torch's thread count is what it was."""
    loaded = [merge.read_adapter(adapters[n]) for n in "abc"]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = merge.merge_loaded(loaded, "svd", [0.7, -1.3, 2.0], rank=5)
        torch.set_num_threads(2)
        seen = []
        real = merge._split
        monkeypatch.setattr(merge, "_split", lambda names, parts: seen.append(parts) or real(names, parts))
        _, two = merge.merge_loaded(loaded, "svd", [0.7, -1.3, 2.0], rank=5)
        assert torch.get_num_threads() == 2 and seen and set(seen) == {2}
    finally:
        torch.set_num_threads(old)
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6 * float(one[k].abs().max()), msg=k)


def test_the_costliest_parts_start_first(monkeypatch):
    """Parts go to the threads costliest first (so the last to finish is a small one), each once, every module in
    one part."""
    import threading
    import time

    started, lock = [], threading.Lock()

    def fn(names):
        with lock:
            started.append(tuple(names))
        time.sleep(0.02)
        return len(names)

    groups = [[f"small{i}" for i in range(2)], [f"big{i}" for i in range(6)], [f"mid{i}" for i in range(4)]]
    cost = {"s": 1, "m": 10, "b": 100}
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = merge._on_threads(fn, groups, lambda names: cost[names[0][0]] * len(names))
    finally:
        torch.set_num_threads(old)
    assert sorted(n for names, _ in out for n in names) == sorted(n for g in groups for n in g)
    assert [len(started), {p[0][0] for p in started[:2]}] == [6, {"b"}]
    assert {p[0][0] for p in started[-2:]} == {"s"}


@pytest.mark.parametrize("method", ALL)
def test_one_adapter_at_weight_one_gives_itself_back(method, adapters, tmp_path):
    res = merge.merge_adapters([adapters["a"]], method, [1.0], density=DENSITY.get(method), out=tmp_path / "m")
    ref, got = deltas(adapters["a"]), deltas(tmp_path / "m")
    for m in ref:
        assert rel(got[m], ref[m]) <= 1e-5, (method, m)
    assert res.rank == 4


@pytest.mark.parametrize("method,density", [(m, DENSITY.get(m)) for m in ALL] + [("ties", 0.4)])
def test_two_copies_at_one_and_minus_one_cancel(method, density, adapters, tmp_path):
    a = adapters["a"]
    merge.merge_adapters([a, a], method, [1.0, -1.0], density=density, out=tmp_path / "m")
    ref = deltas(a)
    for m, d in deltas(tmp_path / "m").items():
        assert float(d.norm()) <= 1e-6 * float(ref[m].norm()), (method, m, float(d.norm()))


def test_svd_below_full_rank_is_the_best_rank_r_approximation(adapters, tmp_path):
    folders, weights = [adapters["a"], adapters["c"]], [1.0, 0.5]
    res = merge.merge_adapters(folders, "svd", weights, rank=3, out=tmp_path / "m")
    ref, got = reference(folders, weights), deltas(tmp_path / "m")
    errors = {m.name: m.error for m in res.modules}
    for m, d in ref.items():
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert rel(got[m], best) <= 1e-5, m
        assert math.isclose(rel(got[m], d), rel(best, d), rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(errors[m], rel(best, d), rel_tol=1e-4, abs_tol=1e-6)
    assert res.rank == 3 and res.max_error > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_low_rank_svd_handles_degenerate_modules(dtype):
    """A batch mixing a well-conditioned module, a rank-deficient one (an adapter stacked with a multiple of
    itself) and one with
    B = 0: the fast path and the QR route both give the dense best rank-r approximation."""
    g = torch.Generator().manual_seed(0)
    B1, A1 = torch.randn(40, 6, generator=g, dtype=dtype), torch.randn(6, 24, generator=g, dtype=dtype)
    B2, A2 = torch.randn(40, 3, generator=g, dtype=dtype), torch.randn(3, 24, generator=g, dtype=dtype)
    B = torch.stack([torch.cat([B1[:, :3], B2], 1), torch.cat([B2, -B2], 1), torch.zeros(40, 6, dtype=dtype)])
    A = torch.stack([torch.cat([A1[:3], A2]), torch.cat([A2, -2 * A2]), A1])  # ΔW_1 = 3 B2 A2: rank 3 of 6
    for rank in (6, 2):
        Bo, Ao, errors = merge.lowrank_svd_batched(B, A, rank)
        assert Bo.dtype == dtype and Bo.shape == (3, 40, rank)
        for i in range(3):
            d = B[i].double() @ A[i].double()
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
            got = Bo[i].double() @ Ao[i].double()
            assert float((got - best).norm()) <= 1e-5 * max(float(d.norm()), 1.0), (i, rank)
            want = float((d - best).norm() / d.norm()) if float(d.norm()) > 0 else 0.0
            assert math.isclose(errors[i], want, rel_tol=1e-3, abs_tol=1e-5), (i, rank, errors[i], want)


def test_linear_is_on_delta_w_not_on_the_factors(adapters, tmp_path, tiny_model_dir):
    """PEFT's `linear` adds √(w s) A and √(w s) B separately, which adds cross terms B_i A_j (peft#3004)."""
    a = adapters["a"]
    a2 = make_adapter(tmp_path / "a2", tiny_model_dir, r=4, alpha=8, seed=9)  # PEFT's linear needs equal ranks
    merge.merge_adapters([a, a2], "linear", [1.0, 1.0], out=tmp_path / "m")
    ref, got = reference([a, a2], [1.0, 1.0]), deltas(tmp_path / "m")
    fa, fb = merge.read_adapter(a), merge.read_adapter(a2)
    for m in ref:
        assert rel(got[m], ref[m]) <= 1e-5
        (A1, B1, _), (A2, B2, _) = fa.factors[m], fb.factors[m]
        s1, s2 = math.sqrt(fa.scale(m)), math.sqrt(fb.scale(m))
        factorwise = (s1 * B1 + s2 * B2).double() @ (s1 * A1 + s2 * A2).double()
        assert rel(factorwise, ref[m]) > 0.1  # the cross terms are not small


# ------------------------------------------------------------------------------------------------------------
# ties and dare


def test_ties_on_a_hand_checked_case():
    d1 = torch.tensor([[3.0, -1.0], [1.0, 2.0]], dtype=torch.float64)
    d2 = torch.tensor([[-2.0, 1.0], [3.0, -0.5]], dtype=torch.float64)
    # density 1: elected signs of the sum [[1, 0], [4, 1.5]] → [[+, 0], [+, +]]; mean of the agreeing entries
    assert torch.equal(merge.sign_merge([d1, d2]), torch.tensor([[3.0, 0.0], [2.0, 2.0]], dtype=torch.float64))
    # density 0.5 trims each to its two largest entries: d1 → [[3, 0], [0, 2]], d2 → [[-2, 0], [3, 0]]
    assert torch.equal(merge.trim(d1, 0.5), torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    t = [merge.trim(d1, 0.5), merge.trim(d2, 0.5)]
    assert torch.equal(merge.sign_merge(t), torch.tensor([[3.0, 0.0], [3.0, 2.0]], dtype=torch.float64))


def test_dare_drops_the_density_fraction_and_rescales():
    d = torch.ones(200, 300, dtype=torch.float64)
    out = merge.drop(d, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    again = merge.drop(d, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


@pytest.mark.parametrize("method", merge.DENSE_METHODS)
def test_dense_methods_are_seeded_and_report_their_truncation_error(method, adapters, tmp_path):
    folders = [adapters["a"], adapters["c"]]
    r1 = merge.merge_adapters(folders, method, [1.0, 0.5], density=0.5, seed=3, rank=2, out=tmp_path / "1")
    merge.merge_adapters(folders, method, [1.0, 0.5], density=0.5, seed=3, rank=2, out=tmp_path / "2")
    merge.merge_adapters(folders, method, [1.0, 0.5], density=0.5, seed=4, rank=2, out=tmp_path / "3")
    t1, t2, t3 = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "123")
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert any(not torch.equal(t1[k], t3[k]) for k in t1) == method.startswith("dare")
    assert r1.rank == 2 and 0 < r1.max_error < 1
    # the reported error is ‖ΔW − B A‖/‖ΔW‖ of the method's own dense ΔW
    ds = [deltas(f) for f in folders]
    got = deltas(tmp_path / "1")
    for mod in r1.modules:
        if method == "ties":
            dense = merge.sign_merge([merge.trim(1.0 * ds[0][mod.name], 0.5), merge.trim(0.5 * ds[1][mod.name], 0.5)])
            assert math.isclose(rel(got[mod.name], dense), mod.error, rel_tol=1e-3, abs_tol=1e-6)


def test_randomised_dense_svd_is_near_optimal_and_reports_its_true_error():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(400, 300, generator=g, dtype=torch.float64))
    delta = (U * torch.logspace(0, -3, 300, dtype=torch.float64)) @ V.T
    B, A, err = merge.dense_svd(delta, 20, seed=1)
    assert math.isclose(err, rel(B @ A, delta), rel_tol=1e-9)
    S = torch.linalg.svdvals(delta)
    best = float(S[20:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
    assert best <= err <= 1.05 * best
    B2, A2, _ = merge.dense_svd(delta, 20, seed=1)
    assert torch.equal(B, B2) and torch.equal(A, A2)


def test_default_rank_of_dense_methods_is_the_largest_input_rank(adapters, tmp_path):
    res = merge.merge_adapters([adapters["a"], adapters["b"]], "ties", density=0.5, dry_run=True)
    assert res.rank == 4


# ------------------------------------------------------------------------------------------------------------
# refusals


def test_errors_name_the_module_and_the_shapes(adapters, tmp_path, tiny_model_dir):
    a = adapters["a"]
    tensors = load_file(str(a / "adapter_model.safetensors"))
    key = next(k for k in tensors if "q_proj.lora_B" in k)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    tensors[key] = torch.zeros(tensors[key].shape[0] + 2, tensors[key].shape[1])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"self_attn\.q_proj: shape mismatch, ΔW is 32×32 in .* but 34×32 in"):
        merge.merge_adapters([a, bad], "cat", out=tmp_path / "m")

    missing = tmp_path / "missing"
    make_adapter(missing, tiny_model_dir, targets=["q_proj", "v_proj"])
    with pytest.raises(UserError, match=r"module base_model\.model\.model\.layers\.0\.mlp\.down_proj is in .* "
                                        r"but not in"):
        merge.merge_adapters([a, missing], "svd", out=tmp_path / "m")

    other = tmp_path / "other"
    make_adapter(other, tiny_model_dir, base_name="some/other-model")
    with pytest.raises(UserError, match="different base models.*some/other-model"):
        merge.merge_adapters([a, other], "cat", out=tmp_path / "m")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("extra,match", [({"use_dora": True}, "DoRA"), ({"bias": "lora_only"}, "bias"),
                                         ({"lora_bias": True}, "bias")])
def test_dora_and_bias_adapters_are_refused(extra, match, adapters, tmp_path, tiny_model_dir):
    odd = make_adapter(tmp_path / "odd", tiny_model_dir, **extra)
    with pytest.raises(UserError, match=match):
        merge.merge_adapters([adapters["a"], odd], "cat", out=tmp_path / "m")


def test_nan_inputs_and_overflowing_outputs_are_refused(adapters, tmp_path):
    a = adapters["a"]
    tensors = load_file(str(a / "adapter_model.safetensors"))
    key = next(k for k in tensors if "v_proj.lora_A" in k)
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"v_proj: lora_A.* NaN"):
        merge.merge_adapters([a, bad], "cat", out=tmp_path / "m")
    with pytest.raises(UserError, match=r"module .*proj: the merged factors contain NaN/inf \(they overflow"):
        merge.merge_adapters([a], "cat", [1e80], out=tmp_path / "m")
    with pytest.raises(UserError, match=r"module .*proj: the merged factors contain NaN/inf \(they overflow"):
        merge.merge_adapters([a], "svd", [1e80], out=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_argument_errors(adapters, tmp_path):
    a, b = adapters["a"], adapters["b"]
    with pytest.raises(UserError, match="--weights has 1 values for 2 adapters"):
        merge.merge_adapters([a, b], "cat", [1.0], out=tmp_path / "m")
    with pytest.raises(UserError, match="needs --density"):
        merge.merge_adapters([a, b], "ties", out=tmp_path / "m")
    with pytest.raises(UserError, match="--method"):
        merge.merge_adapters([a, b], "average", out=tmp_path / "m")
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="exists"):
        merge.merge_adapters([a, b], "cat", out=tmp_path / "exists")


# ------------------------------------------------------------------------------------------------------------
# the output is a real PEFT adapter


def test_merged_adapter_loads_with_peft_and_matches_the_dense_update(adapters, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folders, weights = [adapters["a"], adapters["b"]], [1.0, -0.5]
    merge.merge_adapters(folders, "svd", weights, rank=6, out=tmp_path / "m")
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                           str(tmp_path / "m")).eval()
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for m, d in reference(folders, weights).items():
            params[m.removeprefix("base_model.model.") + ".weight"].add_(d.float())
        a, b = peft_model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


# ------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_merge_dry_run_and_real(adapters, tmp_path, run_cli):
    a, b = adapters["a"], adapters["b"]
    code, out, err = run_cli("merge", a, b, "--method", "svd", "--weights", "1,-1", "--rank", "3", "--dry-run")
    assert code == 0, err
    assert "layers.0.self_attn.q_proj" in out and "32×32" in out and "4+2" in out and "truncated" in out
    assert not (tmp_path / "m").exists()
    code, out, err = run_cli("merge", a / "adapter_model.safetensors", b, "--method", "cat", "--weights", "-1,2",
                             "--out", tmp_path / "m")
    assert code == 0, err
    assert "rank 6" in out and (tmp_path / "m" / "adapter_model.safetensors").is_file()
    code, out, err = run_cli("merge", a, b, "--method", "ties", "--out", tmp_path / "t")
    assert code == 2 and "--density" in err


# ------------------------------------------------------------------------------------------------------------
# export


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    from conftest import addition_rows, make_recipe, write_jsonl

    from ftcli import recipe as recipe_mod
    from ftcli import train

    folder = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(folder / "d.jsonl", addition_rows(48))
    path = make_recipe(folder, tiny_model_dir, data, strategy={"name": "lora", "r": 4, "alpha": 8},
                       training={"max_steps": 3, "batch_size": 8, "lr": 1e-2}, eval={"metrics": ["loss"]})
    r = recipe_mod.load(path)
    return train.run(r, output=recipe_mod.default_output(r), progress=False)


def _logits_match(folder, reference_model, tokenizer):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([tokenizer("what is 3 + 4").input_ids])
    reference_model.eval()
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, reference_model(input_ids=ids).logits
    return float((a - b).abs().max())


def test_export_a_lora_run(lora_run, tmp_path, run_cli, tiny_tokenizer):
    from transformers import AutoTokenizer

    from ftcli import models

    code, out, err = run_cli("export", lora_run, "--out", tmp_path / "exp")
    assert code == 0, err
    folder = tmp_path / "exp"
    assert (folder / "model.safetensors").is_file() and "max |diff|" in out
    gen = json.loads((folder / "generation_config.json").read_text())
    eot, eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"), tiny_tokenizer.eos_token_id
    assert set(gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]) == {eot, eos}
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template == tiny_tokenizer.chat_template
    peft_model, tok = RunFolder(lora_run).load()
    assert _logits_match(folder, peft_model, tok) <= 1e-5
    report = json.loads((folder / "export.json").read_text())
    assert report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]
    code, _, err = run_cli("export", lora_run, "--out", folder)
    assert code == 2 and "exists" in err


def test_export_a_merged_adapter(lora_run, adapters, tmp_path, run_cli, tiny_model_dir):
    from ftcli import models

    merged = tmp_path / "merged"
    other = make_adapter(tmp_path / "other", tiny_model_dir, targets="all-linear", seed=5)
    merge.merge_adapters([lora_run / "adapter", other], "svd", [1.0, 0.5], rank=8, out=merged)
    code, out, err = run_cli("export", "--adapter", merged / "adapter_model.safetensors", "--base", tiny_model_dir,
                             "--out", tmp_path / "exp")
    assert code == 0, err
    model, tok = models.load_adapter(merged, str(tiny_model_dir))
    assert _logits_match(tmp_path / "exp", model, tok) <= 1e-5
    # without --base, the base named in the adapter's own config is used
    code, out, err = run_cli("export", "--adapter", merged, "--out", tmp_path / "exp2")
    assert code == 0, err
    assert _logits_match(tmp_path / "exp2", model, tok) <= 1e-5


def test_export_fails_and_writes_nothing_when_the_logits_differ(lora_run, tmp_path, run_cli, monkeypatch):
    from ftcli import export as export_mod

    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # no difference, not even 0, passes
    code, _, err = run_cli("export", lora_run, "--out", tmp_path / "exp")
    assert code == 1 and "export check failed" in err
    assert not (tmp_path / "exp").exists() and not any(tmp_path.iterdir())


def test_export_a_full_weights_run(tmp_path, tiny_model_dir, run_cli):
    from conftest import addition_rows, make_recipe, write_jsonl

    from ftcli import models
    from ftcli import recipe as recipe_mod
    from ftcli import train

    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(32))
    r = recipe_mod.load(make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "full"},
                                    training={"max_steps": 2, "batch_size": 8}, eval={"metrics": ["loss"]}))
    run_dir = train.run(r, output=recipe_mod.default_output(r), progress=False)
    code, out, err = run_cli("export", run_dir, "--out", tmp_path / "exp")
    assert code == 0, err
    model, tok = RunFolder(run_dir).load()
    assert _logits_match(tmp_path / "exp", model, tok) == 0.0
    assert (tmp_path / "exp" / "generation_config.json").is_file()


def test_export_a_qlora_run_folds_into_the_dequantised_base(tmp_path, tiny_model_dir, run_cli):
    """A qlora adapter is folded into the 4-bit base it was trained on, de-quantised to float32: the export
    reproduces 4-bit base + adapter, holds no 4-bit tensor and no quantisation config, and is not the original
    float32 base + adapter (which is a different model by the quantisation error)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from conftest import addition_rows, make_recipe, write_jsonl

    from ftcli import models
    from ftcli import recipe as recipe_mod
    from ftcli import train

    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(32))
    r = recipe_mod.load(make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "qlora", "r": 4, "alpha": 8},
                                    training={"max_steps": 2, "batch_size": 8}, eval={"metrics": ["loss"]}))
    run_dir = train.run(r, output=recipe_mod.default_output(r), progress=False)
    code, out, err = run_cli("export", run_dir, "--out", tmp_path / "exp")
    assert code == 0, err
    assert "de-quantised" in out
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert "quantization_config" not in config
    tensors = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    trained, tok = RunFolder(run_dir).load()  # the 4-bit base + adapter, as trained
    assert _logits_match(tmp_path / "exp", trained, tok) <= 1e-5
    original = PeftModel.from_pretrained(models.load_model(str(tiny_model_dir)), str(run_dir / "adapter"))
    assert _logits_match(tmp_path / "exp", original, tok) > 1e-4
