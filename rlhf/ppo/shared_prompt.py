"""Forwards that run a group's shared prompt once (`rollout.share_prompt`, samples_per_prompt > 1).

The k responses to one prompt (RLOO, GRPO, or PPO with k > 1) all begin with the same prompt tokens, and every
scoring forward of the rollout (old and reference log-probs, values, reward scores) would run those tokens k times,
as would the update's policy and value forwards of a micro-batch holding a whole group (ppo.group_minibatches).
Here the distinct prompts of a micro-batch go through the model once with the KV cache on, the cache is copied to
each episode of the prompt, and the responses run on it: the outputs at the response positions are the full
forward's up to float rounding (the same attention, summed in another order), so are the gradients (each
response's reaches its prompt's forward through the copied cache), and (k-1)/k of the prompt tokens' work is gone.
Shapes: B episodes of width P+R (prompts left-padded to P), U distinct prompts."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf.models import (
    TokenValueModel,
    backbone,
    keeps_logits,
    offset_scores,
    position_ids_from_mask,
    score_head_values,
    wrapped_module,
)
from rlhf.ppo.rollout import logprobs_and_entropy, response_logprobs, response_values


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


def prompt_then_responses(
    forward: Callable, query_responses: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, groups, **kw
):
    """Run `forward` (a Hugging Face model or backbone) on the distinct prompts [U,P] with the KV cache on, then on
    every episode's response [B,R] over its prompt's cache. Returns both outputs; `kw` goes to the prompt forward."""
    P = prompt_width
    positions = position_ids_from_mask(attention_mask)
    first = groups.first
    prompt_out = forward(
        input_ids=query_responses[first, :P],
        attention_mask=attention_mask[first, :P],
        position_ids=positions[first, :P],
        use_cache=True,
        **kw,
    )
    cache = getattr(prompt_out, "cache", None) or prompt_out.past_key_values
    cache.reorder_cache(groups.owner)  # index_select on the batch dim: each episode gets its prompt's keys/values
    response_out = forward(
        input_ids=query_responses[:, P:],
        attention_mask=attention_mask,
        position_ids=positions[:, P:],
        use_cache=True,
        **{cache_keyword(forward): cache},
    )
    return prompt_out, response_out


def cache_keyword(model) -> str:
    """The name a Hugging Face forward takes its KV cache by: `cache` in recent transformers 5.x (5.24 deprecates
    `past_key_values`), `past_key_values` in earlier ones."""
    inner = wrapped_module(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return _cache_keyword(type(inner))


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


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
    """`rollout.response_logprobs` with the prompt shared: [B,P+R] -> log-probs [B,R] of the response tokens (and
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
    """`rollout.response_values` with the prompt shared: [B,P+R] -> V(s_t) [B,R]. `value_model`: a TokenValueModel,
    in a DDP wrapper or not (the shared forward runs inside its forward, so the wrapper syncs its gradients)."""

    def values(model, input_ids, mask, _positions):
        return shared_token_values(model, input_ids, mask, prompt_width, groups)

    return value_model(query_responses, attention_mask, values=values)[:, :-1]


def shared_reward_scores(model, query_responses, attention_mask, prompt_width: int, groups) -> torch.Tensor:
    """`models.reward_scores` with the prompt shared: [B,P+R] (responses right-padded) -> [B] scores read at each
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
