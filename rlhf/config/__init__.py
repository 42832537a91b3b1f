"""Typed configs: one dataclass per stage, nested by concern, loaded from YAML with `--set` overrides.

Precedence is strict: dataclass defaults -> YAML file -> `--set a.b=c` overrides. Unknown keys (with a
did-you-mean), wrong types and impossible values raise `ConfigError` naming the key and the file before
any model is loaded. Every field carries a one-line docstring (the string literal under it); defaults
follow InstructGPT (arXiv 2203.02155) and the N+ implementation details of RLHF with PPO.

Layout: schema/ (the dataclasses: common sections, one module per stage, STAGES), validation (cross-field checks
the stages share), paths (filesystem checks before any model loads), loading (YAML, `--set`, coercion, saving),
docs (the docs/config.md generator). Torch-free at import; imports nothing above the algorithms layer.
"""

from rlhf.config.errors import ConfigError
from rlhf.config.loading import load_config, load_function, parse_override, save_config, to_dict
from rlhf.config.paths import (
    DATA_SUFFIXES,
    DATASET_DIR_FILES,
    ENSEMBLE_FILE,
    MODEL_CONFIG_FILES,
    MODEL_KEYS,
    TOKENIZER_FILES,
    WEIGHT_GLOBS,
    check_paths,
    looks_local,
)
from rlhf.config.schema import (
    STAGES,
    CheckpointConfig,
    CollapseGuard,
    CollapseLimits,
    DPOConfig,
    DPOData,
    DPOLoss,
    EMAConfig,
    EvalConfig,
    FormatConfig,
    KLConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PPOConfig,
    PPOData,
    PPOHyper,
    PPOModels,
    PtxConfig,
    RewardShaping,
    RMConfig,
    RMData,
    RMEnsemble,
    RMLoss,
    RolloutConfig,
    SFTConfig,
    SFTData,
    TextSource,
    TrainConfig,
    uses_critic,
)
from rlhf.config.validation import TRACKERS

__all__ = [
    "DATASET_DIR_FILES",
    "DATA_SUFFIXES",
    "ENSEMBLE_FILE",
    "MODEL_CONFIG_FILES",
    "MODEL_KEYS",
    "STAGES",
    "TOKENIZER_FILES",
    "TRACKERS",
    "WEIGHT_GLOBS",
    "CheckpointConfig",
    "CollapseGuard",
    "CollapseLimits",
    "ConfigError",
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
    "check_paths",
    "load_config",
    "load_function",
    "looks_local",
    "parse_override",
    "save_config",
    "to_dict",
    "uses_critic",
]
