"""Objectives: DPO's family and distillation, each against an independent computation, through the loop and the CLI.

The independent computations below take log-probabilities another way: each sequence alone through the plain
transformers/PEFT forward (full logits, no packing, no fused layers), the reference from a separately loaded base
model, and the loss formulas written out here.
"""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ftcli import models
from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.data.tokenize import pad_id
from ftcli.errors import RunError, UserError

from conftest import addition_rows, make_recipe, write_jsonl


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """A tiny preference task: the bare sum is chosen, the sum wrapped in words rejected (a preference a tiny random
    model can pick up from a few dozen pairs and carry to held-out prompts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"what is {a} + {b}", "chosen": f"{a + b}",
                     "rejected": f"the answer to your question is {a + b} , I think"})
    return rows


def dpo_recipe(tmp_path, tiny_model_dir, rows=None, objective=None, **sections):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows or pair_rows(48))
    sections.setdefault("data", {"format": "preference", "validation": 0.25})
    sections.setdefault("eval", {"metrics": ["loss"]})
    return make_recipe(tmp_path, tiny_model_dir, data, objective={"name": "dpo", **(objective or {})}, **sections)


def run(path, *sets, **kwargs):
    r = recipe_mod.load(path, list(sets))
    return train.run(r, output=recipe_mod.default_output(r), progress=False, **kwargs)


def records(run_dir, kind="train"):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in x]


def seq_logp(model, enc) -> torch.Tensor:
    """Σ log p of one sequence's trained tokens: the model's full logits on the sequence alone."""
    ids = torch.tensor([enc.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    return lp[torch.tensor(enc.trained[1:])].sum()


def perturb_adapter(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------------------------
# DPO


def test_dpo_starts_at_ln2_with_zero_rewards_and_then_moves(tmp_path, tiny_model_dir):
    path = dpo_recipe(tmp_path, tiny_model_dir, training={"max_steps": 3, "lr": 0.05})
    run_dir = run(path)
    first, last = records(run_dir)[0], records(run_dir)[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["chosen_reward"] == 0 and first["rejected_reward"] == 0 and first["reward_margin"] == 0
    assert first["pairs"] == 4 and last["reward_margin"] != 0  # the margin moves once the policy does
    before = records(run_dir, "eval")[0]
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and before["val_reward_accuracy"] == 0


LOSSES = [{"loss": "sigmoid"}, {"loss": "sigmoid", "label_smoothing": 0.2}, {"loss": "ipo"}, {"loss": "hinge"},
          {"loss": "simpo", "gamma": 0.3}, {"loss": "orpo"}]


def independent_loss(cfg: dict, beta: float, c, r, n_c, n_r, rc, rr) -> torch.Tensor:
    """The per-pair losses written out from the papers (and TRL's choices where they differ, see dpo.py)."""
    kind = cfg["loss"]
    if kind == "sigmoid":
        eps = cfg.get("label_smoothing", 0.0)
        z = beta * ((c - rc) - (r - rr))
        return -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
    if kind == "ipo":
        return ((c - rc) / n_c - (r - rr) / n_r - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.clamp(1 - beta * ((c - rc) - (r - rr)), min=0)
    mc, mr = c / n_c, r / n_r
    if kind == "simpo":
        return -torch.log(torch.sigmoid(beta * (mc - mr) - cfg["gamma"]))
    odds = lambda m: torch.log(torch.exp(m) / (1 - torch.exp(m)))  # noqa: E731
    return -mc - beta * torch.log(torch.sigmoid(odds(mc) - odds(mr)))


@pytest.mark.parametrize("cfg", LOSSES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_every_loss_equals_an_independent_computation(tmp_path, tiny_model_dir, cfg):
    from transformers import AutoModelForCausalLM

    path = dpo_recipe(tmp_path, tiny_model_dir, objective={"beta": 0.5, **cfg})
    r = recipe_mod.load(path)
    setup = train.build(r, log=lambda *a: None)
    setup.model.double()  # both sides in float64: what is compared is the computation, not float32 rounding
    perturb_adapter(setup.model)  # the policy differs from the reference
    units = setup.data.train.encoded[:6]
    batch = setup.objective.collate(units, pad_id(setup.tokenizer), True, 256)  # packed: pairs share rows
    assert batch.input_ids.shape[0] < len(units)
    loss, metrics = setup.objective.loss_sum(setup.model, batch)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).double().eval()
    with torch.no_grad():
        pol = torch.stack([torch.stack([seq_logp(setup.model, u.chosen), seq_logp(setup.model, u.rejected)])
                           for u in units])
        ref = torch.stack([torch.stack([seq_logp(base, u.chosen), seq_logp(base, u.rejected)]) for u in units])
    n = torch.tensor([[u.chosen.n_trained, u.rejected.n_trained] for u in units], dtype=torch.float64)
    expected = independent_loss(cfg, 0.5, pol[:, 0], pol[:, 1], n[:, 0], n[:, 1], ref[:, 0], ref[:, 1]).sum()
    assert float(expected) > 0.1 and abs(float(loss.detach()) - float(expected)) < 1e-5
    assert float(metrics["chosen_logp"]) == pytest.approx(float(pol[:, 0].sum()), abs=1e-8)


def test_accumulation_equals_the_big_batch(tmp_path, tiny_model_dir):
    out = {}
    for name, bs, ga in (("big", 8, 1), ("accum", 2, 4)):
        (tmp_path / name).mkdir()
        out[name] = run(dpo_recipe(tmp_path / name, tiny_model_dir,
                                   training={"max_steps": 3, "batch_size": bs, "grad_accum": ga, "lr": 0.02}))
    a, b = (records(out[k]) for k in ("big", "accum"))
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], rel=1e-5)
    wa, wb = (load_file(str(out[k] / "adapter" / "adapter_model.safetensors")) for k in ("big", "accum"))
    for k in wa:  # equal up to float summation order, relative to how far the step moved the tensor
        assert torch.allclose(wa[k], wb[k], atol=1e-6 + 1e-3 * float(wa[k].abs().max())), k


def test_reward_accuracy_rises_on_a_tiny_preference_task(tmp_path, tiny_model_dir):
    path = dpo_recipe(tmp_path, tiny_model_dir, rows=pair_rows(160, seed=3),
                      training={"max_steps": 30, "batch_size": 8, "lr": 0.02, "seed": 0},
                      eval={"every": 10, "metrics": ["loss"]})
    evals = records(run(path), "eval")
    assert evals[0]["val_reward_accuracy"] == 0  # ties at the start: policy = reference
    assert evals[-1]["val_reward_accuracy"] >= 0.75
    assert evals[-1]["val_loss"] < math.log(2) - 0.05


@pytest.mark.parametrize("other", ["copy", "precompute"])
def test_the_adapter_off_reference_equals_a_frozen_copy_and_the_precomputed_one(tmp_path, tiny_model_dir, other,
                                                                                  monkeypatch):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    losses = {}
    for mode in ("adapter_off", other):
        (tmp_path / mode).mkdir()
        run_dir = run(dpo_recipe(tmp_path / mode, tiny_model_dir, objective={"reference": mode},
                                 training={"max_steps": 4, "lr": 0.05}))
        losses[mode] = [x["loss"] for x in records(run_dir)] + [x["val_loss"] for x in records(run_dir, "eval")]
        if mode == "precompute":
            details = json.loads((run_dir / "report.json").read_text())["objective_details"]
            assert details["reference"] == "precompute" and details["cached"] is False
    assert losses["adapter_off"] == pytest.approx(losses[other], abs=1e-6)


def test_a_margin_that_never_moves_is_worth_a_warning():
    from ftcli.objectives.dpo import STUCK_AFTER, Dpo, DpoParams

    dpo = Dpo(DpoParams())
    assert "still exactly 0" in dpo.notice(STUCK_AFTER, {"reward_margin": 0.0})
    assert dpo.notice(STUCK_AFTER, {"reward_margin": 0.01}) is None and dpo.notice(3, {"reward_margin": 0.0}) is None
    assert Dpo(DpoParams(loss="simpo")).notice(STUCK_AFTER, {"reward_margin": 0.0}) is None  # no reference to equal


def test_a_full_strategy_refers_to_a_copy_and_cannot_switch_an_adapter_off(tmp_path, tiny_model_dir):
    path = dpo_recipe(tmp_path, tiny_model_dir, strategy={"name": "full"}, training={"max_steps": 2, "lr": 1e-3})
    run_dir = run(path)
    assert json.loads((run_dir / "report.json").read_text())["objective_details"]["reference"] == "copy"
    assert records(run_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(UserError, match="adapter_off needs an adapter strategy"):
        run(path, "objective.reference=adapter_off", "output=" + str(tmp_path / "other"))


def test_precomputed_reference_is_reused_from_the_cache_and_resume_is_exact(tmp_path, tiny_model_dir, monkeypatch):
    from test_train import straight_and_interrupted

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(48))
    sections = dict(objective={"name": "dpo", "reference": "precompute"},
                    data={"format": "preference", "validation": 0.25}, eval={"metrics": ["loss"]},
                    training={"max_steps": 6, "batch_size": 4, "lr": 0.02, "checkpoint_every": 2})
    straight, path = straight_and_interrupted(tmp_path, tiny_model_dir, data, sections, at=3)
    resumed = run(path, resume=True)
    assert json.loads((resumed / "report.json").read_text())["objective_details"]["cached"] is True
    assert [x["loss"] for x in records(resumed)] == pytest.approx([x["loss"] for x in records(straight)], abs=1e-6)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_continuing_from_an_sft_run_refers_to_the_sft_model(tmp_path, tiny_model_dir):
    """The trap of TRL #1193: with base_model an SFT run, the reference is that SFT model, not the bare base."""
    from transformers import AutoModelForCausalLM

    from ftcli.run_folder import RunFolder

    (tmp_path / "sft").mkdir()
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": r["prompt"], "input": "", "output": r["chosen"]}
                                                    for r in pair_rows(32)])
    sft = run(make_recipe(tmp_path / "sft", tiny_model_dir, sft_data, training={"max_steps": 3, "lr": 0.05}))
    (tmp_path / "dpo").mkdir()
    path = make_recipe(tmp_path / "dpo", sft, write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32)),
                       objective={"name": "dpo", "reference": "precompute"},
                       data={"format": "preference", "validation": None}, eval={"metrics": ["loss"]})
    r = recipe_mod.load(path)
    setup = train.build(r, log=lambda *a: None)
    sft_model = RunFolder(sft).load_merged()[0].eval()
    bare = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    pair = setup.data.train.encoded[0]
    with torch.no_grad():
        assert pair.chosen.aux["ref_logp"] == pytest.approx(float(seq_logp(sft_model, pair.chosen)), abs=1e-4)
        assert abs(pair.chosen.aux["ref_logp"] - float(seq_logp(bare, pair.chosen))) > 1e-2
    run_dir = run(path, "training.max_steps=1")
    assert records(run_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_pair_is_masked_like_sft_with_one_bos_and_a_shared_prompt(tiny_tokenizer):
    from ftcli.data.formats import to_example
    from ftcli.data.tokenize import Encoder

    ex = to_example({"prompt": "what is 2 + 2", "chosen": "4", "rejected": "5"}, "preference", {}, where="row 0")
    enc = Encoder(tiny_tokenizer, None, 64, "truncate", "preference").encode_all([ex])[0][0]
    c, r = enc.chosen, enc.rejected
    n = c.trained.index(True)
    assert c.input_ids[:n] == r.input_ids[:n] and r.trained.index(True) == n  # the same prompt tokens
    assert c.input_ids.count(tiny_tokenizer.bos_token_id) == 1
    decode = lambda e: tiny_tokenizer.decode([t for t, m in zip(e.input_ids, e.trained) if m])  # noqa: E731
    assert decode(c) == "4<|im_end|>" and decode(r) == "5<|im_end|>"


def test_hh_transcripts_become_turns_and_chat_message_pairs_are_read(tiny_tokenizer):
    from ftcli.data.formats import to_example

    hh = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Sum 2 and 2?\n\nAssistant:", "chosen": "4",
          "rejected": "5"}
    ex = to_example(hh, "preference", {}, where="row 0", prompt_style="transcript")
    assert [m["role"] for m in ex.prompt] == ["user", "assistant", "user"] and ex.prompt[-1]["content"] == "Sum 2 and 2?"
    as_text = to_example(hh, "preference", {}, where="row 0")
    assert as_text.prompt == [{"role": "user", "content": hh["prompt"]}]
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    ex = to_example(implicit, "preference", {}, where="row 0")
    assert ex.prompt == [{"role": "user", "content": "q"}] and ex.answer == "a" and ex.rejected[-1]["content"] == "b"
    mapped = to_example({"q": "x", "good": "1", "bad": "2"}, "preference",
                        {"prompt": "q", "chosen": "good", "rejected": "bad"}, where="row 0")
    assert mapped.answer == "1"


def test_bad_pairs_are_refused_with_the_row_or_skipped_and_counted(tmp_path, tiny_model_dir, run_cli):
    rows = pair_rows(24)
    rows[5]["rejected"] = rows[5]["chosen"]
    del rows[9]["rejected"]
    path = dpo_recipe(tmp_path, tiny_model_dir, rows=rows, training={"max_steps": 1})
    code, out, err = run_cli("check", path)
    assert code == 2 and "pairs.jsonl line 6" in err and "same reply" in err, err  # rows[5]: line 6 of the file
    code, out, err = run_cli("check", path, "--set", "data.on_bad_rows=skip")
    assert code == 0, err
    said = " ".join(out.split())
    assert "2 bad rows skipped, at pairs.jsonl line 10, pairs.jsonl line 6" in said or \
        "2 bad rows skipped, at pairs.jsonl line 6, pairs.jsonl line 10" in said, said
    code, out, err = run_cli("train", path, "--set", "data.on_bad_rows=skip")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    bad = report["data"]["bad_rows"]
    assert bad["skipped"] == 2 and sorted(bad["at"]) == ["pairs.jsonl line 10", "pairs.jsonl line 6"]
    assert any("line 6" in x for x in bad["first"]) and any("line 10" in x for x in bad["first"])
    md = " ".join((tmp_path / "run" / "report.md").read_text().split())
    assert "2 bad rows skipped** (data.on_bad_rows: skip), at pairs.jsonl line" in md


def test_both_sides_are_cut_alike_and_a_pair_cut_into_sameness_is_a_bad_row(tmp_path, tiny_model_dir, run_cli,
                                                                              tiny_tokenizer):
    from ftcli.data.formats import to_example
    from ftcli.data.tokenize import Encoder

    long_prompt = " ".join(["the word"] * 30)
    ex = to_example({"prompt": long_prompt, "chosen": "1 2 3 4 5 6 7 8 9", "rejected": "9 8"}, "preference", {},
                    where="row 0")
    pair = Encoder(tiny_tokenizer, None, 24, "truncate", "preference").encode_all([ex])[0][0]
    c, r = pair.chosen, pair.rejected
    n = c.trained.index(True)
    assert c.truncated and r.truncated and len(c.input_ids) <= 24 and len(r.input_ids) <= 24
    assert n >= 12 and c.input_ids[:n] == r.input_ids[:n] and c.input_ids[0] == tiny_tokenizer.bos_token_id
    rows = pair_rows(16)
    rows[3] = {"prompt": long_prompt, "chosen": "1 2 3 4 5 6 7 8 9", "rejected": "1 2 3 4 5 6 7 8 0"}
    path = dpo_recipe(tmp_path, tiny_model_dir, rows=rows, data={"format": "preference", "validation": None,
                                                                 "max_len": 24})
    code, out, err = run_cli("check", path)
    assert code == 2 and "pairs.jsonl line 4" in err and "same tokens after truncation" in err, err


def test_check_shows_both_trained_spans_of_a_pair(tmp_path, tiny_model_dir, run_cli):
    code, out, err = run_cli("check", dpo_recipe(tmp_path, tiny_model_dir))
    assert code == 0, err
    assert "chosen:" in out and "rejected:" in out and out.count("<|im_end|>⟧") == 2


def test_preference_rows_need_the_dpo_objective_and_the_other_way_round(tmp_path):
    with pytest.raises(UserError, match="data.format: 'alpaca', but objective dpo trains on preference rows"):
        recipe_mod.validate({"data": {"train": "x.jsonl", "format": "alpaca"}, "objective": {"name": "dpo"}})
    with pytest.raises(UserError, match="objective sft trains on"):
        recipe_mod.validate({"data": {"train": "x.jsonl", "format": "preference"}})
    r = recipe_mod.validate({"data": {"train": "x.jsonl"}, "objective": {"name": "dpo"}})
    assert r.data.format == "preference" and r.eval.metrics == ["loss"]
    with pytest.raises(UserError, match="gamma applies to loss simpo"):
        recipe_mod.validate({"data": {"train": "x.jsonl"}, "objective": {"name": "dpo", "gamma": 1}})


# ---------------------------------------------------------------------------------------------------------------
# distillation


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, tiny_model_dir):
    """The tiny model with other weights and a sharper head, the same tokenizer."""
    import make_tiny_model

    return make_tiny_model.build_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


def kd_recipe(tmp_path, tiny_model_dir, teacher, validation=None, **objective):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(32))
    return make_recipe(tmp_path, tiny_model_dir, data, data={"validation": validation},
                       objective={"name": "distill", "teacher": str(teacher), **objective})


def test_a_teacher_equal_to_the_student_gives_kl_zero(tmp_path, tiny_model_dir):
    run_dir = run(kd_recipe(tmp_path, tiny_model_dir, tiny_model_dir, alpha=0.0), "training.max_steps=1")
    first = records(run_dir)[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["loss"] == pytest.approx(0.0, abs=1e-6)


def test_a_run_as_teacher_and_as_student_base_is_its_trained_model(tmp_path, tiny_model_dir):
    """A run folder names a model: as the student's base and as the teacher it is the same trained model (KL 0),
    and a different model than the bare base (KL > 0)."""
    (tmp_path / "sft").mkdir()
    sft = run(make_recipe(tmp_path / "sft", tiny_model_dir, write_jsonl(tmp_path / "a.jsonl", addition_rows(32)),
                          training={"max_steps": 3, "lr": 0.05}))
    (tmp_path / "kd").mkdir()
    path = make_recipe(tmp_path / "kd", sft, write_jsonl(tmp_path / "kd" / "d.jsonl", addition_rows(16)),
                       data={"validation": None}, objective={"name": "distill", "teacher": str(sft), "alpha": 0.0})
    assert records(run(path, "training.max_steps=1"))[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    other = run(path, "training.max_steps=1", f"objective.teacher={tiny_model_dir}", f"output={tmp_path / 'kd2'}")
    assert records(other)[0]["kl"] > 1e-4


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_the_distillation_loss_equals_an_independent_computation(tmp_path, tiny_model_dir, other_teacher, kl):
    from transformers import AutoModelForCausalLM

    T, alpha = 1.7, 0.3
    r = recipe_mod.load(kd_recipe(tmp_path, tiny_model_dir, other_teacher, alpha=alpha, temperature=T, kl=kl))
    setup = train.build(r, log=lambda *a: None)
    setup.model.double()
    setup.objective.teacher.double()
    perturb_adapter(setup.model, scale=0.1)
    units = setup.data.train.encoded[:5]
    loss, metrics = setup.objective.loss_sum(setup.model,
                                             setup.objective.collate(units, pad_id(setup.tokenizer), True, 64))
    teacher = AutoModelForCausalLM.from_pretrained(str(other_teacher)).double().eval()
    ce = kd = 0.0
    with torch.no_grad():
        for e in units:
            ids = torch.tensor([e.input_ids])
            s, t = setup.model(input_ids=ids).logits[0, :-1], teacher(input_ids=ids).logits[0, :-1]
            keep = torch.tensor(e.trained[1:])
            s, t, target = s[keep], t[keep], ids[0, 1:][keep]
            ce += F.cross_entropy(s, target, reduction="sum")
            ps, pt = F.softmax(s / T, -1), F.softmax(t / T, -1)
            kd += (pt * (pt.log() - ps.log())).sum() if kl == "forward" else (ps * (ps.log() - pt.log())).sum()
    assert float(kd) > 0.1 and abs(float(metrics["kl"]) - float(kd)) < 1e-8
    assert abs(float(metrics["ce"]) - float(ce)) < 1e-8
    assert abs(float(loss.detach()) - float(alpha * ce + (1 - alpha) * T * T * kd)) < 1e-8


def test_the_students_kl_to_the_teacher_falls(tmp_path, tiny_model_dir, other_teacher):
    run_dir = run(kd_recipe(tmp_path, tiny_model_dir, other_teacher, alpha=0.0),
                  "training.max_steps=20", "training.lr=0.01", "strategy={name: full}")
    kls = [x["kl"] for x in records(run_dir)]
    assert sum(kls[-3:]) / 3 < 0.5 * sum(kls[:3]) / 3


def test_precomputed_top_k_covering_the_vocabulary_equals_the_running_teacher(tmp_path, tiny_model_dir, other_teacher,
                                                                              monkeypatch):
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    vocab = len(models.load_tokenizer(str(tiny_model_dir)))
    out = {}
    for name, teacher in (("live", str(other_teacher)),
                          ("topk", {"model": str(other_teacher), "precompute": True, "top_k": vocab}),
                          ("top4", {"model": str(other_teacher), "precompute": True, "top_k": 4})):
        (tmp_path / name).mkdir()
        run_dir = run(kd_recipe(tmp_path / name, tiny_model_dir, "x", alpha=0.0), f"objective.teacher={json.dumps(teacher)}",
                      "training.max_steps=3")
        out[name] = [x["kl"] for x in records(run_dir)]
    assert out["topk"] == pytest.approx(out["live"], rel=1e-4)
    assert out["top4"][0] <= out["live"][0] + 1e-6  # a coarser KL never exceeds the full one (same start)


def test_a_teacher_with_another_tokenizer_exits_2_naming_both(tmp_path, tiny_model_dir, run_cli):
    import make_tiny_model

    other = tmp_path / "other-tok"  # the tiny tokenizer trained to a smaller vocabulary
    tok = make_tiny_model.build_tokenizer(vocab_size=300)
    make_tiny_model.build_model(tok).save_pretrained(str(other))
    tok.save_pretrained(str(other))
    code, out, err = run_cli("check", kd_recipe(tmp_path, tiny_model_dir, other))
    assert code == 2 and str(other) in err and str(tiny_model_dir) in err and "tokenizer" in err


def test_the_teachers_own_answers_replace_the_data(tmp_path, tiny_model_dir, other_teacher, monkeypatch):
    from ftcli.evaluate import generate, stop_token_ids

    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    r = recipe_mod.load(kd_recipe(tmp_path, tiny_model_dir, other_teacher, validation=0.25, answers="teacher",
                                  answer_tokens=6))
    setup = train.build(r, log=lambda *a: None)
    enc, ex = setup.data.encoder, setup.data.train.examples[0]
    teacher = models.load_model(str(other_teacher)).eval()
    want = generate(teacher, setup.tokenizer, [enc.prompt_ids(ex.prompt)], max_new_tokens=6,
                    stop_ids=stop_token_ids(setup.tokenizer, enc))[0]
    assert ex.answer == want and ex.answer != addition_rows(32)[0]["output"]
    # the validation rows keep the data's answers: what the task is scored against
    held = setup.data.validation.examples
    assert held and all(v.answer in {row["output"] for row in addition_rows(32)} for v in held)
