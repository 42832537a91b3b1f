"""Plumbing every stage shares: accelerator, optimizer and schedule, checkpoints and resume, metrics, progress.

A checkpoint is `<output_dir>/checkpoint-<step>/`: `model/` (or one dir per trained role) in Hugging Face form,
`state/` written by `accelerator.save_state` (optimizer, scheduler, RNG of every process, registered objects
such as the step counter and the KL controller), `config.yaml` and `checkpoint.json` (every file with its size).
It is written under a `.tmp` name and renamed when complete, so a crash never leaves a half checkpoint that
`resume: auto` would take; a checkpoint damaged later (truncated, corrupted) is detected and the previous one used.

Faults the loops handle (docs/reliability.md): SIGTERM/SIGINT finish the step, checkpoint and exit with
`EXIT_STOPPED`; non-finite losses, gradient norms, rewards or advantages skip the step (up to
`train.max_nonfinite_skips`) or stop the run; non-finite weights are never written; a failed save leaves the
previous checkpoint intact and says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker

from rlhf.config import ConfigError, LoraConfig, OptimConfig, save_config
from rlhf.models import TokenValueModel, cpu_backend, half_precision_linears

# --------------------------------------------------------------------------------------------------
# Accelerator, seeds, optimizer, schedule
# --------------------------------------------------------------------------------------------------


def fast_bf16(cpu: bool = False) -> bool:
    """Whether bf16 autocast pays here: a CUDA GPU with bf16, or (no GPU, or train.cpu) a CPU with bf16 matrix
    instructions (AVX512-BF16 or AMX), where oneDNN's bf16 matmuls run 2-4x the fp32 rate (docs/benchmarks.md)."""
    if torch.cuda.is_available() and not cpu:
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# glibc's mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * 8  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def keep_freed_memory() -> dict[str, bool]:
    """Training on a CPU: freed tensor memory stays in the process for the next step instead of going back to the OS.

    glibc serves an allocation above its mmap threshold (128 KiB at first, adjusted up to 32 MiB as blocks are
    freed) with a fresh mmap and unmaps it on free, and returns a free heap top above the trim threshold. A training
    step allocates and frees the same activations every time, so both make each step fault in, and the kernel zero,
    pages it had a moment before (the tiny PPO benchmark: 4-8% of an iteration; compiled, its scoring took 0.21 s
    instead of 0.12; docs/benchmarks.md). Sets the mmap threshold to glibc's 32 MiB ceiling and the trim threshold to
    2 GiB; peak RSS, the high-water mark, is unchanged. A MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the
    environment wins; other C libraries are left alone. Returns what was set."""
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


def make_accelerator(
    mixed_precision: str, output_dir: str | Path, tensorboard: bool, cpu: bool = False
) -> Accelerator:
    """An Accelerator that logs to `<output_dir>/metrics.jsonl` (and TensorBoard when installed and asked for)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if fast_bf16(cpu) else "no"
    cpu = cpu_backend(cpu)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        # one process running stages of different precisions (rlhf pipeline, tests): accelerate keeps one state per
        # process and refuses a second precision; start a new one (the process group, PartialState, is kept)
        AcceleratorState._reset_state()
    trackers: list = [JsonlTracker(Path(output_dir) / "metrics.jsonl")]
    if tensorboard and importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    # step_scheduler_with_optimizer=False: our schedules count optimizer steps of the global batch; accelerate's
    # default steps them num_processes times per call (the LR warm-up and decay ran N times too fast under N processes)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        log_with=trackers,
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,
    )
    accelerator.init_trackers("tensorboard")
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    topology = accelerator.distributed_type.value
    if topology not in VERIFIED_TOPOLOGIES:
        accelerator.print(
            f"[rlhf] note: {topology} with {accelerator.num_processes} processes has not been run by this project's "
            "tests; docs/scaling.md lists what has. Check the first checkpoint before a long run."
        )
    return accelerator


# What the project's own tests run (docs/scaling.md); any other topology says so in one line at start-up.
VERIFIED_TOPOLOGIES = {
    "NO": "one process: CPU in CI, one GPU (H100, bf16) by hand",
    "MULTI_CPU": "2 CPU processes (torchrun, gloo) in CI: SFT, RM, PPO (= 1 process to 1e-5), SIGTERM, resume",
}


def sharded_parameters(accelerator: Accelerator) -> bool:
    """True when each process holds a shard of the parameters (FSDP, DeepSpeed ZeRO-3), not a whole copy."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def prepare_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen role (PPO's reference and reward models) ready for inference on this topology.

    One process / DDP: the module on this device (nothing to synchronise, no wrapper). FSDP: sharded like the
    trained roles (accelerate's FSDP preparation), so a large frozen copy is not held whole on every GPU.
    DeepSpeed ZeRO-3: a parameter-partitioned inference engine (`deepspeed.initialize` without an optimizer, as
    DeepSpeed documents for models that are only run forward); ZeRO-1/2 partition only optimizer state and
    gradients, so there the module is kept whole. Not run by this project's tests (docs/scaling.md).
    Unsharded under bf16/fp16 autocast (one process, DDP): the Linear weights are stored in that half dtype, which
    changes no output (`rlhf.models.half_precision_linears`) and halves their memory.
    """
    model.requires_grad_(False).eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.is_fsdp2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, model)
        return accelerator.prepare_model(model)
    if sharded_parameters(accelerator):  # ZeRO-3
        import deepspeed

        plugin = accelerator.state.deepspeed_plugin
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10_000},
            "bf16": {"enabled": accelerator.mixed_precision == "bf16"},
            "fp16": {"enabled": accelerator.mixed_precision == "fp16"},
        }
        offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_param")
        if offload:
            config["zero_optimization"]["offload_param"] = offload
        engine, *_ = deepspeed.initialize(model=model, config=config)
        return engine.eval()
    model = model.to(accelerator.device)
    half_precision_linears(model, accelerator.autocast)
    return model


def clip_grad_norm(accelerator: Accelerator, parameters, max_norm: float) -> torch.Tensor:
    """The gradients' global L2 norm, after clipping them to `max_norm` when it is > 0 (0: no clipping).

    Without clipping, whole (unsharded) fp32/bf16 gradients are only measured: torch's clip multiplies every
    gradient by its clamped coefficient of 1.0 (a pass over all of them per step: 3% of a tiny PPO iteration).
    Sharded parameters (FSDP, ZeRO-3), DeepSpeed and fp16's loss scaling take accelerate's clip, which knows them.
    """
    special = sharded_parameters(accelerator) or accelerator.distributed_type == DistributedType.DEEPSPEED
    if max_norm or special or accelerator.scaler is not None:
        return accelerator.clip_grad_norm_(parameters, max_norm or float("inf"))
    # DDP has all-reduced the gradients by now: the local norm is the global one
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def compiled_for_training(accelerator: Accelerator, model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """The module a stage's training forwards call: `model` itself, or with `train.compile` a `torch.compile`d
    view of it (the same parameters and wrapper; TorchInductor; shapes start static and turn dynamic at the first
    change). Only the differentiated forwards use it: generation (a KV cache that grows every step would
    recompile), rollout scoring, evaluation and saving keep the eager `model`.

    DDP: compiling the wrapper keeps its gradient all-reduce and `no_sync` (DDP's forward runs eagerly, dynamo
    compiles the module inside it; tested against one eager process). FSDP / DeepSpeed with compile: not run here.
    """
    if not enabled:
        return model
    compilers = ("g++", "clang++", "c++")
    if accelerator.device.type == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, compilers))):
        raise ConfigError(
            "train.compile: true on CPU needs a C++ compiler (TorchInductor builds C++ kernels) and none was found "
            "(g++, clang++, c++ or $CXX): install one, or set train.compile: false"
        )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.print(
            f"[compile] train.compile under {accelerator.distributed_type.value}: not run by rlhf's tests "
            "(single process and DDP on CPU are); DeepSpeed has its own compile settings"
        )
    return torch.compile(model)


class ModelLanes:
    """Runs independent pieces of work, each on its own models, side by side in threads, or one after the other.

    On a CPU a small model's forward + backward leaves cores idle: eager per-op overhead (Python, dispatch, autograd)
    runs on one thread and thin matmuls do not fill two. Two models' work in two threads, each with its share of the
    intra-op threads, finishes sooner than the same work in sequence (PPO's policy and critic updates: 8-17% off the
    train phase, docs/benchmarks.md). The results are those of running the tasks in sequence: each task touches only
    its own parameters, gradients and optimizer, grad mode and CPU autocast are carried into the threads, and
    nothing in them may use the global random generator (`concurrent_models` keeps models with dropout or gradient
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


@contextlib.contextmanager
def generation_context(accelerator: Accelerator, model: torch.nn.Module):
    """The module to call `generate` on, and whether ranks must keep stepping together (`synced_gpus`).

    Under ZeRO-3 the policy's parameters are gathered for the whole generation (one all-gather instead of one per
    layer per token, as TRL and OpenRLHF do); under FSDP every forward all-gathers, so every rank must run as
    many decoding steps as the slowest (HF generate's `synced_gpus`).
    """
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and sharded_parameters(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped, True
    elif accelerator.distributed_type == DistributedType.FSDP:
        yield unwrapped, True
    else:
        yield unwrapped, False


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
    # the fused kernel (one pass over each tensor instead of ~10 elementwise ops) does the same update; measured
    # 6x faster than the per-tensor loop on CPU for a 3.5M-parameter model, where PPO steps it 32 times an iteration
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_ADAM_DTYPES for p in params)
    return torch.optim.AdamW(groups, lr=lr or optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)


FUSED_ADAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


MANIFEST = "checkpoint.json"


def write_manifest(directory: Path, step: int) -> None:
    """checkpoint.json: every file of the checkpoint with its size, so a truncated file is detected on resume."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    write_json(directory / MANIFEST, {"step": step, "files": files})


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint dir cannot be resumed from (None if it looks complete): no state/, or a file missing or of
    another size than its manifest recorded. Checkpoints from before manifests existed are trusted."""
    if not (path / "state").is_dir():
        return "no state/ inside"
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def resume_state(accelerator: Accelerator, resume: str, output_dir: str | Path, name: str) -> Path | None:
    """Load the training state to resume from and return its checkpoint dir (None: start fresh).

    `auto` tries the newest complete checkpoint; one that is damaged (its manifest disagrees with the files, or
    loading fails) is skipped with a warning for the previous one; if checkpoints exist but none is usable the
    run stops (CheckpointError) rather than silently start over. An explicit path must be usable itself."""
    if resume == "never":
        return None
    explicit = resume != "auto"
    candidates = [Path(resume)] if explicit else checkpoint_dirs(output_dir)[::-1]
    tried = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            try:
                accelerator.load_state(str(ckpt / "state"))
            except Exception as e:  # any failure to read the state means this checkpoint is unusable
                problem = f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})"
        if problem is None:
            if tried:
                accelerator.print(f"[{name}] warning: resuming from {ckpt.name}, skipped {'; '.join(tried)}")
            return ckpt
        tried.append(f"{ckpt.name} ({problem})")
        accelerator.print(f"[{name}] warning: checkpoint {ckpt} is unusable: {problem}")
    if explicit:
        raise CheckpointError(f"resume: {resume} is not a usable checkpoint: {tried[0]}. Fix resume: or use auto")
    if tried:
        raise CheckpointError(
            f"no usable checkpoint in {output_dir}: {'; '.join(tried)}. Delete them to start over (or set "
            "resume: never)"
        )
    return None


def publish_atomically(accelerator: Accelerator, target: Path, write, step: int | None = None) -> Path:
    """Run `write(tmp_dir)` on every process, then rename `<target>.tmp` -> `target`: the dir exists only complete.

    With `step`, a manifest of the files is written last (a checkpoint). An OSError (full disk, read-only dir)
    removes the partial dir and raises CheckpointError: whatever `target` held before is untouched until the rename.
    """
    tmp = target.with_name(target.name + ".tmp")
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        write(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if step is not None:
                write_manifest(tmp, step)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in checkpoint_dirs(target.parent)]
        raise CheckpointError(
            f"could not write {target}: {e.strerror or e} ({type(e).__name__}). Nothing already written was "
            f"touched (complete checkpoints: {', '.join(previous) or 'none'}). Free disk space or make "
            f"{target.parent} writable, then run the same command to resume"
        ) from e
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

    check_finite_weights(accelerator, models, f"checkpoint-{step}")
    final = publish_atomically(accelerator, Path(output_dir) / f"checkpoint-{step}", write, step=step)
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


def publish_final(accelerator: Accelerator, output_dir: str | Path, write, models: dict[str, Any]) -> Path:
    """`<output_dir>/final`, written by `write(tmp_dir)`, exists only when complete (and `models` are finite)."""
    check_finite_weights(accelerator, models, "final/")
    return publish_atomically(accelerator, Path(output_dir) / "final", write)


def final_model(accelerator: Accelerator, model, lora: LoraConfig):
    """The trained model as `final/` holds it: unwrapped, with LoRA merged into the weights when asked.

    With sharded parameters (FSDP, ZeRO-3) the wrapped model is returned: save_final gathers its full state dict.
    """
    if sharded_parameters(accelerator):
        return model
    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, TokenValueModel):  # a trained reward/value model is saved as its HF model
        unwrapped = unwrapped.model
    return unwrapped.merge_and_unload() if lora.enabled and lora.merge_on_save else unwrapped


def save_final(accelerator: Accelerator, model, path: Path, tokenizer, cfg) -> None:
    """`final/` in Hugging Face form: the model (or peft adapter), its tokenizer and the resolved config.

    With sharded parameters every process takes part in gathering the full state dict (accelerate's
    `get_state_dict`: FSDP full-state-dict, ZeRO-3 16-bit consolidation) and rank 0 writes it; a LoRA adapter is then
    saved unmerged (merging needs the whole model on one device: `peft`'s merge_and_unload on the saved adapter).
    """
    if sharded_parameters(accelerator):
        save_hf(accelerator, model, path, tokenizer)
        if accelerator.is_main_process:
            save_config(cfg, path / "rlhf_config.yaml")
        return
    if accelerator.is_main_process:
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
        save_config(cfg, path / "rlhf_config.yaml")


# --------------------------------------------------------------------------------------------------
# Faults: signals, non-finite numbers, checkpoints that cannot be written
# --------------------------------------------------------------------------------------------------

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on a signal after a checkpoint; the same command resumes


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or no usable one can be read; the message says what is intact and what to do."""


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
        accelerator.end_training()
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
            batches = [
                task.collate(mine[s : s + cfg.train.micro_batch_size])
                for s in range(0, len(mine), cfg.train.micro_batch_size)
            ]
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
