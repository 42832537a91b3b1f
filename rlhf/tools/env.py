"""`rlhf env`: what a bug report needs and what a run here would do: library versions, devices, whether
`mixed_precision: auto` takes bf16, how many processes accelerate would start, and what `rlhf plan` assumes."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch
import yaml

from rlhf.runtime.accelerator import fast_bf16
from rlhf.runtime.model_card import library_versions

LAUNCH_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices() -> list[str]:
    """One line per CUDA device (name, memory), then the CPU."""
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    out.append(f"cpu: {cpu_name()}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    return out


def precision() -> dict[str, str]:
    """What `train.mixed_precision: auto` becomes here, with and without `train.cpu`."""
    gpu = torch.cuda.is_available()
    auto = "bf16" if fast_bf16() else "no (fp32)"
    why = "the GPU supports bf16" if gpu else "bf16 matrix instructions (AVX512-BF16 / AMX)"
    if auto.startswith("no"):
        why = "the GPU lacks bf16" if gpu else "no bf16 matrix instructions: fp32 is faster here"
    out = {"mixed_precision auto": f"{auto}: {why}"}
    if gpu:
        out["mixed_precision auto, train.cpu"] = "bf16" if fast_bf16(cpu=True) else "no (fp32)"
    return out


def accelerate_topology() -> dict[str, str]:
    """How many processes `rlhf <stage>` and `accelerate launch -m rlhf <stage>` would run, and where from."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = {"rlhf <stage>": f"1 process on {'cuda:0' if gpus else 'the CPU'}"}
    launched = {k: os.environ[k] for k in LAUNCH_VARIABLES if k in os.environ}
    if launched:
        out["launched now"] = ", ".join(f"{k}={v}" for k, v in launched.items())
    from accelerate.commands.config import default_config_file

    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file))
    if path.is_file():
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            cfg = {"error": f"unreadable ({e})"}
        keys = ("distributed_type", "num_processes", "num_machines", "mixed_precision", "error")
        found = ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg)
        out["accelerate launch"] = f"{found} (from {path})"
    elif gpus > 1:
        out["accelerate launch"] = f"{gpus} processes, MULTI_GPU (DDP): no config file, accelerate's default"
    else:
        out["accelerate launch"] = f"1 process (no config file at {path}; `accelerate config` writes one)"
    return out


def environment(plan_defaults: dict[str, object] | None = None) -> dict[str, dict[str, str] | list[str]]:
    """Everything `rlhf env` prints, as sections of key -> text (devices: a list)."""
    versions = {"python": f"{sys.version.split()[0]} ({platform.platform()})"} | library_versions()
    versions["torch"] += f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
    plan = {
        "topology": str((plan_defaults or {}).get("topology", "ddp")),
        "processes": str((plan_defaults or {}).get("num_processes", 1)),
        "mixed_precision auto": "bf16 (planned for a GPU with bf16); fp32 when the config sets train.cpu",
    }
    return {
        "versions": versions,
        "devices": devices(),
        "precision": precision(),
        "processes": accelerate_topology(),
        "rlhf plan assumes (without --topology / --num-processes)": plan,
    }


def format_environment(env: dict) -> str:
    lines = []
    for section, body in env.items():
        lines.append(f"{section}:")
        if isinstance(body, list):
            lines += [f"  {line}" for line in body]
            continue
        width = max(len(k) for k in body)
        lines += [f"  {k:<{width}}  {v}" for k, v in body.items()]
    return "\n".join(lines)
