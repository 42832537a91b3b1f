"""The algorithms: pure tensor math and the registries that choose between its variants by config name.

    ops          log-probs and entropy from logits, masked statistics, token-id helpers
    kl           KL estimators and placements, the KL-penalised per-token rewards
    advantages   GAE, REINFORCE, group baselines (RLOO, GRPO); the advantage estimators
    losses       policy objectives (L^CLIP, L^KLPEN), value, LM, ranking and DPO losses
    ensemble     reward-model ensemble aggregates
    kl_control   KL-coefficient controllers and the KL budget
    collapse     collapse signs (repeats, distinct-n, length, EOS share) and their limits
    registry     every registry (`Registry`), filled by the modules above as they are imported

Tensors and floats in, tensors out: nothing here imports a model, an accelerator or a config object, so every
function is tested against numbers worked out by hand.
"""

from rlhf.algorithms import collapse, kl_control
from rlhf.algorithms.advantages import (
    AdvantageSettings,
    EstimatorNeeds,
    gae,
    group_advantages,
    reinforce_advantages,
)
from rlhf.algorithms.collapse import distinct_n
from rlhf.algorithms.ensemble import aggregate_ensemble
from rlhf.algorithms.kl import KLPlacement, compute_rewards, kl_penalty
from rlhf.algorithms.losses import (
    KLPenaltyCoef,
    ObjectiveSettings,
    PolicyObjective,
    dpo_loss,
    klpen_policy_loss,
    lm_loss,
    policy_loss,
    ranking_loss,
    value_loss,
)
from rlhf.algorithms.ops import (
    entropy_from_logits,
    explained_variance,
    first_true_indices,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    truncate_after_eos,
)
from rlhf.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_NEEDS,
    ENSEMBLE_AGGREGATES,
    GROUP_BASELINES,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    POLICY_OBJECTIVES,
    Registry,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_NEEDS",
    "AdvantageSettings",
    "ENSEMBLE_AGGREGATES",
    "EstimatorNeeds",
    "GROUP_BASELINES",
    "KLPenaltyCoef",
    "KLPlacement",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "ObjectiveSettings",
    "POLICY_OBJECTIVES",
    "PolicyObjective",
    "Registry",
    "aggregate_ensemble",
    "collapse",
    "compute_rewards",
    "distinct_n",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "first_true_indices",
    "gae",
    "group_advantages",
    "kl_control",
    "kl_penalty",
    "klpen_policy_loss",
    "lm_loss",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "ranking_loss",
    "reinforce_advantages",
    "truncate_after_eos",
    "value_loss",
]
