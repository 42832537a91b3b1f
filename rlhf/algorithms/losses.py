"""The losses: PPO's policy objectives (L^CLIP, L^KLPEN) registered under their `ppo.objective` names, the value
loss, the language-model loss of SFT and PPO-ptx, the reward model's ranking loss and the DPO loss.

References:
    [InstructGPT] Ouyang et al. 2022, "Training language models to follow instructions with human
        feedback", arXiv:2203.02155.
    [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
    [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593 (code: openai/lm-human-preferences).
    [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
        Summarization", arXiv:2403.17031.
    [kl-approx] Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    [DPO] Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
        Model", arXiv:2305.18290.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.algorithms.ops import as_bool, float_dtype, masked_mean
from rlhf.algorithms.registry import POLICY_OBJECTIVES

__all__ = [
    "KLPenaltyCoef",
    "ObjectiveSettings",
    "PolicyObjective",
    "dpo_loss",
    "klpen_policy_loss",
    "lm_loss",
    "policy_loss",
    "ranking_loss",
    "value_loss",
]


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
    bool_mask = as_bool(mask)
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
    bool_mask = as_bool(mask)
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
    bool_mask = as_bool(mask)
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
# The policy objectives by ppo.objective
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveSettings:
    """What a policy objective may read besides the tensors."""

    cliprange: float = 0.2
    klpen_coef: float = 1.0  # L^KLPEN's current beta


@dataclass(frozen=True)
class PolicyObjective:
    """A policy loss and whether its beta adapts between updates from the KL(pi_old || pi) the loss reports
    (stats["kl_old"], as the PPO paper's L^KLPEN does)."""

    loss: Callable[[Tensor, Tensor, Tensor, Tensor, ObjectiveSettings], tuple[Tensor, dict[str, Tensor]]]
    adapts_beta: bool = False


def register_objective(name: str, adapts_beta: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register a policy loss under `name` (a ppo.objective value) as a `PolicyObjective`."""

    def register(loss: Callable) -> Callable:
        POLICY_OBJECTIVES.add(name, PolicyObjective(loss, adapts_beta))
        return loss

    return register


# The objectives look `policy_loss` / `klpen_policy_loss` up when called, so a test can substitute them.
@register_objective("clip")
def _clip(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, s: ObjectiveSettings
) -> tuple[Tensor, dict[str, Tensor]]:
    """L^CLIP with s.cliprange."""
    return policy_loss(logprobs, old_logprobs, advantages, mask, s.cliprange)


@register_objective("klpen", adapts_beta=True)
def _klpen(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, s: ObjectiveSettings
) -> tuple[Tensor, dict[str, Tensor]]:
    """L^KLPEN with the current beta s.klpen_coef."""
    return klpen_policy_loss(logprobs, old_logprobs, advantages, mask, s.klpen_coef)


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
    shift_logits = logits[:, :-1].to(float_dtype(logits.dtype)).reshape(-1, vocab)
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
    """DPO loss per comparison ([DPO] eq. 7).

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
    dtype = float_dtype(policy_chosen_logps.dtype)
    chosen_logratios = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    rejected_logratios = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    logits = beta * (chosen_logratios - rejected_logratios)
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
