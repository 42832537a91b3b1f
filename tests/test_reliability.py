"""Never lose a run, never train on the wrong thing: role checks, signals, NaN guard, checkpoint faults.

Each test proves one guarantee of docs/reliability.md; the subprocess tests send real signals to a real run.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    load_safetensors_dir,
    load_stage,
    ppo_config,
    read_metrics,
    sft_overrides,
    sft_run_configs,
    torchrun_command,
)
from safetensors.torch import load_file

from rlhf.algorithms import losses as algorithms
from rlhf.config import ConfigError, save_config
from rlhf.runtime.checkpoints import CheckpointError, checkpoint_problem
from rlhf.runtime.guards import EXIT_STOPPED, GracefulStop, NonFiniteError
from rlhf.stages import ppo, sft
from rlhf.stages.ppo import scoring

# --------------------------------------------------------------------------------------------------
# Role checks: a model in the wrong role is refused before anything trains
# --------------------------------------------------------------------------------------------------


def test_causal_lm_as_reward_model_is_refused(tiny_world, tiny_sft, tmp_path):
    cfg = ppo_config(tiny_world, tiny_sft, tiny_sft, tmp_path)  # the SFT model given as the reward model
    with pytest.raises(ConfigError, match=r"models\.reward\.name_or_path .*LlamaForCausalLM.*score\.weight"):
        ppo.PPOTrainer(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_reward_model_as_policy_is_refused(tiny_world, tiny_rm, tmp_path):
    cfg = ppo_config(tiny_world, tiny_rm, tiny_rm, tmp_path)  # the RM given as the policy
    with pytest.raises(ConfigError, match=r"models\.policy\.name_or_path .*ForSequenceClassification.*lm_head"):
        ppo.PPOTrainer(cfg)


def test_value_from_policy_may_start_a_new_head(tiny_world, tiny_sft, tiny_rm, tmp_path):
    trainer = ppo.PPOTrainer(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ["models.value_init=policy"]))
    assert trainer.value_model.model.score.weight.shape[0] == 1


# --------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: finish the step, checkpoint, exit EXIT_STOPPED; resume is bit-exact
# --------------------------------------------------------------------------------------------------


def run_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if "objective/kl" in r] if (out / "metrics.jsonl").exists() else []


def complete_rows(out: Path) -> int:
    """metrics.jsonl rows written so far, read while the run appends (a line without its newline is not yet a row)."""
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_resume_is_bit_exact(tiny_world, tiny_sft, tiny_rm, tmp_path):
    extra = ["train.max_steps=10", "ptx.ptx_coef=0.5", "kl.adaptive=true", "kl.target=1.0", "logging.every=1"]
    configs = {}
    for name in ("straight", "stopped"):
        path = tmp_path / f"{name}.yaml"
        save_config(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / name, extra), path)
        configs[name] = path
    straight = run_cli(["ppo", "--config", str(configs["straight"])])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    out = tmp_path / "stopped"
    proc = run_cli(["ppo", "--config", str(configs["stopped"])])
    deadline = time.time() + 120
    while complete_rows(out) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_STOPPED, log
    stopped_at = logged_steps(out)[-1]
    assert 3 <= stopped_at < 10
    assert f"stopped by SIGTERM at step {stopped_at}" in log
    assert checkpoint_problem(out / f"checkpoint-{stopped_at}") is None
    assert not (out / "final").exists()

    resumed = run_cli(["ppo", "--config", str(configs["stopped"])])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert f"resumed from {out / f'checkpoint-{stopped_at}'}" in log
    assert logged_steps(out) == list(range(1, 11))
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_under_two_processes_stops_every_rank_at_the_same_step(tiny_world, tiny_base, tmp_path):
    """torchrun (what `accelerate launch` runs for several processes) forwards SIGTERM to every rank; the ranks
    agree on the step (the flag is all-reduced), rank 0 writes that checkpoint and a 2-process resume finishes
    with the weights of an uninterrupted 2-process run."""
    configs = sft_run_configs(tiny_world, tiny_base, tmp_path, ("straight", "stopped"), steps=12)

    def launch(name: str) -> subprocess.Popen:
        torchrun, env = torchrun_command()
        args = torchrun + ["-m", "rlhf", "sft", "--config", str(configs[name])]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    straight = launch("straight")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()[-3000:]
    out = tmp_path / "stopped"
    proc = launch("stopped")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if complete_rows(out) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler does
    log = proc.communicate(timeout=120)[0]
    # both ranks report; their lines may interleave on the shared pipe, so match the phrase, not lines
    stops = re.findall(r"stopped by SIGTERM at step (\d+)", log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]
    step = int(stops[0])
    assert step < 12 and checkpoint_problem(out / f"checkpoint-{step}") is None
    resumed = launch("stopped")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log[-3000:]
    a = load_safetensors_dir(tmp_path / "straight" / "final")
    b = load_safetensors_dir(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = GracefulStop()
    stop.handle(signal.SIGINT)
    assert stop.signum == signal.SIGINT and exits == []
    stop.handle(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]


def test_handlers_are_restored_after_the_run():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop():
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


# --------------------------------------------------------------------------------------------------
# Non-finite numbers: stop (or skip, bounded) and never write a non-finite tensor
# --------------------------------------------------------------------------------------------------


def all_tensors_finite(root: Path) -> bool:
    files = list(root.rglob("*.safetensors"))
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values() if t.is_floating_point())


def test_exploding_sft_stops_cleanly_without_non_finite_files(tiny_world, tiny_base, tmp_path):
    cfg = load_stage(
        "sft",
        "sft.yaml",
        sft_overrides(
            tiny_world,
            tmp_path,
            tiny_base,
            train__max_steps=40,
            optim__lr=1e6,
            optim__max_grad_norm=0,
            checkpoint__every=1,
            checkpoint__keep_last=0,
        ),
    )
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite (loss|grad_norm)|weight .* is not finite"):
        sft.train(cfg)
    assert not (tmp_path / "final").exists()
    assert all_tensors_finite(tmp_path)


def test_ppo_nan_loss_stops_naming_the_step_and_quantity(tiny_world, tiny_sft, tiny_rm, tmp_path, monkeypatch):
    real = algorithms.policy_loss  # what POLICY_OBJECTIVES["clip"] calls

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(algorithms, "policy_loss", nan_loss)
    with pytest.raises(NonFiniteError, match=r"\[ppo\] step 1: non-finite loss/policy_avg = nan"):
        ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ["train.max_steps=3"]))
    assert not (tmp_path / "final").exists()


def test_ppo_skips_a_non_finite_step_within_its_budget(tiny_world, tiny_sft, tiny_rm, tmp_path, monkeypatch):
    real, calls = algorithms.policy_loss, []

    def nan_once(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), stats

    monkeypatch.setattr(algorithms, "policy_loss", nan_once)
    extra = ["train.max_steps=2", "train.max_nonfinite_skips=1"]
    final = ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra))
    assert all_tensors_finite(final)


def test_nan_rewards_never_reach_the_weights(tiny_world, tiny_sft, tiny_rm, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "aggregate_ensemble", lambda s, *a: (s.mean(0) * float("nan"), s.std(0)))
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite scores \(\d+ of 16 values NaN/inf\)"):
        ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ["train.max_steps=2"]))


# --------------------------------------------------------------------------------------------------
# Checkpoint faults
# --------------------------------------------------------------------------------------------------


def sft_cfg(tiny_world, tiny_base, out: Path, **extra):
    base = sft_overrides(tiny_world, out, tiny_base, train__max_steps=6, checkpoint__every=2, checkpoint__keep_last=0)
    return load_stage("sft", "sft.yaml", base | {"resume": "auto"} | extra)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tiny_world, tiny_base, tmp_path, capsys):
    straight = sft.train(sft_cfg(tiny_world, tiny_base, tmp_path / "a"))
    b = tmp_path / "b"
    sft.train(sft_cfg(tiny_world, tiny_base, b))
    shutil.rmtree(b / "final")
    weights = b / "checkpoint-4" / "state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a disk fault after the checkpoint was complete
    assert "bytes" in checkpoint_problem(b / "checkpoint-4")
    capsys.readouterr()
    resumed = sft.train(sft_cfg(tiny_world, tiny_base, b))
    assert "resuming from checkpoint-2" in capsys.readouterr().out
    wa, wb = load_safetensors_dir(straight), load_safetensors_dir(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_corrupted_bytes_fall_back_and_no_usable_checkpoint_stops(tiny_world, tiny_base, tmp_path):
    out = tmp_path / "run"
    sft.train(sft_cfg(tiny_world, tiny_base, out))
    shutil.rmtree(out / "final")
    for step in (2, 4):  # same size, garbage header: only loading can tell
        weights = out / f"checkpoint-{step}" / "state" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[:8] = b"\xff" * 8
        weights.write_bytes(bytes(data))
        assert checkpoint_problem(out / f"checkpoint-{step}") is None
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoint-4 \(cannot be loaded"):
        sft.train(sft_cfg(tiny_world, tiny_base, out))


def test_full_disk_during_a_save_leaves_the_previous_checkpoint(tiny_world, tiny_base, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state

    def full_disk(self, output_dir=None, **kwargs):
        if "checkpoint-4" in str(output_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(
        CheckpointError, match=r"checkpoint-4: No space left on device.*complete checkpoints: checkpoint-2"
    ):
        sft.train(sft_cfg(tiny_world, tiny_base, tmp_path))
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "checkpoint-4.tmp").exists()


def test_the_tied_embedding_save_warning_is_dropped_and_others_kept(caplog, tmp_path):
    """accelerate warns that it removed lm_head.weight when saving a model with tied embeddings (harmless: loading
    re-ties it); the filter drops exactly that, where checkpoints are saved, and keeps any other shared tensor."""
    import logging

    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.runtime.checkpoints import _tied_weights_not_reported

    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(LlamaForCausalLM(LlamaConfig(vocab_size=64, tie_word_embeddings=True, **shape)))
    with caplog.at_level(logging.WARNING):
        accelerator.save_state(str(tmp_path / "plain"), safe_serialization=True)
    # the unfiltered save says it (so the filter below is tested against the real message)
    assert "Removed shared tensor {'lm_head.weight'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), _tied_weights_not_reported():
        accelerator.save_state(str(tmp_path / "filtered"), safe_serialization=True)
        logging.getLogger("accelerate.utils.other").warning(
            "Removed shared tensor {'model.embed.weight'} while saving"
        )
    assert "lm_head.weight" not in caplog.text and "model.embed.weight" in caplog.text
    del model
