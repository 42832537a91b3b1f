"""`rlhf eval` config: a policy (or every checkpoint of a PPO run) against SFT on held-out prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config.errors import ConfigError
from rlhf.config.schema.common import CollapseLimits, FormatConfig, TextSource
from rlhf.config.validation import positive


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    """Where eval.json and samples.jsonl go."""
    seed: int = 0
    """Seed for sampling."""
    policy: str = ""
    """The trained policy (ppo/final); or leave empty and set run_dir."""
    run_dir: str = ""
    """A PPO output dir: evaluate every checkpoint and final/, write frontier.json and frontier.png."""
    select_best: bool = False
    """With run_dir: make the checkpoint with the best held-out proxy score the run's final/ (the last one is kept
    as final-last/)."""
    sft: str = ""
    """The SFT model: baseline for scores and win-rate, and the reference for KL and fluency."""
    reward_model: str = ""
    """Reward model dir (or ensemble dir) PPO optimised (empty = no RM scores)."""
    proxy_reward_model: str = ""
    """A reward model PPO never optimised, for the held-out proxy score (empty = reward_model's held-out
    ensemble members, if any)."""
    prompts: TextSource = field(default_factory=TextSource)
    """Held-out prompts."""
    pretrain_eval: TextSource = field(default_factory=TextSource)
    """Held-out pretraining text: both models' LM loss on it (empty = skip)."""
    judge: str = ""
    """`module:function` (prompt, response) -> float, e.g. rlhf.tiny:gold_judge; empty = RM-judged win-rate."""
    num_prompts: int = 0
    """Evaluate on at most this many prompts (0 = all)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt and model."""
    max_new_tokens: int = 64
    """Longest response."""
    temperature: float = 1.0
    """Sampling temperature (KL and fluency are computed at the same temperature)."""
    batch_size: int = 64
    """Prompts per generate() call."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering (must match training)."""
    collapse: CollapseLimits = field(default_factory=CollapseLimits)
    """With run_dir: a checkpoint whose collapse signs cross these limits is flagged and never selected."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""

    def validate(self) -> None:
        self.collapse.validate("collapse")
        if not self.sft:
            raise ConfigError("sft is required (a model dir)")
        if bool(self.policy) == bool(self.run_dir):
            raise ConfigError("set exactly one of policy (a model dir) and run_dir (a PPO output dir)")
        if self.select_best and not self.run_dir:
            raise ConfigError("select_best needs run_dir (the PPO run whose checkpoints are compared)")
        if not self.prompts.path:
            raise ConfigError("prompts.path is required")
        if self.judge and ":" not in self.judge:
            raise ConfigError(f"judge must look like 'module:function', got {self.judge!r}")
        positive(self.temperature, "temperature")
        positive(self.samples_per_prompt, "samples_per_prompt")

    def paths(self) -> dict[str, str]:
        out = {"sft": self.sft, "prompts.path": self.prompts.path}
        for key in ("policy", "run_dir", "reward_model", "proxy_reward_model"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.pretrain_eval.path:
            out["pretrain_eval.path"] = self.pretrain_eval.path
        return out
