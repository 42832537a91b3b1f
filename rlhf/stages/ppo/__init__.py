"""Stage 3: PPO(-ptx). An iteration runs the experience maker (experience: sample, score, advantages), which hands a
`Rollout` (rollout) to the learner (learner: the PPO epochs); the loop (trainer) owns the run. The models are the
`Roles` (roles); reward scoring is in scoring, the checkpointed run state in state, the decisions derived from the
config in settings. docs/architecture.md has the picture."""

from rlhf.stages.ppo.rollout import Rollout
from rlhf.stages.ppo.trainer import PPOTrainer, train

__all__ = ["PPOTrainer", "Rollout", "train"]
