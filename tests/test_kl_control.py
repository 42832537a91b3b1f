"""The KL controllers by hand, and the anti-windup controller tried on simulated dynamics it was not tuned on and on
real tiny PPO runs whose policy is slow to start or fast from the first iteration."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import ppo_config, read_metrics

from rlhf.algorithms.kl_control import (
    KL_CONTROLLERS,
    AdaptiveKLController,
    AntiWindupKLController,
    FixedKLController,
    KLBudget,
    PIKLController,
    build_kl_controller,
    penalty_share,
)
from rlhf.config import ConfigError, load_config
from rlhf.stages import ppo
from rlhf.tiny import gold_judge
from rlhf.tools.kl_scenarios import (
    INIT_BETAS,
    SCENARIOS,
    TARGET,
    kl_harness_table,
    repetition_exploit,
    second_half,
    simulate,
)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=0.1, horizon=10000)
    ctl.update(current_kl=0.2, n_steps=256)  # 0.2 / 0.1 - 1 = 1 -> clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    v = ctl.value
    ctl.update(current_kl=0.09, n_steps=100)  # 0.09 / 0.1 - 1 = -0.1, inside the clip
    assert ctl.value == pytest.approx(v * (1 - 0.1 * 100 / 10000))

    other = AdaptiveKLController(init_kl_coef=1.0, target=5.0, horizon=3.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    assert other.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=10.0, n_steps=64)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_pi_controller_steps_by_hand():
    ctl = PIKLController(0.1, target=4.0, p_gain=1.0, i_gain=0.2, lookahead=0.0, smoothing=1.0)
    ctl.update(2.0)  # e = -0.5, no proportional kick on the first update: log beta -= 0.2 * 0.5
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.1))
    ctl.update(6.0)  # e = 0.5: + 1.0 * (0.5 - (-0.5)) + 0.2 * 0.5 = +1.1
    assert ctl.value == pytest.approx(0.1 * math.exp(1.0))
    ctl.update(100.0)  # e clipped to 1: + 1.0 * (1 - 0.5) + 0.2 * 1 = +0.7
    assert ctl.value == pytest.approx(0.1 * math.exp(1.7))
    clamped = PIKLController(0.1, target=1.0, i_gain=0.5, max_coef=0.12)
    clamped.update(50.0)
    assert clamped.value == 0.12
    restored = PIKLController(1.0, target=4.0, lookahead=0.0, smoothing=1.0)
    restored.load_state_dict(ctl.state_dict())
    restored.update(4.0)
    ctl.update(4.0)
    assert restored.value == ctl.value


def test_pi_controller_acts_on_the_predicted_kl():
    ctl = PIKLController(0.1, target=4.0, p_gain=0.0, i_gain=0.2, lookahead=10.0, smoothing=1.0)
    ctl.update(1.0)  # no trend yet: e = 1/4 - 1 = -0.75
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15))
    ctl.update(2.0)  # slope = 0.2 * (2 - 1) = 0.2; predicted 2 + 10 * 0.2 = 4 -> e = 0: beta holds
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15))
    ctl.update(3.0)  # slope = 0.8 * 0.2 + 0.2 * 1 = 0.36; predicted 6.6 -> e = 0.65
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15 + 0.2 * 0.65))
    ctl.update(1.0)  # slope = 0.8 * 0.36 + 0.2 * (1 - 3) = -0.112 < 0: only the level counts, e = 1/4 - 1
    assert ctl.value == pytest.approx(0.1 * math.exp(-0.15 + 0.2 * 0.65 - 0.2 * 0.75))


def test_pi_controller_smooths_the_kl_it_acts_on():
    ctl = PIKLController(0.1, target=4.0, p_gain=0.0, i_gain=0.2, lookahead=0.0, smoothing=0.5)
    ctl.update(2.0)  # level = 2: e = -0.5
    ctl.update(6.0)  # level = 0.5 * 6 + 0.5 * (2 + 0) = 4 -> e = 0: one noisy batch at 6 moves nothing
    assert ctl.level == 4.0 and ctl.slope == pytest.approx(0.4)
    assert ctl.value == pytest.approx(0.1 * math.exp(0.2 * -0.5))


def synthetic_kl_process(controller, steps: int = 150, coef_scale: float = 0.3, tau: float = 10.0, speed: float = 1.0):
    """A policy that drifts toward its equilibrium KL* = coef_scale / beta with time constant tau, by at most
    `speed` nats per iteration (the learning rate limits how fast a policy moves); +-10% batch noise on the KL the
    controller sees. Returns the true KL per iteration."""
    rng = random.Random(0)
    kl, out = 0.0, []
    for _ in range(steps):
        controller.update(kl * (1 + 0.1 * rng.uniform(-1, 1)), 64)
        kl = max(0.0, kl + max(-speed, min(speed, (coef_scale / controller.value - kl) / tau)))
        out.append(kl)
    return out


@pytest.mark.parametrize("init_beta", [0.001, 0.05, 1.0])
@pytest.mark.parametrize("tau", [3.0, 10.0, 25.0])
def test_pi_controller_holds_the_target_whatever_the_initial_beta(init_beta, tau):
    target = 6.0  # held by beta = 0.05 in this process
    kl = synthetic_kl_process(PIKLController(init_beta, target), tau=tau)
    last = sum(kl[-20:]) / 20
    assert abs(last / target - 1) < 0.15, (init_beta, tau, last)
    assert max(kl[-20:]) < 1.5 * target


def test_proportional_controller_with_its_usual_horizon_is_too_slow_to_hold_the_target():
    """Why PI is the default: Ziegler's controller moves beta by at most 0.2 * batch / horizon per iteration."""
    kl = synthetic_kl_process(AdaptiveKLController(0.001, 6.0, horizon=10000), tau=10.0)
    assert sum(kl[-20:]) / 20 > 3 * 6.0


def test_kl_budget_smooths_over_its_window():
    budget = KLBudget(limit=5.0, window=3)
    assert [budget.update(kl) for kl in (2.0, 4.0, 6.0)] == [False, False, False]  # means 2, 3, 4
    assert budget.update(8.0) is True  # (4 + 6 + 8) / 3 = 6 > 5: the 2 has left the window
    assert budget.smoothed == pytest.approx(6.0)
    restored = KLBudget(limit=5.0, window=3)
    restored.load_state_dict(budget.state_dict())
    assert restored.exceeded and restored.history == [4.0, 6.0, 8.0]
    off = KLBudget(limit=0.0)
    assert off.update(1e9) is False


def test_penalty_share_by_hand():
    kl = torch.tensor([1.0, 3.0])  # std (unbiased) = sqrt(2)
    scores = torch.tensor([0.0, 4.0])  # std = 2 * sqrt(2)
    assert penalty_share(0.5, kl, scores) == pytest.approx(0.5 * math.sqrt(2) / (2 * math.sqrt(2)))
    assert penalty_share(0.5, kl, torch.zeros(2)) == math.inf  # scores that do not vary: no gate
    assert penalty_share(0.5, kl[:1], scores[:1]) == math.inf


def test_antiwindup_steps_by_hand():
    ctl = AntiWindupKLController(0.1, 4.0, p_gain=1.0, i_gain=0.2, lookahead=0.0, smoothing=1.0, max_step=10.0)
    ctl.update(2.0, penalty_share=0.05)  # e = -0.5, share half of min_share 0.1: the fall is halved
    assert ctl.value == pytest.approx(0.1 * math.exp(0.2 * -0.5 * 0.5))
    v = ctl.value
    ctl.update(2.0, penalty_share=None)  # no share: the PI controller's step, e unchanged so no kick
    assert ctl.value == pytest.approx(v * math.exp(-0.1))
    v = ctl.value
    ctl.update(2.0, penalty_share=0.0)  # the penalty plays no part: beta does not fall at all
    assert ctl.value == pytest.approx(v)
    ctl.update(16.0, penalty_share=0.0)  # e = 3 clipped to max_error 2; raising is never gated
    assert ctl.value == pytest.approx(v * math.exp(1.0 * (2.0 - -0.5) + 0.2 * 2.0))
    limited = AntiWindupKLController(0.1, 4.0, lookahead=0.0, smoothing=1.0)  # max_step 1 either way
    limited.update(4.0)
    limited.update(16.0)  # + 1.0 * 2 + 0.2 * 2 = 2.4, limited to 1
    assert limited.value == pytest.approx(0.1 * math.exp(1.0))
    limited.update(0.0, penalty_share=1.0)  # - 1.0 * 3 - 0.2, limited to -1: one iteration undoes the last
    assert limited.value == pytest.approx(0.1)


def test_antiwindup_state_round_trip_is_exact():
    a = AntiWindupKLController(0.05, target=6.0)
    rng = random.Random(0)
    for _ in range(10):
        a.update(rng.uniform(0, 12), 64, rng.uniform(0, 1))
    b = AntiWindupKLController(1.0, target=6.0)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        kl, share = rng.uniform(0, 12), rng.uniform(0, 1)
        a.update(kl, 64, share)
        b.update(kl, 64, share)
    assert a.value == b.value and a.state_dict() == b.state_dict()


def test_trend_is_extrapolated_when_clear_and_shrunk_when_it_is_noise():
    clear = AntiWindupKLController(0.05, target=6.0, smoothing=0.3)
    for t in range(20):
        clear.update(0.2 * t)  # a steady rise of 0.2 nats per iteration
    assert clear.predicted_error(2.0) > clear.level / 6.0 - 1 + 0.8 * 10 * clear.slope / 6.0
    noisy = AntiWindupKLController(0.05, target=6.0, smoothing=0.3)
    rng = random.Random(1)
    for _ in range(200):
        noisy.update(3.0 * (1 + 0.5 * rng.gauss(0, 1)))  # flat at 3 with 50% batch noise
        if noisy.slope > 0:
            shrunk = noisy.predicted_error(2.0) - (noisy.level / 6.0 - 1)
            assert 0 <= shrunk < 10 * noisy.slope / 6.0


def test_registry_and_config():
    assert set(KL_CONTROLLERS) == {"antiwindup", "pi", "proportional"}
    cfg = load_config("ppo", None, ["kl.adaptive=true", "models.reward.name_or_path=x", "data.prompts.path=y"])
    assert cfg.kl.controller == "antiwindup"  # the default, chosen by test_default_controller_passes_every_scenario
    assert type(build_kl_controller(cfg.kl)) is AntiWindupKLController
    with pytest.raises(ConfigError, match="kl.min_share"):
        load_config("ppo", None, ["kl.adaptive=true", "kl.min_share=0", "models.reward.name_or_path=x"])


# ---------------------------------------------------------------------------------------------
# The harness: simulated dynamics
# ---------------------------------------------------------------------------------------------

# the scenarios a controller must hold (slow start, fast start, an exploit mid-run, noisy, a lagged response);
# exploit_found and very_noisy are stress rows that no controller here holds (docs/overoptimization.md), reported,
# not required
REQUIRED = ["slow_start", "fast_start", "exploit", "lagged", "noisy"]


def test_the_stress_rows_hold_neither_pi_controller(harness):
    """Reported limits, not regressions: from every beta_0 the second-half max passes 1.5x target on some seed."""
    for scenario in ("exploit_found", "very_noisy"):
        for controller in ("antiwindup", "pi"):
            assert not any(harness[(controller, scenario, beta)]["ok"] for beta in INIT_BETAS), (controller, scenario)


@pytest.fixture(scope="module")
def harness() -> dict:
    return {(r["controller"], r["scenario"], r["beta0"]): r for r in kl_harness_table()}


@pytest.mark.parametrize("scenario", REQUIRED)
@pytest.mark.parametrize("beta0", INIT_BETAS)
def test_default_controller_passes_every_scenario(harness, scenario, beta0):
    """Second-half mean KL within +-20% of the target and max under 1.5x, on every one of 5 noise seeds."""
    row = harness[("antiwindup", scenario, beta0)]
    assert row["ok"], row


@pytest.mark.parametrize("beta0", INIT_BETAS)
def test_pi_controller_winds_up_on_a_slow_start(harness, beta0):
    """The PI controller lowers beta while the policy does not move; the KL runs away on take-off."""
    row = harness[("pi", "slow_start", beta0)]
    assert not row["ok"] and row["max"] > 3 * TARGET and row["mean"] > 1.5 * TARGET, row


@pytest.mark.parametrize("share_scale", [0.1, 1.0])
def test_default_controller_does_not_depend_on_how_close_to_its_optimum_the_policy_gets(share_scale):
    """The simulated share is 0.3x the theory's by default; 0.1x and the full theory pass too."""
    controllers = {"antiwindup": lambda beta: AntiWindupKLController(beta, TARGET)}
    scenarios = {name: SCENARIOS[name] for name in REQUIRED}
    assert all(r["ok"] for r in kl_harness_table(controllers, scenarios, share_scale=share_scale))


def test_without_the_share_the_slow_start_winds_up_too(harness):
    """The gate on the penalty share is what prevents the windup (the rest alone does not)."""
    assert not harness[("antiwindup_no_share", "slow_start", 0.05)]["ok"]


def test_antiwindup_keeps_beta_where_the_penalty_matters_during_a_slow_start():
    kls, betas = simulate(AntiWindupKLController(0.05, TARGET), SCENARIOS["slow_start"])
    assert max(kls[:60]) < 1.5  # the policy had not moved
    assert min(betas[:60]) > 0.05 / 10  # PI: 0.05 * exp(-0.2 * 60) = 3e-7, clamped to 1e-4
    assert second_half(kls)["max"] < 1.5 * TARGET


# ---------------------------------------------------------------------------------------------
# Real tiny PPO runs: a slow start (learning-rate warm-up over a third of the run, a reward whose exploit must
# be found) and a policy fast from the first iteration (no warm-up, beta_0 50x below what holds the target)
# ---------------------------------------------------------------------------------------------

REAL_TARGET = 3.0
REAL_COMMON = [
    "ptx.ptx_coef=0.0",
    "optim.lr=3e-4",
    "train.max_steps=90",
    "kl.adaptive=true",
    f"kl.target={REAL_TARGET}",
    "reward.function=rlhf.tools.kl_scenarios:repetition_exploit",
    "reward.model_weight=0.0",
]
REAL_CASES = {
    "slow_start": ["optim.warmup_steps=30", "kl.kl_coef=0.05"],
    "fast_start": ["optim.warmup_steps=0", "kl.kl_coef=0.001"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL_CASES))
def test_default_controller_holds_the_target_in_real_runs(tiny_world, tiny_sft, tiny_rm, tmp_path, case):
    ppo.train(ppo_config(tiny_world, tiny_sft, tiny_rm, tmp_path, REAL_COMMON + REAL_CASES[case]))
    rows = [r for r in read_metrics(tmp_path) if "objective/kl" in r]
    assert len(rows) == 90
    half = [r["objective/kl"] for r in rows[45:]]
    mean = sum(half) / len(half)
    assert abs(mean / REAL_TARGET - 1) < 0.3, (case, mean, [round(r["objective/kl"], 2) for r in rows])
    assert all("objective/kl_penalty_share" in r and "objective/kl_stderr" in r for r in rows)


def test_repetition_exploit_pays_for_repeats_past_two():
    prompt = "write a short happy sentence about the cat ."
    for response, bonus in (
        ("the cat is happy today .", 0.0),
        ("the cat is happy today today today today .", 2.0),  # "today" 4 times: 2 past the second
        ("the the the the cat is happy .", 0.0),  # function words are exempt, as in the gold judge
    ):
        assert repetition_exploit(prompt, response) - gold_judge(prompt, response) == pytest.approx(bonus)
