"""The stages' entry points in one place: `rlhf <stage>`, `rlhf pipeline` and the scripts all run a stage here.

A new stage = one line in STAGE_ENTRY_POINTS (module, function(cfg, source) -> Path | dict) and its config
dataclass in `rlhf.config`; the CLI and the pipeline pick it up from here, so neither imports the other.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from rlhf.config import check_paths, load_config

# stage -> (module, entry point called with the loaded config and the config file's path)
STAGE_ENTRY_POINTS = {
    "sft": ("rlhf.sft", "train"),
    "rm": ("rlhf.reward", "train"),
    "dpo": ("rlhf.dpo", "train"),
    "ppo": ("rlhf.ppo", "train"),
    "eval": ("rlhf.evaluate", "run"),
}


def run_stage(stage: str, config: str, overrides: list[str], dry_run: bool = False) -> Path | None:
    """Load (and validate) `config` with `overrides` for `stage`, check its paths and run it; with dry_run only
    validate. Returns what the stage returns (its final/ dir, or eval's result)."""
    cfg = load_config(stage, config, overrides)
    if dry_run:
        print(f"[{stage}] {config}: config OK")
        return None
    check_paths(cfg, config)
    module, name = STAGE_ENTRY_POINTS[stage]
    return getattr(importlib.import_module(module), name)(cfg, config)
