"""Stage 2 (reward model) config: pairwise / K-way ranking loss, an optional ensemble, reward normalisation."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.config.errors import ConfigError
from rlhf.config.schema.common import (
    CheckpointConfig,
    FormatConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunSettings,
    TextSource,
    TrainConfig,
    model_paths,
    source_paths,
)
from rlhf.config.validation import check_common, check_share_prompt, positive


@dataclass
class RMLoss:
    margin_coef: float = 0.0
    """Subtract margin_coef * (rank distance) inside the sigmoid (Llama-2 style margin); 0 = off."""
    center_coef: float = 0.0
    """Reward-centering regulariser coef * mean(r^2) (Eisenstein et al.); 0 = off."""


@dataclass
class RMData:
    train: TextSource = field(default_factory=TextSource)
    """Preference rows: chosen/rejected pairs or K-way `ranked` lists."""
    eval: TextSource = field(default_factory=TextSource)
    """Held-out preference rows for accuracy (empty path = none)."""
    reference: TextSource = field(default_factory=TextSource)
    """Reference completions (SFT demonstrations) whose mean score is shifted to 0; empty = no normalisation."""
    reference_max_rows: int = 1000
    """Use at most this many reference rows for the normalisation."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering and truncation (must match the PPO stage)."""
    packing: bool = False
    """Pack each micro-batch's responses into sequences of up to format.max_length tokens (best fit, no attention
    across responses, each score read at its response's last token): no padding to a list's longest response."""


@dataclass
class RMEnsemble:
    size: int = 1
    """Reward models to train (1 = one RM in final/; N > 1 = members member-<i>/, final/ lists them)."""
    holdout: int = 0
    """The last `holdout` members are kept out of the PPO reward: a held-out proxy for `rlhf eval`."""
    bootstrap: bool = False
    """Each member trains on a bootstrap resample of the comparisons (else all of them; seeds always differ)."""


@dataclass
class RMConfig(RunSettings):
    output_dir: str = "runs/rm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMData = field(default_factory=RMData)
    loss: RMLoss = field(default_factory=RMLoss)
    ensemble: RMEnsemble = field(default_factory=RMEnsemble)
    """Several reward models (different seeds / bootstrap resamples) for conservative PPO rewards."""
    share_prompt: bool = False
    """Run each prompt once per training micro-batch, its K responses on the prompt's KV cache (forward and
    backward): the same scores and gradients up to float rounding, with (K-1)/K of the prompt tokens' work gone.
    Pays where prompts are long against responses (multi-turn dialogues), little on short ones
    (docs/benchmarks.md). Not with data.packing, gradient checkpointing or train.compile; skipped under
    FSDP / ZeRO-3. Evaluation runs whole sequences."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, micro_batch_size=4))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6, min_lr_ratio=0.1))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        check_common(self)
        if self.loss.margin_coef < 0 or self.loss.center_coef < 0:
            raise ConfigError("loss.margin_coef and loss.center_coef must be >= 0")
        e = self.ensemble
        positive(e.size, "ensemble.size")
        if not 0 <= e.holdout < e.size:
            raise ConfigError(
                f"ensemble.holdout must be in [0, ensemble.size) so PPO keeps at least one member, got {e.holdout}"
            )
        check_share_prompt(self)

    def paths(self) -> dict[str, str]:
        return source_paths(self.data, ("train", "eval", "reference")) | model_paths(self.model, "model")
