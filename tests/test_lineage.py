"""The lineage as options on the tiny world: REINFORCE with a baseline, RLOO, GRPO, L^KLPEN, reward functions.

Each option trains a few iterations and the reward rises; critic-free estimators never build a value model; every
option resumes bit-exactly. (DPO has its own stage: test_dpo.py. The hand-computed math is in test_ppo_math.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ppo_config, read_metrics
from safetensors.torch import load_file

from rlhf.config import ConfigError
from rlhf.stages import ppo

OPTIONS = {
    "reinforce_value": ["ppo.advantage=reinforce", "ppo.baseline=value"],
    "reinforce_mean": ["ppo.advantage=reinforce", "ppo.baseline=mean"],
    "rloo": ["ppo.advantage=rloo", "rollout.samples_per_prompt=4"],
    "grpo": ["ppo.advantage=grpo", "rollout.samples_per_prompt=4", "kl.placement=loss", "kl.kl_coef=0.04"],
    "klpen": ["ppo.objective=klpen"],
    # the tiny world's gold judge as the reward (no reward model; the critic starts from the policy)
    "function": ["reward.function=rlhf.tiny:gold_judge", "models.reward.name_or_path=", "models.value_init=policy"],
}
CRITIC_FREE = {"reinforce_mean", "rloo", "grpo"}
TRAIN = [
    "train.batch_size=32",
    "ppo.mini_batch_size=16",
    "ppo.micro_batch_size=16",
    "optim.lr=3e-4",
    "optim.warmup_steps=0",
    "kl.kl_coef=0.01",
    "ptx.ptx_coef=0.0",
]


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_raises_the_reward(option, tiny_world, tiny_sft, tiny_rm, tmp_path):
    cfg = ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, TRAIN + ["train.max_steps=16"] + OPTIONS[option])
    trainer = ppo.PPOTrainer(cfg)
    assert (trainer.value_model is None) == (option in CRITIC_FREE)
    assert (not trainer.reward_models) == (option == "function")
    trainer.train()
    rows = [r for r in read_metrics(tmp_path) if "objective/scores" in r]
    assert len(rows) == 16
    # critic-free estimators are noisier from batch to batch (that is what a learned baseline buys): 4-row means
    first = sum(r["objective/scores"] for r in rows[:4]) / 4
    last = sum(r["objective/scores"] for r in rows[-4:]) / 4
    # the gold judge scores in [0, 1]; reward-model scores are normalised to ~unit scale
    assert last > first + (0.02 if option == "function" else 0.1), (first, last)
    if option in CRITIC_FREE:
        assert "loss/value_avg" not in rows[-1]
    if option == "klpen":
        assert {r["policy/klpen_coef"] for r in rows} != {1.0}  # the adaptive beta moved
    if option == "grpo":
        assert rows[-1]["loss/kl_avg"] >= 0


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_resumes_bit_exactly(option, tiny_world, tiny_sft, tiny_rm, tmp_path):
    extra = ["train.max_steps=3", "checkpoint.every=2", "checkpoint.keep_last=0"] + OPTIONS[option]
    straight = ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path / "a", extra))
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "final")  # as if killed after checkpoint-2
    rows = [line for line in (b / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (b / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))
    resumed = ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, b, extra))
    w_a, w_b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert w_a.keys() == w_b.keys()
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert (b / "checkpoint-2" / "value").exists() == (option not in CRITIC_FREE)
    a_rows = [r for r in read_metrics(tmp_path / "a") if "objective/scores" in r]
    b_rows = [r for r in read_metrics(b) if "objective/scores" in r]
    assert [r["step"] for r in b_rows] == [1, 2, 3]
    assert a_rows[-1]["objective/scores"] == b_rows[-1]["objective/scores"]


def test_groups_are_consecutive_samples_of_one_prompt(tiny_world, tiny_sft, tiny_rm, tmp_path):
    cfg = ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, ["ppo.advantage=rloo", "rollout.samples_per_prompt=4"])
    trainer = ppo.PPOTrainer(cfg)
    rows = trainer.episode_rows(0)
    assert len(rows) == cfg.train.batch_size and len(set(rows)) == cfg.train.batch_size // 4
    assert all(len(set(rows[g : g + 4])) == 1 for g in range(0, len(rows), 4))
    ro, _ = trainer.rollout(0)
    trainer.compute_advantages(ro)
    group_sums = (ro.advantages.sum(1) / ro.response_mask.sum(1)).reshape(-1, 4).sum(1)  # per-response A, summed
    torch.testing.assert_close(group_sums, torch.zeros_like(group_sums), atol=1e-4, rtol=0)  # leave-one-out: sum 0


def test_reward_function_and_model_are_weighted(tiny_world, tiny_sft, tiny_rm, tmp_path):
    from rlhf.tiny import gold_judge

    extra = ["reward.function=rlhf.tiny:gold_judge", "reward.function_weight=2.0", "reward.model_weight=0.5"]
    trainer = ppo.PPOTrainer(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra + ["train.max_steps=1"]))
    ro, _ = trainer.rollout(0)
    prompts = [trainer.prompt_rows[j]["prompt"] for j in trainer.episode_rows(0)]
    texts = trainer.roles.tokenizer.batch_decode(ro.query_responses[:, ro.prompt_width :], skip_special_tokens=True)
    gold = torch.tensor([gold_judge(p, t) for p, t in zip(prompts, texts)])
    trainer.roles.rewards.function = None  # the reward model alone, on the same sequences
    rm, _ = trainer.score(ro.query_responses, ro.attention_mask, ro.prompt_width, [{}] * len(texts), [])
    torch.testing.assert_close(ro.raw_scores, 0.5 * rm + 2.0 * gold, atol=1e-5, rtol=0)


def broken_reward(prompt: str, response: str) -> float:
    if "a" in response:
        raise KeyError("no score for this one")
    return 0.0


def test_a_failing_reward_function_names_the_row(tiny_world, tiny_sft, tiny_rm, tmp_path):
    extra = ["reward.function=test_lineage:broken_reward", "train.max_steps=1"]
    with pytest.raises(ConfigError, match=r"reward.function test_lineage:broken_reward failed on prompt row \d+ of"):
        ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra))


def test_lineage_config_checks(tiny_world, tiny_sft, tiny_rm, tmp_path):
    def load(*extra):
        return ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, list(extra))

    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        load("ppo.advantage=grpo")
    with pytest.raises(ConfigError, match="multiple of rollout.samples_per_prompt"):
        load("rollout.samples_per_prompt=3")
    # whole groups of 4 cannot fill minibatches of 6 episodes (train.batch_size 24 is a multiple of both)
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size \(6\) must be a multiple of 4"):
        load(
            "rollout.samples_per_prompt=4",
            "train.batch_size=24",
            "ppo.mini_batch_size=6",
            "ppo.micro_batch_size=2",
            "ppo.group_minibatches=true",
        )
    load("rollout.samples_per_prompt=4", "ppo.group_minibatches=true")  # 16-episode minibatches: 4 whole groups
    with pytest.raises(ConfigError, match="no reward"):
        load("models.reward.name_or_path=")
    with pytest.raises(ConfigError, match="value_init: reward"):
        load("models.reward.name_or_path=", "reward.function=rlhf.tiny:gold_judge")
    with pytest.raises(ConfigError, match="module:function"):
        load("reward.function=gold_judge")
    with pytest.raises(ConfigError, match="cannot be imported"):
        ppo.PPOTrainer(load("reward.function=rlhf.tiny:no_such_judge"))
