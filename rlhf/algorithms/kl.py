"""The KL-to-reference penalty: per-token KL estimators, where the penalty acts, and the KL-penalised rewards.

References:
    [InstructGPT] Ouyang et al. 2022, "Training language models to follow instructions with human
        feedback", arXiv:2203.02155.
    [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
        arXiv:1909.08593 (code: openai/lm-human-preferences).
    [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
        Summarization", arXiv:2403.17031.
    [kl-approx] Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    [GRPO] Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
        Models", arXiv:2402.03300.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.algorithms.ops import as_bool
from rlhf.algorithms.registry import KL_ESTIMATORS, KL_PLACEMENTS

__all__ = ["KLPlacement", "compute_rewards", "kl_penalty"]


@KL_ESTIMATORS.register("k1")
def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def _kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_ratio = ref_logprobs - logprobs
    # expm1 keeps precision when r is close to 1, which is the common case.
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    Shapes: logprobs, ref_logprobs [B, T] -> [B, T]. With log r = ref_logprobs - logprobs [kl-approx]:
        k1 = -log r = logprobs - ref_logprobs       unbiased, can be negative per token (InstructGPT,
                                                   [Ziegler], [N+] use this one in the reward)
        k2 = 0.5 * (log r)^2                       biased, always >= 0
        k3 = (r - 1) - log r                       unbiased, always >= 0, lower variance
    Raises ValueError for an ``estimator`` not in KL_ESTIMATORS.
    """
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


@dataclass(frozen=True)
class KLPlacement:
    """Where beta * KL(pi || pi_ref) acts: `in_reward` = -beta * KL_t (kl.estimator) is part of each token's
    reward (InstructGPT); `loss_estimator` = beta * the token-mean of that estimator, differentiated, is a loss
    term (GRPO)."""

    in_reward: bool
    loss_estimator: str | None = None


KL_PLACEMENTS.add("reward", KLPlacement(in_reward=True))
KL_PLACEMENTS.add("loss", KLPlacement(in_reward=False, loss_estimator="k3"))


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
    bool_mask = as_bool(mask)
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
