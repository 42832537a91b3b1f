"""A resumed run is the run it resumes: the checkpoint's config against the new one, before any work.

Keys that make a different run (model, data, seed, batch sizes, the algorithm's settings...) stop the run with
the changed keys listed and the ways out; keys that are safe to change (logging, evaluation and checkpoint cadence,
a longer or shorter run) are taken with a one-line notice. `rlhf.config.changes` says which key is which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rlhf.config import ConfigError, deep_merge, to_dict
from rlhf.config.changes import config_changes, split_for_resume
from rlhf.runtime.checkpoints import checkpoint_dirs, checkpoint_problem
from rlhf.runtime.devices import launched_rank


def resume_candidate(cfg: Any) -> Path | None:
    """The checkpoint `resume:` would take (the newest complete one for `auto`), or None for a fresh start."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume)
    usable = [c for c in checkpoint_dirs(cfg.output_dir) if checkpoint_problem(c) is None]
    return usable[-1] if usable else None


def check_resume(cfg: Any, source: str, stage: str, dry_run: bool = False) -> None:
    """Refuse to resume from a checkpoint whose config differs from `cfg` in a key that makes another run.

    Raises ConfigError naming each refused key (old -> new) and the ways out; prints a notice for allowed
    changes. A checkpoint without a readable config.yaml is left to the resume itself to judge."""
    ckpt = resume_candidate(cfg)
    saved = ckpt / "config.yaml" if ckpt is not None else None
    if saved is None or not saved.is_file():
        return
    # a key the checkpoint's version did not have yet counts as its default: an upgrade alone is not another run
    old = deep_merge(to_dict(type(cfg)()), yaml.safe_load(saved.read_text()) or {})
    allowed, refused = split_for_resume(config_changes(old, to_dict(cfg)))
    if refused and cfg.resume_changes != "allow":
        listed = "; ".join(str(c) for c in refused)
        raise ConfigError(
            f"{source}: {ckpt} was made by another config ({listed}). Resuming would mix two runs in one "
            f"final/. Use a new output_dir, or set resume: never to start over in {cfg.output_dir}, or set "
            "resume_changes: allow if you mean to continue this run with the new values"
        )
    if (allowed or refused) and launched_rank() == 0:
        taken = "; ".join(str(c) for c in allowed + refused)
        verb = "would resume" if dry_run else "resuming"
        print(f"[{stage}] {verb} from {ckpt} with changed settings: {taken}", flush=True)
