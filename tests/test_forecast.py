"""`ftcli check --probe K`: K real steps of the recipe in a temporary folder, and a projection of the run."""

from __future__ import annotations

import json

import pytest

from conftest import make_recipe
from ftcli import forecast
from ftcli import recipe as recipe_mod


def test_the_probe_trains_k_steps_elsewhere_and_projects_the_rest(tmp_path, tiny_model_dir, addition_data, run_cli):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, training={"max_steps": 9},
                       eval={"every": 4, "metrics": ["loss", "exact_match"], "limit": 8})
    r = recipe_mod.load(path)
    f = forecast.probe(r, 9, 3)
    assert f.probe_steps == 3 and f.steps == 9 and f.passes_between == 2  # eval at steps 4 and 8
    assert f.step_s > 0 and f.loss_pass_s > 0 and f.peak_rss_mb > 0
    # exact_match ran on the run's own 8 rows, before and after, inside the probe: nothing to add for it
    [gen] = f.sampled
    assert (gen.what, gen.sample_rows, gen.run_rows) == ("exact_match before and after on 8 validation rows", 8, 8)
    assert gen.seconds > 0 and gen.run_s == gen.seconds
    assert f.projected_s == pytest.approx(f.probe_wall_s + 6 * f.step_s + 2 * f.loss_pass_s)
    assert f.not_timed == []
    assert not (tmp_path / "run").exists()  # the recipe's own run folder is not written
    assert r.training.max_steps == 9 and r.eval.metrics == ["loss", "exact_match"]  # the recipe is left as it was

    code, out, err = run_cli("check", path, "--probe", "2")
    assert code == 0, err
    assert "projected run: 9 steps" in out and "7 more steps" in out and "2 validation pass(es)" in out
    assert "peak RSS" in out and "generation metrics on up to 16 rows" in out and "not timed" not in out
    assert not (tmp_path / "run").exists()


def test_generation_metrics_are_timed_on_one_batch_and_projected_to_the_runs_rows(tmp_path, tiny_model_dir,
                                                                                 addition_data, run_cli):
    # 32 validation rows, the run generates for 24 of them before and after, and scores 40 rows of a retention
    # set (of 64) before and after; the probe generates for the first 16 and scores 16
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, training={"max_steps": 6},
                       data={"validation": 0.5}, eval={"metrics": ["loss", "exact_match"], "limit": 24,
                                                       "retention": [{"data": str(addition_data), "limit": 40,
                                                                      "name": "kept"}]})
    r = recipe_mod.load(path)
    f = forecast.probe(r, 6, 2)
    assert forecast.SAMPLE == 16
    gen, kept = f.sampled
    assert (gen.what, gen.sample_rows, gen.run_rows) == ("exact_match before and after on 24 validation rows", 16, 24)
    assert (kept.what, kept.sample_rows, kept.run_rows) == ("retention set kept before and after on 40 rows", 16, 40)
    assert gen.seconds > 0 and kept.seconds > 0
    assert gen.run_s == pytest.approx(gen.seconds * 24 / 16) and kept.run_s == pytest.approx(kept.seconds * 40 / 16)
    assert f.projected_s == pytest.approx(f.probe_wall_s + 4 * f.step_s + gen.seconds * (24 / 16 - 1)
                                          + kept.seconds * (40 / 16 - 1))
    assert f.not_timed == []
    assert r.eval.limit == 24 and r.eval.retention[0].limit == 40  # the recipe is left as it was

    code, out, err = run_cli("check", path, "--probe", "2")
    assert code == 0, err
    assert "exact_match before and after on 24 validation rows" in out and "the probe's 16 rows took" in out
    assert "retention set kept before and after on 40 rows" in out and "not timed" not in out


def test_the_probes_answers_are_projected_from_its_sample_then_named_then_cached(tmp_path, tiny_model_dir,
                                                                                 tiny_tokenizer, addition_data,
                                                                                 monkeypatch):
    from ftcli import probe
    from ftcli.data.tokenize import Encoder

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, eval={"retention": [probe.PROBE]})
    r = recipe_mod.load(path)
    n = len(probe.prompts())
    what = f"the base model's answers to the built-in probe's {n} prompts (its first run on this base model and " \
           "template; cached after)"

    # nothing cached: the probe answers 16 prompts, timed; the run's 240 are projected from them
    f = forecast.probe(r, 4, 2)
    answers = [x for x in f.sampled if x.what == what]
    assert [(x.sample_rows, x.run_rows) for x in answers] == [(16, n)] and answers[0].seconds > 0
    assert f.not_timed == []
    # the probe's 16 answers are cached now, the run's 240 are not: a second probe cannot time them
    f = forecast.probe(r, 4, 2)
    assert [x for x in f.sampled if x.what == what] == [] and f.not_timed == [what]
    # the whole set cached: the run makes no answers
    whole = probe.cache_file(Encoder(tiny_tokenizer, None, format="chat"), str(tiny_model_dir), probe.prompts())
    whole.write_text(json.dumps({"answers": [f"answer {i}" for i in range(n)]}))
    f = forecast.probe(r, 4, 2)
    assert [x for x in f.sampled if x.what == what] == [] and f.not_timed == []


def test_probing_several_processes_is_refused_by_name(tmp_path, tiny_model_dir, addition_data, run_cli):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data)
    code, out, err = run_cli("check", path, "--probe", "2", "--nproc", "2")
    assert code == 2 and "--probe" in err and "--nproc" in err, err


def test_every_validation_row_records_what_the_pass_cost(tmp_path, tiny_model_dir, addition_data, run_cli):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, eval={"every": 2})
    code, out, err = run_cli("train", path)
    assert code == 0, err
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(0 < e["loss_eval_s"] <= e["eval_s"] for e in evals)
