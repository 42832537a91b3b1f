"""Faults the loops handle (docs/reliability.md): SIGTERM/SIGINT finish the step, checkpoint and exit with
`EXIT_STOPPED`; non-finite losses, gradient norms, rewards or advantages skip the step (up to
`train.max_nonfinite_skips`) or stop the run; non-finite weights are never written."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from rlhf.runtime.tracking import finish_trackers

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; the same command resumes


class NonFiniteError(RuntimeError):
    """A loss, gradient norm, reward, advantage or weight is NaN/inf; nothing non-finite was written."""


class StoppedBySignal(Exception):
    """SIGTERM/SIGINT: the step finished and a checkpoint was written; the CLI exits with EXIT_STOPPED."""

    def __init__(self, signame: str, step: int, checkpoint: Path):
        super().__init__(
            f"stopped by {signame} at step {step}: checkpoint {checkpoint} written; run the same command to resume"
        )


class GracefulStop:
    """A context in which SIGTERM/SIGINT (scheduler preemption, Ctrl-C) only set a flag: the loop finishes its step,
    checkpoints and raises StoppedBySignal. A second signal exits at once (status 128 + signal)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame=None) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n[rlhf] {signal.Signals(signum).name}: finishing this step, then checkpoint and exit "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process got a signal (all processes must stop at the same step)."""
        return any_process(accelerator, self.signum is not None)

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another process"


class NonFiniteGuard:
    """Checks a step's numbers: a NaN/inf one skips the step (at most `max_skips` times in a run), then stops it.

    Registered for checkpointing, so a resumed run counts the skips it already made."""

    def __init__(self, max_skips: int, stage: str):
        self.max_skips, self.stage, self.skipped = max_skips, stage, 0

    def skip(self, accelerator: Accelerator, step: int, quantities: dict[str, Any]) -> bool:
        """True when this step must be skipped; raises NonFiniteError once the skip budget is spent."""
        bad = {k: v for k, v in quantities.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())}
        if not any_process(accelerator, bool(bad)):  # every process takes the same decision
            return False
        what = ", ".join(f"{k} {_nonfinite(v)}" for k, v in bad.items()) or "a quantity on another process"
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise NonFiniteError(
                f"[{self.stage}] step {step + 1}: non-finite {what}; stopped before writing anything. Lower "
                "optim.lr, set optim.max_grad_norm > 0 or check the data; train.max_nonfinite_skips allows skipping "
                f"such steps ({self.max_skips} now). The last checkpoint, if any, is unaffected"
            )
        accelerator.print(
            f"[{self.stage}] warning: step {step + 1}: non-finite {what}; step skipped "
            f"({self.skipped}/{self.max_skips} allowed)"
        )
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any one (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item())


def checkpoint_or_stop(accelerator: Accelerator, stop: GracefulStop, bar, step: int, total: int, every: int, save):
    """End of a training step: `save(step)` on the checkpoint schedule, or on a signal, after which the run stops
    (StoppedBySignal). The last step needs neither: `final/` follows it."""
    periodic = every and step % every == 0 and step < total
    stopping = stop.requested(accelerator) and step < total
    if periodic or stopping:
        checkpoint = save(step)
    if stopping:
        bar.close()
        finish_trackers(accelerator)
        raise StoppedBySignal(stop.signame, step, checkpoint)


def _nonfinite(value: Any) -> str:
    t = torch.as_tensor(value)
    if t.numel() == 1:
        return f"= {t.item()}"
    return f"({int((~torch.isfinite(t)).sum())} of {t.numel()} values NaN/inf)"


def check_finite_weights(accelerator: Accelerator, models: dict[str, Any], what: str) -> None:
    """Refuse to write `what` when a trained weight is NaN/inf (a NaN checkpoint would poison every resume)."""
    for role, model in models.items():
        for name, p in accelerator.unwrap_model(model).named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise NonFiniteError(
                    f"the {role} weight {name} is not finite: {what} was not written. Lower optim.lr or set "
                    "optim.max_grad_norm > 0; the last complete checkpoint, if any, is unaffected"
                )
