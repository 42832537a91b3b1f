"""What a run reports: metrics (JSONL and the accelerate trackers), sampled text, the progress bar, JSON files."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker


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


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
