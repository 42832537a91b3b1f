"""Forwards that run a group's shared prompt once (`rollout.share_prompt`, samples_per_prompt > 1).

The k responses to one prompt (RLOO, GRPO, or PPO with k > 1) all begin with the same prompt tokens, and
generation's prefill and every scoring forward of the rollout (old and reference log-probs, values, reward scores)
would run those tokens k times, as would the update's policy and value forwards of a micro-batch holding a whole
group (ppo.group_minibatches).
Here the distinct prompts of a micro-batch go through the model once with the KV cache on, the cache is copied to
each episode of the prompt, and the responses run on it: the outputs at the response positions are the full
forward's up to float rounding (the same attention, summed in another order), so are the gradients (each
response's reaches its prompt's forward through the copied cache), and (k-1)/k of the prompt tokens' work is gone.
Shapes: B episodes of width P+R (prompts left-padded to P), U distinct prompts."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf.data.batching import collate_left_padded_prompts
from rlhf.models.forwards import (
    backbone,
    cache_keyword,
    keeps_logits,
    logprobs_and_entropy,
    position_ids_from_mask,
    response_logprobs,
    response_values,
    wrapped_module,
)
from rlhf.models.heads import TokenValueModel, offset_scores, score_head_values


@dataclass(frozen=True)
class PromptGroups:
    """Which episodes share a prompt: `first` [U] is an episode holding each distinct prompt, `owner` [B] the
    distinct prompt (an index into `first`) of each episode."""

    first: torch.Tensor
    owner: torch.Tensor


def prompt_groups(keys: Sequence, device: torch.device | str = "cpu") -> PromptGroups | None:
    """Episodes with equal `keys` (their prompt rows) share a prompt; None when no prompt repeats."""
    index: dict = {}
    owner = [index.setdefault(key, len(index)) for key in keys]
    if len(index) == len(owner):
        return None
    first = [owner.index(u) for u in range(len(index))]
    return PromptGroups(torch.tensor(first, device=device), torch.tensor(owner, device=device))


def collate_shared_prompts(
    prompts: list[list[int]], responses: list[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor] | None:
    """(prompt, response) rows (DPO's and the RM's share_prompt) as PPO's episodes: each prompt left-padded to the
    longest P, its response right-padded after it. input_ids, attention_mask, response_mask [N, P+R], prompt_width
    P (0-d, so the batch moves to the device whole), and the rows' prompt groups `prompt_first` [U] / `prompt_owner`
    [N] (by equal ids rather than by where a row came from: truncation may shorten one prompt's copies differently).
    None when no prompt repeats: nothing to share."""
    groups = prompt_groups([tuple(prompt) for prompt in prompts])
    if groups is None:
        return None
    layout = collate_left_padded_prompts(prompts, responses, pad_token_id)
    return layout | {"prompt_first": groups.first, "prompt_owner": groups.owner}


def batch_prompt_groups(batch: dict) -> tuple[PromptGroups, int] | None:
    """(the prompt groups, the prompt width P) of a `collate_shared_prompts` batch; None for any other batch."""
    if "prompt_owner" not in batch:
        return None
    return PromptGroups(batch["prompt_first"], batch["prompt_owner"]), int(batch["prompt_width"])


def prompt_then_responses(
    forward: Callable, query_responses: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, groups, **kw
):
    """Run `forward` (a Hugging Face model or backbone) on the distinct prompts [U,P] with the KV cache on, then on
    every episode's response [B,R] over its prompt's cache. Returns both outputs; `kw` goes to the prompt forward."""
    P = prompt_width
    positions = position_ids_from_mask(attention_mask)
    prompt = (query_responses[:, :P], attention_mask[:, :P], positions[:, :P])
    prompt_out, cache = _prompt_forward(forward, *prompt, groups, **kw)
    response_out = forward(
        input_ids=query_responses[:, P:],
        attention_mask=attention_mask,
        position_ids=positions[:, P:],
        use_cache=True,
        **{cache_keyword(forward): cache},
    )
    return prompt_out, response_out


def _prompt_forward(forward: Callable, prompt_ids, prompt_mask, positions, groups: PromptGroups, **kw):
    """`forward` on the distinct prompts only ([B,T] -> [U,T] rows) with the KV cache on: (its output, the cache
    copied to every episode [B rows])."""
    first = groups.first
    out = forward(
        input_ids=prompt_ids[first],
        attention_mask=prompt_mask[first],
        position_ids=positions[first],
        use_cache=True,
        **kw,
    )
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.reorder_cache(groups.owner)  # index_select on the batch dim: each episode gets its prompt's keys/values
    return out, cache


def shared_prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """The KV cache of every prompt's first P-1 columns, each distinct prompt run once (rows of equal token ids are one
    prompt) and its keys/values copied to its rows; None when no prompt repeats or P = 1. [B,P] -> a cache of B rows
    and P-1 positions, from which `generate` runs the last prompt column and decodes: the tokens it would sample from
    the whole prompt, up to float rounding in the logits. `model`: a causal LM (peft-wrapped or not) in no wrapper
    that shards it; only its backbone runs (no logits are needed)."""
    if prompt_ids.shape[1] < 2:
        return None
    groups = prompt_groups([tuple(row) for row in prompt_ids.tolist()], prompt_ids.device)
    if groups is None:
        return None
    prefix = slice(None, prompt_ids.shape[1] - 1)
    prompt = (prompt_ids[:, prefix], prompt_mask[:, prefix], position_ids_from_mask(prompt_mask)[:, prefix])
    return _prompt_forward(backbone(model), *prompt, groups)[1]


def shared_response_logprobs(
    model,
    query_responses,
    attention_mask,
    prompt_width: int,
    temperature: float,
    groups: PromptGroups,
    entropy=False,
    entropy_grad=True,
):
    """`forwards.response_logprobs` with the prompt shared: [B,P+R] -> log-probs [B,R] of the response tokens (and
    entropies [B,R]). Differentiable: the learner's backward sums each response's gradient through its prompt's
    cache into the one prompt forward, which is the full forwards' gradient up to float rounding."""
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    prompt_out, response_out = prompt_then_responses(
        model, query_responses, attention_mask, prompt_width, groups, **keep
    )
    # the prompt's last position predicts the first response token; response positions 0..R-2 predict the rest
    logits = torch.cat([prompt_out.logits[:, -1:][groups.owner], response_out.logits[:, :-1]], 1)
    tokens = query_responses[:, prompt_width:]
    return logprobs_and_entropy(logits, tokens, temperature, entropy, entropy_grad)


def shared_token_values(model, query_responses, attention_mask, prompt_width: int, groups) -> torch.Tensor:
    """A scalar-head model's values at the prompt's last position and every response position: [B,P+R] -> [B,1+R]
    (column 0 = the state before the first response token). `model`: a `*ForSequenceClassification` model or a
    TokenValueModel (run here as its inner model, so with no wrapper's gradient sync: for frozen models), inside no
    wrapper that shards it."""
    inner = wrapped_module(model)
    inner = inner.model if isinstance(inner, TokenValueModel) else inner
    prompt_out, response_out = prompt_then_responses(
        backbone(inner), query_responses, attention_mask, prompt_width, groups
    )
    hidden = torch.cat([prompt_out.last_hidden_state[:, -1:][groups.owner], response_out.last_hidden_state], 1)
    return score_head_values(inner, hidden)


def shared_response_values(value_model, query_responses, attention_mask, prompt_width: int, groups) -> torch.Tensor:
    """`forwards.response_values` with the prompt shared: [B,P+R] -> V(s_t) [B,R]. `value_model`: a TokenValueModel,
    in a DDP wrapper or not (the shared forward runs inside its forward, so the wrapper syncs its gradients)."""

    def values(model, input_ids, mask, _positions):
        return shared_token_values(model, input_ids, mask, prompt_width, groups)

    return value_model(query_responses, attention_mask, values=values)[:, :-1]


def shared_reward_scores(model, query_responses, attention_mask, prompt_width: int, groups) -> torch.Tensor:
    """`heads.reward_scores` with the prompt shared: [B,P+R] (responses right-padded) -> [B] scores read at each
    response's last real token (the prompt's last token for an empty response)."""
    values = shared_token_values(model, query_responses, attention_mask, prompt_width, groups)
    last = attention_mask[:, prompt_width:].sum(1, keepdim=True)  # column 0 is the prompt's last token
    return offset_scores(model, values.gather(1, last).squeeze(1))


def logprobs_forward(groups: PromptGroups | None) -> Callable:
    """`response_logprobs`, or its shared-prompt form when `groups` marks episodes that share a prompt."""
    return response_logprobs if groups is None else functools.partial(shared_response_logprobs, groups=groups)


def values_forward(groups: PromptGroups | None) -> Callable:
    """`response_values`, or its shared-prompt form when `groups` marks episodes that share a prompt."""
    return response_values if groups is None else functools.partial(shared_response_values, groups=groups)
