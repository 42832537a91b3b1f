"""Every command in the README and docs/quickstart.md runs as written, in the order a reader follows them.

Each page's ```bash blocks are read line by line and run in a fresh directory laid out as after `make demo`: the
tiny world, and the demo's stage outputs stood in by the session's tiny models. Commands are run as written, with
three changes a CPU test needs, each stated here:
- a stage launch (`rlhf sft|rm|dpo|ppo|eval|pipeline`, `accelerate launch ... -m rlhf ...`) runs with `--dry-run`
  (config and every path checked, nothing trained: a real run needs the GPU the launch names or minutes of CPU; the
  tiny pipeline end to end is tests/test_pipeline.py), and `make demo` is the pipeline it runs, dry;
- the hub is a stand-in: Qwen/Qwen2.5-0.5B's public config.json in an offline cache, and after `rlhf init` the
  recipe's SFT/RM/PPO outputs are tiny stand-in models (a dry run then passes the path checks a real one would);
- `rlhf chat` reads `/exit` from stdin.
Install and test lines (git, make install, pip, venv, make test) are what CI's own set-up runs; they are listed in
INSTALL and skipped by name, so a new kind of command fails here until the test knows how to run it.
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import QWEN25_05B, REPO

from rlhf.cli import main

STAGES = {"sft", "rm", "dpo", "ppo", "eval", "pipeline"}
INSTALL = ("git clone", "make install", "make test", "python3 -m venv", ".venv/bin/pip", "source ")


def bash_lines(page: Path) -> list[str]:
    """The command lines of a page's ```bash blocks (continuations joined, blank and comment lines dropped)."""
    lines, inside, pending = [], False, ""
    for raw in page.read_text().splitlines():
        if raw.startswith("```"):
            inside = raw.strip() == "```bash" and not inside
            continue
        if not inside or not raw.strip() or raw.lstrip().startswith("#"):
            continue
        pending += raw.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append(pending)
        pending = ""
    return lines


def as_argv(line: str) -> list[str] | None:
    """The `rlhf` arguments a documented line runs (None: an install line)."""
    if line.startswith(INSTALL):
        return None
    words = shlex.split(line, comments=True)
    if words[:2] == ["make", "demo"]:
        return ["pipeline", "--config-dir", "configs/tiny", "--dry-run"]
    if words[:2] == ["accelerate", "launch"]:
        words = words[words.index("-m") + 1 :]
    assert words[0] in ("rlhf", ".venv/bin/rlhf"), f"a documented command this test cannot run: {line!r}"
    argv = words[1:]
    if argv and argv[0] in STAGES and "--dry-run" not in argv:
        argv.append("--dry-run")
    return argv


@pytest.fixture
def reader(tmp_path, tiny_world, tiny_base, tiny_sft, tiny_rm, monkeypatch):
    """A working directory as after `make demo`, with an offline stand-in of the hub; returns a hook to call after
    each command (it lays out stand-ins for what `rlhf init` told the reader to produce)."""
    import huggingface_hub.constants

    (tmp_path / "configs").symlink_to(REPO / "configs")
    runs = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_world, runs / "world")
    for stage, model in (("pretrain", tiny_base), ("sft", tiny_sft), ("rm", tiny_rm), ("ppo", tiny_sft)):
        (runs / stage).mkdir(parents=True)
        (runs / stage / "final").symlink_to(model)
    revision = "0" * 40
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN25_05B))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    def after(argv: list[str]) -> None:
        if argv[:1] == ["init"]:  # the recipe's stages, as if run: stand-in outputs under its run_root
            run_root = Path(argv[2]) / "runs"
            for stage, model in (("sft", tiny_sft), ("rm", tiny_rm), ("ppo", tiny_sft)):
                (run_root / stage).mkdir(parents=True)
                (run_root / stage / "final").symlink_to(model)

    return after


def follow(page: Path, after, monkeypatch, capsys) -> list[str]:
    ran = []
    for line in bash_lines(page):
        argv = as_argv(line)
        if argv is None:
            continue
        if argv[:1] == ["chat"]:
            monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
        try:
            rc = main(argv)
        except SystemExit as stop:  # argparse's --version exits
            rc = stop.code
        err = capsys.readouterr().err
        assert rc == 0, f"{page.name}: `{line}` -> exit {rc}: {err[-2000:]}"
        after(argv)
        ran.append(argv[0])
    return ran


def test_the_readme_commands_run_as_written(reader, monkeypatch, capsys):
    ran = follow(REPO / "README.md", reader, monkeypatch, capsys)
    assert {"--version", "env", "generate", "chat", "report", "plot", "push", "recipes", "init", "plan"} <= set(ran)
    assert {"sft", "rm", "ppo", "eval", "pipeline"} <= set(ran)


def test_the_quickstart_commands_run_as_written(reader, monkeypatch, capsys):
    ran = follow(REPO / "docs" / "quickstart.md", reader, monkeypatch, capsys)
    assert {"tiny", "sft", "rm", "ppo", "eval", "dpo", "pipeline", "init", "plan"} <= set(ran)


def test_the_metrics_glossary_covers_what_the_supervised_stages_log(tiny_base, tiny_sft, tiny_rm):
    """The session's pretraining, SFT and RM runs (the tiny recipe's YAMLs, shortened); the whole pipeline's keys,
    PPO's and eval's included, are checked by tests/test_pipeline.py."""
    from conftest import documented_metric_keys, read_metrics

    logged = {k for run in (tiny_base, tiny_sft, tiny_rm) for row in read_metrics(run.parent) for k in row}
    assert logged and not sorted(logged - documented_metric_keys())
