"""A cheap simulated KL process on which KL controllers are tried on dynamics they were not tuned on.

The simulated policy follows the textbook picture of KL-regularised RL: for a reward whose spread over the
policy's samples is sigma, the optimum at beta is pi* = pi_ref * exp(score / beta) / Z, whose KL to the reference
is KL*(beta) = sigma^2 / (2 beta^2) (a Gaussian score; beta = sigma / sqrt(2 * target) holds the target). The
policy moves toward KL* with time constant `tau`, by at most `mobility(t)` nats per iteration (the learning rate
limits how fast a policy moves). On the way, the policy sits on the path pi_lambda = pi_ref * exp(lambda * score)
/ Z with KL = lambda^2 sigma^2 / 2, so the penalty share the trainer measures, beta * std(KL_i) / std(score_i), is
beta * lambda = beta * sqrt(2 KL) / sigma (1 at the optimum). The controller sees the KL and the share with
relative batch noise. Each scenario breaks one assumption a controller could have been tuned on:

    slow_start     the policy barely moves for 60 iterations, then takes off
    fast_start     the policy moves fast from the first iteration
    exploit        the reward's exploitable spread triples at iteration 60 (a hack the policy finds mid-run)
    exploit_found  the spread triples once the policy is past half the target's KL, and drops back below it
    lagged         responds to beta 3 iterations late and slowly (a controller that reacts too hard oscillates)
    noisy          per-iteration KL and share with 30% relative noise (a batch of ~16 episodes)
    very_noisy     50% relative noise (a batch of a few episodes): reported, not required (no controller holds it)

`kl_harness_table` runs every controller on every scenario from beta_0 in {0.001, 0.05, 1} and reports the true
KL over the second half of the run against the target (mean, max, share of iterations above 1.5x target), over 5
seeds of the noise.
`scripts/kl_control.py` prints the table; tests/test_kl_control.py asserts the default controller passes.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from rlhf.algorithms.kl_control import AdaptiveKLController, AntiWindupKLController, PIKLController
from rlhf.tiny import REPEAT_EXEMPT, gold_judge

TARGET = 6.0
INIT_BETAS = (0.001, 0.05, 1.0)


# the share a trainer measures is below the theory's beta * lambda: with one sample per prompt, std(score) also
# holds the spread between prompts, which no policy change removes
SHARE_SCALE = 0.3
SIGMA = 0.05 * math.sqrt(2 * TARGET)  # beta = 0.05 holds the target before any exploit appears


@dataclass(frozen=True)
class KLScenario:
    """Simulated dynamics: `sigma(t, kl)` the reward's exploitable spread at iteration t for a policy at KL `kl`,
    `mobility(t)` the most nats per iteration the policy's KL can move (by default a constant spread SIGMA and 1 nat
    per iteration)."""

    name: str
    description: str
    sigma: Callable[[int, float], float] = lambda t, kl: SIGMA  # noqa: E731
    mobility: Callable[[int], float] = lambda t: 1.0  # noqa: E731
    tau: float = 10.0
    noise: float = 0.1
    steps: int = 150
    delay: int = 0  # the policy responds to the beta of this many iterations ago (rollout, then update)


SCENARIOS = {
    s.name: s
    for s in (
        KLScenario(
            "slow_start",
            "barely moves (0.02 nats/it) for 60 iterations, then takes off (1.5 nats/it)",
            mobility=lambda t: 0.02 if t < 60 else 1.5,
        ),
        KLScenario(
            "fast_start",
            "moves fast from the first iteration (tau 2, up to 4 nats/it)",
            mobility=lambda t: 4.0,
            tau=2.0,
        ),
        KLScenario(
            "exploit",
            "the reward's exploitable spread triples at iteration 60 (KL* x9)",
            sigma=lambda t, kl: SIGMA * (3.0 if t >= 60 else 1.0),
            mobility=lambda t: 1.5,
        ),
        KLScenario(
            "exploit_found",
            "the exploit pays only past half the target's KL, and stops paying below: invites a limit cycle",
            sigma=lambda t, kl: SIGMA * (3.0 if kl > 0.5 * TARGET else 1.0),
            mobility=lambda t: 1.5,
            delay=2,
        ),
        KLScenario(
            "lagged",
            "responds to beta 3 iterations late and slowly (tau 20): invites a limit cycle",
            tau=20.0,
            delay=3,
        ),
        KLScenario(
            "noisy",
            "30% relative noise on the KL and the share the controller sees (a batch of ~16 episodes)",
            noise=0.3,
        ),
        KLScenario(
            "very_noisy",
            "50% relative noise (a batch of ~4-8 episodes): a stress row, beyond what any controller here holds",
            noise=0.5,
        ),
    )
}


def simulate(controller, scenario: KLScenario, seed: int = 0, share_scale: float = SHARE_SCALE) -> tuple[list, list]:
    """Run `controller` on `scenario`; returns (true KL per iteration, beta per iteration). `share_scale`: the
    measured penalty share as a fraction of the theory's (1 = a policy that reaches the KL-regularised optimum)."""
    rng = random.Random(seed)
    kl, kls, betas = 0.0, [], []

    def noisy(x: float) -> float:  # what a batch of episodes measures
        return max(0.0, x * (1 + scenario.noise * rng.gauss(0, 1)))

    for t in range(scenario.steps):
        sigma = scenario.sigma(t, kl)
        beta = controller.value
        share = share_scale * beta * math.sqrt(2 * kl) / sigma
        controller.update(noisy(kl), 64, noisy(share))
        betas.append(controller.value)
        optimum = sigma**2 / (2 * betas[max(0, len(betas) - 1 - scenario.delay)] ** 2)
        step = (optimum - kl) / scenario.tau
        mobility = scenario.mobility(t)
        kl = max(0.0, kl + max(-mobility, min(mobility, step)))
        kls.append(kl)
    return kls, betas


def second_half(kls: list[float], target: float = TARGET) -> dict[str, float]:
    """The KL over the second half of a run against the target: mean, max, share of iterations above 1.5x."""
    half = kls[len(kls) // 2 :]
    return {
        "mean": sum(half) / len(half),
        "max": max(half),
        "above_1.5x": sum(k > 1.5 * target for k in half) / len(half),
    }


class _NoShare:
    """A controller that is never told the penalty share (what the anti-windup does on the KL alone)."""

    def __init__(self, controller):
        self.controller = controller

    @property
    def value(self) -> float:
        return self.controller.value

    def update(self, current_kl: float, n_steps: int, penalty_share: float | None = None) -> None:
        self.controller.update(current_kl, n_steps)


CONTROLLERS: dict[str, Callable[[float], object]] = {
    "antiwindup": lambda beta: AntiWindupKLController(beta, TARGET),
    "antiwindup_no_share": lambda beta: _NoShare(AntiWindupKLController(beta, TARGET)),
    "pi": lambda beta: PIKLController(beta, TARGET),
    "proportional": lambda beta: AdaptiveKLController(beta, TARGET, horizon=10000),
}


def kl_harness_table(
    controllers=CONTROLLERS, scenarios=SCENARIOS, init_betas=INIT_BETAS, seeds=range(5), share_scale=SHARE_SCALE
) -> list:
    """One row per (controller, scenario, beta_0) over `seeds` noise draws: the second-half KL's mean (averaged
    over seeds), max and share above 1.5x target (worst seed), and ok = every seed held the mean within +-20% of
    the target and the max under 1.5x."""
    rows = []
    for cname, make in controllers.items():
        for scenario in scenarios.values():
            for beta in init_betas:
                runs = [simulate(make(beta), scenario, seed, share_scale) for seed in seeds]
                stats = [second_half(kls) for kls, _ in runs]
                ok = all(abs(s["mean"] / TARGET - 1) <= 0.2 and s["max"] < 1.5 * TARGET for s in stats)
                rows.append(
                    {
                        "controller": cname,
                        "scenario": scenario.name,
                        "beta0": beta,
                        "mean": sum(s["mean"] for s in stats) / len(stats),
                        "max": max(s["max"] for s in stats),
                        "above_1.5x": max(s["above_1.5x"] for s in stats),
                        "final_beta": sum(betas[-1] for _, betas in runs) / len(runs),
                        "ok": ok,
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of `kl_harness_table` rows: one line per (scenario, beta_0), one column per controller
    with the second-half mean / max KL (worst seed) and whether every seed held the target."""
    controllers = list(dict.fromkeys(r["controller"] for r in rows))
    cells = {(r["scenario"], r["beta0"], r["controller"]): r for r in rows}
    lines = [
        f"| scenario | beta_0 | {' | '.join(controllers)} |",
        "|---|---|" + "---|" * len(controllers),
    ]
    for scenario, beta in dict.fromkeys((r["scenario"], r["beta0"]) for r in rows):
        row = [cells[(scenario, beta, c)] for c in controllers]
        text = [f"{r['mean']:.1f} / {r['max']:.1f} {'ok' if r['ok'] else '**fail**'}" for r in row]
        lines.append(f"| {scenario} | {beta:g} | {' | '.join(text)} |")
    return "\n".join(lines)


def repetition_exploit(prompt: str, response: str) -> float:
    """A tiny-world reward with an exploit that appears only after some optimisation, as reward hacks do.

    The gold judge's score plus 1 for every repeat of a word past its second occurrence in the response (the
    tiny world's demonstrators never repeat a content word more than twice, so the SFT policy almost never earns
    it): flat at first, then the policy finds that repeating pays, and the KL takes off.
    """
    counts = Counter(w for w in response.split() if w not in REPEAT_EXEMPT and w.isalpha())
    return gold_judge(prompt, response) + float(sum(max(0, c - 2) for c in counts.values()))
