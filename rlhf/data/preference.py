"""Preference rows as ranked groups (RM and DPO): encoding (prompt ids, response ids) best first, a stage's training
and held-out groups with their batch schedule, and the pair index the ranking losses read."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rlhf.config import DPOData, FormatConfig, RMData, TextSource
from rlhf.data.batching import BatchSchedule
from rlhf.data.encoding import TruncationReport, encode_pairs, encode_prompts
from rlhf.data.sources import load_source

# a group: one prompt's responses, best first, each as (prompt ids, response ids + EOS)
Group = list[tuple[list[int], list[int]]]


def load_ranked(tokenizer, fmt: FormatConfig, source: TextSource, report: TruncationReport) -> list[Group]:
    """Preference rows -> per prompt, its responses best first as (prompt ids, response ids + EOS) (RM and DPO)."""
    rows = load_source(source, "preference", on_bad_row=fmt.on_bad_row).to_list()
    prompts = encode_prompts(tokenizer, fmt, rows, report, source=source.path)
    flat_prompts = [p for p, r in zip(prompts, rows) for _ in r["ranked"]]
    flat_responses = [resp for r in rows for resp in r["ranked"]]
    pairs = encode_pairs(tokenizer, fmt, flat_prompts, flat_responses, source.path, report)
    groups, k = [], 0
    for r in rows:
        group = [pair for pair in pairs[k : k + len(r["ranked"])] if pair is not None]
        k += len(r["ranked"])
        if len(group) >= 2:  # a response dropped as too long leaves the others' order intact
            groups.append(group)
    return groups


def joined(groups: list[Group]) -> list[list[list[int]]]:
    """Each response with its prompt in front: groups of whole sequences (prompt + response + EOS), best first."""
    return [[prompt + response for prompt, response in group] for group in groups]


@dataclass
class PreferenceData:
    """A preference stage's comparison groups and the schedule that picks each step's training groups."""

    train: list[Group]
    eval: list[Group]
    schedule: BatchSchedule
    report: TruncationReport  # what truncation did to the training rows


def load_preference_data(
    tokenizer, data: RMData | DPOData, batch_size: int, seed: int, bootstrap_seed: int | None = None
) -> PreferenceData:
    """The training and held-out groups of `data`, and a schedule of `batch_size` training groups a step.

    With `bootstrap_seed` the training groups are a bootstrap resample of the rows' groups (as many, drawn with
    replacement): an ensemble member's own view of the comparisons."""
    report = TruncationReport()
    train = load_ranked(tokenizer, data.format, data.train, report)
    if bootstrap_seed is not None:
        rng = random.Random(bootstrap_seed)
        train = [train[rng.randrange(len(train))] for _ in train]
    held_out = load_ranked(tokenizer, data.format, data.eval, TruncationReport()) if data.eval.path else []
    # packing fills sequences best from responses of mixed lengths; unpacked, groups of like length pad least
    schedule = BatchSchedule(
        [sum(len(p) + len(r) for p, r in g) for g in train],
        batch_size,
        seed,
        group_by_length=not data.packing,
        what=data.train.path,
    )
    return PreferenceData(train, held_out, schedule, report)


def ranking_index(sizes: list[int], margin_coef: float) -> dict[str, torch.Tensor]:
    """The pairs of groups of `sizes` responses laid end to end, each best first: pair_index [P, 2] (better, worse),
    group_index [P], seq_group [N] (each response's group) and margin [P] (margin_coef x rank distance)."""
    pair_index, group_index, margin, base = [], [], [], 0
    for g, size in enumerate(sizes):
        for i in range(size):
            for j in range(i + 1, size):
                pair_index.append((base + i, base + j))
                group_index.append(g)
                margin.append(margin_coef * (j - i))
        base += size
    return {
        "pair_index": torch.tensor(pair_index, dtype=torch.long),
        "group_index": torch.tensor(group_index, dtype=torch.long),
        "seq_group": torch.tensor([g for g, size in enumerate(sizes) for _ in range(size)], dtype=torch.long),
        "margin": torch.tensor(margin, dtype=torch.float32),
    }
