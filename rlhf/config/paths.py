"""Filesystem checks run before any model loads: every local path a config reads exists and is what its key needs
(a model dir, a tokenizer dir, a data file or a `save_to_disk` dir; hub names pass through to where they load), and
every path it writes can be written without touching what it reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf.config.errors import ConfigError
from rlhf.config.schema.common import ModelConfig


def looks_local(path: str) -> bool:
    """True for strings that can only mean a local path (so a missing one is an error, not a hub name).

    Hub ids are "name" or "org/name", so a single "/" alone is not enough to call something a path."""
    return (
        path.startswith(("/", "./", "../", "~", "runs/"))
        or path.endswith((".json", ".jsonl", ".parquet", ".yaml"))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
    )


# what a local dir must hold to load as a model, a tokenizer or a dataset
ENSEMBLE_FILE = "ensemble.json"  # in a reward-model ensemble's final/: its members, relative to it
MODEL_CONFIG_FILES = ("config.json", "adapter_config.json", ENSEMBLE_FILE)  # a model, a peft adapter, an RM ensemble
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
DATASET_DIR_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
MODEL_KEYS = ("sft", "policy", "reward_model", "proxy_reward_model")  # eval's model dirs (run_dir is a run)


def check_paths(cfg: Any, source: str = "<config>") -> None:
    """Fail before any model loads when a local path named by the config does not exist or is not what its key
    needs: a model dir with its config, weights and tokenizer (or a `tokenizer:` key); a tokenizer dir with
    tokenizer files; a data file of a readable type or a `save_to_disk` dir. Each error names the key, the path,
    the config file and the fix."""
    paths = cfg.paths()
    for key, path in paths.items():
        if not path:
            raise ConfigError(f"{key} is empty in {source}: set it to a model dir or hub name")
        if not looks_local(path) and not Path(path).expanduser().exists():
            continue  # a hub name: checked where it loads
        local = Path(path).expanduser()
        if not local.exists():
            raise ConfigError(
                f"{key} = {path!r} (from {source}) does not exist; run the stage that produces it first, "
                "or fix the path"
            )
        where = f"{key} = {path!r} (from {source})"
        if key.endswith(".name_or_path") or key in MODEL_KEYS:
            prefix = key.removesuffix(".name_or_path")
            model = _model_config_at(cfg, prefix) if key.endswith(".name_or_path") else None
            _check_model_dir(local, where, f"{prefix}.tokenizer" in paths, model, prefix)
        elif key.endswith(".tokenizer"):
            if not local.is_dir() or not _has_any(local, TOKENIZER_FILES):
                raise ConfigError(
                    f"{where} is not a tokenizer dir (none of {', '.join(TOKENIZER_FILES)}): point it at a dir "
                    "written by tokenizer.save_pretrained, e.g. a stage's final/"
                )
        elif key.endswith(".path"):
            _check_data_path(local, where)
        elif key == "run_dir" and not (local / "final").is_dir() and not any(local.glob("checkpoint-*")):
            raise ConfigError(
                f"{where} holds no final/ and no checkpoint-*/: point run_dir at a PPO output_dir (or use policy:)"
            )
    check_outputs(cfg, source)


def check_outputs(cfg: Any, source: str = "<config>") -> None:
    """Fail before any work when the run could not write where it writes, or would write into what it reads:
    output_dir a file, under a file or unwritable; output_dir inside an input (a model dir, a data dir); an input
    inside this run's own final/ or checkpoints (which the run replaces); `resume:` naming no dir."""
    where = f"output_dir = {cfg.output_dir!r} (from {source})"
    if not cfg.output_dir.strip():
        raise ConfigError(f"output_dir is empty in {source}: set it to the dir this run writes")
    out = Path(cfg.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where} is a file; the run writes a dir there: point output_dir at a new dir")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{where} lies under {existing}, which is a file: point output_dir elsewhere")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {existing} is not writable; make it writable or point output_dir elsewhere")
    owned = [out / "final", *out.glob("checkpoint-*")]  # what this run replaces
    for key, path in cfg.paths().items():
        if not path or not Path(path).expanduser().exists():
            continue
        local = Path(path).expanduser().absolute()
        if local == out or local in out.parents:
            raise ConfigError(
                f"{where} is inside {key} = {path!r}: the run would write into its own input; use a separate "
                "output_dir (e.g. a sibling dir)"
            )
        if any(local == o or o in local.parents for o in owned):
            raise ConfigError(
                f"{key} = {path!r} (from {source}) lies in this run's own output ({cfg.output_dir}), which the run "
                "replaces: point output_dir elsewhere, or copy the input out first"
            )
    resume = getattr(cfg, "resume", "auto")
    if resume not in ("auto", "never") and not Path(resume).expanduser().is_dir():
        raise ConfigError(
            f"resume = {resume!r} (from {source}) is not a checkpoint dir: use auto, never, or a checkpoint-<step> dir"
        )


def _model_config_at(cfg: Any, prefix: str) -> ModelConfig | None:
    value = cfg
    for name in prefix.split("."):
        value = getattr(value, name, None)
    return value if isinstance(value, ModelConfig) else None


def _has_any(directory: Path, names: tuple[str, ...]) -> bool:
    return any((directory / n).is_file() for n in names)


def _check_model_dir(path: Path, where: str, has_tokenizer_key: bool, model: ModelConfig | None, prefix: str):
    if not path.is_dir():
        raise ConfigError(f"{where} is a file, not a model dir: point it at the dir holding config.json")
    if not _has_any(path, MODEL_CONFIG_FILES):
        raise ConfigError(
            f"{where} has no config.json (nor adapter_config.json / {ENSEMBLE_FILE}): not a saved model; point it at "
            "a stage's final/ or a dir written by save_pretrained"
        )
    if (path / ENSEMBLE_FILE).is_file():
        return  # an RM ensemble: its members are checked where they load
    from_config = model is not None and model.from_config
    if not from_config and not any(next(path.glob(g), None) for g in WEIGHT_GLOBS):
        raise ConfigError(
            f"{where} has a config but no weights (*.safetensors / *.bin): point it at the saved model, or set "
            f"{prefix}.from_config: true to start from random weights"
        )
    if not has_tokenizer_key and not _has_any(path, TOKENIZER_FILES):
        key = f"{prefix}.tokenizer" if model is not None else "the model dir"
        raise ConfigError(
            f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): set {key} to a tokenizer dir or hub "
            "name, or save the tokenizer into the model dir"
        )


def _check_data_path(path: Path, where: str) -> None:
    if path.is_dir():
        if not _has_any(path, DATASET_DIR_FILES) and not any(
            (d / "dataset_info.json").is_file() for d in path.iterdir() if d.is_dir()
        ):
            raise ConfigError(
                f"{where} is a dir but not a dataset written by datasets' save_to_disk (no dataset_info.json / "
                "dataset_dict.json): point it at a .json, .jsonl or .parquet file or a save_to_disk dir"
            )
    elif not path.name.endswith(DATA_SUFFIXES):
        raise ConfigError(f"{where}: unsupported file type; use .json, .jsonl, .parquet or a save_to_disk dir")
