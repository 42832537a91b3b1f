"""Pencil-and-paper checks for rlhf.algorithms.losses: L^CLIP, L^KLPEN and its beta, the value, LM and ranking
losses (DPO's: tests/test_dpo.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhf.algorithms.losses import KLPenaltyCoef, klpen_policy_loss, lm_loss, policy_loss, ranking_loss, value_loss

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_policy_loss_clip_cases():
    eps = 0.2
    ratio = t([1.5, 0.5, 1.5, 0.5])
    adv = t([2.0, -1.0, -1.0, 2.0])
    logprobs = ratio.log().requires_grad_()
    old = torch.zeros(4, dtype=D)
    mask = torch.ones(4, dtype=torch.bool)
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=eps)
    # per token max(-A*ratio, -A*clip(ratio)):
    #   A=2,  r=1.5: max(-3.0, -2.4) = -2.4 = -1.2*A  (clipped)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8 = -A*0.8  (clipped)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5           (not clipped: pessimistic side)
    #   A=2,  r=0.5: max(-1.0, -1.6) = -1.0           (not clipped: pessimistic side)
    assert_close(loss, t((-2.4 + 0.8 + 1.5 - 1.0) / 4))
    assert_close(stats["clipfrac"], t(0.5))
    assert_close(stats["ratio_mean"], t(1.0))
    assert_close(stats["ratio_max"], t(1.5))
    assert_close(stats["approx_kl"], (0.5 * ratio.log() ** 2).mean())
    loss.backward()
    # d/dlogprob of -A*ratio = -A*ratio / 4 for unclipped tokens; clipped tokens get zero gradient
    assert_close(logprobs.grad, t([0.0, 0.0, 1.5 / 4, -1.0 / 4]))
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_ratio_one_and_mask():
    adv = t([[1.0, -3.0, 4.0]])
    logprobs = t([[-1.0, -2.0, 50.0]])  # last token is padding with a garbage logprob
    old = t([[-1.0, -2.0, -1.0]]).requires_grad_(False)
    mask = prefix_mask([2], 3)
    lp = logprobs.clone().requires_grad_()
    loss, stats = policy_loss(lp, old, adv, mask, cliprange=0.2)
    assert_close(loss, t((-1.0 + 3.0) / 2))
    assert_close(stats["clipfrac"], t(0.0))
    assert_close(stats["ratio_max"], t(1.0))
    assert_close(stats["approx_kl"], t(0.0))
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert_close(lp.grad, t([[-1.0 / 2, 3.0 / 2, 0.0]]))


def test_klpen_policy_loss_and_adaptive_beta():

    logprobs = torch.tensor([[0.1, -0.2]], requires_grad=True)
    old, advantages = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])
    loss, stats = klpen_policy_loss(logprobs, old, advantages, torch.ones(1, 2), beta=0.5)
    # tokens: -1 * e^0.1 + 0.5 * (0 - 0.1) and +1 * e^-0.2 + 0.5 * (0 + 0.2); mean of the two
    expected = ((-math.exp(0.1) - 0.05) + (math.exp(-0.2) + 0.1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["kl_old"].item() == pytest.approx(0.05, abs=1e-7)
    loss.backward()  # d/dlp of (-A e^lp - beta lp) / 2
    assert torch.allclose(logprobs.grad, torch.tensor([[(-math.exp(0.1) - 0.5) / 2, (math.exp(-0.2) - 0.5) / 2]]))
    beta = KLPenaltyCoef(1.0, target=0.01)
    beta.update(0.001)
    assert beta.value == 0.5
    beta.update(0.02)
    assert beta.value == 1.0
    beta.update(0.01)
    assert beta.value == 1.0


def test_value_loss_hand_cases():
    old = t([0.0, 0.0, 0.0])
    returns = t([1.0, 1.0, 1.0])
    values = t([0.5, 2.0, 0.1])
    mask = torch.ones(3, dtype=torch.bool)
    # c = 0.2 -> clipped values 0.2, 0.2, 0.1
    #   v=0.5: max(0.25, 0.64) = 0.64 (clipped)   v=2.0: max(1.0, 0.64) = 1.0   v=0.1: max(0.81, 0.81) = 0.81
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert_close(loss, t(0.5 * (0.64 + 1.0 + 0.81) / 3))
    assert_close(stats["vf_clipfrac"], t(1 / 3))
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=None)
    assert_close(loss, t(0.5 * (0.25 + 1.0 + 0.81) / 3))
    assert_close(stats["vf_clipfrac"], t(0.0))
    loss, _ = value_loss(values, old, returns, t([True, False, False], dtype=torch.bool), cliprange_value=0.2)
    assert_close(loss, t(0.5 * 0.64))


def test_lm_loss_matches_cross_entropy_on_shifted_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=D)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, 4, -100]])
    # kept (logit position, label) pairs after the shift: row 0: (1 -> 3), (2 -> 1); row 1: (0 -> 2), (1 -> 4)
    picked_logits = torch.stack([logits[0, 1], logits[0, 2], logits[1, 0], logits[1, 1]])
    picked_labels = torch.tensor([3, 1, 2, 4])
    expected_sum = F.cross_entropy(picked_logits, picked_labels, reduction="sum")
    assert_close(lm_loss(logits, labels, reduction="sum"), expected_sum)
    assert_close(lm_loss(logits, labels), expected_sum / 4)
    manual = -sum(torch.log_softmax(picked_logits[i], -1)[picked_labels[i]] for i in range(4)) / 4
    assert_close(lm_loss(logits, labels), manual)
    with pytest.raises(ValueError):
        lm_loss(logits, labels, reduction="none")


def test_lm_loss_all_ignored_is_zero():
    assert_close(lm_loss(torch.randn(1, 3, 4, dtype=D), torch.full((1, 3), -100)), t(0.0))


def ls(x):
    return math.log(1.0 / (1.0 + math.exp(-x)))


def test_ranking_loss_single_group_k3():
    rewards = t([3.0, 1.0, 0.0]).requires_grad_()
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    loss, stats = ranking_loss(rewards, pairs, torch.zeros(3, dtype=torch.long), num_groups=1)
    assert_close(loss, t(-(ls(2.0) + ls(3.0) + ls(1.0)) / 3))
    assert_close(stats["accuracy"], t(1.0))
    assert_close(stats["margin_mean"], t((2.0 + 3.0 + 1.0) / 3))
    loss.backward()
    assert rewards.grad[0] < 0 < rewards.grad[2]  # minimising pushes the winner up and the loser down


def test_ranking_loss_groups_of_different_sizes_and_accuracy():
    # group 0: K=3 ranking of rows 0,1,2; group 1: K=2, rows 3,4 with the wrong order scored
    rewards = t([3.0, 1.0, 0.0, -0.5, 0.5])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4]])
    groups = torch.tensor([0, 0, 0, 1])
    loss, stats = ranking_loss(rewards, pairs, groups, num_groups=2)
    group0 = -(ls(2.0) + ls(3.0) + ls(1.0)) / 3
    group1 = -ls(-1.0)
    assert_close(loss, t((group0 + group1) / 2))
    assert_close(stats["accuracy"], t(3 / 4))
    assert_close(stats["margin_mean"], t((2.0 + 3.0 + 1.0 - 1.0) / 4))


def test_ranking_loss_ties_and_margin():
    rewards = t([1.0, 1.0, 2.0, 0.0])
    pairs = torch.tensor([[0, 1], [2, 3]])
    groups = torch.tensor([0, 1])
    _, stats = ranking_loss(rewards, pairs, groups, num_groups=2)
    assert_close(stats["accuracy"], t((0.5 + 1.0) / 2))
    margin = t([0.5, 1.5])
    loss, stats_m = ranking_loss(rewards, pairs, groups, num_groups=2, margin=margin)
    assert_close(loss, t(-(ls(0.0 - 0.5) + ls(2.0 - 1.5)) / 2))
    assert_close(stats_m["margin_mean"], t(1.0))  # stats ignore the margin
