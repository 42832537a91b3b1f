"""Pencil-and-paper checks for rlhf.algorithms.ensemble: each aggregate of the members' scores."""

import pytest
import torch
from torch.testing import assert_close

from rlhf.algorithms.ensemble import aggregate_ensemble


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
