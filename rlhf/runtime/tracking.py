"""What a run reports: metrics (JSONL and the trackers of `logging.report_to`, through accelerate), sampled text,
the progress bar, JSON files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from rlhf.config import ConfigError


class JsonlTracker(GeneralTracker):
    """An accelerate tracker writing one JSON object per logged step to metrics.jsonl.

    On resume, rows past the resumed step are dropped first so the file never holds a step twice.
    """

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in kept))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "time": round(time.time(), 3)} | {k: _plain(v) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def log_metrics(accelerator: Accelerator, values: dict, step: int) -> None:
    """Numbers go to every tracker; strings (sampled text) only to metrics.jsonl."""
    numbers = {k: _plain(v) for k, v in values.items() if isinstance(v, (int, float, torch.Tensor))}
    texts = {k: v for k, v in values.items() if k not in numbers}
    finite = {k: v for k, v in numbers.items() if v is not None}  # a non-finite value is null in the JSONL only
    for tracker in accelerator.trackers:
        tracker.log(numbers | texts if isinstance(tracker, JsonlTracker) else finite, step=step)


def log_text(accelerator: Accelerator, output_dir: str | Path, step: int, samples: list[dict]) -> None:
    """Append sampled text (prompt, response, score) to samples.jsonl."""
    if accelerator.is_main_process and samples:
        with (Path(output_dir) / "samples.jsonl").open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step} | s) + "\n")


def drop_metrics_after(accelerator: Accelerator, step: int) -> None:
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if isinstance(tracker, JsonlTracker):
                tracker.truncate_after(step)


class ProgressBar:
    """tqdm on a terminal; plain periodic lines (about every 5% or 30 s) when stdout is not a terminal."""

    def __init__(self, total: int, desc: str, mode: str = "auto", initial: int = 0, enabled: bool = True):
        self.total, self.desc, self.n = total, desc, initial
        if not enabled or mode == "off":
            self.mode = "off"
        elif mode == "auto":
            self.mode = "bar" if sys.stdout.isatty() else "lines"
        else:
            self.mode = mode
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True)
        self.start, self.start_n, self.last_print = time.time(), initial, 0.0
        self.postfix: dict = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
        elif self.mode == "lines":
            now = time.time()
            every = max(1, self.total // 20)
            if self.n >= self.total or self.n % every == 0 or now - self.last_print > 30:
                self.last_print = now
                rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
                eta = (self.total - self.n) / rate if rate > 0 else float("nan")
                extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
                print(
                    f"[{self.desc}] {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) "
                    f"eta {_fmt_time(eta)} {extra}".rstrip(),
                    flush=True,
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        v = v.item()
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_metrics(run_dir: Path, stage: str) -> list[dict]:
    """Rows of `<run_dir>/<stage>/metrics.jsonl`; for a reward-model ensemble, those of its first member."""
    stage_dir = Path(run_dir) / stage
    return read_metrics(stage_dir / "metrics.jsonl") or read_metrics(stage_dir / "member-0" / "metrics.jsonl")


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the run's trackers at the end of a stage. Not accelerate's `end_training`: it also destroys the process
    group, which the next stage in the same processes (an RM ensemble's next member, `rlhf pipeline`) still needs;
    the CLI releases it when the command ends."""
    for tracker in accelerator.trackers:
        tracker.finish()


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def not_installed(name: str) -> str:
    return f"logging.report_to: {name} is not installed; pip install 'rlhf[track]' (or {name}), or remove it"


def external_tracker(name: str, output_dir: str | Path, config: dict | None = None):
    """An accelerate tracker for `name` (wandb, trackio, mlflow): project `rlhf` (WANDB_PROJECT overrides for
    wandb), run named after the output dir, each tool's own local store when offline (wandb under the output dir,
    trackio in its local store, mlflow at MLFLOW_TRACKING_URI or MLflow's default ./mlflow.db with artifacts under
    the output dir). `config` (flat) is given to trackio at its start (its later config update would record
    accelerate's `allow_val_change` flag as a key); ConfigError when the package is missing."""
    import accelerate.tracking as accelerate_tracking

    if importlib.util.find_spec(name) is None:
        raise ConfigError(not_installed(name))
    run = Path(output_dir).resolve().name
    if name == "wandb":
        return accelerate_tracking.WandBTracker(os.environ.get("WANDB_PROJECT", "rlhf"), name=run, dir=str(output_dir))
    if name == "mlflow":
        check_mlflow_store()
        return accelerate_tracking.MLflowTracker(
            "rlhf", logging_dir=str(Path(output_dir).resolve() / "mlruns"), run_name=run
        )
    return accelerate_tracking.TrackioTracker("rlhf", name=run, config=config)


def check_mlflow_store() -> None:
    """MLflow's local stores are databases (its file store refuses new runs since 3.x): with mlflow-skinny alone
    the default sqlite store fails at the first call, deep inside SQLAlchemy; say so before any work."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite") and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"logging.report_to: mlflow's tracking store {uri} needs sqlalchemy and alembic (mlflow-skinny lacks "
            "them); pip install mlflow, or set MLFLOW_TRACKING_URI to a tracking server"
        )


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested config dict -> {dotted key: value} with lists and None as strings (what trackers store)."""
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


@dataclass
class RunTrackers:
    """The trackers a run logs to: rlhf's metrics.jsonl and accelerate's TensorBoard (`builtin`), the external ones
    of `logging.report_to`, and the flat config they are given."""

    builtin: list
    external: list
    flat_config: dict | None

    @property
    def log_with(self) -> list:
        return self.builtin + self.external

    def store_config(self, accelerator: Accelerator) -> None:
        """Give the external trackers the resolved config (main process; trackio had it at its start)."""
        if self.flat_config is not None and accelerator.is_main_process:
            for tracker in self.external:
                if tracker.name != "trackio":
                    tracker.store_init_configuration(self.flat_config)


def run_trackers(
    output_dir: str | Path, tensorboard: bool, report_to: list[str] | tuple = (), config: Any = None
) -> RunTrackers:
    """`<output_dir>/metrics.jsonl`, TensorBoard when installed and asked for, and the trackers of
    `logging.report_to`, each to be given the resolved `config` (a stage's dataclass). ConfigError when a tracker
    asked for is not installed."""
    builtin: list = [JsonlTracker(Path(output_dir) / "metrics.jsonl")]
    if (tensorboard or "tensorboard" in report_to) and importlib.util.find_spec("tensorboard") is not None:
        builtin.append("tensorboard")
    flat = flat_config(dataclasses.asdict(config)) if config is not None else None
    external = [external_tracker(name, output_dir, flat) for name in dict.fromkeys(report_to) if name != "tensorboard"]
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(not_installed("tensorboard"))
    return RunTrackers(builtin, external, flat)


def quiet_hf_progress() -> None:
    """In logs and CI (stdout not a terminal), Hugging Face's per-file load/save bars are noise between our lines."""
    if not sys.stdout.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
