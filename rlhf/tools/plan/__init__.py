"""`rlhf plan`: per-device memory and time estimates for a stage's YAML, before any GPU hour is spent.

Everything here is arithmetic on a model's shape (read from its config.json; the parameter count comes from
instantiating the architecture on the `meta` device, which allocates nothing) and the stage config. The formulas
(docs/scaling.md, "Before you rent a GPU") are:

- weights   = params x bytes(model.dtype); a frozen role holds only this. Sharded (/N) under fsdp and zero3 for
              every role, the frozen reference and reward models included
              (rlhf.runtime.accelerator.prepare_frozen); unsharded (ddp) under bf16/fp16 autocast its Linear
              weights take 2 B (rlhf.models.precision.half_precision_linears).
- grads     = trainable x bytes(dtype) (DeepSpeed ZeRO with mixed precision: 2 B); /N under zero2, zero3, fsdp.
- optimizer = AdamW m and v: trainable x 2 x bytes(dtype) (torch keeps them in the parameter's dtype); under
              DeepSpeed ZeRO with mixed precision fp32 master weights + fp32 m, v: 12 B per trainable param; /N
              under zero2, zero3, fsdp. LoRA trains only the adapters: r x (in + out) per targeted Linear.
- activations (one micro-batch, training), per layer and token, at p bytes (2 under bf16/fp16, else 4):
              p x (4h + 2 h_q + 2 h_kv + 4 I)   [Korthikanti et al. 2022 counted for a Llama block with fused
              (SDPA) attention and no dropout: norm inputs 2h, normed inputs 2h, q and attention output 2 h_q,
              k and v 2 h_kv, gate, up, act(gate), gate*up 4I], + eager attention's scores a x s x (p + 4);
              with gradient checkpointing only each layer's input (p x h) is kept, plus one layer's full set
              recomputed in backward. Plus the LM logits: b x s x V x (p + 8) when trained (logits, the fp32
              shifted copy and log-softmax of the loss; the fp32 gradient reuses their room in backward);
              forward-only b x s x V x p plus one fp32 temporary (b x s x V x 4 for fp32 logits, s x V x 4 for
              16-bit ones, upcast row by row).
- kv-cache  = generation batch x (prompt + max_new_tokens) x layers x 2 x kv_heads x head_dim x p; with
              rollout.share_prompt and k > 1 samples per prompt each scoring model also holds one for its scoring
              micro-batch, and scores B/k prompts + B responses instead of B whole sequences (generation
              prefills the B/k prompts too).
- FLOPs     = 6 N per trained token (4 N with LoRA: no weight gradients for the frozen base; +2 N with gradient
              checkpointing), 2 N per forward-only or generated token.

The device total adds every role's static memory (weights, grads, optimizer state) to the largest phase's
transient memory (SFT/RM: training; PPO: generation, scoring or training), because phases do not overlap.

Modules: `shapes` (ModelShape from a config.json), `memory` (the per-role arithmetic above), `stages` (plan_sft,
plan_rm, plan_dpo, plan_ppo), `report` (Plan, format_plan, parse_bytes); this one reads a stage config and plans it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, DPOConfig, RMConfig
from rlhf.tools.plan.memory import (
    DTYPE_BYTES,
    TOPOLOGIES,
    Precision,
    RoleEstimate,
    activation_bytes,
    frozen_role,
    kv_cache_bytes,
    layer_activation_bytes,
    logits_bytes,
    precision,
    role_static,
    shard_divisors,
    train_flops_per_token,
    trained_lm_role,
)
from rlhf.tools.plan.report import GiB, Plan, format_plan, parse_bytes
from rlhf.tools.plan.shapes import ModelShape, ensemble_members, load_shape, lora_params, shape_from_hf_config
from rlhf.tools.plan.stages import (
    PADDED,
    SHARED_NOTE,
    plan_dpo,
    plan_ppo,
    plan_rm,
    plan_sft,
    ranked_forward,
    resolve_mixed_precision,
)

__all__ = [
    "DTYPE_BYTES",
    "PADDED",
    "SHARED_NOTE",
    "TOPOLOGIES",
    "GiB",
    "ModelShape",
    "Plan",
    "Precision",
    "RoleEstimate",
    "activation_bytes",
    "ensemble_members",
    "format_plan",
    "frozen_role",
    "guess_stage",
    "kv_cache_bytes",
    "layer_activation_bytes",
    "load_shape",
    "logits_bytes",
    "lora_params",
    "parse_bytes",
    "plan_config",
    "plan_dpo",
    "plan_ppo",
    "plan_rm",
    "plan_sft",
    "precision",
    "ranked_forward",
    "resolve_mixed_precision",
    "responses_per_prompt",
    "role_static",
    "shape_from_hf_config",
    "shard_divisors",
    "train_flops_per_token",
    "trained_lm_role",
]


def guess_stage(path: str | Path, data: dict | None = None) -> str:
    """sft / rm / dpo / ppo from the file name (pretrain.yaml is SFT) or, failing that, from the YAML's keys."""
    stem = Path(path).stem.lower()
    for stage, words in (("ppo", ("ppo",)), ("dpo", ("dpo",)), ("rm", ("rm", "reward")), ("sft", ("sft", "pretrain"))):
        if any(stem == w or stem.startswith(w + "_") or stem.startswith(w + "-") for w in words):
            return stage
    data = data or {}
    if "models" in data or "rollout" in data:
        return "ppo"
    if "ensemble" in data or "loss" in data or "reference" in (data.get("data") or {}):
        return "rm"
    if "policy" in data or "run_dir" in data:
        raise ConfigError(f"{path} looks like an eval config; `rlhf plan` plans the sft, rm and ppo stages")
    return "sft"


def responses_per_prompt(cfg: RMConfig | DPOConfig) -> int:
    """K of the RM data: the length of the first row's `ranked` list in a local json/jsonl file, else 2 (pairs)."""
    path = Path(cfg.data.train.path)
    if path.suffix == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8") as f:
            line = f.readline()
        try:
            row = json.loads(line)
        except ValueError:
            return 2
        ranked = row.get("ranked") if isinstance(row, dict) else None
        return len(ranked) if isinstance(ranked, list) and len(ranked) >= 2 else 2
    return 2


def plan_config(
    stage: str, cfg: Any, num_processes: int = 1, topology: str = "ddp", mixed_precision: str | None = None
) -> Plan:
    """Read the model shapes a validated stage config names and plan it."""
    shard_divisors(topology, num_processes)  # validates the topology
    if stage == "sft":
        return plan_sft(cfg, load_shape(cfg.model), num_processes, topology, mixed_precision)
    if stage == "rm":
        k = responses_per_prompt(cfg)
        return plan_rm(cfg, load_shape(cfg.model), num_processes, topology, mixed_precision, k)
    if stage == "dpo":
        k = responses_per_prompt(cfg)
        return plan_dpo(cfg, load_shape(cfg.model), num_processes, topology, mixed_precision, k)
    if stage == "ppo":
        m = cfg.models
        policy = load_shape(m.policy, "models.policy.name_or_path")
        if m.reward.name_or_path:
            reward = load_shape(m.reward, "models.reward.name_or_path")
            members = len(ensemble_members(m.reward.name_or_path)) or 1
        else:  # a reward function only: no reward model to hold
            reward, members = policy, 0
        return plan_ppo(cfg, policy, reward, members, num_processes, topology, mixed_precision)
    raise ConfigError(f"`rlhf plan` plans the sft, rm, dpo and ppo stages, not {stage!r}")
