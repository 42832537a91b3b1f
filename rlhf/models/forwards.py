"""Forwards shared by the stages: response log-probs and entropy, token values, reward scores of sequences
in micro-batches, and the summed LM loss of examples."""

from __future__ import annotations

import contextlib

import torch

from rlhf.algorithms import entropy_from_logits, lm_loss, logprobs_from_logits
from rlhf.data.batching import (
    collate_lm,
    length_batches,
    pad,
)
from rlhf.models.loading import (
    causal_logits,
    reward_scores,
)


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


@torch.no_grad()
def score_sequences(
    model, sequences: list[list[int]], micro: int, pad_token_id: int, device, normalized: bool = False
) -> torch.Tensor:
    """Scores [N] of token sequences, in order (raw unless `normalized`), on the CPU."""
    model.eval()
    out = torch.zeros(len(sequences))
    for index in length_batches([len(x) for x in sequences], micro):  # batches of like length, scores in order
        chunk = [sequences[i] for i in index]
        ids, mask = pad(chunk, pad_token_id).to(device), pad([[1] * len(c) for c in chunk], 0).to(device)
        out[index] = reward_scores(model, ids, mask, normalized=normalized).float().cpu()
    return out


@torch.no_grad()
def summed_lm_loss(model, examples: list, micro: int, pad_token_id: int, device, autocast=contextlib.nullcontext):
    """(sum of next-token losses, number of labelled tokens) over `examples`, in micro-batches of `micro`."""
    total, count = 0.0, 0
    for s in range(0, len(examples), micro):
        batch = {k: v.to(device) for k, v in collate_lm(examples[s : s + micro], pad_token_id).items()}
        with autocast():
            logits = causal_logits(model, batch["input_ids"], batch["attention_mask"])
        total += float(lm_loss(logits.float(), batch["labels"], reduction="sum"))
        count += int(token_units(batch))
    return total, count


def token_units(batch: dict) -> torch.Tensor:
    """Tokens that carry loss in a batch (labels are shifted by one inside lm_loss)."""
    return (batch["labels"][:, 1:] != -100).sum()
