"""Plumbing every stage shares: accelerator, optimizer and schedule, checkpoints and resume, metrics, progress.

A checkpoint is `<output_dir>/checkpoint-<step>/`: `model/` (or one dir per trained role) in Hugging Face form,
`state/` written by `accelerator.save_state` (optimizer, scheduler, RNG of every process, registered objects
such as the step counter and the KL controller) and `config.yaml`. It is written under a `.tmp` name and renamed
when complete, so a crash never leaves a half checkpoint that `resume: auto` would take.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from rlhf.config import ConfigError, LoraConfig, OptimConfig, save_config

# --------------------------------------------------------------------------------------------------
# Accelerator, seeds, optimizer, schedule
# --------------------------------------------------------------------------------------------------


def make_accelerator(
    mixed_precision: str, output_dir: str | Path, tensorboard: bool, cpu: bool = False
) -> Accelerator:
    """An Accelerator that logs to `<output_dir>/metrics.jsonl` (and TensorBoard when installed and asked for)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not cpu else "no"
    trackers: list = [JsonlTracker(Path(output_dir) / "metrics.jsonl")]
    if tensorboard and importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, log_with=trackers, project_dir=str(output_dir))
    accelerator.init_trackers("tensorboard")
    return accelerator


def quiet_hf_progress() -> None:
    """In logs and CI (stdout not a terminal), Hugging Face's per-file load/save bars are noise between our lines."""
    if not sys.stdout.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, lr: float | None = None):
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (check model.lora.target_modules)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr or optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak LR at `step`: linear warm-up from warmup_start_ratio, then cosine/linear/constant."""
    if step < optim.warmup_steps:
        return optim.warmup_start_ratio + (1 - optim.warmup_start_ratio) * step / optim.warmup_steps
    if optim.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))


def split_batch(global_batch: int, micro: int, num_processes: int, key: str) -> int:
    """Gradient-accumulation steps so that micro * processes * accumulation == global batch (exact division)."""
    per_step = micro * num_processes
    if global_batch % per_step:
        raise ConfigError(
            f"{key}: batch size {global_batch} is not a multiple of micro_batch_size x processes = {per_step}"
        )
    return global_batch // per_step


# --------------------------------------------------------------------------------------------------
# State that survives a restart
# --------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """The training position: registered with accelerate so it is saved and restored with every checkpoint."""

    step: int = 0
    samples: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` dir is an interrupted save and never counts)."""
    out = Path(output_dir)
    dirs = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one (or none), `never`, or an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state").is_dir():
        raise ConfigError(f"resume: {resume} is not a checkpoint dir (no state/ inside)")
    return path


def publish_atomically(accelerator: Accelerator, target: Path, write) -> Path:
    """Run `write(tmp_dir)` on every process, then rename `<target>.tmp` -> `target`: the dir exists only complete."""
    tmp = target.with_name(target.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    write(tmp)
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    accelerator.wait_for_everyone()
    return target


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, step: int, models: dict[str, Any], tokenizer, cfg, keep_last: int
) -> Path:
    """Write checkpoint-<step> atomically and prune to the newest `keep_last`."""

    def write(tmp: Path) -> None:
        accelerator.save_state(str(tmp / "state"))
        for name, model in models.items():
            save_hf(accelerator, model, tmp / name, tokenizer)
        if accelerator.is_main_process:
            save_config(cfg, tmp / "config.yaml")

    final = publish_atomically(accelerator, Path(output_dir) / f"checkpoint-{step}", write)
    if accelerator.is_main_process and keep_last:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_hf(accelerator: Accelerator, model, path: Path, tokenizer=None) -> None:
    """save_pretrained of the unwrapped model (a peft model saves its adapter) plus the tokenizer."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(str(path), state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))


def publish_final(accelerator: Accelerator, output_dir: str | Path, write) -> Path:
    """`<output_dir>/final`, written by `write(tmp_dir)`, exists only when complete."""
    return publish_atomically(accelerator, Path(output_dir) / "final", write)


def final_model(accelerator: Accelerator, model, lora: LoraConfig):
    """The trained model as `final/` holds it: unwrapped, with LoRA merged into the weights when asked."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.merge_and_unload() if lora.enabled and lora.merge_on_save else unwrapped


def save_final(accelerator: Accelerator, model, path: Path, tokenizer, cfg) -> None:
    """`final/` in Hugging Face form: the model (or peft adapter), its tokenizer and the resolved config."""
    if accelerator.is_main_process:
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        save_config(cfg, path / "rlhf_config.yaml")


# --------------------------------------------------------------------------------------------------
# Metrics and progress
# --------------------------------------------------------------------------------------------------


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
    for tracker in accelerator.trackers:
        tracker.log(numbers | texts if isinstance(tracker, JsonlTracker) else numbers, step=step)


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


# --------------------------------------------------------------------------------------------------
# The supervised loop shared by SFT and the reward model
# --------------------------------------------------------------------------------------------------


@dataclass
class SupervisedTask:
    """What a supervised stage plugs into `fit`: its batches, its loss and its evaluation.

    `global_batch(step)` returns the rows of that optimizer step (a pure function of step, so resume is exact);
    `loss(model, batch)` returns (loss summed over units, units, stats summed over units) where a unit is a
    token (SFT) or a prompt group (RM); the step's loss is the sum over micro-batches divided by all units.
    """

    name: str
    total_steps: int
    global_batch: Any
    collate: Any
    units: Any
    loss: Any
    evaluate: Any
    write_final: Any


def fit(cfg, accelerator: Accelerator, model, tokenizer, task: SupervisedTask) -> Path:
    """Explicit loop: set LR -> micro-batches with accumulation -> clip -> step -> log -> eval -> checkpoint."""
    out = Path(cfg.output_dir)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, task.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    resume_from = resolve_resume(cfg.resume, out)
    if resume_from is not None:
        accelerator.load_state(str(resume_from / "state"))
        accelerator.print(f"[{task.name}] resumed from {resume_from} at step {progress.step}")
        drop_metrics_after(accelerator, progress.step)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")

    bar = ProgressBar(task.total_steps, task.name, cfg.logging.progress, progress.step, accelerator.is_main_process)
    window: dict[str, float] = {}
    tokens_seen, window_start = 0, time.time()
    while progress.step < task.total_steps:
        model.train()
        rows = task.global_batch(progress.step)
        mine = rows[accelerator.process_index :: accelerator.num_processes]
        batches = [
            task.collate(mine[s : s + cfg.train.micro_batch_size])
            for s in range(0, len(mine), cfg.train.micro_batch_size)
        ]
        total_units = sum(float(task.units(b)) for b in batches)
        stats: dict[str, float] = {}
        for i, batch in enumerate(batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # only the last micro-batch all-reduces gradients under DDP
            sync = accelerator.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                loss_sum, batch_stats = task.loss(model, batch)
                accelerator.backward(loss_sum / max(total_units, 1.0))
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
            tokens_seen += int(batch["attention_mask"].sum())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.samples += len(rows)

        for k, v in stats.items():
            window[k] = window.get(k, 0.0) + v / max(total_units, 1.0)
        window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)
        window["_n"] = window.get("_n", 0.0) + 1
        bar.update(1, loss=stats.get("loss", 0.0) / max(total_units, 1.0))
        step = progress.step
        if step % cfg.logging.every == 0 or step == task.total_steps:
            n = window.pop("_n")
            elapsed = time.time() - window_start
            row = {f"train/{k}": v / n for k, v in window.items()}
            row |= {
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens_seen * accelerator.num_processes / elapsed,
                "samples": progress.samples,
            }
            log_metrics(accelerator, row, step)
            window, tokens_seen, window_start = {}, 0, time.time()
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == task.total_steps:
            log_metrics(accelerator, task.evaluate(accelerator.unwrap_model(model), step), step)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < task.total_steps:
            save_checkpoint(accelerator, out, step, {"model": model}, tokenizer, cfg, cfg.checkpoint.keep_last)
    bar.close()
    final = publish_final(accelerator, out, lambda tmp: task.write_final(model, tmp))
    accelerator.end_training()
    return final
