"""Packing (`data.packing`): a micro-batch's rows concatenated into sequences of at most `max_length` tokens, so
the forward computes real tokens instead of padding, with no attention across rows.

A packed sequence carries `position_ids` that restart at 0 on each row and no 2-D attention mask: transformers
then builds a block-diagonal causal mask from the restarts (sdpa, eager) or runs varlen kernels (flash attention),
so each row sees exactly what it sees alone. `check_rows_independent` proves that on the model at hand before a run
relies on it. The label of each row's first token is -100 (it would otherwise be "predicted" from the row before),
so the summed next-token loss, and its token count, are those of the rows unpacked.

Rows are placed by best-fit decreasing (the longest first, each into the fullest sequence it still fits):
deterministic, and no row is ever split.
"""

from __future__ import annotations

import bisect

import torch

from rlhf.data.batching import pad

__all__ = [
    "best_fit_decreasing",
    "collate_packed",
    "pack_rows",
    "packed_micro_batches",
]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity (a row longer than capacity gets a bin of
    its own). Longest rows first; each goes to the bin with the least room that still fits it (ties: the oldest
    bin), else a new bin. Deterministic; bins come out in order of creation, rows in order of placement."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


def collate_packed(sequences: list[list[dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed sequences (each a list of {input_ids, labels} rows) -> a batch [S, W], W = the longest sequence.

    input_ids: the rows back to back, then padding; labels: each row's labels with its first token's set to -100,
    padding -100; position_ids: 0.. on each row and on the padding tail (a block of its own); attention_mask: 1 on
    real tokens (for counting: the model gets the position ids instead, see `causal_logits`)."""
    ids, labels, positions = [], [], []
    for rows in sequences:
        ids.append([t for r in rows for t in r["input_ids"]])
        labels.append([lab for r in rows for lab in [-100] + list(r["labels"][1:])])
        positions.append([p for r in rows for p in range(len(r["input_ids"]))])
    width = max(len(s) for s in ids)
    return {
        "input_ids": pad(ids, pad_token_id),
        "labels": pad(labels, -100),
        "position_ids": torch.tensor([p + list(range(width - len(p))) for p in positions], dtype=torch.long),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
    }


def pack_rows(rows: list[list[int]], max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token rows (no labels: a scalar per row, as a reward model or DPO reads) -> {input_ids, position_ids,
    attention_mask, row_index} [S, W] packed by best fit (row_index: which row each token is of, -1 on padding),
    and last_index [N]: the flat position (s * W + t) of each row's last token, in the rows' order."""
    bins = best_fit_decreasing([len(r) for r in rows], max_length)
    batch = collate_packed([[{"input_ids": rows[i], "labels": rows[i]} for i in b] for b in bins], pad_token_id)
    del batch["labels"]
    width, last_index = batch["input_ids"].shape[1], [0] * len(rows)
    row_index = torch.full_like(batch["input_ids"], -1)
    for s, b in enumerate(bins):
        end = s * width
        for i in b:
            row_index.view(-1)[end : end + len(rows[i])] = i
            end += len(rows[i])
            last_index[i] = end - 1
    batch["last_index"] = torch.tensor(last_index, dtype=torch.long)
    batch["row_index"] = row_index
    return batch


def packed_micro_batches(rows: list[dict], max_length: int, micro_batch_size: int, pad_token_id: int) -> list[dict]:
    """One process's rows of a step -> packed micro-batches of `micro_batch_size` sequences of <= max_length
    tokens each (the memory bound of an unpacked micro-batch of full-length rows)."""
    bins = best_fit_decreasing([len(r["input_ids"]) for r in rows], max_length)
    sequences = [[rows[i] for i in b] for b in bins]
    return [
        collate_packed(sequences[s : s + micro_batch_size], pad_token_id)
        for s in range(0, len(sequences), micro_batch_size)
    ]
