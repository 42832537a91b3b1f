"""Stage 3: PPO(-ptx) — the experience maker (rlhf.stages.ppo.experience), the learner (rlhf.stages.ppo.learner) and the loop
that owns the run (rlhf.stages.ppo.trainer); the roles they share (rlhf.stages.ppo.roles) and the `Rollout` that flows between
them (rlhf.stages.ppo.rollout). docs/architecture.md has the picture."""

from rlhf.models.forwards import response_logprobs, response_values
from rlhf.stages.ppo.rollout import Rollout
from rlhf.stages.ppo.trainer import PPOTrainer, train

__all__ = ["PPOTrainer", "Rollout", "response_logprobs", "response_values", "train"]
