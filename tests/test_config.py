"""Config loading: shipped YAMLs, typed `--set` overrides, errors naming key and file, CLI exits, round trips."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, REPO, overrides, sft_overrides
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.cli import main
from rlhf.config import ConfigError, check_paths, load_config, save_config

SFT_YAML = str(CONFIGS / "tiny" / "sft.yaml")
PPO_YAML = str(CONFIGS / "tiny" / "ppo.yaml")

# file stem -> stage; YAMLs that are not stage configs are skipped by name, never silently
STEM_TO_STAGE = {"pretrain": "sft", "sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo", "eval": "eval"}
NOT_STAGE_CONFIGS = {"world", "recipe"}  # world.yaml: arguments of `rlhf tiny`; recipe.yaml: what `rlhf recipes` lists
RECIPE_KEYS = {"name", "model", "method", "data", "cost", "run_root"}


def shipped_yamls() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("**/*.yaml") if "accelerate" not in p.relative_to(CONFIGS).parts)


@pytest.mark.parametrize("path", shipped_yamls(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_yaml_loads(path):
    if path.stem == "world":  # the tiny world's arguments, read by `rlhf pipeline`
        spec = yaml.safe_load(path.read_text())
        assert set(spec) == {"out", "seed"} and isinstance(spec["seed"], int)
        return
    if path.stem == "recipe":  # the recipe's manifest
        spec = yaml.safe_load(path.read_text())
        assert set(spec) == RECIPE_KEYS and spec["name"] == path.parent.name
        return
    assert path.stem in STEM_TO_STAGE, f"{path}: unknown stage for file name {path.stem!r}; add it to STEM_TO_STAGE"
    cfg = load_config(STEM_TO_STAGE[path.stem], path)
    if STEM_TO_STAGE[path.stem] != "eval":
        assert cfg.output_dir and cfg.train.max_steps >= 0


def test_there_are_shipped_yamls():
    stems = {p.stem for p in shipped_yamls()}
    assert {"pretrain", "sft", "rm", "ppo", "eval"} <= stems


# --------------------------------------------------------------------------------------------------
# Typed overrides
# --------------------------------------------------------------------------------------------------


def test_overrides_are_typed():
    cfg = load_config(
        "sft",
        SFT_YAML,
        [
            "train.max_steps=7",
            "optim.lr=1e-4",
            "logging.tensorboard=false",
            "optim.betas=[0.9,0.99]",
            "data.mask_prompt=no",
            "logging.progress=off",  # YAML 1.1 reads off as False; a Literal choice spelled 'off' must win
            "train.mixed_precision=no",
            "data.train.field_map={prompt: question}",
        ],
    )
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.logging.tensorboard is False
    assert cfg.optim.betas == [0.9, 0.99] and all(type(b) is float for b in cfg.optim.betas)
    assert cfg.data.mask_prompt is False
    assert cfg.logging.progress == "off"
    assert cfg.train.mixed_precision == "no"
    assert cfg.data.train.field_map == {"prompt": "question"}
    # the rest of the file survives (sections merge, they are not replaced)
    assert cfg.data.format.max_length == 64 and cfg.data.train.path.endswith("sft.jsonl")


def test_float_from_yaml_string_and_int():
    # YAML 1.1 reads `1e-4` (no dot) as a string; ints are accepted for floats
    assert load_config("sft", SFT_YAML, ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)
    assert load_config("sft", SFT_YAML, ["optim.lr=1"]).optim.lr == 1.0


def test_null_override_for_optional():
    cfg = load_config("ppo", PPO_YAML, ["rollout.missing_eos_penalty=null"])
    assert cfg.rollout.missing_eos_penalty is None
    cfg = load_config("ppo", PPO_YAML, ["rollout.missing_eos_penalty=-2"])
    assert cfg.rollout.missing_eos_penalty == -2.0


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("optim: {lr: 0.5}\ntrain: {max_steps: 3}\n")
    cfg = load_config("sft", path, ["optim.lr=0.25"])
    assert cfg.optim.lr == 0.25  # override beats file
    assert cfg.train.max_steps == 3  # file beats default
    assert cfg.train.batch_size == 32  # default kept


# --------------------------------------------------------------------------------------------------
# Errors name the key and the file
# --------------------------------------------------------------------------------------------------


def test_unknown_key_did_you_mean():
    with pytest.raises(ConfigError) as e:
        load_config("sft", SFT_YAML, ["optim.lrr=1e-4"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "did you mean 'optim.lr'" in msg and "sft.yaml" in msg


def test_unknown_nested_key():
    with pytest.raises(ConfigError) as e:
        load_config("sft", SFT_YAML, ["bogus.key=1"])
    assert "bogus" in str(e.value) and "sft.yaml" in str(e.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config("sft", path)
    assert "train.max_stepz" in str(e.value) and "train.max_steps" in str(e.value) and "mine.yaml" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=abc", "optim.lr"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=ten", "train.max_steps"),
        ("logging.tensorboard=maybe", "logging.tensorboard"),
        ("optim.betas=0.9", "optim.betas"),
        ("optim.scheduler=cosin", "optim.scheduler"),
        ("data.train=3", "data.train"),
    ],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("sft", SFT_YAML, [override])
    assert key in str(e.value) and "sft.yaml" in str(e.value)


@pytest.mark.parametrize(
    "stage, yaml_file, override, key",
    [
        ("sft", SFT_YAML, "optim.lr=-1e-4", "optim.lr"),
        ("sft", SFT_YAML, "optim.lr=0", "optim.lr"),
        ("sft", SFT_YAML, "optim.lr=.nan", "optim.lr"),
        ("sft", SFT_YAML, "optim.lr=.inf", "optim.lr"),
        ("sft", SFT_YAML, "train.micro_batch_size=128", "train.micro_batch_size"),
        ("sft", SFT_YAML, "train.batch_size=0", "train.batch_size"),
        ("sft", SFT_YAML, "train.max_steps=-1", "train.max_steps"),
        ("sft", SFT_YAML, "data.pretrain_mix_ratio=1.5", "data.pretrain_mix_ratio"),
        ("ppo", PPO_YAML, "ppo.mini_batch_size=128", "ppo.mini_batch_size"),
        ("ppo", PPO_YAML, "ppo.cliprange=0", "ppo.cliprange"),
        ("ppo", PPO_YAML, "kl.kl_coef=-0.1", "kl.kl_coef"),
    ],
)
def test_impossible_values(stage, yaml_file, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(stage, yaml_file, [override])
    assert key in str(e.value) and Path(yaml_file).name in str(e.value)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config("sft", missing)
    assert "nope.yaml" in str(e.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "3\n"])
def test_non_mapping_yaml(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config("sft", path)
    assert "list.yaml" in str(e.value)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {max_steps: [1,\n")
    with pytest.raises(ConfigError) as e:
        load_config("sft", path)
    assert "broken.yaml" in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError) as e:
        load_config("sft", SFT_YAML, ["optim.lr"])
    assert "optim.lr" in str(e.value)


def test_unknown_stage():
    with pytest.raises(ConfigError):
        load_config("dpo", SFT_YAML)


# --------------------------------------------------------------------------------------------------
# Paths are checked before any model loads
# --------------------------------------------------------------------------------------------------


def test_missing_data_path_fails_before_model_load(tmp_path, monkeypatch, tiny_world):
    from rlhf.stages import sft

    def boom(*args, **kwargs):
        raise AssertionError("a model or accelerator was built before the paths were checked")

    monkeypatch.setattr(sft, "load_causal_lm", boom)
    monkeypatch.setattr(sft, "load_tokenizer", boom)
    monkeypatch.setattr(sft, "stage_accelerator", boom)
    missing = tmp_path / "nowhere" / "sft.jsonl"
    cfg = load_config(
        "sft",
        SFT_YAML,
        overrides(
            {
                "output_dir": tmp_path / "out",
                "model.name_or_path": tiny_world / "model_config",
                "data.train.path": missing,
                "data.eval.path": tiny_world / "data" / "sft_eval.jsonl",
                "data.pretrain_mix.path": tiny_world / "data" / "pretrain.jsonl",
            }
        ),
    )
    with pytest.raises(ConfigError) as e:
        check_paths(cfg, "x.yaml")
    assert "data.train.path" in str(e.value) and "x.yaml" in str(e.value)
    with pytest.raises(ConfigError) as e:
        sft.train(cfg, "x.yaml")
    assert "data.train.path" in str(e.value) and str(missing) in str(e.value)
    assert not (tmp_path / "out").exists()


def existing_rm_data(tiny_world) -> list[str]:
    data = Path(tiny_world) / "data"
    return [
        f"data.train.path={data / 'comparisons.jsonl'}",
        f"data.eval.path={data / 'comparisons_eval.jsonl'}",
        f"data.reference.path={data / 'sft.jsonl'}",
    ]


def test_missing_model_path_names_key(tmp_path, tiny_world):
    overrides = [f"model.name_or_path={tmp_path}/no/final", *existing_rm_data(tiny_world)]
    cfg = load_config("rm", str(CONFIGS / "tiny" / "rm.yaml"), overrides)
    with pytest.raises(ConfigError) as e:
        check_paths(cfg, "rm.yaml")
    assert "model.name_or_path" in str(e.value)


def test_cli_missing_path_exit_code(tmp_path, capsys, tiny_world):
    # runs/tiny/... may or may not exist in a dev checkout: the data comes from the fixture, the model is missing
    rc = main(
        [
            "rm",
            "--config",
            str(CONFIGS / "tiny" / "rm.yaml"),
            "--set",
            f"output_dir={tmp_path}/rm",
            "--set",
            f"model.name_or_path={tmp_path}/missing/final",
            *[a for o in existing_rm_data(tiny_world) for a in ("--set", o)],
        ]
    )
    assert rc == 2
    assert "model.name_or_path" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, word", [("bogus.key=1", "bogus"), ("optim.lr=abc", "optim.lr")])
def test_cli_bad_override_exit_code(capsys, override, word):
    rc = main(["sft", "--config", SFT_YAML, "--set", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert word in err and "sft.yaml" in err


def test_cli_dry_run_checks_paths_and_writes_nothing(tiny_world, tiny_base, tmp_path, capsys):
    sets = overrides(sft_overrides(tiny_world, tmp_path / "out", tiny_base))
    args = ["sft", "--config", SFT_YAML, "--dry-run"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    assert "config OK, paths OK" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    missing = ["--set", f"model.name_or_path={tmp_path / 'no-model'}"]
    assert main(args + missing) == 2
    assert "model.name_or_path" in capsys.readouterr().err


def test_cli_subprocess_fails_fast():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", "sft", "--config", "configs/tiny/sft.yaml", "--set", "bogus.key=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "bogus" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 10, f"a config error took {elapsed:.1f}s to report"


def test_cli_help_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for command in ("sft", "rm", "ppo", "pipeline", "eval", "generate", "tiny", "plot"):
        assert f"    {command} " in out, f"{command} missing from --help"


# --------------------------------------------------------------------------------------------------
# Property tests: save_config round trip, junk for a float field
# --------------------------------------------------------------------------------------------------

pos_int = st.integers(min_value=1, max_value=10**6)
pos_float = st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False)
unit_float = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


@st.composite
def sft_values(draw):
    batch = draw(pos_int)
    return {
        "seed": draw(st.integers(min_value=0, max_value=2**31)),
        "train": {
            "max_steps": draw(pos_int),
            "batch_size": batch,
            "micro_batch_size": draw(st.integers(min_value=1, max_value=batch)),
            "mixed_precision": draw(st.sampled_from(["auto", "no", "bf16", "fp16"])),
            "cpu": draw(st.booleans()),
        },
        "optim": {
            "lr": draw(pos_float),
            "weight_decay": draw(st.floats(min_value=0, max_value=10, allow_nan=False)),
            "betas": [draw(unit_float), draw(unit_float)],
            "scheduler": draw(st.sampled_from(["cosine", "linear", "constant"])),
        },
        "data": {"mask_prompt": draw(st.booleans()), "pretrain_mix_ratio": draw(unit_float)},
        "logging": {
            "tensorboard": draw(st.booleans()),
            "progress": draw(st.sampled_from(["auto", "bar", "lines", "off"])),
            "every": draw(pos_int),
        },
        "model": {"lora": {"enabled": draw(st.booleans()), "r": draw(pos_int)}},
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=sft_values())
def test_save_config_round_trip(values):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.yaml"
        if values["data"]["pretrain_mix_ratio"] > 0:
            values["data"]["pretrain_mix"] = {"path": "mix.jsonl"}
        src.write_text(yaml.safe_dump(values))
        cfg = load_config("sft", src)
        assert cfg.optim.lr == values["optim"]["lr"]
        assert cfg.train.micro_batch_size == values["train"]["micro_batch_size"]
        assert cfg.logging.progress == values["logging"]["progress"]
        saved = Path(tmp) / "saved.yaml"
        save_config(cfg, saved)
        again = load_config("sft", saved)
        assert again == cfg
        assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def _not_a_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


junk = st.text(max_size=12).filter(_not_a_number)


@settings(max_examples=60, deadline=None)
@given(value=junk)
def test_junk_for_float_field_in_file(value):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "junk.yaml"
        path.write_text(yaml.safe_dump({"optim": {"lr": value}}))
        with pytest.raises(ConfigError) as e:
            load_config("sft", path)
        assert "optim.lr" in str(e.value) and "junk.yaml" in str(e.value)


def _yaml_not_a_number(s: str) -> bool:
    try:
        parsed = yaml.safe_load(s) if s.strip() else s
    except yaml.YAMLError:
        parsed = s
    if isinstance(parsed, bool) or not isinstance(parsed, (int, float, str)):
        return True
    return isinstance(parsed, str) and _not_a_number(parsed)


@settings(max_examples=60, deadline=None)
@given(value=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12).filter(_yaml_not_a_number))
def test_junk_for_float_field_via_set(value):
    with pytest.raises(ConfigError) as e:
        load_config("sft", SFT_YAML, [f"optim.lr={value}"])
    assert "optim.lr" in str(e.value)


def test_a_recipes_run_root_is_one_key(tmp_path, capsys):
    """`${run_root}` in a stage YAML comes from the recipe.yaml beside it, or from `--set run_root=DIR`; a YAML that
    uses it with neither names the key."""
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "sft.yaml").write_text('output_dir: "${run_root}/sft"\nmodel: {name_or_path: "${run_root}/base"}\n')
    with pytest.raises(ConfigError, match=r"output_dir .* uses \$\{run_root\}.*--set run_root=DIR"):
        load_config("sft", recipe / "sft.yaml")
    (recipe / "recipe.yaml").write_text("run_root: /data/runs\n")
    cfg = load_config("sft", recipe / "sft.yaml")
    assert (cfg.output_dir, cfg.model.name_or_path) == ("/data/runs/sft", "/data/runs/base")
    cfg = load_config("sft", recipe / "sft.yaml", ["run_root=/scratch/x", "seed=3"])
    assert (cfg.output_dir, cfg.seed) == ("/scratch/x/sft", 3)
    assert main(["pipeline", "--config-dir", str(recipe), "--dry-run", "--set", "run_root=/scratch/y"]) == 0
    assert "[pipeline] sft: run (/scratch/y/sft)" in capsys.readouterr().out
