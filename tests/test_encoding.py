"""Encoding prompts: cut from the left to max_prompt_length and counted, a set in which most prompts would be cut
refused with the key and the lengths, and no misleading tokenizer warning where the project cuts on purpose."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import CONFIGS, PPO_QUIET

from rlhf.cli import main
from rlhf.config import FormatConfig
from rlhf.data.encoding import TruncationReport, check_prompt_lengths, encode_prompts
from rlhf.data.sources import DataError

WORDS = "write a short happy sentence about the cat ."


def test_most_prompts_too_long_is_refused_with_the_distribution():
    check_prompt_lengths([10, 10, 30, 40], 20, "p.jsonl", "data.format.max_prompt_length")  # half: allowed
    with pytest.raises(DataError) as err:
        check_prompt_lengths([10, 30, 40, 50, 60], 20, "p.jsonl", "format.max_prompt_length")
    message = str(err.value)
    assert "p.jsonl: 4 of 5 prompts are longer than format.max_prompt_length = 20 tokens" in message
    assert "min 10, median 40, 90th percentile 60, max 60" in message and "Raise format.max_prompt_length" in message


def test_cut_prompts_are_counted_and_keep_their_end(tokenizer, caplog):
    tokenizer.model_max_length = 4  # so the tokenizer would warn about "indexing errors" if it were asked to
    fmt = FormatConfig(max_prompt_length=5)
    rows = [{"prompt": WORDS}, {"prompt": "cat"}, {"prompt": "dog"}]
    report = TruncationReport()
    with caplog.at_level(logging.WARNING):
        ids = encode_prompts(tokenizer, fmt, rows, report, source="rows")
    full = encode_prompts(tokenizer, FormatConfig(max_prompt_length=100), rows[:1])[0]
    assert report.prompts_cut == 1 and ids[0] == full[-5:] and len(ids[1]) <= 5
    assert "indexing errors" not in caplog.text
    assert "1 prompts cut to max_prompt_length" in report.describe()


def test_ppo_with_every_prompt_too_long_stops_before_training(tiny_world, tiny_sft, tiny_rm, tmp_path, capsys):
    data = tiny_world / "data"
    args = ["ppo", "--config", str(CONFIGS / "tiny" / "ppo.yaml")]
    for s in PPO_QUIET + [
        f"output_dir={tmp_path / 'ppo'}",
        f"models.policy.name_or_path={tiny_sft}",
        f"models.reward.name_or_path={tiny_rm}",
        f"data.prompts.path={data / 'prompts.jsonl'}",
        "data.eval_prompts.path=",
        f"ptx.data.path={data / 'pretrain.jsonl'}",
        "data.format.max_prompt_length=3",
    ]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "prompts are longer than data.format.max_prompt_length = 3 tokens" in err and "median" in err
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists()


def test_eval_reports_cut_prompts_and_refuses_mostly_cut_ones(tiny_world, tiny_sft, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": WORDS + " " + WORDS}] * 3 + [{"prompt": "cat"}] * 5
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["eval", "--config", str(CONFIGS / "tiny" / "eval.yaml")]
    sets = [
        f"output_dir={tmp_path / 'eval'}",
        f"policy={tiny_sft}",
        "run_dir=",
        f"sft={tiny_sft}",
        "reward_model=",
        "proxy_reward_model=",
        f"prompts.path={prompts}",
        "pretrain_eval.path=",
        "num_prompts=0",
        "samples_per_prompt=1",
        "max_new_tokens=4",
        "judge=",
        "format.max_prompt_length=8",
        "select_best=false",
    ]
    args = base + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0, capsys.readouterr().err
    assert "[eval] 8 prompts x 1 samples; 3 cut to format.max_prompt_length" in capsys.readouterr().out
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] * 2 + rows[3:4]))
    assert main(args) == 2
    assert "6 of 7 prompts are longer than format.max_prompt_length = 8" in capsys.readouterr().err
