"""Pencil-and-paper checks for rlhf.algorithms: every expected number is written out or computed naively."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlhf.algorithms import (
    aggregate_ensemble,
    compute_rewards,
    distinct_n,
    entropy_from_logits,
    explained_variance,
    first_true_indices,
    gae,
    kl_penalty,
    lm_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    ranking_loss,
    truncate_after_eos,
    value_loss,
)
from rlhf.algorithms.kl_control import AdaptiveKLController, FixedKLController, KLBudget, PIKLController

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------ logprobs / entropy


def test_logprobs_from_logits_hand_example():
    logits = t([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    labels = torch.tensor([[2, 0]])
    expected = t([[3.0 - math.log(math.e + math.e**2 + math.e**3), -math.log(3.0)]])
    assert_close(logprobs_from_logits(logits, labels), expected)


def test_logprobs_temperature_divides_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=D)
    labels = torch.randint(0, 7, (2, 5))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert_close(logprobs_from_logits(logits, labels, temperature=0.7), expected)


def test_logprobs_bf16_upcast_to_float32():
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 11) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 4))
    out = logprobs_from_logits(logits, labels, temperature=2.0)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float() / 2.0, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert_close(out, expected)
    # bf16 logits (a frozen reference's) and their float32 copy (the policy's, upcast by accelerate) give the same
    # log-probs to the bit, so the KL to the reference is exactly 0 while the policy equals it
    for temperature in (1.0, 0.7):
        upcast = logprobs_from_logits(logits.float(), labels, temperature)
        assert torch.equal(logprobs_from_logits(logits, labels, temperature), upcast)


def test_entropy_uniform_is_log_v_and_matches_definition():
    assert_close(entropy_from_logits(torch.zeros(2, 3, 5, dtype=D)), torch.full((2, 3), math.log(5.0), dtype=D))
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=D)
    p = torch.softmax(logits / 1.5, -1)
    assert_close(entropy_from_logits(logits, temperature=1.5), -(p * p.log()).sum(-1))


# ------------------------------------------------------------------ masked statistics


def test_masked_stats_match_plain_ops_on_unmasked_slice():
    torch.manual_seed(0)
    values = torch.randn(3, 6, dtype=D)
    mask = prefix_mask([6, 2, 4], 6)
    kept = values[mask]
    assert_close(masked_sum(values, mask), kept.sum())
    assert_close(masked_mean(values, mask), kept.mean())
    assert_close(masked_mean(values, mask.to(D)), kept.mean())  # 0/1 float mask
    assert_close(masked_var(values, mask), kept.var(unbiased=True))
    assert_close(masked_var(values, mask, unbiased=False), kept.var(unbiased=False))
    assert_close(
        masked_mean(values, mask, dim=1), torch.stack([values[0].mean(), values[1, :2].mean(), values[2, :4].mean()])
    )


def test_masked_ops_ignore_nan_in_padding_and_empty_mask_gives_zero():
    values = t([[1.0, 3.0, float("nan")]])
    mask = t([[1, 1, 0]], dtype=torch.bool)
    assert_close(masked_sum(values, mask), t(4.0))
    assert_close(masked_mean(values, mask), t(2.0))
    assert_close(masked_mean(values, torch.zeros_like(mask)), t(0.0))


def test_masked_var_needs_two_elements_when_unbiased():
    with pytest.raises(ValueError):
        masked_var(t([1.0, 2.0]), t([True, False], dtype=torch.bool))
    assert_close(masked_var(t([1.0, 2.0]), t([True, False], dtype=torch.bool), unbiased=False), t(0.0))


def test_masked_whiten():
    torch.manual_seed(0)
    values = torch.randn(3, 5, dtype=D) * 3 + 2
    mask = prefix_mask([5, 1, 3], 5)
    kept = values[mask]
    out = masked_whiten(values, mask)
    assert_close(out[mask], (kept - kept.mean()) / torch.sqrt(kept.var() + 1e-8))
    assert_close(out[mask].mean(), t(0.0))
    assert_close(out[mask].var(), t(1.0))
    assert (out[~mask] == 0).all()

    keep_mean = masked_whiten(values, mask, shift_mean=False)
    assert_close(keep_mean[mask].mean(), kept.mean())
    assert_close(keep_mean[mask].var(), t(1.0))
    assert (keep_mean[~mask] == 0).all()


# ------------------------------------------------------------------ KL and rewards


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


# ------------------------------------------------------------------ GAE


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


# ------------------------------------------------------------------ PPO losses


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


# ------------------------------------------------------------------ LM and ranking losses


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


# ------------------------------------------------------------------ diagnostics and controllers


def test_explained_variance():
    returns = t([[1.0, 2.0, 4.0, 99.0]])
    mask = prefix_mask([3], 4)
    assert_close(explained_variance(returns, returns, mask), t(1.0))
    assert_close(explained_variance(torch.full_like(returns, 7.0 / 3.0), returns, mask), t(0.0))
    assert_close(explained_variance(torch.zeros_like(returns), t([[5.0, 5.0, 5.0, 0.0]]), mask), t(0.0))


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=0.1, horizon=10000)
    ctl.update(current_kl=0.2, n_steps=256)  # 0.2 / 0.1 - 1 = 1 -> clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    v = ctl.value
    ctl.update(current_kl=0.09, n_steps=100)  # 0.09 / 0.1 - 1 = -0.1, inside the clip
    assert ctl.value == pytest.approx(v * (1 - 0.1 * 100 / 10000))

    other = AdaptiveKLController(init_kl_coef=1.0, target=5.0, horizon=3.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    assert other.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=10.0, n_steps=64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ------------------------------------------------------------------ token-id helpers


def test_first_true_indices():
    bools = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    assert first_true_indices(bools).tolist() == [1, 4, 0]
    assert first_true_indices(bools, dtype=torch.int32).dtype == torch.int32


def test_truncate_after_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 1, 1, 1], [3, 4, 5, 2]])
    out, mask = truncate_after_eos(responses, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [3, 4, 5, 2]]
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, True],
    ]
    assert mask.dtype == torch.bool


def test_truncate_after_eos_when_pad_equals_eos():
    out, mask = truncate_after_eos(torch.tensor([[4, 9, 9, 9]]), eos_token_id=9, pad_token_id=9)
    assert out.tolist() == [[4, 9, 9, 9]]
    assert mask.tolist() == [[True, True, False, False]]


# ---------------------------------------------------------------------------------------------
# PI KL controller, KL budget, ensembles, distinct-n
# ---------------------------------------------------------------------------------------------


def test_pi_controller_steps_by_hand():
    ctl = PIKLController(0.1, target=4.0, p_gain=1.0, i_gain=0.2, lookahead=0.0, smoothing=1.0)
    ctl.update(2.0)  # e = -0.5, no proportional kick on the first update: log beta -= 0.2 * 0.5
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.1))
    ctl.update(6.0)  # e = 0.5: + 1.0 * (0.5 - (-0.5)) + 0.2 * 0.5 = +1.1
    assert ctl.value == pytest.approx(0.1 * math.exp(1.0))
    ctl.update(100.0)  # e clipped to 1: + 1.0 * (1 - 0.5) + 0.2 * 1 = +0.7
    assert ctl.value == pytest.approx(0.1 * math.exp(1.7))
    clamped = PIKLController(0.1, target=1.0, i_gain=0.5, max_coef=0.12)
    clamped.update(50.0)
    assert clamped.value == 0.12
    restored = PIKLController(1.0, target=4.0, lookahead=0.0, smoothing=1.0)
    restored.load_state_dict(ctl.state_dict())
    restored.update(4.0)
    ctl.update(4.0)
    assert restored.value == ctl.value


def test_pi_controller_acts_on_the_predicted_kl():
    ctl = PIKLController(0.1, target=4.0, p_gain=0.0, i_gain=0.2, lookahead=10.0, smoothing=1.0)
    ctl.update(1.0)  # no trend yet: e = 1/4 - 1 = -0.75
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15))
    ctl.update(2.0)  # slope = 0.2 * (2 - 1) = 0.2; predicted 2 + 10 * 0.2 = 4 -> e = 0: beta holds
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15))
    ctl.update(3.0)  # slope = 0.8 * 0.2 + 0.2 * 1 = 0.36; predicted 6.6 -> e = 0.65
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15 + 0.2 * 0.65))
    ctl.update(1.0)  # slope = 0.8 * 0.36 + 0.2 * (1 - 3) = -0.112 < 0: only the level counts, e = 1/4 - 1
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15 + 0.2 * 0.65 - 0.2 * 0.75))


def test_pi_controller_smooths_the_kl_it_acts_on():
    ctl = PIKLController(0.1, target=4.0, p_gain=0.0, i_gain=0.2, lookahead=0.0, smoothing=0.5)
    ctl.update(2.0)  # level = 2: e = -0.5
    ctl.update(6.0)  # level = 0.5 * 6 + 0.5 * (2 + 0) = 4 -> e = 0: one noisy batch at 6 moves nothing
    assert ctl.level == 4.0 and ctl.slope == pytest.approx(0.4)
    assert ctl.value == pytest.approx(0.1 * math.exp(0.2 * -0.5))


def synthetic_kl_process(controller, steps: int = 150, coef_scale: float = 0.3, tau: float = 10.0, speed: float = 1.0):
    """A policy that drifts toward its equilibrium KL* = coef_scale / beta with time constant tau, by at most
    `speed` nats per iteration (the learning rate limits how fast a policy moves); +-10% batch noise on the KL the
    controller sees. Returns the true KL per iteration."""
    import random

    rng = random.Random(0)
    kl, out = 0.0, []
    for _ in range(steps):
        controller.update(kl * (1 + 0.1 * rng.uniform(-1, 1)), 64)
        kl = max(0.0, kl + max(-speed, min(speed, (coef_scale / controller.value - kl) / tau)))
        out.append(kl)
    return out


@pytest.mark.parametrize("init_beta", [0.001, 0.05, 1.0])
@pytest.mark.parametrize("tau", [3.0, 10.0, 25.0])
def test_pi_controller_holds_the_target_whatever_the_initial_beta(init_beta, tau):
    target = 6.0  # held by beta = 0.05 in this process
    kl = synthetic_kl_process(PIKLController(init_beta, target), tau=tau)
    last = sum(kl[-20:]) / 20
    assert abs(last / target - 1) < 0.15, (init_beta, tau, last)
    assert max(kl[-20:]) < 1.5 * target


def test_proportional_controller_with_its_usual_horizon_is_too_slow_to_hold_the_target():
    """Why PI is the default: Ziegler's controller moves beta by at most 0.2 * batch / horizon per iteration."""
    kl = synthetic_kl_process(AdaptiveKLController(0.001, 6.0, horizon=10000), tau=10.0)
    assert sum(kl[-20:]) / 20 > 3 * 6.0


def test_kl_budget_smooths_over_its_window():
    budget = KLBudget(limit=5.0, window=3)
    assert [budget.update(kl) for kl in (2.0, 4.0, 6.0)] == [False, False, False]  # means 2, 3, 4
    assert budget.update(8.0) is True  # (4 + 6 + 8) / 3 = 6 > 5: the 2 has left the window
    assert budget.smoothed == pytest.approx(6.0)
    restored = KLBudget(limit=5.0, window=3)
    restored.load_state_dict(budget.state_dict())
    assert restored.exceeded and restored.history == [4.0, 6.0, 8.0]
    off = KLBudget(limit=0.0)
    assert off.update(1e9) is False


def test_ensemble_aggregates_by_hand():
    scores = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # 2 members x 2 responses
    mean, std = aggregate_ensemble(scores, "mean")
    assert_close(mean, torch.tensor([2.0, 4.0]))
    assert_close(std, torch.tensor([1.0, 2.0]))  # population std: |3 - 1| / 2, |6 - 2| / 2
    assert_close(aggregate_ensemble(scores, "mean_minus_std", 0.5)[0], torch.tensor([1.5, 3.0]))
    assert_close(aggregate_ensemble(scores, "min")[0], torch.tensor([1.0, 2.0]))
    single, single_std = aggregate_ensemble(torch.tensor([[0.7, -0.2]]), "mean_minus_std")
    assert_close(single, torch.tensor([0.7, -0.2]))
    assert_close(single_std, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown ensemble aggregate"):
        aggregate_ensemble(scores, "max")


def test_distinct_n_by_hand():
    seqs = [[1, 2, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(2 / 6)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (1,2)
    assert distinct_n([[5]], 2) == 0.0


# ---- the lineage: REINFORCE with a baseline, RLOO, GRPO, L^KLPEN (hand-computed) ----------------------------


def test_reinforce_returns_and_batch_mean_baseline():
    from rlhf.algorithms import reinforce_advantages

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
    from rlhf.algorithms import group_advantages

    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert torch.allclose(group_advantages(rewards, 2, "rloo"), torch.tensor([-1.0, 1.0, -7.0, 7.0]))
    three = torch.tensor([1.0, 2.0, 6.0])  # leave-one-out means 4, 3.5, 1.5
    assert torch.allclose(group_advantages(three, 3, "rloo"), torch.tensor([-3.0, -1.5, 4.5]))
    std = (((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) ** 0.5  # unbiased: sqrt(7)
    expected = torch.tensor([-2.0, -1.0, 3.0]) / (std + 1e-6)
    assert torch.allclose(group_advantages(three, 3, "grpo"), expected)
    with pytest.raises(ValueError, match="groups of >= 2"):
        group_advantages(rewards, 1, "rloo")


def test_klpen_policy_loss_and_adaptive_beta():
    from rlhf.algorithms import KLPenaltyCoef, klpen_policy_loss

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
