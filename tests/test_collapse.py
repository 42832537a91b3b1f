"""Collapse signs, frontier selection that cannot promote a collapsed policy, and PPO's collapse guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ppo_config, read_metrics

from rlhf.algorithms.collapse import (
    CollapseMonitor,
    collapse_reasons,
    distinct_n,
    has_tandem_repeat,
    kl_limit,
    repeat_share,
)
from rlhf.config import CollapseLimits, ConfigError, EvalConfig, load_config
from rlhf.stages import evaluate, ppo


def test_tandem_repeats_by_hand():
    assert has_tandem_repeat("the cat today today today".split())  # one word 3x in a row
    assert has_tandem_repeat([5, 6, 5, 6, 5, 6])  # a bigram 3x
    assert not has_tandem_repeat("today today cat today".split())  # 3 times, but not in a row
    assert not has_tandem_repeat([5, 6, 5, 6, 5])  # the third bigram is cut short
    assert not has_tandem_repeat([1, 2, 3, 1, 2, 3, 1, 2, 3], max_ngram=2)  # a trigram, longer than checked
    assert has_tandem_repeat([1, 2, 3, 1, 2, 3, 1, 2, 3], max_ngram=3)
    assert has_tandem_repeat([7, 7], times=2) and not has_tandem_repeat([7], times=2)
    assert repeat_share([[1, 1, 1], [1, 2, 3], [], [4, 4, 4, 4]]) == 0.5
    assert repeat_share([]) == 0.0


LIMITS = CollapseLimits()  # the defaults: repeat share +0.1, distinct-2 0.4x, length 0.5-2x, EOS 0.5x
SFT = {"repeat_share": 0.0, "distinct2": 0.8, "length": 10.0, "eos_share": 0.9, "kl_to_sft": 0.0}


def test_distinct_n_by_hand():
    seqs = [[1, 2, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(2 / 6)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (1,2)
    assert distinct_n([[5]], 2) == 0.0


def test_collapse_reasons_name_each_sign_past_its_limit():
    assert collapse_reasons(SFT | {"repeat_share": 0.08, "kl_to_sft": 7.7}, SFT, LIMITS, max_kl=9.0) == []
    reasons = collapse_reasons(
        {"repeat_share": 0.4, "distinct2": 0.2, "length": 25.0, "eos_share": 0.3, "kl_to_sft": 15.9},
        SFT,
        LIMITS,
        max_kl=12.0,
    )
    assert len(reasons) == 5
    for word in ("repeat share 0.40", "distinct-2", "mean length", "EOS share", "KL to SFT 15.90"):
        assert any(word in r for r in reasons), (word, reasons)
    off = CollapseLimits(max_repeat_share=0, min_distinct2_ratio=0, min_length_ratio=0, max_length_ratio=0)
    off.min_eos_share_ratio = 0
    assert collapse_reasons({"repeat_share": 1.0, "distinct2": 0.0, "length": 99.0, "eos_share": 0.0}, SFT, off) == [
        "repeat share 1.00 (SFT 0.00): responses repeating an n-gram 3x in a row exceed SFT's by more than 0"
    ]  # max_repeat_share 0 still flags any excess: 0 is the tightest limit, not "off", for a share


def test_kl_limit_comes_from_the_run():
    assert kl_limit(LIMITS, {"adaptive": True, "target": 6.0, "budget": 12.0}) == 12.0
    assert kl_limit(LIMITS, {"adaptive": True, "target": 6.0, "budget": 0.0}) == 9.0  # 1.5 x target
    assert kl_limit(LIMITS, {"adaptive": False, "target": 6.0}) == 0.0  # a fixed beta has no KL promise
    assert kl_limit(CollapseLimits(max_kl=4.0), {"budget": 12.0}) == 4.0
    assert kl_limit(LIMITS, None) == 0.0


def test_collapse_limits_are_validated():
    with pytest.raises(ConfigError, match="collapse.repeat_times"):
        EvalConfig(sft="s", run_dir="r", prompts={"path": "p"}, collapse=CollapseLimits(repeat_times=1)).validate()
    with pytest.raises(ConfigError, match="collapse.max_length_ratio"):
        load_config("ppo", None, ["collapse.min_length_ratio=3", "models.reward.name_or_path=x"])


def test_select_best_skips_a_collapsed_checkpoint_with_a_higher_proxy():
    rows = [
        {"name": "checkpoint-50", "proxy_score": 1.0, "collapse": []},
        {"name": "checkpoint-100", "proxy_score": 2.0, "collapse": []},
        {"name": "final", "proxy_score": 3.0, "collapse": ["repeat share 0.40 (SFT 0.00): ..."]},
    ]
    assert evaluate.select_best(rows)["name"] == "checkpoint-100"
    assert evaluate.select_best([rows[2]]) is None


class FakeEvaluation:
    """The frontier's view of an Evaluation, with each policy's measurements given (no sampling)."""

    def __init__(self, measurements: dict[str, dict]):
        self.measurements, self.proxy_models = measurements, ["proxy"]

    def load_policy(self, path: str, key: str = "policy"):
        return Path(path).parent.name if Path(path).name == "policy" else Path(path).name

    def measure(self, model, name: str):
        return self.measurements[model], {"proxy": [self.measurements[model]["proxy_score"]]}, ["text"]

    def win_rate(self, mine: dict, sft: dict) -> dict:
        return {}


def fake_run(tmp_path: Path, steps: list[int]) -> Path:
    run = tmp_path / "run"
    for step in steps:
        policy = run / f"checkpoint-{step}" / "policy"
        policy.mkdir(parents=True)
        (policy / "weights").write_text(f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "MANIFEST.json").write_text("{}")
    (run / "final").mkdir()
    (run / "final" / "weights").write_text("final")
    (run / "config.yaml").write_text("kl:\n  adaptive: true\n  target: 6.0\n  budget: 12.0\n")
    return run


def test_frontier_promotes_the_earlier_policy_when_the_last_one_repeats(tmp_path, capsys, monkeypatch):
    """The last checkpoint repeats a word 3x in 40% of samples, an earlier one in 5%."""
    run = fake_run(tmp_path, [40, 80])
    monkeypatch.setattr(evaluate, "checkpoint_dirs", lambda d: [Path(d) / "checkpoint-40", Path(d) / "checkpoint-80"])
    base = {"distinct2": 0.7, "length": 11.0, "eos_share": 0.9}
    measurements = {
        "checkpoint-40": base | {"repeat_share": 0.02, "kl_to_sft": 4.0, "proxy_score": 1.0},
        "checkpoint-80": base | {"repeat_share": 0.05, "kl_to_sft": 7.7, "proxy_score": 1.5},
        "final": base | {"repeat_share": 0.40, "kl_to_sft": 11.0, "proxy_score": 2.5},
    }
    out = tmp_path / "eval"
    out.mkdir()
    cfg = EvalConfig(sft="s", run_dir=str(run), select_best=True, output_dir=str(out), prompts={"path": "p"})
    sft = (SFT | {"proxy_score": 0.0}, {"proxy": [0.0]})
    chosen, metrics, _, _ = evaluate.frontier(cfg, FakeEvaluation(measurements), sft)
    assert chosen == run / "final" and metrics["repeat_share"] == 0.05
    assert (run / "final" / "weights").read_text() == "checkpoint-80"  # promoted
    assert (run / "final-last" / "weights").read_text() == "final"  # the collapsed last policy, kept aside
    report = json.loads((out / "frontier.json").read_text())
    assert report["best"]["name"] == "checkpoint-80"
    assert list(report["excluded"]) == ["final"] and "repeat share 0.40" in report["excluded"]["final"][0]
    printed = capsys.readouterr().out
    assert "final excluded from selection: repeat share 0.40" in printed


def test_frontier_selects_nothing_when_every_policy_collapsed(tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path, [40])
    monkeypatch.setattr(evaluate, "checkpoint_dirs", lambda d: [Path(d) / "checkpoint-40"])
    bad = {"distinct2": 0.1, "length": 11.0, "eos_share": 0.9, "repeat_share": 0.5, "kl_to_sft": 20.0}
    measurements = {"checkpoint-40": bad | {"proxy_score": 1.0}, "final": bad | {"proxy_score": 2.0}}
    out = tmp_path / "eval"
    out.mkdir()
    cfg = EvalConfig(sft="s", run_dir=str(run), select_best=True, output_dir=str(out), prompts={"path": "p"})
    evaluate.frontier(cfg, FakeEvaluation(measurements), (SFT | {"proxy_score": 0.0}, {"proxy": [0.0]}))
    assert (run / "final" / "weights").read_text() == "final" and not (run / "final-last").exists()
    assert "every policy of the run is flagged as collapsed" in capsys.readouterr().out
    report = json.loads((out / "frontier.json").read_text())
    assert report["best"] is None and set(report["excluded"]) == {"checkpoint-40", "final"}
    assert any("KL to SFT 20.00 is above 12" in r for r in report["excluded"]["final"])


def test_collapse_monitor_judges_the_window_mean_against_the_first_iteration():
    monitor = CollapseMonitor(CollapseLimits(), window=2)
    sft = {"repeat_share": 0.0, "distinct2": 0.8, "length": 10.0, "eos_share": 0.9}
    assert monitor.update(sft) == []
    assert monitor.update(sft | {"repeat_share": 0.15}) == []  # window mean 0.075
    reasons = monitor.update(sft | {"repeat_share": 0.45})  # mean of 0.15 and 0.45
    assert len(reasons) == 1 and "repeat share 0.30" in reasons[0]
    restored = CollapseMonitor(CollapseLimits(), window=2)
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert restored.update(sft) == monitor.update(sft)


@pytest.mark.slow
def test_ppo_logs_repeats_and_the_collapse_guard_stops_a_collapsing_run(tiny_world, tiny_sft, tiny_rm, tmp_path):
    """No KL penalty and a reward that pays for repeats: the policy learns to repeat, and the guard stops it."""
    extra = [
        "ptx.ptx_coef=0.0",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "kl.kl_coef=0.0",
        "train.max_steps=80",
        "reward.function=rlhf.tools.kl_scenarios:repetition_exploit",
        "reward.model_weight=0.0",
        "collapse.stop=true",
        "collapse.window=3",
    ]
    final = ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra))
    rows = [r for r in read_metrics(tmp_path) if "objective/kl" in r]
    assert all("rollout/repeat_share" in r and "rollout/collapse_flags" in r for r in rows)
    stop = rows[-1]
    assert stop.get("stop/collapse") == 1 and stop["step"] < 80, [r["rollout/repeat_share"] for r in rows]
    assert stop["rollout/collapse_flags"] >= 1
    assert (final / "config.json").exists() and (tmp_path / f"checkpoint-{stop['step']}" / "policy").is_dir()
    # a re-run resumes from the checkpoint the guard wrote and trains nothing more
    ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, extra))
    assert [r["step"] for r in read_metrics(tmp_path) if "objective/kl" in r][-1] == stop["step"]
