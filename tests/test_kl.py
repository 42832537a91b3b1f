"""Pencil-and-paper checks for rlhf.algorithms.kl: the KL estimators and the KL-penalised per-token rewards."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.algorithms.kl import compute_rewards, kl_penalty

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_kl_penalty_hand_values():
    lp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])
    assert_close(kl_penalty(lp, ref, "k1"), t([1.0, -1.0]))
    # k3 = (e^(ref-lp) - 1) - (ref-lp): ref-lp = -1 -> (e^-1 - 1) + 1 = e^-1; ref-lp = +1 -> e - 2
    assert_close(kl_penalty(lp, ref, "k3"), t([math.exp(-1.0), math.e - 2.0]))
    assert_close(kl_penalty(lp, ref, "k2"), t([0.5, 0.5]))
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


def test_compute_rewards_score_on_last_valid_token():
    logprobs = t([[-1.0, -1.0, -1.0, -1.0], [-0.5, -2.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    ref_logprobs = t([[-2.0, -1.0, -0.5, -1.0], [-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = prefix_mask([4, 2, 0], 4)
    scores = t([10.0, 20.0, 30.0])
    rewards, non_score_reward, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)

    expected_kl = t([[1.0, 0.0, -0.5, 0.0], [0.5, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert_close(kl, expected_kl)
    assert_close(non_score_reward, -0.1 * expected_kl)
    expected_rewards = -0.1 * expected_kl
    expected_rewards[0, 3] += 10.0  # full-length row: last position
    expected_rewards[1, 1] += 20.0  # length-2 row: position 1; the tail stays 0
    # row 2 has no valid token: no score anywhere
    assert_close(rewards, expected_rewards)
    assert (rewards[1, 2:] == 0).all() and (rewards[2] == 0).all()


def test_compute_rewards_k3_ignores_garbage_padding():
    logprobs = t([[-1.0, 1e4]])  # huge padding value would overflow exp in k3
    ref_logprobs = t([[-2.0, -1e4]])
    mask = prefix_mask([1], 2)
    rewards, _, kl = compute_rewards(t([1.0]), logprobs, ref_logprobs, mask, kl_coef=0.5, estimator="k3")
    assert_close(kl, t([[math.exp(-1.0), 0.0]]))
    assert_close(rewards, t([[1.0 - 0.5 * math.exp(-1.0), 0.0]]))
