"""The typed run folder: the recipe read back is a validated Recipe equal to the one trained, the artifact and
checkpoints are found, and the checkpoint payload is the loop's state dataclass."""

import json
from dataclasses import fields

import pytest

from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.errors import UserError
from ftcli.recipe import Recipe
from ftcli.run_folder import RunFolder

from conftest import make_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from conftest import addition_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("runfolder")
    data = write_jsonl(tmp / "d.jsonl", addition_rows(32))
    path = make_recipe(tmp, tiny_model_dir, data, training={"max_steps": 2, "checkpoint_every": 1})
    r = recipe_mod.load(path)
    return r, train.run(r, output=recipe_mod.default_output(r), progress=False)


def test_the_recipe_reads_back_as_the_recipe_trained(finished_run):
    r, run_dir = finished_run
    folder = RunFolder(run_dir)
    assert isinstance(folder.recipe, Recipe)
    dump = dict(mode="json", exclude={"source"}, by_alias=True)
    assert folder.recipe.model_dump(**dump) == r.model_dump(**dump)
    assert folder.versions["torch"] and folder.strategy.name == "lora"
    assert folder.kind == "adapter" and folder.artifact == run_dir / "adapter"
    assert folder.checkpoints == [1, 2]  # keep_checkpoints: 2
    assert RunFolder.holds_run(run_dir) and not RunFolder.holds_run(run_dir / "adapter")


def test_the_checkpoint_payload_is_the_train_state(finished_run):
    _, run_dir = finished_run
    saved = json.loads((run_dir / "checkpoints" / "step-2" / "state.json").read_text())
    assert {f.name for f in fields(train.TrainState)} <= set(saved)
    state = train.TrainState.from_checkpoint(saved)
    assert state.step == 2 and state.tokens > 0 and state.before["loss"] > 0


def test_an_unfinished_folder_has_no_artifact(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.resolved.yaml").write_text("data: {train: x.jsonl}\n")
    folder = RunFolder(tmp_path / "run")
    assert folder.kind is None and folder.artifact is None
    with pytest.raises(UserError, match="not a finished run folder"):
        folder.require_artifact()


def test_a_damaged_recipe_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "recipe.resolved.yaml").write_text("data: {train: x.jsonl}\ntraining: {lr: fast}\n")
    with pytest.raises(UserError, match="(?s)recipe.resolved.yaml.*training.lr"):
        RunFolder(tmp_path).recipe
