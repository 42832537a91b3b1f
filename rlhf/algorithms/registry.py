"""Every registry of the algorithms layer: the variants a config name chooses between.

    ADVANTAGE_ESTIMATORS[ppo.advantage](rewards, values, mask, settings) -> (advantages [B, T], returns [B, T])
    ADVANTAGE_NEEDS[ppo.advantage]        EstimatorNeeds: a value model or not, how many samples per prompt
    GROUP_BASELINES[how](rewards [G, k], eps) -> advantages [G, k]              (rloo, grpo)
    POLICY_OBJECTIVES[ppo.objective]      PolicyObjective: .loss(logprobs, old_logprobs, advantages, mask, settings)
    KL_ESTIMATORS[kl.estimator](logprobs [B, T], ref_logprobs [B, T]) -> [B, T]  (k1, k2, k3)
    KL_PLACEMENTS[kl.placement]           KLPlacement: where the KL-to-reference penalty acts
    ENSEMBLE_AGGREGATES[reward.aggregate](scores [M, B], mean [B], std [B], std_coef) -> reward [B]
    KL_CONTROLLERS[kl.controller](kl config section) -> a KL controller

Each entry registers itself where it is defined (`@REGISTRY.register(name)`), so adding a variant is one function,
its decorator and its test; `rlhf.algorithms` imports every module, which fills them. tests/test_registry.py checks
that every name the config accepts has an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from rlhf.algorithms.advantages import EstimatorNeeds
    from rlhf.algorithms.kl import KLPlacement
    from rlhf.algorithms.losses import PolicyObjective

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_NEEDS",
    "ENSEMBLE_AGGREGATES",
    "GROUP_BASELINES",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "POLICY_OBJECTIVES",
    "Registry",
    "UnknownNameError",
]

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no entry of a registry has. Both a KeyError (a failed lookup) and a ValueError (a bad argument to
    the functions that take the name, such as `kl_penalty(..., estimator)`)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict[str, T], Generic[T]):
    """A dict from config name to entry whose failed lookup names the choices.

    `what` says what the entries are, for the error: "unknown KL estimator 'k4'; expected one of ('k1', ...)".
    """

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def __missing__(self, name: str) -> T:
        raise UnknownNameError(f"unknown {self.what} {name!r}; expected one of {tuple(self)}")

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name is registered once."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated function or class under `name`, and return it unchanged."""
        return lambda entry: self.add(name, entry)

    def names(self) -> tuple[str, ...]:
        return tuple(self)


ADVANTAGE_ESTIMATORS: Registry[Callable] = Registry("advantage estimator")
ADVANTAGE_NEEDS: Registry[EstimatorNeeds] = Registry("advantage estimator")
GROUP_BASELINES: Registry[Callable] = Registry("group advantage")
POLICY_OBJECTIVES: Registry[PolicyObjective] = Registry("policy objective")
KL_ESTIMATORS: Registry[Callable] = Registry("KL estimator")
KL_PLACEMENTS: Registry[KLPlacement] = Registry("KL placement")
ENSEMBLE_AGGREGATES: Registry[Callable] = Registry("ensemble aggregate")
KL_CONTROLLERS: Registry[Callable] = Registry("KL controller")
