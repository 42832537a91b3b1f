"""The accelerator a stage runs on: its precision, trackers and topology, the frozen roles prepared for it,
gradient clipping, compiled training forwards, the module generation runs on, and which features a topology
allows."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState

from rlhf.config import ConfigError
from rlhf.models.precision import half_precision_linears
from rlhf.runtime.cpu import keep_freed_memory
from rlhf.runtime.devices import cpu_backend
from rlhf.runtime.tracking import run_trackers


def fast_bf16(cpu: bool = False) -> bool:
    """Whether bf16 autocast pays here: a CUDA GPU with bf16, or (no GPU, or train.cpu) a CPU with bf16 matrix
    instructions (AVX512-BF16 or AMX), where oneDNN's bf16 matmuls outrun fp32 (docs/benchmarks.md)."""
    if torch.cuda.is_available() and not cpu:
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


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
    trackers = run_trackers(output_dir, tensorboard, report_to, config)
    # step_scheduler_with_optimizer=False: our schedules count optimizer steps of the global batch; accelerate's
    # default steps them num_processes times per call (the LR warm-up and decay would run N times too fast)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        log_with=trackers.log_with,
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,
    )
    if _fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _shard_on_cpu(accelerator)
    accelerator.init_trackers("tensorboard")
    trackers.store_config(accelerator)
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    topology = accelerator.distributed_type.value
    if topology not in VERIFIED_TOPOLOGIES:
        accelerator.print(
            f"[rlhf] note: {topology} with {accelerator.num_processes} processes has not been run by this project's "
            "tests; docs/scaling.md lists what has. Check the first checkpoint before a long run."
        )
    return accelerator


def _fsdp_requested() -> bool:
    """FSDP asked for by the launch (`accelerate launch --config_file configs/accelerate/fsdp.yaml` sets it)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def _shard_on_cpu(accelerator: Accelerator) -> None:
    """Run FSDP2 on CPU processes (gloo) instead of the DDP accelerate falls back to there.

    accelerate picks FSDP only for accelerator devices, but PyTorch's FSDP2 (`fully_shard`) shards over gloo just as
    it does over NCCL. Setting the topology to FSDP before anything is prepared makes every later call
    (`prepare`, `save_state`, `get_state_dict`, `unwrap_model`) take accelerate's FSDP2 path: the code path a GPU
    run takes, proven here by two CPU processes against one (tests/test_fsdp.py)."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU processes runs FSDP2 only: set fsdp_version: 2 in the launch config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.print(
        f"[rlhf] FSDP2 on {accelerator.num_processes} CPU processes (gloo): parameters, gradients and optimizer "
        "state sharded"
    )


def stage_accelerator(cfg: Any) -> Accelerator:
    """`make_accelerator` for a stage's config (SFT, RM, DPO, PPO): its precision, output dir, trackers and CPU
    flag, with the config itself given to the trackers."""
    t, log = cfg.train, cfg.logging
    return make_accelerator(t.mixed_precision, cfg.output_dir, log.tensorboard, t.cpu, log.report_to, cfg)


# What the project's own tests run (docs/scaling.md); any other topology says so in one line at start-up.
VERIFIED_TOPOLOGIES = {
    "NO": "one process: CPU in CI, one GPU (H100, bf16) by hand",
    "MULTI_CPU": "2 CPU processes (torchrun, gloo) in CI: SFT, RM, PPO (= 1 process to 1e-5), SIGTERM, resume",
    "FSDP": "FSDP2 on 2 CPU processes (gloo) in CI: SFT, RM, DPO, PPO (= 1 process to 1e-5), SIGTERM, resume",
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
    DeepSpeed ZeRO-3: a parameter-partitioned inference engine (`_zero3_inference_engine`); ZeRO-1/2 partition
    only optimizer state and gradients, so there the module is kept whole. Not run by this project's tests
    (docs/scaling.md). Unsharded under bf16/fp16 autocast (one process, DDP): the Linear weights are stored in that
    half dtype, which changes no output (`rlhf.models.precision.half_precision_linears`) and halves their memory.
    """
    model.requires_grad_(False).eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        if accelerator.is_fsdp2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, model)
        return accelerator.prepare_model(model)
    if sharded_parameters(accelerator):  # ZeRO-3
        return _zero3_inference_engine(accelerator, model)
    model = model.to(accelerator.device)
    half_precision_linears(model, accelerator.autocast)
    return model


def _zero3_inference_engine(accelerator: Accelerator, model: torch.nn.Module):
    """`deepspeed.initialize` without an optimizer, as DeepSpeed documents for models that are only run forward:
    ZeRO-3 parameter partitioning in the run's precision, with the run's parameter offload if it has one."""
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


def clip_grad_norm(accelerator: Accelerator, parameters, max_norm: float) -> torch.Tensor:
    """The gradients' global L2 norm, after clipping them to `max_norm` when it is > 0 (0: no clipping).

    Without clipping, whole (unsharded) fp32/bf16 gradients are only measured: torch's clip would multiply every
    gradient by its clamped coefficient of 1.0, a pass over all of them per step for nothing.
    Sharded parameters (FSDP, ZeRO-3), DeepSpeed and fp16's loss scaling take accelerate's clip, which knows them.
    """
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2:
        return _clip_sharded(accelerator, list(parameters), max_norm)
    special = sharded_parameters(accelerator) or accelerator.distributed_type == DistributedType.DEEPSPEED
    if max_norm or special or accelerator.scaler is not None:
        return accelerator.clip_grad_norm_(parameters, max_norm or float("inf"))
    # DDP has all-reduced the gradients by now: the local norm is the global one
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def _clip_sharded(accelerator: Accelerator, parameters: list, max_norm: float) -> torch.Tensor:
    """FSDP2: the global norm of DTensor gradients (each rank's shard norm, combined across ranks), then the clip.
    accelerate's own clip finds the model by comparing parameter lists, which fails once two models are prepared
    (PPO's policy and critic)."""
    from torch.distributed.tensor import DTensor

    accelerator.unscale_gradients()
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


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


@contextlib.contextmanager
def generation_context(accelerator: Accelerator, model: torch.nn.Module):
    """The module to call `generate` on, and whether ranks must keep stepping together (`synced_gpus`).

    Under ZeRO-3 the policy's parameters are gathered for the whole generation (one all-gather instead of one per
    layer per token, as TRL and OpenRLHF do); under FSDP2 the root's own parameters are gathered for the whole
    generation and each layer's in its forward, so every rank must run as many decoding steps as the slowest (HF
    generate's `synced_gpus`).
    """
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and sharded_parameters(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped, True
    elif accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FSDPModule

        # FSDP2: the root's own parameters (embeddings, final norm, LM head) are gathered by the root's forward hook,
        # which `generate` bypasses when the root is a wrapper (a peft model generates through its base model):
        # gather them for the whole generation; each decoder layer still gathers its own in its forward
        root = model if isinstance(model, FSDPModule) else None
        if root is not None:
            # one token through the root first: FSDP2 sets up its state from the first module called, which must
            # be the root (a wrapper's generate would start at an inner one)
            with torch.no_grad():
                root(input_ids=torch.zeros(1, 1, dtype=torch.long, device=accelerator.device))
            root.unshard()
        try:
            yield unwrapped, True
        finally:
            if root is not None:
                root.reshard()
    else:
        yield unwrapped, False


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
