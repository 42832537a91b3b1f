"""Bytes and FLOPs of one role on one device: activations, logits, KV cache, precision, sharding, static memory.

Activations follow Korthikanti et al. 2022, counted for a Llama block with fused (SDPA) attention and no dropout; the
static memory of a role is weights + gradients + optimizer state at the bytes its precision and topology give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf.config import ConfigError, ModelConfig
from rlhf.tools.plan.shapes import ModelShape, lora_params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOPOLOGIES = ("ddp", "fsdp", "zero2", "zero3")


def layer_activation_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """Bytes one transformer block keeps for backward (one micro-batch of `batch` x `seq` tokens at p bytes)."""
    h, hq, hkv, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    per_token = p * (4 * h + 2 * hq + 2 * hkv + 4 * inter)
    if shape.eager_attention:
        per_token += shape.heads * seq * (p + 4)  # scores softmaxed in fp32, cast back to p
    return batch * seq * per_token


def logits_bytes(shape: ModelShape, batch: int, seq: int, p: int, trained: bool) -> int:
    """The LM head's [b, s, V] logits and what the loss/log-prob code makes of them (dominant for big vocabularies).

    Trained: logits + the loss's fp32 shifted copy + its fp32 log-softmax (the forward's peak; in backward the fp32
    gradient takes the place of the freed logits and copy). Forward-only: the logits plus one fp32
    temporary of their size (16-bit logits are upcast one row [s, V] at a time by rlhf.algorithms)."""
    if trained:
        return batch * seq * shape.vocab * (p + 8)
    return batch * seq * shape.vocab * p + (batch if p == 4 else 1) * seq * shape.vocab * 4


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    p: int,
    checkpointing: bool,
    lm_head: bool,
    trained: bool = True,
    logit_positions: int = 0,
) -> int:
    """Peak activation bytes of one forward(+backward) of a micro-batch.

    Trained: every layer's saved tensors (or, with gradient checkpointing, each layer's input plus one layer
    recomputed), the embedding output, plus the logits (of `logit_positions` positions when > 0: PPO's forwards
    ask the LM head for the response positions only). Forward-only: about one layer's tensors at a time."""
    if batch <= 0 or seq <= 0:
        return 0
    layer = layer_activation_bytes(shape, batch, seq, p)
    if trained:
        kept = shape.layers * batch * seq * shape.hidden * p + layer if checkpointing else shape.layers * layer
        kept += batch * seq * shape.hidden * p
    else:
        kept = layer
    return kept + (logits_bytes(shape, batch, logit_positions or seq, p, trained) if lm_head else 0)


def kv_cache_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """Generation's KV cache: batch x seq x layers x 2 (K and V) x kv_heads x head_dim x p."""
    return batch * seq * shape.layers * 2 * shape.kv_heads * shape.head_dim * p


@dataclass
class Precision:
    """What the dtype / mixed-precision / topology combination means for bytes per value."""

    weight: int
    """Bytes per stored weight."""
    grad: int
    """Bytes per gradient value."""
    optimizer: int
    """Optimizer bytes per trainable parameter (AdamW m + v, plus fp32 master weights where kept)."""
    activation: int
    """Bytes per activation value."""


def precision(dtype: str, mixed_precision: str, topology: str) -> Precision:
    """Bytes per value. accelerate's native mixed precision (ddp, fsdp) autocasts and keeps the loaded dtype for
    weights, grads and AdamW state; DeepSpeed ZeRO with bf16/fp16 holds 16-bit weights and grads and fp32 master
    weights + m + v in the optimizer (the ZeRO paper's 2 + 2 + 12 bytes)."""
    w = DTYPE_BYTES[dtype]
    low = mixed_precision in ("bf16", "fp16")
    act = 2 if low or w == 2 else 4
    if topology.startswith("zero") and low:
        return Precision(weight=2, grad=2, optimizer=12, activation=act)
    return Precision(weight=w, grad=w, optimizer=2 * w, activation=act)


def shard_divisors(topology: str, num_processes: int) -> tuple[int, int, int]:
    """(weights, grads, optimizer) divisors for a trained role: ddp none; zero2 grads + optimizer; zero3 and fsdp
    (full sharding) all three."""
    if topology not in TOPOLOGIES:
        raise ConfigError(f"--topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    n = max(1, num_processes)
    return {"ddp": (1, 1, 1), "zero2": (1, n, n), "zero3": (n, n, n), "fsdp": (n, n, n)}[topology]


@dataclass
class RoleEstimate:
    """One role's bytes on one device."""

    role: str
    params: int
    trainable: int
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    """The role's own peak transient bytes (its largest micro-batch forward/backward)."""
    kv_cache: int = 0
    note: str = ""

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations + self.kv_cache


def role_static(
    role: str,
    params: int,
    trainable: int,
    prec: Precision,
    topology: str,
    num_processes: int,
    note: str = "",
) -> RoleEstimate:
    """Weights, gradients and optimizer state of a role; trainable == 0 means frozen (weights only, sharded like
    the trained roles under fsdp / zero3: rlhf.runtime.accelerator.prepare_frozen)."""
    dw, dg, do = shard_divisors(topology, num_processes)
    if trainable == 0:
        return RoleEstimate(role, params, 0, weights=math.ceil(params * prec.weight / dw), note=note)
    return RoleEstimate(
        role,
        params,
        trainable,
        weights=math.ceil(params * prec.weight / dw),
        grads=math.ceil(trainable * prec.grad / dg),
        optimizer=math.ceil(trainable * prec.optimizer / do),
        note=note,
    )


def frozen_role(
    role: str,
    params: int,
    linear_params: int,
    dtype: str,
    mixed_precision: str,
    topology: str,
    num_processes: int,
    note: str = "",
) -> RoleEstimate:
    """A frozen role's weights: its loaded dtype (a ZeRO-3 inference engine casts to the training's half
    precision); unsharded under bf16/fp16 autocast its fp32 Linear weights are kept in 2 bytes
    (rlhf.runtime.accelerator.prepare_frozen), the rest (embeddings, norms, a scalar head) in the loaded dtype."""
    prec = precision(dtype, mixed_precision, "zero3" if topology == "zero3" else "ddp")
    est = role_static(role, params, 0, prec, topology, num_processes, note=note)
    if topology == "ddp" and mixed_precision in ("bf16", "fp16") and prec.weight == 4 and linear_params:
        est.weights -= linear_params * 2
        est.note = f"{note}, Linears in {mixed_precision}" if note else f"Linears in {mixed_precision}"
    return est


def gathered_bytes(shape: ModelShape, p: int, topology: str, scalar: bool = False, grads: bool = False) -> int:
    """FSDP2 / ZeRO-3: the whole parameters a sharded model holds while it runs — its root unit (embeddings, final
    norm, LM or score head) for the whole forward, and two decoder layers (the one computing and the one
    prefetched) — plus, in a backward, their unsharded gradients before the reduce-scatter. 0 unsharded."""
    if topology not in ("fsdp", "zero3"):
        return 0
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layer = shape.hidden * (2 * q + 2 * kv) + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden
    total = shape.params_scalar if scalar else shape.params_lm
    root = max(0, total - shape.layers * layer)
    return (root + 2 * layer) * p * (2 if grads else 1)


def train_flops_per_token(params: int, lora: bool, checkpointing: bool) -> int:
    """6N (forward 2N + backward 4N); LoRA 4N (no weight gradients of the frozen base); +2N recomputation."""
    return (4 if lora else 6) * params + (2 * params if checkpointing else 0)


def trained_lm_role(name: str, m: ModelConfig, shape: ModelShape, prec: Precision, topology: str, n: int, note: str):
    """A trained causal LM's static bytes: all its weights trained, or the frozen base plus LoRA adapters."""
    trainable = lora_params(shape, m.lora.r, m.lora.target_modules) if m.lora.enabled else shape.params_lm
    params = shape.params_lm + (trainable if m.lora.enabled else 0)
    return role_static(name, params, trainable, prec, topology, n, note="LoRA" if m.lora.enabled else note)
