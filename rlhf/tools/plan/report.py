"""A stage's plan as a record, and its printed table; `--device-memory` sizes parsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.config import ConfigError
from rlhf.tools.plan.memory import RoleEstimate

GiB = 1024**3


@dataclass
class Plan:
    """The estimate for one stage on one device."""

    stage: str
    roles: list[RoleEstimate]
    phases: dict[str, int]
    """Transient bytes per phase (activations + KV cache that are alive together); the largest counts."""
    tokens: dict[str, int]
    """Tokens per optimizer step (SFT/RM) or PPO iteration, by kind (trained, forward-only, generated)."""
    flops: int
    """FLOPs per step/iteration, all processes together."""
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        return sum(r.static for r in self.roles)

    @property
    def peak_phase(self) -> tuple[str, int]:
        name = max(self.phases, key=lambda k: self.phases[k]) if self.phases else ""
        return name, self.phases.get(name, 0)

    @property
    def total(self) -> int:
        return self.static + self.peak_phase[1]

    def seconds(self, tflops: float, num_processes: int) -> float:
        """Time per step/iteration at `tflops` achieved TFLOP/s per device."""
        return self.flops / (tflops * 1e12 * max(1, num_processes))


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '24g', '1.5TiB', '512MiB' or a plain number of GiB -> bytes."""
    units = {"": GiB, "g": GiB, "gb": 10**9, "gib": GiB, "m": 1024**2, "mb": 10**6, "mib": 1024**2}
    units |= {"t": 1024**4, "tb": 10**12, "tib": 1024**4}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not 0 < value < float("inf"):
        raise ConfigError(f"--device-memory {text!r}: expected a size such as 80GiB, 24GB or 40")
    return int(value * units[unit])


def _size(b: int, unit: int) -> str:
    return f"{b / unit:.2f}" if b else "-"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_plan(plan: Plan, device_memory: int | None = None, tflops: float | None = None) -> str:
    """A readable table (GiB per device) and the summary lines."""
    s = plan.settings
    unit, uname = (GiB, "GiB") if plan.total >= GiB else (1024**2, "MiB")

    def _gib(b: int) -> str:
        return _size(b, unit)

    lines = [
        f"rlhf plan: {plan.stage}, {s['topology']} x {s['num_processes']} process(es), mixed_precision="
        f"{s['mixed_precision']}; per device, {uname}",
        "",
    ]
    head = ("role", "params", "trained", "weights", "grads", "optimizer", "activations", "kv-cache", "total", "")
    rows = [
        (
            r.role,
            _count(r.params),
            _count(r.trainable) if r.trainable else "-",
            _gib(r.weights),
            _gib(r.grads),
            _gib(r.optimizer),
            _gib(r.activations),
            _gib(r.kv_cache),
            _gib(r.total),
            r.note,
        )
        for r in plan.roles
    ]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, len(head) - 1) else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*head).rstrip())
    lines.extend(fmt.format(*row).rstrip() for row in rows)
    phase, peak = plan.peak_phase
    lines += [
        "",
        "phases (transient, not at the same time): "
        + ", ".join(f"{k} {_gib(v)}" for k, v in plan.phases.items())
        + f"  -> peak in {phase}",
        f"device total = static {_gib(plan.static)} + {phase} {_gib(peak)} = {plan.total / GiB:.2f} GiB",
        "tokens per "
        + ("iteration" if plan.stage == "ppo" else "step")
        + ": "
        + ", ".join(f"{k} {v:,}" for k, v in plan.tokens.items()),
        f"FLOPs per {'iteration' if plan.stage == 'ppo' else 'step'}: {plan.flops:.3g}",
    ]
    if tflops:
        secs = plan.seconds(tflops, s["num_processes"])
        lines.append(
            f"time at {tflops:g} TFLOP/s per device: {secs:.3g} s per {'iteration' if plan.stage == 'ppo' else 'step'}"
        )
    lines += [f"note: {n}" for n in plan.notes]
    if device_memory is not None and plan.total > device_memory:
        lines.append(
            f"WARNING: the estimate ({plan.total / GiB:.2f} GiB) exceeds the device memory "
            f"({device_memory / GiB:.2f} GiB): lower the micro-batch, turn on gradient checkpointing or LoRA, "
            "or shard (--topology zero3/fsdp)"
        )
    return "\n".join(lines)
