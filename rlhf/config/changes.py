"""What changed between two resolved configs, and which changes leave a run the same run.

A resolved config is the dict `to_dict(cfg)` gives (and `config.yaml` holds). Two questions are asked of a change:
- does it change what the run computes? (`rlhf pipeline` re-runs a stage only when it does);
- may a run resumed from a checkpoint take it? (`resume: auto` refuses a different run rather than mix two runs in
  one `final/`).
Keys are classified by what they do, as dotted paths with `*` for any one level.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

# Keys that change what is logged, shown, checked or kept, never the trained weights: a re-run is not needed and a
# resume may take them.
RESULT_NEUTRAL = (
    "output_dir",  # where the run lives (a moved run is the same run)
    "resume",
    "resume_changes",
    "logging.*",
    "checkpoint.every",
    "checkpoint.keep_last",
    "train.eval_every",
    "train.eval_max_batches",
    "*.progress",
)

# Keys a resumed run may take although they change the result: how long the run goes on. The LR schedule's length
# follows them, so the steps after the checkpoint see the stretched schedule; the steps before are what they were.
RESUME_EXTENDS = ("train.max_steps", "train.epochs")


@dataclass(frozen=True)
class Change:
    """One key whose value differs: `key` dotted, `old`/`new` the two values (None where the key is absent)."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, path + ".")
        else:
            out[path] = value
    return out


def config_changes(old: dict, new: dict) -> list[Change]:
    """Every leaf key whose value differs between two resolved configs, sorted by key."""
    a, b = flatten(old), flatten(new)
    return [Change(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)  # `*` also spans dots: "logging.*" is the whole section


def result_changes(changes: list[Change]) -> list[Change]:
    """The changes that make the run compute something else (what `rlhf pipeline` re-runs a stage for)."""
    return [c for c in changes if not _matches(c.key, RESULT_NEUTRAL)]


def split_for_resume(changes: list[Change]) -> tuple[list[Change], list[Change]]:
    """(allowed, refused): what a resumed run may take (neutral keys, a longer run) and what makes another run.

    A shorter max_steps/epochs is allowed too: the run then stops at the new end (nothing already trained is
    undone)."""
    allowed = [c for c in changes if _matches(c.key, RESULT_NEUTRAL) or c.key in RESUME_EXTENDS]
    refused = [c for c in changes if c not in allowed]
    return allowed, refused
