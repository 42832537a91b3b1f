"""DPO config: the policy trained directly on preference rows against a frozen reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
class DPOData:
    train: TextSource = field(default_factory=TextSource)
    """Preference rows (as the RM stage reads them): chosen/rejected pairs or K-way `ranked` lists."""
    eval: TextSource = field(default_factory=TextSource)
    """Held-out preference rows for loss and preference accuracy (empty path = none)."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering and truncation (must match the SFT stage)."""
    packing: bool = False
    """Pack each micro-batch's responses (with their prompts) into sequences of up to format.max_length tokens
    (best fit, no attention across them): no padding to a pair's longer response, which raises tokens/s and lowers
    peak memory for pairs of varied lengths (docs/benchmarks.md)."""


@dataclass
class DPOLoss:
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped, in [0, 0.5) (0 = the paper's DPO loss)."""


@dataclass
class DPOConfig(RunSettings):
    output_dir: str = "runs/dpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy, initialised from SFT (sft/final); the frozen reference is the same weights."""
    reference: Literal["copy", "disable_adapter"] = "copy"
    """copy = a second frozen copy of SFT; disable_adapter = the LoRA policy with its adapter off."""
    beta: float = 0.1
    """beta: strength of the implicit KL constraint to the reference (DPO paper: 0.1)."""
    share_prompt: bool = False
    """Run each prompt once per micro-batch, its responses on the prompt's KV cache (policy and reference, forward and
    backward): the same log-probs and gradients up to float rounding, with (K-1)/K of the prompt tokens' work gone.
    Pays where prompts are long against responses (multi-turn dialogues), little on short ones
    (docs/benchmarks.md). Not with data.packing, gradient checkpointing or
    train.compile; skipped under FSDP / ZeRO-3."""
    data: DPOData = field(default_factory=DPOData)
    loss: DPOLoss = field(default_factory=DPOLoss)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=64, micro_batch_size=4))
    """batch_size = prompts per step; each brings every ordered pair of its ranked responses."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=150, scheduler="constant"))
    """DPO paper: LR 1e-6, linear warm-up over 150 steps, then constant."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        check_common(self)
        positive(self.beta, "beta")
        if not 0.0 <= self.loss.label_smoothing < 0.5:
            raise ConfigError(
                "loss.label_smoothing must be in [0, 0.5) (the assumed label-flip rate), "
                f"got {self.loss.label_smoothing}"
            )
        if self.reference == "disable_adapter" and not self.model.lora.enabled:
            raise ConfigError(
                "reference: disable_adapter needs model.lora.enabled: true "
                "(without an adapter there is nothing to disable); use reference: copy"
            )
        if self.reference == "disable_adapter" and self.model.from_config:
            raise ConfigError("reference: disable_adapter cannot work with model.from_config: true (no SFT weights)")
        check_share_prompt(self)

    def paths(self) -> dict[str, str]:
        return source_paths(self.data, ("train", "eval")) | model_paths(self.model, "model")
