"""q, k and v computed as one fused LoRA product (ftcli/strategies/lora_siblings.py): the same outputs and
gradients as the three layers one by one, in fp32 and under bf16 autocast, whichever member the model calls
first; the adapters' gradients still float32 sums (a batch's equals its halves'); and the group stays out of
every case it does not cover."""

from __future__ import annotations

import pytest
import torch

import make_tiny_model
from ftcli import models
from ftcli.data.batching import collate
from ftcli.loss import nll_sum
from ftcli.strategies import lora_fused, lora_siblings
from ftcli.strategies.lora import Lora, LoraParams, store_frozen_in_bf16


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny Qwen2: its q, k and v projections have biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tiny_model.build_tokenizer()
    folder = tmp_path_factory.mktemp("siblings") / "qwen2"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def fused_model(folder, *, grouped: bool, bf16: bool = False, dropout: float = 0.0):
    from peft import get_peft_model

    model = get_peft_model(models.load_model(str(folder)),
                           Lora(LoraParams(r=4, alpha=8, dropout=dropout, target_modules="all-linear")).peft_config())
    torch.manual_seed(0)
    model.load_state_dict({k: torch.randn_like(v) * 0.1 for k, v in model.state_dict().items() if "lora_" in k},
                          strict=False)  # B ≠ 0
    if bf16:
        store_frozen_in_bf16(model)
    if grouped:
        assert lora_siblings.group(model) == 2  # both blocks
    return model.train()


def batch_of(tokenizer):
    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder

    enc = Encoder(tokenizer).encode(Example(messages=[{"role": "user", "content": "what is 2 + 2"},
                                                      {"role": "assistant", "content": "four, I think"}]))
    return collate([enc, enc], tokenizer.pad_token_id, True, 64)


def loss_and_grads(model, batch, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = nll_sum(model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def counting(monkeypatch):
    calls = {"siblings": 0, "single": 0}
    for key, fn in (("siblings", lora_siblings._Siblings), ("single", lora_fused._LoraLinear)):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, real=real, key=key: calls.__setitem__(key, calls[key] + 1)
                            or real(*a))
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_grouped_q_k_v_equal_the_layers_one_by_one(arch, bf16, tiny_model_dir, qwen2_dir, tiny_tokenizer,
                                                   monkeypatch):
    folder = tiny_model_dir if arch == "llama" else qwen2_dir
    batch = batch_of(tiny_tokenizer)
    one_by_one = loss_and_grads(fused_model(folder, grouped=False, bf16=bf16), batch, bf16)
    calls = counting(monkeypatch)
    grouped = loss_and_grads(fused_model(folder, grouped=True, bf16=bf16), batch, bf16)
    assert calls == {"siblings": 2, "single": 2 * 4}  # q, k, v together; o, gate, up, down alone
    assert set(grouped[1]) == set(one_by_one[1])
    if not bf16:
        assert grouped[0] == pytest.approx(one_by_one[0], rel=1e-6)
        for n, g in one_by_one[1].items():
            assert torch.allclose(grouped[1][n], g, rtol=1e-4, atol=1e-7), n
    else:  # bf16 rounds (X·Aᵀ)·(sB) where the layer alone rounds (X·Aᵀ)·B: equal to bf16's resolution
        assert grouped[0] == pytest.approx(one_by_one[0], rel=2e-3)
        for n, g in one_by_one[1].items():
            assert grouped[1][n].dtype == torch.float32
            assert float((grouped[1][n] - g).norm() / g.norm()) < 2e-2, n


def test_any_member_may_come_first_and_the_weights_stay_theirs(tiny_model_dir):
    separate, grouped = (fused_model(tiny_model_dir, grouped=g) for g in (False, True))
    x = torch.randn(2, 5, 32)
    attn_s, attn_g = (m.base_model.model.model.layers[0].self_attn for m in (separate, grouped))
    for order in (("k_proj", "q_proj", "v_proj"), ("v_proj", "k_proj", "q_proj")):
        for name in order:
            out = getattr(attn_g, name)(x)
            assert type(out.grad_fn).__name__ == "_SiblingsBackward"
            assert torch.allclose(out, getattr(attn_s, name)(x), rtol=1e-5, atol=1e-6), name
        assert attn_g.q_proj.siblings.pending is None  # each output taken once
    group = attn_g.q_proj.siblings
    weights = [getattr(attn_g, n).get_base_layer().weight for n in lora_siblings.MEMBERS]
    assert all(w.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr() for w in weights)
    # a member's weight replaced (as a move to another device would): the group is made again from the new one
    weights[1].data = weights[1].data.clone() * 2
    attn_s.k_proj.get_base_layer().weight.data *= 2
    assert torch.allclose(attn_g.k_proj(x), attn_s.k_proj(x), rtol=1e-5, atol=1e-6)
    assert weights[1].untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()


def test_a_call_with_another_input_does_not_take_a_pending_output(tiny_model_dir):
    separate, grouped = (fused_model(tiny_model_dir, grouped=g) for g in (False, True))
    attn_s, attn_g = (m.base_model.model.model.layers[0].self_attn for m in (separate, grouped))
    x, other = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    attn_g.q_proj(x)  # k and v of x now pending
    assert torch.allclose(attn_g.k_proj(other), attn_s.k_proj(other), rtol=1e-5, atol=1e-6)
    attn_g.q_proj(x)
    with torch.no_grad():
        x.add_(1)  # the same tensor changed in place: its pending outputs are stale
    assert torch.allclose(attn_g.v_proj(x), attn_s.v_proj(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["dropout", "eval", "no_grad", "fp32_branch"])
def test_the_group_stays_out_of_what_it_does_not_cover(case, tiny_model_dir, tiny_tokenizer, monkeypatch):
    model = fused_model(tiny_model_dir, grouped=True, dropout=0.1 if case == "dropout" else 0.0)
    if case == "eval":
        model.eval()
    if case == "fp32_branch":
        for m in model.modules():
            if isinstance(m, lora_fused.FusedLinear):
                m.fp32_branch = True
    calls = counting(monkeypatch)
    with torch.no_grad() if case == "no_grad" else torch.enable_grad():
        nll_sum(model, batch_of(tiny_tokenizer))
    assert calls == {"siblings": 0, "single": 14}


def test_grouped_adapter_gradients_under_bf16_are_float32_sums():
    """As for one layer (tests/test_strategies.py): a batch's adapter gradients equal the sum of its halves' to
    float32 rounding, what lets 2 processes × batch 4 end where 1 × 8 does; bf16-rounded sums miss by ≈ 4e-3."""
    g = torch.Generator().manual_seed(0)
    n, d_in, outs, r = 96, 64, (64, 32, 32), 4
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(sum(outs), d_in, generator=g).bfloat16()
    factors = [(torch.randn(r, d_in, generator=g) * 0.3).requires_grad_() for _ in outs] + \
              [(torch.randn(o, r, generator=g) * 0.3).requires_grad_() for o in outs]
    dys = [torch.randn(n, o, generator=g) for o in outs]

    def grads(rows):
        for f in factors:
            f.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys = lora_siblings._Siblings.apply(x[rows], w, None, torch.bfloat16, 2.0, outs, (r,) * 3, *factors)
        sum((y.float() * dy[rows]).sum() for y, dy in zip(ys, dys)).backward()
        return [f.grad.clone() for f in factors]

    whole = grads(slice(None))
    halves = [grads(slice(0, n // 2)), grads(slice(n // 2, n))]
    for i, t in enumerate(whole):
        assert t.dtype == torch.float32
        assert float((halves[0][i] + halves[1][i] - t).abs().max() / t.abs().max()) < 1e-5, i


@pytest.mark.parametrize("processes, distributed, hold", [(1, "fsdp", True), (2, "ddp", True), (2, "fsdp", False)])
def test_where_fsdp_shards_the_blocks_the_group_holds_no_weights(processes, distributed, hold, tiny_model_dir):
    """Under FSDP2 the stacked weights are made per call (it frees each block's gathered weights after the block);
    elsewhere the members' weights become views of one held tensor. Grouped either way: FSDP equals DDP."""
    from ftcli import recipe as recipe_mod
    from ftcli.strategies import Context

    r = recipe_mod.validate({"base_model": str(tiny_model_dir), "strategy": {"name": "lora", "r": 4},
                             "data": {"train": "x.jsonl"}, "training": {"distributed": distributed}})
    model = Lora(r.strategy).prepare(models.load_model(str(tiny_model_dir)), Context(recipe=r, processes=processes))
    groups = {m.siblings for m in model.modules() if isinstance(m, lora_fused.FusedLinear) and m.siblings}
    assert len(groups) == 2 and {g.hold for g in groups} == {hold}
    attn = model.base_model.model.model.layers[0].self_attn
    weights = [getattr(attn, n).get_base_layer().weight for n in lora_siblings.MEMBERS]
    before = [w.data_ptr() for w in weights]
    model.train()
    attn.q_proj(torch.randn(2, 5, 32))
    assert ([w.data_ptr() for w in weights] == before) == (not hold)


def test_grouped_under_activation_checkpointing(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """Recomputed blocks (training.gradient_checkpointing) run the group again in backward: same gradients."""
    batch = batch_of(tiny_tokenizer)
    results = []
    for grouped in (False, True):
        model = fused_model(tiny_model_dir, grouped=grouped)
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = counting(monkeypatch)
        results.append(loss_and_grads(model, batch, False))
        if grouped:
            assert calls["siblings"] == 2 * 2  # each block's forward, and again in its backward
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for n, g in results[0][1].items():
        assert torch.allclose(results[1][1][n], g, rtol=1e-4, atol=1e-7), n


def test_bf16_storage_gives_the_head_its_own_bf16_copy_and_the_same_loss(tmp_path, tiny_tokenizer):
    """Under bf16 the frozen head is stored in bf16 (autocast cast it every step), a tied embedding stays float32
    for the lookup, and the loss is the one autocast gives over the float32 weights, bit for bit."""
    folder = make_tiny_model.build(tmp_path / "tied", tie=True)
    batch = batch_of(tiny_tokenizer)
    plain = fused_model(folder, grouped=False)
    stored = fused_model(folder, grouped=False, bf16=True)
    lm = stored.base_model.model
    assert lm.get_output_embeddings().weight.dtype == torch.bfloat16
    assert lm.get_input_embeddings().weight.dtype == torch.float32
    assert plain.base_model.model.get_output_embeddings().weight is plain.base_model.model.get_input_embeddings().weight
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert float(nll_sum(stored, batch)) == float(nll_sum(plain, batch))
