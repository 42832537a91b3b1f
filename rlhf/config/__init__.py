"""Typed configs: one dataclass per stage, nested by concern, loaded from YAML with `--set` overrides.

Precedence is strict: dataclass defaults -> YAML file -> `--set a.b=c` overrides. Unknown keys (with a
did-you-mean), wrong types and impossible values raise `ConfigError` naming the key and the file before
any model is loaded. Every field carries a one-line docstring (the string literal under it); defaults
follow InstructGPT (arXiv 2203.02155) and the N+ implementation details of RLHF with PPO.

Layout: schema/ (the dataclasses: common sections, one module per stage, STAGES), validation (cross-field checks
the stages share), paths (filesystem checks before any model loads), loading (YAML, `--set`, coercion, saving),
docs (the docs/config.md generator). Torch-free at import; imports nothing above the algorithms layer.
"""

from rlhf.config import schema
from rlhf.config.errors import ConfigError
from rlhf.config.loading import (
    RUN_ROOT,
    deep_merge,
    expand_run_root,
    load_config,
    load_function,
    parse_override,
    read_yaml,
    recipe_run_root,
    save_config,
    split_run_root,
    to_dict,
)
from rlhf.config.paths import (
    DATA_SUFFIXES,
    DATASET_DIR_FILES,
    ENSEMBLE_FILE,
    MODEL_CONFIG_FILES,
    MODEL_KEYS,
    TOKENIZER_FILES,
    WEIGHT_GLOBS,
    check_outputs,
    check_paths,
    looks_local,
)
from rlhf.config.schema import *  # noqa: F403 (the dataclasses, re-exported: __all__)
from rlhf.config.validation import TRACKERS

__all__ = [
    "DATA_SUFFIXES",
    "DATASET_DIR_FILES",
    "ENSEMBLE_FILE",
    "MODEL_CONFIG_FILES",
    "MODEL_KEYS",
    "RUN_ROOT",
    "TOKENIZER_FILES",
    "TRACKERS",
    "WEIGHT_GLOBS",
    "check_outputs",
    "check_paths",
    "ConfigError",
    "deep_merge",
    "expand_run_root",
    "load_config",
    "load_function",
    "looks_local",
    "parse_override",
    "read_yaml",
    "recipe_run_root",
    "save_config",
    "split_run_root",
    "to_dict",
    *schema.__all__,
]
