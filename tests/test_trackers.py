"""logging.report_to: the trackers people follow runs in, through accelerate, offline. wandb, trackio and mlflow
(mlflow-skinny with its sqlite store's sqlalchemy + alembic) come with the dev extra, so each one's offline run is
checked here: the resolved config and the metrics reach its local store. A tracker that is not installed, or an
unknown name, stops before any work with one line."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import load_stage, sft_overrides, sft_run_configs

from rlhf.cli import main
from rlhf.config import ConfigError
from rlhf.runtime import accelerator as runtime
from rlhf.runtime import tracking
from rlhf.stages import sft


def test_an_offline_wandb_run_gets_the_config_and_the_metrics(tiny_world, tiny_base, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb comes with the dev extra (pip install -e .[dev])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    made, logged = [], []
    real = tracking.external_tracker

    def spy(name, output_dir, config=None):  # the tracker rlhf builds, recording what it is sent on the way through
        tracker = real(name, output_dir, config)
        send = tracker.log
        tracker.log = lambda values, step=None, **kw: (logged.append((step, dict(values))), send(values, step, **kw))
        made.append(tracker)
        return tracker

    monkeypatch.setattr(tracking, "external_tracker", spy)
    out = tmp_path / "sft"
    overrides = sft_overrides(tiny_world, out, tiny_base, train__max_steps=4, logging__every=2, train__eval_every=4)
    sft.train(load_stage("sft", "sft.yaml", overrides | {"logging.report_to": ["wandb"]}))
    (tracker,) = made
    config = dict(tracker.run.config)
    assert config["optim.lr"] == 1e-3 and config["data.train.path"].endswith("sft.jsonl")  # the resolved config
    assert [step for step, values in logged if "train/loss" in values] == [2, 4]
    assert any("eval/loss" in values for step, values in logged if step == 4)  # the final evaluation too
    (run,) = (out / "wandb").glob("offline-run-*")  # written locally, nothing sent
    assert next(run.glob("run-*.wandb")).stat().st_size > 0


def test_a_tracker_that_is_not_installed_stops_before_any_work(tiny_world, tiny_base, tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name)
    )
    with pytest.raises(ConfigError, match=r"logging.report_to: mlflow is not installed; pip install 'rlhf\[track\]'"):
        runtime.make_accelerator("no", tmp_path, tensorboard=False, cpu=True, report_to=["mlflow"])
    rc = main(["sft", "--config", "configs/tiny/sft.yaml", "--set", "logging.report_to=[comet]", "--dry-run"])
    assert rc == 2 and "unknown tracker(s) ['comet']" in capsys.readouterr().err


def test_an_offline_mlflow_run_gets_the_config_and_the_metrics(tiny_world, tiny_base, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny comes with the dev extra (pip install -e .[dev])")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "sft"
    overrides = sft_overrides(tiny_world, out, tiny_base, train__max_steps=4, logging__every=2, train__eval_every=4)
    sft.train(load_stage("sft", "sft.yaml", overrides | {"logging.report_to": ["mlflow"]}))
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
    assert run.info.run_name == "sft" and run.info.status == "FINISHED"
    assert float(run.data.params["optim.lr"]) == 1e-3 and run.data.params["data.train.path"].endswith("sft.jsonl")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [4]


def test_an_mlflow_store_it_cannot_open_stops_before_any_work(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny comes with the dev extra (pip install -e .[dev])")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    real = tracking.importlib.util.find_spec
    skinny = lambda name, *a: None if name == "sqlalchemy" else real(name)  # noqa: E731
    monkeypatch.setattr(tracking.importlib.util, "find_spec", skinny)
    with pytest.raises(ConfigError, match=r"needs sqlalchemy and alembic \(mlflow-skinny lacks them\); pip install"):
        runtime.make_accelerator("no", tmp_path, tensorboard=False, cpu=True, report_to=["mlflow"])
    assert not (tmp_path / "mlflow.db").exists()


def test_an_offline_trackio_run_gets_the_config_and_the_metrics(tiny_world, tiny_base, tmp_path):
    """Through the CLI in a fresh process: trackio fixes its store (TRACKIO_DIR) when first imported."""
    pytest.importorskip("trackio", reason="trackio comes with the dev extra (pip install -e .[dev])")
    (config,) = sft_run_configs(tiny_world, tiny_base, tmp_path, ("sft",), steps=4).values()
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"))
    args = ["sft", "--config", str(config), "--set", "logging.report_to=[trackio]", "--set", "logging.every=2"]
    done = subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    # trackio's local store is one sqlite file per project: a configs row and a metrics row per logged step
    with sqlite3.connect(tmp_path / "trackio" / "rlhf.db") as db:
        ((run_name, stored),) = db.execute("SELECT run_name, config FROM configs").fetchall()
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = 'sft' ORDER BY id").fetchall()
    stored = json.loads(stored)
    assert run_name == "sft" and stored["optim.lr"] == 1e-3 and stored["data.train.path"].endswith("sft.jsonl")
    assert "allow_val_change" not in stored  # the config went in at the run's start, not through config.update
    assert [step for step, metrics in rows if "train/loss" in json.loads(metrics)] == [2, 4]
