"""The algorithm registries: every name the config accepts has an entry, each entry is the math it names, and an
unknown name fails naming the choices."""

from __future__ import annotations

import typing

import pytest
import torch
from torch.testing import assert_close

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_NEEDS,
    ENSEMBLE_AGGREGATES,
    GROUP_BASELINES,
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    POLICY_OBJECTIVES,
    AdvantageSettings,
    ObjectiveSettings,
    gae,
    group_advantages,
    klpen_policy_loss,
    masked_whiten,
    policy_loss,
    reinforce_advantages,
)
from rlhf.algorithms.kl_control import KL_CONTROLLERS
from rlhf.algorithms.registry import Registry
from rlhf.config import KLConfig, PPOHyper, RewardShaping


def literal(cls, field: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(cls)[field]))


def test_every_configurable_name_has_a_registry_entry():
    assert set(ADVANTAGE_ESTIMATORS) == literal(PPOHyper, "advantage") == set(ADVANTAGE_NEEDS)
    assert set(POLICY_OBJECTIVES) == literal(PPOHyper, "objective")
    assert set(KL_CONTROLLERS) == literal(KLConfig, "controller")
    assert set(KL_PLACEMENTS) == literal(KLConfig, "placement")
    assert KL_PLACEMENTS["reward"].in_reward and KL_PLACEMENTS["loss"].loss_estimator == "k3"
    # the math's own registries: the config may offer fewer names than the math has (k2 is not offered)
    assert literal(KLConfig, "estimator") <= set(KL_ESTIMATORS)
    assert {p.loss_estimator for p in KL_PLACEMENTS.values()} - {None} <= set(KL_ESTIMATORS)
    assert set(ENSEMBLE_AGGREGATES) == literal(RewardShaping, "aggregate")
    assert {"rloo", "grpo"} <= set(GROUP_BASELINES) <= literal(PPOHyper, "advantage")


def batch():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return rewards * mask, values * mask, mask


def test_advantage_estimators_are_the_math_they_name():
    rewards, values, mask = batch()
    s = AdvantageSettings(gamma=0.9, lam=0.8, group_size=2, critic=True)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    assert_close(ADVANTAGE_ESTIMATORS["gae"](rewards, values, mask, s), (masked_whiten(adv, mask), ret))
    adv, ret = reinforce_advantages(rewards, mask, 0.9, None)
    no_critic = AdvantageSettings(gamma=0.9, critic=False)
    assert_close(ADVANTAGE_ESTIMATORS["reinforce"](rewards, values, mask, no_critic), (masked_whiten(adv, mask), ret))
    for how in ("rloo", "grpo"):
        adv, ret = ADVANTAGE_ESTIMATORS[how](rewards, values, mask, s)
        per_response = group_advantages(rewards.sum(1), 2, how)
        assert_close(adv, torch.where(mask, per_response[:, None], torch.zeros(())))
        assert_close(ret, torch.zeros_like(rewards))


def test_policy_objectives_are_the_losses_they_name():
    rewards, old, mask = batch()
    new = old + 0.1 * rewards
    s = ObjectiveSettings(cliprange=0.2, klpen_coef=0.5)
    assert_close(POLICY_OBJECTIVES["clip"].loss(new, old, rewards, mask, s), policy_loss(new, old, rewards, mask, 0.2))
    assert_close(
        POLICY_OBJECTIVES["klpen"].loss(new, old, rewards, mask, s), klpen_policy_loss(new, old, rewards, mask, 0.5)
    )
    assert POLICY_OBJECTIVES["klpen"].adapts_beta and not POLICY_OBJECTIVES["clip"].adapts_beta


def test_an_unknown_name_fails_naming_the_choices():
    for registry in (ADVANTAGE_ESTIMATORS, POLICY_OBJECTIVES, KL_PLACEMENTS, KL_CONTROLLERS):
        with pytest.raises(KeyError, match=r"unknown .* 'nope'; expected one of \("):
            registry["nope"]
    with pytest.raises(ValueError, match=r"^unknown KL estimator 'k4'; expected one of \('k1', 'k2', 'k3'\)$"):
        KL_ESTIMATORS["k4"]


def test_a_name_is_registered_once():
    registry = Registry("thing")

    @registry.register("a")
    def a():
        return 1

    assert registry["a"] is a and registry.names() == ("a",)
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        registry.add("a", a)
