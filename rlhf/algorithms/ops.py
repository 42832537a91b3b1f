"""Tensor building blocks shared by every algorithm: log-probabilities and entropy from logits, statistics over
masked tokens, and token-id helpers for generated responses.

Shape conventions (for the whole `rlhf.algorithms` package):
    B = batch size, T = response length (tokens), V = vocabulary size.
    ``mask`` arguments are bool or 0/1 float with the same shape as the value tensor they go with;
    True / 1 marks a real response token. Response masks are normally a prefix of True followed by
    False (the response sits right after a left-padded prompt and stops at its first EOS).

References:
    [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593 (code: openai/lm-human-preferences).
    [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
        Summarization", arXiv:2403.17031.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "as_bool",
    "entropy_from_logits",
    "explained_variance",
    "first_true_indices",
    "float_dtype",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "truncate_after_eos",
]


def float_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for softmax-type math on tensors of `dtype`: at least float32."""
    # Do softmax-type math in at least float32: bf16 has ~3 significant digits, which is not
    # enough for log-probabilities whose differences feed exp() in the PPO ratio.
    return torch.promote_types(dtype, torch.float32)


def as_bool(mask: Tensor) -> Tensor:
    """A bool mask from a bool or 0/1 mask of the same shape."""
    return mask if mask.dtype == torch.bool else mask != 0


# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each label token under ``softmax(logits / temperature)``.

    Shapes: logits [B, T, V], labels [B, T] (long) -> [B, T], float32 (float64 if logits are float64).

        logprob[b, t] = logits[b, t, y] / tau - logsumexp_v(logits[b, t, v] / tau),  y = labels[b, t]

    The temperature must be the one used for sampling, otherwise the PPO ratio and the KL penalty
    compare a different distribution than the one that produced the tokens ([N+], detail
    "dividing logits by the sampling temperature").

    Memory: for float32/64 logits we gather first and subtract logsumexp, so no full [B, T, V]
    log-softmax tensor is kept. For bf16/fp16 logits we upcast one row at a time, so the float32
    copy is [T, V] rather than [B, T, V].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out_dtype = float_dtype(logits.dtype)
    if logits.dtype == out_dtype:
        scaled = logits / temperature if temperature != 1.0 else logits
        picked = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(scaled, dim=-1)
    # each row upcast through the float32 path above: bf16 logits and their float32 copy give the same log-probs
    return torch.stack([logprobs_from_logits(r.to(out_dtype), y, temperature) for r, y in zip(logits, labels)])


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position.

    Shapes: logits [B, T, V] -> [B, T], float32 (float64 if logits are float64).

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v,   z = logits / tau

    The second form avoids log(0) for tokens whose probability underflows. Combine with
    ``masked_mean`` for an entropy statistic or bonus.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.to(float_dtype(logits.dtype)) / temperature
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` over entries where ``mask`` is True.

    Shapes: values and mask the same shape; ``dim=None`` -> scalar, else that dim is reduced.
    Masked-out entries are selected away (not multiplied by 0), so NaN/inf in padding cannot leak.
    """
    selected = torch.where(as_bool(mask), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over entries where ``mask`` is True.

    Shapes: as ``masked_sum``. ``sum(values * mask) / sum(mask)``.
    Choice: an empty mask (no True entries, over all or along ``dim``) gives 0 rather than NaN, so a
    micro-batch without response tokens contributes a zero loss with zero gradient instead of
    poisoning the optimiser state.
    """
    bool_mask = as_bool(mask)
    count = bool_mask.sum() if dim is None else bool_mask.sum(dim)
    return masked_sum(values, bool_mask, dim) / count.clamp(min=1).to(values.dtype)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all entries where ``mask`` is True (scalar).

        var = mean_m((x - mean_m(x))^2) * n / (n - 1)  if unbiased  (Bessel's correction)

    Raises ValueError if the mask has fewer than 2 True entries and ``unbiased`` (n - 1 <= 0), or no
    True entries at all. Reads ``n`` on the host (one device sync).
    """
    bool_mask = as_bool(mask)
    n = int(bool_mask.sum().item())
    if n == 0:
        raise ValueError("masked_var: mask has no True entries")
    if unbiased and n < 2:
        raise ValueError(f"masked_var: unbiased variance needs at least 2 masked entries, got {n}")
    mean = masked_mean(values, bool_mask)
    var = masked_mean((values - mean) ** 2, bool_mask)
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``values`` to zero mean and unit variance over the masked entries.

        out = (x - mean_m(x)) / sqrt(var_m(x) + eps)        (+ mean_m(x) if not shift_mean)

    Shapes: values and mask the same shape -> same shape; masked-out entries are set to 0.
    Used for advantages ([Ziegler] ``whiten``, [N+] "advantage whitening"); ``shift_mean=False`` is
    the reward-whitening variant that keeps the mean so the sign of the reward survives.
    Variance is the unbiased one (as ``masked_var``); with fewer than 2 masked entries it falls back
    to the biased one (0), so a tiny batch is centred instead of raising. No True entries -> all 0.
    """
    bool_mask = as_bool(mask)
    n = int(bool_mask.sum().item())
    if n == 0:
        return torch.zeros_like(values)
    mean = masked_mean(values, bool_mask)
    var = masked_var(values, bool_mask, unbiased=n >= 2)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(bool_mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the variance of the returns the value head explains (scalar, detached).

        ev = 1 - Var_m[returns - values] / Var_m[returns]

    1 is a perfect value function, 0 is no better than predicting the mean, < 0 is worse.
    Choice: when Var_m[returns] == 0 (or the mask has no True entries) this returns 0 instead of NaN,
    so logs stay NaN-free. Biased variances (the n / (n - 1) factor cancels in the ratio).
    """
    bool_mask = as_bool(mask)
    with torch.no_grad():
        values, returns = values.detach(), returns.detach()
        n = bool_mask.sum()
        mean_y = masked_mean(returns, bool_mask)
        var_y = masked_mean((returns - mean_y) ** 2, bool_mask)
        err = returns - values
        var_err = masked_mean((err - masked_mean(err, bool_mask)) ** 2, bool_mask)
        ev = 1 - var_err / torch.where(var_y > 0, var_y, torch.ones_like(var_y))
        return torch.where((var_y > 0) & (n > 0), ev, torch.zeros_like(ev))


# ---------------------------------------------------------------------------------------------
# Token-id helpers
# ---------------------------------------------------------------------------------------------


def first_true_indices(bools: Tensor, dtype: torch.dtype = torch.long) -> Tensor:
    """Index of the first True in each row; T (the row length) where a row has none.

    Shapes: bools [B, T] -> [B] of ``dtype``. ``min over t of (t if bools[t] else T)``.
    """
    T = bools.shape[-1]
    if T == 0:
        return torch.zeros(bools.shape[:-1], dtype=dtype, device=bools.device)
    positions = torch.arange(T, dtype=dtype, device=bools.device)
    return torch.where(as_bool(bools), positions, torch.full((), T, dtype=dtype, device=bools.device)).amin(-1)


def truncate_after_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Cut generated responses at their first EOS ([N+], "truncate after EOS").

    Shapes: responses [B, T] token ids -> (responses [B, T], mask [B, T] bool).
    Every token after the first ``eos_token_id`` becomes ``pad_token_id``; the mask is True up to
    and including the first EOS (all True for a row with no EOS), so the EOS token itself is a
    response token and is where ``compute_rewards`` puts the score. Works when pad == eos.
    """
    first_eos = first_true_indices(responses == eos_token_id)
    positions = torch.arange(responses.shape[-1], device=responses.device)
    mask = positions.unsqueeze(0) <= first_eos.unsqueeze(-1)
    truncated = torch.where(mask, responses, torch.full_like(responses, pad_token_id))
    return truncated, mask
