"""`ftcli generate` and `ftcli chat` on the tiny model: a seeded sample equals a plain `model.generate` with the same
settings; batched left-padded prompts give what one-by-one prompts give; a run, its adapter with --base and its
export generate the same text; chat streams exactly the reply it keeps in the conversation."""

import json

import pytest
import torch

from ftcli import generate as gen_mod
from ftcli.errors import UserError
from ftcli.evaluate import Sampling
from ftcli.generate import Settings

from conftest import addition_rows, make_recipe, write_jsonl

PROMPTS = ["what is 2 + 3", "write one sentence about the water and the year", "say hello"]


@pytest.fixture(scope="module")
def tiny_gen(tiny_model_dir):
    return gen_mod.load(str(tiny_model_dir), log=lambda m: None)


def test_seeded_sample_equals_plain_model_generate(tiny_gen, tiny_tokenizer):
    settings = Settings(Sampling(temperature=0.9, top_p=0.95, top_k=20), max_new_tokens=12, seed=7)
    got = tiny_gen([PROMPTS[0]], settings)[0][0]
    # the same prompt built independently: the tokenizer's own chat template, tokenised by it
    ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert tiny_gen.prompt_ids(PROMPTS[0]) == list(ids)
    assert ids.count(tiny_tokenizer.bos_token_id) == 1
    model = tiny_gen.target.model
    torch.manual_seed(7)
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=True, temperature=0.9, top_p=0.95, top_k=20, max_new_tokens=12,
                         eos_token_id=tiny_gen.stops, pad_token_id=tiny_tokenizer.pad_token_id)
    assert got.text == tiny_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert got.tokens == out.shape[1] - len(ids) or got.finished
    # reproducible for the seed, different for another, and the caller's RNG stream is left alone
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = tiny_gen([PROMPTS[0]], settings)[0][0]
    assert torch.rand(1) == before
    assert again == got
    other = tiny_gen([PROMPTS[0]], Settings(settings.sampling, max_new_tokens=12, seed=8))[0][0]
    assert other.text != got.text


def test_samples_per_prompt_are_distinct_draws(tiny_gen):
    settings = Settings(Sampling(temperature=1.0), max_new_tokens=10, seed=0, samples=3)
    out = tiny_gen(PROMPTS[:2], settings)
    assert [len(g) for g in out] == [3, 3]
    assert len({g.text for g in out[0]}) == 3


def test_settings_refuse_what_cannot_work():
    with pytest.raises(UserError, match="greedy"):
        Settings(Sampling(), samples=2)
    with pytest.raises(UserError, match="top-p"):
        Settings(Sampling(temperature=1.0, top_p=0.0))
    with pytest.raises(UserError, match="temperature"):
        Settings(Sampling(temperature=-1.0))


def test_prompt_rows():
    assert gen_mod.prompt_of({"prompt": "hi"}, "r") == "hi"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert gen_mod.prompt_of({"messages": msgs}, "r") == msgs[:1]  # a training row asks for its own answer
    assert gen_mod.prompt_of({"instruction": "add", "input": "2 3"}, "r") == [{"role": "user", "content": "add\n\n2 3"}]
    with pytest.raises(UserError, match="no prompt; the row has text"):
        gen_mod.prompt_of({"text": "x"}, "f.jsonl row 0")


def test_cli_prompt_writes_only_the_text_and_file_batches_like_one_by_one(run_cli, tiny_model_dir, tmp_path):
    one_by_one = []
    for p in PROMPTS:
        code, out, err = run_cli("generate", tiny_model_dir, "--prompt", p, "-n", "8")
        assert code == 0, err
        assert "prompts as the chat template" in err and "prompts as" not in out
        one_by_one.append(out[:-1])  # the text and a newline, nothing else
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    code, out, err = run_cli("generate", tiny_model_dir, "--file", path, "-n", "8", "--batch-size", "3")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2]
    assert [r["generation"] for r in rows] == one_by_one  # left-padded in one batch = alone
    code, out, err = run_cli("generate", tiny_model_dir, "--prompt", "x", "--samples", "2")
    assert code == 2 and "greedy" in err
    code, out, err = run_cli("generate", tiny_model_dir)
    assert code == 2 and "--prompt" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"question": "b"}])
    code, out, err = run_cli("generate", tiny_model_dir, "--file", bad)
    assert code == 2 and "bad.jsonl row 1" in err and "question" in err


def test_raw_continues_plain_text(tiny_model_dir, tiny_tokenizer):
    gen = gen_mod.load(str(tiny_model_dir), raw=True, log=lambda m: None)
    ids = gen.prompt_ids("the water is")
    assert ids == [tiny_tokenizer.bos_token_id] + tiny_tokenizer("the water is", add_special_tokens=False).input_ids
    with pytest.raises(UserError, match="chat template"):
        gen.prompt_ids([{"role": "user", "content": "x"}])


def test_run_adapter_and_export_generate_the_same(run_cli, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(32))
    recipe = make_recipe(tmp_path, tiny_model_dir, data, data={"system_prompt": "You add."})
    assert run_cli("train", recipe)[0] == 0
    run = tmp_path / "run"
    args = ["--prompt", "what is 4 + 4", "-n", "8"]
    code, from_run, err = run_cli("generate", run, *args)
    assert code == 0, err
    assert "system prompt 'You add.'" in err  # the run's system prompt is used
    code, from_adapter, err = run_cli("generate", run / "adapter", "--base", tiny_model_dir, "--system", "You add.",
                                      *args)
    assert code == 0, err
    assert run_cli("export", run, "--out", tmp_path / "exported")[0] == 0
    code, from_export, err = run_cli("generate", tmp_path / "exported", "--system", "You add.", *args)
    assert code == 0, err
    assert from_run == from_adapter == from_export
    # the run's model differs from the base: the adapter is applied
    code, from_base, _ = run_cli("generate", tiny_model_dir, "--system", "You add.", *args)
    assert from_base != from_run


def test_chat_streams_the_reply_it_keeps(tiny_model_dir):
    lines = iter(["hello there\n", "\n", "what is 2 + 3\n", "/reset\n", "what is 2 + 3\n"])
    written = []
    settings = Settings(Sampling(temperature=0.8), max_new_tokens=8, seed=5)
    state = gen_mod.chat(str(tiny_model_dir), settings=settings, read=lambda: next(lines, None),
                         write=written.append, log=lambda m: None)
    replies = "".join(written).split("\n")[:-1]
    assert state.turns == 3 and len(replies) == 3
    # after /reset the conversation holds one exchange: the streamed text is the reply kept in it
    assert [m["role"] for m in state.messages] == ["user", "assistant"]
    assert replies[2].strip() == state.messages[1]["content"]
    # turn t samples with seed + t: the last turn equals a one-shot generation with seed 5 + 2
    gen = gen_mod.load(str(tiny_model_dir), log=lambda m: None)
    again = gen(["what is 2 + 3"], Settings(settings.sampling, max_new_tokens=8, seed=7))[0][0]
    assert again.text == state.messages[1]["content"]


def test_chat_cli_reads_stdin(run_cli, tiny_model_dir, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\nnever read\n"))
    code, out, err = run_cli("chat", tiny_model_dir, "-n", "6")
    assert code == 0, err
    assert out.endswith("\n") and "/reset starts over" in err
