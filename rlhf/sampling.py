"""Batched sampling shared by PPO rollouts, evaluation, SFT sample logging and `rlhf generate`."""

from __future__ import annotations

import torch

from rlhf.batching import pad
from rlhf.ppo_math import truncate_after_eos


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one response per prompt from the model's own distribution, with the KV cache.

    Prompts are left-padded so every row's response starts at the same column. Returns
    (prompt_ids [B,P] left-padded, prompt_mask [B,P], response_ids [B,R]) where every token after a row's
    first EOS is PAD. Generation stops when every row has produced EOS or after max_new_tokens.
    """
    device = next(model.parameters()).device
    prompt_ids = pad(prompts, tokenizer.pad_token_id, side="left").to(device)
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        top_p=top_p if do_sample else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    if was_training:
        model.train()
    responses = out[:, prompt_ids.shape[1] :]
    if responses.shape[1] == 0:
        responses = torch.full((len(prompts), 1), tokenizer.pad_token_id, device=device, dtype=torch.long)
    responses, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return prompt_ids, prompt_mask, responses


def decode_responses(tokenizer, responses: torch.Tensor) -> list[str]:
    """Response ids [B,R] -> text without EOS/PAD."""
    return tokenizer.batch_decode(responses, skip_special_tokens=True)
