"""What flows through a PPO iteration: the `Rollout` batch, the forwards that read log-probs and values off it, and
the one interface generation sits behind.

Shapes: B episodes, P = prompt width (left-padded), R = response width; sequences are [B, P+R], per-token
quantities [B, R].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rlhf.batching import length_batches, pad
from rlhf.models import causal_logits
from rlhf.ppo_math import entropy_from_logits, logprobs_from_logits
from rlhf.runtime import generation_context
from rlhf.sampling import generate

ROLLOUT_STREAM, EVAL_STREAM = 0, 1  # keys of the per-episode sampling seeds


def response_logprobs(
    model, query_responses, attention_mask, prompt_width: int, temperature: float, entropy=False, entropy_grad=True
):
    """[B,P+R] -> log-probs [B,R] of the response tokens (and entropies [B,R]) at the sampling temperature."""
    response_width = query_responses.shape[1] - prompt_width
    # the logits that predict the response tokens: positions P-1 .. P+R-2 (the LM head skips the rest of the prompt)
    logits = causal_logits(model, query_responses, attention_mask, last=response_width + 1)[:, :-1]
    return logprobs_and_entropy(logits, query_responses[:, prompt_width:], temperature, entropy, entropy_grad)


def logprobs_and_entropy(logits, tokens, temperature: float, entropy=False, entropy_grad=True):
    """Logits [B,R,V] that predict tokens [B,R] -> their log-probs [B,R] (and entropies [B,R]; differentiated only
    with `entropy_grad`: a softmax backward over the vocabulary)."""
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    if not entropy:
        return logprobs
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logprobs, entropy_from_logits(logits, temperature)


def response_values(value_model, query_responses, attention_mask, prompt_width: int) -> torch.Tensor:
    """[B,P+R] -> V(s_t) [B,R]: the value of the state before each response token (a TokenValueModel)."""
    return value_model(query_responses, attention_mask)[:, prompt_width - 1 : -1]


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


class ResponseGenerator(Protocol):
    """What the experience maker calls to sample responses; one implementation per engine.

    `generate(prompts, seeds)`: token ids of this process's prompts (unpadded lists) and one seed per prompt ->
    responses [B, R] on the accelerator's device, right-padded with pad ids, each response sampled with its own
    seed (a response may run past EOS: the caller truncates). The policy's weights must be the ones the learner
    last stepped: an engine that holds its own copy (vLLM, SGLang) syncs them in `sync_weights`, called after
    every update. Old log-probs are not taken from the engine: the scoring forward recomputes them under the
    training numerics, so the PPO ratio starts at exactly 1 (docs/architecture.md; with rollout.share_prompt and
    k > 1, to float rounding: a log-ratio of at most 2e-6 measured in fp32, 0 in bf16), or, when the update is one
    optimizer step, the update's own forward is them (`PPOConfig.old_logprobs_from_update`).
    """

    def generate(self, prompts: list[list[int]], seeds: list[int]) -> torch.Tensor: ...

    def sync_weights(self) -> None: ...


class HFGenerator:
    """Hugging Face `generate` on the live policy (KV cache, left-padded prompts, chunks of generation_batch_size),
    under the same autocast as the scoring forwards; nothing to sync. `prefill`: see `sampling.generate` (a group's
    prompt run once: `shared_prompt.shared_prefill`)."""

    def __init__(self, accelerator, policy, tokenizer, rollout_cfg, prefill=None):
        self.accelerator, self.policy, self.tokenizer, self.cfg = accelerator, policy, tokenizer, rollout_cfg
        self.prefill = prefill

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seeds: list[int]) -> torch.Tensor:
        """Responses [B, R] to `prompts`, in their order (R: the longest). Chunks of generation_batch_size hold
        prompts of like length (less left padding in the prefill and in every decoding step's keys; a group's
        copies of a prompt stay side by side); each episode's own seed makes its sample that of any chunking."""
        acc, cfg = self.accelerator, self.cfg
        responses: list[list[int]] = [[] for _ in prompts]
        with generation_context(acc, self.policy) as (policy, synced), acc.autocast():
            for chunk in length_batches([len(p) for p in prompts], cfg.generation_batch_size):
                _, _, resp = generate(
                    policy,
                    self.tokenizer,
                    [prompts[i] for i in chunk],
                    cfg.max_new_tokens,
                    cfg.temperature,
                    cfg.top_k,
                    cfg.top_p,
                    seeds=[seeds[i] for i in chunk],
                    synced=synced,
                    prefill=None if synced else self.prefill,  # synced ranks must run equal forwards
                )
                for i, response in zip(chunk, resp.tolist()):
                    responses[i] = response
        return pad(responses, self.tokenizer.pad_token_id).to(acc.device)

    def sync_weights(self) -> None:
        """The live policy is the one sampled: nothing to do."""
