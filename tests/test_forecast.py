"""`ftcli check --probe K`: K real steps of the recipe in a temporary folder, and a projection of the run."""

from __future__ import annotations

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
    assert f.projected_s == pytest.approx(f.probe_wall_s + 6 * f.step_s + 2 * f.loss_pass_s)
    assert f.not_timed == ["exact_match before and after (on up to 8 validation rows)"]
    assert not (tmp_path / "run").exists()  # the recipe's own run folder is not written
    assert r.training.max_steps == 9 and r.eval.metrics == ["loss", "exact_match"]  # the recipe is left as it was

    code, out, err = run_cli("check", path, "--probe", "2")
    assert code == 0, err
    assert "projected run: 9 steps" in out and "7 more steps" in out and "2 validation pass(es)" in out
    assert "peak RSS" in out and "not timed by the probe" in out and "exact_match" in out
    assert not (tmp_path / "run").exists()


def test_probing_several_processes_is_refused_by_name(tmp_path, tiny_model_dir, addition_data, run_cli):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data)
    code, out, err = run_cli("check", path, "--probe", "2", "--nproc", "2")
    assert code == 2 and "--probe" in err and "--nproc" in err, err


def test_every_validation_row_records_what_the_pass_cost(tmp_path, tiny_model_dir, addition_data, run_cli):
    import json

    path = make_recipe(tmp_path, tiny_model_dir, addition_data, eval={"every": 2})
    code, out, err = run_cli("train", path)
    assert code == 0, err
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(0 < e["loss_eval_s"] <= e["eval_s"] for e in evals)
