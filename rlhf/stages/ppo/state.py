"""The PPO run's state objects checkpointed with it (`accelerator.register_for_checkpointing`)."""

from __future__ import annotations

import torch

from rlhf.algorithms.collapse import CollapseMonitor
from rlhf.algorithms.kl_control import KLBudget


class RunningMoments:
    """Running mean/std of RM scores (Chan et al. parallel update), for optional score normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class EMA:
    """Exponential moving average of the policy weights (InstructGPT: decay 0.992), for eval and the final save."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        """Whole tensors. Under FSDP2 the shadow holds this rank's shards (an EMA is elementwise, so the EMA of a
        shard is the shard of the EMA); every rank takes part in the gather, as accelerate's save_state asks each
        rank for the state and rank 0 writes it."""
        return {"decay": self.decay, "shadow": {n: _whole(t) for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: _shaped_like(self.shadow.get(k), v) for k, v in state["shadow"].items()}


def _whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shaped_like(current: torch.Tensor | None, whole: torch.Tensor) -> torch.Tensor:
    """`whole` sharded as `current` is (FSDP2: this rank's shard of it), or a copy of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(current, DTensor):
        return distribute_tensor(whole.to(current.device), current.device_mesh, current.placements)
    return whole.clone()


class StopRules:
    """The KL budget and the collapse monitor checkpointed as one state: the budget's keys at the top level, the
    monitor's under "collapse" (a checkpoint without them resumes with a fresh monitor)."""

    def __init__(self, budget: KLBudget, collapse: CollapseMonitor):
        self.budget, self.collapse = budget, collapse

    def state_dict(self) -> dict:
        return self.budget.state_dict() | {"collapse": self.collapse.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.budget.load_state_dict(state_dict)
        if "collapse" in state_dict:
            self.collapse.load_state_dict(state_dict["collapse"])
