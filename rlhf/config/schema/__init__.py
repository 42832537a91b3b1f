"""The config dataclasses: the shared sections (common) and one module per stage; STAGES maps a stage's CLI name
to its config class."""

from __future__ import annotations

from rlhf.config.schema.common import (
    CheckpointConfig,
    CollapseLimits,
    FormatConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TextSource,
    TrainConfig,
)
from rlhf.config.schema.dpo import DPOConfig, DPOData, DPOLoss
from rlhf.config.schema.evaluation import EvalConfig
from rlhf.config.schema.ppo import (
    CollapseGuard,
    EMAConfig,
    KLConfig,
    PPOConfig,
    PPOData,
    PPOHyper,
    PPOModels,
    PtxConfig,
    RewardShaping,
    RolloutConfig,
    uses_critic,
)
from rlhf.config.schema.rm import RMConfig, RMData, RMEnsemble, RMLoss
from rlhf.config.schema.sft import SFTConfig, SFTData

STAGES: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "eval": EvalConfig}

__all__ = [
    "STAGES",
    "CheckpointConfig",
    "CollapseGuard",
    "CollapseLimits",
    "DPOConfig",
    "DPOData",
    "DPOLoss",
    "EMAConfig",
    "EvalConfig",
    "FormatConfig",
    "KLConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOConfig",
    "PPOData",
    "PPOHyper",
    "PPOModels",
    "PtxConfig",
    "RMConfig",
    "RMData",
    "RMEnsemble",
    "RMLoss",
    "RewardShaping",
    "RolloutConfig",
    "SFTConfig",
    "SFTData",
    "TextSource",
    "TrainConfig",
    "uses_critic",
]
