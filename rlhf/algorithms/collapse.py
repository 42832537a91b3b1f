"""Signs that a policy has collapsed, measured against the SFT policy's, and the limits that flag it.

A policy optimised against a learned reward can find what the reward over-scores — a word repeated, answers that
never end — while every reward model that shares the optimised ones' biases (a held-out ensemble member too)
keeps scoring it higher. Best-checkpoint selection by a proxy score alone then promotes the collapsed policy.
These are the model-free signs, each compared with the SFT policy's on the same prompts:

    repeat_share    share of responses in which some n-gram (n <= max_ngram) occurs `repeat_times` times in a row
    distinct2       `distinct_n(samples, 2)`: unique bigrams / all bigrams; flagged below min_distinct2_ratio x SFT's
    length          mean response length; flagged outside [min_length_ratio, max_length_ratio] x SFT's
    eos_share       share of responses that end; flagged below min_eos_share_ratio x SFT's
    kl_to_sft       flagged above max_kl (the run's KL budget, or max_kl_over_target x its KL target)

`rlhf eval`'s frontier never promotes a flagged checkpoint; PPO logs rollout/repeat_share every iteration and,
with `collapse.stop: true`, stops a run whose signs (against its first iteration's, which is SFT's) cross them.

References:
    [distinct-n] Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models",
        arXiv:1510.03055.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CollapseMonitor", "collapse_reasons", "distinct_n", "has_tandem_repeat", "kl_limit", "repeat_share"]


def has_tandem_repeat(tokens: Sequence, max_ngram: int = 4, times: int = 3) -> bool:
    """True when some n-gram (1 <= n <= max_ngram) of `tokens` occurs `times` times in a row.

    `tokens`: token ids or words of one response. "today today today" (n = 1) and "a b a b a b" (n = 2) repeat
    three times; "a b a c a" does not.
    """
    length = len(tokens)
    for n in range(1, max_ngram + 1):
        span = n * times
        for start in range(length - span + 1):
            gram = tokens[start : start + n]
            if all(tokens[start + k * n : start + (k + 1) * n] == gram for k in range(1, times)):
                return True
    return False


def repeat_share(token_lists: Sequence[Sequence], max_ngram: int = 4, times: int = 3) -> float:
    """Share of responses with a tandem repeat (`has_tandem_repeat`); 0 for no responses."""
    if not token_lists:
        return 0.0
    return sum(has_tandem_repeat(list(t), max_ngram, times) for t in token_lists) / len(token_lists)


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams over every sequence ([distinct-n]); falling values mean repetitive outputs.

    Plain lists of token ids (responses without EOS/padding) -> a float in [0, 1] (0 when there is no n-gram).
    """
    grams = [tuple(t[i : i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def kl_limit(limits, kl_section: dict | None) -> float:
    """The KL above which a checkpoint is flagged: limits.max_kl if set, else the run's kl.budget if set, else
    max_kl_over_target x kl.target for an adaptive run; 0 = no KL limit. `kl_section`: the run's `kl` config."""
    if limits.max_kl > 0:
        return float(limits.max_kl)
    kl = kl_section or {}
    if kl.get("budget", 0) > 0:
        return float(kl["budget"])
    if kl.get("adaptive") and kl.get("target", 0) > 0 and limits.max_kl_over_target > 0:
        return float(limits.max_kl_over_target * kl["target"])
    return 0.0


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def collapse_reasons(metrics: dict, sft: dict, limits, max_kl: float = 0.0) -> list[str]:
    """Why a policy counts as collapsed (empty = it does not): each sign past its limit, with the numbers.

    `metrics` / `sft`: the policy's and the SFT policy's measurements on the same prompts (keys repeat_share,
    distinct2, length, eos_share, kl_to_sft; a missing key is not judged). `limits`: a CollapseLimits.
    """
    reasons = []
    if "repeat_share" in metrics and metrics["repeat_share"] - sft.get("repeat_share", 0.0) > limits.max_repeat_share:
        reasons.append(
            f"repeat share {metrics['repeat_share']:.2f} (SFT {sft.get('repeat_share', 0.0):.2f}): responses "
            f"repeating an n-gram {limits.repeat_times}x in a row exceed SFT's by more than {limits.max_repeat_share}"
        )
    checks = (
        ("distinct2", "distinct-2", limits.min_distinct2_ratio, None),
        ("length", "mean length", limits.min_length_ratio, limits.max_length_ratio),
        ("eos_share", "EOS share", limits.min_eos_share_ratio, None),
    )
    for key, label, low, high in checks:
        if key not in metrics or key not in sft:
            continue
        ratio = _ratio(metrics[key], sft[key])
        if ratio is None:
            continue
        if low and ratio < low:
            reasons.append(f"{label} {metrics[key]:.3g} is {ratio:.2f}x SFT's {sft[key]:.3g} (limit {low}x)")
        if high and ratio > high:
            reasons.append(f"{label} {metrics[key]:.3g} is {ratio:.2f}x SFT's {sft[key]:.3g} (limit {high}x)")
    if max_kl > 0 and metrics.get("kl_to_sft", 0.0) > max_kl:
        reasons.append(f"KL to SFT {metrics['kl_to_sft']:.2f} is above {max_kl:g} (the run's KL limit)")
    return reasons


class CollapseMonitor:
    """PPO's live collapse check: the rollouts' signs averaged over `window` iterations against the first
    iteration's, which the SFT policy sampled (the policy starts as SFT).

    `update(signs)` takes one iteration's {repeat_share, distinct2, length, eos_share} and returns the reasons
    (`collapse_reasons`, no KL check: kl.budget does that) once `window` iterations are in; `stopped` records that
    a guard stopped the run on them, so a resumed run does not train on.
    """

    KEYS = ("repeat_share", "distinct2", "length", "eos_share")

    def __init__(self, limits, window: int = 5):
        self.limits, self.window = limits, int(window)
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        self.stopped = False

    def update(self, signs: dict) -> list[str]:
        signs = {k: float(signs[k]) for k in self.KEYS}
        if self.baseline is None:
            self.baseline = signs
        self.history = (self.history + [signs])[-self.window :]
        if len(self.history) < self.window:
            return []
        smoothed = {k: sum(h[k] for h in self.history) / len(self.history) for k in self.KEYS}
        return collapse_reasons(smoothed, self.baseline, self.limits)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "history": list(self.history), "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.baseline, self.history = state_dict["baseline"], list(state_dict["history"])
        self.stopped = bool(state_dict["stopped"])
