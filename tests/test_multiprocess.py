"""Several processes on CPU (torchrun, gloo): PPO's four roles under DDP, one writer for logs and checkpoints.

What `accelerate launch --multi_gpu` does on a GPU box; here the backend is gloo. (SFT under two processes, with
SIGTERM and a bit-exact resume, is in test_reliability.py.) SFT and DPO: 2 processes train the 1-process weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    CONFIGS,
    dpo_run_configs,
    free_port,
    load_safetensors_dir,
    ppo_config,
    read_metrics,
    rm_config,
    sft_run_configs,
    torchrun_command,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import load_config, save_config


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(nproc)
    return subprocess.run(cmd + ["-m", "rlhf", *args], capture_output=True, text=True, env=env, timeout=600)


def one_and_two_processes(stage: str, configs: dict[str, Path], out: Path) -> tuple[dict, dict]:
    """Run `configs["one"]` in one process and `configs["two"]` under torchrun with 2; their final weights."""
    one = subprocess.run(
        [sys.executable, "-m", "rlhf", stage, "--config", str(configs["one"])], env=torchrun_command()[1]
    )
    assert one.returncode == 0
    run = torchrun([stage, "--config", str(configs["two"])])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return load_safetensors_dir(out / "one" / "final"), load_safetensors_dir(out / "two" / "final")


ONE_STEP_GRPO = ["ppo.advantage=grpo", "kl.placement=loss", "ppo.ppo_epochs=1", "ppo.mini_batch_size=16"]


@pytest.mark.parametrize(
    ("k", "algorithm"), [(1, []), (4, ["ppo.group_minibatches=true"]), (4, ONE_STEP_GRPO)], ids=["k1", "k4", "grpo"]
)
@pytest.mark.slow
def test_two_process_ppo_matches_one_process_and_rank_zero_writes_once(
    tiny_world, tiny_sft, tiny_rm, tmp_path, k, algorithm
):
    """The same global batch over 2 processes is the 1-process PPO run: every episode is sampled from its own
    seeded stream, the rollout is gathered, and each process takes its share of the same minibatches (with ptx).
    Measured after 3 iterations: largest weight difference 6e-8 (float summation order); tolerance 1e-5. With k = 4
    samples per prompt a group's episodes are split over the processes, each sharing its prompt forward among its
    own (rollout.share_prompt), and minibatches hold whole groups (ppo.group_minibatches): the update's shared
    prompt forwards go through DDP, two forwards per backward. One-step GRPO: each process's update forward gives
    the old log-probs of its episodes, which the KL statistics then read on every process."""
    extra = ["train.max_steps=3", "ppo.micro_batch_size=4", "checkpoint.every=2", "logging.num_samples=2"]
    extra += [f"rollout.samples_per_prompt={k}", *algorithm]
    configs = {}
    for name in ("one", "two"):
        configs[name] = tmp_path / f"{name}.yaml"
        save_config(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / name, extra), configs[name])
    run = torchrun(["ppo", "--config", str(configs["two"])])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "rlhf", "ppo", "--config", str(configs["one"])], env=torchrun_command()[1]
    )
    assert one.returncode == 0

    out = tmp_path / "two"
    rows = {name: [r for r in read_metrics(tmp_path / name) if "objective/scores" in r] for name in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]  # one row per iteration, not one per process
    for a, b in zip(rows["one"], rows["two"]):
        assert a["rollout/response_length"] == b["rollout/response_length"]  # the very same episodes
        assert abs(a["objective/scores"] - b["objective/scores"]) < 1e-4
        assert abs(a["objective/kl"] - b["objective/kl"]) < 1e-4
    a = load_safetensors_dir(tmp_path / "one" / "final")
    b = load_safetensors_dir(out / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 2
    if algorithm == ONE_STEP_GRPO:
        assert all(r["policy/ratio_avg"] == 1.0 for r in rows["two"])
    else:
        assert (out / "checkpoint-2" / "value" / "config.json").exists()  # the critic saves as its HF model
    AutoModelForCausalLM.from_pretrained(out / "final")


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_process_rm_and_ppo_resume(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """RM under 2 processes equals RM in one; PPO under 2 processes killed after its checkpoint and resumed: every
    iteration logged once, and the resumed run ends with the weights of the uninterrupted 2-process run."""
    rm_out = tmp_path / "rm"
    save_config(
        rm_config(tiny_world, tiny_sft, rm_out, ["train.max_steps=4", "train.micro_batch_size=2", "logging.every=1"]),
        tmp_path / "rm.yaml",
    )
    run = torchrun(["rm", "--config", str(tmp_path / "rm.yaml")])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert [r["step"] for r in read_metrics(rm_out) if "train/loss" in r] == [1, 2, 3, 4]
    AutoModelForSequenceClassification.from_pretrained(rm_out / "final")
    # the same 4 steps in one process: the K-way loss is normalised by the global count of prompt groups, so the
    # weights agree to float summation order (measured 1.2e-7; tolerance 1e-5, as for SFT)
    one = rm_config(tiny_world, tiny_sft, tmp_path / "rm_one", ["train.max_steps=4", "train.micro_batch_size=2"])
    save_config(one, tmp_path / "rm_one.yaml")
    single = subprocess.run(
        [sys.executable, "-m", "rlhf", "rm", "--config", str(tmp_path / "rm_one.yaml")], env=torchrun_command()[1]
    )
    assert single.returncode == 0
    a = load_safetensors_dir(rm_out / "final")
    b = load_safetensors_dir(tmp_path / "rm_one" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    extra = ["train.max_steps=4", "ppo.micro_batch_size=4", "checkpoint.every=2", "checkpoint.keep_last=0"]
    for name in ("straight", "resumed"):
        save_config(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / name, extra), tmp_path / f"{name}.yaml")
        run = torchrun(["ppo", "--config", str(tmp_path / f"{name}.yaml")])
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    resumed = tmp_path / "resumed"
    shutil.rmtree(resumed / "final")  # as if killed after checkpoint-2
    shutil.rmtree(resumed / "checkpoint-4", ignore_errors=True)
    run = torchrun(["ppo", "--config", str(tmp_path / "resumed.yaml")])
    assert run.returncode == 0 and "resumed from" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
    assert [r["step"] for r in read_metrics(resumed) if "objective/scores" in r] == [1, 2, 3, 4]
    a = load_safetensors_dir(tmp_path / "straight" / "final")
    b = load_safetensors_dir(resumed / "final")
    assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_match_one_process_for_sft(tiny_world, tiny_base, tmp_path, packing):
    """The same global batch split over 2 processes computes the 1-process step: weights agree to float rounding
    (measured 6e-8 after 4 steps; the tolerance here is 1e-5). Not bit-exact: summation order differs. Packed, each
    process packs its own rows: the same token-mean loss."""
    configs = sft_run_configs(tiny_world, tiny_base, tmp_path, ("one", "two"), steps=4, packing=packing)
    cmd, env = torchrun_command()
    one = subprocess.run([sys.executable, "-m", "rlhf", "sft", "--config", str(configs["one"])], env=env)
    assert one.returncode == 0
    assert torchrun(["sft", "--config", str(configs["two"])]).returncode == 0
    a = load_safetensors_dir(tmp_path / "one" / "final")
    b = load_safetensors_dir(tmp_path / "two" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    lr = [[r["lr"] for r in read_metrics(tmp_path / name) if "lr" in r] for name in ("one", "two")]
    assert lr[0] == lr[1]  # the schedule counts global steps, not steps x processes


@pytest.mark.slow
def test_two_process_compiled_ppo_matches_one_eager_process(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """train.compile under DDP: the compiled wrapper keeps DDP's gradient all-reduce (2 policy backwards per step
    here, PPO then ptx, the first under no_sync): two compiled processes train the weights one eager process does."""
    extra = ["train.max_steps=2", "ppo.micro_batch_size=4", "ppo.ppo_epochs=1"]
    configs = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        configs[name] = tmp_path / f"{name}.yaml"
        cfg = ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / name, extra + [f"train.compile={compiled}"])
        save_config(cfg, configs[name])
    run = torchrun(["ppo", "--config", str(configs["compiled"])])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    env = torchrun_command()[1]
    one = subprocess.run([sys.executable, "-m", "rlhf", "ppo", "--config", str(configs["eager"])], env=env)
    assert one.returncode == 0
    a = load_safetensors_dir(tmp_path / "eager" / "final")
    b = load_safetensors_dir(tmp_path / "compiled" / "final")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("share_prompt", [False, True])
def test_two_processes_match_one_process_for_dpo(tiny_world, tiny_sft, tmp_path, share_prompt):
    """DPO's global batch split over 2 processes computes the 1-process step (2 micro-batches per process: the first
    under no_sync). With share_prompt the policy runs two forwards through DDP per backward (the prompts, then the
    responses on their KV cache)."""
    configs = dpo_run_configs(tiny_world, tiny_sft, tmp_path, ("one", "two"), share_prompt=share_prompt)
    a, b = one_and_two_processes("dpo", configs, tmp_path)
    start = load_safetensors_dir(tiny_sft)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_two_processes_match_one_process_for_rm_with_share_prompt(tiny_world, tiny_sft, tmp_path):
    """The RM's shared-prompt forward runs inside the TokenValueModel's, so through DDP: 2 processes (2 micro-batches
    each, the first under no_sync) train the 1-process weights."""
    sets = ["share_prompt=true", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=2"]
    configs = {}
    for name in ("one", "two"):
        configs[name] = tmp_path / f"{name}.yaml"
        save_config(rm_config(tiny_world, tiny_sft, tmp_path / name, sets), configs[name])
    a, b = one_and_two_processes("rm", configs, tmp_path)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
