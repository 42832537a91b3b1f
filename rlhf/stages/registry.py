"""The stages' entry points in one place: `rlhf <stage>`, `rlhf pipeline` and the scripts all run a stage here.

A new stage = one line in STAGE_ENTRY_POINTS (module, function(cfg, source) -> Path | dict) and its config
dataclass in `rlhf.config`; the CLI and the pipeline pick it up from here, so neither imports the other.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from rlhf.config import check_paths, load_config, to_dict
from rlhf.runtime import provenance
from rlhf.runtime.devices import launched_rank
from rlhf.runtime.run_identity import check_resume

# stage -> (module, entry point called with the loaded config and the config file's path)
STAGE_ENTRY_POINTS = {
    "sft": ("rlhf.stages.sft", "train"),
    "rm": ("rlhf.stages.reward_model", "train"),
    "dpo": ("rlhf.stages.dpo", "train"),
    "ppo": ("rlhf.stages.ppo", "train"),
    "eval": ("rlhf.stages.evaluate", "run"),
}


def run_stage(
    stage: str, config: str, overrides: list[str], dry_run: bool = False, print_config: bool = False
) -> Path | None:
    """Load (and validate) `config` with `overrides` for `stage`, check every path it reads and writes, refuse a
    resume of another run, record the run's provenance in output_dir and run it. With print_config: print the
    resolved config (every default filled in) as YAML and stop; with dry_run: stop after the checks. Returns what
    the stage returns (its final/ dir, or eval's result)."""
    cfg = load_config(stage, config, overrides)
    if print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return None
    check_paths(cfg, config)
    if hasattr(cfg, "resume"):
        check_resume(cfg, config, stage, dry_run=dry_run)
    if dry_run:
        print(f"[{stage}] {config}: config OK, paths OK; would write {cfg.output_dir}")
        return None
    if launched_rank() == 0:  # every process loads the config; one records what made the run
        provenance.write(cfg.output_dir, provenance.record(stage, cfg))
    module, name = STAGE_ENTRY_POINTS[stage]
    return getattr(importlib.import_module(module), name)(cfg, config)
