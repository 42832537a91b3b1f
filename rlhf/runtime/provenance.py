"""Provenance: what made a stage's output, recorded next to it so a later run can tell whether it is still current.

`provenance.json` sits in `<output_dir>/` (written when the stage starts) and in `final/` (published with the
weights). It holds the resolved config, a fingerprint of each input the config names (`cfg.paths()`: the upstream
`final/`, data files or dataset dirs, the base model), the versions of the package and its libraries, and the git
commit of the code when it runs from a checkout. `rlhf pipeline` compares a stage's record with what it would run
now (`stale_reasons`) and re-runs the stage only when they differ in something that changes the result.

Fingerprints: a file is hashed whole (SHA-256); a directory that holds a `provenance.json` (another stage's output)
is fingerprinted by that record's digest, so a re-made upstream stage changes every stage after it; any other
directory by the names, sizes and hashes of its files (files over LARGE_FILE bytes by name, size and mtime, so a
multi-GB base model is not read whole on every pipeline run); a name that is not a local path (a hub model or
dataset) by the name itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf.config import to_dict
from rlhf.config.changes import Change, config_changes, result_changes

PROVENANCE_FILE = "provenance.json"
LARGE_FILE = 256 * 1024 * 1024
RACY_SECONDS = 2
LIBRARIES = ("rlhf", "torch", "transformers", "accelerate", "peft", "datasets", "tokenizers")


def _sha256_file(path: Path) -> str:
    """A file's SHA-256, read once per (path, size, mtime) in a process: `rlhf pipeline` fingerprints a stage's
    inputs to decide, then again to record them. A file modified in the last RACY_SECONDS is read again: two writes
    within one tick of the file system's clock leave the same mtime (git's "racy" files)."""
    stat = path.stat()
    if time.time_ns() - stat.st_mtime_ns < RACY_SECONDS * 1_000_000_000:
        return _sha256_of.__wrapped__(str(path), stat.st_size, stat.st_mtime_ns)
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str) -> str:
    """A short stable text that changes when the input at `path` changes (see the module docstring)."""
    local = Path(path).expanduser()
    if not local.exists():
        return f"name:{path}"
    if local.is_file():
        return f"sha256:{_sha256_file(local)}"
    record = local / PROVENANCE_FILE
    if record.is_file():
        return f"run:{json.loads(record.read_text()).get('digest', _sha256_file(record))}"
    digest = hashlib.sha256()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        stat = f.stat()
        content = f"mtime:{stat.st_mtime_ns}" if stat.st_size > LARGE_FILE else _sha256_file(f)
        digest.update(f"{f.relative_to(local)}\0{stat.st_size}\0{content}\n".encode())
    return f"dir:{digest.hexdigest()}"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_commit() -> str | None:
    """The commit of the checkout the package runs from (with "+dirty" for uncommitted changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _digest(stage: str, config: dict, inputs: dict[str, str]) -> str:
    """What identifies the result: the stage, the config's result-changing keys and the inputs' fingerprints."""
    changes = result_changes(config_changes({}, config))  # every result-changing key, as a change from nothing
    payload = {"stage": stage, "config": {c.key: c.new for c in changes}, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def record(stage: str, cfg: Any) -> dict:
    """The provenance of a run of `stage` with the resolved config `cfg` as of now."""
    config = to_dict(cfg)
    paths = {key: path for key, path in sorted(cfg.paths().items()) if path}
    inputs = {key: fingerprint(path) for key, path in paths.items()}
    return {
        "stage": stage,
        "digest": _digest(stage, config, inputs),
        "config": config,
        "inputs": {key: {"path": paths[key], "fingerprint": fp} for key, fp in inputs.items()},
        "versions": _versions(),
        "git_commit": _git_commit(),
    }


def write(directory: str | Path, provenance: dict) -> Path:
    """Write `provenance.json` into `directory` (atomically: a reader never sees half a record)."""
    path = Path(directory) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(PROVENANCE_FILE + ".tmp")
    tmp.write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read(directory: str | Path) -> dict | None:
    path = Path(directory) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def stale_reasons(recorded: dict, current: dict) -> list[str]:
    """Why an output made under `recorded` is not what `current` would make: the changed result-changing keys
    (old -> new) and the inputs whose content changed. Empty: the output is current."""
    reasons = [str(c) for c in result_changes(config_changes(recorded["config"], current["config"]))]
    old_inputs, new_inputs = recorded.get("inputs", {}), current["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        old, new = old_inputs.get(key), new_inputs.get(key)
        if old is None or new is None:
            continue  # the key itself appeared or went: the config change above names it
        if old["fingerprint"] != new["fingerprint"]:
            reasons.append(f"{key} ({new['path']}) changed content")
    return reasons


__all__ = ["PROVENANCE_FILE", "Change", "fingerprint", "read", "record", "stale_reasons", "write"]
