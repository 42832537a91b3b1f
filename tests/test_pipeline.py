"""End to end: the tiny recipe through `rlhf pipeline` (shortened), killed in the middle of PPO and re-run.

This is the one end-to-end tiny run CI always does: world -> pretrain -> SFT -> RM -> PPO -> eval, then plots,
the summary table and `rlhf generate` on the result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import documented_metric_keys, read_metrics

from rlhf.cli import main
from rlhf.stages.pipeline import summarize
from rlhf.tools.plot import plot_run

SHORT = [
    "pretrain:train.max_steps=60",
    "pretrain:train.batch_size=32",
    "pretrain:train.micro_batch_size=32",
    "sft:train.max_steps=40",
    "sft:train.batch_size=32",
    "sft:train.micro_batch_size=32",
    "rm:train.max_steps=40",
    "rm:train.eval_every=20",
    "ppo:train.max_steps=6",
    "ppo:train.batch_size=16",
    "ppo:ppo.mini_batch_size=8",
    "ppo:ppo.micro_batch_size=8",
    "ppo:checkpoint.every=2",
    "ppo:train.eval_every=3",
    "ppo:rollout.max_new_tokens=16",
    "eval:num_prompts=16",
    "eval:samples_per_prompt=2",
]


def recipe_copy(tmp_path: Path) -> Path:
    """configs/tiny with every runs/tiny path moved under tmp_path."""
    out = tmp_path / "configs"
    out.mkdir()
    for path in Path("configs/tiny").glob("*.yaml"):
        (out / path.name).write_text(path.read_text().replace("runs/tiny", str(tmp_path / "runs")))
    return out


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


@pytest.mark.slow
def test_pipeline_killed_in_ppo_resumes_without_redoing_earlier_stages(tmp_path):
    configs = recipe_copy(tmp_path)
    runs = tmp_path / "runs"
    args = ["pipeline", "--config-dir", str(configs)] + [a for s in SHORT for a in ("--set", s)]
    first = run_cli(args, start_new_session=True)
    checkpoint = runs / "ppo" / "checkpoint-2"
    deadline = time.time() + 600
    while not checkpoint.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # like Ctrl-C / a lost node, at any point after checkpoint-2
    first.wait()
    assert not (runs / "ppo" / "final").exists()
    sft_stamp = (runs / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    rm_stamp = (runs / "rm" / "member-0" / "final" / "model.safetensors").stat().st_mtime_ns

    second = run_cli(args)
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log[-3000:]
    for stage in ("pretrain", "sft", "rm"):
        assert f"[pipeline] {stage}: skip" in log
    assert "[ppo] resumed from" in log
    assert (runs / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_stamp
    assert (runs / "rm" / "member-0" / "final" / "model.safetensors").stat().st_mtime_ns == rm_stamp
    assert (runs / "rm" / "final" / "ensemble.json").exists()  # the recipe's RM: members 0, 1; member-2 held out
    steps = [
        json.loads(x)["step"]
        for x in (runs / "ppo" / "metrics.jsonl").read_text().splitlines()
        if "objective/scores" in x
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6

    result = json.loads((runs / "eval" / "eval.json").read_text())
    for key in (
        "gold_score_sft",
        "gold_score_policy",
        "win_rate",
        "rm_score_sft",
        "rm_score_policy",
        "kl_to_sft",
        "length_sft",
        "eos_share_policy",
        "distinct1_policy",
        "distinct2_sft",
        "sft_logprob_policy",
        "pretrain_loss_sft",
        "pretrain_loss_policy",
    ):
        assert isinstance(result[key], float), key
    assert 0.0 <= result["win_rate"] <= 1.0
    last_line = log.strip().splitlines()[-1]
    assert json.loads(last_line) == result  # the eval's final JSON line
    # the frontier: every kept checkpoint and the last policy, the best by the held-out member promoted to final/
    frontier = json.loads((runs / "eval" / "frontier.json").read_text())
    assert [r["name"] for r in frontier["rows"]] == ["checkpoint-2", "checkpoint-4", "final"]
    assert frontier["best"]["name"] in ("checkpoint-2", "checkpoint-4", "final")
    assert all("proxy_score" in r and "gold_score" in r for r in frontier["rows"])

    plots = plot_run(runs)
    assert {p.name for p in plots} >= {"ppo_reward.png", "ppo_kl.png", "rm_accuracy.png", "sft_loss.png"}
    assert all(p.stat().st_size > 5000 for p in plots)
    table = summarize(runs)
    assert "rm" in table and "win-rate" in table
    assert table.split("members: ")[1].split(")")[0].count(",") == 2  # the last accuracy of each of 3 members
    assert f"best checkpoint by the held-out proxy RM: {frontier['best']['name']}" in table

    # every final/ carries a model card in the Hub's format
    for final in [runs / s / "final" for s in ("pretrain", "sft", "rm", "ppo")] + list(runs.glob("rm/member-*/final")):
        assert (final / "README.md").read_text().startswith("---\n"), final

    # every key the pipeline logged has its row in the metrics glossary
    logged = {k for path in runs.rglob("metrics.jsonl") for row in read_metrics(path.parent) for k in row}
    missing = sorted(logged - documented_metric_keys())
    assert not missing, f"keys logged but not in docs/metrics.md: {missing}"

    # a third run finds everything done
    third = run_cli(args)
    log3 = third.communicate(timeout=120)[0]
    assert third.returncode == 0 and "ppo: skip" in log3 and "eval: skip" in log3


def test_generate_and_dry_run(tmp_path, tiny_sft, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_sft),
                "--prompt",
                "write a short happy sentence about the cat .",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    assert ">>> write a short happy sentence about the cat ." in capsys.readouterr().out
    assert main(["pipeline", "--config-dir", "configs/tiny", "--dry-run"]) == 0
    assert main(["pipeline", "--config-dir", "configs/tiny", "--set", "nope:train.max_steps=1"]) == 2


@pytest.mark.parametrize("recipe", sorted(p.name for p in Path("configs").iterdir() if p.name.startswith("qwen")))
def test_real_recipes_validate_without_downloading(recipe):
    assert main(["pipeline", "--config-dir", f"configs/{recipe}", "--dry-run"]) == 0
