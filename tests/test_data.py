"""Tests for rlhf.data.sources: every source format x kind, field_map, bad rows, normalisation, and property tests."""

from __future__ import annotations

import json
import re

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.data import sources as data
from rlhf.data.sources import KINDS, DataError, LoadReport, load_rows

# One valid raw row per kind, and the canonical row it must become.
RAW = {
    "text": {"text": "hello world"},
    "sft": {"prompt": "What is 2+2?", "completion": "4"},
    "preference": {"prompt": "Pick one", "chosen": "good", "rejected": "bad"},
    "prompts": {"prompt": "Tell me a joke"},
}
CANONICAL = {
    "text": {"text": "hello world"},
    "sft": {"prompt": "What is 2+2?", "completion": "4", "messages": []},
    "preference": {"prompt": "Pick one", "ranked": ["good", "bad"], "messages": []},
    "prompts": {"prompt": "Tell me a joke", "messages": [], "reference": ""},
}
COLUMNS = {
    "text": ["text"],
    "sft": ["prompt", "completion", "messages"],
    "preference": ["prompt", "ranked", "messages"],
    "prompts": ["prompt", "messages", "reference"],
}


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def numbered(kind, n=3):
    """n distinct valid raw rows of `kind`."""
    rows = []
    for i in range(n):
        row = dict(RAW[kind])
        key = "text" if kind == "text" else "prompt"
        row[key] = f"{row[key]} #{i}"
        rows.append(row)
    return rows


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Fail loudly if anything tries the hub; tests must stay offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"load_dataset called with {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


# ------------------------------------------------------------------------------------------------ formats


def _write(fmt, tmp_path, rows):
    if fmt == "json_list":
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "json_lines_in_json":
        path = tmp_path / "rows.json"
        write_jsonl(path, rows)
    elif fmt == "jsonl":
        path = tmp_path / "rows.jsonl"
        write_jsonl(path, rows)
    elif fmt == "parquet":
        path = tmp_path / "rows.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif fmt == "saved_dict":
        path = tmp_path / "saved_dict"
        other = [dict(rows[0])]
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(other), "test": datasets.Dataset.from_list(rows)}
        ).save_to_disk(str(path))
    return str(path)


FORMATS = ["json_list", "json_lines_in_json", "jsonl", "parquet", "saved", "saved_dict"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_format_and_kind(tmp_path, fmt, kind):
    rows = numbered(kind)
    source = _write(fmt, tmp_path, rows)
    ds, report = load_rows(source, kind, split="test")
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == COLUMNS[kind]
    expected = []
    for i in range(3):
        row = dict(CANONICAL[kind])
        key = "text" if kind == "text" else "prompt"
        row[key] = f"{row[key]} #{i}"
        expected.append(row)
    assert ds.to_list() == expected
    assert report == LoadReport(source=source, kind=kind, rows_read=3, rows_kept=3, skipped={}, ties_dropped=0)


def test_saved_dict_missing_split(tmp_path):
    source = _write("saved_dict", tmp_path, numbered("text"))
    with pytest.raises(DataError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_rows(source, "text", split="validation")


def test_saved_dict_default_split_is_train(tmp_path):
    source = _write("saved_dict", tmp_path, numbered("text"))
    ds, _ = load_rows(source, "text")
    assert ds["text"] == ["hello world #0"]


def test_max_rows(tmp_path):
    for fmt in ("jsonl", "json_list", "parquet", "saved"):
        sub = tmp_path / fmt
        sub.mkdir()
        ds, report = load_rows(_write(fmt, sub, numbered("text", 5)), "text", max_rows=2)
        assert ds["text"] == ["hello world #0", "hello world #1"]
        assert report.rows_read == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_arguments(tmp_path, bad):
    source = write_jsonl(tmp_path / "a.jsonl", numbered("text"))
    with pytest.raises(DataError, match="max_rows"):
        load_rows(source, "text", max_rows=bad)
    with pytest.raises(DataError, match="unknown data kind"):
        load_rows(source, "dpo")
    with pytest.raises(DataError, match="on_bad_row"):
        load_rows(source, "text", on_bad_row="ignore")
    with pytest.raises(DataError, match="field_map"):
        load_rows(source, "text", field_map={"completion": "x"})


def test_unsupported_suffix_and_plain_dir(tmp_path):
    (tmp_path / "rows.csv").write_text("text\nhi\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "rows.csv"), "text")
    with pytest.raises(DataError, match="not a dataset written by save_to_disk"):
        load_rows(str(tmp_path), "text")


def test_invalid_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"},\n {"text": ]')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(line 2"):
        load_rows(str(path), "text")


def test_no_usable_rows(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="no usable 'text' rows"):
        load_rows(source, "text", on_bad_row="skip")


# -------------------------------------------------------------------------------------------- missing sources


@pytest.mark.parametrize("name", ["./nope.jsonl", "nope.json", "data/sub/nope", "~/nope-dir-xyz"])
def test_missing_local_path_is_not_a_hub_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist") as info:
        load_rows(name, "sft")
    assert repr(name) in str(info.value)


def test_missing_absolute_path(tmp_path):
    path = str(tmp_path / "x" / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(path)):
        load_rows(path, "sft")


def test_unloadable_hub_name(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"'org/name' is not an existing local path and could not be loaded"):
        load_rows("org/name", "sft", split="train")
    assert calls == [("org/name", "train")]


def test_hub_dataset_subset_is_its_config_name(monkeypatch):
    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"question": "2+3?", "answer": "#### 5"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds, _ = load_rows(
        "openai/gsm8k", "prompts", split="test", subset="main", field_map={"prompt": "question", "reference": "answer"}
    )
    assert calls == [("openai/gsm8k", "main", "test")]
    assert ds.to_list() == [{"prompt": "2+3?", "messages": [], "reference": "#### 5"}]


def test_hub_dataset_used_with_split(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(numbered("text")))
    ds, report = load_rows("someone/corpus", "text", max_rows=2)
    assert ds["text"] == ["hello world #0", "hello world #1"]
    assert report.rows_kept == 2


# ------------------------------------------------------------------------------------------------- field_map


def test_field_map_renames(tmp_path):
    rows = [{"question": "q?", "answer": "a.", "extra": 1}]
    ds, _ = load_rows(
        write_jsonl(tmp_path / "a.jsonl", rows), "sft", field_map={"prompt": "question", "completion": "answer"}
    )
    assert ds.to_list() == [{"prompt": "q?", "completion": "a.", "messages": []}]


def test_field_map_swap_and_preference(tmp_path):
    rows = [{"prompt": "answer text", "completion": "question text"}]
    ds, _ = load_rows(
        write_jsonl(tmp_path / "a.jsonl", rows), "sft", field_map={"prompt": "completion", "completion": "prompt"}
    )
    assert ds[0]["prompt"] == "question text" and ds[0]["completion"] == "answer text"
    rows = [{"q": "p", "win": "w", "lose": "l"}]
    fm = {"prompt": "q", "chosen": "win", "rejected": "lose"}
    ds, _ = load_rows(write_jsonl(tmp_path / "b.jsonl", rows), "preference", field_map=fm)
    assert ds.to_list() == [{"prompt": "p", "ranked": ["w", "l"], "messages": []}]


def test_field_map_error_names_source_column(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": 3}])
    with pytest.raises(DataError, match=r"row 0 \(line 1\): field 'answer' must be a string, got int 3"):
        load_rows(source, "sft", field_map={"prompt": "question", "completion": "answer"})
    _, report = load_rows(
        write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": 3}, {"question": "q", "answer": "a"}]),
        "sft",
        field_map={"prompt": "question", "completion": "answer"},
        on_bad_row="skip",
    )
    assert report.skipped == {"wrong_type:answer": 1}


# -------------------------------------------------------------------------------------------------- bad rows

MSGS_OK = [user("hi"), assistant("hello")]
BAD_ROWS = [
    ("text", {"txt": "x"}, "missing:text", r"field 'text' is missing"),
    ("text", {"text": 5}, "wrong_type:text", r"field 'text' must be a string, got int 5"),
    ("text", {"text": "   \n"}, "empty:text", r"field 'text' is empty or whitespace-only"),
    ("text", ["not", "a", "dict"], "not_an_object", r"is list \['not', 'a', 'dict'\], not an object"),
    ("sft", {"prompt": "p"}, "missing:completion", r"field 'completion' is missing"),
    ("sft", {"prompt": "p", "completion": 42}, "wrong_type:completion", r"'completion' must be a string, got int"),
    ("sft", {"prompt": "p", "completion": None}, "wrong_type:completion", r"must be a string, got null"),
    ("sft", {"prompt": "p", "completion": ""}, "empty:completion", r"'completion' is empty"),
    ("sft", {"prompt": " ", "completion": "c"}, "empty:prompt", r"'prompt' is empty and there are no messages"),
    ("sft", {"messages": "hi"}, "bad_messages:messages", r"'messages' must be a list of messages"),
    ("sft", {"messages": [user("hi")]}, "bad_messages:messages", r"end with a non-empty assistant message"),
    ("sft", {"messages": [user("hi"), {"role": "bot", "content": "x"}]}, "bad_messages:messages", r"role 'bot'"),
    ("sft", {"messages": [{"role": "user"}, assistant("x")]}, "bad_messages:messages", r"item 0 is not a"),
    ("sft", {"messages": [user(1), assistant("x")]}, "bad_messages:messages", r"item 0 content is int 1"),
    ("prompts", {"messages": [assistant("hello")]}, "bad_messages:messages", r"has no non-empty user turn"),
    ("prompts", {"prompt": "p", "messages": [1]}, "bad_messages:messages", r"item 0 is not a"),
    ("preference", {"prompt": "p", "ranked": ["only"]}, "too_few_responses:ranked", r"1 distinct response"),
    ("preference", {"prompt": "p", "ranked": "ab"}, "wrong_type:ranked", r"'ranked' must be a list of strings"),
    ("preference", {"prompt": "p", "ranked": ["a", 2]}, "wrong_type:ranked", r"item 1 is int 2"),
    ("preference", {"prompt": "p", "ranked": ["a", " "]}, "empty:ranked", r"item 1 is empty"),
    ("preference", {"prompt": "p", "chosen": "a"}, "missing:rejected", r"'rejected' is missing"),
    ("preference", {"prompt": "p"}, "missing:ranked", r"'ranked' is missing \(and so are chosen/rejected\)"),
    ("preference", {"chosen": "no marker", "rejected": "x"}, "bad_messages:chosen", r"has no '\\n\\nAssistant:' turn"),
    (
        "preference",
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        "mismatched_prompt:chosen",
        r"different dialogue prefixes",
    ),
    (
        "preference",
        {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
        "mismatched_prompt:chosen",
        r"differ before their final assistant message",
    ),
    (
        "preference",
        {"chosen": [user("a"), assistant("x")], "rejected": [user("a"), user("y")]},
        "bad_messages:rejected",
        r"end with a non-empty assistant message",
    ),
]


@pytest.mark.parametrize(("kind", "bad", "reason", "pattern"), BAD_ROWS)
def test_bad_row_error_and_skip(tmp_path, kind, bad, reason, pattern):
    good = numbered(kind, 3)
    rows = [good[0], good[1], bad, good[2]]
    source = write_jsonl(tmp_path / "bad rows.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_rows(source, kind)
    message = str(info.value)
    assert message.startswith(f"{source}: row 2 (line 3): ")
    assert re.search(pattern, message), message
    assert "on_bad_row: skip" in message and "Fix:" in message
    ds, report = load_rows(source, kind, on_bad_row="skip")
    assert report.skipped == {reason: 1}
    assert (report.rows_read, report.rows_kept) == (4, 3)
    assert len(ds) == 3 and ds[2] == load_rows(write_jsonl(tmp_path / "g.jsonl", [good[2]]), kind)[0][0]


def test_malformed_json_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl: row 1 \(line 3\): is not valid JSON"):
        load_rows(str(path), "text")
    ds, report = load_rows(str(path), "text", on_bad_row="skip")
    assert ds["text"] == ["a", "c"]
    assert report.skipped == {"malformed_json": 1} and report.rows_read == 3


def test_bad_row_in_parquet_names_row(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=r"rows\.parquet: row 1: field 'completion' must be a string, got null"):
        load_rows(str(path), "sft")


def test_several_skip_reasons_counted(tmp_path):
    rows = [{"text": "ok"}, {"text": ""}, {"text": ""}, {}, {"text": 1}, {"text": "fine"}]
    ds, report = load_rows(write_jsonl(tmp_path / "a.jsonl", rows), "text", on_bad_row="skip")
    assert ds["text"] == ["ok", "fine"]
    assert report.skipped == {"empty:text": 2, "missing:text": 1, "wrong_type:text": 1}


# ------------------------------------------------------------------------------------------- normalisation


def test_chat_sft_rows(tmp_path):
    msgs = [{"role": "system", "content": "be nice"}, user("hi"), assistant("hello"), user("bye"), assistant("ciao")]
    msgs[0]["name"] = "ignored extra key"
    rows = [{"messages": msgs}, {"prompt": "p", "completion": "c"}]
    ds, _ = load_rows(write_jsonl(tmp_path / "a.jsonl", rows), "sft")
    assert ds.to_list() == [
        {
            "prompt": "",
            "completion": "ciao",
            "messages": [{"role": "system", "content": "be nice"}, user("hi"), assistant("hello"), user("bye")],
        },
        {"prompt": "p", "completion": "c", "messages": []},
    ]
    # The canonical output loads back unchanged.
    again, _ = load_rows(write_jsonl(tmp_path / "b.jsonl", ds.to_list()), "sft")
    assert again.to_list() == ds.to_list()


def test_chat_prompts_rows(tmp_path):
    rows = [{"messages": [user("hi"), assistant("hello"), user("why?")]}, {"prompt": "p", "messages": [user("x")]}]
    ds, _ = load_rows(write_jsonl(tmp_path / "a.jsonl", rows), "prompts")
    assert ds.to_list() == [
        {"prompt": "why?", "messages": [user("hi"), assistant("hello")], "reference": ""},
        {"prompt": "p", "messages": [user("x")], "reference": ""},
    ]


def test_hh_raw_text_preference_becomes_turns(tmp_path):
    """Multi-turn HH keeps its history as messages, so a chat template renders it like any chat prompt."""
    prefix = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    rows = [{"chosen": prefix + " 6.", "rejected": prefix + " 7, I think."}]
    ds, _ = load_rows(write_jsonl(tmp_path / "a.jsonl", rows), "preference")
    history = [user("What is 2+2?"), assistant("4.")]
    assert ds.to_list() == [{"prompt": "And 3+3?", "ranked": ["6.", "7, I think."], "messages": history}]


def test_ultrachat_rows(tmp_path):
    """UltraChat-200k rows carry `prompt` (the first user turn) and `messages` (the whole conversation)."""
    convo = [user("Name a fruit."), assistant("An apple."), user("Another?"), assistant("A pear.")]
    row = {"prompt": "Name a fruit.", "prompt_id": "abc", "messages": convo}
    sft_ds, _ = load_rows(write_jsonl(tmp_path / "sft.jsonl", [row]), "sft")
    assert sft_ds.to_list() == [{"prompt": "", "completion": "A pear.", "messages": convo[:-1]}]
    # train_gen: the prompt is the first user turn; the reference answer after it is not part of the prompt
    gen_ds, _ = load_rows(write_jsonl(tmp_path / "gen.jsonl", [row]), "prompts")
    assert gen_ds.to_list() == [{"prompt": "Name a fruit.", "messages": [], "reference": ""}]
    # the most common chat-prompt shape: one user message
    one, _ = load_rows(write_jsonl(tmp_path / "one.jsonl", [{"messages": [user("hi")]}]), "prompts")
    assert one.to_list() == [{"prompt": "hi", "messages": [], "reference": ""}]


def test_chat_preference_rows(tmp_path):
    shared = [{"role": "system", "content": "sys"}, user("q1"), assistant("a1"), user("q2")]
    rows = [
        {"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad")]},
        # TRL conversational style: the prompt is a message list, chosen/rejected hold only the answer.
        {"prompt": [user("q")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
    ]
    ds, _ = load_rows(write_jsonl(tmp_path / "a.jsonl", rows), "preference")
    assert ds.to_list() == [
        {"prompt": "q2", "ranked": ["good", "bad"], "messages": shared[:-1]},
        {"prompt": "q", "ranked": ["yes", "no"], "messages": []},
    ]


def test_chat_preference_needs_user_turn_before_answer(tmp_path):
    rows = [{"chosen": [assistant("a"), assistant("x")], "rejected": [assistant("a"), assistant("y")]}]
    with pytest.raises(DataError, match="user turn before the final answer"):
        load_rows(write_jsonl(tmp_path / "a.jsonl", rows), "preference")


def test_pairwise_to_ranked_and_ties(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        {"prompt": "p2", "ranked": ["x", "y", "x", "z", "y"]},
        {"prompt": "p3", "chosen": "same", "rejected": "same"},
        {"prompt": "p4", "ranked": ["best", "mid", "worst"]},
    ]
    source = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2 \(line 3\): field 'ranked' has 1 distinct response"):
        load_rows(source, "preference")
    ds, report = load_rows(source, "preference", on_bad_row="skip")
    assert ds["ranked"] == [["a", "b"], ["x", "y", "z"], ["best", "mid", "worst"]]
    assert ds["prompt"] == ["p1", "p2", "p4"]
    assert report.ties_dropped == 2  # only kept rows count; the all-tie row is counted as skipped instead
    assert report.skipped == {"too_few_responses:ranked": 1}


def test_module_documents_conventions():
    doc = data.__doc__
    for needle in ("Ties", "Anthropic HH", "messages", "on_bad_row"):
        assert needle in doc
    assert load_rows.__doc__


# --------------------------------------------------------------------------------------------- properties

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip() != ""
)


@st.composite
def preference_rows(draw):
    n = draw(st.integers(1, 6))
    rows = []
    for _ in range(n):
        ranked = draw(st.lists(TEXT, min_size=2, max_size=5, unique=True))
        rows.append({"prompt": draw(TEXT), "ranked": ranked})
    return rows


@st.composite
def sft_rows(draw):
    return [{"prompt": draw(TEXT), "completion": draw(TEXT)} for _ in range(draw(st.integers(1, 6)))]


PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY_SETTINGS
@given(rows=preference_rows())
def test_property_preference_roundtrip(tmp_path, rows):
    ds, report = load_rows(write_jsonl(tmp_path / "p.jsonl", rows), "preference")
    assert ds.to_list() == [{"prompt": r["prompt"], "ranked": r["ranked"], "messages": []} for r in rows]
    assert (report.rows_kept, report.ties_dropped, report.skipped) == (len(rows), 0, {})


@PROPERTY_SETTINGS
@given(rows=sft_rows())
def test_property_sft_roundtrip(tmp_path, rows):
    ds, _ = load_rows(write_jsonl(tmp_path / "s.jsonl", rows), "sft")
    assert ds.to_list() == [dict(r, messages=[]) for r in rows]


@PROPERTY_SETTINGS
@given(rows=preference_rows(), data_=st.data())
def test_property_corrupt_row_is_named(tmp_path, rows, data_):
    index = data_.draw(st.integers(0, len(rows) - 1))
    field = data_.draw(st.sampled_from(["prompt", "ranked"]))
    del rows[index][field]
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_rows(source, "preference")
    assert str(info.value).startswith(f"{source}: row {index} (line {index + 1}): field '{field}' is missing")
    if len(rows) > 1:
        ds, report = load_rows(source, "preference", on_bad_row="skip")
        assert report.skipped == {f"missing:{field}": 1} and len(ds) == len(rows) - 1
