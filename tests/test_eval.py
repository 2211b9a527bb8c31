"""`ftcli eval` and its metrics, each checked against an independent computation on the tiny model:
full-vocabulary logits one row at a time (no batching, padding, selective head) for loss, accuracy and choice;
hand-worked strings for exact match, ROUGE-L and numeric; one-by-one generation for batched left-padded greedy."""

import json
import math

import pytest
import torch

from ftcli import scoring
from ftcli.data import load_examples
from ftcli.data.tokenize import Encoder
from ftcli.errors import UserError
from ftcli.evaluate import choice_scores, exact_match, generate, normalize, numeric_match, rouge_l
from ftcli.models import load_model

from conftest import addition_rows, make_recipe, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(str(tiny_model_dir)).eval()


def sentiment_rows(n: int) -> list[dict]:
    words = ["good", "great", "fine", "bad", "awful", "poor", "nice", "dull"]
    return [{"text": f"the film was {words[i % 8]} and {words[(i * 3) % 8]}", "label_text": "positive" if i % 3 else "negative",
             "label": int(bool(i % 3))} for i in range(n)]


def mc_rows(n: int) -> list[dict]:
    # options share leading tokens ("1", "10", "100"...): scoring must not merge what differs after them
    return [{"question": f"what is {i} + {i}?", "choices": [str(2 * i + d) for d in (1, 0, 3, -1)] + [str(2 * i) + "0"],
             "answer": 1} for i in range(n)]


@torch.no_grad()
def reference_logprob(model, enc) -> float:
    """Σ log p over the trained tokens of one encoded row, from the model's full logits."""
    ids = torch.tensor([enc.input_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(1, ids.shape[1]) if enc.trained[t])


def test_loss_and_perplexity_are_token_weighted_over_rows(tiny_model, tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(11))
    es = scoring.EvalSet(data=str(path), format="alpaca", metrics=["loss", "perplexity"])
    got = scoring.score(tiny_model, tiny_tokenizer, es, batch_size=4)
    encoder = Encoder(tiny_tokenizer, None, 4096, "truncate", "alpaca")
    rows = encoder.encode_all(load_examples(str(path), "alpaca", {}))[0]
    nll = -sum(reference_logprob(tiny_model, e) for e in rows)
    n = sum(e.n_trained for e in rows)
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["trained_tokens"] == n and got["rows"] == 11


@pytest.mark.parametrize("fmt", ["classification", "choice"])
def test_accuracy_and_choice_pick_the_most_likely_candidate(fmt, tiny_model, tiny_tokenizer, tmp_path):
    if fmt == "classification":
        path = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(13))
        fields, metric = {"label": "label_text"}, "accuracy"
    else:
        path = write_jsonl(tmp_path / "m.jsonl", mc_rows(9))
        fields, metric = {}, "choice"
    es = scoring.EvalSet(data=str(path), format=fmt, fields=fields, metrics=[metric])
    got = scoring.score(tiny_model, tiny_tokenizer, es, batch_size=3)
    examples = load_examples(str(path), fmt, fields)
    encoder = Encoder(tiny_tokenizer, None, 4096, "truncate", fmt)
    tree_scores = choice_scores(tiny_model, encoder, examples, batch_size=4)  # shared-prefix rows, batched
    hits = 0
    for ex, got_scores in zip(examples, tree_scores):
        scores = []
        for c in ex.choices:
            variant = type(ex)(messages=ex.prompt + [{"role": "assistant", "content": c}])
            scores.append(reference_logprob(tiny_model, encoder.encode(variant)))
        assert got_scores == pytest.approx(scores, rel=1e-4, abs=1e-4)
        hits += max(range(len(scores)), key=scores.__getitem__) == ex.gold
    assert got[metric] == pytest.approx(hits / len(examples))
    assert 0 < hits < len(examples) or fmt == "choice"  # a random model is neither always right nor always wrong


def test_classification_rows_carry_the_label_set_and_the_gold_index(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(6))
    examples = load_examples(str(path), "classification", {"label": "label_text"}, limit=2)
    assert examples[0].choices == ["negative", "positive"]  # from every row, although only 2 are kept
    assert examples[0].choices[examples[0].gold] == "negative" and examples[1].answer == "positive"
    assert "negative, positive" in examples[0].prompt[-1]["content"]
    mc = load_examples(str(write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": "B"}])),
                       "choice", {})
    assert mc[0].gold == 1 and mc[0].answer == "y" and "A. x\nB. y" in mc[0].prompt[-1]["content"]


def test_seeded_sample_is_reproducible_and_differs_from_the_head(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(50))
    a = load_examples(str(path), "alpaca", {}, limit=10, sample_seed=3)
    b = load_examples(str(path), "alpaca", {}, limit=10, sample_seed=3)
    head = load_examples(str(path), "alpaca", {}, limit=10)
    assert [x.messages for x in a] == [x.messages for x in b]
    assert [x.messages for x in a] != [x.messages for x in head]


def test_string_metrics_by_hand():
    assert normalize("  The Answer, is: PARIS! ") == "answer is paris"
    assert exact_match(["Paris.", "london"], ["paris", "Rome"]) == 0.5
    # GSM8K-style references end in "#### N"; the last number of each side is compared, commas dropped
    assert numeric_match(["so she pays $1,200 in total", "about 7", "no idea"],
                         ["12 * 100 = 1200\n#### 1200", "#### 8", "#### 3"]) == pytest.approx(1 / 3)
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is 5 words of 6 on both sides: F = 5/6
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["a b"], ["c d"]) == 0.0


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, tiny_tokenizer):
    encoder = Encoder(tiny_tokenizer, None, 4096, "truncate", "alpaca")
    prompts = [encoder.prompt_ids([{"role": "user", "content": "what is " + "1 + " * k + "2"}]) for k in range(5)]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so the batch really is padded
    batched = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=5)
    single = [generate(tiny_model, tiny_tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_metric_that_does_not_fit_the_format_is_refused():
    with pytest.raises(UserError, match="accuracy.*classification"):
        scoring.EvalSet(data="x.jsonl", format="alpaca", metrics=["accuracy"])
    with pytest.raises(UserError, match="exact_match.*completion"):
        scoring.EvalSet(data="x.jsonl", format="completion", metrics=["exact_match"])
    with pytest.raises(UserError, match="unknown metric bleu"):
        scoring.EvalSet(data="x.jsonl", format="alpaca", metrics=["bleu"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A short LoRA run on addition with a retention set (sentiment accuracy) scored before and after."""
    from ftcli import recipe as recipe_mod
    from ftcli import train

    folder = tmp_path_factory.mktemp("evalrun")
    data = write_jsonl(folder / "d.jsonl", addition_rows(48))
    sst = write_jsonl(folder / "sent.jsonl", sentiment_rows(12))
    path = make_recipe(folder, tiny_model_dir, data, training={"max_steps": 6, "batch_size": 8, "lr": 3e-2},
                       eval={"retention": [{"data": str(sst), "format": "classification", "metric": "accuracy",
                                            "fields": {"label": "label_text"}, "name": "sentiment"},
                                           {"data": str(data), "metric": "loss", "limit": 10}]})
    r = recipe_mod.load(path)
    return train.run(r, output=recipe_mod.default_output(r), progress=False), sst, data


def test_run_report_has_retention_before_and_after(lora_run, tiny_model_dir, tiny_tokenizer):
    run_dir, sst, data = lora_run
    report = json.loads((run_dir / "report.json").read_text())
    rows = {r["name"]: r for r in report["retention"]}
    base = load_model(str(tiny_model_dir)).eval()
    es = scoring.EvalSet(data=str(sst), format="classification", fields={"label": "label_text"}, metrics=["accuracy"])
    assert rows["sentiment"]["before"] == pytest.approx(scoring.score(base, tiny_tokenizer, es)["accuracy"])
    loss_row = next(r for n, r in rows.items() if n != "sentiment")
    assert loss_row["metric"] == "loss" and loss_row["rows"] == 10
    assert loss_row["after"] < loss_row["before"]  # trained on these very rows: their loss must fall
    assert loss_row["change"] == pytest.approx(loss_row["after"] - loss_row["before"])
    assert "Forgetting" in (run_dir / "report.md").read_text()


def test_cli_eval_base_run_adapter_and_compare(lora_run, tiny_model_dir, run_cli, tmp_path):
    run_dir, _, data = lora_run
    out = tmp_path / "scores.json"
    code, text, err = run_cli("eval", str(run_dir), "--data", str(data), "--limit", "12", "--compare",
                              str(tiny_model_dir), "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    tuned, base = result["models"][str(run_dir)], result["models"][str(tiny_model_dir)]
    assert tuned["rows"] == base["rows"] == 12 and tuned["loss"] < base["loss"]
    assert "change" in text and f"{tuned['loss'] - base['loss']:+.4f}" in text
    # the adapter on its own with --base gives the run's numbers
    out2 = tmp_path / "adapter.json"
    code, _, err = run_cli("eval", str(run_dir / "adapter"), "--base", str(tiny_model_dir), "--data", str(data),
                           "--limit", "12", "--json", str(out2))
    assert code == 0, err
    again = json.loads(out2.read_text())["models"][str(run_dir / "adapter")]
    assert again["loss"] == pytest.approx(tuned["loss"], rel=1e-6)


def test_cli_eval_merged_adapter_and_exported_model(lora_run, tiny_model_dir, run_cli, tmp_path):
    """Merged models score like what they merge: the run's adapter cat-merged with itself at weights 0.5 and 0.5
    is the same ΔW, and its export (adapter folded into the base) is the same model."""
    run_dir, _, data = lora_run
    scores = {}
    code, _, err = run_cli("merge", run_dir / "adapter", run_dir / "adapter", "--method", "cat", "--weights",
                           "0.5,0.5", "--out", tmp_path / "merged")
    assert code == 0, err
    code, _, err = run_cli("export", "--adapter", tmp_path / "merged", "--base", tiny_model_dir, "--out",
                           tmp_path / "exported")
    assert code == 0, err
    for name, args in (("run", [run_dir]), ("merged", [tmp_path / "merged", "--base", tiny_model_dir]),
                       ("exported", [tmp_path / "exported"])):
        out = tmp_path / f"{name}.json"
        code, _, err = run_cli("eval", *map(str, args), "--data", str(data), "--limit", "12", "--json", str(out))
        assert code == 0, err
        scores[name] = next(iter(json.loads(out.read_text())["models"].values()))["loss"]
    assert scores["merged"] == pytest.approx(scores["run"], rel=1e-5)
    assert scores["exported"] == pytest.approx(scores["run"], rel=1e-5)


def test_cli_eval_errors_name_the_problem(tiny_model_dir, run_cli, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", addition_rows(4))
    code, _, err = run_cli("eval", str(tiny_model_dir), "--data", str(data), "--metrics", "accuracy")
    assert code == 2 and "accuracy" in err and "classification" in err
    code, _, err = run_cli("eval", str(tiny_model_dir), "--data", str(data), "--base", str(tiny_model_dir))
    assert code == 2 and "--base applies to an adapter" in err
