"""Tensor math for InstructGPT-style RLHF: SFT loss, reward-model ranking loss and PPO-ptx.

Every function here is pure: tensors in, tensors out, no config objects, no models, no global state.
The KL controllers live in `rlhf.algorithms.kl_control`; `KLPenaltyCoef` (L^KLPEN's beta) is the one class here.

Shape conventions:
    B = batch size, T = response length (tokens), V = vocabulary size.
    ``mask`` arguments are bool or 0/1 float with the same shape as the value tensor they go with;
    True / 1 marks a real response token. Response masks are normally a prefix of True followed by
    False (the response sits right after a left-padded prompt and stops at its first EOS).

References:
    [InstructGPT] Ouyang et al. 2022, "Training language models to follow instructions with human
        feedback", arXiv:2203.02155.
    [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
    [GAE] Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
        Estimation", arXiv:1506.02438.
    [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593 (code: openai/lm-human-preferences).
    [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
        Summarization", arXiv:2403.17031.
    [kl-approx] Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    [Coste] Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization", arXiv:2310.02743.
    [PID-Lagrangian] Stooke et al. 2020, "Responsive Safety in Reinforcement Learning by PID Lagrangian
        Methods", arXiv:2007.03964.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ENSEMBLE_AGGREGATES",
    "GROUP_BASELINES",
    "KL_ESTIMATORS",
    "aggregate_ensemble",
    "compute_rewards",
    "distinct_n",
    "entropy_from_logits",
    "explained_variance",
    "first_true_indices",
    "gae",
    "kl_penalty",
    "lm_loss",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "ranking_loss",
    "truncate_after_eos",
    "value_loss",
]


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    # Do softmax-type math in at least float32: bf16 has ~3 significant digits, which is not
    # enough for log-probabilities whose differences feed exp() in the PPO ratio.
    return torch.promote_types(dtype, torch.float32)


def _as_bool(mask: Tensor) -> Tensor:
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
    out_dtype = _float_dtype(logits.dtype)
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
    z = logits.to(_float_dtype(logits.dtype)) / temperature
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
    selected = torch.where(_as_bool(mask), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over entries where ``mask`` is True.

    Shapes: as ``masked_sum``. ``sum(values * mask) / sum(mask)``.
    Choice: an empty mask (no True entries, over all or along ``dim``) gives 0 rather than NaN, so a
    micro-batch without response tokens contributes a zero loss with zero gradient instead of
    poisoning the optimiser state.
    """
    bool_mask = _as_bool(mask)
    count = bool_mask.sum() if dim is None else bool_mask.sum(dim)
    return masked_sum(values, bool_mask, dim) / count.clamp(min=1).to(values.dtype)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all entries where ``mask`` is True (scalar).

        var = mean_m((x - mean_m(x))^2) * n / (n - 1)  if unbiased  (Bessel's correction)

    Raises ValueError if the mask has fewer than 2 True entries and ``unbiased`` (n - 1 <= 0), or no
    True entries at all. Reads ``n`` on the host (one device sync).
    """
    bool_mask = _as_bool(mask)
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
    bool_mask = _as_bool(mask)
    n = int(bool_mask.sum().item())
    if n == 0:
        return torch.zeros_like(values)
    mean = masked_mean(values, bool_mask)
    var = masked_var(values, bool_mask, unbiased=n >= 2)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(bool_mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ---------------------------------------------------------------------------------------------
# KL penalty and per-token rewards
# ---------------------------------------------------------------------------------------------


def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


def _kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_ratio = ref_logprobs - logprobs
    # expm1 keeps precision when r is close to 1, which is the common case.
    return torch.expm1(log_ratio) - log_ratio


# The per-token KL estimators by name: (logprobs [B, T], ref_logprobs [B, T]) -> [B, T].
KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    Shapes: logprobs, ref_logprobs [B, T] -> [B, T]. With log r = ref_logprobs - logprobs [kl-approx]:
        k1 = -log r = logprobs - ref_logprobs       unbiased, can be negative per token (InstructGPT,
                                                   [Ziegler], [N+] use this one in the reward)
        k2 = 0.5 * (log r)^2                       biased, always >= 0
        k3 = (r - 1) - log r                       unbiased, always >= 0, lower variance
    Raises ValueError for an ``estimator`` not in KL_ESTIMATORS.
    """
    return _lookup(KL_ESTIMATORS, estimator, "KL estimator")(logprobs, ref_logprobs)


def _lookup(registry: dict[str, Callable], name: str, what: str) -> Callable:
    """registry[name], or a ValueError naming the choices."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; expected one of {tuple(registry)}")
    return registry[name]


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO rewards: KL penalty at every token plus the RM score at the last token.

    Shapes: scores [B] (one reward-model score per sequence), logprobs / ref_logprobs / mask [B, T].
    Returns (rewards [B, T], non_score_reward [B, T], kl [B, T]):

        kl_t               = kl_penalty(logprobs_t, ref_logprobs_t) * mask_t
        non_score_reward_t = -kl_coef * kl_t
        rewards_t          = non_score_reward_t + [t == last valid index] * score

    This is InstructGPT eq. 2, R(x, y) = r_theta(x, y) - beta log(pi / pi_SFT), spread over tokens as
    in [Ziegler] / [N+]: the sequence-level score is given on the last response token (its EOS when
    the response finished), the KL term on every token. "Last valid" is the last True of each row's
    mask. Rows with an all-False mask get no score (all zeros). All positions after the last valid
    token, and any other masked-out position, are 0.
    """
    bool_mask = _as_bool(mask)
    # Select rather than multiply so inf/NaN from padded logprobs (e.g. k3's exp) cannot leak.
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(bool_mask, kl_penalty(logprobs, ref_logprobs, estimator), zero)
    non_score_reward = -kl_coef * kl
    if mask.shape[-1] == 0:
        return non_score_reward.clone(), non_score_reward, kl
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(bool_mask)
    last = torch.where(bool_mask, positions, -1).amax(dim=-1)  # -1 for a row with no valid token
    has_token = last >= 0
    score = torch.where(has_token, scores.to(non_score_reward.dtype), zero)
    rewards = non_score_reward.scatter_add(-1, last.clamp(min=0).unsqueeze(-1), score.unsqueeze(-1))
    return rewards, non_score_reward, kl


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens [GAE], as in [Ziegler] / [N+].

    Shapes: rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T]).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t            (the value target)

    The episode ends at the last valid token: V and A beyond it count as 0 (terminal, no
    bootstrapping from the value of padding). Masked positions output 0 in both tensors. Masks are
    expected to be a prefix of True; a masked-out position in the middle of a row also acts as a
    terminal (nothing is propagated across it). No whitening here: see ``masked_whiten``.
    Computed with a backward loop over T, vectorised over B.
    """
    bool_mask = _as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(bool_mask, values, zero)
    rewards = torch.where(bool_mask, rewards.to(values.dtype), zero)
    T = rewards.shape[-1]
    if T == 0:
        return torch.zeros_like(values), torch.zeros_like(values)
    next_value = torch.zeros_like(values[..., 0])  # V after the final position: terminal
    last_gae = torch.zeros_like(next_value)
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        last_gae = torch.where(bool_mask[..., t], delta + gamma * lam * last_gae, zero)
        advantages_reversed.append(last_gae)
        next_value = values[..., t]
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    returns = advantages + values
    return advantages, returns


def reinforce_advantages(
    rewards: Tensor, mask: Tensor, gamma: float = 1.0, values: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """REINFORCE with a baseline [Williams 1992]: returns-to-go minus a baseline that does not depend on the action.

    Shapes: rewards, mask (and values) [B, T] -> (advantages [B, T], returns [B, T]).

        G_t = sum_{k >= t} gamma^(k-t) r_k          (the returns; GAE with lam = 1 and V = 0)
        A_t = G_t - V(s_t)                          a learned baseline (values given: the value target is G_t)
        A_t = G_t - mean over the batch's tokens of G   the batch-mean baseline (values None)

    Masked positions are 0.
    """
    bool_mask = _as_bool(mask)
    returns, _ = gae(rewards, torch.zeros_like(rewards, dtype=_float_dtype(rewards.dtype)), bool_mask, gamma, 1.0)
    baseline = values.to(returns.dtype) if values is not None else masked_mean(returns, bool_mask)
    advantages = torch.where(bool_mask, returns - baseline, torch.zeros((), dtype=returns.dtype))
    return advantages, returns


# Group baselines by name: (rewards [G, k], eps) -> advantages [G, k].
GROUP_BASELINES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "rloo": lambda r, eps: (r - r.mean(-1, keepdim=True)) * r.shape[-1] / (r.shape[-1] - 1),
    "grpo": lambda r, eps: (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps),
}


def group_advantages(sequence_rewards: Tensor, group_size: int, how: str = "rloo", eps: float = 1e-6) -> Tensor:
    """Critic-free sequence advantages from k samples per prompt (groups are consecutive rows).

    Shapes: sequence_rewards [B] with B = G * k -> advantages [B].

        rloo  A_i = R_i - mean_{j != i} R_j = k / (k - 1) * (R_i - mean_j R_j)     [RLOO, Ahmadian et al. 2024]
        grpo  A_i = (R_i - mean_j R_j) / (std_j R_j + eps)   (std unbiased)          [GRPO, Shao et al. 2024]

    Needs k >= 2 (a single sample has no baseline from its group).
    """
    baseline = _lookup(GROUP_BASELINES, how, "group advantage")
    if group_size < 2 or sequence_rewards.numel() % group_size:
        raise ValueError(
            f"need groups of >= 2 samples dividing the batch, got k={group_size}, B={sequence_rewards.numel()}"
        )
    r = sequence_rewards.reshape(-1, group_size).to(_float_dtype(sequence_rewards.dtype))
    return baseline(r, eps).reshape(-1)


# ---------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective, as a loss to minimise ([PPO] eq. 7, per token).

    Shapes: logprobs (current policy, with grad), old_logprobs (rollout policy), advantages, mask
    [B, T] -> (scalar loss, stats).

        ratio_t = exp(logprobs_t - old_logprobs_t)
        loss    = masked_mean( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) )

    The max of the negated terms is the min of [PPO]'s pessimistic bound, so tokens whose ratio has
    moved past the clip range in the direction the advantage favours get zero gradient.

    Stats (detached scalars): "clipfrac" share of masked tokens where the clipped term is strictly
    larger (i.e. chosen), "approx_kl" masked mean of 0.5 * (logprobs - old_logprobs)^2 (k2 of
    [kl-approx]), "ratio_mean", "ratio_max" (masked; 0 if the mask is empty).
    """
    bool_mask = _as_bool(mask)
    # Zero the log-ratio on padding before exp: garbage logprobs there could give inf, and an inf
    # in the unselected branch of torch.where still turns the gradient into NaN.
    log_ratio = torch.where(bool_mask, logprobs - old_logprobs, torch.zeros((), dtype=logprobs.dtype))
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), bool_mask)
    with torch.no_grad():
        ratio_masked = torch.where(bool_mask, ratio, torch.full((), -torch.inf, dtype=ratio.dtype))
        ratio_max = ratio_masked.max() if ratio.numel() else ratio.new_zeros(())
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), bool_mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, bool_mask),
            "ratio_mean": masked_mean(ratio, bool_mask),
            "ratio_max": torch.where(torch.isfinite(ratio_max), ratio_max, torch.zeros_like(ratio_max)),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def klpen_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's KL-penalty surrogate L^KLPEN ([PPO] eq. 8), as a loss to minimise, per token.

    Shapes: logprobs (with grad), old_logprobs, advantages, mask [B, T] -> (scalar loss, stats).

        loss = masked_mean( -A_t * ratio_t + beta * (old_logprobs_t - logprobs_t) )

    The second term is the sampled estimate of KL(pi_old || pi) (tokens come from pi_old; its gradient is that of
    the KL). beta adapts between updates (`KLPenaltyCoef`). Stats as `policy_loss`, plus "kl_old" (the k1 term).
    """
    bool_mask = _as_bool(mask)
    log_ratio = torch.where(bool_mask, logprobs - old_logprobs, torch.zeros((), dtype=logprobs.dtype))
    ratio = torch.exp(log_ratio)
    kl_old = -log_ratio
    loss = masked_mean(-advantages * ratio + beta * kl_old, bool_mask)
    with torch.no_grad():
        stats = {
            "clipfrac": torch.zeros((), dtype=ratio.dtype, device=ratio.device),
            "approx_kl": masked_mean(0.5 * log_ratio**2, bool_mask),
            "ratio_mean": masked_mean(ratio, bool_mask),
            "kl_old": masked_mean(kl_old, bool_mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


class KLPenaltyCoef:
    """The adaptive beta of L^KLPEN ([PPO] sec. 4): after each policy update, with d = KL(pi_old || pi),
    beta /= 2 when d < target / 1.5 and beta *= 2 when d > target * 1.5."""

    def __init__(self, beta: float, target: float):
        self.value, self.target = beta, target

    def update(self, kl: float) -> None:
        if kl < self.target / 1.5:
            self.value /= 2
        elif kl > self.target * 1.5:
            self.value *= 2

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Value-head regression loss with optional PPO-style value clipping ([Ziegler], [N+]).

    Shapes: values (current, with grad), old_values (rollout), returns, mask [B, T] -> (scalar, stats).

        values_clipped = old_values + clip(values - old_values, -c, c)
        loss = 0.5 * masked_mean( max((values - returns)^2, (values_clipped - returns)^2) )
        loss = 0.5 * masked_mean( (values - returns)^2 )                      if c is None

    Stats (detached): "vf_clipfrac" share of masked tokens where the clipped error is strictly
    larger (0 when unclipped).
    """
    bool_mask = _as_bool(mask)
    vf_losses = (values - returns) ** 2
    if cliprange_value is None:
        loss = 0.5 * masked_mean(vf_losses, bool_mask)
        return loss, {"vf_clipfrac": torch.zeros((), dtype=vf_losses.dtype, device=vf_losses.device)}
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), bool_mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(vf_losses.dtype), bool_mask)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}


# ---------------------------------------------------------------------------------------------
# Language-model (SFT / ptx) and reward-model losses
# ---------------------------------------------------------------------------------------------


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy, shared by SFT and the PPO-ptx pretraining term (InstructGPT eq. 2).

    Shapes: logits [B, T, V], labels [B, T] (long) -> scalar. The shift is done here: logits at
    position t predict labels at t + 1, so only logits[:, :-1] and labels[:, 1:] are used.

        sum  = sum_{b, t : labels[b, t+1] != ignore} -log softmax(logits[b, t])[labels[b, t+1]]
        mean = sum / (number of such tokens)        (0 when there are none, instead of NaN)

    ``reduction="sum"`` lets callers normalise by the token count of a whole accumulated batch
    instead of averaging per micro-batch means. Math in float32 even for bf16 logits.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1].to(_float_dtype(logits.dtype)).reshape(-1, vocab)
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    count = (shift_labels != ignore_index).sum().clamp(min=1)
    return total / count.to(total.dtype)


def ranking_loss(
    rewards: Tensor,
    pair_index: Tensor,
    group_index: Tensor,
    num_groups: int,
    margin: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """InstructGPT reward-model loss for K-way rankings (InstructGPT eq. 1).

    Shapes: rewards [N] (one scalar per forwarded response), pair_index [P, 2] long = (winner row,
    loser row) into ``rewards``, group_index [P] long in [0, num_groups) = the prompt each pair comes
    from, margin [P] or None (= 0) -> (scalar loss, stats).

        loss = mean_g ( -1 / C_g * sum_{(w, l) in g} log sigmoid(r_w - r_l - margin_{w,l}) )

    C_g is the number of pairs in group g (C(K, 2) for a full ranking of K responses), so each prompt
    weighs the same however many comparisons it has, as in InstructGPT's "single batch element per
    prompt" setup. Groups with no pairs are left out of the mean (0 if there are no pairs at all).

    Stats (detached, over pairs, without the margin): "accuracy" share of pairs with r_w > r_l
    (ties count 0.5), "margin_mean" mean of r_w - r_l.
    """
    if pair_index.ndim != 2 or pair_index.shape[-1] != 2:
        raise ValueError(f"pair_index must be [P, 2], got {tuple(pair_index.shape)}")
    if group_index.shape != pair_index.shape[:1]:
        raise ValueError(f"group_index must be [P]={tuple(pair_index.shape[:1])}, got {tuple(group_index.shape)}")
    diff = rewards[pair_index[:, 0]] - rewards[pair_index[:, 1]]
    logits = diff if margin is None else diff - margin.to(diff.dtype)
    nll = -F.logsigmoid(logits)
    group_sum = torch.zeros(num_groups, dtype=nll.dtype, device=nll.device).index_add(0, group_index, nll)
    group_count = torch.bincount(group_index, minlength=num_groups)[:num_groups]
    present = group_count > 0
    group_mean = group_sum / group_count.clamp(min=1).to(nll.dtype)
    loss = masked_mean(group_mean, present)
    with torch.no_grad():
        correct = (diff > 0).to(diff.dtype) + 0.5 * (diff == 0).to(diff.dtype)
        zero = diff.new_zeros(())
        stats = {
            "accuracy": correct.mean() if diff.numel() else zero,
            "margin_mean": diff.mean() if diff.numel() else zero,
        }
    return loss, {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the variance of the returns the value head explains (scalar, detached).

        ev = 1 - Var_m[returns - values] / Var_m[returns]

    1 is a perfect value function, 0 is no better than predicting the mean, < 0 is worse.
    Choice: when Var_m[returns] == 0 (or the mask has no True entries) this returns 0 instead of NaN,
    so logs stay NaN-free. Biased variances (the n / (n - 1) factor cancels in the ratio).
    """
    bool_mask = _as_bool(mask)
    with torch.no_grad():
        values, returns = values.detach(), returns.detach()
        n = bool_mask.sum()
        mean_y = masked_mean(returns, bool_mask)
        var_y = masked_mean((returns - mean_y) ** 2, bool_mask)
        err = returns - values
        var_err = masked_mean((err - masked_mean(err, bool_mask)) ** 2, bool_mask)
        ev = 1 - var_err / torch.where(var_y > 0, var_y, torch.ones_like(var_y))
        return torch.where((var_y > 0) & (n > 0), ev, torch.zeros_like(ev))


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams over every sequence (Li et al. 2016); falling values mean repetitive outputs.

    Plain lists of token ids (responses without EOS/padding) -> a float in [0, 1] (0 when there is no n-gram).
    """
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


# ---------------------------------------------------------------------------------------------
# Reward-model ensembles
# ---------------------------------------------------------------------------------------------

# Ensemble aggregates by name: (scores [M, B], mean [B], std [B], std_coef) -> reward [B].
ENSEMBLE_AGGREGATES: dict[str, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    "mean": lambda scores, mean, std, std_coef: mean,
    "mean_minus_std": lambda scores, mean, std, std_coef: mean - std_coef * std,
    "min": lambda scores, mean, std, std_coef: scores.min(0).values,
}


def aggregate_ensemble(scores: Tensor, how: str = "mean", std_coef: float = 1.0) -> tuple[Tensor, Tensor]:
    """Conservative reward from an ensemble of reward models ([Coste]).

    Shapes: scores [M, B] (M members, B responses) -> (reward [B], std [B]).

        mean            = 1/M sum_m s_m
        mean_minus_std  = mean - std_coef * std        (uncertainty-weighted optimisation, with the std)
        min             = min_m s_m                   (worst-case optimisation)
        std             = sqrt(1/M sum_m (s_m - mean)^2)   (population std; 0 for M = 1)

    The std is the members' disagreement: it grows where the policy leaves the data the members agree on.
    """
    aggregate = _lookup(ENSEMBLE_AGGREGATES, how, "ensemble aggregate")
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be [M, B] with M >= 1, got {tuple(scores.shape)}")
    mean = scores.mean(0)
    std = scores.std(0, unbiased=False)
    return aggregate(scores, mean, std, std_coef), std


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
    return torch.where(_as_bool(bools), positions, torch.full((), T, dtype=dtype, device=bools.device)).amin(-1)


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


# ---------------------------------------------------------------------------------------------
# Direct Preference Optimization
# ---------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO loss per comparison (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7).

    Shapes: four [B] sequence log-probs, each a sum over the response tokens only (prompt and padding
    excluded) of log pi(y_t | x, y_<t) -> (loss [B], chosen_rewards [B], rejected_rewards [B]).

        r_w = beta * (log pi(y_w|x) - log pi_ref(y_w|x)),   r_l = beta * (log pi(y_l|x) - log pi_ref(y_l|x))
        loss = -(1 - eps) * log sigmoid(r_w - r_l) - eps * log sigmoid(r_l - r_w)

    r_w, r_l are the implicit rewards; they are returned detached (statistics: the gradient flows through the
    loss). eps = ``label_smoothing`` is the assumed probability that a preference label is flipped
    (conservative DPO, Mitchell 2023); eps = 0 is the paper's loss. Math in at least float32.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:  # at 0.5 the loss no longer prefers either response
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    dtype = _float_dtype(policy_chosen_logps.dtype)
    chosen_logratios = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rejected_logratios = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    logits = beta * (chosen_logratios - rejected_logratios)
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
