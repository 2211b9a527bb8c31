"""`task: classification`: a new head over the last hidden state, trained with any strategy (the head always trains);
its loss equal to transformers' own classifier computed one row at a time; accuracy and macro-F1 by hand; the label
set written to the run; eval and export of the trained classifier."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ftcli import models
from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.data import load_examples
from ftcli.data.batching import collate
from ftcli.data.tokenize import Encoder
from ftcli.errors import UserError
from ftcli.evaluate import label_metrics
from ftcli.objectives import classify
from ftcli.run_folder import RunFolder

from conftest import make_recipe, write_jsonl
from test_strategies import base_name

LABELS = ["neg", "pos"]


def word_rows(n: int, seed: int = 1) -> list[dict]:
    """Separable rows: the label is which word set the text is drawn from."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        words = rng.sample(["alpha", "bravo", "charlie", "delta"] if good else ["echo", "foxtrot", "golf", "hotel"], 3)
        rows.append({"text": " ".join(words), "label_text": "pos" if good else "neg", "label": int(good)})
    return rows


def test_label_metrics_by_hand():
    # gold 0 0 1 1 2 2, predicted 0 1 1 1 2 0: label 0 TP1 FP1 FN1 → F1 1/2; label 1 TP2 FP1 FN0 → 4/5;
    # label 2 TP1 FP0 FN1 → 2/3; macro = (1/2 + 4/5 + 2/3) / 3; accuracy 4/6
    got = label_metrics([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # a label only ever predicted counts as F1 0 (scikit-learn's macro average over gold ∪ predicted labels)
    assert label_metrics([0, 1], [0, 0])["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_the_head_is_the_only_new_tensor(tiny_model_dir):
    model = models.load_model(str(tiny_model_dir), labels=LABELS, pad_token_id=0)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    params = dict(model.named_parameters())
    assert set(params) - set(base) == {"score.weight"}
    assert set(base) - set(params) == {"lm_head.weight"}  # the language-model head is what it replaces
    assert params["score.weight"].shape == (2, 32)
    assert all(torch.equal(params[k], base[k]) for k in params if k in base)
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.pad_token_id == 0


@pytest.mark.parametrize("packing", [True, False])
def test_loss_equals_transformers_classifier_one_row_at_a_time(tiny_model_dir, tiny_tokenizer, tmp_path, packing):
    """The objective reads each example's last prompt token out of packed (or padded) rows; the loss and the
    predictions equal transformers' LlamaForSequenceClassification run on each example alone."""
    path = write_jsonl(tmp_path / "c.jsonl", word_rows(7))
    examples = load_examples(str(path), "classification", {"label": "label_text"})
    model = models.load_model(str(tiny_model_dir), labels=LABELS, pad_token_id=tiny_tokenizer.pad_token_id).eval()
    objective = classify.Classify(classify.ClassifyParams())
    rows, stats = objective.encode(Encoder(tiny_tokenizer, None, 256, "truncate", "classification"), examples)
    assert stats.trained_tokens == 7 and all(r.n_trained == 1 for r in rows)
    batch = collate(rows, tiny_tokenizer.pad_token_id, packing, 256)
    if packing:
        assert batch.input_ids.shape[0] < 7  # several examples share a row
    with torch.no_grad():
        loss, metrics = objective.loss_sum(model, batch)
        want, hits = 0.0, 0
        for ex, r in zip(examples, rows):
            assert r.input_ids == Encoder(tiny_tokenizer, None, 256, "truncate", "classification").prompt_ids(ex.prompt)
            logits = model(input_ids=torch.tensor([r.input_ids])).logits  # transformers' own head and pooling
            want += float(F.cross_entropy(logits, torch.tensor([ex.gold]), reduction="sum"))
            hits += int(logits.argmax(-1)) == ex.gold
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert int(metrics["accuracy"]) == hits


def test_recipe_task_selects_the_objective_and_its_metrics():
    r = recipe_mod.validate({"task": "classification", "data": {"train": "x.jsonl"}})
    assert r.objective.name == "classify" and r.data.format == "classification"
    assert r.eval.metrics == ["loss", "accuracy", "macro_f1"]
    for raw, words in [({"task": "classification", "objective": {"name": "sft"}}, "use objective classify"),
                       ({"objective": {"name": "classify"}}, "task classification"),
                       ({"task": "classification", "eval": {"metrics": ["exact_match"]}}, "no language-model head")]:
        raw = {"data": {"train": "x.jsonl"}, **raw}
        with pytest.raises(UserError, match=words if words != "no language-model head" else "cannot score"):
            recipe_mod.validate(raw)


# strategy → (settings, does it train base weights besides the head?, validation accuracy it reaches in 20 steps,
# or None). On this random 2-layer model the last token's hidden state barely differs between rows, and bottleneck
# adapters (which cannot re-weight the first block's attention) do not learn the task in 20 steps (nor in 40 at
# 5e-3: validation loss 0.649 → 0.639, accuracy at the majority class); their row checks the rest.
STRATEGIES = {
    "full": ({"name": "full"}, True, 0.9),
    "frozen": ({"name": "frozen", "last_n_blocks": 1}, True, 0.9),
    "lora": ({"name": "lora", "r": 8, "alpha": 16}, False, 0.9),
    "ia3": ({"name": "ia3"}, False, 0.9),
    "bottleneck": ({"name": "bottleneck", "reduction_factor": 4}, False, None),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A classification run per strategy (20 steps on separable rows), and the in-memory model at the end."""
    folder = tmp_path_factory.mktemp("cls")
    data = write_jsonl(folder / "train.jsonl", word_rows(160))
    val = write_jsonl(folder / "val.jsonl", word_rows(40, seed=2))
    out = {}
    for name, (settings, _, _) in STRATEGIES.items():
        (folder / name).mkdir()
        lr = {"ia3": 0.05, "bottleneck": 5e-3}.get(name, 1e-2)
        path = make_recipe(folder / name, tiny_model_dir, data, strategy=settings, task="classification",
                           data={"format": "classification", "validation": str(val), "fields": {"label": "label_text"}},
                           training={"max_steps": 20, "batch_size": 8, "lr": lr, "precision": "fp32"},
                           eval={"metrics": ["loss", "accuracy", "macro_f1"]})
        r = recipe_mod.load(path)
        holder = {}
        run_dir = train.run(r, output=recipe_mod.default_output(r), progress=False,
                            hooks=train.Hooks(at_end=[lambda m: holder.setdefault("model", m)]))
        out[name] = (run_dir, holder["model"])
    return out, val


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_trains_the_head_and_keeps_frozen_weights(name, runs, tiny_model_dir):
    (run_dir, model), _ = runs[0][name], runs[1]
    _, trains_base, reaches = STRATEGIES[name]
    report = json.loads((run_dir / "report.json").read_text())
    if reaches is not None:
        assert report["after"]["loss"] < report["before"]["loss"]
        assert report["after"]["accuracy"] >= reaches and report["after"]["macro_f1"] >= reaches
    assert json.loads((run_dir / report["run"]["artifact"] / "labels.json").read_text()) == {"labels": LABELS}
    assert report["objective_details"]["labels"] == LABELS
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    head = [p for n, p in model.named_parameters() if "score" in n and p.requires_grad]
    assert head, "the head does not train"
    for n, p in model.named_parameters():
        key = base_name(n)
        if key in base and not trains_base:
            assert torch.equal(p.detach(), base[key]), f"{name}: frozen {key} changed"


@pytest.mark.parametrize("name", STRATEGIES)
def test_run_reloads_and_eval_scores_it_as_the_report_did(name, runs, run_cli, tmp_path):
    (run_dir, model), val = runs[0][name], runs[1]
    reloaded, tok = RunFolder(run_dir).load()
    assert models.is_classifier(reloaded)
    ids = torch.tensor([tok("alpha bravo delta").input_ids])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)
    code, out, err = run_cli("eval", run_dir, "--data", val, "--format", "classification", "--field",
                             "label=label_text", "--metrics", "loss,accuracy,macro_f1", "--precision", "fp32",
                             "--json", tmp_path / "e.json")
    assert code == 0, err
    got = json.loads((tmp_path / "e.json").read_text())["models"][str(run_dir)]
    after = json.loads((run_dir / "report.json").read_text())["after"]
    assert got["accuracy"] == after["accuracy"] and got["macro_f1"] == after["macro_f1"]
    assert got["loss"] == pytest.approx(after["loss"], rel=1e-4)
    code, out, err = run_cli("eval", run_dir, "--data", val, "--format", "classification", "--metrics", "perplexity")
    assert code == 2 and "no language-model head" in err


@pytest.mark.parametrize("name", ["full", "lora", "ia3"])
def test_export_writes_a_classifier_with_the_same_logits(name, runs, tmp_path):
    from ftcli import export

    run_dir, model = runs[0][name]
    res = export.export(run=run_dir, out=tmp_path / "out", log=lambda *_: None)
    assert res.max_diff <= res.tolerance
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["id2label"] == {"0": "neg", "1": "pos"}
    from transformers import AutoModelForSequenceClassification

    folded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, folded(input_ids=ids).logits, atol=1e-4)


def test_check_counts_the_head_and_marks_the_position_it_reads(tiny_model_dir, tmp_path):
    from ftcli import plan

    data = write_jsonl(tmp_path / "t.jsonl", word_rows(20))
    path = make_recipe(tmp_path, tiny_model_dir, data, task="classification", strategy={"name": "lora", "r": 4},
                       data={"format": "classification", "fields": {"label": "label_text"}},
                       eval={"metrics": ["accuracy"]})
    p = plan.build(recipe_mod.load(path), log=lambda *_: None)
    # r·(in + out) per linear layer of a block: q, o 32→32; k, v 32→16; gate, up 32→64; down 64→32; two blocks
    lora = 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert p.trainable == lora + 2 * 32  # the adapter and the head, nothing else
    trained = [text for text, marked in p.example if marked]
    assert len(trained) == 1 and p.splits["train"]["trained_tokens"] == p.splits["train"]["kept"]


def test_language_model_view_is_the_decoder_with_the_base_head(tiny_model_dir):
    """Retention sets and EWC's Fisher see a classifier as a language model: its decoder (adapters included) under
    the base's LM head. With the same LoRA weights it computes what a LoRA'd causal LM computes."""
    from peft import LoraConfig, get_peft_model

    clf = get_peft_model(models.load_model(str(tiny_model_dir), labels=LABELS),
                         LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    lm = get_peft_model(models.load_model(str(tiny_model_dir)),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    lora = {k: torch.randn_like(v) * 0.2 for k, v in lm.state_dict().items() if "lora_" in k}
    lm.load_state_dict(lora, strict=False)
    assert not clf.load_state_dict(lora, strict=False).unexpected_keys  # the same names in both
    view = models.language_model_view(clf, str(tiny_model_dir))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(view(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-5)
    assert view.get_decoder() is clf.get_base_model().model  # shared, not copied


def test_retention_and_ewc_work_on_a_classifier(tiny_model_dir, tmp_path):
    """A classification run scores retention sets through the view (before = the base language model exactly) and
    EWC takes its Fisher there too."""
    from conftest import addition_rows

    from ftcli import scoring

    data = write_jsonl(tmp_path / "t.jsonl", word_rows(40))
    ret = write_jsonl(tmp_path / "r.jsonl", addition_rows(6))
    path = make_recipe(tmp_path, tiny_model_dir, data, task="classification",
                       strategy={"name": "ewc", "inner": {"name": "full"}, "fisher_rows": 4, "lambda": 1.0},
                       data={"format": "classification", "fields": {"label": "label_text"}},
                       training={"max_steps": 3, "batch_size": 8, "lr": 1e-3},
                       eval={"metrics": ["accuracy"], "retention": str(ret)})
    run_dir = train.run(recipe_mod.load(path), output=tmp_path / "run", progress=False)
    report = json.loads((run_dir / "report.json").read_text())
    row = report["retention"][0]
    base = scoring.score(models.load_model(str(tiny_model_dir)), models.load_tokenizer(str(tiny_model_dir)),
                         scoring.EvalSet(data=str(ret), format="alpaca", metrics=["loss"]))
    assert row["before"] == pytest.approx(base["loss"], rel=1e-6) and row["after"] != row["before"]
    assert report["strategy_details"]["penalised_values"] > 0
    penalties = [json.loads(x).get("penalty") for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(p for p in penalties if p)


def test_labels_outside_the_training_set_are_refused(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", word_rows(20))
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "alpha", "label_text": "maybe"}])
    path = make_recipe(tmp_path, tiny_model_dir, data, task="classification",
                       data={"format": "classification", "validation": str(val), "fields": {"label": "label_text"}},
                       eval={"metrics": ["accuracy"]})
    with pytest.raises(UserError, match="maybe"):
        train.run(recipe_mod.load(path), output=tmp_path / "run", progress=False)
