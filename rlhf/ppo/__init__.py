"""Stage 3: PPO(-ptx) — the experience maker (rlhf.ppo.experience), the learner (rlhf.ppo.learner) and the loop
that owns the run (rlhf.ppo.trainer); the roles they share (rlhf.ppo.roles) and the `Rollout` that flows between
them (rlhf.ppo.rollout). docs/architecture.md has the picture."""

from rlhf.ppo.rollout import Rollout, response_logprobs, response_values
from rlhf.ppo.trainer import PPOTrainer, train

__all__ = ["PPOTrainer", "Rollout", "response_logprobs", "response_values", "train"]
