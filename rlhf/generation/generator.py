"""The generation interface the experience maker samples through (`ResponseGenerator`), and its Hugging Face
`generate` implementation."""

from __future__ import annotations

from typing import Protocol

import torch

from rlhf.data.batching import length_batches, pad
from rlhf.generation.sampling import generate
from rlhf.runtime.accelerator import generation_context


class ResponseGenerator(Protocol):
    """What the experience maker calls to sample responses; one implementation per engine.

    `generate(prompts, seeds)`: token ids of this process's prompts (unpadded lists) and one seed per prompt ->
    responses [B, R] on the accelerator's device, right-padded with pad ids, each response sampled with its own
    seed (a response may run past EOS: the caller truncates). The policy's weights must be the ones the learner
    last stepped: an engine that holds its own copy (vLLM, SGLang) syncs them in `sync_weights`, called after
    every update. Old log-probs are not taken from the engine: the scoring forward recomputes them under the
    training numerics, so the PPO ratio starts at exactly 1 (docs/architecture.md; with rollout.share_prompt and
    k > 1, to float rounding), or, when the update is one optimizer step, the update's own forward is them
    (`rlhf.stages.ppo.settings.old_logprobs_from_update`).
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
