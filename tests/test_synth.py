"""`ftcli synth` on the tiny model: each filter drops what it should and nothing else; the judge's score is the
log-likelihood difference computed independently; a killed synth resumes to the same file an uninterrupted run
writes (no duplicates, not even of a chunk written but not yet recorded); a seed fixes the output."""

import json

import pytest
import torch

from ftcli import synth as synth_mod
from ftcli.errors import UserError
from ftcli.evaluate import Generation
from ftcli.synth import Filters, Kept, NearDuplicates

from conftest import write_jsonl


def gen(text: str, finished: bool = True) -> Generation:
    return Generation(text, text, len(text), finished)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cheap_filters_drop_what_they_should():
    f = Filters(min_chars=3, max_chars=10, regex=r"\d", exclude_regex="bad", drop_unfinished=True)
    assert f.first_failure(gen("12345", finished=False)) == "unfinished"
    assert f.first_failure(gen("12")) == "too_short"
    assert f.first_failure(gen("12345678901")) == "too_long"
    assert f.first_failure(gen("abcdef")) == "regex"
    assert f.first_failure(gen("bad 1")) == "exclude_regex"
    assert f.first_failure(gen("good 1")) is None
    assert Filters().first_failure(gen("x", finished=False)) is None  # unfinished kept unless asked
    with pytest.raises(UserError, match="--regex"):
        Filters(regex="(")
    with pytest.raises(UserError, match="--judge"):
        Filters(judge="is {answer} right?")


def test_duplicates_exact_and_near():
    kept = Kept(Filters(near_dup=0.8))
    base = {"instruction": "describe the sea", "output": "The sea is wide and deep and full of quiet blue water."}
    assert kept.problem(base) is None
    kept.add(base)
    assert kept.problem(dict(base)) == "duplicate"
    assert kept.problem({**base, "output": base["output"].upper() + "  "}) == "duplicate"  # case, spaces
    near = {**base, "output": "The sea is wide and deep and full of quiet blue water!!"}
    assert kept.problem(near) == "near_duplicate"
    other = {**base, "output": "Mountains rise over green valleys under grey skies."}
    assert kept.problem(other) is None
    assert Kept(Filters(near_dup=0.0, dedup=False)).problem(base) is None


def test_near_duplicates_match_exact_jaccard():
    import random

    rng = random.Random(0)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)]
    texts += [t.replace("alpha", "alpho", 1) for t in texts[:20]]  # near copies
    nd = NearDuplicates(0.7)
    for i, t in enumerate(texts):
        sh = nd.shingles(t)
        exact = any(len(sh & o) / len(sh | o) >= 0.7 for o in nd.sets)
        assert nd.is_near(t) == exact, i  # LSH found every pair above the threshold, and only those
        nd.add(t)


def test_templates_fill_slots(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("templates: ['Write a {mood} review of a {thing}.', 'Name a {thing}.']\n"
                    "slots: {mood: [glowing, scathing], thing: [film, novel, meal]}\n")
    texts, info = synth_mod.fill_templates(path, seed=0)
    assert len(texts) == 2 * 3 + 3 == info["combinations"]
    assert "Write a scathing review of a meal." in texts and "Name a novel." in texts
    path.write_text(path.read_text() + "count: 4\n")
    a, _ = synth_mod.fill_templates(path, seed=0)
    assert len(a) == 4 and set(a) <= set(texts) and a == synth_mod.fill_templates(path, seed=0)[0]
    path.write_text("templates: ['Say {word}']\nslots: {other: [x]}\n")
    with pytest.raises(UserError, match=r"\{word\}, which is not under slots"):
        synth_mod.fill_templates(path, seed=0)


def prompts_file(tmp_path, n=10):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say the number {i} and a word"} for i in range(n)])


def test_synth_is_deterministic_and_resumes_without_duplicates(run_cli, tiny_model_dir, tmp_path, monkeypatch):
    prompts = prompts_file(tmp_path)
    args = ["synth", tiny_model_dir, "--prompts", prompts, "--samples", "2", "--seed", "3", "-n", "6",
            "--batch-size", "3"]
    code, _, err = run_cli(*args, "--out", tmp_path / "a.jsonl")
    assert code == 0, err
    whole = (tmp_path / "a.jsonl").read_text()
    record = json.loads((tmp_path / "a.jsonl.synth.json").read_text())
    assert record["complete"] and record["chunks_done"] == 4 and record["counts"]["generated"] == 20
    assert record["counts"]["kept"] == len(whole.splitlines())
    code, _, _ = run_cli(*args, "--out", tmp_path / "b.jsonl")
    assert (tmp_path / "b.jsonl").read_text() == whole  # the seed fixes the rows

    calls = {"n": 0}
    real = synth_mod._filter_chunk

    def killed_in_chunk_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(synth_mod, "_filter_chunk", killed_in_chunk_3)
    out = tmp_path / "c.jsonl"
    code, _, err = run_cli(*args, "--out", out)
    assert code == 1 and "run the same command again" in err
    partial = out.read_text()
    assert 0 < len(partial.splitlines()) < len(whole.splitlines()) and whole.startswith(partial)
    # a chunk written to the file but not yet recorded when the process died: cut on resume, not kept twice
    out.write_text(partial + whole.splitlines(keepends=True)[0])
    monkeypatch.setattr(synth_mod, "_filter_chunk", real)
    code, _, err = run_cli(*args, "--out", out)
    assert code == 0 and "resuming" in err
    assert out.read_text() == whole
    assert json.loads((tmp_path / "c.jsonl.synth.json").read_text())["counts"] == record["counts"]
    code, _, err = run_cli(*args, "--out", out)  # complete: nothing to do
    assert code == 0 and "nothing to do" in err and out.read_text() == whole
    code, _, err = run_cli(*args[:-2], "--batch-size", "2", "--out", out)
    assert code == 2 and "different settings" in err
    (tmp_path / "d.jsonl").write_text("{}\n")
    code, _, err = run_cli(*args, "--out", tmp_path / "d.jsonl")
    assert code == 2 and "not a synth output" in err


def test_exact_duplicates_and_formats(run_cli, tiny_model_dir, tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [{"instruction": "say hi", "input": "now"}] * 4
                       + [{"instruction": "say bye"}])
    out = tmp_path / "g.jsonl"
    code, _, err = run_cli("synth", tiny_model_dir, "--prompts", same, "--temperature", "0", "-n", "5", "--out", out)
    assert code == 0, err
    rows = read_rows(out)
    assert [r["instruction"] for r in rows] == ["say hi", "say bye"]  # greedy: the 3 repeats are exact duplicates
    assert rows[0]["input"] == "now" and set(rows[1]) == {"instruction", "output"}
    rec = json.loads((tmp_path / "g.jsonl.synth.json").read_text())
    assert rec["counts"]["dropped"]["duplicate"] == 3 and rec["format"] == "alpaca"
    convo = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"},
                                                             {"role": "user", "content": "c"}]}])
    code, _, err = run_cli("synth", tiny_model_dir, "--prompts", convo, "-n", "4", "--out", tmp_path / "h.jsonl")
    assert code == 0, err
    msgs = read_rows(tmp_path / "h.jsonl")[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    code, _, err = run_cli("synth", tiny_model_dir, "--prompts", prompts_file(tmp_path, 2), "--raw", "-n", "4",
                           "--out", tmp_path / "r.jsonl")
    assert code == 0, err
    assert all(r["text"].startswith("say the number") for r in read_rows(tmp_path / "r.jsonl"))
    code, _, err = run_cli("synth", tiny_model_dir, "--prompts", convo, "--format", "alpaca",
                           "--out", tmp_path / "x.jsonl")
    assert code == 2 and "use --format chat" in err


def test_regex_filter_through_the_cli(run_cli, tiny_model_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli("synth", tiny_model_dir, "--prompts", prompts_file(tmp_path, 6), "--samples", "3",
                           "-n", "6", "--regex", "[aeiou]", "--exclude-regex", "e", "--out", out)
    assert code == 0, err
    rows = read_rows(out)
    assert all(any(v in r["output"] for v in "aiou") and "e" not in r["output"] for r in rows)
    d = json.loads((tmp_path / "r.jsonl.synth.json").read_text())["counts"]
    assert d["kept"] + sum(d["dropped"].values()) == d["generated"] == 18
    assert d["dropped"]["regex"] + d["dropped"]["exclude_regex"] > 0


@torch.no_grad()
def test_judge_scores_are_the_log_likelihood_difference(tiny_model_dir, tiny_tokenizer):
    from ftcli.generate import load

    g = load(str(tiny_model_dir), log=lambda m: None)
    prompts = [synth_mod.Prompt("what is 2 + 2", {}), synth_mod.Prompt("name a month", {})]
    outs = [gen("4"), gen("march")]
    question = "Question: {prompt}\nAnswer: {output}\nIs the answer right?"
    got = synth_mod.judge_scores(g, prompts, outs, question, batch_size=2)
    model = g.target.model.eval()
    for p, o, score in zip(prompts, outs, got):
        logps = []
        for answer in ("yes", "no"):
            messages = [{"role": "user", "content": question.format(prompt=p.text, output=o.text)}]
            head = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tiny_tokenizer(head + answer + "<|im_end|>", add_special_tokens=False).input_ids
            n_head = len(tiny_tokenizer(head, add_special_tokens=False).input_ids)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            logps.append(sum(float(logp[t - 1, ids[t]]) for t in range(n_head, len(ids))))
        assert score == pytest.approx(logps[0] - logps[1], abs=1e-4)


def test_judge_threshold_through_the_cli(run_cli, tiny_model_dir, tmp_path):
    prompts = prompts_file(tmp_path, 4)
    common = ["synth", tiny_model_dir, "--prompts", prompts, "--samples", "2", "-n", "4", "--judge",
              "Is '{output}' a good answer to '{prompt}'?"]
    code, _, err = run_cli(*common, "--judge-threshold", "1000", "--out", tmp_path / "none.jsonl")
    assert code == 0, err
    assert (tmp_path / "none.jsonl").read_text() == ""
    assert json.loads((tmp_path / "none.jsonl.synth.json").read_text())["counts"]["dropped"]["judge"] == 8
    code, _, err = run_cli(*common, "--judge-threshold", "-1000", "--out", tmp_path / "all.jsonl")
    assert len(read_rows(tmp_path / "all.jsonl")) == 8
