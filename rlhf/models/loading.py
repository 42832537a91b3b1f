"""Loading and preparing the models of every stage: tokenizer, causal LM, reward/value model, LoRA, dropout.

Every forward here passes position ids computed from the attention mask, so a left-padded batch (as PPO
generates) gets the same positions as the unpadded sequence, exactly as `generate()` does internally.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils import logging as hf_logging

from rlhf.config import ConfigError, FormatConfig, LoraConfig, ModelConfig
from rlhf.data.batching import uses_chat_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENSEMBLE_FILE = "ensemble.json"  # in a reward-model ensemble's final/: its members, relative to it

# --------------------------------------------------------------------------------------------------
# Attention: transformers' sdpa, except on CPU for short half-precision sequences
# --------------------------------------------------------------------------------------------------

CPU_SDPA = "rlhf_cpu_sdpa"
# Measured on an AVX512-BF16 EPYC (torch 2.13, docs/benchmarks.md): PyTorch's CPU flash-attention kernel in bf16
# is 2-4x slower than in fp32 at short sequences (forward + backward at 64 keys: 3.0 vs 1.1 ms; decoding one token
# against 256 bf16 keys, casts included: 2.6 vs 1.1 ms), equal at 256 keys and faster from 384 (and casting a long
# bf16 KV cache to fp32 costs more than the kernel saves). Under bf16 autocast (or bf16 weights) every attention
# call of a short-sequence run lands in the slow case.
CPU_FP32_ATTENTION_MAX_KEYS = 256


def cpu_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention; on CPU, when the kernel would run in bf16/fp16 (half q/k/v, or under CPU
    autocast, which casts sdpa's inputs down) over at most CPU_FP32_ATTENTION_MAX_KEYS keys, it runs in fp32 (more
    precise, and faster there). q/k/v [B,H,T,D] -> output [B,T,H,D] in the query's dtype."""
    halves = (torch.bfloat16, torch.float16)
    autocast = torch.is_autocast_enabled("cpu")
    half = autocast or any(t.dtype in halves for t in (query, key, value))
    if query.device.type != "cpu" or not half or key.shape[-2] > CPU_FP32_ATTENTION_MAX_KEYS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would send sdpa back to bf16
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(query.dtype), weights


@functools.cache
def _register_cpu_sdpa() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CPU_SDPA, cpu_sdpa_attention)
    AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)


def _attention_kwargs(model_cfg: ModelConfig) -> dict:
    """from_pretrained/from_config kwargs for model.attn_implementation (auto: transformers' choice)."""
    return {} if model_cfg.attn_implementation == "auto" else {"attn_implementation": model_cfg.attn_implementation}


def _load_error(key: str, model_cfg: ModelConfig, error: Exception) -> ConfigError:
    """A loading failure as a ConfigError naming the config key to fix (the path, or the attention kernel)."""
    what = f"{key} = {model_cfg.name_or_path!r} cannot be loaded as a model"
    if model_cfg.attn_implementation != "auto":
        attn_key = key.rsplit(".", 1)[0] + ".attn_implementation" if "." in key else "attn_implementation"
        what += f" with {attn_key} = {model_cfg.attn_implementation!r} (auto: transformers' default)"
    return ConfigError(f"{what}: {' '.join(str(error).split())[:300]}")


def _set_attention(model: nn.Module, model_cfg: ModelConfig) -> None:
    """auto: where transformers chose sdpa, the same kernel through `cpu_sdpa_attention` (identical off the CPU and
    in fp32). Not written to config.json: a saved checkpoint loads anywhere with transformers' default."""
    if model_cfg.attn_implementation != "auto" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    # remote-code models that do not dispatch through transformers' AttentionInterface keep their own sdpa
    if getattr(model, "_can_set_attn_implementation", lambda: False)():
        _register_cpu_sdpa()
        model.set_attn_implementation(CPU_SDPA)


def load_tokenizer(
    model: ModelConfig | str, trust_remote_code: bool = False, fmt: FormatConfig | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer, with EOS = the token that ends a response and a pad token distinct from it.

    A response ends where its chat template ends an assistant turn: when prompts are rendered with the template
    (`fmt`) and the template closes a turn with its own special token (Qwen's `<|im_end|>` while `eos_token` is
    `<|endoftext|>`, Llama-3's `<|eot_id|>`), that token becomes `eos_token`, so SFT teaches the model to stop
    there, generation stops there and the reward model reads there — in every stage alike. The saved `final/`
    keeps it. PAD must differ from EOS (the reward and value are read at EOS): a tokenizer whose pad is its EOS,
    or that has none (Llama-3), gets a `<|pad|>` token.
    """
    if isinstance(model, ModelConfig):
        path, trust_remote_code = model.tokenizer or model.name_or_path, model.trust_remote_code
    else:
        path = model
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if fmt is not None and uses_chat_template(tokenizer, fmt):
        turn_end = chat_turn_end(tokenizer)
        if turn_end is not None and turn_end != tokenizer.eos_token:
            tokenizer.eos_token = turn_end
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {path} has no EOS token; set one (eos_token) in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def chat_turn_end(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template writes right after an assistant message (None: it writes none)."""
    probe = "RESPONSE-PROBE-7f3a"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    after = text[text.rindex(probe) + len(probe) :].lstrip()
    specials = [t for t in tokenizer.all_special_tokens if t] + [
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    ]
    starts = [t for t in set(specials) if after.startswith(t)]
    return max(starts, key=len) if starts else None


def disable_dropout(model: nn.Module) -> None:
    """Dropout off (N+ detail 1): with dropout on, the first PPO ratio is not 1 and RM scores are noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def _fit_vocab(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    # Only grow: many hub models have padded embedding tables larger than the tokenizer.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _architecture(path: str, trust_remote_code: bool) -> str:
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return "an unknown architecture"
    return ", ".join(config.architectures or []) or f"a {config.model_type} model"


def _from_pretrained(auto_class, model_cfg: ModelConfig, key: str, allowed_new: tuple[str, ...] = (), **kwargs):
    """from_pretrained that refuses a checkpoint whose weights would partly start random (a wrong role).

    A weight missing from the checkpoint (or of the wrong shape) is freshly initialised by transformers with
    only a warning: a reward model given as the policy gets a random LM head, a causal LM given as the reward
    model a random score head, and training then optimises noise. Only weights named in `allowed_new` (the new
    scalar head of a reward model trained from an LM) may start fresh. Returns (model, names started fresh)."""
    path = model_cfg.name_or_path
    if (Path(path) / ENSEMBLE_FILE).is_file():
        raise ConfigError(
            f"{key} = {path!r} is a reward-model ensemble (it holds {ENSEMBLE_FILE}); a single model is needed here"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would warn about the new head we expect; we check it below
    try:
        model, info = auto_class.from_pretrained(
            path,
            dtype=DTYPES[model_cfg.dtype],
            trust_remote_code=model_cfg.trust_remote_code,
            output_loading_info=True,
            **_attention_kwargs(model_cfg),
            **kwargs,
        )
    except (OSError, ValueError, ImportError) as e:  # no/unknown config.json, missing weights, not a model dir
        raise _load_error(key, model_cfg, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _set_attention(model, model_cfg)
    missing = sorted(info["missing_keys"]) + sorted(
        str(m[0]) if isinstance(m, tuple) else str(m) for m in info["mismatched_keys"]
    )
    fresh = [k for k in missing if k.split(".")[0] in allowed_new]
    wrong = [k for k in missing if k not in fresh]
    if wrong:
        arch = _architecture(path, model_cfg.trust_remote_code)
        role = "a causal LM" if auto_class is AutoModelForCausalLM else "a reward/value model with a scalar head"
        raise ConfigError(
            f"{key} = {path!r} cannot be loaded as {role}: it is {arch}, and {len(wrong)} weight(s) would start "
            f"random ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}). {_role_hint(key, auto_class)}"
        )
    return model, fresh


def _role_hint(key: str, auto_class) -> str:
    if auto_class is AutoModelForCausalLM:
        return (
            f"Point {key} at a causal LM: the SFT stage's final/ (e.g. runs/tiny/sft/final) or a base model, "
            "not a reward model dir."
        )
    return (
        f"Point {key} at a trained reward model: the reward stage's final/ (e.g. runs/tiny/rm/final) or an "
        "existing *ForSequenceClassification checkpoint with num_labels 1, not a causal LM dir."
    )


def load_causal_lm(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dropout: bool = True, key: str = "model.name_or_path"
) -> nn.Module:
    """A causal LM from a checkpoint or (from_config) fresh from its config.json; LoRA applied if enabled.

    Refuses (ConfigError naming `key`) a checkpoint whose LM weights would partly start random, e.g. an RM dir."""
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.from_config:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **_attention_kwargs(model_cfg)
            )
        except (ValueError, ImportError) as e:  # an attention kernel the model or this install lacks
            raise _load_error(key, model_cfg, e) from None
        _set_attention(model, model_cfg)
    else:
        model, _ = _from_pretrained(AutoModelForCausalLM, model_cfg, key)
    _fit_vocab(model, tokenizer)
    if not dropout:
        disable_dropout(model)
    return prepare_for_training(model, model_cfg, task_type="CAUSAL_LM")


def prepare_for_training(model: nn.Module, model_cfg: ModelConfig, task_type: str) -> nn.Module:
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model_cfg.lora.enabled:
        model = apply_lora(model, model_cfg.lora, task_type)
    return model


def apply_lora(model: nn.Module, lora: LoraConfig, task_type: str) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        # the reward/value head is new and must train fully next to the adapters
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    return get_peft_model(model, peft_config)


def load_reward_model(
    model_cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    dropout: bool = False,
    train: bool = False,
    new_head: bool = False,
    key: str = "models.reward.name_or_path",
) -> nn.Module:
    """A scalar-head model (AutoModelForSequenceClassification, num_labels=1).

    With `new_head` (the reward stage, or a value model started from the policy) a causal LM (the SFT model) gets a
    fresh head initialised N(0, 1/(d+1)) (N+ detail 5) in place of its unembedding; a reward model keeps its
    trained head. Without it, the checkpoint must carry a trained scalar head: anything that would start random
    is refused with a ConfigError naming `key` (a causal LM given as the reward model would be optimised as noise).
    """
    model, fresh = _from_pretrained(
        AutoModelForSequenceClassification, model_cfg, key, allowed_new=("score",) if new_head else (), num_labels=1
    )
    _fit_vocab(model, tokenizer)
    if fresh:
        hidden = model.score.weight.shape[1]
        nn.init.normal_(model.score.weight, std=1 / math.sqrt(hidden + 1))
        model.config.reward_offset = 0.0
    if not dropout:
        disable_dropout(model)
    if train:
        return prepare_for_training(model, model_cfg, task_type="SEQ_CLS")
    model.requires_grad_(False)
    return model.eval()


def reward_members(path: str, holdout: bool = False) -> list[str]:
    """The reward-model dirs a reward path stands for: itself, or the members listed by an ensemble's final/.

    `holdout=True` gives the ensemble's held-out members instead (empty for a single RM)."""
    manifest = Path(path) / ENSEMBLE_FILE
    if not manifest.is_file():
        return [] if holdout else [path]
    try:
        listed = json.loads(manifest.read_text())["holdout" if holdout else "members"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{manifest} is not a valid reward ensemble manifest ({e}); re-run `rlhf rm`") from None
    members = [str((Path(path) / m).resolve()) for m in listed]
    for m in members:
        if not Path(m).is_dir():
            raise ConfigError(f"{manifest} lists member {m}, which does not exist; re-run `rlhf rm` for it")
    return members


def load_reward_ensemble(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, key: str = "models.reward.name_or_path"
) -> list[nn.Module]:
    """Frozen, trained reward model(s) for a reward path: one model, or every PPO member of an ensemble."""
    return [
        load_reward_model(dataclasses.replace(model_cfg, name_or_path=m), tokenizer, key=key)
        for m in reward_members(model_cfg.name_or_path)
    ]


def cpu_backend(cpu: bool = False) -> bool:
    """Whether accelerate must be told it runs on the CPU: asked for, or several processes on a machine without a
    GPU. accelerate forms a gloo process group on CPU only when told so; otherwise N processes launched by torchrun
    would each run alone, all writing the same output dir."""
    return cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): eval and generate run there only, so rows are never written twice."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_backend()).is_main_process


def inference_device() -> torch.device:
    """This process's accelerator device (a GPU when there is one, also under `accelerate launch`), else the CPU."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_backend()).device


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


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _hf_class(model: nn.Module) -> type:
    """The class of the Hugging Face model inside any wrapper (torch.compile, DDP, DeepSpeed, peft)."""
    inner = wrapped_module(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return type(inner)


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


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


def untied_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain `nn.Linear` modules of `model` whose parameters no other module shares (a tied LM head shares the
    input embedding's weight)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))
    ]


def half_precision_linears(model: nn.Module, autocast: Callable[[], Any]) -> int:
    """Store a frozen model's Linear weights (and biases) in the half dtype its forwards autocast them to: the same
    values reach every matmul (autocast rounds fp32 weights to bf16/fp16 on each call; here once), so outputs are
    bit-identical and those weights take half the memory (a 7B Llama reference: 27 GB -> ~14 GB). Returns bytes saved.

    `autocast()` opens the stage's autocast context (accelerate's). Which layers qualify is observed, not assumed:
    one probe forward (8 tokens) records, for every plain `nn.Linear`, whether each of its calls ran under autocast
    to that dtype; a layer called with autocast off (a score head kept in fp32, an MoE router computed in fp32),
    never called, or sharing its weight with another module (an LM head tied to the input embedding, which autocast
    does not cast) keeps its dtype. Only fp32 weights are converted. `model`: a causal LM or a TokenValueModel.
    """
    first = next(model.parameters(), None)
    if first is None:
        return 0
    device = first.device
    with autocast():
        enabled, dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    if not enabled or dtype not in (torch.bfloat16, torch.float16):
        return 0
    candidates = [m for m in untied_linears(model) if m.weight.dtype == torch.float32]
    calls: dict[nn.Module, list[bool]] = {m: [] for m in candidates}

    def record(module: nn.Module, args: tuple) -> None:
        on = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype
        calls[module].append(on)

    hooks = [m.register_forward_pre_hook(record) for m in candidates]
    try:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 8)
        ids = torch.arange(8, device=device)[None] % vocab
        mask = torch.ones_like(ids)
        with torch.no_grad(), autocast():
            model(ids, mask) if isinstance(model, TokenValueModel) else causal_logits(model, ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    saved = 0
    for module, seen in calls.items():
        if seen and all(seen):
            saved += sum(p.numel() * (p.element_size() - dtype.itemsize) for p in module.parameters(recurse=False))
            module.to(dtype)
    if saved and device.type == "cpu":
        # on CPU from_pretrained leaves the weights in a memory map of the checkpoint file, which stays resident (the
        # whole fp32 file) while any tensor still points into it: copying the remaining ones out releases it
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != dtype:
                tensor.data = tensor.data.clone()
    return saved
