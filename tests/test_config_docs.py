"""The config reference: docs/config.md is what the dataclasses say (regenerate with `make config-docs`), every key
is in it with a docstring, and `--print-config` prints a resolved config that loads back to the same values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from rlhf.cli import main
from rlhf.config import STAGES, load_config, to_dict
from rlhf.config import docs as config_docs

ROOT = Path(__file__).resolve().parent.parent


def test_docs_config_md_is_current():
    on_disk = (ROOT / "docs" / "config.md").read_text()
    assert on_disk == config_docs.render(), "docs/config.md is stale: run `make config-docs`"


def leaf_keys(value, prefix: str = "") -> set[str]:
    if not dataclasses.is_dataclass(value):
        return {prefix.rstrip(".")}
    return set().union(*(leaf_keys(getattr(value, f.name), f"{prefix}{f.name}.") for f in dataclasses.fields(value)))


def test_every_key_of_every_stage_is_documented_with_its_type_and_default():
    for stage, cls in STAGES.items():
        documented = {key: (tp, default, doc) for key, tp, default, doc in config_docs.rows(cls)}
        assert set(documented) == leaf_keys(cls()), stage
        missing = [key for key, (_, _, doc) in documented.items() if not doc]
        assert not missing, f"{stage}: fields without a docstring: {missing}"
    rows = {key: (tp, default) for key, tp, default, _ in config_docs.rows(STAGES["ppo"])}
    assert rows["ppo.advantage"][0] == "one of `gae`, `reinforce`, `rloo`, `grpo`"
    assert rows["ppo.advantage"][1] == "`gae`"
    assert rows["rollout.missing_eos_penalty"][0] == "float or null"


def test_print_config_prints_the_resolved_config(capsys):
    assert main(["ppo", "--config", "configs/tiny/ppo.yaml", "--set", "kl.kl_coef=0.07", "--print-config"]) in (
        0,
        None,
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = to_dict(load_config("ppo", ROOT / "configs" / "tiny" / "ppo.yaml", ["kl.kl_coef=0.07"]))
    assert printed == expected and printed["kl"]["kl_coef"] == 0.07
    assert "cliprange" in printed["ppo"]  # defaults the YAML does not name are filled in
