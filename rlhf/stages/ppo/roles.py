"""PPO's four roles — policy, frozen reference, value model, reward model(s) and/or a reward function — loaded,
wrapped for the accelerator and given their optimizers, in one fixed order (a value head started from scratch
draws from the global random stream, so the order is part of a run's reproducibility)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, PPOConfig
from rlhf.models.loading import (
    TokenValueModel,
    load_causal_lm,
    load_reward_ensemble,
    load_reward_model,
    load_tokenizer,
    reward_members,
)
from rlhf.rewards import row_function
from rlhf.runtime.accelerator import (
    ModelLanes,
    build_optimizer,
    build_scheduler,
    compiled_for_training,
    concurrent_models,
    prepare_frozen,
)


@dataclass
class Roles:
    """The models of a PPO run. `policy_train` / `value_train` are the (optionally compiled) forwards the update
    differentiates; rollout, scoring and saving use the eager `policy` / `value_model`. `reference` None = the
    LoRA policy with its adapter disabled, or no reference (models.reference: none). `value_model` None = a
    critic-free estimator."""

    tokenizer: Any
    reward_tokenizer: Any
    same_tokenizer: bool
    critic: bool
    policy: Any = None
    policy_train: Any = None
    reference: Any = None
    reward_models: list | None = None
    reward_fn: Any = None
    value_model: Any = None
    value_train: Any = None
    lanes: ModelLanes | None = None
    # optimizers and schedules (the learner steps them)
    policy_opt: Any = None
    policy_sched: Any = None
    value_opt: Any = None
    value_sched: Any = None


def roles_for(cfg: PPOConfig) -> Roles:
    """The tokenizers and the checks that need no model: a value model cannot start from a reward model with
    another vocabulary, and an adapter-disabled reference needs merged SFT weights."""
    m = cfg.models
    tokenizer = load_tokenizer(m.policy, fmt=cfg.data.format)
    reward_tokenizer = load_tokenizer(m.reward, fmt=cfg.data.format) if m.reward.name_or_path else None
    same_tokenizer = reward_tokenizer is None or reward_tokenizer.get_vocab() == tokenizer.get_vocab()
    critic = cfg.uses_critic()
    if not same_tokenizer and m.value_init == "reward" and critic:
        raise ConfigError(
            f"models.reward ({m.reward.name_or_path}) has a different tokenizer from the policy, so the value "
            "model cannot start from it (values are read per policy token); set models.value_init: policy"
        )
    if m.reference == "disable_adapter":
        _check_adapter_reference(m.policy)
    return Roles(tokenizer, reward_tokenizer, same_tokenizer, critic)


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


def load_roles(cfg: PPOConfig, acc, roles: Roles, total_steps: int) -> Roles:
    """Load the models into `roles` (tokenizers already set) with dropout off in all four (N+ detail 1); the
    schedules count optimizer steps, the warm-up PPO iterations (InstructGPT: 10 from 1/10 of the peak)."""
    m = cfg.models
    roles.policy = load_causal_lm(m.policy, roles.tokenizer, dropout=False, key="models.policy.name_or_path")
    roles.reference = None
    if m.reference == "copy":
        ref_cfg = copy.deepcopy(m.policy)
        ref_cfg.lora.enabled, ref_cfg.gradient_checkpointing = False, False
        reference = load_causal_lm(ref_cfg, roles.tokenizer, dropout=False, key="models.policy.name_or_path")
        roles.reference = prepare_frozen(acc, reference)
    # one reward model, or the PPO members of an ensemble (scores combined by reward.aggregate); each one
    # forward module (TokenValueModel), so sharding wrappers see the whole forward. And/or a reward function.
    members = load_reward_ensemble(m.reward, roles.reward_tokenizer) if m.reward.name_or_path else []
    roles.reward_models = [prepare_frozen(acc, TokenValueModel(rm)) for rm in members]
    roles.reward_fn = row_function(cfg.reward.function, "reward.function") if cfg.reward.function else None

    updates = total_steps * cfg.ppo.ppo_epochs * (cfg.train.batch_size // cfg.ppo.mini_batch_size)
    # the warm-up counts PPO iterations (InstructGPT: 10 iterations from 1/10 of the peak)
    warm = copy.deepcopy(cfg.optim)
    warm.warmup_steps = cfg.optim.warmup_steps * (updates // total_steps)
    policy_opt = build_optimizer(roles.policy.parameters(), cfg.optim)
    roles.policy, roles.policy_opt, roles.policy_sched = acc.prepare(
        roles.policy, policy_opt, build_scheduler(policy_opt, warm, updates)
    )
    # the critic (GAE, REINFORCE with a learned baseline); critic-free estimators never load one
    roles.value_model = roles.value_opt = roles.value_sched = None
    if roles.critic:
        value_cfg = copy.deepcopy(m.reward if m.value_init == "reward" else m.policy)
        if m.value_init == "reward":
            value_cfg.name_or_path = reward_members(m.reward.name_or_path)[0]
        value_cfg.lora.enabled = False
        value_cfg.gradient_checkpointing = m.policy.gradient_checkpointing
        # from the RM its trained head is the value head's start; from the policy a new head is expected
        value_key = "models.reward.name_or_path" if m.value_init == "reward" else "models.policy.name_or_path"
        value_model = TokenValueModel(
            load_reward_model(value_cfg, roles.tokenizer, train=True, new_head=m.value_init == "policy", key=value_key)
        )
        value_opt = build_optimizer(value_model.parameters(), cfg.optim, lr=cfg.value_lr or cfg.optim.lr)
        roles.value_model, roles.value_opt, roles.value_sched = acc.prepare(
            value_model, value_opt, build_scheduler(value_opt, warm, updates)
        )

    # the update's differentiated forwards only (train.compile); rollout, scoring and saving use the eager roles
    roles.policy_train = compiled_for_training(acc, roles.policy, cfg.train.compile)
    roles.value_train = compiled_for_training(acc, roles.value_model, cfg.train.compile) if roles.critic else None
    # the policy's and the critic's work side by side on a CPU (same computation, sooner)
    side_by_side = roles.critic and concurrent_models(
        acc, cfg.train.concurrent_models, [roles.policy, roles.value_model]
    )
    roles.lanes = ModelLanes(side_by_side)
    return roles
