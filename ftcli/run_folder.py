"""A run folder, read back through one typed object: train/resume, eval, export and merge all go through it.

`RunFolder(path)` gives the run's recipe re-validated as a `Recipe` (the versions block set aside), the strategy
it names, which artifact it wrote (`adapter/` in PEFT layout or `model/`, a transformers folder), its checkpoints,
and the trained model loaded the way it was trained (the strategy says how its base loads). Creating the folder
for a new run, and the checks before a `--resume`, live here too.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ftcli import atomic
from ftcli.errors import UserError

RECIPE_FILE = "recipe.resolved.yaml"
ARTIFACTS = ("adapter", "model")  # the folders a finished run writes its artifact to
# recipe keys that may differ between a run and its --resume (they change how long, not what, is trained)
RESUMABLE_CHANGES = {"training.max_steps", "training.epochs", "eval.every", "training.checkpoint_every",
                     "training.keep_checkpoints", "training.log_every", "training.pass_tokens", "output"}


class RunFolder:
    def __init__(self, path):
        self.path = Path(path).expanduser()

    @staticmethod
    def holds_run(path) -> bool:
        """Is `path` a run folder (a resolved recipe, or a written artifact)?"""
        p = Path(path).expanduser()
        return p.is_dir() and ((p / RECIPE_FILE).is_file() or any(_written(p / a) for a in ARTIFACTS))

    # -- what the run is -----------------------------------------------------------------------------------------
    @cached_property
    def saved(self) -> dict:
        """The resolved recipe as written, with its `versions` block (empty when the file is missing)."""
        import yaml

        f = self.path / RECIPE_FILE
        if not f.is_file():
            return {}
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{f}: not valid YAML ({e})") from None
        if not isinstance(doc, dict):
            raise UserError(f"{f}: not a recipe (a mapping of keys)")
        return doc

    @cached_property
    def recipe(self):
        """The run's recipe, validated again (paths in it are already absolute)."""
        from ftcli.recipe import validate

        if not self.saved:
            raise UserError(f"{self.path}: no {RECIPE_FILE}; is this a run folder?")
        doc = {k: v for k, v in self.saved.items() if k != "versions"}
        return validate(doc, where=str(self.path / RECIPE_FILE))

    @property
    def versions(self) -> dict:
        return self.saved.get("versions") or {}

    @cached_property
    def strategy(self):
        from ftcli import strategies

        return strategies.get(self.recipe.strategy)

    @property
    def kind(self) -> str | None:
        """'adapter' or 'model': the artifact the run wrote; None before it finished."""
        for name in ARTIFACTS:
            if _written(self.path / name):
                return name
        return None

    @property
    def artifact(self) -> Path | None:
        return self.path / self.kind if self.kind else None

    def require_artifact(self) -> Path:
        if self.artifact is None:
            raise UserError(f"{self.path}: not a finished run folder (no adapter/ or model/ inside)")
        return self.artifact

    @property
    def checkpoints(self) -> list[int]:
        from ftcli import checkpoint

        return checkpoint.list_steps(self.path)

    @property
    def chat_template(self) -> str | None:
        return self.recipe.data.chat_template if self.saved else None

    @property
    def base_model(self) -> str:
        """The model the run trained on: its recipe's base_model, else the adapter's own record of it."""
        if self.saved:
            return self.recipe.base_model
        from ftcli.models import adapter_base

        return adapter_base(self.require_artifact())

    # -- loading the trained model ------------------------------------------------------------------------------
    def load(self, *, allow_pickle: bool = False, for_export: bool = False, log=print):
        """(model, tokenizer) as trained: the base loaded as the strategy loads it, plus the adapter (unmerged,
        PEFT), or the trained model folder. `for_export`: the base an adapter is folded into."""
        from ftcli import models

        artifact = self.require_artifact()
        if self.kind == "model":
            return (models.load_model(str(artifact), allow_pickle=allow_pickle, log=log),
                    models.load_tokenizer(str(artifact), log=log))
        loading = self.strategy.base_loading(for_export=for_export) if self.saved else {}
        return models.load_adapter(artifact, self.base_model, allow_pickle=allow_pickle, log=log, **loading)

    def load_merged(self, *, allow_pickle: bool = False, log=print):
        """(model, tokenizer) with an adapter folded into its float32 base: the run's model as one plain
        transformers model (a starting point for another run, a reference, a teacher). A 4-bit base is folded
        de-quantised (the weights it computed with), never into 4-bit weights."""
        import torch

        if self.saved and self.kind == "adapter" and self.strategy.unfoldable():
            raise UserError(f"{self.path}: {self.strategy.unfoldable()}")
        model, tokenizer = self.load(allow_pickle=allow_pickle, for_export=True, log=log)
        if self.kind == "adapter":
            if any(hasattr(p, "quant_state") for p in model.parameters()):
                from peft import PeftModel

                from ftcli import models

                base = models.load_model(self.base_model, allow_pickle=allow_pickle, log=log,
                                         **self.strategy.base_loading(for_export=True)).dequantize(dtype=torch.float32)
                model = PeftModel.from_pretrained(base, str(self.artifact))
            model = model.merge_and_unload()
        return model, tokenizer

    # -- a run being written ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, *, resume: bool, overwrite: bool) -> "RunFolder":
        """The folder for a run: an existing one is used only with --resume and replaced only with --overwrite.
        Until `keep()` (the run has started), `abandon()` undoes this: a new folder is removed, a replaced run put
        back, so bad input found while building leaves nothing behind."""
        path = Path(path)
        replaced, existed = None, path.is_dir()
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other: choose one")
        if path.exists() and not path.is_dir():
            raise UserError(f"run folder {path} is a file; give --output a folder")
        if path.is_dir() and all(atomic.is_temporary(p.name) for p in path.iterdir()):
            atomic.remove_leftovers(path)  # all a run killed at its very start left: it does not count
        if path.exists() and any(path.iterdir()):
            if overwrite:  # moved aside until the new run has started (keep), put back if it never does
                import shutil

                replaced = atomic.old_name(path)
                shutil.rmtree(replaced, ignore_errors=True)
                path.rename(replaced)
                existed = False
            elif not resume:
                folder = cls(path)
                if (path / RECIPE_FILE).is_file() and folder.kind is None and not folder.checkpoints:
                    raise UserError(f"run folder {path} already exists and holds no checkpoint: the run stopped "
                                    "before its first. --resume starts it again from step 0 (same recipe); "
                                    "--overwrite replaces it, or --output writes elsewhere.")
                raise UserError(f"run folder {path} already exists. Use --resume to continue it, --overwrite to "
                                "replace it, or --output to write elsewhere.")
        elif resume:
            raise UserError(f"--resume: run folder {path} does not exist (nothing to resume)")
        top = path  # the outermost folder this call creates (parents included), removed by abandon()
        while not top.parent.exists():
            top = top.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run folder {path}: cannot be created ({e.strerror})") from None
        folder = cls(path)
        folder._undo = None if resume else (existed, top, replaced)
        return folder

    _undo: tuple | None = None  # (the folder existed empty, what was created, the run moved aside) until keep()

    def keep(self) -> None:
        """The run has started: a run it replaced (--overwrite) is removed for good."""
        if self._undo and self._undo[2] is not None:
            import shutil

            shutil.rmtree(self._undo[2], ignore_errors=True)
        self._undo = None

    def abandon(self) -> None:
        """The run never started (bad input found while building): remove what it wrote, put back what it
        replaced. A resumed run folder is left as it was."""
        if self._undo is None:
            return
        import shutil

        existed, top, replaced = self._undo
        shutil.rmtree(self.path if existed else top, ignore_errors=True)
        if existed:
            self.path.mkdir()
        if replaced is not None:
            replaced.rename(self.path)
        self._undo = None

    def write_recipe(self, recipe) -> None:
        from ftcli import atomic
        from ftcli.report import versions

        atomic.write_text(self.path / RECIPE_FILE, recipe.to_yaml(extra={"versions": versions()}))
        self.__dict__.pop("saved", None)
        self.__dict__.pop("recipe", None)

    def resume_check(self, recipe) -> str | None:
        """Refuse a --resume of a different recipe; returns a note when the run's length changed (the schedule is
        laid out again). A run folder without a checkpoint (a run stopped before its first) starts from step 0."""
        if not self.saved:
            raise UserError(f"--resume: {self.path} holds no {RECIPE_FILE}; it is not a run folder (use --output "
                            "to name the run folder, or --overwrite to replace this one)")
        conflicts = self.resume_conflicts(recipe)
        if conflicts:
            raise UserError(f"--resume: the recipe differs from the run's in {', '.join(conflicts)}; "
                            "resume with the same recipe (only lengths, eval and checkpoint cadence may change)")
        return self.schedule_change_note(recipe)

    def resume_conflicts(self, recipe) -> list[str]:
        """Recipe keys that differ from the run being resumed (other than how long it runs)."""
        dump = dict(mode="json", exclude={"source"}, by_alias=True)  # as written (ewc's `lambda`)
        # both sides through the schema, so a key added since the run was written compares as its default
        a, b = flat_keys(self.recipe.model_dump(**dump)), flat_keys(recipe.model_dump(**dump))
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)

    def schedule_change_note(self, recipe) -> str | None:
        """A resumed run whose length changed keeps its steps so far, but a warm-up or decaying schedule is laid out
        again over the new length: say so, since the result then differs from a run planned that long from the
        start."""
        saved = self.saved.get("training") or {}
        t = recipe.training
        if (saved.get("max_steps"), saved.get("epochs")) == (t.max_steps, t.epochs):
            return None
        if t.schedule == "constant" and (not t.warmup or t.warmup >= 1):  # warm-up in steps: unchanged
            return None
        return (f"the run's length changed (training.max_steps {saved.get('max_steps')} → {t.max_steps}, "
                f"training.epochs {saved.get('epochs')} → {t.epochs}); the {t.schedule} schedule with warm-up "
                f"{t.warmup} is laid out again over the new length, so the steps already taken followed the old one "
                "and the run differs from one planned at the new length from the start")


def _written(artifact: Path) -> bool:
    """An artifact folder is written once the file that marks it is: a model's config.json, an adapter's config."""
    from ftcli.models import adapter_config

    return (artifact / "config.json").is_file() if artifact.name == "model" else adapter_config(artifact) is not None


def flat_keys(d: dict, prefix: str = "") -> dict:
    """{'training': {'lr': 1}} → {'training.lr': 1} (a `fields` mapping stays one value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "fields":
            out.update(flat_keys(v, key + "."))
        else:
            out[key] = v
    return out
