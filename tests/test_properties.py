"""Property tests (hypothesis): the recipe survives its own resolved YAML; `--set` puts any YAML value where the dotted
key says; packing and batching keep every trained token exactly once and let no attention cross examples; adapter
merges keep their identities on random adapters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ftcli import merge
from ftcli.data.batching import collate, plan_epoch
from ftcli.data.tokenize import Encoded
from ftcli.errors import UserError
from ftcli.recipe import Recipe, apply_override, validate

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------------------------
# recipes

names = st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=10)
texts = st.text(max_size=40)  # any Unicode, line breaks included
fraction = st.floats(min_value=0.01, max_value=0.99)
STRATEGIES = {
    "full": st.just({"name": "full"}),
    "frozen": st.fixed_dictionaries({"name": st.just("frozen"), "last_n_blocks": st.integers(1, 64)}),
    "lora": st.fixed_dictionaries({"name": st.sampled_from(["lora", "dora", "qlora"]), "r": st.integers(1, 256),
                                   "alpha": st.floats(0.5, 512), "dropout": st.floats(0.0, 0.9),
                                   "rslora": st.booleans(),
                                   "target_modules": st.one_of(st.just("all-linear"),
                                                               st.lists(names, min_size=1, max_size=4))}),
    "hft": st.fixed_dictionaries({"name": st.just("hft"), "round_steps": st.one_of(st.none(), st.integers(1, 999)),
                                  "embeddings": st.sampled_from(["freeze", "train", "half"])}),
    "ewc": st.fixed_dictionaries({"name": st.just("ewc"), "lambda": st.floats(0, 1e6),
                                  "inner": st.sampled_from([{"name": "full"}, {"name": "lora", "r": 8},
                                                            {"name": "frozen"}, {"name": "hft"}]),
                                  "fisher_rows": st.integers(1, 4096)}),
}
SECTIONS = {
    "data": st.fixed_dictionaries({"train": st.sampled_from(["d.jsonl", "/abs/rows.csv", "org/hub-set"])}, optional={
        "format": st.sampled_from(["alpaca", "chat", "completion"]),
        "validation": st.one_of(st.none(), fraction, st.just("val.jsonl")),
        "max_len": st.integers(8, 1 << 16), "overlong": st.sampled_from(["truncate", "drop"]),
        "packing": st.booleans(), "limit": st.one_of(st.none(), st.integers(1, 10**6)),
        "system_prompt": st.one_of(st.none(), texts), "chat_template": st.one_of(st.none(), st.just("chatml")),
        "fields": st.dictionaries(st.sampled_from(["instruction", "input", "output"]), names, max_size=2)}),
    "training": st.fixed_dictionaries({}, optional={
        "max_steps": st.one_of(st.none(), st.integers(1, 10**6)), "epochs": st.floats(0.01, 100),
        "batch_size": st.integers(1, 512), "grad_accum": st.integers(1, 64), "lr": st.floats(1e-9, 1.0),
        "schedule": st.sampled_from(["cosine", "linear", "constant"]), "warmup": st.floats(0, 500),
        "weight_decay": st.floats(0, 1), "betas": st.tuples(fraction, fraction).map(list),
        "max_grad_norm": st.one_of(st.none(), st.floats(1e-3, 100)), "seed": st.integers(-2**31, 2**31),
        "precision": st.sampled_from(["fp32", "bf16"]), "gradient_checkpointing": st.booleans(),
        "checkpoint_every": st.one_of(st.none(), st.integers(1, 10**4)), "keep_checkpoints": st.integers(1, 9)}),
    "eval": st.fixed_dictionaries({}, optional={
        "every": st.one_of(st.none(), st.integers(1, 10**4)), "max_new_tokens": st.integers(1, 4096),
        "limit": st.one_of(st.none(), st.integers(1, 10**5)), "metrics": st.just(["loss"])}),
}


@st.composite
def raw_recipes(draw) -> dict:
    raw = {"data": draw(SECTIONS["data"])}
    for key in ("training", "eval"):
        if draw(st.booleans()):
            raw[key] = draw(SECTIONS[key])
    if draw(st.booleans()):
        raw["strategy"] = draw(st.one_of(*STRATEGIES.values()))
    if draw(st.booleans()):
        raw["base_model"] = draw(st.sampled_from(["smollm2-135m-instruct", "/models/x", "org/model"]))
    if draw(st.booleans()):
        raw["output"] = draw(st.one_of(st.none(), st.just("runs/x")))
    return raw


@given(raw_recipes())
@FAST
def test_a_recipe_survives_its_resolved_yaml(raw):
    recipe = validate(copy.deepcopy(raw))
    text = recipe.to_yaml()
    again = validate(yaml.safe_load(text))
    # every field equal (the reason `auto` precision gave is not a field: the resolved file says what was chosen)
    assert again.model_dump() == recipe.model_dump() and type(again.strategy) is type(recipe.strategy)
    assert again.to_yaml() == text


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.lists(st.integers(-99, 99), max_size=4))


def as_set_value(v) -> str:
    """A value as a user would type it after `--set key=`: YAML, one line."""
    text = yaml.safe_dump(v, default_flow_style=True, width=math.inf, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip() if v is not None else "null"


@given(st.lists(names, min_size=1, max_size=4), SCALARS, st.dictionaries(names, SCALARS, max_size=3))
@FAST
def test_set_puts_any_yaml_value_at_its_dotted_key(path, value, siblings):
    assume("\n" not in as_set_value(value) and "\r" not in as_set_value(value))
    raw = {"keep": copy.deepcopy(siblings)}
    apply_override(raw, f"{'.'.join(path)}={as_set_value(value)}")
    node = raw
    for part in path[:-1]:
        node = node[part]
    assert node[path[-1]] == value
    if path[0] != "keep":
        assert raw["keep"] == siblings


@given(raw_recipes(), st.sampled_from([("training.lr", st.floats(1e-9, 1.0)), ("training.batch_size", st.integers(1, 64)),
                                       ("data.max_len", st.integers(8, 4096)), ("eval.every", st.integers(1, 99)),
                                       ("data.system_prompt", texts)]).flatmap(
    lambda kv: st.tuples(st.just(kv[0]), kv[1])))
@FAST
def test_set_overrides_a_recipe_key(raw, key_value):
    key, value = key_value
    text = as_set_value(value)
    assume("\n" not in text and "\r" not in text)
    raw = copy.deepcopy(raw)
    apply_override(raw, f"{key}={text}")
    section, name = key.split(".")
    assert getattr(getattr(validate(raw), section), name) == value


@pytest.mark.parametrize("item,words", [("training.lr", "expected dotted.key=value"), ("=3", "empty key"),
                                        ("training.lr.x=3", "training.lr is a value, not a section")])
def test_bad_set_items(item, words):
    raw = {"training": {"lr": 0.1}}
    with pytest.raises(UserError, match=words):
        apply_override(raw, item)


# ------------------------------------------------------------------------------------------------------------
# packing and batching

@st.composite
def examples(draw, max_len=24):
    out = []
    for _ in range(draw(st.integers(1, 9))):
        n = draw(st.integers(1, max_len))
        ids = draw(st.lists(st.integers(3, 300), min_size=n, max_size=n))
        trained = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        trained[0] = False  # the first token is never predicted
        out.append(Encoded(ids, trained))
    return out


def trained_tokens(batch) -> list[tuple[int, int, int]]:
    """(sequence, position in it, token) of every trained position of a collated batch."""
    out = []
    for r in range(batch.input_ids.shape[0]):
        for j in range(batch.input_ids.shape[1]):
            if batch.labels[r, j] != -100:
                assert batch.labels[r, j] == batch.input_ids[r, j]
                out.append((int(batch.seq_ids[r, j]), int(batch.position_ids[r, j]), int(batch.labels[r, j])))
    return sorted(out)


@given(examples(), st.booleans(), st.integers(24, 80))
@FAST
def test_collate_keeps_every_trained_token_once_and_every_example_to_itself(exs, packing, pack_len):
    batch = collate(exs, pad_id=0, packing=packing, pack_len=pack_len)
    order = {id(e): i for i, e in enumerate(exs)}
    seq_to_example = [order[id(s)] for s in batch.sequences]
    assert sorted(seq_to_example) == list(range(len(exs)))  # every example once
    want = sorted((i, j, e.input_ids[j]) for i, e in enumerate(exs) for j, t in enumerate(e.trained) if t)
    got = sorted((seq_to_example[s], p, tok) for s, p, tok in trained_tokens(batch))
    assert got == want and batch.n_trained == len(want)
    assert batch.n_tokens == sum(e.length for e in exs)
    for r in range(batch.input_ids.shape[0]):  # each example's positions run 0..n-1, contiguous, in one row
        seq = batch.seq_ids[r].tolist()
        for s in set(seq) - {-1}:
            cols = [j for j, x in enumerate(seq) if x == s]
            assert cols == list(range(cols[0], cols[0] + len(cols)))
            assert batch.position_ids[r, cols].tolist() == list(range(len(cols)))
            assert batch.input_ids[r, cols].tolist() == exs[seq_to_example[s]].input_ids
        if batch.example_bounds is not None:  # the spans attention runs on: one sequence each (or the pad tail)
            spans = batch.example_bounds[r]
            assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert spans[-1][1] == batch.input_ids.shape[1] or spans[-1][1] == batch.row_tokens[r]
            for s0, s1 in spans:
                assert len(set(seq[s0:s1])) == 1
    for width in (1, 30, 10_000):  # a split into passes keeps every trained token too, rows flat or not
        for flat in (False, True):
            parts = batch.split(width, flat=flat)
            assert sum(p.n_trained for p in parts) == batch.n_trained
            assert sum(p.n_tokens for p in parts) == batch.n_tokens
            got = sorted((seq_to_example[s + sum(q.n_sequences for q in parts[:k])], pos, tok)
                         for k, p in enumerate(parts) for s, pos, tok in trained_tokens(p))
            assert got == want
            if flat and batch.example_bounds is not None:  # one row per part, no pad position, spans tile it
                assert all(p.input_ids.shape[0] == 1 and p.n_positions == p.n_tokens for p in parts)
                assert all(p.n_tokens <= width or p.n_tokens in batch.row_tokens for p in parts)  # over: one row
                for p in parts:
                    spans = p.example_bounds[0]
                    assert spans[0][0] == 0 and spans[-1][1] == p.n_tokens
                    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
                    assert all(len(set(p.seq_ids[0, s0:s1].tolist())) == 1 for s0, s1 in spans)


@given(st.lists(st.integers(1, 500), min_size=1, max_size=200), st.integers(1, 16), st.integers(1, 4),
       st.integers(0, 2**32), st.integers(0, 5), st.booleans())
@FAST
def test_an_epoch_plan_takes_every_example_once(lengths, batch_size, grad_accum, seed, epoch, bucket):
    plan = plan_epoch(lengths, batch_size, grad_accum, seed, epoch, bucket)
    flat = [i for step in plan for mb in step for i in mb]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(mb) <= batch_size for step in plan for mb in step)
    assert all(len(step) <= grad_accum for step in plan)
    assert len(plan) == math.ceil(len(lengths) / (batch_size * grad_accum))
    assert plan == plan_epoch(list(lengths), batch_size, grad_accum, seed, epoch, bucket)  # exact resume


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from ftcli.models import load_model

    model = load_model(str(tiny_model_dir))
    model.eval()
    return model


@given(examples(max_len=20), st.integers(20, 64))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_packed_loss_equals_each_example_alone(tiny, exs, pack_len):
    """With the model: the loss of every example in a packed batch is its loss alone (no attention crosses)."""
    from ftcli.loss import nll_sum, plain_nll_sum

    assume(sum(e.n_trained for e in exs) > 0)
    with torch.no_grad():
        packed = collate(exs, pad_id=0, packing=True, pack_len=pack_len)
        together = float(nll_sum(tiny, packed))
        alone = sum(float(plain_nll_sum(tiny, collate([e], pad_id=0, packing=False, pack_len=pack_len)))
                    for e in exs if e.n_trained)
    assert together == pytest.approx(alone, rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------------------------------------------
# merges on random adapters

@st.composite
def adapters(draw, n=None):
    d, k = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    modules = [f"base_model.model.layers.{i}.proj" for i in range(draw(st.integers(1, 3)))]
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n or draw(st.integers(1, 3))):
        r = draw(st.integers(1, 5))
        config = {"r": r, "lora_alpha": draw(st.floats(0.5, 32)), "use_rslora": draw(st.booleans()),
                  "peft_type": "LORA", "base_model_name_or_path": "base"}
        factors = {m: (torch.randn(r, k, generator=g, dtype=torch.float64),
                       torch.randn(d, r, generator=g, dtype=torch.float64), "lora") for m in modules}
        out.append(merge.Adapter(path=merge.Path(f"/a{len(out)}/adapter_model.safetensors"), config=config,
                                 factors=factors, dtype=torch.float64))
    return out


def delta(a: merge.Adapter, m: str) -> torch.Tensor:
    A, B, _ = a.factors[m]
    return a.scale(m) * B @ A


def merged_delta(tensors: dict, m: str) -> torch.Tensor:
    return tensors[m + ".lora_B.weight"] @ tensors[m + ".lora_A.weight"]  # lora_alpha = r: scale 1


@given(adapters(), st.lists(st.floats(-3, 3), min_size=3, max_size=3))
@FAST
def test_cat_and_full_rank_svd_equal_the_weighted_sum(ads, w):
    weights = w[: len(ads)]
    for method in ("cat", "svd"):
        rank = sum(a.factors[next(iter(a.factors))][0].shape[0] for a in ads) if method == "svd" else None
        result, tensors = merge.merge_loaded(ads, method, weights, rank=rank)
        for m in ads[0].factors:
            want = sum(wi * delta(a, m) for wi, a in zip(weights, ads))
            assert torch.allclose(merged_delta(tensors, m), want, atol=1e-9 * (1 + float(want.abs().max()))), method


@given(adapters(n=1))
@FAST
def test_weight_1_is_itself_and_1_minus_1_cancels(ads):
    (a,) = ads
    for method in ("cat", "linear", "svd"):
        _, tensors = merge.merge_loaded([a], method, [1.0])
        for m in a.factors:
            assert torch.allclose(merged_delta(tensors, m), delta(a, m), atol=1e-9 * (1 + float(delta(a, m).abs().max())))
    _, tensors = merge.merge_loaded([a, a], "cat", [1.0, -1.0])
    for m in a.factors:
        assert float(merged_delta(tensors, m).abs().max()) <= 1e-12 * (1 + float(delta(a, m).abs().max()))


# ------------------------------------------------------------------------------------------------------------
# masks

WORDS = ["the", "answer", "is", "paris", "naïve", "日本語", "🙂", "x=1", "a,b", "end.", "Ⅻ", "über"]
content = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).flatmap(
    lambda ws: st.lists(st.sampled_from([" ", " ", "\n", ", "]), min_size=len(ws) - 1, max_size=len(ws) - 1).map(
        lambda seps: ws[0] + "".join(s + w for s, w in zip(seps, ws[1:]))))


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(content)})
        messages.append({"role": "assistant", "content": draw(content)})
    return messages


@given(conversations(), st.sampled_from([None, "chatml"]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_only_assistant_turns_and_their_end_of_turn_are_trained(tiny_tokenizer, messages, template):
    from ftcli.data.formats import Example
    from ftcli.data.tokenize import Encoder, show_mask

    enc = Encoder(tiny_tokenizer, template=template, max_len=4096).encode(Example(messages=messages))
    trained = [text for text, t in show_mask(tiny_tokenizer, enc) if t]
    assert trained == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert enc.trained[0] is False and enc.input_ids.count(tiny_tokenizer.bos_token_id) == 1
