"""From token ids to batches: padding, collation, and the order rows are batched in (the deterministic epoch
schedule of training, and batches of like length for scoring and PPO's episodes)."""

from __future__ import annotations

import torch

from rlhf.data.sources import DataError


def pad(sequences: list[list[int]], value: int, side: str = "right", width: int = 0) -> torch.Tensor:
    """Pad to the longest sequence of this batch (or to `width` when that is longer) -> [B, width]."""
    width = max(width, max(len(s) for s in sequences))
    rows = [s + [value] * (width - len(s)) if side == "right" else [value] * (width - len(s)) + s for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def collate_left_padded_prompts(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """(prompt, response) rows laid out as PPO's episodes, for the forwards that run a shared prompt once: each prompt
    left-padded to the longest P, its response right-padded after it to the longest R. input_ids, attention_mask,
    response_mask [N, P+R]; prompt_width P (a 0-d tensor, so the batch moves to the device whole)."""
    width = max(map(len, prompts))
    ids = torch.cat([pad(prompts, pad_token_id, "left"), pad(responses, pad_token_id)], 1)
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, "left")
    response_mask = pad([[1] * len(r) for r in responses], 0)
    return {
        "input_ids": ids,
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        "response_mask": torch.cat([torch.zeros_like(prompt_mask), response_mask], 1),
        "prompt_width": torch.tensor(width),
    }


def collate_lm(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "labels": pad([e["labels"] for e in examples], -100),
    }


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices [0, len(lengths)) in batches of `batch_size` rows of like length, longest first (a batch that does
    not fit in memory fails at once), ties by index: for evaluation and scoring, whose results are put back in
    order, so the batching changes only how much padding is computed."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


# the orders aligned_batches tries: by the response's length first (the best one where prompts are of one length),
# then the prompt's, their sum and their max, each ascending and descending
_ALIGNED_KEYS = (lambda p, r: r, lambda p, r: p, lambda p, r: p + r, lambda p, r: max(p, r))


def aligned_batches(prompt_lengths: list[int], response_lengths: list[int], batch_size: int) -> list[list[int]]:
    """Positions [0, n) in batches of `batch_size` for sequences laid out as [left-padded prompt | response] and
    aligned at the prompt's end (PPO's episodes): once a batch's shared padding is cut (`real_columns`), it is as
    wide as its longest prompt plus its longest response, so when both vary no one length orders them well (by the
    response's alone, a batch of chat prompts keeps most of their padding). Sorts by each of _ALIGNED_KEYS both ways
    (ties by position) and keeps the order whose batches compute the fewest cells (rows x width, summed; the first
    of equals). Pure and deterministic: a function of the lengths alone."""
    n = len(prompt_lengths)
    best: list[list[int]] = []
    best_cells = -1
    for key in _ALIGNED_KEYS:
        for sign in (1, -1):
            order = sorted(range(n), key=lambda i: (sign * key(prompt_lengths[i], response_lengths[i]), i))
            batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
            cells = sum(
                len(b) * (max(prompt_lengths[i] for i in b) + max(response_lengths[i] for i in b)) for b in batches
            )
            if best_cells < 0 or cells < best_cells:
                best, best_cells = batches, cells
    return best


def batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Deterministic batches of row indices for one epoch (a pure function of seed and epoch, so resume is exact).

    Rows are shuffled; with group_by_length, each window of 64 batches is sorted by length before cutting it into
    batches (less padding), and the batch order is shuffled again so lengths don't trend over the epoch.
    Only full batches are returned.
    """
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        window = batch_size * 64
        perm = [i for s in range(0, len(perm), window) for i in sorted(perm[s : s + window], key=lengths.__getitem__)]
    batches = [perm[s : s + batch_size] for s in range(0, len(perm) - batch_size + 1, batch_size)]
    if group_by_length:
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
    return batches


class BatchSchedule:
    """The global batch of row indices for any step: consecutive epochs of `batch_order`, cached per epoch.

    A pure function of (lengths, batch_size, seed, step), which is what makes resume exact.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True, what: str = ""):
        if len(lengths) < batch_size:
            raise DataError(f"{what or 'data'}: {len(lengths)} rows is fewer than one batch of {batch_size}")
        self.lengths, self.batch_size, self.seed, self.group_by_length = lengths, batch_size, seed, group_by_length
        self.steps_per_epoch = len(lengths) // batch_size
        self._epoch, self._batches = -1, []

    def __call__(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = batch_order(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length)
        return self._batches[i]
