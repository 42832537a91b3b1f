"""Pencil-and-paper checks for rlhf.algorithms.ops: log-probs and entropy, masked statistics, token-id helpers."""

import math

import pytest
import torch
from torch.testing import assert_close

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

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


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


def test_explained_variance():
    returns = t([[1.0, 2.0, 4.0, 99.0]])
    mask = prefix_mask([3], 4)
    assert_close(explained_variance(returns, returns, mask), t(1.0))
    assert_close(explained_variance(torch.full_like(returns, 7.0 / 3.0), returns, mask), t(0.0))
    assert_close(explained_variance(torch.zeros_like(returns), t([[5.0, 5.0, 5.0, 0.0]]), mask), t(0.0))


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
