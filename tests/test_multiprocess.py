"""Several processes on CPU (torchrun, gloo): PPO's four roles under DDP, one writer for logs and checkpoints.

What `accelerate launch --multi_gpu` does on a GPU box; here the backend is gloo. (SFT under two processes, with
SIGTERM and a bit-exact resume, is in test_reliability.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS, load_safetensors_dir, ppo_config, read_metrics, sft_run_configs, torchrun_command
from transformers import AutoModelForCausalLM

from rlhf.config import load_config, save_config


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(nproc)
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_equal_two_processes_on_one(tiny_world, tiny_base, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1`, one process each: the
    same run as 2 processes on one machine, bit for bit (same world size, same ranks, same data split)."""
    configs = sft_run_configs(tiny_world, tiny_base, tmp_path, ("one_machine", "two_machines"), steps=4)
    assert torchrun(["sft", "--config", str(configs["one_machine"])]).returncode == 0

    env = torchrun_command()[1]
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2"]
            + ["--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
            + ["--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
            + ["-m", "rlhf", "sft", "--config", str(configs["two_machines"])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    steps = [r["step"] for r in read_metrics(tmp_path / "two_machines") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    a = load_safetensors_dir(tmp_path / "one_machine" / "final")
    b = load_safetensors_dir(tmp_path / "two_machines" / "final")
    assert all(a[k].equal(b[k]) for k in a)


def test_eval_under_two_processes_writes_each_row_once(tiny_world, tiny_sft, tiny_rm, tmp_path):
    data = Path(tiny_world) / "data"
    cfg = load_config(
        "eval",
        str(CONFIGS / "tiny" / "eval.yaml"),
        [
            f"output_dir={tmp_path / 'eval'}",
            "run_dir=",
            "select_best=false",
            f"policy={tiny_sft}",
            f"sft={tiny_sft}",
            f"reward_model={tiny_rm}",
            f"prompts.path={data / 'eval_prompts.jsonl'}",
            "pretrain_eval.path=",
            "num_prompts=8",
            "samples_per_prompt=1",
        ],
    )
    save_config(cfg, tmp_path / "eval.yaml")
    run = torchrun(["eval", "--config", str(tmp_path / "eval.yaml")])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 8
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["num_samples"] == 8
