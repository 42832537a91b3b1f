"""Each stage's plan: which roles it holds on a device, the transient memory of each phase, tokens and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, uses_critic
from rlhf.tools.plan.memory import (
    Precision,
    RoleEstimate,
    activation_bytes,
    frozen_role,
    gathered_bytes,
    kv_cache_bytes,
    precision,
    role_static,
    train_flops_per_token,
    trained_lm_role,
)
from rlhf.tools.plan.report import Plan
from rlhf.tools.plan.shapes import ModelShape, lora_params


def resolve_mixed_precision(train_cfg) -> str:
    """`auto` is what a GPU with bf16 gets (the planner plans for GPUs), unless the config forces the CPU."""
    mp = train_cfg.mixed_precision
    if mp == "auto":
        return "no" if train_cfg.cpu else "bf16"
    return mp


PADDED = "tokens assume every sequence padded to data.format.max_length (an upper bound)"


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
        {"train": role.activations + gathered_bytes(shape, prec.weight, topology, grads=True)},
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
        {"train": role.activations + gathered_bytes(shape, prec.weight, topology, scalar=True, grads=True)},
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
        {"train": policy.activations + ref.activations + gathered_bytes(shape, prec.weight, topology, grads=True)},
        {"trained": tokens},
        flops,
        _settings(
            mp, topology, num_processes, micro=micro, seq=seq, batch=cfg.train.batch_size, K=k, share_prompt=share
        ),
        [PADDED] + ([SHARED_NOTE] if share else []),
    )


# --------------------------------------------------------------------------------------------------
# PPO: four roles and three phases (generate, score, train) that never overlap
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PPOSizes:
    """The sizes and run-time decisions every part of PPO's plan reads (P prompt, R response, S = P + R tokens)."""

    mp: str
    prec: Precision
    topology: str
    n: int
    P: int
    R: int
    micro: int
    gen_batch: int
    score_mb: int
    k: int
    """rollout.samples_per_prompt."""
    share: bool
    """Scoring (and generation's prefill) runs each prompt once for its k responses."""
    learn_share: bool
    """The update's forwards share each prompt too (ppo.group_minibatches)."""
    old_from_update: bool
    """The one-step update's forward gives the old log-probs: no scoring forward for them."""
    critic: bool
    """The advantage estimator learns a value model (GAE, REINFORCE with a learned baseline)."""

    @property
    def S(self) -> int:
        return self.P + self.R

    @property
    def p(self) -> int:
        return self.prec.activation


@dataclass(frozen=True)
class _PolicyActivations:
    """The policy's transient bytes in each of its forwards."""

    train: int
    ptx: int
    score: int
    generate: int
    ptx_seqs: int
    """Pretraining sequences per PPO micro-batch (0 without ptx)."""


def _ppo_sizes(cfg: PPOConfig, num_processes: int, topology: str, mixed_precision: str | None) -> _PPOSizes:
    from rlhf.stages.ppo import settings  # the stage's own decisions; imported here, as the stage imports torch

    mp = mixed_precision or resolve_mixed_precision(cfg.train)
    n = max(1, num_processes)
    local_batch = max(1, cfg.train.batch_size // n)
    # rollout.share_prompt: with k samples per prompt generation prefills each prompt once, and the scoring forwards
    # run each prompt once and every response on its KV cache, which each scoring model then holds for a whole
    # micro-batch (unsharded topologies only); with ppo.group_minibatches the update's forwards too
    share, learn_share = settings.prompt_sharing(cfg, sharded=topology in ("fsdp", "zero3"))
    return _PPOSizes(
        mp=mp,
        prec=precision(cfg.models.policy.dtype, mp, topology),
        topology=topology,
        n=n,
        P=cfg.data.format.max_prompt_length,
        R=cfg.rollout.max_new_tokens,
        micro=cfg.ppo.micro_batch_size,
        gen_batch=min(cfg.rollout.generation_batch_size, local_batch),
        score_mb=min(settings.scoring_micro_batch_size(cfg), local_batch),
        k=cfg.rollout.samples_per_prompt,
        share=share,
        learn_share=learn_share,
        old_from_update=settings.old_logprobs_from_update(cfg),
        critic=uses_critic(cfg),
    )


def _policy_activations(cfg: PPOConfig, policy: ModelShape, z: _PPOSizes) -> _PolicyActivations:
    p, S, micro = z.p, z.S, z.micro
    ckpt = cfg.models.policy.gradient_checkpointing
    ptx_seqs = round(cfg.ptx.sequences_per_episode * micro) if cfg.ptx.ptx_coef > 0 else 0
    ptx_len = cfg.ptx.max_length if ptx_seqs else 0
    # the policy's PPO forwards compute logits for the R + 1 positions that predict the response only
    train = activation_bytes(policy, micro, S, p, ckpt, lm_head=True, logit_positions=z.R + 1)
    train += kv_cache_bytes(policy, micro, S, p) if z.learn_share else 0  # the prompt's keys/values per episode
    ptx = activation_bytes(policy, min(ptx_seqs, micro), ptx_len, p, ckpt, lm_head=True) if ptx_seqs else 0
    score = activation_bytes(policy, z.score_mb, S, p, False, lm_head=True, trained=False, logit_positions=z.R + 1)
    score += kv_cache_bytes(policy, z.score_mb, S, p) if z.share else 0
    prefill_rows = max(1, z.gen_batch // z.k) if z.share else z.gen_batch
    prefill = activation_bytes(policy, prefill_rows, z.P, p, False, False, False)
    generate = z.gen_batch * policy.vocab * (p + 4) + prefill  # the last position's logits, upcast, per row
    return _PolicyActivations(train=train, ptx=ptx, score=score, generate=generate, ptx_seqs=ptx_seqs)


def _policy_role(cfg: PPOConfig, policy: ModelShape, z: _PPOSizes, acts: _PolicyActivations) -> RoleEstimate:
    pol = cfg.models.policy
    lora = pol.lora.enabled
    adapters = lora_params(policy, pol.lora.r, pol.lora.target_modules) if lora else 0
    trainable = adapters if lora else policy.params_lm
    role = role_static(
        "policy", policy.params_lm + adapters, trainable, z.prec, z.topology, z.n, note="LoRA" if lora else "trained"
    )
    if cfg.ema.decay:
        role.weights += trainable * 4  # the EMA shadow: fp32 copy of the trainable weights
        role.note += ", EMA"
    # the policy scores for the old log-probs (unless the one-step update gives them) and, adapter off, the reference
    policy_scores = not z.old_from_update or cfg.models.reference == "disable_adapter"
    role.activations = max(acts.train, acts.ptx, acts.score if policy_scores else 0)
    role.kv_cache = kv_cache_bytes(policy, z.gen_batch, z.S, z.p)
    return role


def _reference_role(cfg: PPOConfig, policy: ModelShape, z: _PPOSizes, score_act: int) -> RoleEstimate:
    m = cfg.models
    if m.reference != "copy":
        return RoleEstimate("reference", 0, 0, note="none" if m.reference == "none" else "policy, adapter off")
    ref = frozen_role(
        "reference", policy.params_lm, policy.linear_params_lm, m.policy.dtype, z.mp, z.topology, z.n, "frozen copy"
    )
    ref.activations = score_act
    return ref


def _value_shape(cfg: PPOConfig, policy: ModelShape, reward: ModelShape) -> ModelShape:
    return reward if cfg.models.value_init == "reward" else policy


def _value_role(cfg: PPOConfig, policy: ModelShape, reward: ModelShape, z: _PPOSizes) -> RoleEstimate:
    """The value model: only for the estimators that learn one (GAE, REINFORCE with a learned baseline)."""
    m = cfg.models
    if not z.critic:
        return RoleEstimate("value", 0, 0, note=f"none: {cfg.ppo.advantage} is critic-free")
    shape = _value_shape(cfg, policy, reward)
    prec = precision(m.reward.dtype if m.value_init == "reward" else m.policy.dtype, z.mp, z.topology)
    value = role_static(
        "value", shape.params_scalar, shape.params_scalar, prec, z.topology, z.n, note=f"from {m.value_init}"
    )
    value.activations = activation_bytes(shape, z.micro, z.S, z.p, m.policy.gradient_checkpointing, lm_head=False)
    value.activations += kv_cache_bytes(shape, z.micro, z.S, z.p) if z.learn_share else 0
    return value


def _reward_roles(cfg: PPOConfig, reward: ModelShape, members: int, z: _PPOSizes) -> tuple[list[RoleEstimate], int]:
    """The frozen reward model(s), one role per ensemble member, and the bytes of one member's scoring forward."""
    if not members:
        return [], 0
    score_rm = activation_bytes(reward, z.score_mb, z.S, z.p, False, lm_head=False, trained=False)
    score_rm += kv_cache_bytes(reward, z.score_mb, z.S, z.p) if z.share else 0
    roles = []
    for i in range(members):
        name = "reward" if members == 1 else f"reward[{i}]"
        rm = frozen_role(
            name,
            reward.params_scalar,
            reward.linear_params_scalar,
            cfg.models.reward.dtype,
            z.mp,
            z.topology,
            z.n,
            "frozen",
        )
        rm.activations = score_rm
        roles.append(rm)
    return roles, score_rm


def _ppo_tokens_and_flops(
    cfg: PPOConfig, policy: ModelShape, reward: ModelShape, members: int, z: _PPOSizes
) -> tuple[dict[str, int], int]:
    """Tokens per iteration by kind, and the iteration's FLOPs (generation + scoring forwards + PPO epochs)."""
    m = cfg.models
    B, P, R, k = cfg.train.batch_size, z.P, z.R, z.k
    ckpt = m.policy.gradient_checkpointing
    value_shape = _value_shape(cfg, policy, reward)
    ptx_tokens = round(cfg.ptx.sequences_per_episode * B) * cfg.ptx.max_length if cfg.ptx.ptx_coef > 0 else 0
    scored = B // k * P + B * R if z.share else B * z.S
    trained = B // k * P + B * R if z.learn_share else B * z.S  # the RL episodes' tokens per epoch
    tokens = {
        "generated": B * R,
        "scored": scored,
        "trained": cfg.ppo.ppo_epochs * (trained + ptx_tokens),
    }
    gen_flops = 2 * policy.params_lm * ((B // k if z.share else B) * P + B * R)
    score_flops = (
        2
        * scored
        * (
            # old log-probs (unless the one-step update's forward gives them) and reference log-probs (if any)
            ((not z.old_from_update) + (m.reference != "none")) * policy.params_lm
            + (value_shape.params_scalar if z.critic else 0)
            + members * reward.params_scalar
        )
    )
    train_flops = cfg.ppo.ppo_epochs * (
        (trained + ptx_tokens) * train_flops_per_token(policy.params_lm, m.policy.lora.enabled, ckpt)
        + (trained * train_flops_per_token(value_shape.params_scalar, False, ckpt) if z.critic else 0)
    )
    return tokens, gen_flops + score_flops + train_flops


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
    z = _ppo_sizes(cfg, num_processes, topology, mixed_precision)
    acts = _policy_activations(cfg, policy, z)
    policy_role = _policy_role(cfg, policy, z, acts)
    value = _value_role(cfg, policy, reward, z)
    rewards, score_rm = _reward_roles(cfg, reward, reward_members, z)
    roles = [policy_role, _reference_role(cfg, policy, z, acts.score), value, *rewards]
    # log-prob scoring runs for the old log-probs (unless the one-step update gives them) and for the reference
    logprob_scoring = not z.old_from_update or cfg.models.reference != "none"
    w = z.prec.weight
    gathered_rm = gathered_bytes(reward, w, topology, scalar=True)
    phases = {
        "generate": policy_role.kv_cache + acts.generate + gathered_bytes(policy, w, topology),
        "score": max(acts.score if logprob_scoring else 0, score_rm)
        + max(gathered_bytes(policy, w, topology), gathered_rm),
        "train": max(acts.train, acts.ptx)
        + value.activations
        + max(gathered_bytes(policy, w, topology, grads=True), gathered_bytes(reward, w, topology, True, True)),
    }
    tokens, flops = _ppo_tokens_and_flops(cfg, policy, reward, reward_members, z)
    notes = [
        "sequences counted at max_prompt_length + max_new_tokens (an upper bound)",
        "generation is memory-bound: its time from 2N FLOPs per token is a lower bound",
    ]
    batch = cfg.train.batch_size
    return Plan(
        "ppo",
        roles,
        phases,
        tokens,
        flops,
        _settings(
            z.mp,
            topology,
            z.n,
            micro=z.micro,
            seq=z.S,
            batch=batch,
            generation_batch=z.gen_batch,
            score_micro=z.score_mb,
            ptx=acts.ptx_seqs,
        ),
        notes,
    )


def _settings(mp: str, topology: str, n: int, **kw) -> dict[str, Any]:
    return {"mixed_precision": mp, "topology": topology, "num_processes": n} | kw
