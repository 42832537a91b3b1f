"""logging.report_to: the trackers people follow runs in, through accelerate, offline. wandb is installed with the dev
extra, so its offline run is checked here (the resolved config and the metrics reach it); a tracker that is not
installed, or an unknown name, stops before any work with one line."""

from __future__ import annotations

import pytest
from conftest import load_stage, sft_overrides

from rlhf import runtime, sft
from rlhf.cli import main
from rlhf.config import ConfigError


def test_an_offline_wandb_run_gets_the_config_and_the_metrics(tiny_world, tiny_base, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb comes with the dev extra (pip install -e .[dev])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    made, logged = [], []
    real = runtime.external_tracker

    def spy(name, output_dir):  # the tracker rlhf builds, with what it is sent recorded on the way through
        tracker = real(name, output_dir)
        send = tracker.log
        tracker.log = lambda values, step=None, **kw: (logged.append((step, dict(values))), send(values, step, **kw))
        made.append(tracker)
        return tracker

    monkeypatch.setattr(runtime, "external_tracker", spy)
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
    real = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"logging.report_to: mlflow is not installed; pip install 'rlhf\[track\]'"):
        runtime.make_accelerator("no", tmp_path, tensorboard=False, cpu=True, report_to=["mlflow"])
    rc = main(["sft", "--config", "configs/tiny/sft.yaml", "--set", "logging.report_to=[comet]", "--dry-run"])
    assert rc == 2 and "unknown tracker(s) ['comet']" in capsys.readouterr().err
