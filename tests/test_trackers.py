"""report_to: TensorBoard's event files and MLflow's store in the run folder hold metrics.jsonl's numbers, at its
steps; no network connection is attempted; a missing package is refused before training."""

import json
import socket

import pytest

from conftest import addition_rows, make_recipe, write_jsonl


def test_trackers_hold_the_numbers_of_metrics_jsonl_and_never_touch_the_network(tmp_path, tiny_model_dir, run_cli,
                                                                                 monkeypatch):
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family != socket.AF_UNIX:
            attempts.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or [])
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(48))
    path = make_recipe(tmp_path, tiny_model_dir, data, report_to=["tensorboard", "mlflow"],
                       training={"max_steps": 6}, eval={"every": 3, "metrics": ["loss", "perplexity"]})
    code, out, err = run_cli("train", path)
    assert code == 0, err
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for r in records:
        for k, v in r.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(f"{r['kind']}/{k}", {})[r["step"]] = float(v)
    assert {"train/loss", "train/lr", "eval/val_loss", "eval/val_perplexity"} <= set(expected)
    assert sorted(expected["eval/val_loss"]) == [0, 3, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag  # event files hold float32

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    mlrun = client.get_run((run / "mlflow" / "run_id").read_text())
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["training.max_steps"] == "6"
    for tag, by_step in expected.items():
        got = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, tag)}
        assert got == by_step, tag
    assert attempts == []


def test_a_missing_tracker_package_is_refused_before_training(tmp_path, tiny_model_dir, run_cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(8))
    path = make_recipe(tmp_path, tiny_model_dir, data, report_to=["mlflow"])
    code, out, err = run_cli("train", path)
    assert code == 2 and "report_to: mlflow needs" in err and "ftcli[trackers]" in err
    assert not (tmp_path / "run" / "model").exists()
    code, out, err = run_cli("check", path, "--set", "report_to=[wandb]")
    assert code == 2 and "tensorboard" in err and "mlflow" in err
