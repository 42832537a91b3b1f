"""Conservative rewards from an ensemble of reward models: the members' scores aggregated by `reward.aggregate`.

References:
    [Coste] Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization", arXiv:2310.02743.
"""

from __future__ import annotations

from torch import Tensor

from rlhf.algorithms.registry import ENSEMBLE_AGGREGATES

__all__ = ["aggregate_ensemble"]


# Each aggregate: (scores [M, B], mean [B], std [B], std_coef) -> reward [B].
@ENSEMBLE_AGGREGATES.register("mean")
def _mean(scores: Tensor, mean: Tensor, std: Tensor, std_coef: float) -> Tensor:
    return mean


@ENSEMBLE_AGGREGATES.register("mean_minus_std")
def _mean_minus_std(scores: Tensor, mean: Tensor, std: Tensor, std_coef: float) -> Tensor:
    return mean - std_coef * std


@ENSEMBLE_AGGREGATES.register("min")
def _min(scores: Tensor, mean: Tensor, std: Tensor, std_coef: float) -> Tensor:
    return scores.min(0).values


def aggregate_ensemble(scores: Tensor, how: str = "mean", std_coef: float = 1.0) -> tuple[Tensor, Tensor]:
    """Conservative reward from an ensemble of reward models ([Coste]).

    Shapes: scores [M, B] (M members, B responses) -> (reward [B], std [B]).

        mean            = 1/M sum_m s_m
        mean_minus_std  = mean - std_coef * std        (uncertainty-weighted optimisation, with the std)
        min             = min_m s_m                   (worst-case optimisation)
        std             = sqrt(1/M sum_m (s_m - mean)^2)   (population std; 0 for M = 1)

    The std is the members' disagreement: it grows where the policy leaves the data the members agree on.
    """
    aggregate = ENSEMBLE_AGGREGATES[how]
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be [M, B] with M >= 1, got {tuple(scores.shape)}")
    mean = scores.mean(0)
    std = scores.std(0, unbiased=False)
    return aggregate(scores, mean, std, std_coef), std
