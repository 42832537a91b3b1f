"""Packing's model side: the probe that a model's attention keeps packed rows apart, and the packed length a
stage uses."""

from __future__ import annotations

import torch

from rlhf.config import ConfigError
from rlhf.models.forwards import causal_logits


@torch.no_grad()
def check_rows_independent(
    model, vocab_size: int, device, forward=None, lengths: tuple[int, int, int] = (7, 5, 6)
) -> float:
    """Packed rows must not see each other on this model (its attention kernel and mask code): the outputs of the
    middle row of a packed sequence, next to two different neighbours, against the same row alone.

    `forward(ids [B,T], attention_mask [B,T] | None, position_ids [B,T] | None)` -> per-position outputs [B,T,...]
    (default: the LM's logits; a reward model passes its values). Returns the largest absolute difference relative
    to the outputs' scale; raises RuntimeError when a row is seen to attend across its boundary (differences well
    above the kernel's numerical noise) as a ConfigError naming data.packing."""
    if forward is None:

        def forward(ids, attention_mask, position_ids):
            return causal_logits(model, ids, attention_mask, position_ids=position_ids)

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab_size, (n,), generator=g) for n in lengths]
    other = torch.randint(3, vocab_size, (lengths[0],), generator=g)
    was_training = model.training
    model.eval()
    try:
        alone = forward(rows[1][None].to(device), torch.ones(1, lengths[1], dtype=torch.long, device=device), None)
        diffs = []
        for first in (rows[0], other):
            ids = torch.cat([first, rows[1], rows[2]])[None].to(device)
            positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
            packed = forward(ids, None, positions)
            middle = packed[:, lengths[0] : lengths[0] + lengths[1]]
            diffs.append(float((middle.float() - alone.float()).abs().max()))
    finally:
        model.train(was_training)
    scale = float(alone.float().abs().max()) + 1e-6
    worst = max(diffs) / scale
    # fp32 kernels agree to float rounding here; a row that sees its neighbour moves by a large share of the scale,
    # far above half-precision rounding
    if worst > 0.05:
        raise ConfigError(
            f"data.packing: this model's attention lets packed rows see each other (logits moved by {worst:.3f} of "
            "their scale next to another row); set data.packing: false, or use an attn_implementation that "
            "follows position_ids (sdpa, eager or flash_attention_2 in transformers' own model code)"
        )
    return worst


def pack_length(data, model, tokenizer, forward=None) -> int:
    """A stage's packed sequence length: data.format.max_length when data.packing, once `check_rows_independent`
    has passed on `model` (with `forward`, see there); 0 (no packing) otherwise."""
    if not data.packing:
        return 0
    check_rows_independent(model, len(tokenizer), next(model.parameters()).device, forward)
    return data.format.max_length
