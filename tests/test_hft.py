"""Half Fine-Tuning: in a round exactly the frozen half is untouched (no step, no weight decay), the selection
is half by category, changes between rounds, and is a function of the seed."""

import json

import torch

from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.strategies.hft import CATEGORIES, select

from conftest import addition_rows, make_recipe, write_jsonl


def test_selection_is_half_by_category_seeded_and_redrawn():
    a, b = select(30, seed=0, round_=0), select(30, seed=0, round_=0)
    assert a == b  # same seed, same selection
    assert select(30, seed=0, round_=1) != a and select(30, seed=1, round_=0) != a
    attn, norms, mlp = (set(CATEGORIES[c][0]) for c in ("attention", "norm", "mlp"))
    mlp_frozen = []
    for frozen in a.values():
        assert len(attn & set(frozen)) == 2 and len(norms & set(frozen)) == 1
        mlp_frozen.append(len(mlp & set(frozen)))
    assert set(mlp_frozen) == {1, 2} and sum(mlp_frozen) == 45  # alternating 1 and 2: half of 90 MLP matrices
    assert all(mlp_frozen[i] != mlp_frozen[i + 1] for i in range(29))


def test_frozen_half_is_bit_identical_within_a_round_and_changes_next_round(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(64))
    path = make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "hft", "round_steps": 2},
                       training={"max_steps": 4, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.1})
    r = recipe_mod.load(path)
    snapshots = {}

    holder = {}
    hooks = train.Hooks(after_step=[lambda step, loss: snapshots.__setitem__(step, {
        n: p.detach().clone() for n, p in holder["model"].named_parameters()})])
    # keep a handle on the model the loop trains: the strategy sees it first in prepare
    from ftcli.strategies import hft as hft_mod

    original = hft_mod.Hft.prepare

    def spy(self, model, ctx):
        holder["model"] = model
        holder["strategy"] = self
        snapshots[0] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return original(self, model, ctx)

    hft_mod.Hft.prepare = spy
    try:
        run_dir = train.run(r, output=tmp_path / "run", progress=False, hooks=hooks)
    finally:
        hft_mod.Hft.prepare = original
    rounds = [json.loads(x) for x in (run_dir / "hft_rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in rounds] == [0, 1] and rounds[0]["frozen"] != rounds[1]["frozen"]
    for rnd, (s0, s1) in zip(rounds, [(0, 2), (2, 4)]):
        frozen = {n for n in snapshots[s0] for b, ms in rnd["frozen"].items() for m in ms
                  if n.startswith(f"model.layers.{b}.") and n.endswith(f".{m}.weight")}
        assert len(frozen) == 2 * 3 + 2 + 1  # per block 2 attention + 1 norm; MLP 2 in one block, 1 in the other
        frozen |= {"model.embed_tokens.weight", "lm_head.weight"}  # embeddings policy: freeze
        for n in snapshots[s0]:
            same = torch.equal(snapshots[s0][n], snapshots[s1][n])
            assert same == (n in frozen), (rnd["round"], n, same)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["strategy_details"]["rounds"] == 2
    assert report["strategy_details"]["rounds_selected"] == rounds  # every round and block, in the report too
    md = (run_dir / "report.md").read_text()
    for rnd in rounds:
        for b, names in rnd["frozen"].items():
            assert f"| {rnd['round']} | {rnd['from_step']} | {b} | {', '.join(names)} |" in md
