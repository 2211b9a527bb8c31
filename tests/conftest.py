"""Offline by construction: the hub is switched off, and a tiny tokenizer + tiny Llama are built once per session
and saved to a temporary folder, so tests go through the real `models.load_base` path."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import make_tiny_model  # noqa: E402

from ftcli.logs import quiet  # noqa: E402

quiet()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model.build(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from ftcli.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    """A small learnable alpaca-format task: add two digits."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"instruction": f"what is {a} + {b}", "input": "", "output": f"{a + b}"})
    return rows


@pytest.fixture
def addition_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", addition_rows(64))


def make_recipe(folder: Path, tiny_model_dir: Path, data_file: Path, **sections) -> Path:
    """Write a recipe for the tiny model; keyword sections are merged into the defaults below (a strategy
    replaces the default one)."""
    doc = {
        "base_model": str(tiny_model_dir),
        "strategy": {"name": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data_file), "format": "alpaca", "validation": 0.25, "max_len": 64},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "seed": 0, "precision": "fp32"},
        "eval": {"metrics": ["loss", "perplexity"], "retention": []},  # the built-in probe: tests/test_probe.py
        "output": str(folder / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict) and key != "strategy":
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture
def run_cli(capsys):
    """Run `ftcli ARGS...` in-process as a user types it; returns (exit code, stdout, stderr)."""
    from ftcli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        old = sys.argv
        sys.argv = ["ftcli", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = old
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def nudge_and_backprop_penalty(strategy, model) -> dict:
    """Move every weight by seeded noise (σ 0.01) and backpropagate the strategy's penalty alone; returns θ*, the
    weights before the nudge, by name (ewc and si tests compare each gradient with its closed form)."""
    import torch

    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.zero_grad(set_to_none=True)
    strategy.extra_loss(model, None).backward()
    return star
