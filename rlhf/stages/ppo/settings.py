"""Run-time decisions PPO derives from its config, as pure functions of it: shared by the stage and `rlhf plan`, so
the estimate and the run decide the same way. `uses_critic` lives in rlhf.config (validation needs it too) and is
re-exported here with the others."""

from __future__ import annotations

from rlhf.config import PPOConfig, uses_critic

__all__ = ["old_logprobs_from_update", "prompt_sharing", "scoring_micro_batch_size", "uses_critic"]


def prompt_sharing(cfg: PPOConfig, sharded: bool) -> tuple[bool, bool]:
    """(rollout, update): whether a group's prompt runs once (rollout.share_prompt, k > 1 samples per prompt) in
    the rollout's generation prefill and scoring forwards, and with ppo.group_minibatches in the update's too.
    Never through parameters sharded by FSDP/ZeRO-3 (`sharded`); not in the update under train.compile or
    gradient checkpointing (the checkpointed layers drop the KV cache)."""
    scoring = cfg.rollout.share_prompt and cfg.rollout.samples_per_prompt > 1 and not sharded
    checkpointed = cfg.models.policy.gradient_checkpointing
    return scoring, scoring and cfg.ppo.group_minibatches and not (cfg.train.compile or checkpointed)


def scoring_micro_batch_size(cfg: PPOConfig) -> int:
    """Episodes per forward of the rollout's scoring (per process): 4 x ppo.micro_batch_size, as no activations
    are kept for a backward."""
    return cfg.ppo.micro_batch_size * 4


def old_logprobs_from_update(cfg: PPOConfig) -> bool:
    """Whether the old log-probs can be the update's own forward instead of a scoring forward of their own: the
    update is one optimizer step (ppo_epochs 1, one minibatch of the whole batch), so every training forward
    runs the policy that sampled the rollout, and nothing before it reads them (the KL is not in the reward:
    kl.placement loss, or a fixed beta of 0). The PPO ratio is then exactly 1 (TRL's GRPO does the same with
    num_iterations 1); the KL statistics are read off that forward after the update."""
    one_step = cfg.ppo.ppo_epochs == 1 and cfg.ppo.mini_batch_size == cfg.train.batch_size
    kl_in_reward = cfg.kl.placement == "reward" and cfg.kl.kl_coef != 0  # (an adaptive beta starts > 0)
    return one_step and not kl_in_reward
