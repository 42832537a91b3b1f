"""What flows through a PPO iteration: the `Rollout` batch, the forwards that read log-probs and values off it, and
the one interface generation sits behind.

Shapes: B episodes, P = prompt width (left-padded), R = response width; sequences are [B, P+R], per-token
quantities [B, R].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROLLOUT_STREAM, EVAL_STREAM = 0, 1  # keys of the per-episode sampling seeds


@dataclass
class Rollout:
    """One iteration's episodes on this process. Tensors are [B, P+R] (sequences) or [B, R] (per token)."""

    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    logprobs: torch.Tensor | None  # old log-probs; None until the update's forward gives them (one-step updates)
    ref_logprobs: torch.Tensor | None  # None without a reference (models.reference: none)
    values: torch.Tensor  # zeros without a critic
    scores: torch.Tensor
    raw_scores: torch.Tensor
    score_std: torch.Tensor
    ended: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> Rollout:
        """The episodes `idx` [b] as a Rollout of their own, cut to the columns where any of them has a real token
        (`real_columns`): a forward over it skips the padding every row of it has, with the same outputs at the
        real positions (positions count real tokens; attention is causal)."""
        attention_mask, response_mask = self.attention_mask[idx], self.response_mask[idx]
        first, end = real_columns(attention_mask, response_mask, self.prompt_width)
        P = self.prompt_width

        def per_token(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx][:, :end]

        return Rollout(
            self.query_responses[idx][:, first : P + end],
            attention_mask[:, first : P + end],
            response_mask[:, :end],
            P - first,
            per_token(self.logprobs),
            per_token(self.ref_logprobs),
            per_token(self.values),
            self.scores[idx],
            self.raw_scores[idx],
            self.score_std[idx],
            self.ended[idx],
            per_token(self.rewards),
            per_token(self.advantages),
            per_token(self.returns),
        )


def real_columns(attention_mask: torch.Tensor, response_mask: torch.Tensor, prompt_width: int) -> tuple[int, int]:
    """(first, end) of sequences [B, P+R] with response_mask [B, R]: the prompt columns from `first` on and the
    response columns before `end` hold every real token (left padding common to all rows before `first`, right
    padding common to all rows from `end` on). One host sync."""
    real_prompt = attention_mask[:, :prompt_width].any(0)
    real_response = response_mask.any(0)
    first_and_end = torch.stack(
        [
            torch.where(real_prompt, torch.arange(prompt_width, device=real_prompt.device), prompt_width).min(),
            torch.where(real_response, torch.arange(1, real_response.numel() + 1, device=real_response.device), 0)
            .max()
            .clamp(min=1),
        ]
    ).tolist()
    return int(first_and_end[0]), int(first_and_end[1])
