"""Advantage estimators: GAE with a learned value, REINFORCE with a baseline, and the critic-free group baselines
(RLOO, GRPO); each registered under its `ppo.advantage` name with what it needs of the run.

References:
    [GAE] Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
        Estimation", arXiv:1506.02438.
    [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593 (code: openai/lm-human-preferences).
    [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
        Summarization", arXiv:2403.17031.
    [Williams 1992] Williams, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
        Learning", Machine Learning 8.
    [RLOO] Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
        Feedback in LLMs", arXiv:2402.14740.
    [GRPO] Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
        Models", arXiv:2402.03300.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.algorithms.ops import as_bool, float_dtype, masked_mean, masked_whiten
from rlhf.algorithms.registry import ADVANTAGE_ESTIMATORS, ADVANTAGE_NEEDS, GROUP_BASELINES

__all__ = [
    "AdvantageSettings",
    "EstimatorNeeds",
    "gae",
    "group_advantages",
    "reinforce_advantages",
]


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
    bool_mask = as_bool(mask)
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
    bool_mask = as_bool(mask)
    returns, _ = gae(rewards, torch.zeros_like(rewards, dtype=float_dtype(rewards.dtype)), bool_mask, gamma, 1.0)
    baseline = values.to(returns.dtype) if values is not None else masked_mean(returns, bool_mask)
    advantages = torch.where(bool_mask, returns - baseline, torch.zeros((), dtype=returns.dtype))
    return advantages, returns


@GROUP_BASELINES.register("rloo")
def _rloo_baseline(r: Tensor, eps: float) -> Tensor:
    return (r - r.mean(-1, keepdim=True)) * r.shape[-1] / (r.shape[-1] - 1)


@GROUP_BASELINES.register("grpo")
def _grpo_baseline(r: Tensor, eps: float) -> Tensor:
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)


def group_advantages(sequence_rewards: Tensor, group_size: int, how: str = "rloo", eps: float = 1e-6) -> Tensor:
    """Critic-free sequence advantages from k samples per prompt (groups are consecutive rows).

    Shapes: sequence_rewards [B] with B = G * k -> advantages [B].

        rloo  A_i = R_i - mean_{j != i} R_j = k / (k - 1) * (R_i - mean_j R_j)     [RLOO]
        grpo  A_i = (R_i - mean_j R_j) / (std_j R_j + eps)   (std unbiased)          [GRPO]

    Needs k >= 2 (a single sample has no baseline from its group).
    """
    baseline = GROUP_BASELINES[how]
    if group_size < 2 or sequence_rewards.numel() % group_size:
        raise ValueError(
            f"need groups of >= 2 samples dividing the batch, got k={group_size}, B={sequence_rewards.numel()}"
        )
    r = sequence_rewards.reshape(-1, group_size).to(float_dtype(sequence_rewards.dtype))
    return baseline(r, eps).reshape(-1)


# ---------------------------------------------------------------------------------------------
# The estimators by ppo.advantage: the math above, whitened or broadcast to tokens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageSettings:
    """What an advantage estimator may read besides the tensors."""

    gamma: float = 1.0
    lam: float = 0.95
    group_size: int = 1  # rollout.samples_per_prompt: a group is that many consecutive rows
    critic: bool = True  # whether `values` come from a learned value model (else they are zeros)


@dataclass(frozen=True)
class EstimatorNeeds:
    """What an advantage estimator needs of the run, read by the config's validation and the roles' set-up."""

    critic: bool | None  # a learned value model: True, False, or None when ppo.baseline decides (value -> True)
    group_size: int = 1  # rollout.samples_per_prompt it needs at least (a group baseline needs 2)


def register_estimator(name: str, needs: EstimatorNeeds) -> Callable[[Callable], Callable]:
    """Decorator: register an advantage estimator under `name` (a ppo.advantage value) with what it needs."""

    def register(estimator: Callable) -> Callable:
        ADVANTAGE_NEEDS.add(name, needs)
        return ADVANTAGE_ESTIMATORS.add(name, estimator)

    return register


@register_estimator("gae", EstimatorNeeds(critic=True))
def _gae(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lam) with the value model; advantages whitened over the batch's tokens."""
    advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
    return masked_whiten(advantages, mask), returns


@register_estimator("reinforce", EstimatorNeeds(critic=None))
def _reinforce(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
    """Returns-to-go minus the learned value (with a critic) or the batch-mean return; whitened."""
    advantages, returns = reinforce_advantages(rewards, mask, s.gamma, values if s.critic else None)
    return masked_whiten(advantages, mask), returns


def _group(how: str) -> Callable:
    def estimator(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
        # one advantage per response from its group, on every token of it (no whitening); no value target
        sequence_advantages = group_advantages(rewards.sum(1), s.group_size, how)
        advantages = torch.where(mask, sequence_advantages[:, None], torch.zeros_like(rewards))
        return advantages, torch.zeros_like(rewards)

    estimator.__doc__ = f"{how.upper()}: each response's sequence reward against its group's (critic-free)."
    return estimator


register_estimator("rloo", EstimatorNeeds(critic=False, group_size=2))(_group("rloo"))
register_estimator("grpo", EstimatorNeeds(critic=False, group_size=2))(_group("grpo"))
