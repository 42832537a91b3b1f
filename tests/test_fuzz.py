"""Property-based fuzzing: random mutations of valid config and data files end in a clean one-line error or a
valid result — never a traceback. Derandomized, so CI runs the same few hundred examples every time."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import CONFIGS
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from rlhf.cli import main
from rlhf.config import PPOConfig, to_dict
from rlhf.data.sources import DataError, load_rows

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
STAGE_OF = {"pretrain": "sft", "sft": "sft", "rm": "rm", "ppo": "ppo", "eval": "eval"}
SHIPPED = [p for p in sorted(CONFIGS.glob("*/*.yaml")) if p.stem in STAGE_OF]
TOKENS = [
    b":",
    b": ",
    b"- ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\t",
    b"\n  ",
    b"'",
    b'"',
    b"&a ",
    b"*a",
    b"!!str ",
    b"#",
    b"\xff",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            out[i:i] = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del out[i : i + draw(st.integers(1, 30))]
        else:
            out[i : i + 1] = draw(st.binary(min_size=1, max_size=1))
    return bytes(out)


def leaf_paths(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from leaf_paths(v, prefix + (k,))
    else:
        yield prefix


@st.composite
def value_mutations(draw, tree: dict) -> dict:
    """Replace a leaf by a random value, delete a key or add an unknown one."""
    tree = json.loads(json.dumps(tree))
    path = draw(st.sampled_from(list(leaf_paths(tree))))
    node = tree
    for k in path[:-1]:
        node = node[k]
    op = draw(st.sampled_from(["replace", "delete", "add"]))
    if op == "replace":
        node[path[-1]] = draw(json_values)
    elif op == "delete":
        del node[path[-1]]
    else:
        node[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return tree


@st.composite
def mutated_config(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(SHIPPED))
    text = path.read_bytes()
    if draw(st.booleans()):
        return STAGE_OF[path.stem], draw(byte_mutations(text))
    tree = draw(value_mutations(yaml.safe_load(text)))
    return STAGE_OF[path.stem], yaml.safe_dump(tree, allow_unicode=True).encode("utf-8", "surrogatepass")


def assert_clean(rc: int, err: str) -> None:
    event(f"exit status {rc}")  # shown by --hypothesis-show-statistics: both outcomes must occur
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and err.strip() == lines[0], err


@FUZZ
@given(case=mutated_config())
def test_fuzzed_configs_give_a_clean_error_or_a_valid_config(case, tmp_path_factory, capsys):
    stage, data = case
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(data)
    rc = main([stage, "--config", str(path), "--dry-run"])
    assert_clean(rc, capsys.readouterr().err)


PPO_KEYS = [".".join(p) for p in leaf_paths(to_dict(PPOConfig()))]


@FUZZ
@given(
    key=st.sampled_from(PPO_KEYS) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", max_size=24),
    value=st.text(max_size=16) | st.sampled_from(["1e-4", "-1", "0", "null", "[1, 2]", "{a: 1}", ".nan", "true"]),
)
def test_fuzzed_overrides_give_a_clean_error_or_a_valid_config(key, value, capsys):
    rc = main(["ppo", "--config", str(CONFIGS / "tiny" / "ppo.yaml"), "--set", f"{key}={value}", "--dry-run"])
    assert_clean(rc, capsys.readouterr().err)


VALID_ROWS = {
    "text": [{"text": "the cat is happy ."}],
    "sft": [
        {"prompt": "tell me a line .", "completion": "the cat is happy ."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ],
    "preference": [
        {"prompt": "tell me a line .", "chosen": "the cat is happy .", "rejected": "the dog ."},
        {"prompt": "tell me a line .", "ranked": ["a b .", "c d .", "e ."]},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    ],
    "prompts": [{"prompt": "tell me a line ."}, {"messages": [{"role": "user", "content": "hi"}]}],
}


@st.composite
def mutated_data(draw) -> tuple[str, str, bytes]:
    kind = draw(st.sampled_from(sorted(VALID_ROWS)))
    rows = [dict(r) for r in VALID_ROWS[kind]] * 2
    suffix = draw(st.sampled_from([".jsonl", ".json"]))
    how = draw(st.sampled_from(["bytes", "values", "empty"]))
    if how == "values":
        i = draw(st.integers(0, len(rows) - 1))
        rows[i] = draw(value_mutations(rows[i])) if draw(st.booleans()) else draw(json_values)
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode()
    if how == "bytes":
        data = draw(byte_mutations(data))
    elif how == "empty":
        data = draw(st.sampled_from([b"", b"\n\n", b"[]", b"{}", b"null"]))
    return kind, suffix, data


@FUZZ
@given(case=mutated_data(), on_bad_row=st.sampled_from(["error", "skip"]))
def test_fuzzed_data_files_give_a_clean_error_or_rows(case, on_bad_row, tmp_path_factory):
    kind, suffix, data = case
    path = Path(tmp_path_factory.mktemp("data")) / f"rows{suffix}"
    path.write_bytes(data)
    try:
        ds, report = load_rows(str(path), kind, on_bad_row=on_bad_row)
    except DataError as e:
        event("DataError")
        assert "\n" not in str(e).strip() and str(path) in str(e), str(e)
        return
    event("rows" if not report.skipped else "rows, some skipped")
    assert len(ds) == report.rows_kept > 0


# --------------------------------------------------------------------------------------------------
# Wrongly laid-out paths: each stops before any work with one line naming the key (and the fix)
# --------------------------------------------------------------------------------------------------

# name -> (the key the error names, the path that key is pointed at instead (None: it keeps the good one), and how
# the break is made in the test's root dir)
LAYOUT_BREAKS = {
    "no config.json": ("model.name_or_path", None, lambda d: (d / "model" / "config.json").unlink()),
    "no weights": ("model.name_or_path", None, lambda d: [f.unlink() for f in (d / "model").glob("*.safetensors")]),
    "no tokenizer": (
        "model.name_or_path",
        None,
        lambda d: [f.unlink() for f in (d / "model").iterdir() if f.name.startswith("tokenizer")],
    ),
    "model is a file": ("model.name_or_path", "file.json", lambda d: (d / "file.json").write_text("{}")),
    "data dir not a dataset": ("data.train.path", "notadataset", lambda d: (d / "notadataset").mkdir()),
    "data file type": ("data.train.path", "rows.txt", lambda d: (d / "rows.txt").write_text("x")),
    "data missing": ("data.train.path", "missing.jsonl", lambda d: None),
    "tokenizer dir empty": ("model.tokenizer", "emptytok", lambda d: (d / "emptytok").mkdir()),
    # the output side: where the run writes
    "output is a file": ("output_dir", "outfile", lambda d: (d / "outfile").write_text("x")),
    "output under a file": ("output_dir", "underfile/out", lambda d: (d / "underfile").write_text("x")),
    "output inside the model": ("output_dir", "model/run", lambda d: None),
    "model inside its own final": ("model.name_or_path", "out/final", lambda d: _copy_model(d, d / "out" / "final")),
    "resume names no checkpoint": ("resume", "no-such-checkpoint", lambda d: None),
}


def _copy_model(root: Path, to: Path) -> None:
    import shutil

    shutil.copytree(root / "model", to)


@settings(
    max_examples=24, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(breaks=st.lists(st.sampled_from(sorted(LAYOUT_BREAKS)), min_size=1, max_size=2, unique=True))
def test_wrongly_laid_out_paths_stop_before_work_with_one_line(breaks, tiny_lm, tokenizer, tmp_path_factory, capsys):
    # the model moved into out/final and the output moved into the model's old dir undo each other: a valid layout
    assume(not {"model inside its own final", "output inside the model"} <= set(breaks))
    root = tmp_path_factory.mktemp("layout")
    tiny_lm.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "rows.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    sets = {
        "output_dir": str(root / "out"),
        "model.name_or_path": str(root / "model"),
        "data.train.path": str(root / "rows.jsonl"),
        "data.eval.path": "",
        "data.pretrain_mix.path": "",
        "data.pretrain_mix_ratio": "0",
    }
    for name in breaks:
        key, target, make = LAYOUT_BREAKS[name]
        make(root)
        if target is not None:
            sets[key] = str(root / target)
    args = ["sft", "--config", str(CONFIGS / "tiny" / "sft.yaml")]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    capsys.readouterr()  # the set-up's own output (save_pretrained's progress bars)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert_clean(rc, err)
    assert any(LAYOUT_BREAKS[name][0] in err for name in breaks), err
    assert not (root / "out" / "config.yaml").exists()  # stopped before any work


def test_a_wrongly_laid_out_config_file_stops_with_one_line(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "sft.yaml").write_text("seed: 0\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "junk.yaml").write_bytes(b"\x00\x01\xff")
    (tmp_path / "model.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "twice.yaml").write_text("train:\n  max_steps: 5\n  batch_size: 8\n  max_steps: 50\n")
    (tmp_path / "sexagesimal.yaml").write_text("model:\n  name_or_path: 1:30\n")
    (tmp_path / "octal.yaml").write_text("seed: 010\n")
    (tmp_path / "date.yaml").write_text("output_dir: 2026-12-07\n")
    cases = {
        "twice.yaml": "line 4: key 'max_steps' is given twice (also on line 2)",
        "sexagesimal.yaml": "line 2: '1:30' reads as the number 90",
        "octal.yaml": "'010' reads as the number 8",
        "date.yaml": "reads as a date",
        "dir": "is a directory; name one YAML in it (sft.yaml)",
        "missing.yaml": "does not exist",
        "list.yaml": "the top level must be a mapping",
        "junk.yaml": "not valid UTF-8",
        "model.json": "unknown key 'architectures'",
    }
    for name, words in cases.items():
        rc = main(["sft", "--config", str(tmp_path / name)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and err.strip() == lines[0] and words in err, (name, err)
