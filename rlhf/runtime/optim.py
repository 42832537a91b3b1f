"""Optimizer steps: AdamW over the trainable parameters, the learning-rate schedule, and how a global batch splits
into gradient-accumulation steps."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from rlhf.config import ConfigError, OptimConfig

# dtypes torch's fused AdamW kernel takes
FUSED_ADAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, lr: float | None = None):
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (check model.lora.target_modules)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one pass over each tensor instead of ~10 elementwise ops) does the same update, faster; it
    # matters where small models are stepped many times (PPO's minibatches)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_ADAM_DTYPES for p in params)
    return torch.optim.AdamW(groups, lr=lr or optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)


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
    """The LR schedule as a LambdaLR over `lr_factor`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))


def split_batch(global_batch: int, micro: int, num_processes: int, key: str) -> int:
    """Gradient-accumulation steps so that micro * processes * accumulation == global batch (exact division)."""
    per_step = micro * num_processes
    if global_batch % per_step:
        raise ConfigError(
            f"{key}: batch size {global_batch} is not a multiple of micro_batch_size x processes = {per_step}"
        )
    return global_batch // per_step
