"""Stage 1 (SFT) config: demonstrations or plain text, with an optional pretraining mix."""

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
from rlhf.config.validation import check_common, positive


@dataclass
class SFTData:
    kind: Literal["sft", "text"] = "sft"
    """sft = prompt/completion or chat rows; text = plain pretraining text (no prompt mask)."""
    train: TextSource = field(default_factory=TextSource)
    """Training rows."""
    eval: TextSource = field(default_factory=TextSource)
    """Held-out rows for eval loss / perplexity (empty path = no eval)."""
    mask_prompt: bool = True
    """Loss on completion tokens only (False puts the prompt tokens back in)."""
    train_on: Literal["all_assistant_turns", "last_turn"] = "all_assistant_turns"
    """Chat rows rendered with a chat template: learn every assistant turn of the conversation (each up to and
    including its turn-end token; other roles masked), or only the last; a template that cannot be split falls
    back to the last turn with a notice. Prompt/completion rows always learn their completion."""
    packing: bool = False
    """Pack each micro-batch's rows into sequences of up to format.max_length tokens (best-fit decreasing, no
    attention across rows, the same token-mean loss); batches then mix lengths instead of grouping them."""
    pretrain_mix: TextSource = field(default_factory=TextSource)
    """Pretraining text mixed into SFT batches (empty path = none)."""
    pretrain_mix_ratio: float = 0.0
    """Share of each batch drawn from pretrain_mix (InstructGPT's RL init: 0.1)."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Prompt rendering and truncation."""


@dataclass
class SFTConfig(RunSettings):
    output_dir: str = "runs/sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTData = field(default_factory=SFTData)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        check_common(self)
        positive(self.data.format.max_length, "data.format.max_length")
        if not 0.0 <= self.data.pretrain_mix_ratio < 1.0:
            raise ConfigError(f"data.pretrain_mix_ratio must be in [0, 1), got {self.data.pretrain_mix_ratio}")
        if self.data.pretrain_mix_ratio > 0 and not self.data.pretrain_mix.path:
            raise ConfigError("data.pretrain_mix_ratio > 0 needs data.pretrain_mix.path")
        if self.data.kind == "text" and self.data.pretrain_mix.path:
            raise ConfigError("data.pretrain_mix makes no sense when data.kind is text; remove it")

    def paths(self) -> dict[str, str]:
        return source_paths(self.data, ("train", "eval", "pretrain_mix")) | model_paths(self.model, "model")
