"""Filesystem checks run before any model loads: every local path a config names exists and is what its key needs
(a model dir, a tokenizer dir, a data file or a `save_to_disk` dir); hub names pass through to where they load."""

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
