"""Scalar-head models (the reward model, PPO's critic): values at every token, the trained critic as one module
(`TokenValueModel`), and reward scores read at a sequence's last token."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rlhf.data.batching import length_batches, pad
from rlhf.models.forwards import backbone, mask_and_positions, wrapped_module


def _score_head(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score


def token_values(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar head applied at every position: [B,T] ids -> [B,T] values (the PPO critic, the reward model).

    A trained scalar-head model is a TokenValueModel (possibly inside a DDP wrapper): it is called, so the forward
    goes through the wrapper; a frozen Hugging Face model is run as backbone + head. Packed rows (`rlhf.data.packing`):
    `position_ids` [B,T] restarting at each row and no attention mask."""
    if isinstance(wrapped_module(model), TokenValueModel):
        return model(input_ids, attention_mask, position_ids)
    attention_mask, position_ids = mask_and_positions(attention_mask, position_ids)
    hidden = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    return score_head_values(model, hidden)


def score_head_values(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A scalar-head model's head on its backbone's hidden states: [B,T,d] -> [B,T] fp32 values."""
    head = _score_head(model)
    # the scalar in the head's own precision (fp32 masters), not autocast's bf16, which keeps ~3 significant digits
    # (a score of 4.3 to +-0.016): RM margins and values then carry no rounding ties; the head is [d -> 1], free
    # (FSDP with flattened parameters registers none on the head: its weight is then a plain attribute)
    weight = next(head.parameters(), None)
    dtype = (weight if weight is not None else getattr(head, "weight", hidden)).dtype
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.to(dtype)).squeeze(-1).float()


class TokenValueModel(nn.Module):
    """The PPO critic as one module whose forward gives a value per token: [B,T] ids -> [B,T] values.

    A `*ForSequenceClassification` forward pools at the last token, so the critic runs the backbone and the score
    head itself; doing that inside this module's forward keeps it a single forward through DDP/FSDP wrappers
    (calling the wrapped model's submodules directly would bypass their gradient synchronisation). Saves as the
    inner Hugging Face model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The inner model's block classes: FSDP's transformer auto-wrap (accelerate reads this name) then shards
        each decoder layer on its own instead of the whole critic as one unit."""
        return getattr(self.model, "_no_split_modules", None)

    @property
    def config(self):
        return self.model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        values: Callable | None = None,
    ) -> torch.Tensor:
        """`values(hf_model, input_ids, attention_mask, position_ids)` replaces `token_values` (e.g. the forward
        that runs a group's shared prompt once): called in here, it stays one forward through the wrappers."""
        return (values or token_values)(self.model, input_ids, attention_mask, position_ids)

    def save_pretrained(self, path: str, state_dict: dict | None = None, **kwargs) -> None:
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.model.save_pretrained(path, state_dict=state_dict, **kwargs)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,T] -> [B] index of the rightmost real token; correct under left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def reward_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalized: bool = True
) -> torch.Tensor:
    """[B,T] (prompt + response ending in EOS, any padding side) -> [B] scores read at the last real token.

    One forward per sequence. `normalized` subtracts `config.reward_offset`, the shift that makes the
    reference completions score mean 0 (stock HF decoder classification heads have no bias to hold it).
    """
    values = token_values(model, input_ids, attention_mask)
    scores = values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
    return offset_scores(model, scores) if normalized else scores


def offset_scores(model: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """Scores [B] less the reward model's `config.reward_offset` (read from the HF config of the model inside any
    wrapper: a DeepSpeed engine has a `config` of its own)."""
    return scores - float(getattr(wrapped_module(model).config, "reward_offset", 0.0) or 0.0)


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
