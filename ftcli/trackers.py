"""Trackers (`report_to: [tensorboard, mlflow]`): every record written to metrics.jsonl also goes, unchanged, to
each tracker, offline, inside the run folder. No tracker makes a network call:

- `tensorboard`: event files in RUN/tensorboard (torch.utils.tensorboard; `tensorboard --logdir RUN/tensorboard`).
  On --resume the events after the checkpoint are purged, as metrics.jsonl's lines are.
- `mlflow`: a SQLite store at RUN/mlflow/mlflow.db, artifacts in RUN/mlflow/artifacts (MLflow's file store raises
  since 3.13 unless opted in and is in maintenance mode; SQLite is the store it recommends). Experiment `ftcli`,
  one MLflow run per ftcli run (resumed into the same one; MLflow cannot delete values, so steps redone after a
  resume appear twice in its history, the later one being metrics.jsonl's). The recipe goes in as parameters.
  MLflow's anonymous usage telemetry (on by default since 3.2) is switched off unless the environment already says
  otherwise (MLFLOW_DISABLE_TELEMETRY). View it with `mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db`.

A key's tag is `KIND/KEY`: `train/loss`, `train/lr`, `eval/val_loss`, ... with the record's `step`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

from ftcli.errors import UserError

PACKAGES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
INSTALL = "pip install 'ftcli[trackers]'"


def check(recipe) -> None:
    """Refuse a tracker whose package is missing, before any weight loads."""
    for name in recipe.report_to:
        missing = [m for m in PACKAGES[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"report_to: {name} needs the package(s) {', '.join(missing)}, not installed here: "
                            f"{INSTALL}")


def open_all(recipe, run_dir: Path) -> list:
    check(recipe)
    return [{"tensorboard": TensorBoard, "mlflow": MLflow}[name](Path(run_dir), recipe) for name in recipe.report_to]


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers as tracker tags (the record's kind and step are where they go, not values)."""
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, run_dir: Path, recipe):
        self.folder = run_dir / "tensorboard"
        self.purge_step: int | None = None
        self._writer = None

    def truncate_after(self, step: int) -> None:
        self.purge_step = step + 1

    def log(self, record: dict) -> None:
        if self._writer is None:  # opened on the first record, so a resume's purge step is known
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.folder), purge_step=self.purge_step)
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=record.get("step", 0))
        self._writer.flush()

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()


class MLflow:
    def __init__(self, run_dir: Path, recipe):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.folder = run_dir / "mlflow"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{(self.folder / 'mlflow.db').resolve()}")
        experiment = self.client.get_experiment_by_name("ftcli")
        experiment_id = (experiment.experiment_id if experiment else self.client.create_experiment(
            "ftcli", artifact_location=(self.folder / "artifacts").resolve().as_uri()))
        id_file = self.folder / "run_id"
        if id_file.is_file():  # --resume: the same MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            id_file.write_text(self.run_id)
            self._log_params(recipe)

    def _log_params(self, recipe) -> None:
        from mlflow.entities import Param

        from ftcli.run_folder import flat_keys

        flat = flat_keys(recipe.model_dump(mode="json", exclude={"source"}, by_alias=True))
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def truncate_after(self, step: int) -> None:
        pass  # MLflow keeps every value it was given (see the module's note)

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, int(record.get("step", 0)))
                   for tag, value in scalars(record).items() if math.isfinite(value)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "finished" else
                                   "KILLED" if status == "interrupted" else "FAILED")
