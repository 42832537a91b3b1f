"""Demonstrators: responses with controlled flaws, and ranked comparisons of them under the gold judge.

A demonstrator gets each judge criterion wrong with its own probability (:data:`DEMONSTRATORS`); :func:`compose`
writes a response that makes exactly the drawn mistakes, so the data's quality spread is known by construction.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from rlhf.tiny.grammar import (
    ADVERBS,
    LENGTH_RANGES,
    MOOD_ADJECTIVES,
    MOOD_VERBS,
    NEUTRAL_ADJECTIVES,
    NEUTRAL_VERBS,
    OPPOSITE_MOOD,
    PLACE_PREPS,
    PLACES,
    SKY_NOUNS,
    STANDALONE_ADVERBS,
    SUBJECTS,
    parse_prompt,
)
from rlhf.tiny.judge import MAX_REPEATS, REPEAT_EXEMPT, gold_judge


@dataclass(frozen=True)
class Flaws:
    """What one response gets wrong on purpose (None = that criterion is done right)."""

    mood: str | None = None  # "mixed" | "wrong" | "none"
    length: str | None = None  # "band": word count from the other length band
    place: str | None = None  # "forget" | "wrong" | "ramble"
    subject: str | None = None  # "extra" | "wrong" | "none"
    ending: str | None = None  # "no_period" | "double_period" | "repeat"


# Probability that a demonstrator gets each criterion wrong. "noisy" is the SFT demonstrator: tuned so that its mean
# gold score is ~0.8, which leaves headroom for RL. The others add quality spread to the comparison data.
DEMONSTRATORS = {
    "expert": {"mood": 0.0, "length": 0.0, "place": 0.0, "subject": 0.0, "ending": 0.0},
    "noisy": {"mood": 0.3, "length": 0.25, "place": 0.2, "subject": 0.15, "ending": 0.1},
    "sloppy": {"mood": 0.5, "length": 0.5, "place": 0.4, "subject": 0.35, "ending": 0.3},
    "bad": {"mood": 0.85, "length": 0.8, "place": 0.7, "subject": 0.7, "ending": 0.5},
}
COMPARISON_DEMONSTRATOR_WEIGHTS = {"expert": 0.15, "noisy": 0.4, "sloppy": 0.25, "bad": 0.2}
# Word counts used when a demonstrator misses the length: the other band, a bit widened.
WRONG_LENGTH_RANGES = {"short": (10, 18), "long": (3, 7)}


def sample_flaws(rng: random.Random, demonstrator: str, attrs: dict) -> Flaws:
    """The mistakes one response of ``demonstrator`` makes on a prompt asking for ``attrs``."""
    p = DEMONSTRATORS[demonstrator]
    mood = rng.choices(("mixed", "wrong", "none"), (0.4, 0.3, 0.3))[0] if rng.random() < p["mood"] else None
    length = "band" if rng.random() < p["length"] else None
    place = None
    if rng.random() < p["place"]:
        # Without an asked place the only possible mistake is rambling, which is rarer.
        if attrs["place"] is None:
            place = "ramble" if rng.random() < 0.5 else None
        else:
            place = rng.choices(("forget", "wrong", "ramble"), (0.4, 0.45, 0.15))[0]
    # A wrong animal is the most common subject slip, so the comparisons teach a reward model to check the subject
    # against the prompt (with mostly "extra" slips a policy can swap animals unpunished).
    subject = rng.choices(("extra", "wrong", "none"), (0.3, 0.5, 0.2))[0] if rng.random() < p["subject"] else None
    ending = rng.choice(("no_period", "double_period", "repeat")) if rng.random() < p["ending"] else None
    return Flaws(mood=mood, length=length, place=place, subject=subject, ending=ending)


def _can_add(counts: Counter, words: list[str]) -> bool:
    extra = Counter(w for w in words if w not in REPEAT_EXEMPT)
    return all(counts[w] + c <= MAX_REPEATS for w, c in extra.items())


def _filler(rng: random.Random, max_size: int, mood: str | None) -> list[str]:
    """One neutral or ``mood`` clause of 1 to ``max_size`` words (``max_size`` >= 1)."""
    options = [
        (1, lambda: [rng.choice(STANDALONE_ADVERBS)]),
        (2, lambda: ["all", "day"]),
        (2, lambda: ["at", "night"]),
        (3, lambda: ["and", "it", rng.choice(NEUTRAL_VERBS)]),
        (3, lambda: ["under", "the", rng.choice(SKY_NOUNS)]),
        (3, lambda: ["in", "the", "morning"]),
        (4, lambda: ["and", "it", rng.choice(NEUTRAL_VERBS), rng.choice(ADVERBS)]),
        (4, lambda: ["with", "a", rng.choice(NEUTRAL_ADJECTIVES), "friend"]),
        (2, lambda: ["every", "day"]),
        (2, lambda: ["this", "morning"]),
        (3, lambda: ["in", "the", "evening"]),
        (3, lambda: ["after", "the", "rain"]),
        (3, lambda: ["by", "the", "tree"]),
        (3, lambda: ["with", "the", rng.choice(SKY_NOUNS)]),
        (3, lambda: ["with", "its", "friend"]),
        (4, lambda: ["and", "then", "it", rng.choice(NEUTRAL_VERBS)]),
        (5, lambda: ["and", "it", "likes", "the", rng.choice(SKY_NOUNS)]),
    ]
    if mood is not None:
        options += [
            (3, lambda: ["and", "it", rng.choice(MOOD_VERBS[mood])]),
            (4, lambda: ["and", "it", "feels", rng.choice(MOOD_ADJECTIVES[mood])]),
            (4, lambda: ["and", "it", rng.choice(MOOD_VERBS[mood]), rng.choice(ADVERBS)]),
        ]
    return rng.choice([make for size, make in options if size <= max_size])()


def compose(rng: random.Random, attrs: dict, flaws: Flaws) -> str:
    """Build one response to ``attrs`` that makes exactly the mistakes in ``flaws`` (a flawless one scores 1.0)."""
    mood, asked_place = attrs["mood"], attrs["place"]
    opposite = OPPOSITE_MOOD[mood]
    word_mood = {None: mood, "mixed": mood, "wrong": opposite, "none": None}[flaws.mood]
    other_animals = [a for a in SUBJECTS if a != attrs["subject"]]

    subject = rng.choice(other_animals) if flaws.subject == "wrong" else attrs["subject"]
    core = ["it", "is"] if flaws.subject == "none" else ["the", subject, "is"]
    core.append(rng.choice(MOOD_ADJECTIVES[word_mood]) if word_mood else rng.choice(NEUTRAL_ADJECTIVES))

    segments: list[list[str]] = []
    if asked_place is None:
        places = rng.sample(PLACES, 2) if flaws.place == "ramble" else []
    else:
        other = rng.choice([p for p in PLACES if p != asked_place])
        places = {None: [asked_place], "forget": [], "wrong": [other], "ramble": [asked_place, other]}[flaws.place]
    segments += [[rng.choice(PLACE_PREPS), "the", p] for p in places]
    if flaws.subject == "extra":
        segments.append(["with", "the", rng.choice(other_animals)])
    if flaws.mood == "mixed":
        segments.append(["and", "it", rng.choice(MOOD_VERBS[opposite])])

    counts = Counter(w for seg in [core, *segments] for w in seg if w not in REPEAT_EXEMPT)
    lo, hi = (WRONG_LENGTH_RANGES if flaws.length == "band" else LENGTH_RANGES)[attrs["length"]]
    required = len(core) + sum(len(seg) for seg in segments)
    remaining = (rng.randint(max(lo, required), hi) if required <= hi else required) - required
    for _ in range(100):  # bounded: a filler may be rejected for repeating a word too often
        if remaining <= 0:
            break
        if "very" not in core and rng.random() < 0.1:
            core.insert(len(core) - 1, "very")  # "the cat is very happy"
            remaining -= 1
            continue
        seg = _filler(rng, remaining, word_mood)
        if _can_add(counts, seg):
            counts.update(w for w in seg if w not in REPEAT_EXEMPT)
            segments.append(seg)
            remaining -= len(seg)
    rng.shuffle(segments)
    tokens = core + [w for seg in segments for w in seg]

    if flaws.ending == "repeat":
        # Ramble: repeat one content word until it occurs MAX_REPEATS + 1 times.
        word = rng.choice([w for w in tokens if w not in REPEAT_EXEMPT])
        idx = len(tokens) - tokens[::-1].index(word)
        tokens[idx:idx] = [word] * (MAX_REPEATS + 1 - tokens.count(word))
    if flaws.ending == "no_period":
        pass
    elif flaws.ending == "double_period":
        if rng.random() < 0.5:
            tokens += [".", "."]
        else:
            tokens.insert(rng.randint(2, len(tokens) - 1), ".")
            tokens.append(".")
    else:
        tokens.append(".")
    return " ".join(tokens)


def respond(rng: random.Random, attrs: dict, demonstrator: str) -> str:
    """One response of ``demonstrator`` to a prompt asking for ``attrs``: flaws drawn, then composed."""
    return compose(rng, attrs, sample_flaws(rng, demonstrator, attrs))


# Share of comparison prompts whose responses include minimal pairs (see ranked_responses).
MINIMAL_PAIR_SHARE = 0.5


def swapped_variants(rng: random.Random, attrs: dict, response: str) -> list[str]:
    """Copies of ``response`` with the subject, the mood words or the place swapped for wrong ones (shuffled)."""
    words = response.split()
    out = []
    if attrs["subject"] in words:
        other = rng.choice([a for a in SUBJECTS if a != attrs["subject"]])
        out.append(" ".join(other if w == attrs["subject"] else w for w in words))
    mood, opposite = attrs["mood"], OPPOSITE_MOOD[attrs["mood"]]
    swap = {w: rng.choice(MOOD_ADJECTIVES[opposite]) for w in MOOD_ADJECTIVES[mood]}
    swap |= {w: rng.choice(MOOD_VERBS[opposite]) for w in MOOD_VERBS[mood]}
    if any(w in swap for w in words):
        out.append(" ".join(swap.get(w, w) for w in words))
    if attrs["place"] is not None and attrs["place"] in words:
        other = rng.choice([p for p in PLACES if p != attrs["place"]])
        out.append(" ".join(other if w == attrs["place"] else w for w in words))
    rng.shuffle(out)
    return out


def ranked_responses(rng: random.Random, prompt: str, k: int, min_gap: float) -> tuple[list[str], list[float]]:
    """K distinct responses from demonstrators of varied quality, best first, consecutive gold scores >= min_gap apart.

    Resampled until the gap holds so that every pairwise preference is meaningful under the gold judge."""
    attrs = parse_prompt(prompt)
    names, weights = zip(*COMPARISON_DEMONSTRATOR_WEIGHTS.items())
    chosen: dict[str, float] = {}
    if rng.random() < MINIMAL_PAIR_SHARE:
        # Minimal pairs: a good response and copies of it with one prompt-dependent detail swapped, so the only way
        # to rank them is to check the response against the prompt (not a prior over animals or moods).
        base = respond(rng, attrs, rng.choice(("expert", "noisy")))
        for response in [base, *swapped_variants(rng, attrs, base)]:
            score = gold_judge(prompt, response)
            if (
                len(chosen) < k
                and response not in chosen
                and all(abs(score - s) >= min_gap - 1e-9 for s in chosen.values())
            ):
                chosen[response] = score
    for _ in range(10_000):
        if len(chosen) == k:
            break
        response = respond(rng, attrs, rng.choices(names, weights)[0])
        score = gold_judge(prompt, response)
        if response not in chosen and all(abs(score - s) >= min_gap - 1e-9 for s in chosen.values()):
            chosen[response] = score
    else:
        raise RuntimeError(f"could not sample {k} responses with gold gaps >= {min_gap} for {prompt!r}")
    ranked = sorted(chosen, key=lambda r: (-chosen[r], r))
    return ranked, [chosen[r] for r in ranked]
