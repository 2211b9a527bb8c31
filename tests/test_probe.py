"""The built-in retention probe: shipped prompts of our own, the base model's own greedy answers (cached), their loss
before and after training in the report by default; `eval.retention: []` switches it off."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ftcli import probe, scoring
from ftcli import recipe as recipe_mod
from ftcli.errors import UserError

from conftest import addition_rows, make_recipe, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_the_prompts_are_ours_and_regenerate_exactly():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_probe_prompts

    rows = make_probe_prompts.build()
    shipped = [json.loads(line) for line in probe.PROMPTS_FILE.read_text().splitlines()]
    assert rows == shipped
    prompts = probe.prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    assert len({r["kind"] for r in shipped}) >= 20


def test_the_probe_is_the_default_and_empty_switches_it_off():
    r = recipe_mod.validate({"data": {"train": "x.jsonl"}})
    assert [(s.data, s.metric, s.format, s.limit, s.name) for s in r.eval.retention] == [
        (probe.PROBE, "loss", "chat", None, probe.NAME)]
    assert recipe_mod.validate({"data": {"train": "x.jsonl"}, "eval": {"retention": []}}).eval.retention == []
    both = recipe_mod.validate({"data": {"train": "x.jsonl"}, "eval": {"retention": [probe.PROBE, "m.jsonl"]}})
    assert [s.data for s in both.eval.retention] == [probe.PROBE, "m.jsonl"]
    for bad in ({"data": probe.PROBE, "metric": "accuracy"}, {"data": probe.PROBE, "fields": {"text": "t"}}):
        with pytest.raises(UserError, match="builtin:probe"):
            recipe_mod.validate({"data": {"train": "x.jsonl"}, "eval": {"retention": [bad]}})


def test_examples_are_the_base_models_greedy_answers_and_cached(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                 monkeypatch):
    from ftcli import evaluate
    from ftcli.models import load_model

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    model = load_model(str(tiny_model_dir)).eval()
    rows = probe.examples(model, tiny_tokenizer, base=str(tiny_model_dir), template=None, limit=5, log=lambda m: None)
    for p, ex in zip(probe.prompts()[:5], rows):
        ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=probe.MAX_NEW_TOKENS,
                             eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
        assert ex.messages == [{"role": "user", "content": p}, {"role": "assistant", "content":
                               tiny_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()}]
    assert len(list((tmp_path / "cache" / "probe").glob("*.json"))) == 1

    def refuse(*a, **k):
        raise AssertionError("the cached answers should have been used")

    monkeypatch.setattr(evaluate, "generate_all", refuse)
    again = probe.examples(model, tiny_tokenizer, base=str(tiny_model_dir), template=None, limit=5, log=lambda m: None)
    assert [e.messages for e in again] == [e.messages for e in rows]


def test_a_limit_takes_the_whole_sets_cached_answers(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from ftcli import evaluate
    from ftcli.data.tokenize import Encoder

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    base = str(tiny_model_dir)
    assert not probe.cached(tiny_tokenizer, base=base, template=None, limit=5)
    n = len(probe.prompts())
    whole = probe.cache_file(Encoder(tiny_tokenizer, None, format="chat"), base, probe.prompts())
    whole.parent.mkdir(parents=True)
    whole.write_text(json.dumps({"answers": [f"answer {i}" for i in range(n)]}))
    assert probe.cached(tiny_tokenizer, base=base, template=None, limit=5)
    assert probe.cached(tiny_tokenizer, base=base, template=None)

    def refuse(*a, **k):
        raise AssertionError("the whole set's cached answers should have been used")

    monkeypatch.setattr(evaluate, "generate_all", refuse)
    rows = probe.examples(None, tiny_tokenizer, base=base, template=None, limit=5, log=lambda m: None)
    assert [e.messages for e in rows] == [[{"role": "user", "content": p}, {"role": "assistant", "content":
                                           f"answer {i}"}] for i, p in enumerate(probe.prompts()[:5])]
    assert len(list(whole.parent.glob("*.json"))) == 1  # nothing new written for the limited set


def test_a_run_reports_the_probe_before_and_after(run_cli, tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from ftcli.models import load_model

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(32))
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval={"retention": [{"data": probe.PROBE, "limit": 8}]},
                         training={"max_steps": 4, "batch_size": 4, "lr": 5e-2})
    code, out, err = run_cli("train", recipe)
    assert code == 0, err
    assert "retention built-in probe loss" in out
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    [row] = rep["retention"]
    assert row["name"] == probe.NAME and row["data"] == probe.PROBE and row["rows"] == 8
    assert row["before_s"] > 0 and row["after_s"] > 0  # what scoring it took, before and after
    # before: the base model's loss on its own answers, computed again here from the same rows
    base = load_model(str(tiny_model_dir))
    rows = probe.examples(base, tiny_tokenizer, base=str(tiny_model_dir), template=None, limit=8, log=lambda m: None)
    es = scoring.EvalSet(data=probe.PROBE, format="chat", metrics=["loss"])
    assert row["before"] == pytest.approx(scoring.score(base, tiny_tokenizer, es, examples=rows)["loss"], rel=1e-5)
    assert row["after"] != pytest.approx(row["before"], abs=1e-4)  # training at a high lr moved the model
    assert "built-in probe is the loss of the base model's own greedy answers" in (tmp_path / "run" /
                                                                                  "report.md").read_text()
    code, out, _ = run_cli("check", recipe)
    assert "the built-in probe, 8 general prompts" in out
    from ftcli.run_folder import RunFolder

    assert RunFolder(tmp_path / "run").recipe.eval.retention[0].data == probe.PROBE  # the resolved recipe reloads
