"""Forwards shared by the stages: causal-LM logits, response log-probs and entropy, token values, and the summed
LM loss of examples; and what a forward needs to know about the Hugging Face model inside any wrapper.

Every forward passes position ids computed from the attention mask, so a left-padded batch (as PPO generates)
gets the same positions as the unpadded sequence, exactly as `generate()` does internally.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn

from rlhf.algorithms import entropy_from_logits, lm_loss, logprobs_from_logits
from rlhf.data.batching import collate_lm


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,T] -> [B,T] positions counting only real tokens (0 at each row's first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def mask_and_positions(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What a forward passes: padded rows -> (attention_mask, positions counting real tokens); packed rows
    (`position_ids` given, restarting at each row) -> (None, position_ids), from which transformers derives the
    block-diagonal mask."""
    if position_ids is not None:
        return None, position_ids
    return attention_mask, position_ids_from_mask(attention_mask)


def causal_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    last: int = 0,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B,T] ids -> [B,T,V] logits, with padding-aware positions; `last` > 0: only the last `last` positions
    [B,last,V] (the LM head skips the prompt: for a 150k vocabulary that is most of a forward's logits memory).
    Packed rows (`rlhf.data.packing`): `position_ids` [B,T] restarting at each row and no attention mask."""
    kwargs = {"logits_to_keep": last} if last and keeps_logits(model) else {}
    attention_mask, position_ids = mask_and_positions(attention_mask, position_ids)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    )
    return out.logits[:, -last:] if last else out.logits


def wrapped_module(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's and DDP's (or a DeepSpeed engine's) wrappers, whose forwards call it."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _hf_class(model: nn.Module) -> type:
    """The class of the Hugging Face model inside any wrapper (torch.compile, DDP, DeepSpeed, peft)."""
    inner = wrapped_module(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return type(inner)


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keeps_logits(model: nn.Module) -> bool:
    """Whether the Hugging Face model inside any wrapper (DDP, DeepSpeed, peft) takes `logits_to_keep`."""
    return _forward_takes_logits_to_keep(_hf_class(model))


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """The name a Hugging Face forward (and its generate) takes a KV cache by: `cache` in recent transformers 5.x
    (5.24 deprecates `past_key_values`), `past_key_values` in earlier ones."""
    return _cache_keyword(_hf_class(model))


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face model (inside a peft wrapper or not): hidden states, no head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


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
