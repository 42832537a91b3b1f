"""The supervised loop SFT, the reward model and DPO share: a `SupervisedStage` says what a step's rows, a
micro-batch's loss, an evaluation and the final export are; `fit` runs the optimizer steps around them, with
logging, evaluation, checkpoints and bit-exact resume."""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from rlhf.config import TrainConfig, save_config
from rlhf.runtime.accelerator import clip_grad_norm, compiled_for_training
from rlhf.runtime.checkpoints import Progress, publish_final, resume_state, save_checkpoint
from rlhf.runtime.guards import GracefulStop, NonFiniteGuard, checkpoint_or_stop
from rlhf.runtime.optim import build_optimizer, build_scheduler
from rlhf.runtime.tracking import ProgressBar, drop_metrics_after, finish_trackers, log_metrics

Batch = dict[str, torch.Tensor]


class SupervisedStage(ABC):
    """What a supervised stage plugs into `fit`.

    `global_batch(step)` returns the rows of that optimizer step (a pure function of step, so resume is exact); a
    process's share of them becomes micro-batches through `micro_batches` (by default `collate` of consecutive
    slices). `loss(model, batch)` returns (loss summed over units, stats summed over units), where a unit is what
    `units(batch)` counts: a token (SFT) or a prompt group (RM, DPO); the step's loss is the sum over micro-batches
    divided by all units.
    """

    name: str  # the stage's name in messages and checkpoints
    total_steps: int  # optimizer steps of the whole run

    @abstractmethod
    def global_batch(self, step: int) -> list:
        """Every process's rows of optimizer step `step`."""

    @abstractmethod
    def collate(self, rows: list) -> Batch:
        """Rows -> one micro-batch of tensors (on the CPU)."""

    def micro_batches(self, rows: list, micro_batch_size: int) -> list[Batch]:
        """This process's rows of a step -> its micro-batches."""
        return [self.collate(rows[s : s + micro_batch_size]) for s in range(0, len(rows), micro_batch_size)]

    @abstractmethod
    def units(self, batch: Batch) -> float | int | torch.Tensor:
        """The loss units (tokens, prompt groups) of a micro-batch."""

    @abstractmethod
    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the batch's units, stats summed over its units); stats include "loss"."""

    @abstractmethod
    def evaluate(self, model, step: int) -> dict[str, float]:
        """Held-out metrics of the unwrapped model after step `step` (and any samples to log)."""

    @abstractmethod
    def export_final(self, model, path: Path) -> None:
        """Write the trained (wrapped) model into `path`, which becomes `final/`."""


def planned_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """The run's optimizer steps: train.max_steps, else train.epochs of the data (at least one step)."""
    return train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))


@dataclass
class _Training:
    """What `fit` trains with once accelerate has prepared it, and the state a checkpoint restores."""

    model: torch.nn.Module  # wrapped (DDP/FSDP): gradients sync and checkpoints go through it
    train_model: torch.nn.Module  # the model the forwards run (compiled when train.compile)
    optimizer: Any
    scheduler: Any
    progress: Progress
    guard: NonFiniteGuard


@dataclass
class _StepResult:
    loss: float  # the step's mean loss over its units
    stats: dict[str, float]  # summed over the step's units
    units: float
    grad_norm: torch.Tensor
    tokens: int  # real (unpadded) tokens of this process's micro-batches


class _MetricWindow:
    """The training stats since the last logged row: per-step means, summed, and the tokens seen."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps, self.tokens, self.start = 0, 0, time.time()

    def add(self, result: _StepResult) -> None:
        for k, v in result.stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v / max(result.units, 1.0)
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + float(result.grad_norm)
        self.steps += 1
        self.tokens += result.tokens

    def row(self, accelerator: Accelerator, lr: float, samples: int) -> dict[str, float]:
        tokens = self.tokens * accelerator.num_processes  # real (unpadded) tokens since the last row
        row = {f"train/{k}": v / self.steps for k, v in self.sums.items()}
        return row | {
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": tokens / (time.time() - self.start),
            "samples": samples,
        }


def fit(cfg, accelerator: Accelerator, model, tokenizer, stage: SupervisedStage) -> Path:
    """Explicit loop: set LR -> micro-batches with accumulation -> clip -> step -> log -> eval -> checkpoint.

    Returns `<output_dir>/final`, written by `stage.export_final` once every step has run."""
    out = Path(cfg.output_dir)
    run = _prepare(cfg, accelerator, model, stage, out)
    progress, total = run.progress, stage.total_steps
    bar = ProgressBar(total, stage.name, cfg.logging.progress, progress.step, accelerator.is_main_process)
    window = _MetricWindow()

    def save(step: int) -> Path:
        return save_checkpoint(accelerator, out, step, {"model": run.model}, tokenizer, cfg, cfg.checkpoint.keep_last)

    with GracefulStop() as stop:
        while progress.step < total:
            run.model.train()
            result = _step(cfg, accelerator, run, stage, stage.global_batch(progress.step))
            window.add(result)
            bar.update(1, loss=result.loss)
            step = progress.step
            if step % cfg.logging.every == 0 or step == total:
                lr = run.scheduler.get_last_lr()[0]
                log_metrics(accelerator, window.row(accelerator, lr, progress.samples), step)
                window = _MetricWindow()
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total:
                log_metrics(accelerator, stage.evaluate(accelerator.unwrap_model(run.model), step), step)
            checkpoint_or_stop(accelerator, stop, bar, step, total, cfg.checkpoint.every, save)
    bar.close()
    final = publish_final(accelerator, out, lambda tmp: stage.export_final(run.model, tmp), {"model": run.model})
    finish_trackers(accelerator)
    return final


def _prepare(cfg, accelerator: Accelerator, model, stage: SupervisedStage, out: Path) -> _Training:
    """Optimizer and LR schedule, accelerate's prepare, then the state of the checkpoint to resume from (if any)."""
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, stage.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    train_model = compiled_for_training(accelerator, model, cfg.train.compile)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_skips, stage.name)
    run = _Training(model, train_model, optimizer, scheduler, Progress(), guard)
    accelerator.register_for_checkpointing(run.progress, run.guard)
    resume_from = resume_state(accelerator, cfg.resume, out, stage.name)
    if resume_from is not None:
        accelerator.print(f"[{stage.name}] resumed from {resume_from} at step {run.progress.step}")
        drop_metrics_after(accelerator, run.progress.step)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    return run


def _step(cfg, accelerator: Accelerator, run: _Training, stage: SupervisedStage, rows: list) -> _StepResult:
    """One optimizer step on `rows`: accumulate every micro-batch's gradient, clip, step (unless non-finite)."""
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    batches = stage.micro_batches(mine, cfg.train.micro_batch_size)
    total_units = _global_units(accelerator, stage, batches)
    step_stats: dict[str, torch.Tensor] = {}  # summed on the device: one host sync per step, not per value
    tokens = 0
    for i, batch in enumerate(batches):
        tokens += int(batch["attention_mask"].sum())  # counted on the host, before the copy
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        # only the last micro-batch all-reduces gradients under DDP
        sync = accelerator.no_sync(run.model) if i < len(batches) - 1 else contextlib.nullcontext()
        with sync, accelerator.autocast():
            loss_sum, batch_stats = stage.loss(run.train_model, batch)
            accelerator.backward(loss_sum / max(total_units, 1.0))
        for k, v in batch_stats.items():
            step_stats[k] = step_stats.get(k, 0.0) + torch.as_tensor(v).detach().double()
    grad_norm = clip_grad_norm(accelerator, list(run.model.parameters()), cfg.optim.max_grad_norm)
    stats = _step_stats(accelerator, step_stats)
    loss = stats.get("loss", 0.0) / max(total_units, 1.0)
    if not run.guard.skip(accelerator, run.progress.step, {"loss": loss, "grad_norm": grad_norm}):
        run.optimizer.step()
    run.scheduler.step()  # a skipped step still advances the schedule: LR stays a function of the step
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.step += 1
    run.progress.samples += len(rows)
    return _StepResult(loss, stats, total_units, grad_norm, tokens)


def _global_units(accelerator: Accelerator, stage: SupervisedStage, batches: list[Batch]) -> float:
    """The step's loss units over every process, divided by the process count.

    The step's loss is a mean over every process's units; DDP averages gradients over processes, so each process
    divides by the global count / processes: the 1-process gradient."""
    total_units = sum(float(stage.units(b)) for b in batches)
    if accelerator.num_processes > 1:
        units = torch.tensor(total_units, dtype=torch.float64, device=accelerator.device)
        total_units = accelerator.reduce(units, "sum").item() / accelerator.num_processes
    return total_units


def _step_stats(accelerator: Accelerator, step_stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's summed stats as floats, averaged over processes: the whole step's stats, not this share's."""
    names = sorted(step_stats)
    if not names:
        return {}
    local = torch.stack([step_stats[k] for k in names]).to(accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, "mean")
    return dict(zip(names, local.tolist()))
