"""The run time every stage shares: the accelerator and precision, CPU memory settings, frozen and compiled
models, the model lanes, seeds, the optimizer and its schedule, batch splits."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import math
import os
import platform
import random
import shutil
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState

from rlhf.config import ConfigError, OptimConfig
from rlhf.models.loading import (
    cpu_backend,
    half_precision_linears,
)
from rlhf.runtime.tracking import JsonlTracker


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


def not_installed(name: str) -> str:
    return f"logging.report_to: {name} is not installed; pip install 'rlhf[track]' (or {name}), or remove it"


def external_tracker(name: str, output_dir: str | Path, config: dict | None = None):
    """An accelerate tracker for `name` (wandb, trackio, mlflow): project `rlhf` (WANDB_PROJECT overrides for
    wandb), run named after the output dir, each tool's own local store when offline (wandb under the output dir,
    trackio in its local store, mlflow at MLFLOW_TRACKING_URI or MLflow's default ./mlflow.db with artifacts under
    the output dir). `config` (flat) is given to trackio at its start (its later config update would record
    accelerate's `allow_val_change` flag as a key); ConfigError when the package is missing."""
    import accelerate.tracking as tracking

    if importlib.util.find_spec(name) is None:
        raise ConfigError(not_installed(name))
    run = Path(output_dir).resolve().name
    if name == "wandb":
        return tracking.WandBTracker(os.environ.get("WANDB_PROJECT", "rlhf"), name=run, dir=str(output_dir))
    if name == "mlflow":
        check_mlflow_store()
        return tracking.MLflowTracker("rlhf", logging_dir=str(Path(output_dir).resolve() / "mlruns"), run_name=run)
    return tracking.TrackioTracker("rlhf", name=run, config=config)


def check_mlflow_store() -> None:
    """MLflow's local stores are databases (its file store refuses new runs since 3.x): with mlflow-skinny alone
    the default sqlite store fails at the first call, deep inside SQLAlchemy; say so before any work."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite") and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"logging.report_to: mlflow's tracking store {uri} needs sqlalchemy and alembic (mlflow-skinny lacks "
            "them); pip install mlflow, or set MLFLOW_TRACKING_URI to a tracking server"
        )


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested config dict -> {dotted key: value} with lists and None as strings (what trackers store)."""
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def make_accelerator(
    mixed_precision: str,
    output_dir: str | Path,
    tensorboard: bool,
    cpu: bool = False,
    report_to: list[str] | tuple = (),
    config: Any = None,
) -> Accelerator:
    """An Accelerator that logs to `<output_dir>/metrics.jsonl` (and TensorBoard when installed and asked for), and
    to the trackers of `logging.report_to`, each given the resolved `config` (a stage's dataclass)."""
    if mixed_precision == "auto":
        mixed_precision = "bf16" if fast_bf16(cpu) else "no"
    cpu = cpu_backend(cpu)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        # one process running stages of different precisions (rlhf pipeline, tests): accelerate keeps one state per
        # process and refuses a second precision; start a new one (the process group, PartialState, is kept)
        AcceleratorState._reset_state()
    trackers: list = [JsonlTracker(Path(output_dir) / "metrics.jsonl")]
    if (tensorboard or "tensorboard" in report_to) and importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    flat = flat_config(dataclasses.asdict(config)) if config is not None else None
    extra = [external_tracker(name, output_dir, flat) for name in dict.fromkeys(report_to) if name != "tensorboard"]
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(not_installed("tensorboard"))
    # step_scheduler_with_optimizer=False: our schedules count optimizer steps of the global batch; accelerate's
    # default steps them num_processes times per call (the LR warm-up and decay ran N times too fast under N processes)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        log_with=trackers + extra,
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,
    )
    accelerator.init_trackers("tensorboard")
    if flat is not None and accelerator.is_main_process:
        for tracker in extra:
            if tracker.name != "trackio":  # trackio had it at its start
                tracker.store_init_configuration(flat)
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    topology = accelerator.distributed_type.value
    if topology not in VERIFIED_TOPOLOGIES:
        accelerator.print(
            f"[rlhf] note: {topology} with {accelerator.num_processes} processes has not been run by this project's "
            "tests; docs/scaling.md lists what has. Check the first checkpoint before a long run."
        )
    return accelerator


def stage_accelerator(cfg: Any) -> Accelerator:
    """`make_accelerator` for a stage's config (SFT, RM, DPO, PPO): its precision, output dir, trackers and CPU
    flag, with the config itself given to the trackers."""
    t, log = cfg.train, cfg.logging
    return make_accelerator(t.mixed_precision, cfg.output_dir, log.tensorboard, t.cpu, log.report_to, cfg)


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
    changes no output (`rlhf.models.loading.half_precision_linears`) and halves their memory.
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


def stage_shares_prompt(share_prompt: bool, accelerator, stage: str) -> bool:
    """Whether a stage's `share_prompt` applies: never through parameters sharded by FSDP / ZeRO-3 (the prompt's
    forward and its responses' run apart). Says which at start when it was asked for."""
    applies = share_prompt and not sharded_parameters(accelerator)
    if share_prompt:
        accelerator.print(
            f"[{stage}] share_prompt: "
            + ("each prompt runs once per micro-batch" if applies else "off (parameters sharded: FSDP / ZeRO-3)")
        )
    return applies
