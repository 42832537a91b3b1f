"""Runs that know what made them: provenance.json, a pipeline that re-runs exactly what changed (and keeps old
outputs aside), and a resume that refuses to continue a different run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONFIGS, QUIET, load_stage, overrides, rm_overrides, sft_overrides

from rlhf.cli import main
from rlhf.config import save_config
from rlhf.config.changes import Change, config_changes, split_for_resume
from rlhf.runtime import provenance

STEPS = {"train.max_steps": 2, "checkpoint.every": 0, "logging.every": 1}


def test_config_changes_and_the_resume_split():
    old = {"seed": 0, "train": {"batch_size": 8, "max_steps": 4}, "logging": {"every": 10}, "output_dir": "a"}
    new = {"seed": 1, "train": {"batch_size": 8, "max_steps": 6}, "logging": {"every": 5}, "output_dir": "b"}
    changes = config_changes(old, new)
    assert [c.key for c in changes] == ["logging.every", "output_dir", "seed", "train.max_steps"]
    allowed, refused = split_for_resume(changes)
    assert [c.key for c in allowed] == ["logging.every", "output_dir", "train.max_steps"]
    assert refused == [Change("seed", 0, 1)] and str(refused[0]) == "seed: 0 -> 1"


def test_fingerprints_follow_content_not_time(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a"}\n')
    first = provenance.fingerprint(str(data))
    data.write_text('{"prompt": "a"}\n')  # rewritten, same bytes
    assert provenance.fingerprint(str(data)) == first
    data.write_text('{"prompt": "b"}\n')
    assert provenance.fingerprint(str(data)) != first
    assert provenance.fingerprint("Qwen/Qwen2.5-0.5B") == "name:Qwen/Qwen2.5-0.5B"  # a hub name: by its name
    run = tmp_path / "final"
    run.mkdir()
    provenance.write(run, {"digest": "abc"})
    (run / "model.safetensors").write_bytes(b"weights")
    assert provenance.fingerprint(str(run)) == "run:abc"  # another stage's output: by what made it


# --------------------------------------------------------------------------------------------------
# The pipeline: skip what is current, re-run what changed and everything after it, keep old outputs aside
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def recipe(tiny_world, tiny_base, tmp_path) -> Path:
    """A three-stage recipe dir (sft, rm, ppo; two steps each) whose every path is under tmp_path, with its own copy
    of the comparisons file so the test may edit it."""
    runs, recipe_dir = tmp_path / "runs", tmp_path / "recipe"
    recipe_dir.mkdir()
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text((tiny_world / "data" / "comparisons.jsonl").read_text())
    sft = load_stage("sft", "sft.yaml", sft_overrides(tiny_world, runs / "sft", tiny_base, **_flat(STEPS)))
    rm = load_stage(
        "rm",
        "rm.yaml",
        rm_overrides(tiny_world, runs / "rm", runs / "sft" / "final", **_flat(STEPS))
        | {"data.train.path": comparisons, "data.eval.path": ""},
    )
    data = tiny_world / "data"
    ppo = load_stage(
        "ppo",
        "ppo.yaml",
        STEPS
        | {
            "output_dir": runs / "ppo",
            "models.policy.name_or_path": runs / "sft" / "final",
            "models.reward.name_or_path": runs / "rm" / "final",
            "data.prompts.path": data / "prompts.jsonl",
            "data.eval_prompts.path": "",
            "ptx.data.path": data / "pretrain.jsonl",
            "train.batch_size": 8,
            "ppo.mini_batch_size": 8,
            "ppo.micro_batch_size": 8,
            "rollout.max_new_tokens": 8,
            "train.eval_every": 0,
        },
    )
    for name, cfg in (("sft", sft), ("rm", rm), ("ppo", ppo)):
        save_config(cfg, recipe_dir / f"{name}.yaml")
    return recipe_dir


def _flat(mapping: dict) -> dict:
    return {k.replace(".", "__"): v for k, v in mapping.items()}


def _pipeline(recipe: Path, capsys, *flags: str) -> dict[str, str]:
    """Run `rlhf pipeline` on the recipe; returns {stage: the action it printed (skip / run / resume)}."""
    capsys.readouterr()
    assert main(["pipeline", "--config-dir", str(recipe), *flags]) == 0
    out = capsys.readouterr().out
    actions = {}
    for line in out.splitlines():
        if line.startswith("[pipeline] ") and ": " in line and " (" in line:
            stage, rest = line.removeprefix("[pipeline] ").split(": ", 1)
            actions.setdefault(stage, rest.split(" (")[0])
    return actions


def _stamp(runs: Path, stage: str) -> int:
    final = runs / stage / "final"
    return max(f.stat().st_mtime_ns for f in final.iterdir())


def test_pipeline_reruns_exactly_what_changed(recipe, capsys):
    runs = recipe.parent / "runs"
    assert _pipeline(recipe, capsys) == {"sft": "run", "rm": "run", "ppo": "run"}
    for stage in ("sft", "rm", "ppo"):
        record = json.loads((runs / stage / "final" / "provenance.json").read_text())
        assert record["stage"] == stage and record["versions"]["torch"] and record["inputs"]
    stamps = {s: _stamp(runs, s) for s in ("sft", "rm", "ppo")}

    # unchanged: every stage skipped, nothing rewritten
    assert _pipeline(recipe, capsys) == {"sft": "skip", "rm": "skip", "ppo": "skip"}
    assert {s: _stamp(runs, s) for s in stamps} == stamps

    # a neutral edit (logging cadence) re-runs nothing
    text = (recipe / "sft.yaml").read_text()
    (recipe / "sft.yaml").write_text(text.replace("every: 1\n", "every: 3\n", 1))
    assert _pipeline(recipe, capsys) == {"sft": "skip", "rm": "skip", "ppo": "skip"}

    # an edit to the SFT config: SFT and every stage after it, the old outputs kept aside
    (recipe / "sft.yaml").write_text(text.replace("lr: ", "lr: 3.0e-05 #", 1))
    capsys.readouterr()
    assert main(["pipeline", "--config-dir", str(recipe)]) == 0
    log = capsys.readouterr().out
    assert "[pipeline] sft: run" in log and "optim.lr:" in log
    assert "[pipeline] rm: run" in log and "[pipeline] ppo: run" in log
    for stage in ("sft", "rm", "ppo"):
        assert (runs / f"{stage}.old-1" / "final").is_dir()  # the finished run, moved aside, never deleted
    stamps = {s: _stamp(runs, s) for s in stamps}

    # a data file the RM reads changes: the RM and PPO re-run, SFT does not
    comparisons = recipe.parent / "comparisons.jsonl"
    rows = comparisons.read_text().splitlines()
    comparisons.write_text("\n".join(rows[1:]) + "\n")
    assert _pipeline(recipe, capsys) == {"sft": "skip", "rm": "run", "ppo": "run"}
    assert _stamp(runs, "sft") == stamps["sft"]
    assert (runs / "rm.old-2").is_dir() and not (runs / "sft.old-2").exists()


def test_pipeline_flags(recipe, capsys):
    runs = recipe.parent / "runs"
    _pipeline(recipe, capsys)
    before = sorted(p.name for p in runs.iterdir())

    # --dry-run: the plan, and nothing run or moved
    assert _pipeline(recipe, capsys, "--dry-run", "--from", "rm") == {"sft": "skip", "rm": "run", "ppo": "run"}
    assert sorted(p.name for p in runs.iterdir()) == before

    # --only: just that stage (what follows stays, its inputs' records unchanged)
    assert _pipeline(recipe, capsys, "--only", "rm") == {"sft": "skip", "rm": "run", "ppo": "skip"}
    assert (runs / "rm.old-1").is_dir() and not (runs / "ppo.old-1").exists()

    # --from: that stage and every later one
    assert _pipeline(recipe, capsys, "--from", "ppo") == {"sft": "skip", "rm": "skip", "ppo": "run"}

    # --only leaves the other stages alone even when they are out of date
    text = (recipe / "sft.yaml").read_text()
    (recipe / "sft.yaml").write_text(text.replace("lr: ", "lr: 3.0e-05 #", 1))
    assert _pipeline(recipe, capsys, "--only", "ppo") == {"sft": "skip", "rm": "skip", "ppo": "run"}

    # --force: all of them
    assert _pipeline(recipe, capsys, "--force") == {"sft": "run", "rm": "run", "ppo": "run"}
    assert main(["pipeline", "--config-dir", str(recipe), "--from", "dpo"]) == 2  # not a stage of this recipe


# --------------------------------------------------------------------------------------------------
# Resume: the same run or a refusal, before any work
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def stopped_sft(tiny_world, tiny_base, tmp_path) -> list[str]:
    """An SFT run of 4 steps with checkpoints; returns its --set arguments."""
    sets = overrides(
        QUIET
        | sft_overrides(tiny_world, tmp_path / "sft", tiny_base)
        | {"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep_last": 0, "logging.every": 1}
        | {"resume": "auto"}
    )
    assert main(_sft_args(sets)) == 0
    return sets


def _sft_args(sets: list[str], *more: str) -> list[str]:
    args = ["sft", "--config", str(CONFIGS / "tiny" / "sft.yaml")]
    for s in [*sets, *more]:
        args += ["--set", s]
    return args


@pytest.mark.parametrize(
    "change, key",
    [
        ("train.batch_size=16", "train.batch_size: 8 -> 16"),
        ("seed=7", "seed: 0 -> 7"),
        ("optim.lr=0.0003", "optim.lr:"),
        ("data.train.path=OTHER", "data.train.path:"),
        ("model.name_or_path=OTHER_MODEL", "model.name_or_path:"),
    ],
)
def test_a_resume_of_another_run_is_refused_with_the_keys(stopped_sft, tiny_world, tiny_sft, change, key, capsys):
    out = Path(next(s for s in stopped_sft if s.startswith("output_dir=")).split("=", 1)[1])
    change = change.replace("OTHER_MODEL", str(tiny_sft))
    change = change.replace("OTHER", str(tiny_world / "data" / "sft_eval.jsonl"))
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(_sft_args(stopped_sft, change)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    assert "output_dir" in err and "resume: never" in err and "resume_changes: allow" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    # the explicit opt-in continues the run with the new values
    assert main(_sft_args(stopped_sft, change, "resume_changes=allow", "train.max_steps=5")) == 0
    assert "with changed settings" in capsys.readouterr().out


def test_a_resume_with_safe_changes_proceeds_with_a_notice(stopped_sft, capsys):
    out = Path(next(s for s in stopped_sft if s.startswith("output_dir=")).split("=", 1)[1])
    capsys.readouterr()
    assert main(_sft_args(stopped_sft, "logging.every=2", "train.max_steps=6")) == 0
    log = capsys.readouterr().out
    notice = [line for line in log.splitlines() if "with changed settings" in line]
    assert len(notice) == 1 and "logging.every: 1 -> 2" in notice[0] and "train.max_steps: 4 -> 6" in notice[0]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps[-1] == 6


def test_a_key_the_checkpoint_did_not_know_counts_as_its_default(stopped_sft, capsys):
    """A checkpoint written before a config key existed resumes: the missing key is read as its default."""
    import yaml

    from rlhf.runtime.checkpoints import write_manifest

    out = Path(next(s for s in stopped_sft if s.startswith("output_dir=")).split("=", 1)[1])
    for saved in out.glob("checkpoint-*/config.yaml"):
        config = yaml.safe_load(saved.read_text())
        del config["resume_changes"], config["data"]["packing"]
        saved.write_text(yaml.safe_dump(config))
        (saved.parent / "checkpoint.json").unlink()  # the manifest is written last, over the finished files
        write_manifest(saved.parent, int(saved.parent.name.split("-")[1]))
    capsys.readouterr()
    assert main(_sft_args(stopped_sft, "train.max_steps=5")) == 0
    assert "resuming from" in capsys.readouterr().out


def test_a_file_rewritten_within_one_clock_tick_is_hashed_again(tmp_path):
    """Two writes of the same size inside one tick of the file system's clock keep the mtime: the cache of file
    hashes must not answer for a file that recent."""
    import os

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a"}\n')
    first = provenance.fingerprint(str(data))
    stat = data.stat()
    data.write_text('{"prompt": "b"}\n')
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and the same mtime
    assert provenance.fingerprint(str(data)) != first
