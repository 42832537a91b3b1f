"""PPO's roles — the policy (the actor) with its frozen reference, the value model (the critic), the reward models
and/or reward function — loaded, wrapped for the accelerator and given their optimizers by `load_roles`, in one
fixed order (a value head started from scratch draws from the global random stream, so the order is part of a
run's reproducibility). The tokenizers come first (`load_tokenizers`): the prompts, and so the run's length, need
them before any model loads."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.config import ConfigError, PPOConfig
from rlhf.models.heads import TokenValueModel
from rlhf.models.loading import load_causal_lm, load_reward_ensemble, load_reward_model, load_tokenizer, reward_members
from rlhf.rewards import row_function
from rlhf.runtime.accelerator import compiled_for_training, prepare_frozen
from rlhf.runtime.cpu import ModelLanes, concurrent_models
from rlhf.runtime.optim import build_optimizer, build_scheduler
from rlhf.stages.ppo import settings
from rlhf.stages.ppo.state import EMA


@dataclass(frozen=True, kw_only=True)
class Tokenizers:
    """The policy's tokenizer and the reward models' (None without one); `same`: one vocabulary, so the reward
    models read the policy's token ids."""

    policy: Any
    reward: Any | None
    same: bool


@dataclass(frozen=True, kw_only=True)
class Actor:
    """The trained policy. `policy` (wrapped by the accelerator) serves rollout, scoring and saving; `policy_train`
    is the (optionally compiled) forward the update differentiates."""

    policy: torch.nn.Module
    policy_train: torch.nn.Module
    reference: torch.nn.Module | None  # None: the LoRA policy with its adapter disabled, or models.reference: none
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: EMA | None  # ema.decay > 0: the weights evaluated and saved


@dataclass(frozen=True, kw_only=True)
class Critic:
    """The value model of GAE or REINFORCE with a learned baseline; `value_train` as `Actor.policy_train`."""

    value_model: torch.nn.Module
    value_train: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


@dataclass(kw_only=True)
class RewardSources:
    """What scores a response: the reward models (an ensemble's PPO members, each a `TokenValueModel`) and/or a
    reward function of (prompt row, response text)."""

    models: list[torch.nn.Module]
    function: Callable[[dict, str], float] | None
    tokenizer: Any | None  # the reward models'
    same_tokenizer: bool  # the reward models read the policy's token ids


@dataclass(frozen=True, kw_only=True)
class Roles:
    """The models of a PPO run. `critic` None: a critic-free advantage estimator. `lanes` runs the policy's and the
    critic's work side by side (train.concurrent_models)."""

    tokenizer: Any  # the policy's
    actor: Actor
    critic: Critic | None
    rewards: RewardSources
    lanes: ModelLanes


def load_tokenizers(cfg: PPOConfig) -> Tokenizers:
    """The tokenizers, and the checks that need no model: a value model cannot start from a reward model with
    another vocabulary, and an adapter-disabled reference needs merged SFT weights."""
    m = cfg.models
    tokenizer = load_tokenizer(m.policy, fmt=cfg.data.format)
    reward_tokenizer = load_tokenizer(m.reward, fmt=cfg.data.format) if m.reward.name_or_path else None
    same = reward_tokenizer is None or reward_tokenizer.get_vocab() == tokenizer.get_vocab()
    if not same and m.value_init == "reward" and settings.uses_critic(cfg):
        raise ConfigError(
            f"models.reward ({m.reward.name_or_path}) has a different tokenizer from the policy, so the value "
            "model cannot start from it (values are read per policy token); set models.value_init: policy"
        )
    if m.reference == "disable_adapter":
        _check_adapter_reference(m.policy)
    return Tokenizers(policy=tokenizer, reward=reward_tokenizer, same=same)


def _check_adapter_reference(policy_cfg) -> None:
    """Disabling the adapter gives the SFT model only when the policy's base weights *are* the merged SFT model."""
    path = Path(policy_cfg.name_or_path)
    if policy_cfg.from_config:
        raise ConfigError("models.reference: disable_adapter cannot work with models.policy.from_config: true")
    if (path / "adapter_config.json").exists():
        raise ConfigError(
            f"models.reference: disable_adapter needs the policy to start from merged SFT weights, but "
            f"{path} is a peft adapter: disabling PPO's adapter would not give the SFT model. Save SFT with "
            "model.lora.merge_on_save: true, or use models.reference: copy"
        )


def load_roles(cfg: PPOConfig, acc, tokenizers: Tokenizers, total_steps: int) -> Roles:
    """Every role, loaded in a fixed order with dropout off in all four (N+ detail 1): policy, reference, reward
    models and function, the policy's optimizer, the critic. The schedules count optimizer steps
    (`total_steps` PPO iterations of ppo_epochs x minibatches)."""
    m = cfg.models
    policy = load_causal_lm(m.policy, tokenizers.policy, dropout=False, key="models.policy.name_or_path")
    reference = None
    if m.reference == "copy":
        ref_cfg = copy.deepcopy(m.policy)
        ref_cfg.lora.enabled, ref_cfg.gradient_checkpointing = False, False
        reference = load_causal_lm(ref_cfg, tokenizers.policy, dropout=False, key="models.policy.name_or_path")
        reference = prepare_frozen(acc, reference)
    rewards = _load_reward_sources(cfg, acc, tokenizers)

    updates = total_steps * cfg.ppo.ppo_epochs * (cfg.train.batch_size // cfg.ppo.mini_batch_size)
    # the warm-up counts PPO iterations (InstructGPT: 10 iterations from 1/10 of the peak)
    warm = copy.deepcopy(cfg.optim)
    warm.warmup_steps = cfg.optim.warmup_steps * (updates // total_steps)
    policy_opt = build_optimizer(policy.parameters(), cfg.optim)
    policy, policy_opt, policy_sched = acc.prepare(policy, policy_opt, build_scheduler(policy_opt, warm, updates))
    value_model, value_opt, value_sched = _load_value_model(cfg, acc, tokenizers, warm, updates)

    # the update's differentiated forwards only (train.compile); rollout, scoring and saving use the eager roles
    policy_train = compiled_for_training(acc, policy, cfg.train.compile)
    critic = None
    if value_model is not None:
        value_train = compiled_for_training(acc, value_model, cfg.train.compile)
        critic = Critic(value_model=value_model, value_train=value_train, optimizer=value_opt, scheduler=value_sched)
    # the policy's and the critic's work side by side on a CPU (same computation, sooner)
    side_by_side = critic is not None and concurrent_models(acc, cfg.train.concurrent_models, [policy, value_model])
    ema = EMA(acc.unwrap_model(policy), cfg.ema.decay) if cfg.ema.decay else None
    actor = Actor(
        policy=policy,
        policy_train=policy_train,
        reference=reference,
        optimizer=policy_opt,
        scheduler=policy_sched,
        ema=ema,
    )
    return Roles(
        tokenizer=tokenizers.policy, actor=actor, critic=critic, rewards=rewards, lanes=ModelLanes(side_by_side)
    )


def _load_reward_sources(cfg: PPOConfig, acc, tokenizers: Tokenizers) -> RewardSources:
    """One reward model, or the PPO members of an ensemble (scores combined by reward.aggregate), each one forward
    module (`TokenValueModel`) so that sharding wrappers see the whole forward; and/or the reward function."""
    m = cfg.models
    members = load_reward_ensemble(m.reward, tokenizers.reward) if m.reward.name_or_path else []
    return RewardSources(
        models=[prepare_frozen(acc, TokenValueModel(rm)) for rm in members],
        function=row_function(cfg.reward.function, "reward.function") if cfg.reward.function else None,
        tokenizer=tokenizers.reward,
        same_tokenizer=tokenizers.same,
    )


def _load_value_model(cfg: PPOConfig, acc, tokenizers: Tokenizers, warm, updates: int) -> tuple:
    """(value model, optimizer, schedule) prepared by the accelerator, or three Nones for a critic-free estimator.
    From the reward model its trained head is the value head's start; from the policy a new head is drawn."""
    if not settings.uses_critic(cfg):
        return None, None, None
    m = cfg.models
    value_cfg = copy.deepcopy(m.reward if m.value_init == "reward" else m.policy)
    if m.value_init == "reward":
        value_cfg.name_or_path = reward_members(m.reward.name_or_path)[0]
    value_cfg.lora.enabled = False
    value_cfg.gradient_checkpointing = m.policy.gradient_checkpointing
    value_key = "models.reward.name_or_path" if m.value_init == "reward" else "models.policy.name_or_path"
    value_model = TokenValueModel(
        load_reward_model(value_cfg, tokenizers.policy, train=True, new_head=m.value_init == "policy", key=value_key)
    )
    value_opt = build_optimizer(value_model.parameters(), cfg.optim, lr=cfg.value_lr or cfg.optim.lr)
    return acc.prepare(value_model, value_opt, build_scheduler(value_opt, warm, updates))
