"""The choices between algorithms, as registries of pure functions looked up by their config name.

    ADVANTAGE_ESTIMATORS[ppo.advantage](rewards, values, mask, settings) -> (advantages [B,R], returns [B,R])
    ADVANTAGE_NEEDS[ppo.advantage]: whether it needs a value model, and how many samples per prompt
    POLICY_OBJECTIVES[ppo.objective].loss(logprobs, old_logprobs, advantages, mask, settings) -> (loss, stats)
    KL_PLACEMENTS[kl.placement]: where the KL-to-reference penalty acts (the reward, or a loss term)

Adding an estimator or an objective = one function + one registry line + its test (tests/test_algorithms.py
checks that every name the config accepts has an entry); the trainer does not change. The math itself lives in
`rlhf.algorithms` (hand-checked there); an entry only says which of it a choice uses and how it is whitened or
broadcast. Three registries sit next to the math they choose between, in `rlhf.algorithms`: KL_ESTIMATORS
(kl.estimator: k1, k2, k3), GROUP_BASELINES (rloo, grpo) and ENSEMBLE_AGGREGATES (reward.aggregate). KL
controllers have theirs in `rlhf.algorithms.kl_control` (KL_CONTROLLERS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.algorithms.functional import (
    gae,
    group_advantages,
    klpen_policy_loss,
    masked_whiten,
    policy_loss,
    reinforce_advantages,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_NEEDS",
    "KL_PLACEMENTS",
    "POLICY_OBJECTIVES",
    "AdvantageSettings",
    "EstimatorNeeds",
    "KLPlacement",
    "ObjectiveSettings",
    "PolicyObjective",
]


@dataclass(frozen=True)
class AdvantageSettings:
    """What an advantage estimator may read besides the tensors."""

    gamma: float = 1.0
    lam: float = 0.95
    group_size: int = 1  # rollout.samples_per_prompt: a group is that many consecutive rows
    critic: bool = True  # whether `values` come from a learned value model (else they are zeros)


def _gae(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lam) with the value model; advantages whitened over the batch's tokens."""
    advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
    return masked_whiten(advantages, mask), returns


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


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor, Tensor, AdvantageSettings], tuple[Tensor, Tensor]]] = {
    "gae": _gae,
    "reinforce": _reinforce,
    "rloo": _group("rloo"),
    "grpo": _group("grpo"),
}


@dataclass(frozen=True)
class EstimatorNeeds:
    """What an advantage estimator needs of the run, read by the config's validation and the roles' set-up."""

    critic: bool | None  # a learned value model: True, False, or None when ppo.baseline decides (value -> True)
    group_size: int = 1  # rollout.samples_per_prompt it needs at least (a group baseline needs 2)


ADVANTAGE_NEEDS: dict[str, EstimatorNeeds] = {
    "gae": EstimatorNeeds(critic=True),
    "reinforce": EstimatorNeeds(critic=None),
    "rloo": EstimatorNeeds(critic=False, group_size=2),
    "grpo": EstimatorNeeds(critic=False, group_size=2),
}


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


POLICY_OBJECTIVES: dict[str, PolicyObjective] = {
    "clip": PolicyObjective(lambda lp, old, adv, mask, s: policy_loss(lp, old, adv, mask, s.cliprange)),
    "klpen": PolicyObjective(
        lambda lp, old, adv, mask, s: klpen_policy_loss(lp, old, adv, mask, s.klpen_coef), adapts_beta=True
    ),
}


@dataclass(frozen=True)
class KLPlacement:
    """Where beta * KL(pi || pi_ref) acts: `in_reward` = -beta * KL_t (kl.estimator) is part of each token's
    reward (InstructGPT); `loss_estimator` = beta * the token-mean of that estimator, differentiated, is a loss
    term (GRPO)."""

    in_reward: bool
    loss_estimator: str | None = None


KL_PLACEMENTS: dict[str, KLPlacement] = {
    "reward": KLPlacement(in_reward=True),
    "loss": KLPlacement(in_reward=False, loss_estimator="k3"),
}
