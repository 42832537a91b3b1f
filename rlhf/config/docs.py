"""The config reference (docs/config.md), generated from the stage dataclasses: every key, its type, its default,
its allowed values and the field's docstring. `python -m rlhf.config.docs > docs/config.md` (`make config-docs`)
writes it; tests/test_config_docs.py fails when the file is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal

from rlhf.config import STAGES

HEADER = """# Config reference

Every key of every stage, generated from the dataclasses in `rlhf/config/schema/` (`make config-docs`; a test
fails when this file is stale). A stage's YAML sets any of these; `--set key=value` overrides one on the command
line; `rlhf <stage> --config X --print-config` prints the resolved config with every default filled in. Keys are
dotted paths into the YAML (`optim.lr` is `lr:` under `optim:`).
"""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal right after its declaration} for a dataclass (and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def type_name(tp: Any) -> str:
    """A field's type as a reader writes it: int, float, str, bool, list[str], one of (...), or optional."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def rows(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field of a config dataclass, depth first; nested dataclasses
    (whose defaults may differ per stage, e.g. an optimizer's LR) are read from the stage's default instance."""
    instance = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(rows(type(value), key + ".", value))
            continue
        shown = "`null`" if value is None else "`''`" if value == "" else f"`{value}`"
        out.append((key, type_name(hints[f.name]), shown, docs.get(f.name, "")))
    return out


# the sections several stages share: documented once, each stage's table links to them
def shared_sections() -> dict[type, str]:
    from rlhf.config.schema.common import (
        CheckpointConfig,
        CollapseLimits,
        FormatConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        TextSource,
        TrainConfig,
    )

    return {
        ModelConfig: "model",
        OptimConfig: "optim",
        TrainConfig: "train",
        CheckpointConfig: "checkpoint",
        LoggingConfig: "logging",
        TextSource: "data source",
        FormatConfig: "format",
        CollapseLimits: "collapse limits",
    }


# per stage, the keys a new run changes first (the rest keep their defaults in the shipped recipes)
FIRST_KEYS = {
    "sft": [
        "output_dir",
        "model.name_or_path",
        "data.train.path",
        "train.max_steps",
        "train.batch_size",
        "train.micro_batch_size",
        "optim.lr",
        "data.format.max_length",
    ],
    "rm": [
        "output_dir",
        "model.name_or_path",
        "data.train.path",
        "ensemble.size",
        "train.batch_size",
        "train.micro_batch_size",
        "optim.lr",
    ],
    "dpo": [
        "output_dir",
        "model.name_or_path",
        "data.train.path",
        "beta",
        "reference",
        "train.batch_size",
        "optim.lr",
    ],
    "ppo": [
        "output_dir",
        "models.policy.name_or_path",
        "models.reward.name_or_path",
        "data.prompts.path",
        "train.max_steps",
        "train.batch_size",
        "ppo.mini_batch_size",
        "ppo.micro_batch_size",
        "rollout.max_new_tokens",
        "kl.target",
        "ppo.advantage",
        "ptx.ptx_coef",
    ],
    "eval": ["output_dir", "run_dir", "sft", "reward_model", "prompts.path", "num_prompts"],
}


def _anchor(title: str) -> str:
    return "#" + "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c == "-")


def _table(entries: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | what it is |", "|---|---|---|---|"]
    for key, tp, default, doc in entries:
        cell = doc.replace("|", "\\|")
        lines.append(f"| `{key}` | {tp.replace('|', '/')} | {default.replace('|', '/')} | {cell} |")
    return lines


def _stage_rows(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """A stage's own keys; a field holding a shared section is one row linking to it, naming the defaults this
    stage sets differently."""
    shared = shared_sections()
    instance = defaults if defaults is not None else cls()
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, value = prefix + f.name, getattr(instance, f.name)
        if type(value) in shared:
            name = shared[type(value)]
            own = {k: d for k, _, d, _ in rows(type(value))}
            here = [f"`{k}` = {d}" for k, _, d, _ in rows(type(value), "", value) if own.get(k) != d]
            doc = docs.get(f.name, "")
            doc = (
                (doc + " " if doc else "")
                + f"The [{name}]({_anchor(name)}) section"
                + (f"; defaults here: {', '.join(here)}." if here else ".")
            )
            out.append((key, "section", "", doc))
        elif dataclasses.is_dataclass(value):
            out.extend(_stage_rows(type(value), key + ".", value))
        else:
            out.extend([r for r in rows(cls, prefix, instance) if r[0] == key])
    return out


def render() -> str:
    """The whole reference as markdown: the keys changed first, the shared sections once, then each stage's own."""
    parts = [HEADER, "\n## The keys changed first\n"]
    for stage, cls in STAGES.items():
        table = {k: (t, d, doc) for k, t, d, doc in rows(cls)}
        picks = ", ".join(f"`{k}` ({table[k][1]})" for k in FIRST_KEYS.get(stage, []) if k in table)
        parts.append(f"- **`rlhf {stage}`**: {picks}")
    parts.append("\n## Shared sections\n")
    parts.append(
        "Several stages hold these; each is documented once. A stage may set other defaults (its table says)."
    )
    for cls, name in shared_sections().items():
        parts.append(f"\n### {name}\n")
        parts.extend(_table(rows(cls)))
    for stage, cls in STAGES.items():
        parts.append(f"\n## `rlhf {stage}` ({cls.__name__})\n")
        parts.extend(_table(_stage_rows(cls)))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
