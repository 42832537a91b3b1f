"""Model shapes: the numbers of a decoder-only transformer that memory depends on, read from its config.json.

Parameter counts come from instantiating the architecture on the `meta` device, which allocates nothing, so they are
exact for any model transformers knows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import ENSEMBLE_FILE, ConfigError, ModelConfig, looks_local


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    params_lm: int
    """Parameters of the causal LM (tied embeddings counted once)."""
    params_scalar: int
    """Parameters of the scalar-head model (`*ForSequenceClassification`, num_labels 1): no LM head, a h x 1 head."""
    linear_params_lm: int = 0
    """Parameters of the causal LM's own (untied) Linear layers: what a frozen copy stores in half precision."""
    linear_params_scalar: int = 0
    """The same for the scalar-head model, its [h -> 1] head excepted (it runs in fp32)."""
    linears: dict[str, int] = field(default_factory=dict)
    """Linear-module name (last component) -> sum over those modules of (in_features + out_features)."""
    eager_attention: bool = False
    """Attention materialises the [heads, s, s] scores (eager); False for SDPA / flash attention."""
    name: str = ""


def shape_from_hf_config(config: Any, name: str = "") -> ModelShape:
    """A ModelShape from a transformers config: sizes from its fields, parameter counts and Linear shapes from the
    architecture built on the meta device (exact for any model transformers knows; nothing is allocated)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden = int(text.hidden_size)
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        vocab = int(text.vocab_size)
    except (AttributeError, TypeError) as e:
        raise ConfigError(f"{name or 'model'}: config.json lacks a field the planner needs ({e})") from None
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(copy.deepcopy(config))
            cls_config = copy.deepcopy(config)
            cls_config.num_labels = 1
            scalar = AutoModelForSequenceClassification.from_config(cls_config)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise ConfigError(f"{name or 'model'}: transformers cannot build this architecture ({e})") from None
    linears: dict[str, int] = {}
    for module_name, module in lm.named_modules():
        if isinstance(module, nn.Linear):
            key = module_name.rsplit(".", 1)[-1]
            linears[key] = linears.get(key, 0) + module.in_features + module.out_features
    attn = getattr(lm.config, "_attn_implementation", None) or "sdpa"
    return ModelShape(
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        params_lm=sum(p.numel() for p in lm.parameters()),
        params_scalar=sum(p.numel() for p in scalar.parameters()),
        linear_params_lm=_untied_linear_params(lm),
        linear_params_scalar=_untied_linear_params(scalar, skip=getattr(scalar, "score", None)),
        linears=linears,
        eager_attention=attn == "eager",
        name=name,
    )


def _untied_linear_params(model: Any, skip: Any = None) -> int:
    """Parameters of the model's untied nn.Linear modules but `skip`: what a frozen copy stores in half precision."""
    from rlhf.models.precision import untied_linears

    return sum(p.numel() for m in untied_linears(model) if m is not skip for p in m.parameters(recurse=False))


def load_shape(model: ModelConfig | str, key: str = "model.name_or_path") -> ModelShape:
    """The shape of the model a config names: a local dir's config.json, or a hub name via AutoConfig (the hub must
    be reachable). A reward ensemble dir is read through its first member. ConfigError when nothing can be read."""
    from transformers import AutoConfig

    path = model.name_or_path if isinstance(model, ModelConfig) else model
    trust = model.trust_remote_code if isinstance(model, ModelConfig) else False
    if not path:
        raise ConfigError(f"{key} is empty: the planner needs a model dir or hub name")
    members = ensemble_members(path)
    if members:
        path = members[0]
    local = Path(path).expanduser()
    if looks_local(path) and not local.exists():
        raise ConfigError(
            f"{key} = {path!r} does not exist yet (an earlier stage writes it). The planner only needs a config.json "
            f"of the same architecture: --set {key}=<dir with config.json, or the base model's hub name>"
        )
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"{key} = {path!r} has no config.json")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.is_dir() else path, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{key} = {path!r}: cannot read its config ({' '.join(str(e).split())[:200]}). A hub name needs the hub "
            f"to be reachable; otherwise --set {key}=<a local dir with its config.json>"
        ) from None
    shape = shape_from_hf_config(config, name=path)
    named = model.attn_implementation if isinstance(model, ModelConfig) else "auto"
    if named != "auto":  # the kernel the run will load (auto: transformers' choice, read from the config above)
        shape = dataclasses.replace(shape, eager_attention=named == "eager")
    return shape


def ensemble_members(path: str) -> list[str]:
    """The PPO members of a reward-model ensemble dir ([] when `path` is not one)."""
    manifest = Path(path) / ENSEMBLE_FILE
    if not manifest.is_file():
        return []
    try:
        listed = json.loads(manifest.read_text())["members"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{manifest} is not a valid reward ensemble manifest ({e})") from None
    return [str((Path(path) / m).resolve()) for m in listed]


def lora_params(shape: ModelShape, r: int, target_modules: list[str]) -> int:
    """Adapter parameters peft adds: r x (in + out) for each Linear whose name is one of `target_modules`."""
    return sum(r * shape.linears.get(t, 0) for t in target_modules)
