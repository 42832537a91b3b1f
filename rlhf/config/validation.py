"""Cross-field checks shared by the stage configs: the training sections every stage has, the shared-prompt
clashes of DPO and the RM, and positive-and-finite numbers. A section's own invariants stay on its `validate()`."""

from __future__ import annotations

from typing import Any

from rlhf.config.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")


def positive(value: float, key: str) -> None:
    """Raise unless `value` is > 0 and finite."""
    if not 0 < value < float("inf"):  # also rejects nan, which compares false with everything
        raise ConfigError(f"{key} must be > 0 and finite, got {value}")


def check_share_prompt(cfg: Any) -> None:
    """DPO / RM share_prompt: the responses run on their prompt's KV cache, which these cannot go with."""
    if not cfg.share_prompt:
        return
    settings = (
        ("data.packing", cfg.data.packing),
        ("model.gradient_checkpointing", cfg.model.gradient_checkpointing),
        ("train.compile", cfg.train.compile),
    )
    clash = [name for name, on in settings if on]
    if clash:
        raise ConfigError(
            f"share_prompt runs responses on their prompt's KV cache, which {' and '.join(clash)} cannot go with "
            "(packing lays rows side by side, checkpointed layers drop the cache, train.compile compiles "
            "whole-sequence forwards only): turn share_prompt off, or those"
        )


def check_common(cfg: Any) -> None:
    """The sections every training stage has: resume, logging, train, optim, checkpoint."""
    if cfg.resume not in ("auto", "never") and not cfg.resume:
        raise ConfigError("resume must be auto, never or a checkpoint path")
    unknown = [t for t in cfg.logging.report_to if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"logging.report_to: unknown tracker(s) {unknown}; choose from {list(TRACKERS)}")
    t, o = cfg.train, cfg.optim
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps must be >= 0, got {t.max_steps}")
    if t.max_steps == 0 and t.epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0")
    positive(t.batch_size, "train.batch_size")
    positive(t.micro_batch_size, "train.micro_batch_size")
    if t.max_nonfinite_skips < 0:
        raise ConfigError(f"train.max_nonfinite_skips must be >= 0, got {t.max_nonfinite_skips}")
    if t.micro_batch_size > t.batch_size:
        raise ConfigError(
            f"train.micro_batch_size ({t.micro_batch_size}) is larger than train.batch_size ({t.batch_size})"
        )
    positive(o.lr, "optim.lr")
    if o.weight_decay < 0 or o.max_grad_norm < 0 or o.eps <= 0:
        raise ConfigError("optim.weight_decay and optim.max_grad_norm must be >= 0 and optim.eps > 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or not 0 <= o.warmup_start_ratio <= 1:
        raise ConfigError("optim.warmup_steps >= 0, optim.min_lr_ratio and optim.warmup_start_ratio in [0, 1]")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0:
        raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 0")
    positive(cfg.logging.every, "logging.every")
