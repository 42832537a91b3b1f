"""Issue 9's mechanisms on the tiny world: a KL target that holds, a hard KL budget, a reward-model ensemble with
conservative PPO rewards, and `rlhf eval` over a run dir (the frontier) with best-checkpoint promotion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CONFIGS, ppo_config, read_metrics, rm_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import ConfigError, load_config
from rlhf.models.loading import reward_members
from rlhf.stages import evaluate, ppo
from rlhf.stages import reward_model as reward

FAST = ["optim.lr=3e-4", "optim.warmup_steps=0", "ptx.ptx_coef=0.0"]


@pytest.mark.slow
def test_default_controller_holds_the_kl_target_in_a_ppo_run(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """Starting 20x below the beta that would hold it, the KL settles at the target: last 20 iterations within 30%."""
    target = 1.5
    extra = FAST + ["train.max_steps=50", "kl.adaptive=true", f"kl.target={target}", "kl.kl_coef=0.01"]
    ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra))
    kl = [r["objective/kl"] for r in read_metrics(tmp_path) if "objective/kl" in r]
    assert len(kl) == 50
    last = sum(kl[-20:]) / 20
    assert abs(last / target - 1) < 0.3, (last, kl)
    betas = [r["objective/kl_coef"] for r in read_metrics(tmp_path) if "objective/kl_coef" in r]
    assert betas[-1] > betas[0]  # it had to raise beta to stop the drift


def test_kl_budget_stops_the_run_and_saves_it(tiny_world, tiny_sft, tiny_rm, tmp_path):
    extra = FAST + ["train.max_steps=60", "kl.kl_coef=0.0", "kl.budget=0.5", "kl.budget_window=2"]
    final = ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra))
    rows = [r for r in read_metrics(tmp_path) if "objective/kl" in r]
    stop = rows[-1]
    assert stop.get("stop/kl_budget") == 1 and stop["step"] < 60
    assert stop["objective/kl_smoothed"] > 0.5
    assert all(r["objective/kl_smoothed"] <= 0.5 for r in rows[:-1])
    assert (final / "model.safetensors").exists()
    assert (tmp_path / f"checkpoint-{stop['step']}" / "policy" / "config.json").exists()
    # re-running resumes from that checkpoint, trains nothing more and writes the same final/
    before = final.joinpath("model.safetensors").read_bytes()
    shutil.rmtree(final)
    ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra))
    assert [r["step"] for r in read_metrics(tmp_path) if "objective/kl" in r][-1] == stop["step"]
    assert final.joinpath("model.safetensors").read_bytes() == before


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_world, tiny_sft, tmp_path_factory) -> Path:
    """Three bootstrap members of a few steps each; the last is held out of PPO's reward."""
    extra = ["data.eval.path=", "data.reference_max_rows=32", "train.max_steps=4", "ensemble.size=3"]
    extra += ["ensemble.holdout=1", "ensemble.bootstrap=true"]
    cfg = rm_config(tiny_world, tiny_sft, tmp_path_factory.mktemp("rm_ensemble"), extra)
    return reward.train(cfg)


def test_rm_ensemble_members_and_manifest(tiny_ensemble):
    members = reward_members(str(tiny_ensemble))
    holdout = reward_members(str(tiny_ensemble), holdout=True)
    assert [Path(m).parent.name for m in members] == ["member-0", "member-1"]
    assert [Path(m).parent.name for m in holdout] == ["member-2"]
    heads = []
    for m in members + holdout:
        model = AutoModelForSequenceClassification.from_pretrained(m)  # each member is a standard HF RM
        assert "reward_offset" in model.config.to_dict()
        heads.append(model.score.weight.detach())
    assert not heads[0].equal(heads[1])  # different seeds, different members
    manifest = json.loads((tiny_ensemble / "ensemble.json").read_text())
    assert manifest["bootstrap"] is True
    # re-running skips finished members and rewrites the same manifest
    assert reward_members(str(tiny_ensemble)) == members


def test_ppo_scores_with_a_conservative_ensemble(tiny_world, tiny_sft, tiny_ensemble, tmp_path):
    extra = FAST + ["train.max_steps=2", "reward.aggregate=mean_minus_std", "reward.std_coef=2.0"]
    trainer = ppo.PPOTrainer(ppo_config(tiny_world, tiny_sft, tiny_ensemble, tmp_path, extra))
    assert len(trainer.reward_models) == 2  # the held-out member is not in PPO's reward
    member0 = AutoModelForSequenceClassification.from_pretrained(reward_members(str(tiny_ensemble))[0])
    assert trainer.value_model.model.score.weight.detach().equal(
        member0.score.weight.detach()
    )  # value init = member 0
    ro, _ = trainer.rollout(0)
    assert (ro.score_std > 0).all()
    trainer.train()
    rows = [r for r in read_metrics(tmp_path) if "objective/scores" in r]
    assert all(r["objective/ensemble_std"] > 0 for r in rows)
    assert all(0 < r["rollout/distinct2"] <= 1 and 0 <= r["rollout/eos_share"] <= 1 for r in rows)


def eval_config(tiny_world, tiny_sft, rm: Path, run_dir: Path, out: Path, extra: list[str] = ()):
    data = Path(tiny_world) / "data"
    return load_config(
        "eval",
        str(CONFIGS / "tiny" / "eval.yaml"),
        [
            f"output_dir={out}",
            "policy=",
            f"run_dir={run_dir}",
            f"sft={tiny_sft}",
            f"reward_model={rm}",
            f"prompts.path={data / 'eval_prompts.jsonl'}",
            "pretrain_eval.path=",
            "num_prompts=12",
            "samples_per_prompt=1",
            "max_new_tokens=16",
            *extra,
        ],
    )


def test_frontier_over_a_run_dir_and_best_promotion(tiny_world, tiny_sft, tiny_ensemble, tmp_path):
    run = tmp_path / "ppo"
    extra = FAST + ["train.max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=0"]
    ppo.train(ppo_config(tiny_world, tiny_sft, tiny_ensemble, run, extra))
    result = evaluate.run(
        eval_config(tiny_world, tiny_sft, tiny_ensemble, run, tmp_path / "eval", ["select_best=true"])
    )
    report = json.loads((tmp_path / "eval" / "frontier.json").read_text())
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["checkpoint-2", "checkpoint-4", "final"]
    assert [r["step"] for r in rows] == [2, 4, None]
    for r in rows:
        for key in ("kl_to_sft", "rm_score", "proxy_score", "gold_score", "length", "eos_share", "distinct2"):
            assert isinstance(r[key], float), (key, r)
        assert isinstance(r["repeat_share"], float) and isinstance(r["collapse"], list)
    assert report["sft"]["kl_to_sft"] == 0.0
    best = max((r for r in rows if not r["collapse"]), key=lambda r: r["proxy_score"])
    assert report["selected_by"] == "proxy_score" and report["best"]["name"] == best["name"]
    assert (tmp_path / "eval" / "frontier.png").exists()
    # select_best: final/ is the best policy; the last one is kept
    promoted = run / "final" / evaluate.PROMOTED_FILE
    if best["name"] == "final":
        assert not promoted.exists() and not (run / "final-last").exists()
    else:
        assert json.loads(promoted.read_text())["from"] == best["name"]
        assert (run / "final-last" / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(run / "final")
    assert result["kl_to_sft"] == pytest.approx(best["kl_to_sft"], abs=1e-5)
    # evaluating again sees the same policies (the last one under final-last/ once promoted)
    again = evaluate.run_policies(run)
    assert [p[2].name if p[1] is None else p[0] for p in again][-1] in ("final", "final-last")
    assert len(again) == 3


def test_promote_moves_the_last_policy_aside_once(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint-2/policy", "checkpoint-4/policy", "final"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_text(name)
    evaluate.promote(run, run / "checkpoint-2" / "policy", {"name": "checkpoint-2", "step": 2})
    assert (run / "final" / "model.safetensors").read_text() == "checkpoint-2/policy"
    assert (run / "final-last" / "model.safetensors").read_text() == "final"
    evaluate.promote(run, run / "checkpoint-4" / "policy", {"name": "checkpoint-4", "step": 4})
    assert (run / "final" / "model.safetensors").read_text() == "checkpoint-4/policy"
    assert (run / "final-last" / "model.safetensors").read_text() == "final"  # never overwritten
    assert [p[0] for p in evaluate.run_policies(run)] == ["checkpoint-2", "checkpoint-4", "final-last"]


def test_select_best_needs_a_held_out_proxy(tiny_world, tiny_sft, tiny_rm, tmp_path):
    with pytest.raises(ConfigError, match="select_best needs run_dir"):
        load_config("eval", str(CONFIGS / "tiny" / "eval.yaml"), ["select_best=true", "run_dir=", "policy=p"])
    run = tmp_path / "ppo"
    ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, run, FAST + ["train.max_steps=1"]))
    cfg = eval_config(tiny_world, tiny_sft, tiny_rm, run, tmp_path / "eval", ["select_best=true", "judge="])
    with pytest.raises(ConfigError, match="held-out proxy"):
        evaluate.run(cfg)
