"""The recipe: YAML → one typed object with every default filled in.

Unknown keys, wrong types and bad values are `UserError`s that name the key path, say what is allowed, and
suggest a close match for a misspelt key (and where a key belongs when it sits in the wrong section).
`--set dotted.key=value` overrides are applied before validation and typed like YAML.
Relative data paths resolve against the recipe file's folder; `output` resolves against the working directory.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ftcli import objectives, probe, strategies
from ftcli.errors import UserError
from ftcli.objectives import ObjectiveSettings
from ftcli.objectives.sft import SftParams
from ftcli.strategies import StrategyParams
from ftcli.strategies.lora import LoraParams
from ftcli.vocab import AUTO, FORMATS, SFT_FORMATS, Metric, metric_problem

Tracker = Literal["tensorboard", "mlflow"]  # ftcli/trackers.py
OptimizerName = Literal["adamw", "adafactor", "adamw_8bit", "lomo"]  # ftcli/optimizers.py
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
PASS_TOKENS = 512  # default training.pass_tokens
NOT_KEYS = ("source", "overrides")  # set by load(), never by a recipe

# names other tools (axolotl, LLaMA-Factory, torchtune, HF Trainer) use for our keys: suggested on a miss
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lora_target_modules": "target_modules", "use_rslora": "rslora",
    "learning_rate": "lr", "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "lr_scheduler": "schedule", "lr_scheduler_type": "schedule", "warmup_ratio": "warmup", "warmup_steps": "warmup",
    "sequence_len": "max_len", "cutoff_len": "max_len", "max_seq_length": "max_len", "sample_packing": "packing",
    "val_set_size": "validation", "eval_steps": "every", "output_dir": "output", "base_model_name_or_path": "base_model",
    "model": "base_model", "dataset": "data", "datasets": "data", "optimizer": "training", "seed_value": "seed",
    "max_rows": "limit", "max_samples": "limit", "probability": "weight", "epochs_per_dataset": "repeat",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RetentionSet(_Section):
    """A dataset scored before and after training to measure forgetting; `data: builtin:probe` is the built-in
    probe (ftcli/probe.py: the loss of the base model's own answers to general prompts)."""

    data: str
    format: Literal[(AUTO, *SFT_FORMATS)] = Field(AUTO, description="auto: inferred from the rows' fields")
    metric: Metric = "loss"
    name: str | None = None
    instruction: str | None = None
    limit: int | None = Field(200, ge=1, description="rows scored (the first N); null for all")
    sample: int | None = Field(None, description="with limit: a random sample of rows drawn with this seed")
    fields: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _probe_defaults(cls, data):
        """The probe's rows are chat rows the base model answers, its measure is their loss, and it scores every
        prompt unless told otherwise."""
        if isinstance(data, dict) and data.get("data") == probe.PROBE:
            if data.get("format", "chat") != "chat" or data.get("metric", "loss") != "loss":
                raise ValueError(f"{probe.PROBE} is scored by loss on chat rows; leave out format and metric")
            if any(data.get(k) not in (None, {}) for k in ("fields", "instruction", "sample")):
                raise ValueError(f"{probe.PROBE} has its own prompts: fields, instruction and sample do not apply")
            data = {"format": "chat", "limit": None, "name": probe.NAME, **data}
        return data

    @model_validator(mode="after")
    def _metric_fits_format(self) -> "RetentionSet":
        if self.format == AUTO:
            return self  # checked once the rows are read (resolve_formats)
        problem = metric_problem(self.format, self.metric)
        if problem:
            raise ValueError(problem)
        return self


class MixtureEntry(_Section):
    """One dataset of a mixture (data.train as a list): shaped like a retention set, plus how often it is drawn."""

    data: str = Field(description="local .jsonl/.json/.csv/.parquet file, or a hub dataset id")
    name: str | None = Field(None, description="how the report names it; default: the file's stem")
    format: Literal[(AUTO, *FORMATS)] = Field(AUTO, description="auto: inferred from the rows' fields")
    fields: dict[str, str] = Field(default_factory=dict)
    instruction: str | None = None
    split: str = Field("train", description="split to read from a hub dataset")
    weight: float | None = Field(None, gt=0, description="relative probability that a drawn example comes from "
                                 "this dataset (weights are normalised)")
    repeat: float | None = Field(None, gt=0, description="passes over its rows per epoch (0.5: half of them); "
                                 "the default when no entry has a weight: 1")
    limit: int | None = Field(None, ge=1, description="use at most N of its rows (the first N, or a sample)")
    sample: int | None = Field(None, description="with limit: a random sample of rows drawn with this seed")
    validation: Union[float, str, None] = Field(
        None, description="its held-out rows: a fraction, a file, or null; default: data.validation")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        if isinstance(data, str):
            data = {"data": data}
        if isinstance(data, dict) and data.get("data") and not data.get("name"):
            data = {**data, "name": Path(str(data["data"])).stem}
        return data

    @model_validator(mode="after")
    def _weight_or_repeat(self) -> "MixtureEntry":
        if self.weight is not None and self.repeat is not None:
            raise ValueError("give weight (a sampling probability) or repeat (whole passes), not both")
        if isinstance(self.validation, float) and not 0.0 < self.validation < 1.0:
            raise ValueError("a validation fraction must be between 0 and 1 (exclusive), or a file, or null")
        return self


class Data(_Section):
    train: Union[str, list[MixtureEntry]] = Field(
        description="local .jsonl/.json/.csv/.parquet file, a hub dataset id, or a list of datasets to mix")
    format: Literal[(AUTO, *FORMATS)] = Field(
        AUTO, description="auto: inferred from the rows' fields (preference for objective dpo); or the format")
    validation: Union[float, str, None] = Field(
        0.1, description="a fraction of train held out (seeded), a file, or null for none"
    )
    split: str = Field("train", description="split to read from a hub dataset")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="map the format's field names to your columns, e.g. {instruction: question, output: answer}",
    )
    chat_template: str | None = Field(
        None, description="'chatml', a .jinja file, or an inline Jinja template; default: the tokenizer's own"
    )
    system_prompt: str | None = Field(None, description="system message added to alpaca rows")
    instruction: str | None = Field(
        None, description="classification / choice rows: the instruction in the user turn ({labels}: the label set)"
    )
    max_len: int = Field(512, ge=8)
    overlong: Literal["truncate", "drop"] = Field("truncate", description="rows over max_len")
    packing: bool = True
    limit: int | None = Field(None, ge=1, description="use only the first N rows of train")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="a row that cannot train (a missing field, a preference pair that prefers nothing): "
        "refuse it naming the row, or skip it and count it in the report")
    prompt_style: Literal["text", "transcript"] = Field(
        "text", description="preference rows: a string prompt is one user turn as it is (text), or a 'Human: … "
        "Assistant: …' transcript split into turns (transcript; the HH-RLHF shape)")

    @field_validator("validation")
    @classmethod
    def _fraction_in_range(cls, v):
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a validation fraction must be between 0 and 1 (exclusive), or a file, or null")
        return v

    @model_validator(mode="after")
    def _mixture(self) -> "Data":
        """A mixture: names unique, weights on every entry or on none (then repeat, default 1), the data-level
        validation and format as each entry's default."""
        if isinstance(self.train, str):
            return self
        if not self.train:
            raise ValueError("train: an empty list; give a file or at least one dataset")
        if self.limit is not None:
            raise ValueError("limit applies to a single train file; give each dataset of the mixture its own limit")
        names = [e.name for e in self.train]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"train: two datasets are named {dup[0]!r}; give each a name")
        weighted = [e.name for e in self.train if e.weight is not None]
        if weighted and len(weighted) != len(self.train):
            rest = [e.name for e in self.train if e.weight is None]
            raise ValueError(f"train: {', '.join(weighted)} have a weight but {', '.join(rest)} not; weight every "
                             "dataset (sampling) or none (repeat: whole passes)")
        for e in self.train:
            if "validation" not in e.model_fields_set and e.validation != self.validation:
                e.validation = self.validation
            if not weighted and e.repeat is None:
                e.repeat = 1.0
            if e.format == AUTO and self.format != AUTO:
                e.format = self.format
        return self

    @property
    def entries(self) -> list[MixtureEntry]:
        """The datasets of data.train: the mixture's, or the one file as a single entry."""
        if isinstance(self.train, list):
            return self.train
        return [MixtureEntry(data=self.train, name=Path(self.train).stem, format=self.format, fields=self.fields,
                             instruction=self.instruction, split=self.split, repeat=1.0, limit=self.limit,
                             validation=self.validation)]

    @property
    def formats(self) -> list[str]:
        return [e.format for e in self.entries]


class Training(_Section):
    max_steps: int | None = Field(None, ge=1, description="optimiser steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="examples per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = Field(0.03, ge=0, description="a fraction of the steps (< 1) or a number of steps (>= 1)")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm; null for none")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: autocast matmuls to bfloat16; auto: bf16 where the machine has bf16 matrix units "
        "(a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16), else fp32 — resolved when the recipe loads")
    gradient_checkpointing: bool = False
    pass_tokens: int | None = Field(
        None, ge=1, description="positions (rows × length) per forward/backward pass; a micro-batch over it runs in "
        "several passes of whole rows with the same gradient and less memory. null: 512 (at least data.max_len); "
        "2048: ≈ 5% faster bf16 LoRA on a 2-core CPU for ≈ 40% more peak memory (docs/benchmarks.md)")
    compile: bool = Field(False, description="torch.compile each decoder layer's blocks beside attention (norms, "
                          "MLP; dynamic shapes); on a 2-core CPU 3-8% faster steps after 8-15 s of compiling, 2-4 s "
                          "once cached: pays from 100-250 steps, 40 cached (docs/benchmarks.md)")
    router_aux_loss: float | None = Field(
        None, ge=0, description="mixture-of-experts bases: coefficient of the router's load-balancing loss added to "
        "the training loss; null: the model config's router_aux_loss_coef; 0: off")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints; null: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="on several processes (--nproc, torchrun): ddp (each holds the model) or fsdp (FSDP2: "
        "weights, gradients and optimiser state sharded per decoder block); ignored in one process")
    optimizer: OptimizerName = Field(
        "adamw", description="adamw | adafactor (factored, almost no state; lr is relative) | adamw_8bit "
        "(bitsandbytes, 8-bit moments) | lomo (SGD fused into backward: no state, no stored gradients; "
        "grad_accum 1)")
    record_si: bool = Field(False, description="record the Synaptic Intelligence path integral of every trained "
                            "weight into the run folder (importance.safetensors), for a later `strategy: si`")
    keep_zeros: bool = Field(False, description="weights that are exactly zero at the start stay zero (recovery "
                             "training of a model written by `ftcli prune`)")

    @model_validator(mode="after")
    def _optimizer_fits(self) -> "Training":
        if self.optimizer == "lomo":
            if self.grad_accum > 1:
                raise ValueError("optimizer lomo applies each micro-batch's update inside its backward pass, so "
                                 "gradients cannot be accumulated: set grad_accum: 1 and a larger batch_size")
            if self.record_si:
                raise ValueError("record_si needs each step's gradient beside its update; optimizer lomo never "
                                 "keeps a gradient: use adamw, adafactor or adamw_8bit")
        return self


class Eval(_Section):
    every: int | None = Field(None, ge=1, description="steps between validation passes; null: before and after only")
    metrics: list[Metric] = Field(["loss", "perplexity"], description="default: loss and perplexity ([loss] for "
                                  "preference rows)")
    max_new_tokens: int = Field(64, ge=1)
    limit: int | None = Field(200, ge=1, description="validation rows used for generation metrics")
    retention: list[RetentionSet] = Field(
        default_factory=lambda: [RetentionSet(data=probe.PROBE)],
        description=f"sets scored before and after training; default: the built-in probe ({probe.PROBE}); [] for "
                    "none")

    @field_validator("retention", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        if isinstance(v, (str, dict)):
            v = [v]
        return [{"data": x} if isinstance(x, str) else x for x in v]


class Recipe(_Section):
    base_model: str = DEFAULT_BASE_MODEL
    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm", description="causal_lm: the model's own next-token head; classification: a new head over the "
        "last hidden state, one output per label of the data (objective classify)")
    trust_remote_code: bool = False
    strategy: StrategyParams = Field(default_factory=LoraParams)
    objective: ObjectiveSettings = Field(default_factory=SftParams)
    data: Data
    training: Training = Field(default_factory=Training)
    eval: Eval = Field(default_factory=Eval)
    report_to: list[Tracker] = Field(default_factory=list, description="also log metrics.jsonl's numbers to "
                                     "these trackers, offline, inside the run folder: tensorboard, mlflow")
    output: str | None = Field(None, description="run folder; default runs/<recipe name>")

    # where the recipe came from and the --set overrides applied to it (not YAML keys)
    source: Path | None = Field(None, exclude=True)
    overrides: tuple[str, ...] = Field((), exclude=True)
    _precision_why: str | None = PrivateAttr(None)  # why training.precision is what it is (auto resolved)
    _inferred: dict = PrivateAttr(default_factory=dict)  # key → what format: auto found there (resolve_formats)

    @property
    def precision_why(self) -> str:
        return self._precision_why or "as the recipe asks"

    @model_validator(mode="before")
    @classmethod
    def _objective_of_the_task(cls, raw):
        """A recipe that names a task but no objective trains the task's objective (classification: classify)."""
        if isinstance(raw, dict) and "objective" not in raw and raw.get("task") == "classification":
            raw = {**raw, "objective": {"name": objectives.default_for(raw["task"]).name}}
        return raw

    @model_validator(mode="after")
    def _formats_and_metrics_agree(self) -> "Recipe":
        """The objective takes the data's format, and the format can be scored with every eval metric: checked
        here once, so `ftcli check` refuses what `train` would (unset format and metrics follow the objective)."""
        objective = objectives.of(self.objective)
        if objective.task != self.task:
            raise ValueError(f"objective {self.objective.name} trains task {objective.task}, but the recipe's task is "
                             f"{self.task}; with task: {self.task} use objective "
                             f"{objectives.default_for(self.task).name}")
        accepted = objective.formats
        if self.data.format == AUTO and len(accepted) == 1:  # dpo, classify: one row shape, nothing to infer
            self.data.format = accepted[0]
            for e in self.data.entries if isinstance(self.data.train, list) else []:
                if e.format == AUTO:
                    e.format = accepted[0]
        self.check_formats()
        return self

    def check_formats(self) -> None:
        """ValueError when a dataset's format is not the objective's or cannot be scored with an eval metric;
        nothing to check while a format is still auto (resolve_formats reads the rows first)."""
        formats = self.data.formats
        if AUTO in formats:
            return
        mixture = isinstance(self.data.train, list)
        objective = objectives.of(self.objective)
        accepted = objective.formats
        for e in self.data.entries:
            if e.format not in accepted:
                where = f"data.train ({e.name})" if mixture else "data.format"
                raise ValueError(f"{where}: {e.format!r}, but objective {self.objective.name} trains on "
                                 f"{' or '.join(accepted)} rows")
        own = objective.eval_metrics  # an objective that scores its own way (a classification head)
        if own is not None:
            if "metrics" not in self.eval.model_fields_set:
                self.eval.metrics = list(own)
            other = [m for m in self.eval.metrics if m not in own]
            if other:
                raise ValueError(f"eval.metrics: {', '.join(other)} cannot score objective {self.objective.name} "
                                 f"(task {self.task}); it is scored by {', '.join(own)}")
        # a metric scores the validation rows of every dataset whose format allows it (a mixture: at least one)
        if "metrics" not in self.eval.model_fields_set:
            self.eval.metrics = [m for m in self.eval.metrics if not all(metric_problem(f, m) for f in formats)]
        for m in self.eval.metrics:
            if all(metric_problem(f, m) for f in formats):
                raise ValueError(f"eval.metrics: {metric_problem(formats[0], m)}"
                                 + (" (no dataset of the mixture has such rows)" if mixture else ""))
        for i, r in enumerate(self.eval.retention):
            if r.format != AUTO and metric_problem(r.format, r.metric):
                raise ValueError(f"eval.retention[{i}]: {metric_problem(r.format, r.metric)}")

    @property
    def inferred(self) -> dict:
        return self._inferred

    @model_validator(mode="after")
    def _resolve_precision(self) -> "Recipe":
        from ftcli.runtime import resolve_precision

        if self._precision_why is None:
            self.training.precision, self._precision_why = resolve_precision(self.training.precision)
        return self

    def pass_positions(self) -> int:
        """Most positions (rows × length) one forward/backward pass computes; a row longer than that is one pass.
        Under lomo a micro-batch is one pass (its update happens inside the backward)."""
        if self.training.optimizer == "lomo":
            return self.training.batch_size * self.data.max_len
        return max(self.training.pass_tokens or PASS_TOKENS, self.data.max_len)

    def global_batch(self, processes: int = 1) -> int:
        """Examples per optimiser step: batch_size × grad_accum × processes."""
        return self.training.batch_size * self.training.grad_accum * processes

    def total_steps(self, n_train: int, processes: int = 1) -> tuple[int, int]:
        """(optimiser steps in the run, steps per epoch) for `n_train` training rows on `processes` processes."""
        t = self.training
        per_epoch = math.ceil(n_train / self.global_batch(processes))
        steps = t.max_steps if t.max_steps else max(1, math.floor(per_epoch * t.epochs))
        return steps, per_epoch

    def warmup_steps(self, steps: int) -> int:
        w = self.training.warmup
        return int(round(w * steps)) if w < 1 else int(w)

    def to_yaml(self, extra: dict | None = None) -> str:
        doc = self.model_dump(mode="json", exclude={"source"}, by_alias=True)
        if extra:
            doc.update(extra)
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------------------
# loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides, validate, resolve relative paths."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path}: a folder, not a recipe file (give the .yaml file)")
    if not path.is_file():
        raise UserError(f"recipe {path}: no such file")
    from ftcli.data.sources import read_text

    text = read_text(path, what="recipe", hint="save it as UTF-8 YAML")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    recipe = validate(raw, where=str(path))
    recipe.source = path.resolve()
    recipe.overrides = tuple(overrides)
    resolve_paths(recipe, path.resolve().parent)
    resolve_formats(recipe)
    return recipe


def resolve_formats(recipe: Recipe) -> None:
    """Every `format: auto` (data, each dataset of a mixture, retention sets) replaced by the format the rows'
    fields fit (data.formats.infer_format), recorded in `recipe.inferred`, and the formats checked again. Reads
    the rows, so errors name the file and the row."""
    from ftcli.data import infer_source_format
    from ftcli.probe import PROBE

    def missing(source: str) -> bool:  # a local file not there (yet): inferred when the data is built
        return source.endswith(DATA_SUFFIXES) and not Path(source).is_file()

    d = recipe.data
    if any(missing(e.data) for e in d.entries if e.format == AUTO):
        return
    for i, e in enumerate(d.entries):
        if e.format == AUTO:
            key = f"data.train[{i}] ({e.name})" if isinstance(d.train, list) else "data.format"
            fmt, seen = infer_source_format(e.data, e.fields, split=e.split, where=key)
            recipe.inferred[key] = f"{fmt} (fields {', '.join(seen)})"
            if isinstance(d.train, list):
                e.format = fmt
            else:
                d.format = fmt
    if isinstance(d.train, list) and d.format == AUTO:
        formats = list(dict.fromkeys(d.formats))  # the data's format: what the mixture shares, else a chat one
        d.format = formats[0] if len(formats) == 1 else next(f for f in formats + ["chat"] if f != "completion")
    for i, r in enumerate(recipe.eval.retention):
        if r.format == AUTO and r.data != PROBE and not missing(r.data):
            key = f"eval.retention[{i}]"
            fmt, seen = infer_source_format(r.data, r.fields, where=key)
            recipe.inferred[key] = f"{fmt} (fields {', '.join(seen)})"
            problem = metric_problem(fmt, r.metric)
            if problem:
                raise UserError(f"{key}: {r.data}: format auto → {fmt}, and {problem}")
            r.format = fmt
    try:
        recipe.check_formats()
    except ValueError as e:
        raise UserError(f"{recipe.source or 'recipe'}: {e}") from None


def validate(raw: dict, where: str = "recipe") -> Recipe:
    for key in NOT_KEYS:  # fields of the object, not keys a recipe may set
        if key in raw:
            allowed = ", ".join(k for k in Recipe.model_fields if k not in NOT_KEYS)
            raise UserError(f"{where}: 1 problem\n  {key}: unknown key. Allowed here: {allowed}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_errors(e, raw, where)) from None


def apply_override(raw: dict, item: str) -> None:
    """`training.lr=1e-4` → raw['training']['lr'] = 1e-4 (the value parsed as YAML)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected dotted.key=value")
    key, _, text = item.partition("=")
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def resolve_paths(recipe: Recipe, base: Path) -> None:
    """Relative data paths resolve against the recipe's folder (hub ids are left alone)."""

    def fix(value: str) -> str:
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        candidate = base / p
        if candidate.exists() or value.endswith(DATA_SUFFIXES) or value.endswith(".jinja") or value.startswith("."):
            return str(candidate.resolve())
        return value

    if isinstance(recipe.data.train, str):
        recipe.data.train = fix(recipe.data.train)
    for e in recipe.data.train if isinstance(recipe.data.train, list) else []:
        e.data = fix(e.data)
        if isinstance(e.validation, str):
            e.validation = fix(e.validation)
    if isinstance(recipe.data.validation, str):
        recipe.data.validation = fix(recipe.data.validation)
    if recipe.data.chat_template and recipe.data.chat_template.endswith(".jinja"):
        recipe.data.chat_template = fix(recipe.data.chat_template)
    for r in recipe.eval.retention:
        if r.data != probe.PROBE:
            r.data = fix(r.data)

    def fix_model(spec: str) -> str:  # a local folder (or run) beside the recipe; aliases and hub ids unchanged
        p = Path(spec).expanduser()
        if p.is_absolute():
            return str(p)
        return str((base / p).resolve()) if spec.startswith(".") or (base / p).is_dir() else spec

    recipe.base_model = fix_model(recipe.base_model)
    recipe.objective.resolve_paths(fix_model)
    recipe.strategy.resolve_paths(fix_model)


def default_output(recipe: Recipe) -> Path:
    if recipe.output:
        return Path(recipe.output).expanduser()
    stem = recipe.source.stem if recipe.source else "run"
    return Path("runs") / stem


# ------------------------------------------------------------------------------------------------------------
# error messages


def format_errors(e: ValidationError, raw: dict, where: str) -> str:
    """One readable message for all validation errors: key path, what is wrong, what is allowed."""
    lines: dict[str, list[str]] = {}
    for err in e.errors():
        path, model = _clean_path(err["loc"], raw)
        key = ".".join(str(p) for p in path) or "(top level)"
        text = _describe(err, path, model)
        named = _NAMED.match(text) if not path else None
        if named:  # a rule across sections (Recipe's validators) names its own key first
            key, text = named.group(1), named.group(2)
        lines.setdefault(key, []).append(text)
    out = [f"{where}: {len(lines)} problem{'s' if len(lines) != 1 else ''}"]
    for key, msgs in lines.items():
        unique = list(dict.fromkeys(msgs))
        types = [m for m in unique if m.startswith("expected ")]
        if len(types) > 1:  # a value that may take several types: one line naming them all
            got = types[0].rpartition(", got ")[2]
            words = [m.removeprefix("expected ").rpartition(", got ")[0] for m in types]
            rest = [m for m in unique if m not in types]
            unique = rest + [f"expected {' or '.join(dict.fromkeys(words))}, got {got}"]
        msg = "; ".join(unique)
        out.append(f"  {key}: {msg}")
    return "\n".join(out)


_NAMED = re.compile(r"^([a-z_]+(?:\.[a-z_0-9\[\]]+)+): (.*)$", re.S)


def _describe(err: dict, path: list, model: type[BaseModel] | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(path[-1])
        allowed = sorted(model.model_fields) if model else []
        allowed = [a for a in allowed if a not in NOT_KEYS]
        msg = "unknown key"
        ours = SYNONYMS.get(name, name)  # our name for it, when another tool's name was used
        home = _where_key_belongs(ours, path[:-1])
        close = [ours] if ours in allowed and ours != name else difflib.get_close_matches(name, allowed, n=1,
                                                                                        cutoff=0.6)
        if close:
            msg += f"; did you mean '{close[0]}'?"
        elif home:  # the key (or ours for it) lives in another section: the full path to write
            msg += f"; did you mean '{ours if home == 'the top level' else f'{home}.{ours}'}'?"
        if home:
            msg += f" ('{ours}' belongs under '{home}')"
        if allowed:
            msg += f"{'' if msg.endswith(('?', ')')) else '.'} Allowed here: {', '.join(allowed)}"
        return msg
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        tag, expected = err["ctx"]["tag"], err["ctx"].get("expected_tags", "")
        what, registry = _registry_at(path)
        if tag in registry:  # a real strategy where only some are allowed (ewc's inner)
            return f"'{tag}' cannot be used here; allowed: {expected}"
        return f"unknown {what} '{tag}'; choose one of: {', '.join(registry)}"
    if kind == "union_tag_not_found":
        return f"needs a 'name:' (one of: {', '.join(_registry_at(path)[1])})"
    if kind == "literal_error":
        return f"got {err['input']!r}; allowed: {err['ctx']['expected']}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"expected {_type_word(kind)}, got {err['input']!r}"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    return f"{msg} (got {err['input']!r})" if not isinstance(err.get("input"), dict) else msg


def _registry_at(path: list) -> tuple[str, dict]:
    """The registry of the named section at `path`: objectives under `objective`, else strategies."""
    if path and str(path[0]) == "objective":
        return "objective", objectives.REGISTRY
    return "strategy", strategies.REGISTRY


def _type_word(kind: str) -> str:
    base = kind.split("_")[0]
    return {
        "int": "an integer",
        "float": "a number",
        "string": "a string",
        "bool": "true or false",
        "list": "a list",
        "dict": "a mapping",
        "model": "a mapping",
        "tuple": "a list",
        "none": "null",
    }.get(base, base)


def _clean_path(loc: tuple, raw: dict) -> tuple[list, type[BaseModel] | None]:
    """Map pydantic's loc (with union tags and member names) to the user's key path, and the model at its end."""
    model: Any = Recipe
    path: list = []
    for part in loc:
        inner = _unwrap(model)
        if isinstance(part, int):
            path[-1] = f"{path[-1]}[{part}]" if path else part
            model = _unwrap(inner, item=True)
            continue
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            if part in inner.model_fields:
                path.append(part)
                model = inner.model_fields[part].annotation
                continue
            registry = _registry_at(path)[1]
            if part in registry and path and path[-1] in ("strategy", "objective"):
                model = registry[part][0]
                continue
            if part == "inner" or part not in _type_names():
                path.append(part)  # an unknown key: its parent model is `inner`
                return path, inner
        registry = _registry_at(path)[1]
        if part in registry:
            model = registry[part][0]
            continue
        # a union member label such as 'float' or 'list[str]': not part of the user's path
    end = _unwrap(model)
    return path, end if isinstance(end, type) and issubclass(end, BaseModel) else _parent_model(path)


def _parent_model(path: list) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in path[:-1]:
        inner = _unwrap(model)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and part in inner.model_fields:
            model = inner.model_fields[part].annotation
        else:
            return None
    inner = _unwrap(model)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _type_names() -> set[str]:
    return {"float", "int", "str", "bool", "list[str]", "none", "dict[str,str]", "tuple[float, float]"}


def _unwrap(annotation: Any, item: bool = False) -> Any:
    """Strip Optional/Annotated; for item=True return the element type of a list."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0], item)
    if origin is Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if len(members) == 1:
            return _unwrap(members[0], item)
        if models and not item:
            return models[0] if len(models) == 1 else annotation
        if item:
            for m in members:
                if typing.get_origin(m) is list:
                    return _unwrap(m, item)
        return annotation
    if item and origin is list:
        return typing.get_args(annotation)[0]
    return annotation


def _where_key_belongs(name: str, parent: list) -> str | None:
    """If `name` is a key of another section, return that section's path (e.g. 'training')."""
    sections = {"": Recipe, "data": Data, "training": Training, "eval": Eval}
    for section, registry in (("strategy", strategies.REGISTRY), ("objective", objectives.REGISTRY)):
        for _, (params, _cls) in registry.items():
            if name in params.model_fields and name != "name":
                sections.setdefault(section, params)
    here = ".".join(str(p) for p in parent)
    for section, model in sections.items():
        if section != here and name in model.model_fields and name not in NOT_KEYS:
            return section or "the top level"
    return None
