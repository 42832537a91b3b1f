"""The attention kernel a model runs: `model.attn_implementation`, and with `auto` transformers' sdpa, except on the
CPU for short half-precision sequences, where it runs in fp32.

PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 at short sequences and faster only from a few
hundred keys on (docs/benchmarks.md); under bf16 autocast (or bf16 weights) every attention call of a
short-sequence run would land in the slow case. Casting a long bf16 KV cache to fp32 costs more than the kernel
saves, so long sequences keep the half-precision kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlhf.config import ModelConfig

CPU_SDPA = "rlhf_cpu_sdpa"
CPU_FP32_ATTENTION_MAX_KEYS = 256


def cpu_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention; on CPU, when the kernel would run in bf16/fp16 (half q/k/v, or under CPU
    autocast, which casts sdpa's inputs down) over at most CPU_FP32_ATTENTION_MAX_KEYS keys, it runs in fp32 (more
    precise, and faster there). q/k/v [B,H,T,D] -> output [B,T,H,D] in the query's dtype."""
    halves = (torch.bfloat16, torch.float16)
    autocast = torch.is_autocast_enabled("cpu")
    half = autocast or any(t.dtype in halves for t in (query, key, value))
    if query.device.type != "cpu" or not half or key.shape[-2] > CPU_FP32_ATTENTION_MAX_KEYS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would send sdpa back to bf16
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(query.dtype), weights


@functools.cache
def _register_cpu_sdpa() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CPU_SDPA, cpu_sdpa_attention)
    AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)


def attention_kwargs(model_cfg: ModelConfig) -> dict:
    """from_pretrained/from_config kwargs for model.attn_implementation (auto: transformers' choice)."""
    return {} if model_cfg.attn_implementation == "auto" else {"attn_implementation": model_cfg.attn_implementation}


def set_attention(model: nn.Module, model_cfg: ModelConfig) -> None:
    """auto: where transformers chose sdpa, the same kernel through `cpu_sdpa_attention` (identical off the CPU and
    in fp32). Not written to config.json: a saved checkpoint loads anywhere with transformers' default."""
    if model_cfg.attn_implementation != "auto" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    # remote-code models that do not dispatch through transformers' AttentionInterface keep their own sdpa
    if getattr(model, "_can_set_attn_implementation", lambda: False)():
        _register_cpu_sdpa()
        model.set_attn_implementation(CPU_SDPA)
