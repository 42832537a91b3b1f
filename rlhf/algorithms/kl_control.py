"""KL-coefficient controllers: how beta (the weight of the per-token KL penalty to the SFT reference) moves.

Each controller is a small stateful object with one method the PPO loop calls once per iteration,

    update(current_kl, n_steps, penalty_share=None)

where ``current_kl`` is the batch-mean KL per sequence (nats), ``n_steps`` the episodes in the batch and
``penalty_share`` (optional) is ``beta * std_i(KL_i) / std_i(score_i)`` over the batch's sequences: how much of the
spread of the return the KL penalty accounts for (see `penalty_share`). ``value`` is the current beta;
``state_dict`` / ``load_state_dict`` make a run resume bit-exactly. They are looked up by `kl.controller` in
`KL_CONTROLLERS`; the choice of default and the scenarios it was chosen on are in docs/overoptimization.md.

References:
    [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593.
    [PID-Lagrangian] Stooke et al. 2020, "Responsive Safety in Reinforcement Learning by PID Lagrangian
        Methods", arXiv:2007.03964.
    [Astrom] Astrom & Hagglund 2006, "Advanced PID Control", ch. 3.5 (integrator windup; conditional integration).
"""

from __future__ import annotations

import math

from torch import Tensor

from rlhf.algorithms.registry import KL_CONTROLLERS

__all__ = [
    "KL_CONTROLLERS",
    "AdaptiveKLController",
    "AntiWindupKLController",
    "FixedKLController",
    "KLBudget",
    "PIKLController",
    "build_kl_controller",
    "penalty_share",
]


def penalty_share(beta: float, sequence_kl: Tensor, scores: Tensor, eps: float = 1e-8) -> float:
    """rho = beta * std(KL_i) / std(score_i) over a batch: the KL penalty's share of the return's spread.

    sequence_kl: [B] per-sequence KL (sum over the response of log pi - log pi_ref); scores: [B] the scores that
    enter the reward. At the KL-regularised optimum pi* = pi_ref * exp(score / beta) / Z, beta * log(pi*/pi_ref) =
    score - beta * log Z for every sequence, so rho = 1 there: beta is what holds the policy. A policy still far
    short of that optimum (it moves only as fast as the learning rate lets it) has rho << 1: there beta is not
    what holds the KL down, and lowering it would not raise the KL. Returns inf when the scores do not vary.
    """
    if sequence_kl.numel() < 2:
        return math.inf
    score_std = float(scores.float().std())
    if score_std < eps:
        return math.inf
    return beta * float(sequence_kl.float().std()) / score_std


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT uses a fixed beta = 0.02)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int, penalty_share: float | None = None) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.value = float(state_dict["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the observed KL towards a target ([Ziegler] sec. 2.2).

        e_t  = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)

    ``current_kl`` is the observed KL(pi || pi_ref) per sequence (sum over tokens, batch mean),
    ``n_steps`` the number of episodes (sequences) in the batch that produced it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int, penalty_share: float | None = None) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.value = float(state_dict["value"])
        self.target = float(state_dict.get("target", self.target))
        self.horizon = float(state_dict.get("horizon", self.horizon))


class PIKLController:
    """Holds the KL near a target: PI control of log(beta) on the KL predicted a few iterations ahead.

        level_t        = a * KL_t + (1 - a) * (level_{t-1} + slope_{t-1})     (a = smoothing; level_0 = KL_0)
        slope_t        = 0.8 * slope_{t-1} + 0.2 * (level_t - level_{t-1})      (the KL's trend per iteration)
        e_t            = clip((level_t + lookahead * max(slope_t, 0)) / KL_target - 1, -1, 1)
        log beta_{t+1} = log beta_t + p_gain * (e_t - e_{t-1}) + i_gain * e_t,     beta in [min_coef, max_coef]

    This is the velocity form of log beta_t = log beta_0 + p_gain * e_t + i_gain * sum_s e_s ([PID-Lagrangian]
    applied to beta): the integral term moves beta until the KL sits at the target whatever beta_0 was, the
    proportional term reacts at once to a change of the KL. Acting on the KL predicted `lookahead` iterations ahead
    stops beta's fall as soon as the KL is on its way. The level and trend are Holt's linear smoothing of the batch
    KL, whose noise the lookahead would otherwise multiply into beta. Working in log(beta) makes the gains
    scale-free (a step is a factor on beta). e_{-1} = e_0 and slope_0 = 0, so the first update has no kick.

    Known failure (`rlhf.tools.kl_scenarios`' slow-start scenario): a policy that does not move for tens of
    iterations keeps e_t at -1, so beta falls by exp(-i_gain) per iteration to `min_coef` (integral windup); when
    the policy then takes off, beta climbs back by at most exp(p_gain + i_gain) per iteration from there, too late.
    `AntiWindupKLController` is this controller with that fixed.
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        p_gain: float = 1.0,
        i_gain: float = 0.2,
        lookahead: float = 10.0,
        smoothing: float = 0.3,
        min_coef: float = 1e-4,
        max_coef: float = 10.0,
    ):
        if target <= 0 or init_kl_coef <= 0 or not 0 < min_coef <= max_coef or lookahead < 0 or not 0 < smoothing <= 1:
            raise ValueError(
                f"need target > 0, init_kl_coef > 0, lookahead >= 0, 0 < smoothing <= 1 and 0 < min_coef <= "
                f"max_coef, got target={target}, init_kl_coef={init_kl_coef}, lookahead={lookahead}, "
                f"smoothing={smoothing}, min_coef={min_coef}, max_coef={max_coef}"
            )
        self.value = min(max(float(init_kl_coef), min_coef), max_coef)
        self.target, self.p_gain, self.i_gain = float(target), float(p_gain), float(i_gain)
        self.lookahead, self.smoothing = float(lookahead), float(smoothing)
        self.min_coef, self.max_coef = float(min_coef), float(max_coef)
        self.prev_error: float | None = None
        self.level: float | None = None
        self.slope = 0.0

    def track(self, kl: float) -> None:
        """Holt's linear smoothing of the batch KL: `level` and its trend `slope` per iteration."""
        if self.level is None:
            self.level = kl
        else:
            level = self.smoothing * kl + (1 - self.smoothing) * (self.level + self.slope)
            self.slope = 0.8 * self.slope + 0.2 * (level - self.level)
            self.level = level

    def predicted_error(self, max_error: float) -> float:
        """The relative error of the KL predicted `lookahead` iterations ahead (rising trends only), clipped."""
        predicted = self.level + self.lookahead * max(self.slope, 0.0)
        return min(max(predicted / self.target - 1.0, -1.0), max_error)

    def update(self, current_kl: float, n_steps: int = 1, penalty_share: float | None = None) -> None:
        """One iteration's update from its batch-mean KL per sequence (`n_steps` is unused: one step per call)."""
        self.track(float(current_kl))
        error = self.predicted_error(1.0)
        prev = error if self.prev_error is None else self.prev_error
        self.step_log_beta(self.p_gain * (error - prev) + self.i_gain * error, self.min_coef)
        self.prev_error = error

    def step_log_beta(self, delta: float, floor: float) -> None:
        self.value = min(max(self.value * math.exp(delta), floor), self.max_coef)

    def state_dict(self) -> dict:
        return {"value": self.value, "prev_error": self.prev_error, "level": self.level, "slope": self.slope}

    def load_state_dict(self, state_dict: dict) -> None:
        self.value = float(state_dict["value"])
        self.prev_error, self.level, self.slope = state_dict["prev_error"], state_dict["level"], state_dict["slope"]


class AntiWindupKLController(PIKLController):
    """The PI controller without integral windup, quicker to act when the KL overshoots, robust to batch noise.

        level_t, slope_t  Holt's smoothing of the batch KL, as PIKLController
        v_t               = 0.9 v_{t-1} + 0.1 (KL_t - level_{t-1} - slope_{t-1})^2     (the batch KL's noise)
        trend_t           = s^3 / (s^2 + 0.135^2 * smoothing * v_t),  s = max(slope_t, 0)   (shrunk by its noise)
        e_t               = clip((level_t + lookahead * trend_t) / KL_target - 1, -1, max_error)
        g_t               = min(1, rho_t / min_share) if e_t < 0 else 1        (conditional integration)
        d_t               = clip(p_gain * (e_t - e_{t-1}) + g_t * i_gain * e_t, -max_step, max_step)
        log beta_{t+1}    = log beta_t + d_t,      beta in [min_coef, max_coef]

    rho_t is `penalty_share` (beta * std(KL_i) / std(score_i), 1 at the KL-regularised optimum). Why each part:

    - **Conditional integration** ([Astrom] 3.5): lowering beta raises the KL only where beta is what holds the
      policy, i.e. near the optimum for the current beta (rho ~ 1). A policy that is slow to move (low learning
      rate, a reward it has not yet found how to climb) has rho << 1: the penalty is a negligible part of its
      return and a lower beta would not make it move faster. There the error still says "raise the KL", and
      the PI controller keeps integrating it into a lower beta — the windup that lets the KL run far past its
      target when the policy takes off. Here the fall is scaled by rho / min_share. min_share 0.1 = "the penalty
      moves the return by a tenth of the score's spread"; shares near the target sit below the theory's 1 (with
      one sample per prompt, std(score) also holds the spread between prompts). Raising beta is never gated: too
      high a KL is the harm.
    - **Asymmetric error clip**: the integral lowers log beta by at most i_gain per iteration (e >= -1) but
      raises it by up to i_gain * max_error, so a KL predicted at 3x the target climbs twice as fast as the fall
      that preceded it; the lookahead on the smoothed trend makes that happen as soon as the trend turns up.
    - **A trend shrunk by its noise**: extrapolating max(slope, 0) of a noisy KL is biased upward (it holds the
      KL under the target); a trend well above the slope's noise level passes whole.
    - **A symmetric step limit**: one batch cannot move beta by more than a factor e^max_step, either way, so a
      single outlier batch (one that would raise beta by an order of magnitude and hold the KL far under the
      target for many iterations) is undone as fast as it was done.
    - **Only the integral is gated**: the proportional term cannot wind up (its sum telescopes to
      p_gain * (e_t - e_0)), and gating or clipping it one way would turn zero-mean batch noise into a bias
      toward a high beta (a KL held well under the target on `rlhf.tools.kl_scenarios`' noisy scenarios).

    Without rho (``penalty_share=None``) there is no conditional integration.
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        p_gain: float = 1.0,
        i_gain: float = 0.2,
        lookahead: float = 10.0,
        smoothing: float = 0.3,
        min_coef: float = 1e-4,
        max_coef: float = 10.0,
        min_share: float = 0.1,
        max_error: float = 2.0,
        max_step: float = 1.0,
    ):
        super().__init__(init_kl_coef, target, p_gain, i_gain, lookahead, smoothing, min_coef, max_coef)
        if min_share <= 0 or max_error < 1 or max_step <= 0:
            raise ValueError(
                f"need min_share > 0, max_error >= 1 and max_step > 0, got {min_share}, {max_error}, {max_step}"
            )
        self.min_share, self.max_error, self.max_step = float(min_share), float(max_error), float(max_step)
        self.residual_var = 0.0

    def track(self, kl: float) -> None:
        """Holt's smoothing, and the running variance of its one-step forecast errors (the batch KL's noise)."""
        if self.level is not None:
            residual = kl - (self.level + self.slope)
            self.residual_var = 0.9 * self.residual_var + 0.1 * residual * residual
        super().track(kl)

    def predicted_error(self, max_error: float) -> float:
        """As PIKLController's, with the trend shrunk by its significance: slope * s^2 / (s^2 + var(slope noise))."""
        slope = max(self.slope, 0.0)
        # Holt's trend on white noise of std r has std ~0.135 * sqrt(smoothing) * r (empirical, for trend gain 0.2)
        noise_var = 0.135**2 * self.smoothing * self.residual_var
        trend = slope**3 / (slope**2 + noise_var) if slope > 0 else 0.0
        predicted = self.level + self.lookahead * trend
        return min(max(predicted / self.target - 1.0, -1.0), max_error)

    def update(self, current_kl: float, n_steps: int = 1, penalty_share: float | None = None) -> None:
        """One iteration's update from its batch-mean KL per sequence and (optionally) the penalty share rho."""
        self.track(float(current_kl))
        error = self.predicted_error(self.max_error)
        prev = error if self.prev_error is None else self.prev_error
        integral = self.i_gain * error
        if integral < 0 and penalty_share is not None and math.isfinite(penalty_share):
            integral *= min(1.0, max(penalty_share, 0.0) / self.min_share)
        step = self.p_gain * (error - prev) + integral
        self.step_log_beta(min(max(step, -self.max_step), self.max_step), self.min_coef)
        self.prev_error = error

    def state_dict(self) -> dict:
        return super().state_dict() | {"residual_var": self.residual_var}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.residual_var = float(state_dict.get("residual_var", 0.0))


class KLBudget:
    """A hard KL budget: the mean of the last `window` iterations' KL, and whether it has passed `limit`.

        smoothed_t = mean(KL_{t-window+1}, ..., KL_t)        exceeded = limit > 0 and smoothed_t > limit

    The window keeps one noisy batch from ending a run; `limit` 0 never stops.
    """

    def __init__(self, limit: float, window: int = 5):
        if limit < 0 or window < 1:
            raise ValueError(f"need limit >= 0 and window >= 1, got limit={limit}, window={window}")
        self.limit, self.window = float(limit), int(window)
        self.history: list[float] = []

    def update(self, current_kl: float) -> bool:
        self.history = (self.history + [float(current_kl)])[-self.window :]
        return self.exceeded

    @property
    def smoothed(self) -> float:
        return sum(self.history) / len(self.history) if self.history else 0.0

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.smoothed > self.limit

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [float(x) for x in state_dict["history"]]


# KL_CONTROLLERS[kl.controller]: a builder from the `kl` config section (used when kl.adaptive is true)
def _pi_args(kl) -> tuple:
    return (kl.kl_coef, kl.target, kl.p_gain, kl.i_gain, kl.lookahead, kl.smoothing, kl.min_coef, kl.max_coef)


@KL_CONTROLLERS.register("antiwindup")
def _antiwindup(kl) -> AntiWindupKLController:
    return AntiWindupKLController(*_pi_args(kl), kl.min_share, kl.max_error, kl.max_step)


@KL_CONTROLLERS.register("pi")
def _pi(kl) -> PIKLController:
    return PIKLController(*_pi_args(kl))


@KL_CONTROLLERS.register("proportional")
def _proportional(kl) -> AdaptiveKLController:
    return AdaptiveKLController(kl.kl_coef, kl.target, kl.horizon)


def build_kl_controller(kl):
    """The beta schedule of a `kl` config section: fixed unless kl.adaptive, else KL_CONTROLLERS[kl.controller]."""
    if not kl.adaptive:
        return FixedKLController(kl.kl_coef)
    return KL_CONTROLLERS[kl.controller](kl)
