"""The supervised loop SFT, the reward model and DPO share: a `SupervisedTask` says what a batch's loss is."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from rlhf.config import save_config
from rlhf.runtime.accelerator import build_optimizer, build_scheduler, clip_grad_norm, compiled_for_training
from rlhf.runtime.checkpoints import Progress, publish_final, resume_state, save_checkpoint
from rlhf.runtime.guards import GracefulStop, NonFiniteGuard, checkpoint_or_stop
from rlhf.runtime.tracking import ProgressBar, drop_metrics_after, log_metrics


@dataclass
class SupervisedTask:
    """What a supervised stage plugs into `fit`: its batches, its loss and its evaluation.

    `global_batch(step)` returns the rows of that optimizer step (a pure function of step, so resume is exact);
    a process's share of them becomes micro-batches of `train.micro_batch_size` rows through `collate`, or through
    `micro_batches(rows) -> [batch]` when the task forms its own (packing); `loss(model, batch)` returns (loss
    summed over units, units, stats summed over units) where a unit is a token (SFT) or a prompt group (RM); the
    step's loss is the sum over micro-batches divided by all units.
    """

    name: str
    total_steps: int
    global_batch: Any
    collate: Any
    units: Any
    loss: Any
    evaluate: Any
    write_final: Any
    micro_batches: Any = None


def fit(cfg, accelerator: Accelerator, model, tokenizer, task: SupervisedTask) -> Path:
    """Explicit loop: set LR -> micro-batches with accumulation -> clip -> step -> log -> eval -> checkpoint."""
    out = Path(cfg.output_dir)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, task.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    train_model = compiled_for_training(accelerator, model, cfg.train.compile)
    progress = Progress()
    guard = NonFiniteGuard(cfg.train.max_nonfinite_skips, task.name)
    accelerator.register_for_checkpointing(progress, guard)
    resume_from = resume_state(accelerator, cfg.resume, out, task.name)
    if resume_from is not None:
        accelerator.print(f"[{task.name}] resumed from {resume_from} at step {progress.step}")
        drop_metrics_after(accelerator, progress.step)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")

    bar = ProgressBar(task.total_steps, task.name, cfg.logging.progress, progress.step, accelerator.is_main_process)
    window: dict[str, float] = {}
    tokens_seen, window_start = 0, time.time()

    def save(step: int) -> Path:
        return save_checkpoint(accelerator, out, step, {"model": model}, tokenizer, cfg, cfg.checkpoint.keep_last)

    with GracefulStop() as stop:
        while progress.step < task.total_steps:
            model.train()
            rows = task.global_batch(progress.step)
            mine = rows[accelerator.process_index :: accelerator.num_processes]
            if task.micro_batches is not None:
                batches = task.micro_batches(mine)
            else:
                size = cfg.train.micro_batch_size
                batches = [task.collate(mine[s : s + size]) for s in range(0, len(mine), size)]
            # the step's loss is a mean over every process's units (tokens, prompt groups); DDP averages gradients
            # over processes, so each process divides by the global count / processes: the 1-process gradient
            total_units = sum(float(task.units(b)) for b in batches)
            if accelerator.num_processes > 1:
                units = torch.tensor(total_units, dtype=torch.float64, device=accelerator.device)
                total_units = accelerator.reduce(units, "sum").item() / accelerator.num_processes
            step_stats: dict[str, torch.Tensor] = {}  # summed on the device: one host sync per step, not per value
            for i, batch in enumerate(batches):
                tokens_seen += int(batch["attention_mask"].sum())  # counted on the host, before the copy
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                # only the last micro-batch all-reduces gradients under DDP
                sync = accelerator.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
                with sync, accelerator.autocast():
                    loss_sum, batch_stats = task.loss(train_model, batch)
                    accelerator.backward(loss_sum / max(total_units, 1.0))
                for k, v in batch_stats.items():
                    step_stats[k] = step_stats.get(k, 0.0) + torch.as_tensor(v).detach().double()
            grad_norm = clip_grad_norm(accelerator, list(model.parameters()), cfg.optim.max_grad_norm)
            names = sorted(step_stats)
            local = torch.stack([step_stats[k] for k in names]).to(accelerator.device) if names else None
            if local is not None and accelerator.num_processes > 1:  # the whole step's stats, not this share's
                local = accelerator.reduce(local, "mean")
            stats = dict(zip(names, local.tolist())) if local is not None else {}
            loss = stats.get("loss", 0.0) / max(total_units, 1.0)
            if not guard.skip(accelerator, progress.step, {"loss": loss, "grad_norm": grad_norm}):
                optimizer.step()
            scheduler.step()  # a skipped step still advances the schedule: LR stays a function of the step
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.samples += len(rows)

            for k, v in stats.items():
                window[k] = window.get(k, 0.0) + v / max(total_units, 1.0)
            window["grad_norm"] = window.get("grad_norm", 0.0) + float(grad_norm)
            window["_n"] = window.get("_n", 0.0) + 1
            bar.update(1, loss=loss)
            step = progress.step
            if step % cfg.logging.every == 0 or step == task.total_steps:
                n = window.pop("_n")
                elapsed = time.time() - window_start
                row = {f"train/{k}": v / n for k, v in window.items()}
                row |= {
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": tokens_seen * accelerator.num_processes,  # real (unpadded) tokens since the last row
                    "tokens_per_s": tokens_seen * accelerator.num_processes / elapsed,
                    "samples": progress.samples,
                }
                log_metrics(accelerator, row, step)
                window, tokens_seen, window_start = {}, 0, time.time()
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == task.total_steps:
                log_metrics(accelerator, task.evaluate(accelerator.unwrap_model(model), step), step)
            checkpoint_or_stop(accelerator, stop, bar, step, task.total_steps, cfg.checkpoint.every, save)
    bar.close()
    final = publish_final(accelerator, out, lambda tmp: task.write_final(model, tmp), {"model": model})
    accelerator.end_training()
    return final
