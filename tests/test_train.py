"""The loop: accumulation, exact resume, the NaN guard, Ctrl-C, the run folder a user gets."""

import json
import os
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from ftcli.run_folder import RunFolder
from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.errors import RunError, UserError

from conftest import make_recipe, write_jsonl


def varied_rows(n=48, seed=0):
    """Answers of very different lengths, so micro-batches hold different numbers of trained tokens."""
    rng = random.Random(seed)
    words = "one two three four five six seven eight nine".split()
    return [{"instruction": f"count to {k}", "input": "", "output": " ".join(words[:k])}
            for k in (rng.randint(1, 9) for _ in range(n))]


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return [r["loss"] for r in losses(run_dir) if r["kind"] == "train"]


def run(path, *sets, **kwargs):
    r = recipe_mod.load(path, list(sets))
    return train.run(r, output=recipe_mod.default_output(r), progress=False, **kwargs)


def test_accumulation_equals_the_big_batch(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows())
    results = {}
    for name, bs, ga in (("big", 8, 1), ("accum", 2, 4)):
        folder = tmp_path / name
        folder.mkdir()
        path = make_recipe(folder, tiny_model_dir, data, strategy={"name": "full"},
                           training={"max_steps": 3, "batch_size": bs, "grad_accum": ga, "lr": 1e-3},
                           data={"packing": False})
        results[name] = run(path)
    a, b = (load_file(str(results[k] / "checkpoints" / "step-3" / "trainable.safetensors")) for k in ("big", "accum"))
    assert train_losses(results["big"]) == pytest.approx(train_losses(results["accum"]), rel=1e-5)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    for name in a:
        moved = (a[name] - start[name]).abs().max()
        assert torch.allclose(a[name], b[name], atol=1e-6 + 1e-3 * float(moved)), name
    # power check: the micro-batches really hold different numbers of trained tokens, so averaging
    # per micro-batch (the common bug) would weigh tokens differently and fail the comparison above
    tokens = [r["trained_tokens"] for r in losses(results["accum"]) if r["kind"] == "train"]
    assert len(set(tokens)) > 1


def straight_and_interrupted(tmp_path, tiny_model_dir, data, sections, at):
    """Run a recipe straight through (in a/) and again (in b/) with Ctrl-C after step `at`; returns the straight
    run folder and the interrupted run's recipe path."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run(make_recipe(tmp_path / "a", tiny_model_dir, data, **sections))
    path = make_recipe(tmp_path / "b", tiny_model_dir, data, **sections)

    def ctrl_c(step, loss):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(RunError, match=rf"interrupted \(SIGINT\) at step {at}; checkpoint step-{at} written"):
        run(path, hooks=train.Hooks(after_step=[ctrl_c]))
    return straight, path


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(40))
    sections = dict(strategy={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                    training={"max_steps": 12, "batch_size": 4, "lr": 5e-3, "checkpoint_every": 4},
                    eval={"every": 5})
    straight, path = straight_and_interrupted(tmp_path, tiny_model_dir, data, sections, at=6)
    out = tmp_path / "b" / "run"
    assert (out / "checkpoints" / "step-6" / "optimizer.pt").is_file()
    assert not (out / "adapter").exists()
    with pytest.raises(UserError, match="already exists"):
        run(path)
    resumed = run(path, resume=True)
    assert len(train_losses(resumed)) == 12
    assert train_losses(resumed) == pytest.approx(train_losses(straight), abs=1e-6)
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    report = json.loads((resumed / "report.json").read_text())
    assert report["run"]["resumed_from"] == 6 and report["before"]["loss"] > report["after"]["loss"]


def test_a_finished_run_extended_by_resume_equals_the_longer_run(tmp_path, tiny_model_dir):
    """6 steps, then --resume to 12 (constant schedule: the length does not change it) = 12 steps straight.
    With a decaying schedule the same extension is allowed but announced as a different run."""
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(40))
    sections = dict(strategy={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                    training={"max_steps": 12, "batch_size": 4, "lr": 5e-3, "schedule": "constant", "warmup": 2})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = run(make_recipe(tmp_path / "a", tiny_model_dir, data, **sections))
    path = make_recipe(tmp_path / "b", tiny_model_dir, data, **sections)
    run(path, "training.max_steps=6")
    notes = []
    extended = run(path, resume=True, console=type("C", (), {"print": staticmethod(notes.append),
                                                              "is_terminal": False})())
    assert train_losses(extended) == pytest.approx(train_losses(straight), abs=1e-6)
    assert not any("schedule" in str(n) for n in notes)
    r = recipe_mod.load(path, ["training.max_steps=20", "training.schedule=cosine"])
    assert "laid out again" in RunFolder(extended).schedule_change_note(r)


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_model_dir, addition_data):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, training={"max_steps": 2})
    run(path)
    with pytest.raises(UserError, match="training.lr"):
        run(path, "training.lr=0.5", resume=True)


def test_loss_falls(tmp_path, tiny_model_dir, addition_data):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, strategy={"name": "full"},
                       training={"max_steps": 30, "batch_size": 8, "lr": 3e-3, "schedule": "constant"})
    out = run(path)
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"] - 1.0
    ls = train_losses(out)
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 1.0


@pytest.mark.parametrize("strategy", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "full"}])
def test_bf16_precision_trains_and_tracks_fp32(tmp_path, tiny_model_dir, addition_data, strategy):
    """training.precision bf16 (autocast; lora keeps its frozen base in bf16): the run finishes, its loss falls,
    and its first step's loss is fp32's to bf16 rounding."""
    sections = dict(strategy=strategy, training={"max_steps": 12, "batch_size": 8, "lr": 1e-2, "schedule": "constant"})
    (tmp_path / "fp32").mkdir(), (tmp_path / "bf16").mkdir()
    fp32 = run(make_recipe(tmp_path / "fp32", tiny_model_dir, addition_data, **sections))
    bf16 = run(make_recipe(tmp_path / "bf16", tiny_model_dir, addition_data, **sections), "training.precision=bf16")
    a, b = train_losses(fp32), train_losses(bf16)
    assert b[0] == pytest.approx(a[0], rel=2e-2)
    assert sum(b[-3:]) / 3 < sum(b[:3]) / 3 - 0.2
    assert sum(b[-3:]) / 3 == pytest.approx(sum(a[-3:]) / 3, rel=5e-2)
    report = json.loads((bf16 / "report.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"]


@pytest.mark.compiled
def test_compiled_layers_train_as_eager_and_save_the_same_adapter(tmp_path, tiny_model_dir, addition_data):
    """training.compile: the blocks beside attention are compiled in place: per-step losses equal the eager run's
    (fp32), validation's are an uncompiled run's, the adapter's tensor names are PEFT's, and attention stays
    uncompiled (one graph whatever the rows)."""
    from ftcli.compiled import compile_layers
    from ftcli.models import load_model

    sections = dict(strategy={"name": "lora", "r": 4, "alpha": 8},
                    training={"max_steps": 6, "batch_size": 8, "lr": 1e-2, "schedule": "constant"})
    (tmp_path / "eager").mkdir(), (tmp_path / "compiled").mkdir()
    eager = run(make_recipe(tmp_path / "eager", tiny_model_dir, addition_data, **sections))
    compiled = run(make_recipe(tmp_path / "compiled", tiny_model_dir, addition_data, **sections),
                   "training.compile=true")
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-4)
    outs = []  # in bf16, where compiled kernels round differently, validation is still the eager run's
    for mode in ("eager", "compiled"):
        (tmp_path / f"{mode}-bf16").mkdir()
        outs.append(run(make_recipe(tmp_path / f"{mode}-bf16", tiny_model_dir, addition_data, **sections),
                        "training.precision=bf16", f"training.compile={mode == 'compiled'}", "training.max_steps=1"))
    before = [json.loads((out / "report.json").read_text())["before"]["loss"] for out in outs]
    assert before[0] == before[1]
    a, b = (load_file(str(out / "adapter" / "adapter_model.safetensors")) for out in (eager, compiled))
    assert sorted(a) == sorted(b) and all(".lora_A." in k or ".lora_B." in k for k in a)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6) for k in a)
    model = load_model(str(tiny_model_dir))
    names = [n for n, _ in model.named_parameters()]
    n = compile_layers(model)
    layer = model.model.layers[0]
    assert n == 3 * len(model.model.layers)  # input norm, post-attention norm, MLP
    assert layer.mlp._compiled_call_impl is not None and layer.self_attn._compiled_call_impl is None
    assert [n for n, _ in model.named_parameters()] == names


def test_nan_loss_stops_with_a_message_and_keeps_a_checkpoint(tmp_path, tiny_model_dir, addition_data, monkeypatch):
    import ftcli.loss as loss_mod

    real = loss_mod.nll_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        return out * float("nan") if calls["n"] > 3 and model.training else out

    monkeypatch.setattr(loss_mod, "nll_sum", poisoned)  # what the sft objective calls
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, training={"max_steps": 8})
    with pytest.raises(RunError, match="loss became nan at step 4") as e:
        run(path)
    assert "checkpointed" in str(e.value)
    out = tmp_path / "run"
    assert (out / "checkpoints" / "step-3" / "trainable.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["status"].startswith("stopped") and report["run"]["steps"] == 3


def test_ftcli_train_writes_the_run_folder(tmp_path, tiny_model_dir, addition_data, run_cli):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data,
                       training={"max_steps": 4, "checkpoint_every": 2}, eval={"every": 2})
    code, out, err = run_cli("train", path)
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert "validation loss" in out and str(run_dir) in out
    for name in ("recipe.resolved.yaml", "metrics.jsonl", "report.json", "report.md", "loss.png",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "checkpoints/step-4/state.json",
                 "checkpoints/step-4/optimizer.pt", "checkpoints/step-4/scheduler.pt", "checkpoints/step-4/rng.pt"):
        assert (run_dir / name).is_file(), name
    resolved = (run_dir / "recipe.resolved.yaml").read_text()
    assert "torch:" in resolved and "transformers:" in resolved and "peft:" in resolved and "git_commit" in resolved
    records = losses(run_dir)
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "trained_tokens"} <= r.keys() for r in train_recs)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"]["splits"]["train"]["rows"] == 48 and "⟦" in report["data"]["example"]
    md = (run_dir / "report.md").read_text()
    assert "before" in md and "loss.png" in md and "trainable parameters" in md
    assert not list(run_dir.rglob("*.tmp"))  # nothing half-written left behind
    # the run folder is protected; --overwrite replaces it
    code, _, err = run_cli("train", path)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli("train", path, "--overwrite", "--set", "training.max_steps=1")
    assert code == 0, err
    assert [r["step"] for r in losses(run_dir) if r["kind"] == "train"] == [1]


def test_ftcli_check_reports_the_plan(tmp_path, tiny_model_dir, addition_data, run_cli):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data)
    code, out, err = run_cli("check", path)
    assert code == 0, err
    assert "trainable" in out and "⟦" in out and "train" in out and "validation" in out
    assert not (tmp_path / "run").exists()


def test_check_counts_parameters_and_estimates_memory_per_pass(tmp_path, tiny_model_dir, addition_data):
    from ftcli import plan
    from ftcli.models import load_model

    total = sum(p.numel() for p in load_model(str(tiny_model_dir)).parameters())
    plans = {}
    for name, strategy, sets in (("full", {"name": "full"}, ()), ("lora", {"name": "lora", "r": 4}, ()),
                                 ("lora-small-pass", {"name": "lora", "r": 4}, ("training.pass_tokens=16",)),
                                 ("hft", {"name": "hft", "embeddings": "train"}, ()),
                                 ("lora-bf16", {"name": "lora", "r": 4}, ("training.precision=bf16",)),
                                 ("lora-fp32-branch", {"name": "lora", "r": 4, "fp32_branch": True},
                                  ("training.precision=bf16",))):
        (tmp_path / name).mkdir()
        r = recipe_mod.load(make_recipe(tmp_path / name, tiny_model_dir, addition_data, strategy=strategy), list(sets))
        plans[name] = plan.build(r, log=lambda *a: None)
    full, lora, small = plans["full"], plans["lora"], plans["lora-small-pass"]
    assert full.trainable == full.total == total
    assert 0 < lora.trainable < total and lora.total == total + lora.trainable
    assert full.memory["gradients"] == pytest.approx(total * 4 / 2**20)
    assert full.memory["optimizer (AdamW)"] == pytest.approx(2 * full.memory["gradients"])
    assert lora.memory["gradients"] == pytest.approx(lora.trainable * 4 / 2**20)
    # batch 4 × max_len 64 = 256 positions; a pass of at most 16 positions is still one whole row of 64
    act = "activations (upper bound)"
    assert small.memory[act] == pytest.approx(lora.memory[act] * 64 / 256)
    # strategy.fp32_branch: the layers' float32 outputs and what the MLP keeps of them, measured ≈ +40%
    assert plans["lora-fp32-branch"].memory[act] == pytest.approx(lora.memory[act] * 1.4)
    # hft: half the block matrices get gradients in a round, but AdamW keeps state for all that train in any round
    hft = plans["hft"]
    assert hft.trainable < full.total and hft.memory["optimizer (AdamW)"] == pytest.approx(full.memory["optimizer (AdamW)"])
    # lora in bf16 keeps the frozen linear weights in 2 bytes
    linear = sum(m.weight.numel() for n, m in load_model(str(tiny_model_dir)).named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert plans["lora-bf16"].memory["weights"] == pytest.approx(lora.memory["weights"] - linear * 2 / 2**20)


def test_activations_are_counted_from_the_first_block_that_trains(tmp_path, tiny_model_dir, addition_data):
    """Autograd keeps nothing for blocks before the first trained one: frozen (last block of the tiny model's 2)
    plans half of lora's activations; training only the final norm plans none; full (the embedding trains) all."""
    from ftcli import plan

    act = "activations (upper bound)"
    got = {}
    for name, strategy in (("lora", {"name": "lora", "r": 4}), ("last", {"name": "frozen", "last_n_blocks": 1}),
                           ("norm", {"name": "frozen", "last_n_blocks": 0, "modules": ["model.norm.*"]}),
                           ("full", {"name": "full"})):
        (tmp_path / name).mkdir()
        r = recipe_mod.load(make_recipe(tmp_path / name, tiny_model_dir, addition_data, strategy=strategy))
        got[name] = plan.build(r, log=lambda *a: None).memory[act]
    assert got["last"] == pytest.approx(got["lora"] / 2) and got["norm"] == 0 and got["full"] == got["lora"] > 0


def test_check_refuses_a_combination_that_cannot_work(tmp_path, tiny_model_dir, addition_data, run_cli):
    path = make_recipe(tmp_path, tiny_model_dir, addition_data,
                       strategy={"name": "ewc", "inner": {"name": "qlora", "r": 4}})
    code, out, err = run_cli("check", path)
    assert code == 2 and "strategy.inner" in err and "qlora" in err and "cannot be used here" in err


@pytest.mark.parametrize("command", ["check", "train"])
def test_qlora_is_refused_before_any_weight_loads_where_4bit_cannot_run(tmp_path, tiny_model_dir, addition_data,
                                                                        run_cli, monkeypatch, command):
    """Where bitsandbytes cannot quantise (an old version on a CPU, or none), check and train exit 2 with what is
    needed, and no weight file is opened."""
    import ftcli.models
    import ftcli.strategies

    monkeypatch.setattr(ftcli.strategies.lora, "qlora_support", lambda: "qlora on a CPU needs bitsandbytes >= 0.48")

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(ftcli.models, "load_model", no_weights)
    path = make_recipe(tmp_path, tiny_model_dir, addition_data, strategy={"name": "qlora", "r": 4})
    code, out, err = run_cli(command, path)
    assert code == 2 and "strategy qlora" in err and "bitsandbytes >= 0.48" in err


@pytest.mark.parametrize("strategy", [
    {"name": "hft", "round_steps": 2},
    {"name": "ewc", "lambda": 3.0, "fisher_rows": 4, "inner": {"name": "full"}},
], ids=["hft", "ewc"])
def test_resume_is_exact_for_stateful_strategies(tmp_path, tiny_model_dir, strategy, monkeypatch):
    """HFT's rounds and EWC's anchor survive an interruption: the resumed run equals the straight one, and HFT's
    round log has each round once."""
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", varied_rows(40))
    sections = dict(strategy=strategy, training={"max_steps": 6, "batch_size": 4, "lr": 5e-3, "checkpoint_every": 3})
    straight, path = straight_and_interrupted(tmp_path, tiny_model_dir, data, sections, at=3)
    resumed = run(path, resume=True)
    assert train_losses(resumed) == pytest.approx(train_losses(straight), abs=1e-6)
    if strategy["name"] == "hft":
        rounds = [json.loads(x)["round"] for x in (resumed / "hft_rounds.jsonl").read_text().splitlines()]
        assert rounds == [0, 1, 2]
