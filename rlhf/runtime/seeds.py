"""The global random state a stage starts from (model initialisation, dropout, anything drawn without its own
generator). Sampling draws from per-episode generators instead: `rlhf.generation.sampling.episode_seed`."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch: every device's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
