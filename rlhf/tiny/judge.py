"""The gold judge: the tiny world's stand-in for the human labeler, so every stage is measured on the true objective.

:func:`gold_judge` scores a (raw prompt, raw response) pair in [0, 1] as the sum of five weighted criteria
(:data:`JUDGE_WEIGHTS`, summing to 1). The response is split on whitespace; "words" are all tokens except ".".

1. ``subject`` (0.3): the asked animal is mentioned and no other animal -> full credit; the asked animal plus other
   animals -> half credit (0.15); the asked animal missing -> 0.
2. ``mood`` (0.3): at least one word of the asked mood and none of the opposite mood -> full credit; words of both
   moods (mixed) -> half credit (0.15); only opposite-mood words, or no mood word at all -> 0.
3. ``length`` (0.2): number of words inside the asked range (short: 4-8, long: 10-16) -> full credit; otherwise the
   credit drops by 0.05 (a quarter of the weight) per word outside the range, floored at 0.
4. ``place`` (0.1): if a place is asked: mentioned and no other place -> full credit; mentioned together with other
   places -> half credit (0.05); not mentioned -> 0. If no place is asked: full credit unless the response rambles
   about places, i.e. contains more than one place word (counting repeats) -> 0.
5. ``ending`` (0.1): two halves of 0.05. (a) the response ends with "." as its final token and contains exactly one
   "."; (b) no word other than the/and/a/it/is occurs more than twice (no rambling repetition).

A response without any word (empty, whitespace or only ".") scores 0 on every criterion. The judge never raises on a
response: unknown tokens are simply ignored by every criterion (they still count as words for the length). It only
raises ``ValueError`` when the prompt is not a prompt of the grammar. All credits are multiples of 0.05, so the gold
score is too (rounded to 6 decimals to remove float noise).
"""

from __future__ import annotations

from collections import Counter

from rlhf.tiny.grammar import LENGTH_RANGES, MOOD_WORDS, OPPOSITE_MOOD, PLACES, SUBJECTS, parse_prompt

# Words that may repeat freely: a long sentence naturally has several "and it ...".
REPEAT_EXEMPT = frozenset({"the", "and", "a", "it", "is"})
MAX_REPEATS = 2

JUDGE_WEIGHTS = {"subject": 0.3, "mood": 0.3, "length": 0.2, "place": 0.1, "ending": 0.1}
LENGTH_DECAY_PER_WORD = 0.25  # fraction of the length weight lost per word outside the range (0.05 of the score)

_ANIMALS = frozenset(SUBJECTS)
_PLACES = frozenset(PLACES)


def judge_breakdown(prompt: str, response: str) -> dict[str, float]:
    """Return each criterion's contribution (already weighted) to the gold score; the values sum to
    :func:`gold_judge`. See the module docstring for the rules. Never raises on the response."""
    attrs = parse_prompt(prompt)
    tokens = str(response).split()
    words = [t for t in tokens if t != "."]
    if not words:
        return {name: 0.0 for name in JUDGE_WEIGHTS}

    animals = {w for w in words if w in _ANIMALS}
    if attrs["subject"] not in animals:
        subject = 0.0
    else:
        subject = 1.0 if len(animals) == 1 else 0.5

    own = any(w in MOOD_WORDS[attrs["mood"]] for w in words)
    opposite = any(w in MOOD_WORDS[OPPOSITE_MOOD[attrs["mood"]]] for w in words)
    mood = (0.5 if opposite else 1.0) if own else 0.0

    lo, hi = LENGTH_RANGES[attrs["length"]]
    distance = max(lo - len(words), len(words) - hi, 0)
    length = max(0.0, 1.0 - LENGTH_DECAY_PER_WORD * distance)

    place_words = [w for w in words if w in _PLACES]
    if attrs["place"] is None:
        place = 1.0 if len(place_words) <= 1 else 0.0
    elif attrs["place"] not in place_words:
        place = 0.0
    else:
        place = 1.0 if set(place_words) == {attrs["place"]} else 0.5

    proper_end = tokens[-1] == "." and tokens.count(".") == 1
    counts = Counter(w for w in words if w not in REPEAT_EXEMPT)
    no_ramble = all(c <= MAX_REPEATS for c in counts.values())
    ending = 0.5 * proper_end + 0.5 * no_ramble

    credits = {"subject": subject, "mood": mood, "length": length, "place": place, "ending": ending}
    # Rounding removes float noise so that scores are exact multiples of 0.05 and comparable with ==.
    return {name: round(JUDGE_WEIGHTS[name] * credit, 6) for name, credit in credits.items()}


def gold_judge(prompt: str, response: str) -> float:
    """Gold score in [0, 1] of a raw ``response`` (no EOS token) to a raw ``prompt`` (no template).

    Plays the human labeler of the pipeline. Raises ``ValueError`` only if the prompt is not of the grammar.
    """
    return round(sum(judge_breakdown(prompt, response).values()), 6)
