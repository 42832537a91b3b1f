"""The `Rollout`: what the experience maker hands the learner, one iteration's episodes with their scores, rewards
and advantages; the column cut (`real_columns`) that lets a forward over some of its episodes skip the padding; and
the gathering of every process's episodes into one (`gather_episodes`).

Shapes: B episodes, P = prompt width (left-padded), R = response width; sequences are [B, P+R], per-token
quantities [B, R].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROLLOUT_STREAM, EVAL_STREAM = 0, 1  # keys of the per-episode sampling seeds


@dataclass(kw_only=True)
class Rollout:
    """One iteration's episodes. Tensors are [B, P+R] (sequences), [B, R] (per token) or [B] (per episode)."""

    query_responses: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int
    logprobs: torch.Tensor | None  # old log-probs; None until the update's forward gives them (one-step updates)
    ref_logprobs: torch.Tensor | None  # None without a reference (models.reference: none)
    values: torch.Tensor  # zeros without a critic
    scores: torch.Tensor  # what the rewards add: raw_scores after the missing-EOS penalty, normalising, clipping
    raw_scores: torch.Tensor  # the reward model(s) and/or function as they scored
    score_std: torch.Tensor  # the reward-model ensemble's disagreement (0 for one member)
    ended: torch.Tensor  # whether the response ended with EOS
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
            query_responses=self.query_responses[idx][:, first : P + end],
            attention_mask=attention_mask[:, first : P + end],
            response_mask=response_mask[:, :end],
            prompt_width=P - first,
            logprobs=per_token(self.logprobs),
            ref_logprobs=per_token(self.ref_logprobs),
            values=per_token(self.values),
            scores=self.scores[idx],
            raw_scores=self.raw_scores[idx],
            score_std=self.score_std[idx],
            ended=self.ended[idx],
            rewards=per_token(self.rewards),
            advantages=per_token(self.advantages),
            returns=per_token(self.returns),
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


def gather_episodes(acc, ro: Rollout, pad_token_id: int) -> Rollout:
    """Every process's episodes on every process, in the iteration's global order (identity on one process).

    Responses are padded to the longest on any process. Holding the whole (small: token ids and per-token
    floats) rollout everywhere makes advantages, statistics and minibatches those of a single process.
    """
    if acc.num_processes == 1:
        return ro
    world, local = acc.num_processes, ro.query_responses.shape[0]
    # gathered row r * local + k holds episode r + k * world
    order = torch.tensor([(i % world) * local + i // world for i in range(world * local)], device=acc.device)

    def everywhere(t: torch.Tensor | None, pad_value=0) -> torch.Tensor | None:
        if t is None:
            return None
        dtype = t.dtype
        t = t.long() if dtype == torch.bool else t  # gloo cannot reduce bool tensors
        if t.dim() == 2:
            t = acc.pad_across_processes(t, dim=1, pad_index=pad_value)
        return acc.gather(t)[order].to(dtype)

    # the collectives in one order on every process
    return Rollout(
        query_responses=everywhere(ro.query_responses, pad_token_id),
        attention_mask=everywhere(ro.attention_mask),
        response_mask=everywhere(ro.response_mask),
        prompt_width=ro.prompt_width,
        logprobs=everywhere(ro.logprobs),
        ref_logprobs=everywhere(ro.ref_logprobs),
        values=everywhere(ro.values),
        scores=everywhere(ro.scores),
        raw_scores=everywhere(ro.raw_scores),
        score_std=everywhere(ro.score_std),
        ended=everywhere(ro.ended),
    )
