"""`format: auto` (inferred from the rows' fields, everywhere a format is asked for) and weighted mixtures of
datasets in data.train: proportions within binomial bounds, repeats exact, a resumed mixture equal to an
uninterrupted one (with packing), per-dataset validation equal to scoring each dataset alone."""

import json
import math

import pytest
import yaml

from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.data.formats import infer_format
from ftcli.data.mixture import Mixture, Part
from ftcli.errors import UserError

from conftest import addition_rows, make_recipe, write_jsonl


@pytest.mark.parametrize("row, fields, fmt", [
    ({"messages": [{"role": "user", "content": "a"}]}, {}, "chat"),
    ({"instruction": "a", "input": "", "output": "b"}, {}, "alpaca"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, {}, "preference"),
    ({"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "p"}]}, {}, "preference"),
    ({"question": "q", "choices": ["a", "b"], "answer": 0, "subject": "s"}, {}, "choice"),
    ({"text": "t", "label": 1, "label_text": "positive"}, {}, "classification"),
    ({"text": "t", "id": 3}, {}, "completion"),
    ({"q": "a", "a": "b"}, {"instruction": "q", "output": "a"}, "alpaca"),  # the data.fields mapping counts
])
def test_infer_format_from_fields(row, fields, fmt):
    assert infer_format([row], fields, "f.jsonl") == fmt


def test_infer_format_refuses_what_fits_none_or_two():
    with pytest.raises(UserError, match=r"f.jsonl row 0: format auto: its fields \(answer, final_answer, question\) "
                                        r"fit no format.*choice: question, choices, answer"):
        infer_format([{"question": "q", "answer": "a", "final_answer": "1"}], {}, "f.jsonl")
    with pytest.raises(UserError, match="fit chat and alpaca"):
        infer_format([{"messages": [], "instruction": "i", "output": "o"}], {}, "f.jsonl")
    with pytest.raises(UserError, match="row 0 is alpaca but row 1 is completion"):
        infer_format([{"instruction": "i", "output": "o"}, {"text": "t"}], {}, "f.jsonl")


def drop_format(recipe):
    doc = yaml.safe_load(recipe.read_text())
    del doc["data"]["format"]
    recipe.write_text(yaml.safe_dump(doc))


def test_auto_is_the_default_and_is_recorded(run_cli, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(24))
    recipe = make_recipe(tmp_path, tiny_model_dir, data, data={"train": str(data), "validation": 0.25,
                                                                "max_len": 64})
    drop_format(recipe)
    r = recipe_mod.load(recipe)
    assert r.data.format == "alpaca" and r.inferred == {"data.format": "alpaca (fields input, instruction, output)"}
    code, out, err = run_cli("check", recipe)
    assert code == 0, err
    assert "data.format: auto → alpaca (fields input, instruction, output)" in out
    code, out, err = run_cli("train", recipe)
    assert code == 0, err
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["data"]["format"] == "alpaca" and rep["data"]["inferred"] == r.inferred
    assert "format: alpaca\n" in (tmp_path / "run" / "recipe.resolved.yaml").read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    code, _, err = run_cli("check", recipe, "--set", f"data.train={bad}")
    assert code == 2 and "bad.jsonl row 0: format auto" in err and "fit no format" in err


def test_eval_infers_the_format_from_the_rows(run_cli, tiny_model_dir, tmp_path):
    mc = write_jsonl(tmp_path / "mmlu.jsonl", [{"question": f"{i} + {i}?", "choices": [str(2 * i), str(i)],
                                                "answer": 0, "subject": "math"} for i in range(6)])
    code, out, err = run_cli("eval", tiny_model_dir, "--data", mc, "--metrics", "choice")
    assert code == 0, err
    assert "format choice" in out
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(8))
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval={"retention": [{"data": str(mc), "metric": "choice"}]})
    r = recipe_mod.load(recipe)
    assert r.eval.retention[0].format == "choice" and "eval.retention[0]" in r.inferred
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval={"retention": [{"data": str(data), "metric": "choice"}]})
    code, _, err = run_cli("check", recipe)
    assert code == 2 and "eval.retention[0]" in err and "choice" in err


def mixture(rows, weights=None, repeats=None) -> Mixture:
    parts, start = [], 0
    for i, n in enumerate(rows):
        parts.append(Part(f"d{i}", "x", "alpaca", start, n, weight=weights[i] if weights else None,
                          repeat=repeats[i] if repeats else None))
        start += n
    return Mixture(parts)


def test_weighted_draws_stay_within_binomial_bounds():
    m = mixture([30, 200, 70], weights=[0.5, 0.3, 0.2])
    counts = [0, 0, 0]
    total = 0
    for epoch in range(40):
        order = m.epoch_order(seed=7, epoch=epoch)
        assert len(order) == m.epoch_size == 300
        for name, n in m.counts(order).items():
            counts[int(name[1:])] += n
        total += len(order)
        assert order == m.epoch_order(seed=7, epoch=epoch)  # a pure function of (seed, epoch): resumes exactly
    for c, w in zip(counts, (0.5, 0.3, 0.2)):
        sigma = math.sqrt(w * (1 - w) / total)
        assert abs(c / total - w) < 4 * sigma, (c / total, w)
    # within one pass over a dataset every row is drawn once before any is drawn again
    order = m.epoch_order(seed=7, epoch=0)
    first = [i for i in order if i < 30]
    assert sorted(first[:30]) == list(range(30)) and len(first) > 30
    assert m.epoch_order(seed=8, epoch=0) != order


def test_repeats_are_exact_passes():
    m = mixture([10, 40], repeats=[2.0, 0.5])
    order = m.epoch_order(seed=0, epoch=3)
    assert m.epoch_size == len(order) == 2 * 10 + 20
    assert all(order.count(i) == 2 for i in range(10))
    big = [i for i in order if i >= 10]
    assert len(big) == len(set(big)) == 20
    assert m.asked() == {"d0": 0.5, "d1": 0.5}


def two_tasks(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", addition_rows(60))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"the water is {w} today and the day is long"}
                                           for w in ("good", "blue", "cold", "new", "low", "great") * 6])
    return a, b


def test_mixture_run_reports_draws_and_per_dataset_validation(run_cli, tiny_model_dir, tmp_path):
    a, b = two_tasks(tmp_path)
    val_b = write_jsonl(tmp_path / "b_val.jsonl", [{"text": "the day is cold and the water is blue"}] * 3)
    recipe = make_recipe(tmp_path, tiny_model_dir, a, data={
        "train": [{"data": str(a), "name": "add", "weight": 3, "validation": 0.2},
                  {"data": str(b), "name": "text", "weight": 1, "validation": str(val_b)}],
        "format": "auto", "validation": None, "max_len": 64},
        training={"max_steps": 12, "batch_size": 4, "lr": 1e-2, "seed": 1})
    drop_format(recipe)
    code, out, err = run_cli("check", recipe)
    assert code == 0, err
    assert "mixture: add (alpaca, 48 training rows" in out and "75.0% of the 84 examples" in out
    code, out, err = run_cli("train", recipe)
    assert code == 0, err
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert list(rep)[:2] == ["run", "mixture"]
    mix = rep["mixture"]
    assert sum(mix["drawn"].values()) == 12 * 4 and mix["asked_share"] == {"add": 0.75, "text": 0.25}
    assert {d["format"] for d in mix["datasets"].values()} == {"alpaca", "completion"}
    assert mix["datasets"]["text"]["validation_rows"] == 3
    # the per-dataset validation loss after training is that dataset scored alone
    code, out, err = run_cli("eval", tmp_path / "run", "--data", val_b, "--metrics", "loss", "--json",
                             tmp_path / "s.json")
    assert code == 0, err
    alone = json.loads((tmp_path / "s.json").read_text())["models"][str(tmp_path / "run")]["loss"]
    assert mix["datasets"]["text"]["validation_loss_after"] == pytest.approx(alone, rel=1e-4)
    assert "Mixture (weight)" in (tmp_path / "run" / "report.md").read_text()


def test_resume_mid_mixture_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    a, b = two_tasks(tmp_path)
    sections = dict(data={"train": [{"data": str(a), "name": "add", "weight": 0.7},
                                    {"data": str(b), "name": "text", "weight": 0.3}],
                          "format": "auto", "validation": None, "max_len": 64, "packing": True},
                    training={"max_steps": 10, "batch_size": 4, "lr": 5e-3, "schedule": "constant", "warmup": 1,
                              "seed": 3})

    def run(path, *sets, **kw):
        r = recipe_mod.load(path, list(sets))
        return train.run(r, output=recipe_mod.default_output(r), progress=False, **kw)

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "train"]

    (tmp_path / "s").mkdir(), (tmp_path / "r").mkdir()
    straight = run(make_recipe(tmp_path / "s", tiny_model_dir, a, **sections))
    path = make_recipe(tmp_path / "r", tiny_model_dir, a, **sections)
    run(path, "training.max_steps=4")
    resumed = run(path, resume=True)
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    drawn = [json.loads((d / "report.json").read_text())["mixture"]["drawn"] for d in (straight, resumed)]
    assert drawn[0] == drawn[1]


def test_mixture_recipe_errors():
    def err(train_, **data):
        with pytest.raises(UserError) as e:
            recipe_mod.validate({"data": {"train": train_, **data}})
        return str(e.value)

    assert "weight every dataset" in err([{"data": "a.jsonl", "weight": 1}, {"data": "b.jsonl"}])
    assert "named 'a'" in err([{"data": "a.jsonl"}, {"data": "x/a.jsonl"}])
    assert "not both" in err([{"data": "a.jsonl", "weight": 1, "repeat": 2}])
    assert "its own limit" in err([{"data": "a.jsonl"}], limit=5)
    assert "did you mean 'limit'" in err([{"data": "a.jsonl", "max_rows": 5}])
    ok = recipe_mod.validate({"data": {"train": [{"data": "a.jsonl"}, {"data": "b.jsonl", "repeat": 2}],
                                       "validation": 0.2}})
    assert [(e.name, e.repeat, e.validation) for e in ok.data.train] == [("a", 1.0, 0.2), ("b", 2.0, 0.2)]


def test_a_metric_scores_the_datasets_whose_rows_allow_it(tmp_path, tiny_model_dir, run_cli):
    """accuracy in a mixture of classification and alpaca rows: the classification rows' accuracy, as `ftcli eval`
    gives on those rows alone; a metric no dataset allows is refused."""
    words = ["good", "great", "bad", "awful", "fine", "poor"]
    cls = write_jsonl(tmp_path / "c.jsonl", [{"text": f"the film was {words[i % 6]}", "label": "pos" if i % 6 in
                                              (0, 1, 4) else "neg"} for i in range(40)])
    val = write_jsonl(tmp_path / "c_val.jsonl", [{"text": f"it was {w}", "label": "pos" if w in ("good", "fine")
                                                  else "neg"} for w in words])
    a, _ = two_tasks(tmp_path)
    recipe = make_recipe(tmp_path, tiny_model_dir, a, data={
        "train": [{"data": str(cls), "name": "cls", "weight": 1, "validation": str(val)},
                  {"data": str(a), "name": "add", "weight": 1, "validation": 0.1}],
        "format": "auto", "validation": None, "max_len": 64},
        eval={"metrics": ["loss", "accuracy"]}, training={"max_steps": 2, "batch_size": 4, "lr": 1e-2})
    code, _, err = run_cli("train", recipe)
    assert code == 0, err
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    code, _, err = run_cli("eval", tmp_path / "run", "--data", val, "--metrics", "accuracy", "--json",
                           tmp_path / "s.json")
    assert code == 0, err
    alone = json.loads((tmp_path / "s.json").read_text())["models"][str(tmp_path / "run")]["accuracy"]
    assert rep["after"]["accuracy"] == pytest.approx(alone)
    with pytest.raises(UserError, match="no dataset of the mixture has such rows"):
        recipe_mod.load(recipe, ["eval.metrics=[loss, choice]", f"data.train=[{{data: {a}, weight: 1}}]"])
