"""FSDP2 on this machine: two CPU processes (gloo) shard every trained model's parameters, gradients and optimizer
state (`torch.distributed.fsdp.fully_shard` through accelerate's FSDP2 path) and compute what one process computes.

The launch is what `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports (ACCELERATE_USE_FSDP and
the FSDP_* variables); on CPU processes `rlhf.runtime.accelerator` keeps accelerate on FSDP2 instead of its DDP
fallback, so these runs take the GPU code path. Tolerance 1e-5, as for DDP: summation order differs.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    dpo_run_configs,
    free_port,
    load_safetensors_dir,
    ppo_config,
    rm_config,
    sft_run_configs,
    torchrun_command,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import save_config
from rlhf.runtime.checkpoints import checkpoint_problem

pytestmark = pytest.mark.slow

FSDP2 = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def launch(stage: str, config: Path, nproc: int) -> subprocess.Popen:
    """`rlhf <stage>` in one plain process, or under torchrun with `nproc` FSDP2 processes."""
    cmd, env = torchrun_command(nproc)
    if nproc == 1:
        cmd = [sys.executable]
    else:
        env |= FSDP2
    args = cmd + ["-m", "rlhf", stage, "--config", str(config)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def launch_ranks(stage: str, config: Path, nproc: int) -> list[subprocess.Popen]:
    """The `nproc` FSDP2 ranks started directly (the environment torchrun gives them), so each one's exit status is
    seen; their output goes to one pipe each."""
    port = free_port()
    env = torchrun_command(nproc)[1] | FSDP2 | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env |= {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    args = [sys.executable, "-m", "rlhf", stage, "--config", str(config)]
    return [
        subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(nproc)
    ]


def run(stage: str, config: Path, nproc: int) -> str:
    proc = launch(stage, config, nproc)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[log.find("Traceback") :][:6000]
    return log


def one_and_fsdp(stage: str, configs: dict[str, Path], out: Path) -> tuple[dict, dict, str]:
    """configs["one"] in one process, configs["two"] under 2 FSDP2 processes: (weights, weights, the FSDP2 log)."""
    run(stage, configs["one"], 1)
    log = run(stage, configs["two"], 2)
    assert "FSDP2 on 2 CPU processes" in log, log[-2000:]
    return load_safetensors_dir(out / "one" / "final"), load_safetensors_dir(out / "two" / "final"), log


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp2_sft_matches_one_process_and_exports_a_normal_final(tiny_world, tiny_base, tmp_path):
    configs = sft_run_configs(tiny_world, tiny_base, tmp_path, ("one", "two"), steps=4)
    a, b, _ = one_and_fsdp("sft", configs, tmp_path)
    assert max_diff(a, b) < 1e-5
    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")  # a plain HF dir, not shards


def test_fsdp2_rm_ensemble_matches_one_process(tiny_world, tiny_sft, tmp_path):
    """Two ensemble members trained one after the other in the same processes, each sharded."""
    sets = ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=2", "ensemble.size=2"]
    configs = {}
    for name in ("one", "two"):
        configs[name] = tmp_path / f"{name}.yaml"
        save_config(rm_config(tiny_world, tiny_sft, tmp_path / name, sets), configs[name])
    run("rm", configs["one"], 1)
    assert "FSDP2 on 2 CPU processes" in run("rm", configs["two"], 2)
    for member in ("member-0", "member-1"):
        a = load_safetensors_dir(tmp_path / "one" / member / "final")
        b = load_safetensors_dir(tmp_path / "two" / member / "final")
        assert max_diff(a, b) < 1e-5
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / member / "final")
    assert (tmp_path / "two" / "final" / "ensemble.json").is_file()


def test_fsdp2_dpo_matches_one_process(tiny_world, tiny_sft, tmp_path):
    configs = dpo_run_configs(tiny_world, tiny_sft, tmp_path, ("one", "two"))
    a, b, _ = one_and_fsdp("dpo", configs, tmp_path)
    assert max_diff(a, load_safetensors_dir(tiny_sft)) > 1e-3  # it trained
    assert max_diff(a, b) < 1e-5


# a LoRA policy whose reference is itself with the adapter off, and an EMA of its weights; final/ is the adapter
LORA_EMA = [
    "models.policy.lora.enabled=true",
    "models.policy.lora.merge_on_save=false",
    "models.reference=disable_adapter",
    "ema.decay=0.5",
    "optim.lr=1e-3",
]


@pytest.mark.parametrize(
    "algorithm",
    [
        ["ptx.ptx_coef=0.5"],
        ["ppo.advantage=rloo", "rollout.samples_per_prompt=4"],
        LORA_EMA,
    ],
    ids=["gae-ptx", "rloo", "lora-ema"],
)
def test_fsdp2_ppo_matches_one_process(tiny_world, tiny_sft, tiny_rm, tmp_path, algorithm):
    """Policy and critic trained sharded, the reference and reward model sharded frozen; generation under sharding
    (every rank steps the decoder together)."""
    extra = ["train.max_steps=2", "ppo.micro_batch_size=4", *algorithm]
    configs = {}
    for name in ("one", "two"):
        configs[name] = tmp_path / f"{name}.yaml"
        save_config(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / name, extra), configs[name])
    a, b, _ = one_and_fsdp("ppo", configs, tmp_path)
    if algorithm is LORA_EMA:  # the adapter: lora_B starts at zero
        assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-6  # it trained
    else:
        assert max_diff(a, load_safetensors_dir(tiny_sft)) > 1e-6  # it trained
    assert max_diff(a, b) < 1e-5


def test_fsdp2_ppo_resume_with_ema_is_exact(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """A sharded PPO checkpoint (policy, critic, optimizers, the EMA's shards gathered into one file) resumes to the
    weights of the uninterrupted FSDP2 run, bit for bit."""
    extra = ["train.max_steps=3", "ppo.micro_batch_size=4", "checkpoint.every=2", "checkpoint.keep_last=0"]
    extra += ["ema.decay=0.5", "resume=auto"]
    for name in ("straight", "resumed"):
        save_config(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / name, extra), tmp_path / f"{name}.yaml")
        run("ppo", tmp_path / f"{name}.yaml", 2)
    resumed = tmp_path / "resumed"
    shutil.rmtree(resumed / "final")  # as if stopped after checkpoint-2
    log = run("ppo", tmp_path / "resumed.yaml", 2)
    assert "resumed from" in log
    a = load_safetensors_dir(tmp_path / "straight" / "final")
    b = load_safetensors_dir(resumed / "final")
    assert all(a[k].equal(b[k]) for k in a)


def test_fsdp2_sigterm_checkpoints_and_the_sharded_resume_is_exact(tiny_world, tiny_base, tmp_path):
    """SIGTERM to the launcher: every rank stops at the same step, the sharded checkpoint is written, exit 75; the
    same command resumes from it and ends with the weights of an uninterrupted FSDP2 run, bit for bit."""
    configs = sft_run_configs(tiny_world, tiny_base, tmp_path, ("straight", "stopped"), steps=10)
    for path in configs.values():
        path.write_text(path.read_text().replace("resume: never", "resume: auto"))
    run("sft", configs["straight"], 2)
    out = tmp_path / "stopped"
    ranks = launch_ranks("sft", configs["stopped"], 2)
    deadline = time.time() + 300
    rows = out / "metrics.jsonl"
    while (
        time.time() < deadline
        and ranks[0].poll() is None
        and not (rows.exists() and rows.read_text().count("\n") >= 2)
    ):
        time.sleep(0.05)
    for rank in ranks:  # what torchrun / accelerate launch do with the SIGTERM a scheduler sends them
        rank.send_signal(signal.SIGTERM)
    logs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [75, 75], "\n".join(log[-2000:] for log in logs)
    stops = [re.findall(r"stopped by SIGTERM at step (\d+)", log) for log in logs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, logs
    step = int(stops[0][0])
    assert step < 10 and checkpoint_problem(out / f"checkpoint-{step}") is None
    assert any((out / f"checkpoint-{step}" / "state").glob("pytorch_model_fsdp_0*"))  # sharded, not gathered
    log = run("sft", configs["stopped"], 2)
    assert f"resumed from {out / f'checkpoint-{step}'}" in log
    a = load_safetensors_dir(tmp_path / "straight" / "final")
    b = load_safetensors_dir(out / "final")
    assert all(a[k].equal(b[k]) for k in a)
