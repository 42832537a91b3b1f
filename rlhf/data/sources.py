"""Load and validate training rows for every pipeline stage.

`load_rows(source, kind)` reads a local ``.json`` / ``.jsonl`` / ``.parquet`` file, a directory written by
``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``: ``split`` picks the split), or a hub dataset name, and
returns a ``datasets.Dataset`` with the canonical columns of ``kind`` plus a `LoadReport`:

- ``"text"``:       text
- ``"sft"``:        prompt, completion, messages
- ``"preference"``: prompt, ranked (best first, >= 2 distinct responses), messages
- ``"prompts"``:    prompt, messages, reference (a gold answer for a verifiable reward; "" when the row has none)

``messages`` is always present (an empty list when a row has no chat context) so every row of a kind has one schema;
a consumer renders ``messages + [user: prompt]`` with its chat template (an empty prompt adds no user turn).
Source columns that are not canonical are dropped.

Accepted input shapes (after ``field_map`` renames source columns to canonical names):

- sft: ``{prompt, completion[, messages]}``, or chat ``{messages}`` whose last message is the assistant's ->
  prompt ``""``, completion = last assistant content, messages = the turns before it. A row with ``messages`` and
  no ``completion`` is chat even when it also has a ``prompt`` (UltraChat-200k: its prompt is the first user turn
  of the messages).
- preference:
  ``{prompt, ranked[, messages]}``; pairwise ``{prompt, chosen, rejected}`` -> ranked ``[chosen, rejected]``;
  chat pairs where chosen/rejected are message lists sharing everything but the final assistant message (an
  optional ``prompt`` message list is prepended to both) -> prompt = content of the last shared turn, which must be
  the user's, messages = the shared turns before it, ranked = the final assistant contents;
  raw Anthropic HH text (chosen/rejected strings, no prompt) -> parsed into turns at each ``"\\n\\nHuman:"`` /
  ``"\\n\\nAssistant:"``: the shared turns before the final answer become messages + prompt (the last human turn),
  the two final answers (stripped) become ranked — so a chat template renders HH exactly like the PPO prompts.
- prompts: ``{prompt[, messages]}``, or chat ``{messages}``: the prompt is the last user turn and the turns
  before it are the context; turns after it (a reference answer, as in UltraChat's ``train_gen``) are dropped.
  With both, a user turn of ``messages`` equal to ``prompt`` marks where the prompt is (UltraChat rows repeat the
  first user turn as ``prompt``); otherwise ``messages`` is the history before ``prompt``.

Ties: if a ranked list holds the same response string twice, the later copy is dropped (it carries no preference
signal and would make the ranking contradictory); ``LoadReport.ties_dropped`` counts dropped responses. A row left
with fewer than 2 responses is a bad row.

Bad rows raise `DataError` naming the source, the 0-based row index, the field, the problem and a fix. With
``on_bad_row="skip"`` they are skipped and counted in ``LoadReport.skipped`` under ``"<problem>:<field>"`` keys, e.g.
``"missing:completion"``, ``"wrong_type:prompt"``, ``"empty:text"``, ``"too_few_responses:ranked"``,
``"bad_messages:messages"``, ``"mismatched_prompt:chosen"``, ``"malformed_json"``, ``"not_an_object"``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets
import pyarrow.parquet as pq

from rlhf.config import looks_local


class DataError(ValueError):
    """A data source or one of its rows cannot be used; the message says where and how to fix it."""


KINDS = ("text", "sft", "preference", "prompts")
ON_BAD_ROW = ("error", "skip")
ROLES = ("system", "user", "assistant")
HH_MARKER = "\n\nAssistant:"
_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_STR = datasets.Value("string")
FEATURES = {
    "text": datasets.Features({"text": _STR}),
    "sft": datasets.Features({"prompt": _STR, "completion": _STR, "messages": _MESSAGES}),
    "preference": datasets.Features({"prompt": _STR, "ranked": datasets.List(_STR), "messages": _MESSAGES}),
    "prompts": datasets.Features({"prompt": _STR, "messages": _MESSAGES, "reference": _STR}),
}
# Canonical names a field_map may target, per kind (chosen/rejected are inputs that become `ranked`).
_MAPPABLE = {
    "text": ("text",),
    "sft": ("prompt", "completion", "messages"),
    "preference": ("prompt", "ranked", "chosen", "rejected", "messages"),
    "prompts": ("prompt", "messages", "reference"),
}
_SKIP_HINT = "or set data.format.on_bad_row: skip to skip such rows"


@dataclass
class LoadReport:
    """What `load_rows` did: rows read from the source, rows kept, skipped rows per reason, ties dropped."""

    source: str
    kind: str
    rows_read: int
    rows_kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    ties_dropped: int = 0


class _BadRow(Exception):
    """Internal: one row is unusable. `field` is canonical; load_rows maps it back to the source name."""

    def __init__(self, problem: str, name: str | None, what: str, fix: str):
        super().__init__(what)
        self.problem, self.field, self.what, self.fix = problem, name, what, fix


def load_rows(
    source: str,
    kind: str,
    *,
    split: str = "train",
    field_map: dict[str, str] | None = None,
    on_bad_row: str = "error",
    max_rows: int | None = None,
    subset: str = "",
) -> tuple[datasets.Dataset, LoadReport]:
    """Load `source` as rows of `kind` and return (canonical dataset, report).

    `split` is used for hub datasets and saved DatasetDicts only, `subset` (a hub dataset's config name, e.g.
    GSM8K's "main") for hub datasets only. `field_map` maps canonical field -> source column
    (e.g. ``{"prompt": "question", "completion": "answer"}``). `on_bad_row` is "error" (raise DataError on the first
    bad row) or "skip" (skip and count it). `max_rows` reads only the first `max_rows` source rows (bad ones count).
    Raises DataError for a missing/unreadable source, a bad row under "error", or when no usable row is left.
    """
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"data.format.on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise DataError(f"data.max_rows must be a positive integer or null, got {max_rows!r}")
    field_map = dict(field_map or {})
    unknown = sorted(set(field_map) - set(_MAPPABLE[kind]))
    if unknown:
        raise DataError(f"data.field_map keys {unknown} are not fields of kind {kind!r}; use {_MAPPABLE[kind]}")
    normalise = _NORMALISERS[kind]
    columns = {name: [] for name in FEATURES[kind]}
    skipped: Counter[str] = Counter()
    ties = rows_read = kept = 0
    for index, where, raw in _read_source(source, split, max_rows, subset):
        rows_read += 1
        try:
            if isinstance(raw, _BadRow):
                raise raw
            if not isinstance(raw, dict):
                raise _BadRow("not_an_object", None, f"is {_describe(raw)}, not an object", "make each row an object")
            row, row_ties = normalise(_apply_field_map(raw, field_map))
            _check_unicode(row)
        except _BadRow as bad:
            src_field = field_map.get(bad.field, bad.field) if bad.field else None
            if on_bad_row == "skip":
                skipped[f"{bad.problem}:{src_field}" if src_field else bad.problem] += 1
                continue
            subject = f"field {src_field!r} " if src_field else ""
            raise DataError(
                f"{source}: row {index}{where}: {subject}{bad.what}. Fix: {bad.fix}; {_SKIP_HINT}."
            ) from None
        ties += row_ties
        kept += 1
        for name, values in columns.items():
            values.append(row[name])
    report = LoadReport(source, kind, rows_read, kept, dict(skipped), ties)
    if rows_read == 0:
        raise DataError(f"{source}: holds no rows (empty file or dataset); point the config at the data you meant")
    if kept == 0:
        # An empty dataset would only fail later, far from the cause; say here what happened.
        raise DataError(f"{source}: no usable {kind!r} rows (read {rows_read}, skipped {report.skipped})")
    return datasets.Dataset.from_dict(columns, features=FEATURES[kind]), report


# ---------------------------------------------------------------------------------------------- reading sources


def _read_source(source: str, split: str, max_rows: int | None, subset: str = "") -> Iterator[tuple[int, str, object]]:
    """Yield (0-based row index, location suffix for messages, row object or _BadRow) from any source kind."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        rows = _read_saved_dataset(source, path, split, max_rows)
    elif os.path.isfile(path):
        if path.endswith(".parquet"):
            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several types for unreadable files
                raise DataError(f"{source}: cannot read parquet file: {type(e).__name__}: {e}") from e
            rows = (table if max_rows is None else table.slice(0, max_rows)).to_pylist()
        elif path.endswith(".jsonl"):
            return _read_json_lines(source, path, max_rows)
        elif path.endswith(".json"):
            return _read_json(source, path, max_rows)
        else:
            raise DataError(f"{source}: unsupported file type; use .json, .jsonl, .parquet or a save_to_disk dir")
    elif looks_local(source):
        # Never fall back to the hub for something that is clearly meant as a local path: the network error would
        # hide the real problem (a typo in the path).
        raise DataError(
            f"data source {source!r} does not exist (resolved to {os.path.abspath(path)}); it looks like a local "
            "path, so it was not tried as a hub dataset name. Check the path."
        )
    else:
        rows = _read_hub(source, split, max_rows, subset)
    return ((i, "", row) for i, row in enumerate(rows))


def _read_saved_dataset(source: str, path: str, split: str, max_rows: int | None) -> list:
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(f"{source}: directory is not a dataset written by save_to_disk ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: split {split!r} not found; available splits: {sorted(loaded)}")
        loaded = loaded[split]
    return _head(loaded, max_rows).to_list()


def _read_hub(source: str, split: str, max_rows: int | None, subset: str = "") -> list:
    try:
        loaded = (
            datasets.load_dataset(source, subset, split=split)
            if subset
            else datasets.load_dataset(source, split=split)
        )
    except Exception as e:  # any failure means "cannot use this name"; keep the cause in the message
        raise DataError(
            f"data source {source!r} is not an existing local path and could not be loaded as a hub dataset "
            f"(split={split!r}): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"hub dataset {source!r} split {split!r} did not load as a single Dataset")
    return _head(loaded, max_rows).to_list()


def _head(ds: datasets.Dataset, max_rows: int | None) -> datasets.Dataset:
    return ds if max_rows is None or max_rows >= len(ds) else ds.select(range(max_rows))


def _read_json(source: str, path: str, max_rows: int | None) -> Iterator[tuple[int, str, object]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{source}: not valid UTF-8 (byte 0x{raw[e.start]:02x} on line {line}); re-save the file as UTF-8"
        ) from None
    if not text.lstrip().startswith("["):
        return _read_json_lines(source, path, max_rows)  # a .json file holding JSON lines (or a single object)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return ((i, "", row) for i, row in enumerate(rows[:max_rows]))


def _read_json_lines(source: str, path: str, max_rows: int | None) -> Iterator[tuple[int, str, object]]:
    # Read line by line ourselves so errors can name the exact line; blank lines are not rows. Bytes are decoded per
    # line, so one badly encoded line is a bad row (skippable) rather than the end of the whole file.
    index = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                line = None
                bad = f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            if line is not None and not line.strip():
                continue
            if max_rows is not None and index >= max_rows:
                return
            if line is None:
                row: object = _BadRow("bad_encoding", None, bad, "re-save the file as UTF-8")
            else:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    row = _BadRow(
                        "malformed_json", None, f"is not valid JSON ({e.msg})", "put one JSON object per line"
                    )
            yield index, f" (line {lineno})", row
            index += 1


def _apply_field_map(raw: dict, field_map: dict[str, str]) -> dict:
    # Build a new dict so swaps like {"prompt": "completion", "completion": "prompt"} work.
    row = {k: v for k, v in raw.items() if k not in field_map.values()}
    row.update({canonical: raw[src] for canonical, src in field_map.items() if src in raw})
    return row


# ------------------------------------------------------------------------------------------ row normalisation


def _check_unicode(row: dict) -> None:
    """JSON may carry lone surrogates ("\\ud800") that no UTF-8 tokenizer or Arrow column accepts."""
    for name, value in row.items():
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for text in texts:
            for s in text.values() if isinstance(text, dict) else [text]:
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise _BadRow(
                        "bad_encoding", name, f"holds an invalid Unicode character ({e.reason})", "fix the text"
                    ) from None


def _describe(value: object) -> str:
    if value is None:
        return "null"
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40] + '...' if len(shown) > 40 else shown}"


def _text(row: dict, name: str, *, allow_empty: bool = False) -> str:
    if name not in row:
        raise _BadRow("missing", name, "is missing", f"add it, or map your column with data.field_map {{{name}: ...}}")
    value = row[name]
    if not isinstance(value, str):
        raise _BadRow("wrong_type", name, f"must be a string, got {_describe(value)}", "store it as a string")
    if not allow_empty and not value.strip():
        raise _BadRow("empty", name, "is empty or whitespace-only", "fill in the text or remove the row")
    return value


def _messages(value: object, name: str = "messages") -> list[dict]:
    fix = "use a list of {role: system|user|assistant, content: string} objects"
    if not isinstance(value, list):
        raise _BadRow("bad_messages", name, f"must be a list of messages, got {_describe(value)}", fix)
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _BadRow("bad_messages", name, f"item {j} is not a {{role, content}} object: {_describe(m)}", fix)
        if m["role"] not in ROLES:
            raise _BadRow("bad_messages", name, f"item {j} has role {m['role']!r}", fix)
        if not isinstance(m["content"], str):
            raise _BadRow("bad_messages", name, f"item {j} content is {_describe(m['content'])}", fix)
        out.append({"role": m["role"], "content": m["content"]})  # extra keys (e.g. "name") are dropped
    return out


def _split_chat(row: dict, name: str, last_role: str) -> tuple[list[dict], str]:
    """Split a chat into (context turns, final content), requiring the final turn to be from `last_role`."""
    msgs = _messages(row[name], name)
    if len(msgs) < 2 or msgs[-1]["role"] != last_role or not msgs[-1]["content"].strip():
        raise _BadRow(
            "bad_messages",
            name,
            f"must have earlier turns and end with a non-empty {last_role} message",
            f"make the last message the {last_role}'s",
        )
    return msgs[:-1], msgs[-1]["content"]


def _context(row: dict, prompt: str) -> list[dict]:
    messages = _messages(row["messages"]) if "messages" in row else []
    if not messages and not prompt.strip():
        raise _BadRow("empty", "prompt", "is empty and there are no messages", "fill in the prompt")
    return messages


def _norm_text(row: dict) -> tuple[dict, int]:
    return {"text": _text(row, "text")}, 0


def _norm_sft(row: dict) -> tuple[dict, int]:
    if "completion" not in row and "messages" in row:
        messages, completion = _split_chat(row, "messages", "assistant")
        return {"prompt": "", "completion": completion, "messages": messages}, 0
    prompt = _text(row, "prompt", allow_empty=True)  # may be empty when messages carry the context
    completion = _text(row, "completion")
    return {"prompt": prompt, "completion": completion, "messages": _context(row, prompt)}, 0


def _norm_prompts(row: dict) -> tuple[dict, int]:
    """A prompt row, plus its `reference` (a gold answer a verifiable reward checks against; "" when absent)."""
    reference = row.get("reference", "")
    if not isinstance(reference, str | int | float) or isinstance(reference, bool):
        raise _BadRow("wrong_type", "reference", f"must be text, got {_describe(reference)}", "map a text column")
    normalised, skipped = _norm_prompt_turns(row)
    return normalised | {"reference": str(reference)}, skipped


def _norm_prompt_turns(row: dict) -> tuple[dict, int]:
    if "messages" in row and (row.get("prompt") is None or isinstance(row.get("prompt"), str)):
        msgs = _messages(row["messages"])
        users = [i for i, m in enumerate(msgs) if m["role"] == "user" and m["content"].strip()]
        if "prompt" in row and row["prompt"] is not None:
            prompt = _text(row, "prompt")
            # UltraChat: `prompt` repeats a user turn of `messages`; the prompt ends there
            users = [i for i in users if msgs[i]["content"].strip() == prompt.strip()][:1]
            if not users:
                return {"prompt": prompt, "messages": msgs}, 0  # messages are the history before the prompt
        if not users:
            raise _BadRow("bad_messages", "messages", "has no non-empty user turn", "add the user's message")
        last = users[-1]
        return {"prompt": msgs[last]["content"], "messages": msgs[:last]}, 0
    prompt = _text(row, "prompt")
    return {"prompt": prompt, "messages": _context(row, prompt)}, 0


def _norm_preference(row: dict) -> tuple[dict, int]:
    messages: list[dict] = []
    if "ranked" in row:
        prompt = _text(row, "prompt", allow_empty=True)
        ranked = row["ranked"]
        if not isinstance(ranked, list):
            raise _BadRow("wrong_type", "ranked", f"must be a list of strings, got {_describe(ranked)}", "fix it")
        for j, response in enumerate(ranked):
            if not isinstance(response, str):
                raise _BadRow("wrong_type", "ranked", f"item {j} is {_describe(response)}", "use strings")
            if not response.strip():
                raise _BadRow("empty", "ranked", f"item {j} is empty or whitespace-only", "fill it in or drop it")
        messages = _context(row, prompt)
    elif isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        prompt, ranked, messages = _chat_pair(row)
    elif "prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
        prompt, ranked, messages = _hh_pair(row)
    elif "chosen" in row or "rejected" in row:
        ranked = [_text(row, "chosen"), _text(row, "rejected")]
        prompt = _text(row, "prompt", allow_empty=True)
        messages = _context(row, prompt)
    else:
        raise _BadRow("missing", "ranked", "is missing (and so are chosen/rejected)", "give ranked or chosen+rejected")
    unique = list(dict.fromkeys(ranked))  # keeps the first (better-ranked) copy of each response
    if len(unique) < 2:
        raise _BadRow(
            "too_few_responses",
            "ranked",
            f"has {len(unique)} distinct response(s) after dropping ties",
            "give at least 2 distinct responses, best first",
        )
    return {"prompt": prompt, "ranked": unique, "messages": messages}, len(ranked) - len(unique)


def _chat_pair(row: dict) -> tuple[str, list[str], list[dict]]:
    lead = _messages(row["prompt"], "prompt") if isinstance(row.get("prompt"), list) else []
    if "prompt" in row and not isinstance(row["prompt"], list):
        raise _BadRow("wrong_type", "prompt", "must be a message list when chosen/rejected are", "drop or convert it")
    (ctx_c, best), (ctx_r, worst) = (_split_chat({n: lead + row[n]}, n, "assistant") for n in ("chosen", "rejected"))
    if ctx_c != ctx_r:
        raise _BadRow(
            "mismatched_prompt",
            "chosen",
            "and rejected differ before their final assistant message",
            "share all turns but the final assistant message",
        )
    if ctx_c[-1]["role"] != "user":
        raise _BadRow("bad_messages", "chosen", "does not have a user turn before the final answer", "add one")
    return ctx_c[-1]["content"], [best, worst], ctx_c[:-1]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(text: str, name: str) -> list[dict]:
    """Anthropic HH transcript -> [{role, content}] (contents stripped; text before the first marker is dropped)."""
    parts = _HH_TURN.split(text)
    turns = [
        {"role": "user" if who == "Human" else "assistant", "content": content.strip()}
        for who, content in zip(parts[1::2], parts[2::2])
    ]
    if not turns or turns[-1]["role"] != "assistant":
        raise _BadRow("bad_messages", name, f"has no {HH_MARKER!r} turn at its end", "use Anthropic HH text")
    return turns


def _hh_pair(row: dict) -> tuple[str, list[str], list[dict]]:
    chosen, rejected = (_hh_turns(_text(row, name), name) for name in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise _BadRow("mismatched_prompt", "chosen", "and rejected have different dialogue prefixes", "align them")
    context = chosen[:-1]
    if not context or context[-1]["role"] != "user" or not context[-1]["content"]:
        raise _BadRow("bad_messages", "chosen", "has no human turn before the final answer", "use Anthropic HH text")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns[-1]["content"]:
            raise _BadRow("empty", name, "has an empty final assistant response", "fill it in or remove the row")
    return context[-1]["content"], [chosen[-1]["content"], rejected[-1]["content"]], context[:-1]


_NORMALISERS = {"text": _norm_text, "sft": _norm_sft, "preference": _norm_preference, "prompts": _norm_prompts}


def load_source(source, kind: str, on_bad_row: str = "error", max_rows: int | None = None) -> datasets.Dataset:
    """`load_rows` for a config's data source section (path, split, field_map, max_rows); skipped rows and dropped
    ties are printed, so a skip is never silent."""
    ds, report = load_rows(
        source.path,
        kind,
        split=source.split,
        field_map=source.field_map or None,
        on_bad_row=on_bad_row,
        max_rows=max_rows or source.max_rows or None,
        subset=source.subset,
    )
    if report.skipped or report.ties_dropped:
        print(
            f"[data] {source.path}: kept {report.rows_kept} of {report.rows_read} rows; skipped {report.skipped}; "
            f"{report.ties_dropped} tied responses dropped",
            flush=True,
        )
    return ds
