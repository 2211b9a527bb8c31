"""training.optimizer: LOMO's update equals SGD's and keeps no gradient; 8-bit AdamW runs here and tracks AdamW;
every optimiser trains through the CLI; what cannot work is refused with a reason."""

import copy
import json

import pytest
import torch

from ftcli import optimizers
from ftcli import recipe as recipe_mod
from ftcli.data.batching import collate
from ftcli.loss import nll_sum
from ftcli.models import load_model

from conftest import addition_rows, make_recipe, write_jsonl


def _batch(tiny_model_dir):
    from ftcli.data.tokenize import Encoder, pad_id
    from ftcli.data import load_examples
    from ftcli.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    path = write_jsonl(tiny_model_dir.parent / "opt_rows.jsonl", addition_rows(6))
    encoded = Encoder(tok, None, 64, "truncate", "alpaca").encode_all(load_examples(str(path), "alpaca", {}))[0]
    return collate(encoded, pad_id(tok), False, 64)


def _recipe(tmp_path, tiny_model_dir, **training):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(8))
    return recipe_mod.load(make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "full"},
                                       training={"weight_decay": 0.1, **training}))


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip"])
def test_lomo_update_equals_sgd_and_keeps_no_gradient(tmp_path, tiny_model_dir, clip):
    """One LOMO step (the update inside backward) = one torch SGD step with the same L2 decay on matrices, after
    the same gradient clipping; afterwards no gradient is stored and the optimiser has no state."""
    recipe = _recipe(tmp_path, tiny_model_dir, optimizer="lomo", lr=0.05, max_grad_norm=clip)
    batch = _batch(tiny_model_dir)
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir))
    reference = copy.deepcopy(model)

    named = list(model.named_parameters())
    lomo = optimizers.make(recipe, named)
    loss = nll_sum(model, batch) / batch.n_trained
    lomo.fused_backward(loss, lambda t, **kw: t.backward(**kw))
    assert all(p.grad is None for p in model.parameters())
    assert lomo.state_dict()["state"] == {}

    ref_named = list(reference.named_parameters())
    sgd = torch.optim.SGD(optimizers.param_groups(recipe, ref_named), lr=0.05)
    (nll_sum(reference, batch) / batch.n_trained).backward()
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        assert lomo.last_norm == pytest.approx(float(norm), rel=1e-5)
        assert float(norm) > clip  # the clip really scaled the step
    sgd.step()
    moved = 0
    for (n, p), (_, q) in zip(named, ref_named):
        assert torch.allclose(p, q, atol=1e-7, rtol=1e-6), n
        moved += int(not torch.equal(p, load_model(str(tiny_model_dir)).get_parameter(n)))
    assert moved > 0


@pytest.mark.parametrize("clip", [0.05, 1e6], ids=["clipped", "under-the-clip"])
def test_fused_adamw_clips_inside_its_step_as_clip_grad_norm_does(tmp_path, tiny_model_dir, clip):
    """With torch's fused AdamW the clipping is the step's own divisor (no pass multiplying the gradients): the
    update equals clip_grad_norm_ followed by the same step (to float32 rounding; bit for bit when the norm is under
    the clip) and the reported norm is clip_grad_norm_'s."""
    recipe = _recipe(tmp_path, tiny_model_dir, lr=1e-2, max_grad_norm=clip)
    batch = _batch(tiny_model_dir)
    model = load_model(str(tiny_model_dir))
    reference = copy.deepcopy(model)
    named, ref_named = list(model.named_parameters()), list(reference.named_parameters())
    updates = optimizers.updates(optimizers.make(recipe, named), [p for _, p in named], clip)
    ref_opt = optimizers.make(recipe, ref_named)
    assert updates.clips_in_step
    for _ in range(3):
        updates.backward(nll_sum(model, batch) / batch.n_trained)
        norm = updates.apply()
        (nll_sum(reference, batch) / batch.n_trained).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert norm == pytest.approx(float(ref_norm), rel=1e-6)
        assert (norm > clip) == (clip < 1)  # the clip really scales (or really does not) in each case
    for (n, p), (_, q) in zip(named, ref_named):
        if clip < 1:
            assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), n
        else:
            assert torch.equal(p, q), n


def test_clipping_stays_outside_the_step_where_the_step_cannot_do_it():
    """Only torch's fused AdamW divides by a grad_scale; other optimisers keep clip_grad_norm_."""
    w = torch.nn.Parameter(torch.ones(4, 4))
    assert optimizers.clips_in_step(torch.optim.AdamW([w], fused=True), [w])
    assert not optimizers.clips_in_step(torch.optim.AdamW([w], foreach=True), [w])
    assert not optimizers.clips_in_step(torch.optim.Adafactor([w]), [w])
    assert not optimizers.updates(torch.optim.AdamW([w], fused=True), [w], None).clips_in_step


def test_adamw_8bit_runs_here_and_tracks_adamw():
    """bitsandbytes' 8-bit AdamW runs on this CPU: over 20 steps on a 256×1024 layer its weights stay within 1% of
    fp32 AdamW's total movement, and its moments are stored as uint8."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    a = torch.nn.Linear(1024, 256)
    b = copy.deepcopy(a)
    start = a.weight.detach().clone()
    oa = bnb.optim.AdamW8bit(a.parameters(), lr=1e-4, weight_decay=0.0)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(8, 1024)
    for _ in range(20):
        for m, o in ((a, oa), (b, ob)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert oa.state[a.weight]["state1"].dtype == torch.uint8
    moved = (b.weight - start).abs().mean()
    assert (a.weight - b.weight).abs().mean() < 0.01 * moved * 20  # 8-bit rounding, not a different optimiser
    assert torch.corrcoef(torch.stack([(a.weight - start).flatten(), (b.weight - start).flatten()]))[0, 1] > 0.99


def test_every_optimizer_trains_full_fine_tuning_through_the_cli(tmp_path, tiny_model_dir, run_cli, monkeypatch):
    """Each optimiser (and lomo under an ewc penalty, which it takes in the same backward) lowers the validation
    loss of full fine-tuning; the report and the plan name the optimiser's memory."""
    monkeypatch.setenv("FTCLI_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(64))
    cases = {"adamw": ({"name": "full"}, 1e-3), "adafactor": ({"name": "full"}, 1e-1),
             "adamw_8bit": ({"name": "full"}, 1e-3), "lomo": ({"name": "full"}, 5e-2),
             "lomo-ewc": ({"name": "ewc", "lambda": 1.0, "fisher_rows": 4, "inner": {"name": "full"}}, 5e-2)}
    for name, (strategy, lr) in cases.items():
        (tmp_path / name).mkdir()
        path = make_recipe(tmp_path / name, tiny_model_dir, data, strategy=strategy,
                           training={"max_steps": 8, "batch_size": 8, "lr": lr, "warmup": 0,
                                     "optimizer": name.split("-")[0]})
        code, out, err = run_cli("train", path)
        assert code == 0, (name, err)
        report = json.loads((tmp_path / name / "run" / "report.json").read_text())
        assert report["after"]["loss"] < report["before"]["loss"] - 0.1, name
        records = [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        if name == "lomo-ewc":
            assert all("penalty" in r for r in records if r["kind"] == "train")
    code, out, err = run_cli("check", path)  # the last: lomo
    assert code == 0 and "optimizer (lomo)" in out and "gradients (one tensor at a time)" in out


def test_lomo_refuses_what_it_cannot_do(tmp_path, tiny_model_dir, run_cli):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(8))
    path = make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "full"},
                       training={"optimizer": "lomo", "grad_accum": 2})
    code, out, err = run_cli("check", path)
    assert code == 2 and "training" in err and "gradients cannot be accumulated" in err
    path = make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "full"},
                       training={"optimizer": "lomo", "record_si": True})
    code, out, err = run_cli("check", path)
    assert code == 2 and "lomo never keeps a gradient" in err
    code, out, err = run_cli("check", path, "--set", "training.optimizer=sgd")
    assert code == 2 and "adamw" in err and "lomo" in err
