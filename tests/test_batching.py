"""Batching: packing lets no attention cross examples; the selective-head loss equals the plain loss."""

import random

import pytest
import torch

from ftcli.data.batching import collate, pack, plan_epoch
from ftcli.data.formats import Example
from ftcli.data.tokenize import Encoder
from ftcli.loss import nll_sum, plain_nll_sum
from ftcli.models import load_model


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    model.eval()
    return model


@pytest.fixture(scope="module")
def encoded(tiny_tokenizer):
    rng = random.Random(1)
    words = "the a one two three answer question paris france capital date".split()
    examples = []
    for i in range(7):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 15)))
        examples.append(Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
    out, _ = Encoder(tiny_tokenizer).encode_all(examples)
    return out


def test_packed_loss_equals_one_by_one(tiny_model, tiny_tokenizer, encoded):
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        packed = collate(encoded, pad, packing=True, pack_len=10_000)
        assert packed.input_ids.shape[0] == 1  # all examples in one row: attention would cross if unmasked
        packed_loss = nll_sum(tiny_model, packed) / packed.n_trained
        total, n = 0.0, 0
        for e in encoded:
            single = collate([e], pad, packing=False, pack_len=10_000)
            total += float(plain_nll_sum(tiny_model, single))
            n += single.n_trained
    assert packed.n_trained == n
    assert float(packed_loss) == pytest.approx(total / n, abs=1e-4)


def test_packing_detects_crossing_attention(tiny_model, tiny_tokenizer, encoded):
    """Power check: with positions running on (no restart), the packed loss differs from one-by-one."""
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        packed = collate(encoded, pad, packing=True, pack_len=10_000)
        leaky = type(packed)(**{**packed.__dict__, "position_ids": torch.arange(packed.input_ids.shape[1])[None],
                                "example_bounds": None})
        sep = float(nll_sum(tiny_model, packed))
        crossed = float(nll_sum(tiny_model, leaky))
    assert abs(sep - crossed) > 1e-3


def assert_same_loss_and_gradient(model, a, b) -> None:
    """Two layouts of the same examples: the same summed loss and the same gradient of a first-block weight."""
    results = []
    for batch in (a, b):
        model.zero_grad()
        loss = nll_sum(model, batch)
        loss.backward()
        results.append((float(loss.detach()), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


def test_per_example_attention_equals_the_masked_row(tiny_model_dir, tiny_tokenizer, encoded):
    """ftcli's attention over packed rows (each example alone) gives transformers' block-diagonal-mask numbers,
    loss and gradient, on rows with several examples and a pad tail."""
    from ftcli.attention import installed

    model = load_model(str(tiny_model_dir))
    assert installed(model)
    batch = collate(encoded, tiny_tokenizer.pad_token_id, packing=True, pack_len=150)
    assert batch.input_ids.shape[0] > 1 and max(len(s) for s in batch.example_bounds) > 3  # 3 examples + pads
    masked = type(batch)(**{**batch.__dict__, "example_bounds": None})  # transformers' mask path
    assert_same_loss_and_gradient(model, batch, masked)


def assert_passes_add_up(model, reference: list, passes: list, weight) -> None:
    """The summed loss over `passes` and the gradient it leaves on `weight(model)` equal the reference passes'."""
    out = []
    for parts in (reference, passes):
        model.zero_grad()
        total = 0.0
        for p in parts:
            loss = nll_sum(model, p)
            loss.backward()
            total += float(loss.detach())
        out.append((total, weight(model).grad.clone()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    assert torch.allclose(out[1][1], out[0][1], rtol=1e-4, atol=1e-7)


def test_passes_of_whole_rows_add_up_to_the_batch(tiny_model_dir, tiny_tokenizer, encoded):
    """A micro-batch split into forward/backward passes gives the same summed loss and gradient, and its parts
    keep every token, trained token and example."""
    model = load_model(str(tiny_model_dir))
    for packing in (True, False):
        batch = collate(encoded, tiny_tokenizer.pad_token_id, packing=packing, pack_len=40)
        parts = batch.split(batch.input_ids.shape[1])  # one row per pass
        assert len(parts) == batch.input_ids.shape[0] > 1
        assert sum(p.n_tokens for p in parts) == batch.n_tokens
        assert sum(p.n_trained for p in parts) == batch.n_trained
        assert sum(p.n_examples for p in parts) == batch.n_examples
        assert sum(p.n_positions for p in parts) < batch.n_positions  # each part trimmed to its longest row
        assert_passes_add_up(model, [batch], parts, lambda m: m.model.layers[1].mlp.down_proj.weight)


def test_flat_passes_lay_rows_end_to_end_with_the_same_loss_and_gradient(tiny_model_dir, tiny_tokenizer, encoded):
    """Packed rows laid end to end in one row per pass (no padding) give the batch's summed loss and gradient,
    on ftcli's per-example attention and on transformers' mask from restarting positions alike."""
    from ftcli.attention import installed

    batch = collate(encoded, tiny_tokenizer.pad_token_id, packing=True, pack_len=40)
    rows, width = batch.input_ids.shape
    assert rows > 2 and batch.n_positions > batch.n_tokens  # several padded rows
    whole = batch.split(10_000, flat=True)
    assert len(whole) == 1 and whole[0].input_ids.shape == (1, batch.n_tokens)
    two = batch.split(2 * width, flat=True)
    assert 1 < len(two) < rows and all(p.input_ids.shape[0] == 1 for p in two)
    assert collate(encoded, tiny_tokenizer.pad_token_id, False, 40).split(10_000, flat=True)[0].input_ids.shape[0] > 1
    for packed_attention in (True, False):
        model = load_model(str(tiny_model_dir))
        if not packed_attention:
            model.set_attn_implementation("sdpa")
        assert installed(model) == packed_attention
        for passes in (whole, two):
            assert_passes_add_up(model, [batch], passes, lambda m: m.model.layers[1].self_attn.q_proj.weight)


def test_padded_batch_loss_equals_one_by_one(tiny_model, tiny_tokenizer, encoded):
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        padded = collate(encoded, pad, packing=False, pack_len=10_000)
        assert padded.n_positions > padded.n_tokens  # there is padding
        total = sum(float(plain_nll_sum(tiny_model, collate([e], pad, False, 10_000))) for e in encoded)
        assert float(nll_sum(tiny_model, padded)) == pytest.approx(total, rel=1e-5)


def test_selective_head_loss_and_gradient_equal_plain(tiny_model_dir, tiny_tokenizer, encoded, monkeypatch):
    import ftcli.loss

    model = load_model(str(tiny_model_dir))
    batch = collate(encoded, tiny_tokenizer.pad_token_id, packing=True, pack_len=80)
    assert batch.input_ids.shape[0] > 1  # several packed rows with padding
    ref = plain_nll_sum(model, batch)
    ref.backward()
    ref_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr(ftcli.loss, "HEAD_CHUNK", 7)  # also exercise the chunked, checkpointed head
    ours = nll_sum(model, batch)
    ours.backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert torch.allclose(model.model.layers[0].mlp.up_proj.weight.grad, ref_grad, rtol=1e-4, atol=1e-7)
    monkeypatch.setattr(ftcli.loss, "SCORE_CHUNK", 5)  # scoring (no gradients) chunks the head too
    with torch.no_grad():
        assert float(nll_sum(model, batch)) == pytest.approx(float(ref.detach()), rel=1e-5)


def test_pack_respects_capacity_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 1]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)


def test_epoch_plan_is_deterministic_and_covers_each_example_once():
    lengths = [random.Random(i).randint(5, 50) for i in range(37)]
    for bucket in (False, True):
        a = plan_epoch(lengths, 4, 2, seed=3, epoch=1, bucket=bucket)
        assert a == plan_epoch(lengths, 4, 2, seed=3, epoch=1, bucket=bucket)
        assert a != plan_epoch(lengths, 4, 2, seed=3, epoch=2, bucket=bucket)
        flat = [i for step in a for mb in step for i in mb]
        assert sorted(flat) == list(range(37))
        assert all(len(step) <= 2 and all(len(mb) <= 4 for mb in step) for step in a)


def test_same_examples_per_step_whatever_the_accumulation():
    lengths = [random.Random(i).randint(5, 50) for i in range(40)]
    big = plan_epoch(lengths, 8, 1, seed=0, epoch=0, bucket=False)
    small = plan_epoch(lengths, 2, 4, seed=0, epoch=0, bucket=False)
    assert [sorted(i for mb in s for i in mb) for s in big] == [sorted(i for mb in s for i in mb) for s in small]


def test_bucketing_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.choice([10, 200]) + rng.randint(0, 5) for _ in range(256)]

    def padding(plan):
        return sum(len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb) for s in plan for mb in s)

    assert padding(plan_epoch(lengths, 8, 1, 0, 0, bucket=True)) < 0.2 * padding(plan_epoch(lengths, 8, 1, 0, 0, False))
