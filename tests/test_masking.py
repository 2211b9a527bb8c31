"""Label masking: what is trained is assistant content plus its end-of-turn token, in every assistant turn."""

import pytest

from ftcli.data import build, encode_split
from ftcli.data.formats import Example, to_example
from ftcli.data.tokenize import CHATML, Encoder, marked_text, show_mask
from ftcli.errors import UserError
from ftcli.recipe import validate

from conftest import write_jsonl

SINGLE = [{"role": "user", "content": "what is the capital of france"},
          {"role": "assistant", "content": "paris is the capital"}]
MULTI = [{"role": "system", "content": "answer in one word"},
         {"role": "user", "content": "first question"}, {"role": "assistant", "content": "one"},
         {"role": "user", "content": "second question"}, {"role": "assistant", "content": "two words"}]


def trained_text(tok, enc) -> list[str]:
    return [t for t, trained in show_mask(tok, enc) if trained]


def prefix_length_mask(tok, messages, template=None) -> list[bool]:
    """Independent masking: tokenise the prompt prefix alone, train everything after it up to end-of-turn."""
    render = lambda msgs, gen: tok.apply_chat_template(msgs, chat_template=template, tokenize=False,  # noqa: E731
                                                       add_generation_prompt=gen)
    prompt_ids = tok(render(messages[:-1], True), add_special_tokens=False).input_ids
    full_ids = tok(render(messages, False), add_special_tokens=False).input_ids
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    last_eot = max(i for i, t in enumerate(full_ids) if t == eot)
    return [len(prompt_ids) <= i <= last_eot for i in range(len(full_ids))]


def test_template_masking_agrees_with_prompt_prefix_masking(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer).encode(Example(messages=SINGLE))
    assert enc.trained == prefix_length_mask(tiny_tokenizer, SINGLE)


def test_agreement_on_a_template_without_bos(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, template="chatml").encode(Example(messages=SINGLE))
    expected = prefix_length_mask(tiny_tokenizer, SINGLE, template=CHATML)
    # a tokenizer that adds BOS gets one prepended (untrained) when the template has none
    assert enc.input_ids[0] == tiny_tokenizer.bos_token_id and enc.input_ids[1] != tiny_tokenizer.bos_token_id
    assert enc.trained[1:] == expected


def test_every_assistant_turn_is_trained_and_nothing_else(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer).encode(Example(messages=MULTI))
    assert trained_text(tiny_tokenizer, enc) == ["one<|im_end|>", "two words<|im_end|>"]
    text = marked_text(show_mask(tiny_tokenizer, enc))
    assert "⟦first" not in text and "⟦answer" not in text and "⟦second" not in text


def test_end_of_turn_is_trained(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer).encode(Example(messages=SINGLE))
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    positions = [i for i, t in enumerate(enc.input_ids) if t == eot]
    assert [enc.trained[i] for i in positions] == [False, True]  # user turn's end: no; assistant's: yes


def test_exactly_one_bos(tiny_tokenizer):
    """The tiny tokenizer adds BOS and its template renders BOS: naive tokenising would give two."""
    text = tiny_tokenizer.apply_chat_template(SINGLE, tokenize=False)
    assert tiny_tokenizer(text).input_ids[:2] == [tiny_tokenizer.bos_token_id] * 2  # the trap exists
    enc = Encoder(tiny_tokenizer).encode(Example(messages=SINGLE))
    assert enc.input_ids.count(tiny_tokenizer.bos_token_id) == 1 and enc.input_ids[0] == tiny_tokenizer.bos_token_id
    prompt = Encoder(tiny_tokenizer).prompt_ids(SINGLE[:1])
    assert prompt.count(tiny_tokenizer.bos_token_id) == 1


def test_completion_trains_every_token_but_the_first(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, format="completion").encode(Example(text="the answer is four"))
    assert enc.input_ids[0] == tiny_tokenizer.bos_token_id and enc.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert enc.trained == [False] + [True] * (len(enc.input_ids) - 1)


def test_overlong_rows_are_truncated_or_dropped_and_counted(tiny_tokenizer):
    long = [{"role": "user", "content": "word " * 10}, {"role": "assistant", "content": "answer " * 40}]
    examples = [Example(messages=SINGLE), Example(messages=long)]
    limit = len(Encoder(tiny_tokenizer).encode(examples[0]).input_ids) + 4
    out, stats = Encoder(tiny_tokenizer, max_len=limit).encode_all(examples)
    assert stats.truncated == 1 and stats.dropped_overlong == 0 and stats.kept == 2
    assert len(out[1].input_ids) == limit and out[1].truncated and any(out[1].trained)
    out, stats = Encoder(tiny_tokenizer, max_len=limit, overlong="drop").encode_all(examples)
    assert stats.dropped_overlong == 1 and stats.kept == 1 and out[1] is None
    # truncated so early that no trained token is left: dropped and counted, never silently kept
    out, stats = Encoder(tiny_tokenizer, max_len=12).encode_all([Example(messages=long)])
    assert out == [None] and stats.dropped_untrained == 1 and stats.truncated == 0


def test_zero_trained_tokens_is_an_error(tiny_tokenizer):
    long = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "x"}]
    with pytest.raises(UserError, match="0 trainable tokens"):
        encode_split("train", [Example(messages=long)], Encoder(tiny_tokenizer, max_len=16), "rows.jsonl")


def test_alpaca_rows_and_field_mapping():
    ex = to_example({"question": "add", "ctx": "2 and 3", "answer": "5"}, "alpaca",
                    {"instruction": "question", "input": "ctx", "output": "answer"}, where="f row 0")
    assert ex.messages == [{"role": "user", "content": "add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    with pytest.raises(UserError, match=r"f row 3: no field 'output'"):
        to_example({"instruction": "x"}, "alpaca", {}, where="f row 3")


def test_sharegpt_style_chat_through_field_mapping():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    ex = to_example(row, "chat", {"messages": "conversations", "role": "from", "content": "value"}, where="r")
    assert [m["role"] for m in ex.messages] == ["user", "assistant"]


def test_validation_split_is_seeded_and_disjoint(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    r = validate({"base_model": "x", "data": {"train": str(path), "format": "alpaca", "validation": 0.25}})
    a, b = build(r, tiny_tokenizer), build(r, tiny_tokenizer)
    train_q = {ex.messages[0]["content"] for ex in a.train.examples}
    val_q = {ex.messages[0]["content"] for ex in a.validation.examples}
    assert len(val_q) == 10 and len(train_q) == 30 and not train_q & val_q
    assert val_q == {ex.messages[0]["content"] for ex in b.validation.examples}


def test_values_are_read_verbatim(tmp_path):
    """datasets' loaders would turn '1974-02-09' into a timestamp and '007' into 7."""
    from ftcli.data.sources import read_rows

    row = {"instruction": "date", "input": "007", "output": "1974-02-09"}
    assert read_rows(str(write_jsonl(tmp_path / "a.jsonl", [row]))) == [row]
    (tmp_path / "a.csv").write_text("instruction,input,output\ndate,007,1974-02-09\n")
    assert read_rows(str(tmp_path / "a.csv")) == [row]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(UserError, match="bad.jsonl line 2"):
        read_rows(str(tmp_path / "bad.jsonl"))


def test_encoding_cache_returns_the_same_rows_and_stats(tiny_tokenizer, tmp_path, monkeypatch):
    from ftcli.data import tokenize
    from ftcli.data.formats import Example

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokenize, "CACHE_MIN_ROWS", 2)
    examples = [Example(messages=[{"role": "user", "content": f"q{i} " * (i % 7 + 1)},
                                  {"role": "assistant", "content": f"a{i}"}]) for i in range(30)]
    enc = tokenize.Encoder(tiny_tokenizer, None, 12, "drop", "chat")
    first, stats1 = enc.encode_all(examples)
    assert list((tmp_path / "cache" / "tokenized").glob("*.json"))  # written
    second, stats2 = enc.encode_all(examples)
    fresh, stats3 = enc._encode_all(examples)
    assert second == first == fresh and stats2.__dict__ == stats1.__dict__ == stats3.__dict__
    assert stats1.dropped_overlong > 0  # the drops are remembered too, not just the kept rows
    # another length policy is another key, not a stale hit
    other, _ = tokenize.Encoder(tiny_tokenizer, None, 64, "drop", "chat").encode_all(examples)
    assert sum(r is None for r in other) < sum(r is None for r in first)
