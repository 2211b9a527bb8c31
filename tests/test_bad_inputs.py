"""The bad-input corpus: every case as a user types it, through the CLI, in one process (run_cli).

Each case must end with exit 2, one message (one `error:` line group, no traceback) that names the key, file, row
or module and says what is allowed, and must leave nothing behind: the folder the case ran in holds exactly what
it held before (no run folder, no partial file). A recipe case runs as `ftcli train` and as `ftcli check`: what
train refuses, check refuses too, with the same message.

One table, `CASES`; its categories and counts are printed by `test_the_corpus_covers_every_command`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from safetensors.torch import save_file

from conftest import addition_rows, write_jsonl


@dataclass
class Case:
    category: str
    id: str
    args: Callable[["Env"], list]  # after `ftcli`: [recipe path, options] (run as train and as check) or a command
    says: tuple[str, ...]  # what the message must contain (whitespace normalised)


class Env:
    """A case's folder, with a good recipe to spoil and shared fixtures (a tiny model, a finished run, adapters)."""

    def __init__(self, root: Path, shared: dict):
        self.root, self.shared = root, shared
        self.model = shared["model"]
        self.data = write_jsonl(root / "train.jsonl", addition_rows(24))

    def file(self, name: str, content: bytes | str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return p

    def rows(self, name: str, rows: list) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def doc(self, **changes) -> dict:
        """The good recipe with `changes` merged in (section dicts merged key by key; None removes a key)."""
        doc = {"base_model": str(self.model),
               "strategy": {"name": "lora", "r": 4, "alpha": 8},
               "data": {"train": str(self.data), "format": "alpaca", "validation": 0.25, "max_len": 64},
               "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2},
               "output": str(self.root / "run")}
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict) and "name" not in value:
                doc[key] = {**doc[key], **value}
                doc[key] = {k: v for k, v in doc[key].items() if v is not None}
            elif value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        return doc

    def recipe(self, *args, text: str | None = None, **changes) -> list:
        """[recipe path, *args]: the good recipe with `changes`, or the YAML `text` as given."""
        p = self.file("recipe.yaml", text if text is not None else yaml.safe_dump(self.doc(**changes)))
        return [p, *args]

    def model_copy(self, name: str, edit: Callable[[Path], None]) -> Path:
        folder = self.root / name
        shutil.copytree(self.model, folder)
        edit(folder)
        return folder

    def adapter(self, name: str, *, base: str | None = None, modules=("q_proj", "v_proj"), d: int = 32,
                r: int = 2) -> Path:
        """A LoRA adapter folder written by hand (PEFT layout) over the tiny model's attention."""
        import torch

        folder = self.root / name
        folder.mkdir()
        tensors = {}
        for layer in range(2):
            for m in modules:
                key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                out = d if m == "q_proj" else 16
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, d)
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, r)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules),
            "base_model_name_or_path": base or str(self.model)}))
        return folder


def R(*args, **changes):
    """A recipe case: the good recipe with `changes` (and CLI options `args`)."""
    return lambda e: e.recipe(*args, **changes)


def T(text: str):
    """A recipe case given as raw YAML text."""
    return lambda e: e.recipe(text=text)


GOOD_ROW = {"instruction": "what is 1 + 1", "input": "", "output": "2"}


CASES = [
    # -- the recipe file itself -------------------------------------------------------------------------------
    Case("recipe file", "yaml-syntax", T("training: {lr: 1e-4\ndata: x\n"), ("not valid YAML", "line")),
    Case("recipe file", "yaml-tab-indent", T("data:\n\ttrain: a.jsonl\n"), ("not valid YAML",)),
    Case("recipe file", "a-list", T("- data: a.jsonl\n- training: {}\n"),
         ("the top level must be a mapping of keys, got list",)),
    Case("recipe file", "a-scalar", T("just some text\n"), ("the top level must be a mapping of keys, got str",)),
    Case("recipe file", "empty", T(""), ("data: required key is missing",)),
    Case("recipe file", "missing", lambda e: [e.root / "nope.yaml"], ("nope.yaml: no such file",)),
    Case("recipe file", "a-folder", lambda e: [e.root], ("a folder, not a recipe file",)),
    Case("recipe file", "not-utf8", lambda e: [e.file("r.yaml", b"data: {train: caf\xe9.jsonl}\n")],
         ("r.yaml", "not UTF-8")),
    # -- unknown, misspelt and other tools' keys at every level ----------------------------------------------
    Case("unknown key", "top-learning_rate", R(learning_rate=1e-4), ("learning_rate: unknown key", "training.lr")),
    Case("unknown key", "top-batch_size", R(batch_size=4), ("batch_size: unknown key", "training.batch_size")),
    Case("unknown key", "top-micro_batch_size", R(micro_batch_size=4), ("micro_batch_size", "training.batch_size")),
    Case("unknown key", "top-num_epochs", R(num_epochs=3), ("num_epochs", "training.epochs")),
    Case("unknown key", "top-lora_r", R(lora_r=8), ("lora_r", "strategy.r")),
    Case("unknown key", "top-datasets", R(datasets=[{"path": "x"}]), ("datasets: unknown key", "did you mean 'data'")),
    Case("unknown key", "top-misspelt", R(trainng={"lr": 1}), ("trainng: unknown key", "did you mean 'training'")),
    Case("unknown key", "top-source", R(source="x"), ("source: unknown key",)),
    Case("unknown key", "training-learning_rate", R(training={"learning_rate": 1e-4}),
         ("training.learning_rate: unknown key", "did you mean 'lr'", "Allowed here:")),
    Case("unknown key", "training-misspelt", R(training={"bach_size": 4}),
         ("training.bach_size: unknown key", "did you mean 'batch_size'")),
    Case("unknown key", "training-max_len", R(training={"max_len": 128}),
         ("training.max_len: unknown key", "belongs under 'data'")),
    Case("unknown key", "data-sequence_len", R(data={"sequence_len": 512}),
         ("data.sequence_len: unknown key", "did you mean 'max_len'")),
    Case("unknown key", "data-lr", R(data={"lr": 0.1}), ("data.lr: unknown key", "belongs under 'training'")),
    Case("unknown key", "strategy-lora_alpha", R(strategy={"name": "lora", "lora_alpha": 16}),
         ("strategy.lora_alpha: unknown key", "did you mean 'alpha'")),
    Case("unknown key", "strategy-of-other-strategy", R(strategy={"name": "full", "r": 8}),
         ("strategy.r: unknown key",)),
    Case("unknown key", "eval-eval_steps", R(eval={"eval_steps": 10}),
         ("eval.eval_steps: unknown key", "did you mean 'every'")),
    Case("unknown key", "retention-misspelt", R(eval={"retention": [{"data": "x.jsonl", "metrc": "loss"}]}),
         ("eval.retention[0].metrc: unknown key", "did you mean 'metric'")),
    Case("unknown key", "ewc-inner-misspelt", R(strategy={"name": "ewc", "inner": {"name": "lora", "rank": 4}}),
         ("strategy.inner.rank: unknown key", "did you mean 'r'")),
    # -- wrong types -------------------------------------------------------------------------------------------
    Case("wrong type", "lr-a-word", R(training={"lr": "fast"}), ("training.lr", "expected a number, got 'fast'")),
    Case("wrong type", "batch-a-fraction", R(training={"batch_size": 4.5}), ("training.batch_size", "integer")),
    Case("wrong type", "packing-maybe", R(data={"packing": "maybe"}), ("data.packing", "true or false")),
    Case("wrong type", "training-a-list", R(training=[1, 2]), ("training", "a mapping")),
    Case("wrong type", "data-a-string", R(data="train.jsonl"), ("data", "a mapping")),
    Case("wrong type", "strategy-a-string", R(strategy="lora"), ("strategy", "a mapping")),
    Case("wrong type", "metrics-not-a-list", R(eval={"metrics": "loss"}), ("eval.metrics", "a list")),
    Case("wrong type", "betas-one-number", R(training={"betas": [0.9]}), ("training.betas",)),
    Case("wrong type", "fields-a-list", R(data={"fields": ["instruction"]}), ("data.fields", "a mapping")),
    # -- out-of-range values -----------------------------------------------------------------------------------
    Case("out of range", "lr-zero", R(training={"lr": 0}), ("training.lr", "greater than 0")),
    Case("out of range", "lr-negative", R(training={"lr": -1e-4}), ("training.lr", "greater than 0")),
    Case("out of range", "lr-inf", R(training={"lr": float("inf")}), ("training.lr", "finite")),
    Case("out of range", "lr-nan", R(training={"lr": float("nan")}), ("training.lr", "finite")),
    Case("out of range", "batch-zero", R(training={"batch_size": 0}), ("training.batch_size", "greater than or equal to 1")),
    Case("out of range", "grad_accum-zero", R(training={"grad_accum": 0}), ("training.grad_accum", "1")),
    Case("out of range", "epochs-zero", R(training={"epochs": 0}), ("training.epochs", "greater than 0")),
    Case("out of range", "max_steps-zero", R(training={"max_steps": 0}), ("training.max_steps", "1")),
    Case("out of range", "warmup-negative", R(training={"warmup": -1}), ("training.warmup", "0")),
    Case("out of range", "max_grad_norm-zero", R(training={"max_grad_norm": 0}), ("training.max_grad_norm",)),
    Case("out of range", "keep_checkpoints-zero", R(training={"keep_checkpoints": 0}), ("training.keep_checkpoints",)),
    Case("out of range", "checkpoint_every-zero", R(training={"checkpoint_every": 0}), ("training.checkpoint_every",)),
    Case("out of range", "max_len-4", R(data={"max_len": 4}), ("data.max_len", "greater than or equal to 8")),
    Case("out of range", "validation-1.5", R(data={"validation": 1.5}), ("data.validation", "between 0 and 1")),
    Case("out of range", "limit-zero", R(data={"limit": 0}), ("data.limit",)),
    Case("out of range", "r-zero", R(strategy={"name": "lora", "r": 0}), ("strategy.r", "1")),
    Case("out of range", "dropout-one", R(strategy={"name": "lora", "dropout": 1.0}), ("strategy.dropout", "less than 1")),
    Case("out of range", "eval-every-zero", R(eval={"every": 0}), ("eval.every",)),
    Case("out of range", "max_new_tokens-zero", R(eval={"max_new_tokens": 0}), ("eval.max_new_tokens",)),
    # -- unknown enum values -------------------------------------------------------------------------------------
    Case("unknown value", "strategy-name", R(strategy={"name": "lorra"}), ("unknown strategy 'lorra'", "lora")),
    Case("unknown value", "strategy-without-name", T("data: {train: train.jsonl}\nstrategy: {r: 8}\n"),
         ("strategy", "needs a 'name:'", "lora")),
    Case("unknown value", "schedule", R(training={"schedule": "cosinus"}), ("training.schedule", "'cosine'")),
    Case("unknown value", "precision-fp16", R(training={"precision": "fp16"}), ("training.precision", "'bf16'")),
    Case("unknown value", "format", R(data={"format": "alpacca"}), ("data.format", "'alpaca'")),
    Case("unknown value", "overlong", R(data={"overlong": "cut"}), ("data.overlong", "'truncate'")),
    Case("unknown value", "metric", R(eval={"metrics": ["bleu"]}), ("eval.metrics", "bleu", "loss")),
    Case("unknown value", "objective", R(objective={"name": "ppo"}), ("objective", "'ppo'", "sft")),
    Case("unknown value", "chat-template-name", R(data={"format": "alpaca", "chat_template": "llama9"}),
         ("data.chat_template", "'llama9'", "chatml")),
    # -- files: missing, folders, binary, unreadable text -----------------------------------------------------
    Case("data file", "train-missing", R(data={"train": "missing.jsonl"}), ("missing.jsonl: no such file",)),
    Case("data file", "train-a-folder", lambda e: (e.root / "rows.jsonl").mkdir() or e.recipe(data={"train": "rows.jsonl"}),
         ("rows.jsonl: a folder, not a file",)),
    Case("data file", "train-binary", lambda e: e.file("img.jsonl", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff") and
         e.recipe(data={"train": "img.jsonl"}), ("img.jsonl line 1: a binary file",)),
    Case("data file", "train-latin1", lambda e: e.file("l.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n') and
         e.recipe(data={"train": "l.jsonl"}), ("l.jsonl line 1: not UTF-8 text",)),
    Case("data file", "train-unknown-type", lambda e: e.file("rows.txt", "hello\n") and
         e.recipe(data={"train": "rows.txt"}), ("rows.txt: unknown type '.txt'", ".jsonl")),
    Case("data file", "validation-missing", R(data={"validation": "val.jsonl"}), ("val.jsonl: no such file",)),
    Case("data file", "retention-missing", R(eval={"retention": "gone.jsonl"}), ("gone.jsonl: no such file",)),
    Case("data file", "template-missing", R(data={"chat_template": "t.jinja"}), ("t.jinja: no such file",)),
    Case("data file", "parquet-not-parquet", lambda e: e.file("x.parquet", b"not parquet") and
         e.recipe(data={"train": "x.parquet"}), ("x.parquet: could not be read",)),
    # -- rows: JSON that is not a row, missing fields, bad field maps ------------------------------------------
    Case("rows", "line-an-array", lambda e: e.rows("a.jsonl", [GOOD_ROW, [1, 2]]) and e.recipe(data={"train": "a.jsonl"}),
         ("a.jsonl line 2: a JSON array, not an object",)),
    Case("rows", "line-a-scalar", lambda e: e.rows("s.jsonl", [GOOD_ROW, "text"]) and e.recipe(data={"train": "s.jsonl"}),
         ("s.jsonl line 2: a JSON string, not an object",)),
    Case("rows", "line-broken-json", lambda e: e.file("b.jsonl", json.dumps(GOOD_ROW) + '\n{"instruction": \n') and
         e.recipe(data={"train": "b.jsonl"}), ("b.jsonl line 2: not valid JSON",)),
    Case("rows", "json-an-object", lambda e: e.file("o.json", json.dumps(GOOD_ROW)) and
         e.recipe(data={"train": "o.json"}), ("o.json: a JSON object; expected a list of rows",)),
    Case("rows", "missing-field", lambda e: e.rows("m.jsonl", [GOOD_ROW, {"instruction": "x"}]) and
         e.recipe(data={"train": "m.jsonl", "validation": None}), ("m.jsonl", "no field 'output'", "data.fields")),
    Case("rows", "fields-not-of-format", R(data={"fields": {"question": "instruction"}}),
         ("data.fields: question not a field of format 'alpaca'", "instruction, input, output")),
    Case("rows", "fields-to-missing-column", R(data={"fields": {"output": "answer"}}),
         ("no field 'answer' (mapped from 'output')",)),
    Case("rows", "chat-bad-role", lambda e: e.rows("c.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}]) and
         e.recipe(data={"train": "c.jsonl", "format": "chat", "validation": None}),
         ("c.jsonl", "role 'wizard'", "user, assistant")),
    Case("rows", "chat-not-a-list", lambda e: e.rows("c.jsonl", [{"messages": "hello"}]) and
         e.recipe(data={"train": "c.jsonl", "format": "chat", "validation": None}),
         ("c.jsonl", "must be a non-empty list of messages")),
    Case("rows", "chat-no-assistant", lambda e: e.rows("c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
         and e.recipe(data={"train": "c.jsonl", "format": "chat", "validation": None}),
         ("c.jsonl", "no assistant message")),
    Case("rows", "choice-bad-answer", lambda e: e.rows("q.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 7}])
         and e.recipe(data={"train": "q.jsonl", "format": "choice", "validation": None}),
         ("q.jsonl", "field 'answer' is 7", "expected an index 0..1")),
    # -- nothing to train on -------------------------------------------------------------------------------------
    Case("nothing to train", "empty-file", lambda e: e.file("e.jsonl", "\n\n") and e.recipe(data={"train": "e.jsonl"}),
         ("e.jsonl: no rows",)),
    Case("nothing to train", "all-dropped-by-max_len", R(data={"max_len": 8, "overlong": "drop"}),
         ("0 trainable tokens", "over max_len dropped", "data.max_len")),
    Case("nothing to train", "zero-trained-tokens", lambda e: e.rows("z.jsonl", [
        {"instruction": "a long question " * 20, "output": "short"}] * 4) and
         e.recipe(data={"train": "z.jsonl", "validation": None, "max_len": 16}),
         ("0 trainable tokens", "with nothing to train", "data.max_len")),
    Case("nothing to train", "validation-takes-all", lambda e: e.rows("one.jsonl", [GOOD_ROW]) and
         e.recipe(data={"train": "one.jsonl", "validation": 0.5}), ("data.validation", "leaves nothing to train on")),
    # -- the model: modules, blocks, folders ---------------------------------------------------------------------
    Case("model", "target-modules-match-nothing", R(strategy={"name": "lora", "target_modules": ["attn_qq"]}),
         ("strategy.target_modules", "attn_qq", "q_proj")),
    Case("model", "more-frozen-blocks-than-the-model", R(strategy={"name": "frozen", "last_n_blocks": 9}),
         ("strategy.last_n_blocks", "9", "2 blocks")),
    Case("model", "frozen-module-matches-nothing", R(strategy={"name": "frozen", "last_n_blocks": 0, "modules": ["nope"]}),
         ("strategy.modules", "nope")),
    Case("model", "impossible-combination", R(strategy={"name": "ewc", "inner": {"name": "qlora", "r": 4}}),
         ("strategy.inner", "'qlora' cannot be used here")),
    Case("model", "folder-without-weights", lambda e: e.recipe(base_model=str(e.model_copy(
        "noweights", lambda f: (f / "model.safetensors").unlink()))), ("noweights", "no weights", "safetensors")),
    Case("model", "folder-pickle-only", lambda e: e.recipe(base_model=str(e.model_copy(
        "pickled", lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin")))),
         ("pytorch_model.bin", "--allow-pickle")),
    Case("model", "folder-config-unbuildable", lambda e: e.recipe(base_model=str(e.model_copy(
        "alien", lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                                     "model_type": "alienformer"}))))),
         ("alien", "alienformer", "transformers")),
    Case("model", "folder-without-config", lambda e: e.recipe(base_model=str(e.model_copy(
        "noconfig", lambda f: (f / "config.json").unlink()))), ("noconfig: no config.json",)),
    Case("model", "no-such-folder", R(base_model="./no/such/model"), ("no such folder", "built-in alias")),
    Case("model", "hub-id-offline", R(base_model="someorg/some-model"), ("'someorg/some-model'", "offline")),
    Case("model", "base-is-a-file", lambda e: e.recipe(base_model=str(e.data)), ("a file, not a model folder",)),
    # -- the run folder ------------------------------------------------------------------------------------------
    Case("run folder", "output-exists", lambda e: e.file("run/notes.txt", "mine") and e.recipe(),
         ("run folder", "already exists", "--overwrite")),
    Case("run folder", "output-is-a-file", lambda e: e.file("run", "a file") and e.recipe(), ("is a file",)),
    Case("run folder", "resume-nothing", lambda e: e.recipe("--resume"), ("--resume", "does not exist")),
    Case("run folder", "resume-and-overwrite", lambda e: e.recipe("--resume", "--overwrite"), ("contradict",)),
    # -- --set -------------------------------------------------------------------------------------------------
    Case("--set", "no-equals", R("--set", "training.lr"), ("--set 'training.lr'", "dotted.key=value")),
    Case("--set", "empty-key", R("--set", "=3"), ("--set '=3'", "empty key")),
    Case("--set", "unknown-key", R("--set", "training.learning_rate=1e-4"),
         ("training.learning_rate: unknown key", "did you mean 'lr'")),
    Case("--set", "through-a-value", R("--set", "training.lr.x=1"), ("training.lr is a value, not a section",)),
    Case("--set", "bad-value", R("--set", "training.batch_size=lots"), ("training.batch_size", "integer", "'lots'")),
]

PAIR = {"prompt": "what is 1 + 1", "chosen": "2", "rejected": "3"}


def DPO(rows=None, *args, **changes):
    """A preference-tuning recipe case (objective dpo on pairs.jsonl), with `changes`."""
    def make(e):
        e.rows("pairs.jsonl", rows if rows is not None else [PAIR, {**PAIR, "chosen": "two"}] * 6)
        changes.setdefault("objective", {"name": "dpo"})
        data = {"train": "pairs.jsonl", "format": "preference", **changes.pop("data", {})}
        return e.recipe(*args, data=data, eval={"metrics": ["loss"]}, **changes)
    return make


CASES += [
    # -- chat templates (rendered in jinja's sandbox: a template cannot reach Python) ---------------------------
    Case("chat template", "syntax-error", R(data={"chat_template": "{% for m in messages %}{{ m.content }"}),
         ("data.chat_template", "TemplateSyntaxError", "chatml")),
    Case("chat template", "sandbox-escape", R(data={"chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"
                                                                     "{% for m in messages %}{{ m.content }}{% endfor %}"}),
         ("data.chat_template", "SecurityError", "unsafe")),
    Case("chat template", "undefined-field", R(data={"chat_template": "{% for m in messages %}{{ m.x.y }}{% endfor %}"}),
         ("data.chat_template", "UndefinedError")),
    # -- objectives: values, combinations, rows -------------------------------------------------------------------
    Case("unknown value", "on_bad_rows", R(data={"on_bad_rows": "ignore"}), ("data.on_bad_rows", "'ignore'", "'skip'")),
    Case("unknown value", "dpo-loss", DPO(objective={"name": "dpo", "loss": "kto"}), ("objective.loss", "'kto'", "'ipo'")),
    Case("unknown value", "distill-kl", R(objective={"name": "distill", "teacher": ".", "kl": "both"}),
         ("objective.kl", "'both'", "'forward'")),
    Case("out of range", "dpo-beta-zero", DPO(objective={"name": "dpo", "beta": 0}), ("objective.beta", "greater than 0")),
    Case("out of range", "dpo-label-smoothing", DPO(objective={"name": "dpo", "label_smoothing": 0.5}),
         ("objective.label_smoothing", "less than 0.5")),
    Case("out of range", "distill-alpha", R(objective={"name": "distill", "teacher": ".", "alpha": 1.5}),
         ("objective.alpha", "less than or equal to 1")),
    Case("out of range", "distill-temperature", R(objective={"name": "distill", "teacher": ".", "temperature": 0}),
         ("objective.temperature", "greater than 0")),
    Case("impossible combination", "dpo-on-alpaca-rows", R(objective={"name": "dpo"}),
         ("data.format", "'alpaca'", "objective dpo trains on preference rows")),
    Case("impossible combination", "retention-metric-its-format-cannot-score",
         R(eval={"retention": [{"data": "train.jsonl", "format": "alpaca", "metric": "accuracy"}]}),
         ("eval.retention[0]", "accuracy", "alpaca")),
    Case("impossible combination", "distill-teacher-missing", R(objective={"name": "distill", "teacher": "./no/teacher"}),
         ("objective.teacher", "no/teacher", "no such folder")),
    Case("rows", "pair-missing-rejected", DPO([PAIR, {"prompt": "q", "chosen": "a"}, PAIR] * 4),
         ("pairs.jsonl line 2", "no field 'rejected'")),
    Case("rows", "pair-prefers-nothing", DPO([PAIR, {**PAIR, "rejected": "2"}] * 4, data={"validation": None}),
         ("pairs.jsonl line 2", "same reply", "data.on_bad_rows")),
    Case("rows", "every-row-bad-with-skip", DPO([{"prompt": "q", "chosen": "a"}] * 6, data={"on_bad_rows": "skip"}),
         ("pairs.jsonl", "every one of its 6 rows was bad", "no field 'rejected'")),
    # -- more run folder, --set ---------------------------------------------------------------------------------
    Case("run folder", "resume-with-a-changed-recipe", lambda e: shutil.copytree(e.shared["finished"], e.root / "run")
         and e.recipe("--resume", "--set", "training.lr=0.5"), ("--resume", "differs", "training.lr")),
    Case("--set", "unknown-section", R("--set", "optimizer.lr=0.1"), ("optimizer: unknown key", "did you mean 'training'")),
]

# commands other than train/check: (category, id, args, says)
OTHER = [
    # eval
    ("eval", "data-missing", lambda e: ["eval", e.model, "--data", e.root / "none.jsonl"], ("none.jsonl: no such file",)),
    ("eval", "data-binary", lambda e: ["eval", e.model, "--data", e.file("b.jsonl", b"\0\x01\x02\xff")],
     ("b.jsonl line 1: a binary file",)),
    ("eval", "format-unknown", lambda e: ["eval", e.model, "--data", e.data, "--format", "alpacca"],
     ("--format 'alpacca'", "alpaca")),
    ("eval", "metric-unknown", lambda e: ["eval", e.model, "--data", e.data, "--metrics", "bleu"], ("bleu", "loss")),
    ("eval", "field-no-equals", lambda e: ["eval", e.model, "--data", e.data, "--field", "output"],
     ("--field 'output'", "name=column")),
    ("eval", "model-missing", lambda e: ["eval", e.root / "nomodel", "--data", e.data], ("nomodel", "no such folder")),
    ("eval", "base-for-a-model", lambda e: ["eval", e.model, "--data", e.data, "--base", e.model],
     ("--base applies to an adapter",)),
    ("eval", "limit-zero", lambda e: ["eval", e.model, "--data", e.data, "--limit", "0"], ("--limit", "greater than or equal to 1")),
    ("eval", "json-out-a-folder", lambda e: ["eval", e.model, "--data", e.data, "--limit", "2", "--json", e.root],
     ("--json", "a folder")),
    ("eval", "compare-missing", lambda e: ["eval", e.model, "--data", e.data, "--compare", e.root / "other"],
     ("other", "no such folder")),
    # merge
    ("merge", "density-out-of-range", lambda e: ["merge", e.adapter("a"), e.adapter("b"), "--method", "ties",
                                                 "--density", "1.5", "--out", e.root / "m"], ("--density", "1.5")),
    ("merge", "rank-zero", lambda e: ["merge", e.adapter("a"), e.adapter("b"), "--method", "svd", "--rank", "0",
                                      "--out", e.root / "m"], ("--rank", "0")),
    ("merge", "different-bases", lambda e: ["merge", e.adapter("a"), e.adapter("b", base="other/model"), "--method",
                                            "cat", "--out", e.root / "m"], ("different base models", "other/model")),
    ("merge", "different-shapes", lambda e: ["merge", e.adapter("a"), e.adapter("b", d=16), "--method", "cat",
                                             "--out", e.root / "m"], ("shape mismatch", "q_proj")),
    ("merge", "different-modules", lambda e: ["merge", e.adapter("a"), e.adapter("b", modules=("q_proj",)),
                                              "--method", "cat", "--out", e.root / "m"], ("v_proj", "is in")),
    ("merge", "method-unknown", lambda e: ["merge", e.adapter("a"), "--method", "average", "--out", e.root / "m"],
     ("average", "cat")),
    ("merge", "weights-count", lambda e: ["merge", e.adapter("a"), e.adapter("b"), "--method", "linear", "--weights",
                                          "1,2,3", "--out", e.root / "m"], ("weights", "2")),
    ("merge", "weights-not-numbers", lambda e: ["merge", e.adapter("a"), "--method", "cat", "--weights", "one",
                                                "--out", e.root / "m"], ("--weights 'one'", "numbers")),
    ("merge", "adapter-missing", lambda e: ["merge", e.root / "gone", "--method", "cat", "--out", e.root / "m"],
     ("gone: no such adapter",)),
    ("merge", "out-exists", lambda e: ["merge", e.adapter("a"), "--method", "cat", "--out", e.file("m/x", "x").parent],
     ("exists", "--overwrite")),
    ("merge", "pickle-adapter", lambda e: ["merge", e.file("ad/adapter_model.bin", b"x"), "--method", "cat",
                                           "--out", e.root / "m"], ("not a .safetensors file",)),
    # export
    ("export", "run-without-artifact", lambda e: ["export", e.shared["unfinished"], "--out", e.root / "x"],
     ("not a finished run folder",)),
    ("export", "run-missing", lambda e: ["export", e.root / "norun", "--out", e.root / "x"], ("norun",)),
    ("export", "out-exists", lambda e: ["export", e.shared["finished"], "--out", e.file("x/y", "y").parent],
     ("exists", "--overwrite")),
    ("export", "neither-run-nor-adapter", lambda e: ["export", "--out", e.root / "x"], ("RUN", "--adapter")),
    # the command line
    ("command line", "unknown-command", lambda e: ["trian", e.root / "r.yaml"], ("No such command 'trian'",)),
    ("command line", "unknown-option", lambda e: ["train", e.root / "r.yaml", "--epochs", "3"],
     ("No such option: --epochs",)),
    ("command line", "missing-argument", lambda e: ["check"], ("Missing argument",)),
]
CASES += [Case(cat, f"{cat}-{id_}", args, says) for cat, id_, args, says in OTHER]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """A finished run and an unfinished one (checkpoints, no artifact)."""
    from ftcli import recipe as recipe_mod
    from ftcli import train

    root = tmp_path_factory.mktemp("shared")
    env = Env(root, {"model": tiny_model_dir})
    path = env.recipe()[0]
    r = recipe_mod.load(path, ["training.checkpoint_every=1"])
    finished = train.run(r, output=root / "finished", progress=False)
    unfinished = root / "unfinished"
    shutil.copytree(finished, unfinished)
    shutil.rmtree(unfinished / "adapter")
    return {"model": tiny_model_dir, "finished": finished, "unfinished": unfinished}


def listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None for p in sorted(root.rglob("*"))}


def refused(run_cli, argv: list, root: Path) -> str:
    """Run one command line; assert exit 2, one message, no traceback, nothing left behind; return the message."""
    before = listing(root)
    code, out, err = run_cli(*argv)
    assert code == 2, f"exit {code}\nstdout: {out[-1500:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in out + err
    assert len(re.findall(r"^(?:error|Error):", err, re.M)) == 1, err
    assert listing(root) == before, "left behind: " + ", ".join(sorted(set(listing(root)) - set(before)))
    return " ".join(err.split())


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}:{c.id}" for c in CASES])
def test_bad_input_is_refused_with_one_clear_message(case, shared, tmp_path, run_cli):
    env = Env(tmp_path, shared)
    args = case.args(env)
    if isinstance(args[0], Path):  # a recipe (and options): train and check must refuse it alike
        messages = {}
        for command in ("train", "check"):
            if command == "check" and case.category == "run folder":
                continue  # the run folder is train's alone: check writes none
            messages[command] = refused(run_cli, [command, *args], tmp_path)
        if len(messages) == 2:
            assert messages["train"] == messages["check"], "train and check refuse differently"
        message = messages["train"]
    else:
        message = refused(run_cli, args, tmp_path)
    for words in case.says:
        assert words in message, f"{words!r} not in: {message}"


def test_the_corpus_covers_every_command():
    from collections import Counter

    counts = Counter(c.category for c in CASES)
    assert len(CASES) >= 60
    assert {"eval", "merge", "export"} <= set(counts)
    print("\n" + "\n".join(f"{n:3d}  {cat}" for cat, n in counts.items()) + f"\n{len(CASES):3d}  in all")
