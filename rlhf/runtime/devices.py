"""Which device and process this is, asked without an Accelerator (evaluation, `rlhf generate`) or before one is
made (its CPU flag)."""

from __future__ import annotations

import os

import torch


def cpu_backend(cpu: bool = False) -> bool:
    """Whether accelerate must be told it runs on the CPU: asked for, or several processes on a machine without a
    GPU. accelerate forms a gloo process group on CPU only when told so; otherwise N processes launched by torchrun
    would each run alone, all writing the same output dir."""
    return cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def launched_rank() -> int:
    """The rank the launcher (torchrun, accelerate launch) gave this process, known before any process group is
    formed: 0 for a plain single process."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): eval and generate run there only, so rows are never written twice."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_backend()).is_main_process


def inference_device() -> torch.device:
    """This process's accelerator device (a GPU when there is one, also under `accelerate launch`), else the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_backend()).device
