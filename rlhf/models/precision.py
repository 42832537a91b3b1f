"""Precision: the dtypes a model may be loaded in, and a frozen model's Linear weights stored in the half dtype its
forwards autocast them to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rlhf.models.forwards import causal_logits
from rlhf.models.heads import TokenValueModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def untied_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain `nn.Linear` modules of `model` whose parameters no other module shares (a tied LM head shares the
    input embedding's weight)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))
    ]


def half_precision_linears(model: nn.Module, autocast: Callable[[], Any]) -> int:
    """Store a frozen model's Linear weights (and biases) in the half dtype its forwards autocast them to: the same
    values reach every matmul (autocast rounds fp32 weights to bf16/fp16 on each call; here once), so outputs are
    bit-identical and those weights take half the memory. Returns bytes saved.

    `autocast()` opens the stage's autocast context (accelerate's). Which layers qualify is observed, not assumed:
    one probe forward (8 tokens) records, for every plain `nn.Linear`, whether each of its calls ran under autocast
    to that dtype; a layer called with autocast off (a score head kept in fp32, an MoE router computed in fp32),
    never called, or sharing its weight with another module (an LM head tied to the input embedding, which autocast
    does not cast) keeps its dtype. Only fp32 weights are converted. `model`: a causal LM or a TokenValueModel.
    """
    first = next(model.parameters(), None)
    if first is None:
        return 0
    device = first.device
    with autocast():
        enabled, dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    if not enabled or dtype not in (torch.bfloat16, torch.float16):
        return 0
    candidates = [m for m in untied_linears(model) if m.weight.dtype == torch.float32]
    calls: dict[nn.Module, list[bool]] = {m: [] for m in candidates}

    def record(module: nn.Module, args: tuple) -> None:
        on = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype
        calls[module].append(on)

    hooks = [m.register_forward_pre_hook(record) for m in candidates]
    try:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 8)
        ids = torch.arange(8, device=device)[None] % vocab
        mask = torch.ones_like(ids)
        with torch.no_grad(), autocast():
            model(ids, mask) if isinstance(model, TokenValueModel) else causal_logits(model, ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    saved = 0
    for module, seen in calls.items():
        if seen and all(seen):
            saved += sum(p.numel() * (p.element_size() - dtype.itemsize) for p in module.parameters(recurse=False))
            module.to(dtype)
    if saved and device.type == "cpu":
        # on CPU from_pretrained leaves the weights in a memory map of the checkpoint file, which stays resident (the
        # whole fp32 file) while any tensor still points into it: copying the remaining ones out releases it
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != dtype:
                tensor.data = tensor.data.clone()
    return saved
