"""Preference rows as ranked groups: encoding (prompt ids, response ids) best first, and the pair index the
ranking losses read (RM and DPO)."""

from __future__ import annotations

import torch

from rlhf.config import FormatConfig, TextSource
from rlhf.data.batching import TruncationReport, encode_pairs, encode_prompts
from rlhf.data.sources import load_source


def load_ranked(tokenizer, fmt: FormatConfig, source: TextSource, report: TruncationReport) -> list[list[tuple]]:
    """Preference rows -> per prompt, its responses best first as (prompt ids, response ids + EOS) (RM and DPO)."""
    rows = load_source(source, "preference", on_bad_row=fmt.on_bad_row).to_list()
    prompts = encode_prompts(tokenizer, fmt, rows, report)
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
