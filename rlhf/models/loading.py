"""Loading and preparing the models of every stage: tokenizer, causal LM, reward/value model (one, or an
ensemble's members), LoRA, dropout.

A loader refuses, with a ConfigError naming the config key to fix, a checkpoint whose weights would partly start
random: a model given in the wrong role (a reward model as the policy, a causal LM as the reward model).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from rlhf.config import ENSEMBLE_FILE, ConfigError, FormatConfig, LoraConfig, ModelConfig
from rlhf.data.encoding import uses_chat_template
from rlhf.models.attention import attention_kwargs, set_attention
from rlhf.models.precision import DTYPES


def _load_error(key: str, model_cfg: ModelConfig, error: Exception) -> ConfigError:
    """A loading failure as a ConfigError naming the config key to fix (the path, or the attention kernel)."""
    what = f"{key} = {model_cfg.name_or_path!r} cannot be loaded as a model"
    if model_cfg.attn_implementation != "auto":
        attn_key = key.rsplit(".", 1)[0] + ".attn_implementation" if "." in key else "attn_implementation"
        what += f" with {attn_key} = {model_cfg.attn_implementation!r} (auto: transformers' default)"
    return ConfigError(f"{what}: {' '.join(str(error).split())[:300]}")


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
            **attention_kwargs(model_cfg),
            **kwargs,
        )
    except (OSError, ValueError, ImportError) as e:  # no/unknown config.json, missing weights, not a model dir
        raise _load_error(key, model_cfg, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    set_attention(model, model_cfg)
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
                config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, **attention_kwargs(model_cfg)
            )
        except (ValueError, ImportError) as e:  # an attention kernel the model or this install lacks
            raise _load_error(key, model_cfg, e) from None
        set_attention(model, model_cfg)
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
