"""The scoring forwards GRPO-style runs do without. A one-step update takes its own forward as the old log-probs
(settings.old_logprobs_from_update): the scoring forward of the policy is skipped, the PPO ratio is exactly 1, and
the run is the one with the separate forward up to float rounding. A run without a KL term needs no reference
(models.reference: none)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CONFIGS, load_safetensors_dir, ppo_config, read_metrics

from rlhf.config import ConfigError, load_config
from rlhf.stages import ppo
from rlhf.stages.ppo import scoring, settings

# GRPO as DeepSeekMath and TRL run it: k samples per prompt, beta * k3 KL in the loss, one optimizer step per rollout
ONE_STEP_GRPO = [
    "ppo.advantage=grpo",
    "rollout.samples_per_prompt=4",
    "kl.placement=loss",
    "kl.kl_coef=0.04",
    "ppo.ppo_epochs=1",
    "ppo.mini_batch_size=16",  # the whole batch of 16
    "ppo.micro_batch_size=4",  # four micro-batches, grouped by length: the rows go back by index
    "ptx.ptx_coef=0",
]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], True),
        (["kl.placement=reward", "kl.kl_coef=0", "kl.adaptive=false"], True),  # no KL at all (Dr. GRPO, DAPO)
        (["kl.placement=reward"], False),  # the rewards read the old log-probs before the update
        (["ppo.ppo_epochs=2"], False),  # the second epoch's forwards run a stepped policy
        (["ppo.mini_batch_size=8"], False),  # so does the second minibatch's
    ],
)
def test_old_logprobs_come_from_the_update_only_when_nothing_else_needs_them(extra, expected):
    base = ["train.batch_size=16", *ONE_STEP_GRPO]
    cfg = load_config("ppo", str(CONFIGS / "tiny" / "ppo.yaml"), base + extra)
    assert settings.old_logprobs_from_update(cfg) is expected


def test_the_update_gives_the_old_logprobs_of_every_episode(tiny_world, tiny_sft, tiny_rm, tmp_path):
    trainer = ppo.PPOTrainer(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ONE_STEP_GRPO))
    ro, _ = trainer.rollout(0)
    assert ro.logprobs is None  # no scoring forward of the policy
    trainer.compute_advantages(ro)
    separate = trainer.experience.old_logprobs(ro)  # what a scoring forward gives, before the step
    stats = trainer.learner.update(ro, 0).logged()
    assert stats["policy/ratio_avg"] == 1.0 and stats["policy/clipfrac_avg"] == 0.0
    assert stats["policy/approxkl_avg"] == 0.0
    mask = ro.response_mask
    assert mask.sum(1).unique().numel() > 1  # responses of several lengths: the micro-batches were re-ordered
    # every row filled, each with its own episode's log-probs
    torch.testing.assert_close(ro.logprobs[mask], separate[mask], atol=1e-5, rtol=0)


def run(tiny_world, tiny_sft, tiny_rm, out, monkeypatch, separate: bool, extra=()):
    with monkeypatch.context() as m:
        if separate:  # the scoring forward of the policy, as before
            m.setattr(settings, "old_logprobs_from_update", lambda cfg: False)
        steps = ["train.max_steps=3", "optim.warmup_steps=0"]
        cfg = ppo_config(tiny_world, tiny_sft, tiny_rm, out, [*ONE_STEP_GRPO, *steps, *extra])
        return ppo.train(cfg)


@pytest.mark.parametrize(
    "variant",
    [[], ["ppo.advantage=gae", "rollout.samples_per_prompt=1"], ["models.policy.lora.enabled=true"]],
    ids=["grpo", "gae", "lora"],
)
def test_a_run_is_the_one_with_a_separate_forward(tiny_world, tiny_sft, tiny_rm, tmp_path, monkeypatch, variant):
    """GRPO; PPO with a critic (whose values still come from the scoring forward: GAE needs them first); a LoRA
    policy (its reference the adapter switched off, still a scoring forward)."""
    if "models.policy.lora.enabled=true" in variant:
        variant = [*variant, "models.reference=disable_adapter", "optim.lr=1e-3"]
    a = run(tiny_world, tiny_sft, tiny_rm, tmp_path / "a", monkeypatch, separate=False, extra=variant)
    b = run(tiny_world, tiny_sft, tiny_rm, tmp_path / "b", monkeypatch, separate=True, extra=variant)
    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["policy/ratio_avg"] for r in rows_a] == [1.0] * 3  # exactly: the old log-probs are the forward's
    assert all(abs(r["policy/ratio_avg"] - 1) < 1e-5 for r in rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("objective/scores", "objective/kl", "objective/kl_k3", "loss/kl_avg", "loss/policy_avg"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-4, abs_tol=1e-5), (ra["step"], key, ra[key], rb[key])
    # the three steps moved the weights the same way, to float rounding
    wa, wb, w0 = load_safetensors_dir(a), load_safetensors_dir(b), load_safetensors_dir(tiny_sft)
    step_a = torch.cat([(wa[k] - w0[k]).flatten() for k in wa])
    step_b = torch.cat([(wb[k] - w0[k]).flatten() for k in wa])
    assert step_a.abs().max() > 2e-4  # three Adam steps of lr 1e-4 (LoRA: 1e-3): it trained
    assert (step_a - step_b).abs().max() < 1e-3 * step_a.abs().max()


def test_a_skipped_update_still_measures_the_kl(tiny_world, tiny_sft, tiny_rm, tmp_path, monkeypatch):
    real, calls = scoring.aggregate_ensemble, []

    def nan_once(scores, *args):
        calls.append(1)
        mean, std = real(scores, *args)
        return (mean * float("nan") if len(calls) == 1 else mean), std

    monkeypatch.setattr(scoring, "aggregate_ensemble", nan_once)
    skips = ["train.max_nonfinite_skips=1"]
    run(tiny_world, tiny_sft, tiny_rm, tmp_path / "a", monkeypatch, separate=False, extra=skips)
    calls.clear()
    run(tiny_world, tiny_sft, tiny_rm, tmp_path / "b", monkeypatch, separate=True, extra=skips)
    (a, *_), (b, *_) = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert "policy/ratio_avg" not in a  # the first iteration's update was skipped
    assert math.isfinite(a["objective/kl"]) and math.isclose(a["objective/kl"], b["objective/kl"], abs_tol=1e-5)


@pytest.mark.parametrize("kl", [["kl.kl_coef=0.02"], ["kl.kl_coef=0", "kl.budget=10"]], ids=["beta", "budget"])
def test_no_reference_needs_no_kl_term(kl):
    with pytest.raises(ConfigError, match=r"models.reference: none .* set both to 0"):
        load_config("ppo", str(CONFIGS / "tiny" / "ppo.yaml"), ["models.reference=none", *kl])


def test_no_reference_is_the_run_with_beta_0(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """models.reference: none (beta 0: Dr. GRPO, DAPO) loads no reference and runs no forward of one; the run is the
    one with a reference copy and beta 0, bit for bit, less its KL statistics."""
    beta_0 = [*ONE_STEP_GRPO, "kl.kl_coef=0", "train.max_steps=2"]  # the KL in the loss, times 0
    trainer = ppo.PPOTrainer(
        ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / "none", beta_0 + ["models.reference=none"])
    )
    assert trainer.roles.actor.reference is None  # no copy loaded (and no LoRA adapter to switch off)
    without = trainer.train()
    with_copy = ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / "copy", beta_0))
    wa, wb = load_safetensors_dir(without), load_safetensors_dir(with_copy)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_none = [r for r in read_metrics(tmp_path / "none") if "objective/scores" in r]
    rows_copy = [r for r in read_metrics(tmp_path / "copy") if "objective/scores" in r]
    kl_keys = ("objective/kl", "objective/kl_smoothed", "loss/kl_avg")
    assert len(rows_none) == 2 and not any(key in r for r in rows_none for key in kl_keys)
    assert all(key in r for r in rows_copy for key in kl_keys)
    assert [r["objective/scores"] for r in rows_none] == [r["objective/scores"] for r in rows_copy]
