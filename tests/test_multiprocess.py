"""Several processes on CPU (torchrun, gloo): PPO's four roles under DDP, one writer for logs and checkpoints.

What `accelerate launch --multi_gpu` does on a GPU box; here the backend is gloo. (SFT under two processes, with
SIGTERM and a bit-exact resume, is in test_reliability.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ppo_config, read_metrics
from transformers import AutoModelForCausalLM

from rlhf.config import save_config


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(cmd + ["-m", "rlhf", *args], capture_output=True, text=True, env=env, timeout=600)


def test_two_process_ppo_trains_and_rank_zero_writes_once(tiny_world, tiny_sft, tiny_rm, tmp_path):
    out = tmp_path / "ppo"
    extra = ["train.max_steps=3", "ppo.micro_batch_size=4", "checkpoint.every=2", "logging.num_samples=2"]
    config = tmp_path / "ppo.yaml"
    save_config(ppo_config(tiny_world, tiny_sft, tiny_rm, out, extra), config)
    run = torchrun(["ppo", "--config", str(config)])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    rows = [r for r in read_metrics(out) if "objective/scores" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per iteration, not one per process
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 2
    assert (out / "checkpoint-2" / "value" / "config.json").exists()  # the critic saves as its HF model
    AutoModelForCausalLM.from_pretrained(out / "final")
