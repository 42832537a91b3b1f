"""YAML -> typed config: strict precedence (dataclass defaults -> YAML file -> `--set a.b=c` overrides), every value
coerced to its field's annotated type, unknown keys rejected with a did-you-mean; and back (to_dict, save_config)."""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.config.errors import ConfigError
from rlhf.config.schema import STAGES


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` (as YAML read it) checked and converted to the annotated type `tp` of config key `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{key} (in {source})"
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads off/on/no/yes as booleans: map back to the choice spelled that way (progress: off)
            words = ("true", "on", "yes", "y") if value else ("false", "off", "no", "n")
            spelled = [a for a in args if isinstance(a, str) and a.lower() in words]
            if len(spelled) == 1:
                value = spelled[0]
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key, source): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    return _coerce_scalar(value, tp, where)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """bool, int, float or str: no silent casts beyond a whole float to int and a number to str."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):  # nan slips through every range check; inf means nothing
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    """An instance of the config dataclass `cls`: its defaults with `data`'s keys coerced and set."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    base = cls()
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {full!r} in {source}{hint} (known: {', '.join(names)})")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            # Merge into the stage's own default for this section, so defaults set by the stage survive.
            merged = dataclasses.asdict(getattr(base, key))
            kwargs[key] = _build(hints[key], deep_merge(merged, value), full, source)
        else:
            kwargs[key] = _coerce(value, hints[key], full, source)
    return dataclasses.replace(base, **kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    """`base` with `update`'s keys set; sections (dicts) present in both are merged key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value parsed as YAML, so 1e-4, true, [1, 2] and {k: v} all work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses what a reader of the file would misread: a key given twice (PyYAML keeps the last
    silently), and YAML 1.1 scalars that do not read as they look — `1:30` (the integer 90), `010` (8), `1_000`
    (1000) and unquoted dates. Each raises with the line and the fix."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys it brings may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, collections.abc.Hashable):
            continue  # construct_mapping below reports it
        if key in seen:
            raise _Misread(
                f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (also on line {seen[key]}); PyYAML "
                "would keep only the last one. Delete one of them"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


def _literal_number(loader: _StrictLoader, node: yaml.ScalarNode):
    text = node.value
    body = text.lstrip("+-")
    if ":" in body or "_" in body or (len(body) > 1 and body[0] == "0" and body[1].isdigit()):
        value = loader.construct_yaml_int(node) if node.tag.endswith(":int") else loader.construct_yaml_float(node)
        raise _Misread(
            f"line {node.start_mark.line + 1}: {text!r} reads as the number {value!r} in YAML 1.1; quote it "
            f"('{text}') if it is text, or write the number plainly"
        )
    return loader.construct_yaml_int(node) if node.tag.endswith(":int") else loader.construct_yaml_float(node)


def _no_dates(loader: _StrictLoader, node: yaml.ScalarNode):
    raise _Misread(
        f"line {node.start_mark.line + 1}: {node.value!r} reads as a date in YAML; quote it ('{node.value}')"
    )


class _Misread(Exception):
    """A YAML scalar or key a reader would misread (raised inside the loader, turned into a ConfigError)."""


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _literal_number)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _literal_number)
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _no_dates)


def read_yaml(source: str) -> dict:
    """The top-level mapping of the YAML file `source`; a missing, unreadable or non-mapping file raises."""
    p = Path(source)
    if p.is_dir():
        yamls = sorted(x.name for x in p.glob("*.yaml"))[:6]
        raise ConfigError(
            f"config file {source} is a directory; name one YAML in it" + (f" ({', '.join(yamls)})" if yamls else "")
        )
    if not p.is_file():
        raise ConfigError(f"config file {source} does not exist")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except _Misread as e:
        raise ConfigError(f"{source}, {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source} is not valid UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


RUN_ROOT = "${run_root}"
RECIPE_FILE = "recipe.yaml"


def recipe_run_root(folder: str | Path) -> str | None:
    """The `run_root` of the recipe.yaml in `folder` (None without one): where every stage of the recipe writes."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    value = read_yaml(str(path)).get("run_root")
    return None if value is None else str(value)


def split_run_root(overrides: list[str]) -> tuple[str | None, list[str]]:
    """(the value of a `--set run_root=DIR`, the other overrides): run_root is the recipe's, not a config key."""
    run_root, rest = None, []
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and key.strip() == "run_root":
            run_root = value.strip()
        else:
            rest.append(text)
    return run_root, rest


def expand_run_root(tree: Any, run_root: str | None, source: str, key: str = "") -> Any:
    """Every `${run_root}` in the strings of `tree` replaced by `run_root`; one with no run_root set is an error
    naming the key."""
    if isinstance(tree, dict):
        return {k: expand_run_root(v, run_root, source, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [expand_run_root(v, run_root, source, f"{key}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, str) and RUN_ROOT in tree:
        if run_root is None:
            raise ConfigError(
                f"{key} (in {source}) uses {RUN_ROOT}, but no {RECIPE_FILE} beside the config sets run_root: add "
                f"one, or pass --set run_root=DIR"
            )
        return tree.replace(RUN_ROOT, run_root.rstrip("/") or "/")
    return tree


def load_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults -> YAML file -> `--set` overrides; `${run_root}` expanded (`--set run_root=DIR`, else the recipe.yaml
    beside the file); validated. Raises ConfigError naming the key and the file."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of {sorted(STAGES)}")
    data: dict = {}
    source = "<defaults>"
    run_root, overrides = split_run_root(list(overrides or []))
    if path is not None:
        source = str(path)
        data = read_yaml(source)
        if run_root is None:
            run_root = recipe_run_root(Path(path).parent)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    label = source + (" with --set overrides" if overrides else "")
    data = expand_run_root(data, run_root, label)
    cfg = _build(STAGES[stage], data, "", label)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{e} (in {label})") from None
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as nested plain dicts and lists (what save_config writes)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (readable by load_config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def load_function(spec: str, key: str):
    """'module:function' named by config key `key` -> the callable (e.g. (prompt, response) -> float)."""
    module_name, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key} {spec!r} cannot be imported: {e}") from None
