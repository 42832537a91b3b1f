"""Pencil-and-paper checks for rlhf.algorithms.advantages: GAE against a naive loop, REINFORCE with a baseline,
RLOO and GRPO."""

import pytest
import torch
from torch.testing import assert_close

from rlhf.algorithms.advantages import gae, group_advantages, reinforce_advantages

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def naive_gae(rewards, values, length, gamma, lam):
    """Plain python GAE for one row whose first `length` tokens are valid."""
    adv = [0.0] * len(rewards)
    last = 0.0
    for i in reversed(range(length)):
        next_v = values[i + 1] if i + 1 < length else 0.0
        delta = rewards[i] + gamma * next_v - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    ret = [adv[i] + (values[i] if i < length else 0.0) for i in range(len(rewards))]
    return adv, ret


def test_gae_constant_reward_zero_values_formula():
    r, g, lam = 2.0, 0.9, 0.8
    gl = g * lam
    adv, ret = gae(t([[r, r, r]]), t([[0.0, 0.0, 0.0]]), prefix_mask([3], 3), gamma=g, lam=lam)
    expected = t([[r + r * gl + r * gl**2, r + r * gl, r]])
    assert_close(adv, expected)
    assert_close(ret, expected)  # values are 0


def test_gae_gamma_lam_one_gives_reward_to_go():
    rewards = t([[1.0, 2.0, 3.0, 4.0]])
    values = t([[0.5, -1.0, 2.0, 7.0]])
    adv, ret = gae(rewards, values, prefix_mask([4], 4), gamma=1.0, lam=1.0)
    assert_close(ret, t([[10.0, 9.0, 7.0, 4.0]]))
    assert_close(adv, t([[10.0, 9.0, 7.0, 4.0]]) - values)


def test_gae_one_step_bootstraps_and_tail_is_terminal():
    # lam = 0: A_t = r_t + gamma * V_{t+1} - V_t, and V after the last valid token is 0 (not the 100)
    rewards = t([[1.0, 2.0, 5.0, 5.0]])
    values = t([[0.5, 3.0, 100.0, 100.0]])
    adv, ret = gae(rewards, values, prefix_mask([2], 4), gamma=0.5, lam=0.0)
    assert_close(adv, t([[1.0 + 0.5 * 3.0 - 0.5, 2.0 + 0.0 - 3.0, 0.0, 0.0]]))
    assert_close(ret, t([[1.0 + 0.5 * 3.0, 2.0, 0.0, 0.0]]))


def test_gae_matches_naive_on_random_rows():
    torch.manual_seed(0)
    B, T, gamma, lam = 6, 9, 0.97, 0.9
    rewards, values = torch.randn(B, T, dtype=D), torch.randn(B, T, dtype=D)
    lengths = [9, 0, 1, 4, 8, 5]
    mask = prefix_mask(lengths, T)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        exp_adv, exp_ret = naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert_close(adv[b], t(exp_adv))
        assert_close(ret[b], t(exp_ret))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_reinforce_returns_and_batch_mean_baseline():

    rewards, mask = torch.tensor([[1.0, 0.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = reinforce_advantages(rewards, mask, gamma=1.0)
    assert torch.allclose(returns, torch.tensor([[3.0, 2.0, 2.0]]))
    assert torch.allclose(advantages, torch.tensor([[2 / 3, -1 / 3, -1 / 3]]))
    # gamma 0.5: G_2 = 2, G_1 = 0 + 0.5 * 2 = 1, G_0 = 1 + 0.5 * 1 = 1.5; learned baseline V = [0.5, 1, 1]
    advantages, returns = reinforce_advantages(rewards, mask, 0.5, values=torch.tensor([[0.5, 1.0, 1.0]]))
    assert torch.allclose(returns, torch.tensor([[1.5, 1.0, 2.0]]))
    assert torch.allclose(advantages, torch.tensor([[1.0, 0.0, 1.0]]))
    # a masked tail neither contributes nor receives anything
    advantages, returns = reinforce_advantages(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]]), 1.0)
    assert torch.allclose(returns, torch.tensor([[3.0, 2.0, 0.0]]))
    assert torch.allclose(advantages, torch.tensor([[0.5, -0.5, 0.0]]))


def test_group_advantages_rloo_and_grpo():

    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert torch.allclose(group_advantages(rewards, 2, "rloo"), torch.tensor([-1.0, 1.0, -7.0, 7.0]))
    three = torch.tensor([1.0, 2.0, 6.0])  # leave-one-out means 4, 3.5, 1.5
    assert torch.allclose(group_advantages(three, 3, "rloo"), torch.tensor([-3.0, -1.5, 4.5]))
    std = (((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5  # unbiased: sqrt(7)
    expected = torch.tensor([-2.0, -1.0, 3.0]) / (std + 1e-6)
    assert torch.allclose(group_advantages(three, 3, "grpo"), expected)
    with pytest.raises(ValueError, match="groups of >= 2"):
        group_advantages(rewards, 1, "rloo")
