"""ftcli prune: exact sparsity per layer (unstructured and N:M), Wanda's choice equals |W|·‖X‖ computed
independently, perplexity before and after, a transformers folder; recovery training keeps the zeros."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ftcli.prune import prune_mask

from conftest import addition_rows, make_recipe, write_jsonl


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _linear(name):
    return ".layers." in name and name.endswith("proj.weight")


def test_prune_hits_the_asked_sparsity_exactly(tmp_path, tiny_model_dir, run_cli):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(60))
    dense = _weights(tiny_model_dir)
    for method, args, expect in (("magnitude", ["--sparsity", "0.3"], 0.3), ("wanda", ["--sparsity", "0.5"], 0.5),
                                 ("wanda", ["--pattern", "2:4"], 0.5), ("magnitude", ["--pattern", "1:4"], 0.75)):
        out = tmp_path / f"{method}-{args[1]}"
        code, stdout, err = run_cli("prune", tiny_model_dir, "--method", method, *args, "--out", out,
                                    "--data", data, "--eval-rows", "20", "--calibration-rows", "8")
        assert code == 0, err
        w = _weights(out)
        lin = [k for k in w if _linear(k)]
        assert lin and set(w) == set(dense)
        for k in lin:
            zeros = (w[k] == 0)
            if method == "wanda" or ":" in args[1]:  # per output row (and per group of M)
                per_row = zeros.sum(1)
                assert (per_row == round(expect * w[k].shape[1])).all(), k
            assert int(zeros.sum()) == round(expect * w[k].numel()), k
            kept = w[k] != 0
            assert torch.equal(w[k][kept], dense[k][kept])  # what is kept is unchanged
            if ":" in args[1]:
                n, m = map(int, args[1].split(":"))
                assert ((~zeros).reshape(w[k].shape[0], -1, m).sum(-1) == n).all(), k
        for k in set(w) - set(lin):  # embeddings, norms, the head: untouched
            assert torch.equal(w[k], dense[k]), k
        report = json.loads((out / "prune.json").read_text())
        assert report["before"]["perplexity"] > 0 and report["after"]["perplexity"] != report["before"]["perplexity"]
        assert report["worst_layer_error"] <= 1 / min(w[k].shape[1] for k in lin)  # one weight of a row at most
        assert "perplexity on 20 rows" in stdout
    code, stdout, err = run_cli("prune", tiny_model_dir, "--method", "wanda", "--sparsity", "0.5", "--out",
                                tmp_path / "x")
    assert code == 2 and "needs calibration rows" in err
    code, stdout, err = run_cli("prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.3",
                                "--pattern", "2:4", "--out", tmp_path / "x")
    assert code == 2 and "contradicts" in err and not (tmp_path / "x").exists()


def test_wanda_prunes_the_lowest_weight_times_input_norm(tmp_path, tiny_model_dir, run_cli):
    """For the first block (whose inputs pruning cannot change) the zeros are exactly the lowest |W_ij|·‖X_j‖ of
    each row, ‖X_j‖ taken here from the dense model's inputs to that layer over the calibration rows."""
    from ftcli.data import load_examples
    from ftcli.data.tokenize import Encoder
    from ftcli.models import load_model, load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(30))
    out = tmp_path / "wanda"
    code, _, err = run_cli("prune", tiny_model_dir, "--method", "wanda", "--sparsity", "0.5", "--out", out,
                           "--data", data, "--eval-rows", "10", "--calibration-rows", "20")
    assert code == 0, err
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    rows = load_examples(str(data), "alpaca", {})[10:30]
    layer = model.model.layers[0].mlp.down_proj
    sq = torch.zeros(layer.in_features)
    layer.register_forward_pre_hook(lambda m, a: sq.add_(a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0)))
    with torch.no_grad():
        for e in Encoder(tok, None, 512, "truncate", "alpaca").encode_all(rows)[0]:
            model(input_ids=torch.tensor([e.input_ids]))
    score = layer.weight.detach().abs() * sq.sqrt()
    expected = prune_mask(score, 0.5, None, per_row=True)
    magnitude_only = prune_mask(layer.weight.detach().abs(), 0.5, None, per_row=True)
    got = _weights(out)["model.layers.0.mlp.down_proj.weight"] == 0
    assert torch.equal(got, expected)
    assert not torch.equal(got, magnitude_only)  # the activations changed the choice


def test_prune_mask_breaks_ties_by_position_so_the_count_is_exact():
    score = torch.zeros(3, 8)
    assert int(prune_mask(score, 0.5, None, per_row=False).sum()) == 12
    assert (prune_mask(score, 0.25, None, per_row=True).sum(1) == 2).all()
    assert (prune_mask(score, 0.5, (2, 4), per_row=True).reshape(3, 2, 4).sum(-1) == 2).all()


def test_recovery_training_keeps_the_zeros(tmp_path, tiny_model_dir, run_cli):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(48))
    pruned = tmp_path / "pruned"
    assert run_cli("prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5", "--out", pruned)[0] == 0
    before = _weights(pruned)
    for keep in (True, False):
        folder = tmp_path / f"keep-{keep}"
        folder.mkdir()
        path = make_recipe(folder, tiny_model_dir, data, base_model=str(pruned), strategy={"name": "full"},
                           training={"max_steps": 4, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1,
                                     "keep_zeros": keep})
        code, _, err = run_cli("train", path)
        assert code == 0, err
        after = _weights(folder / "run" / "model")
        lin = [k for k in before if _linear(k)]
        same_zeros = all(torch.equal(after[k] == 0, before[k] == 0) for k in lin)
        moved = sum(int((after[k] != before[k]).sum()) for k in lin)
        assert moved > 0
        assert same_zeros is keep  # without the key the zeros fill in: the check can fail
    path = make_recipe(tmp_path, tiny_model_dir, data, base_model=str(pruned), strategy={"name": "lora", "r": 4},
                       training={"keep_zeros": True})
    code, _, err = run_cli("train", path)
    assert code == 2 and "keep_zeros" in err and "adapter" in err
