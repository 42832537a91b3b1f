"""train.compile (torch.compile of the training forwards) and the gradient norm without clipping."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from conftest import load_stage, ppo_config, read_metrics, rm_config, sft_overrides
from safetensors.torch import load_file

from rlhf.config import ConfigError
from rlhf.runtime.accelerator import clip_grad_norm, compiled_for_training
from rlhf.stages import dpo, ppo, sft
from rlhf.stages import reward_model as reward


def _with_grads() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_grad_norm_without_clipping_measures_and_leaves_the_gradients():
    acc = Accelerator(cpu=True)
    params = _with_grads()
    before = [p.grad.clone() for p in params]
    expected = torch.cat([g.flatten() for g in before]).norm()
    norm = clip_grad_norm(acc, params, 0.0)
    torch.testing.assert_close(norm, expected)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)
    # with a bound: the norm before clipping is returned, the gradients are scaled to the bound
    norm = clip_grad_norm(acc, params, 0.5)
    torch.testing.assert_close(norm, expected)
    clipped = torch.cat([p.grad.flatten() for p in params]).norm()
    torch.testing.assert_close(clipped, torch.tensor(0.5), rtol=1e-4, atol=0)


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (to tell a compiled run from an eager one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_compiled_sft_follows_eager_and_saves_plain_weights(tiny_world, tiny_base, tmp_path):
    """The compiled training forward computes the eager loss (to kernel rounding), and the checkpoint is the plain
    model's (no torch.compile prefixes): it loads anywhere."""
    losses, finals = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        extra = {
            "train__max_steps": 3,
            "train__compile": compiled,
            "train__mixed_precision": "no",
            "logging__every": 1,
        }
        before = _graphs_compiled()
        finals[compiled] = sft.train(load_stage("sft", "sft.yaml", sft_overrides(tiny_world, out, tiny_base, **extra)))
        assert (_graphs_compiled() > before) == compiled
        losses[compiled] = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=0)
    eager, compiled = _weights(finals[False]), _weights(finals[True])
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_compiled_dpo_lora_with_gradient_checkpointing_follows_eager(tiny_world, tiny_sft, tmp_path):
    """DPO with peft adapters, the reference as the policy with its adapter disabled (a no-grad forward through the
    same compiled module), and activation checkpointing: the eager loss curve."""
    from test_dpo import dpo_overrides

    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        extra = dict(
            reference="disable_adapter",
            model__lora__enabled=True,
            model__lora__target_modules=["q_proj", "v_proj"],
            model__gradient_checkpointing=True,
            train__max_steps=3,
            train__compile=compiled,
            train__mixed_precision="no",
            logging__every=1,
            optim__lr=1e-2,
        )
        dpo.train(load_stage("dpo", "dpo.yaml", dpo_overrides(tiny_world, out, tiny_sft, **extra)))
        losses[compiled] = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses[True]) == 3 and losses[True][-1] < losses[True][0]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_reward_model_follows_eager(tiny_world, tiny_sft, tmp_path):
    """The RM trains as a TokenValueModel: compiled, its forward still goes through the wrapper (wrapped_module)."""
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        extra = ["train.max_steps=3", "logging.every=1", f"train.compile={str(compiled).lower()}"]
        before = _graphs_compiled()
        reward.train(rm_config(tiny_world, tiny_sft, out, extra + ["train.mixed_precision=no"]))
        assert (_graphs_compiled() > before) == compiled
        losses[compiled] = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=0)


@pytest.mark.slow
def test_compiled_ppo_update_matches_eager(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """PPO's policy and value forwards compiled (the value model through its TokenValueModel wrapper): the first
    iteration's update statistics equal eager's; rollout and saving stay on the eager modules."""
    stats = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        cfg = ppo_config(
            tiny_world, tiny_sft, tiny_rm, out, ["train.max_steps=1", f"train.compile={str(compiled).lower()}"]
        )
        trainer = ppo.PPOTrainer(cfg)
        assert (trainer.policy_train is trainer.policy) != compiled
        final = trainer.train()
        stats[compiled] = next(r for r in read_metrics(out) if "loss/policy_avg" in r)
        assert "policy/model.safetensors" not in str(final)  # the final policy is written as a plain HF model
        assert not any("_orig_mod" in k for k in _weights(final))
    for key in ("loss/policy_avg", "loss/value_avg", "policy/grad_norm", "policy/ratio_avg", "ptx/loss"):
        torch.testing.assert_close(
            torch.tensor(stats[True][key]), torch.tensor(stats[False][key]), rtol=1e-3, atol=1e-6, msg=key
        )


def test_compile_without_a_cpu_compiler_is_a_config_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="train.compile"):
        compiled_for_training(Accelerator(cpu=True), torch.nn.Linear(2, 2), True)
    assert compiled_for_training(Accelerator(cpu=True), module := torch.nn.Linear(2, 2), False) is module
