"""`rlhf plan`: per-device memory and time estimates for a stage's YAML, before any GPU hour is spent.

Everything here is arithmetic on a model's shape (read from its config.json; the parameter count comes from
instantiating the architecture on the `meta` device, which allocates nothing) and the stage config. The formulas
(docs/scaling.md, "Before you rent a GPU") are:

- weights   = params x bytes(model.dtype); a frozen role holds only this. Sharded (/N) under fsdp and zero3 for
              every role, the frozen reference and reward models included (rlhf.runtime.accelerator.prepare_frozen); unsharded
              (ddp) under bf16/fp16 autocast its Linear weights take 2 B (rlhf.models.loading.half_precision_linears).
- grads     = trainable x bytes(dtype) (DeepSpeed ZeRO with mixed precision: 2 B); /N under zero2, zero3, fsdp.
- optimizer = AdamW m and v: trainable x 2 x bytes(dtype) (torch keeps them in the parameter's dtype); under
              DeepSpeed ZeRO with mixed precision fp32 master weights + fp32 m, v: 12 B per trainable param; /N
              under zero2, zero3, fsdp. LoRA trains only the adapters: r x (in + out) per targeted Linear.
- activations (one micro-batch, training), per layer and token, at p bytes (2 under bf16/fp16, else 4):
              p x (4h + 2 h_q + 2 h_kv + 4 I)   [Korthikanti et al. 2022 counted for a Llama block with fused
              (SDPA) attention and no dropout: norm inputs 2h, normed inputs 2h, q and attention output 2 h_q,
              k and v 2 h_kv, gate, up, act(gate), gate*up 4I], + eager attention's scores a x s x (p + 4);
              with gradient checkpointing only each layer's input (p x h) is kept, plus one layer's full set
              recomputed in backward. Plus the LM logits: b x s x V x (p + 8) when trained (logits, the fp32
              shifted copy and log-softmax of the loss; the fp32 gradient reuses their room in backward);
              forward-only b x s x V x p plus one fp32 temporary (b x s x V x 4 for fp32 logits, s x V x 4 for
              16-bit ones, upcast row by row).
- kv-cache  = generation batch x (prompt + max_new_tokens) x layers x 2 x kv_heads x head_dim x p; with
              rollout.share_prompt and k > 1 samples per prompt each scoring model also holds one for its scoring
              micro-batch, and scores B/k prompts + B responses instead of B whole sequences (generation
              prefills the B/k prompts too).
- FLOPs     = 6 N per trained token (4 N with LoRA: no weight gradients for the frozen base; +2 N with gradient
              checkpointing), 2 N per forward-only or generated token.

The device total adds every role's static memory (weights, grads, optimizer state) to the largest phase's
transient memory (SFT/RM: training; PPO: generation, scoring or training), because phases do not overlap.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, DPOConfig, ModelConfig, PPOConfig, RMConfig, SFTConfig, looks_local

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOPOLOGIES = ("ddp", "fsdp", "zero2", "zero3")
ENSEMBLE_FILE = "ensemble.json"  # kept equal to rlhf.models.loading.ENSEMBLE_FILE (not imported: no torch at import)


# --------------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------------


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
    from rlhf.models.loading import untied_linears

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


# --------------------------------------------------------------------------------------------------
# Per-role arithmetic
# --------------------------------------------------------------------------------------------------


def layer_activation_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """Bytes one transformer block keeps for backward (one micro-batch of `batch` x `seq` tokens at p bytes)."""
    h, hq, hkv, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    per_token = p * (4 * h + 2 * hq + 2 * hkv + 4 * inter)
    if shape.eager_attention:
        per_token += shape.heads * seq * (p + 4)  # scores softmaxed in fp32, cast back to p
    return batch * seq * per_token


def logits_bytes(shape: ModelShape, batch: int, seq: int, p: int, trained: bool) -> int:
    """The LM head's [b, s, V] logits and what the loss/log-prob code makes of them (dominant for big vocabularies).

    Trained: logits + the loss's fp32 shifted copy + its fp32 log-softmax (the forward's peak; in backward the fp32
    gradient takes the place of the freed logits and copy). Forward-only: the logits plus one fp32
    temporary of their size (16-bit logits are upcast one row [s, V] at a time by rlhf.algorithms)."""
    if trained:
        return batch * seq * shape.vocab * (p + 8)
    return batch * seq * shape.vocab * p + (batch if p == 4 else 1) * seq * shape.vocab * 4


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    p: int,
    checkpointing: bool,
    lm_head: bool,
    trained: bool = True,
    logit_positions: int = 0,
) -> int:
    """Peak activation bytes of one forward(+backward) of a micro-batch.

    Trained: every layer's saved tensors (or, with gradient checkpointing, each layer's input plus one layer
    recomputed), the embedding output, plus the logits (of `logit_positions` positions when > 0: PPO's forwards
    ask the LM head for the response positions only). Forward-only: about one layer's tensors at a time."""
    if batch <= 0 or seq <= 0:
        return 0
    layer = layer_activation_bytes(shape, batch, seq, p)
    if trained:
        kept = shape.layers * batch * seq * shape.hidden * p + layer if checkpointing else shape.layers * layer
        kept += batch * seq * shape.hidden * p
    else:
        kept = layer
    return kept + (logits_bytes(shape, batch, logit_positions or seq, p, trained) if lm_head else 0)


def kv_cache_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """Generation's KV cache: batch x seq x layers x 2 (K and V) x kv_heads x head_dim x p."""
    return batch * seq * shape.layers * 2 * shape.kv_heads * shape.head_dim * p


@dataclass
class Precision:
    """What the dtype / mixed-precision / topology combination means for bytes per value."""

    weight: int
    """Bytes per stored weight."""
    grad: int
    """Bytes per gradient value."""
    optimizer: int
    """Optimizer bytes per trainable parameter (AdamW m + v, plus fp32 master weights where kept)."""
    activation: int
    """Bytes per activation value."""


def precision(dtype: str, mixed_precision: str, topology: str) -> Precision:
    """Bytes per value. accelerate's native mixed precision (ddp, fsdp) autocasts and keeps the loaded dtype for
    weights, grads and AdamW state; DeepSpeed ZeRO with bf16/fp16 holds 16-bit weights and grads and fp32 master
    weights + m + v in the optimizer (the ZeRO paper's 2 + 2 + 12 bytes)."""
    w = DTYPE_BYTES[dtype]
    low = mixed_precision in ("bf16", "fp16")
    act = 2 if low or w == 2 else 4
    if topology.startswith("zero") and low:
        return Precision(weight=2, grad=2, optimizer=12, activation=act)
    return Precision(weight=w, grad=w, optimizer=2 * w, activation=act)


def shard_divisors(topology: str, num_processes: int) -> tuple[int, int, int]:
    """(weights, grads, optimizer) divisors for a trained role: ddp none; zero2 grads + optimizer; zero3 and fsdp
    (full sharding) all three."""
    if topology not in TOPOLOGIES:
        raise ConfigError(f"--topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    n = max(1, num_processes)
    return {"ddp": (1, 1, 1), "zero2": (1, n, n), "zero3": (n, n, n), "fsdp": (n, n, n)}[topology]


@dataclass
class RoleEstimate:
    """One role's bytes on one device."""

    role: str
    params: int
    trainable: int
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    """The role's own peak transient bytes (its largest micro-batch forward/backward)."""
    kv_cache: int = 0
    note: str = ""

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations + self.kv_cache


def role_static(
    role: str,
    params: int,
    trainable: int,
    prec: Precision,
    topology: str,
    num_processes: int,
    note: str = "",
) -> RoleEstimate:
    """Weights, gradients and optimizer state of a role; trainable == 0 means frozen (weights only, sharded like
    the trained roles under fsdp / zero3: rlhf.runtime.accelerator.prepare_frozen)."""
    dw, dg, do = shard_divisors(topology, num_processes)
    if trainable == 0:
        return RoleEstimate(role, params, 0, weights=math.ceil(params * prec.weight / dw), note=note)
    return RoleEstimate(
        role,
        params,
        trainable,
        weights=math.ceil(params * prec.weight / dw),
        grads=math.ceil(trainable * prec.grad / dg),
        optimizer=math.ceil(trainable * prec.optimizer / do),
        note=note,
    )


def frozen_role(
    role: str,
    params: int,
    linear_params: int,
    dtype: str,
    mixed_precision: str,
    topology: str,
    num_processes: int,
    note: str = "",
) -> RoleEstimate:
    """A frozen role's weights: its loaded dtype (a ZeRO-3 inference engine casts to the training's half
    precision); unsharded under bf16/fp16 autocast its fp32 Linear weights are kept in 2 bytes
    (rlhf.runtime.accelerator.prepare_frozen), the rest (embeddings, norms, a scalar head) in the loaded dtype."""
    prec = precision(dtype, mixed_precision, "zero3" if topology == "zero3" else "ddp")
    est = role_static(role, params, 0, prec, topology, num_processes, note=note)
    if topology == "ddp" and mixed_precision in ("bf16", "fp16") and prec.weight == 4 and linear_params:
        est.weights -= linear_params * 2
        est.note = f"{note}, Linears in {mixed_precision}" if note else f"Linears in {mixed_precision}"
    return est


def train_flops_per_token(params: int, lora: bool, checkpointing: bool) -> int:
    """6N (forward 2N + backward 4N); LoRA 4N (no weight gradients of the frozen base); +2N recomputation."""
    return (4 if lora else 6) * params + (2 * params if checkpointing else 0)


# --------------------------------------------------------------------------------------------------
# A stage's plan
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The estimate for one stage on one device."""

    stage: str
    roles: list[RoleEstimate]
    phases: dict[str, int]
    """Transient bytes per phase (activations + KV cache that are alive together); the largest counts."""
    tokens: dict[str, int]
    """Tokens per optimizer step (SFT/RM) or PPO iteration, by kind (trained, forward-only, generated)."""
    flops: int
    """FLOPs per step/iteration, all processes together."""
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        return sum(r.static for r in self.roles)

    @property
    def peak_phase(self) -> tuple[str, int]:
        name = max(self.phases, key=lambda k: self.phases[k]) if self.phases else ""
        return name, self.phases.get(name, 0)

    @property
    def total(self) -> int:
        return self.static + self.peak_phase[1]

    def seconds(self, tflops: float, num_processes: int) -> float:
        """Time per step/iteration at `tflops` achieved TFLOP/s per device."""
        return self.flops / (tflops * 1e12 * max(1, num_processes))


def resolve_mixed_precision(train_cfg) -> str:
    """`auto` is what a GPU with bf16 gets (the planner plans for GPUs), unless the config forces the CPU."""
    mp = train_cfg.mixed_precision
    if mp == "auto":
        return "no" if train_cfg.cpu else "bf16"
    return mp


PADDED = "tokens assume every sequence padded to data.format.max_length (an upper bound)"


def trained_lm_role(name: str, m: ModelConfig, shape: ModelShape, prec: Precision, topology: str, n: int, note: str):
    """A trained causal LM's static bytes: all its weights trained, or the frozen base plus LoRA adapters."""
    trainable = lora_params(shape, m.lora.r, m.lora.target_modules) if m.lora.enabled else shape.params_lm
    params = shape.params_lm + (trainable if m.lora.enabled else 0)
    return role_static(name, params, trainable, prec, topology, n, note="LoRA" if m.lora.enabled else note)


def plan_sft(
    cfg: SFTConfig,
    shape: ModelShape,
    num_processes: int = 1,
    topology: str = "ddp",
    mixed_precision: str | None = None,
) -> Plan:
    """SFT (and pretraining): one causal LM, trained on micro-batches of max_length tokens."""
    mp = mixed_precision or resolve_mixed_precision(cfg.train)
    m = cfg.model
    prec = precision(m.dtype, mp, topology)
    role = trained_lm_role("model", m, shape, prec, topology, num_processes, note="")
    seq, micro = cfg.data.format.max_length, cfg.train.micro_batch_size
    role.activations = activation_bytes(shape, micro, seq, prec.activation, m.gradient_checkpointing, lm_head=True)
    tokens = cfg.train.batch_size * seq
    flops = tokens * train_flops_per_token(shape.params_lm, m.lora.enabled, m.gradient_checkpointing)
    return Plan(
        "sft",
        [role],
        {"train": role.activations},
        {"trained": tokens},
        flops,
        _settings(mp, topology, num_processes, micro=micro, seq=seq, batch=cfg.train.batch_size),
        [PADDED],
    )


def ranked_forward(
    cfg: RMConfig | DPOConfig, shape: ModelShape, k: int, topology: str, p: int, trained: bool, lm_head: bool
) -> tuple[int, int, bool]:
    """A micro-batch of prompts x K responses (RM, DPO): (its forward's activation bytes, tokens per prompt, whether
    share_prompt applies). Shared (unsharded topologies): each prompt once, P = max_prompt_length tokens, then its K
    responses of R = max_length - P on a copy of its keys/values; else K whole sequences of max_length."""
    seq, micro = cfg.data.format.max_length, cfg.train.micro_batch_size * k
    ckpt = cfg.model.gradient_checkpointing and trained
    share = cfg.share_prompt and topology not in ("fsdp", "zero3")
    if not share:
        return activation_bytes(shape, micro, seq, p, ckpt, lm_head=lm_head, trained=trained), k * seq, False
    prompt = min(cfg.data.format.max_prompt_length, seq - 1)
    activations = (
        activation_bytes(shape, micro // k, prompt, p, ckpt, lm_head=False, trained=trained)
        + activation_bytes(shape, micro, seq - prompt, p, ckpt, lm_head=lm_head, trained=trained)
        + kv_cache_bytes(shape, micro, prompt, p)
    )
    return activations, prompt + k * (seq - prompt), True


SHARED_NOTE = "share_prompt: each prompt counted once for its K responses (their KV cache copied)"


def plan_rm(
    cfg: RMConfig,
    shape: ModelShape,
    num_processes: int = 1,
    topology: str = "ddp",
    mixed_precision: str | None = None,
    responses_per_prompt: int = 2,
) -> Plan:
    """RM: one scalar-head model; a micro-batch of prompts forwards all K responses of each (members train one
    after another, so an ensemble costs time, not memory)."""
    mp = mixed_precision or resolve_mixed_precision(cfg.train)
    m = cfg.model
    prec = precision(m.dtype, mp, topology)
    k = max(2, responses_per_prompt)
    if m.lora.enabled:  # adapters + the score head (modules_to_save keeps a trained copy of it)
        trainable = lora_params(shape, m.lora.r, m.lora.target_modules) + shape.hidden
        params = shape.params_scalar + trainable
    else:
        trainable = params = shape.params_scalar
    role = role_static("reward model", params, trainable, prec, topology, num_processes, note=f"K={k}")
    seq, micro = cfg.data.format.max_length, cfg.train.micro_batch_size * k
    role.activations, per_prompt, share = ranked_forward(cfg, shape, k, topology, prec.activation, True, False)
    tokens = cfg.train.batch_size * per_prompt
    flops = tokens * train_flops_per_token(shape.params_scalar, m.lora.enabled, m.gradient_checkpointing)
    flops *= cfg.ensemble.size
    notes = [PADDED] + ([SHARED_NOTE] if share else [])
    if cfg.ensemble.size > 1:
        notes.append(f"{cfg.ensemble.size} ensemble members train one after another: time x{cfg.ensemble.size}")
    return Plan(
        "rm",
        [role],
        {"train": role.activations},
        {"trained": tokens},
        flops,
        _settings(
            mp, topology, num_processes, micro=micro, seq=seq, batch=cfg.train.batch_size, K=k, share_prompt=share
        ),
        notes,
    )


def plan_dpo(
    cfg: DPOConfig,
    shape: ModelShape,
    num_processes: int = 1,
    topology: str = "ddp",
    mixed_precision: str | None = None,
    responses_per_prompt: int = 2,
) -> Plan:
    """DPO: the policy trained on micro-batches of prompts x K responses (one forward for all), and the reference
    (a frozen copy, or the policy with its adapter off) run forward-only on the same batch. With share_prompt
    (unsharded topologies) each prompt runs once and its K responses on its KV cache: P + K x R tokens per prompt
    instead of K x (P + R), P = max_prompt_length, R = the rest of max_length."""
    mp = mixed_precision or resolve_mixed_precision(cfg.train)
    m = cfg.model
    prec = precision(m.dtype, mp, topology)
    k = max(2, responses_per_prompt)
    policy = trained_lm_role("policy", m, shape, prec, topology, num_processes, note="trained")
    seq, micro = cfg.data.format.max_length, cfg.train.micro_batch_size * k
    p = prec.activation
    policy.activations, per_prompt, share = ranked_forward(cfg, shape, k, topology, p, trained=True, lm_head=True)
    if cfg.reference == "copy":
        ref = frozen_role(
            "reference", shape.params_lm, shape.linear_params_lm, m.dtype, mp, topology, num_processes, "frozen copy"
        )
    else:
        ref = RoleEstimate("reference", 0, 0, note="policy, adapter off")
    ref.activations = ranked_forward(cfg, shape, k, topology, p, trained=False, lm_head=True)[0]
    tokens = cfg.train.batch_size * per_prompt
    flops = tokens * (
        train_flops_per_token(shape.params_lm, m.lora.enabled, m.gradient_checkpointing) + 2 * shape.params_lm
    )
    return Plan(
        "dpo",
        [policy, ref],
        {"train": policy.activations + ref.activations},
        {"trained": tokens},
        flops,
        _settings(
            mp, topology, num_processes, micro=micro, seq=seq, batch=cfg.train.batch_size, K=k, share_prompt=share
        ),
        [PADDED] + ([SHARED_NOTE] if share else []),
    )


def plan_ppo(
    cfg: PPOConfig,
    policy: ModelShape,
    reward: ModelShape,
    reward_members: int = 1,
    num_processes: int = 1,
    topology: str = "ddp",
    mixed_precision: str | None = None,
) -> Plan:
    """PPO: policy (trained), reference (frozen copy, or the policy with its adapter off), value model (trained,
    from the RM or the policy) and the frozen reward model(s), all resident on every device."""
    mp = mixed_precision or resolve_mixed_precision(cfg.train)
    m = cfg.models
    pol = m.policy
    prec = precision(pol.dtype, mp, topology)
    p = prec.activation
    n = max(1, num_processes)
    P, R = cfg.data.format.max_prompt_length, cfg.rollout.max_new_tokens
    S = P + R
    micro = cfg.ppo.micro_batch_size
    local_batch = max(1, cfg.train.batch_size // n)
    gen_batch = min(cfg.rollout.generation_batch_size, local_batch)
    score_mb = min(cfg.scoring_micro_batch_size(), local_batch)
    ckpt = pol.gradient_checkpointing
    # rollout.share_prompt: with k samples per prompt generation prefills each prompt once, and the scoring forwards
    # run each prompt once and every response on its KV cache, which each scoring model then holds for a whole
    # micro-batch (unsharded topologies only); with ppo.group_minibatches the update's forwards too
    k = cfg.rollout.samples_per_prompt
    share, learn_share = cfg.prompt_sharing(sharded=topology in ("fsdp", "zero3"))

    # policy
    lora = pol.lora.enabled
    adapters = lora_params(policy, pol.lora.r, pol.lora.target_modules) if lora else 0
    trainable = adapters if lora else policy.params_lm
    roles = [
        role_static(
            "policy", policy.params_lm + adapters, trainable, prec, topology, n, note="LoRA" if lora else "trained"
        )
    ]
    pol_role = roles[0]
    if cfg.ema.decay:
        pol_role.weights += trainable * 4  # the EMA shadow: fp32 copy of the trainable weights
        pol_role.note += ", EMA"
    ptx_seqs = round(cfg.ptx.sequences_per_episode * micro) if cfg.ptx.ptx_coef > 0 else 0
    ptx_len = cfg.ptx.max_length if ptx_seqs else 0
    # the policy's PPO forwards compute logits for the R + 1 positions that predict the response only
    train_act = activation_bytes(policy, micro, S, p, ckpt, lm_head=True, logit_positions=R + 1)
    train_act += kv_cache_bytes(policy, micro, S, p) if learn_share else 0  # the prompt's keys/values per episode
    ptx_act = activation_bytes(policy, min(ptx_seqs, micro), ptx_len, p, ckpt, lm_head=True) if ptx_seqs else 0
    score_act = activation_bytes(policy, score_mb, S, p, False, lm_head=True, trained=False, logit_positions=R + 1)
    score_act += kv_cache_bytes(policy, score_mb, S, p) if share else 0
    # log-prob scoring runs for the old log-probs (unless the one-step update gives them) and for the reference
    old_from_update = cfg.old_logprobs_from_update()
    logprob_scoring = not old_from_update or m.reference != "none"
    policy_scores = not old_from_update or m.reference == "disable_adapter"
    pol_role.activations = max(train_act, ptx_act, score_act if policy_scores else 0)
    pol_role.kv_cache = kv_cache_bytes(policy, gen_batch, S, p)
    prefill_rows = max(1, gen_batch // k) if share else gen_batch
    gen_act = gen_batch * policy.vocab * (p + 4) + activation_bytes(policy, prefill_rows, P, p, False, False, False)

    # reference
    if m.reference == "copy":
        ref = frozen_role(
            "reference", policy.params_lm, policy.linear_params_lm, pol.dtype, mp, topology, n, note="frozen copy"
        )
        ref.activations = score_act
    else:
        ref = RoleEstimate("reference", 0, 0, note="none" if m.reference == "none" else "policy, adapter off")
    roles.append(ref)

    # value model: only for the estimators that learn one (GAE, REINFORCE with a learned baseline)
    critic = cfg.uses_critic()
    value_shape = reward if m.value_init == "reward" else policy
    value_prec = precision(m.reward.dtype if m.value_init == "reward" else pol.dtype, mp, topology)
    value = RoleEstimate("value", 0, 0, note=f"none: {cfg.ppo.advantage} is critic-free")
    if critic:
        value = role_static(
            "value",
            value_shape.params_scalar,
            value_shape.params_scalar,
            value_prec,
            topology,
            n,
            note=f"from {m.value_init}",
        )
        value.activations = activation_bytes(value_shape, micro, S, p, ckpt, lm_head=False)
        value.activations += kv_cache_bytes(value_shape, micro, S, p) if learn_share else 0
    roles.append(value)

    # reward model(s)
    score_rm = activation_bytes(reward, score_mb, S, p, False, lm_head=False, trained=False) if reward_members else 0
    score_rm += kv_cache_bytes(reward, score_mb, S, p) if share and reward_members else 0
    for i in range(reward_members):
        name = "reward" if reward_members == 1 else f"reward[{i}]"
        rm = frozen_role(
            name, reward.params_scalar, reward.linear_params_scalar, m.reward.dtype, mp, topology, n, "frozen"
        )
        rm.activations = score_rm
        roles.append(rm)

    phases = {
        "generate": pol_role.kv_cache + gen_act,
        "score": max(score_act if logprob_scoring else 0, score_rm),
        "train": max(train_act, ptx_act) + value.activations,
    }
    B = cfg.train.batch_size
    ptx_tokens = round(cfg.ptx.sequences_per_episode * B) * cfg.ptx.max_length if cfg.ptx.ptx_coef > 0 else 0
    scored = B // k * P + B * R if share else B * S
    trained = B // k * P + B * R if learn_share else B * S  # the RL episodes' tokens per epoch
    tokens = {
        "generated": B * R,
        "scored": scored,
        "trained": cfg.ppo.ppo_epochs * (trained + ptx_tokens),
    }
    gen_flops = 2 * policy.params_lm * ((B // k if share else B) * P + B * R)
    score_flops = (
        2
        * scored
        * (
            # old log-probs (unless the one-step update's forward gives them) and reference log-probs (if any)
            ((not old_from_update) + (m.reference != "none")) * policy.params_lm
            + (value_shape.params_scalar if critic else 0)
            + reward_members * reward.params_scalar
        )
    )
    train_flops = cfg.ppo.ppo_epochs * (
        (trained + ptx_tokens) * train_flops_per_token(policy.params_lm, lora, ckpt)
        + (trained * train_flops_per_token(value_shape.params_scalar, False, ckpt) if critic else 0)
    )
    notes = [
        "sequences counted at max_prompt_length + max_new_tokens (an upper bound)",
        "generation is memory-bound: its time from 2N FLOPs per token is a lower bound",
    ]
    return Plan(
        "ppo",
        roles,
        phases,
        tokens,
        gen_flops + score_flops + train_flops,
        _settings(
            mp,
            topology,
            n,
            micro=micro,
            seq=S,
            batch=B,
            generation_batch=gen_batch,
            score_micro=score_mb,
            ptx=ptx_seqs,
        ),
        notes,
    )


def _settings(mp: str, topology: str, n: int, **kw) -> dict[str, Any]:
    return {"mixed_precision": mp, "topology": topology, "num_processes": n} | kw


# --------------------------------------------------------------------------------------------------
# Reading configs, printing
# --------------------------------------------------------------------------------------------------


def guess_stage(path: str | Path, data: dict | None = None) -> str:
    """sft / rm / ppo from the file name (pretrain.yaml is SFT) or, failing that, from the YAML's keys."""
    stem = Path(path).stem.lower()
    for stage, words in (("ppo", ("ppo",)), ("dpo", ("dpo",)), ("rm", ("rm", "reward")), ("sft", ("sft", "pretrain"))):
        if any(stem == w or stem.startswith(w + "_") or stem.startswith(w + "-") for w in words):
            return stage
    data = data or {}
    if "models" in data or "rollout" in data:
        return "ppo"
    if "ensemble" in data or "loss" in data or "reference" in (data.get("data") or {}):
        return "rm"
    if "policy" in data or "run_dir" in data:
        raise ConfigError(f"{path} looks like an eval config; `rlhf plan` plans the sft, rm and ppo stages")
    return "sft"


def responses_per_prompt(cfg: RMConfig | DPOConfig) -> int:
    """K of the RM data: the length of the first row's `ranked` list in a local json/jsonl file, else 2 (pairs)."""
    path = Path(cfg.data.train.path)
    if path.suffix == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8") as f:
            line = f.readline()
        try:
            row = json.loads(line)
        except ValueError:
            return 2
        ranked = row.get("ranked") if isinstance(row, dict) else None
        return len(ranked) if isinstance(ranked, list) and len(ranked) >= 2 else 2
    return 2


def plan_config(
    stage: str, cfg: Any, num_processes: int = 1, topology: str = "ddp", mixed_precision: str | None = None
) -> Plan:
    """Read the model shapes a validated stage config names and plan it."""
    shard_divisors(topology, num_processes)  # validates the topology
    if stage == "sft":
        return plan_sft(cfg, load_shape(cfg.model), num_processes, topology, mixed_precision)
    if stage == "rm":
        k = responses_per_prompt(cfg)
        return plan_rm(cfg, load_shape(cfg.model), num_processes, topology, mixed_precision, k)
    if stage == "dpo":
        k = responses_per_prompt(cfg)
        return plan_dpo(cfg, load_shape(cfg.model), num_processes, topology, mixed_precision, k)
    if stage == "ppo":
        m = cfg.models
        policy = load_shape(m.policy, "models.policy.name_or_path")
        if m.reward.name_or_path:
            reward = load_shape(m.reward, "models.reward.name_or_path")
            members = len(ensemble_members(m.reward.name_or_path)) or 1
        else:  # a reward function only: no reward model to hold
            reward, members = policy, 0
        return plan_ppo(cfg, policy, reward, members, num_processes, topology, mixed_precision)
    raise ConfigError(f"`rlhf plan` plans the sft, rm, dpo and ppo stages, not {stage!r}")


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '24g', '1.5TiB', '512MiB' or a plain number of GiB -> bytes."""
    units = {"": GiB, "g": GiB, "gb": 10**9, "gib": GiB, "m": 1024**2, "mb": 10**6, "mib": 1024**2}
    units |= {"t": 1024**4, "tb": 10**12, "tib": 1024**4}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not 0 < value < float("inf"):
        raise ConfigError(f"--device-memory {text!r}: expected a size such as 80GiB, 24GB or 40")
    return int(value * units[unit])


def _size(b: int, unit: int) -> str:
    return f"{b / unit:.2f}" if b else "-"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_plan(plan: Plan, device_memory: int | None = None, tflops: float | None = None) -> str:
    """A readable table (GiB per device) and the summary lines."""
    s = plan.settings
    unit, uname = (GiB, "GiB") if plan.total >= GiB else (1024**2, "MiB")

    def _gib(b: int) -> str:
        return _size(b, unit)

    lines = [
        f"rlhf plan: {plan.stage}, {s['topology']} x {s['num_processes']} process(es), mixed_precision="
        f"{s['mixed_precision']}; per device, {uname}",
        "",
    ]
    head = ("role", "params", "trained", "weights", "grads", "optimizer", "activations", "kv-cache", "total", "")
    rows = [
        (
            r.role,
            _count(r.params),
            _count(r.trainable) if r.trainable else "-",
            _gib(r.weights),
            _gib(r.grads),
            _gib(r.optimizer),
            _gib(r.activations),
            _gib(r.kv_cache),
            _gib(r.total),
            r.note,
        )
        for r in plan.roles
    ]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, len(head) - 1) else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*head).rstrip())
    lines.extend(fmt.format(*row).rstrip() for row in rows)
    phase, peak = plan.peak_phase
    lines += [
        "",
        "phases (transient, not at the same time): "
        + ", ".join(f"{k} {_gib(v)}" for k, v in plan.phases.items())
        + f"  -> peak in {phase}",
        f"device total = static {_gib(plan.static)} + {phase} {_gib(peak)} = {plan.total / GiB:.2f} GiB",
        "tokens per "
        + ("iteration" if plan.stage == "ppo" else "step")
        + ": "
        + ", ".join(f"{k} {v:,}" for k, v in plan.tokens.items()),
        f"FLOPs per {'iteration' if plan.stage == 'ppo' else 'step'}: {plan.flops:.3g}",
    ]
    if tflops:
        secs = plan.seconds(tflops, s["num_processes"])
        lines.append(
            f"time at {tflops:g} TFLOP/s per device: {secs:.3g} s per {'iteration' if plan.stage == 'ppo' else 'step'}"
        )
    lines += [f"note: {n}" for n in plan.notes]
    if device_memory is not None and plan.total > device_memory:
        lines.append(
            f"WARNING: the estimate ({plan.total / GiB:.2f} GiB) exceeds the device memory "
            f"({device_memory / GiB:.2f} GiB): lower the micro-batch, turn on gradient checkpointing or LoRA, "
            "or shard (--topology zero3/fsdp)"
        )
    return "\n".join(lines)
