"""Running on a CPU: the allocator settings a training loop wants, and independent models' work side by side in
threads (model lanes), each with its share of the intra-op threads."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from accelerate import Accelerator

# glibc's mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * 8  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def keep_freed_memory() -> dict[str, bool]:
    """Training on a CPU: freed tensor memory stays in the process for the next step instead of going back to the OS.

    glibc serves an allocation above its mmap threshold (128 KiB at first, adjusted up to 32 MiB as blocks are
    freed) with a fresh mmap and unmaps it on free, and returns a free heap top above the trim threshold. A training
    step allocates and frees the same activations every time, so both make each step fault in, and the kernel zero,
    pages it had a moment before (docs/benchmarks.md). Sets the mmap threshold to glibc's 32 MiB ceiling and the trim
    threshold to 2 GiB; peak RSS, the high-water mark, is unchanged. A MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ in the environment wins; other C libraries are left alone. Returns what was set."""
    if platform.libc_ver()[0] != "glibc":
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    wanted = {
        "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
        "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 2**31 - 1),
    }
    return {
        env: bool(mallopt(ctypes.c_int(param), ctypes.c_int(value)))
        for env, (param, value) in wanted.items()
        if env not in os.environ
    }


class ModelLanes:
    """Runs independent pieces of work, each on its own models, side by side in threads, or one after the other.

    On a CPU a small model's forward + backward leaves cores idle: eager per-op overhead (Python, dispatch, autograd)
    runs on one thread and thin matmuls do not fill two. Two models' work in two threads, each with its share of the
    intra-op threads, finishes sooner than the same work in sequence (PPO's policy and critic updates,
    docs/benchmarks.md). The results are those of running the tasks in sequence: each task touches only its own
    parameters, gradients and optimizer, grad mode and CPU autocast are carried into the threads, and nothing in
    them may use the global random generator (`concurrent_models` keeps models with dropout or gradient
    checkpointing in sequence). Matmul kernels may round differently with fewer threads, as with any thread count.
    """

    def __init__(self, enabled: bool, lanes: int = 2):
        threads = torch.get_num_threads()
        # the first lane is the calling thread (PPO: the policy, the larger forward; it also takes any odd thread):
        # its memory stays in the caller's malloc arena, where the sequential work that follows (generation) finds it
        self.shares = [max(1, threads // lanes + (i < threads % lanes)) for i in range(lanes)]
        self.pools: list[ThreadPoolExecutor] = []
        if not enabled:
            return
        for i, share in enumerate(self.shares[1:], 1):
            self.pools.append(ThreadPoolExecutor(1, f"rlhf-lane{i}", initializer=_lane_threads, initargs=(share,)))
        wait([pool.submit(lambda: None) for pool in self.pools])  # start the threads now
        # torch.set_num_threads also sets the process-wide count that threads starting later take: put it back
        torch.set_num_threads(threads)

    @property
    def concurrent(self) -> bool:
        return bool(self.pools)

    def run(self, *tasks):
        """Call each task (no arguments); returns their results in order. A task's exception is raised after every
        task has finished (none is left running)."""
        if not self.pools or len(tasks) < 2:
            return [task() for task in tasks]
        grad = torch.is_grad_enabled()
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def in_lane(task):
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                return task()

        futures = [self.pools[i % len(self.pools)].submit(in_lane, task) for i, task in enumerate(tasks[1:])]
        threads = torch.get_num_threads()
        torch.set_num_threads(self.shares[0])
        try:
            first = tasks[0]()
        finally:
            torch.set_num_threads(threads)
            wait(futures)
        return [first, *(f.result() for f in futures)]


def _lane_threads(share: int) -> None:
    torch.get_num_threads()  # a thread's first torch call sets its count to the process-wide one: let it happen first
    torch.set_num_threads(share)


def concurrent_models(accelerator: Accelerator, setting: str, models: Iterable[torch.nn.Module] = ()) -> bool:
    """`train.concurrent_models`: whether independent `models` run side by side (`ModelLanes`). auto: on a CPU with
    two or more threads, one process, no fp16 loss scaling; on: also with one thread (tests); off: never. Several
    processes (DDP and the rest) always run in sequence: their collectives must be issued in the same order on every
    process, which threads would not keep. GPUs: not measured, in sequence. So do models with dropout or gradient
    checkpointing: dropout draws from the one global CPU generator and checkpointing sets and restores its state
    around each recomputation, so threads would interleave them by timing. `on` where it cannot apply says why."""
    if setting == "off":
        return False
    why = None
    if accelerator.num_processes > 1:
        why = "several processes issue their collectives in one order"
    elif accelerator.device.type != "cpu":
        why = f"on {accelerator.device.type} it has not been measured"
    elif accelerator.scaler is not None:
        why = "fp16's one loss scaler serves both models"
    else:
        for model in models:
            modules = list(model.modules())
            if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in modules):
                why = "a model has dropout (the global random generator would be drawn from in two threads)"
            elif any(getattr(m, "gradient_checkpointing", False) is True for m in modules):
                why = "a model uses gradient checkpointing (it sets the global random state in its thread)"
            if why:
                break
    if why:
        if setting == "on":
            accelerator.print(f"[rlhf] train.concurrent_models: on, but the models run in sequence: {why}")
        return False
    return setting == "on" or torch.get_num_threads() >= 2
