"""The tiny world's words and prompts: the template grammar, its vocabulary and the prompt space.

Prompts come from a template grammar. Words are lowercase and tokens are separated by single spaces; punctuation is
its own token. Three fixed phrasings::

    write a {length} {mood} sentence about the {subject} [{prep} the {place}] .
    tell me a {length} {mood} sentence about the {subject} [{prep} the {place}] .
    give me a {length} {mood} line about the {subject} [{prep} the {place}] .

with ``mood`` in {happy, sad}, ``subject`` one of 12 animals, ``length`` in {short, long}, ``place`` one of 5 places
(introduced by "in", "at" or "near") or absent. That is 3 * 2 * 2 * 12 * (1 + 5 * 3) = 2304 distinct prompts.
Every stage formats a prompt with :data:`PROMPT_TEMPLATE` (``"Human: {prompt} Assistant:"``) and appends the
completion after a single space.

A response is a sentence from a small word grammar, e.g. ``"the cat is happy and it plays in the park ."``. Moods
have their own word sets (:data:`MOOD_WORDS`); everything else is neutral filler. The whole vocabulary (prompts and
responses) is 135 words (139 token ids with the 4 special tokens), see :data:`VOCAB`.
"""

from __future__ import annotations

import random

PROMPT_TEMPLATE = "Human: {prompt} Assistant:"

MOODS = ("happy", "sad")
SUBJECTS = ("cat", "dog", "bird", "fish", "horse", "cow", "fox", "bear", "frog", "duck", "goat", "mouse")
LENGTHS = ("short", "long")
PLACES = ("park", "garden", "river", "house", "forest")
PLACE_PREPS = ("in", "at", "near")
# Word-count ranges (inclusive, final "." excluded) that the judge accepts for each asked length.
LENGTH_RANGES = {"short": (4, 8), "long": (10, 16)}

# Phrasings as token templates; the optional place phrase and the final "." are appended by _make_prompt.
PHRASINGS = (
    "write a {length} {mood} sentence about the {subject}",
    "tell me a {length} {mood} sentence about the {subject}",
    "give me a {length} {mood} line about the {subject}",
)

MOOD_ADJECTIVES = {
    "happy": (
        "happy",
        "glad",
        "joyful",
        "cheerful",
        "merry",
        "bright",
        "sunny",
        "warm",
        "jolly",
        "delighted",
        "proud",
        "lively",
    ),
    "sad": (
        "sad",
        "gloomy",
        "lonely",
        "tired",
        "grey",
        "cold",
        "unhappy",
        "miserable",
        "upset",
        "weary",
        "lost",
        "blue",
    ),
}
MOOD_VERBS = {
    "happy": ("smiles", "laughs", "sings", "dances", "giggles", "grins", "cheers", "hums"),
    "sad": ("cries", "weeps", "sighs", "sobs", "frowns", "mopes", "sulks", "moans"),
}
MOOD_WORDS = {mood: frozenset(MOOD_ADJECTIVES[mood] + MOOD_VERBS[mood]) for mood in MOODS}
OPPOSITE_MOOD = {"happy": "sad", "sad": "happy"}

NEUTRAL_ADJECTIVES = ("little", "big", "old", "young", "small", "new", "tall", "quiet", "brown")
NEUTRAL_VERBS = (
    "walks",
    "runs",
    "sits",
    "eats",
    "sleeps",
    "looks",
    "waits",
    "rests",
    "swims",
    "jumps",
    "plays",
    "reads",
    "hides",
    "digs",
    "drinks",
)
ADVERBS = ("today", "now", "again", "too", "here", "there", "slowly", "quickly")
STANDALONE_ADVERBS = ADVERBS[:6]  # the ones that read fine without a verb right before them
SKY_NOUNS = ("sun", "rain", "tree", "sky", "stars", "moon", "clouds", "snow")
# Function words of the response grammar that are not in any list above.
RESPONSE_FUNCTION_WORDS = ("the", "a", "and", "it", "is", "feels", "with", "friend", "under", "all", "day", "at")
RESPONSE_FUNCTION_WORDS += ("night", "in", "morning", "but", "very")
RESPONSE_FUNCTION_WORDS += ("then", "its", "likes", "every", "this", "evening", "after", "by")
PROMPT_WORDS = ("write", "tell", "give", "me", "a", "sentence", "line", "about", "the")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3 in this order
ROLE_TOKENS = ("Human:", "Assistant:")


def _all_words() -> list[str]:
    words = set(SUBJECTS + MOODS + LENGTHS + PLACES + PLACE_PREPS + PROMPT_WORDS + RESPONSE_FUNCTION_WORDS)
    for mood in MOODS:
        words |= MOOD_WORDS[mood]
    words |= set(NEUTRAL_ADJECTIVES + NEUTRAL_VERBS + ADVERBS + SKY_NOUNS + ROLE_TOKENS + (".",))
    for phrasing in PHRASINGS:
        words |= {w for w in phrasing.split() if not w.startswith("{")}
    return sorted(words)


# Every word token of the task (sorted, special tokens excluded). Sorting makes token ids deterministic.
VOCAB = tuple(_all_words())


def _make_prompt(phrasing: int, length: str, mood: str, subject: str, prep: str | None, place: str | None) -> str:
    text = PHRASINGS[phrasing].format(length=length, mood=mood, subject=subject)
    if place is not None:
        text += f" {prep} the {place}"
    return text + " ."


def _enumerate_prompts() -> dict[str, dict]:
    # Nested loops over the fixed tuples: the prompt space's order is part of the seed's contract.
    table: dict[str, dict] = {}
    for phrasing in range(len(PHRASINGS)):
        for length in LENGTHS:
            for mood in MOODS:
                for subject in SUBJECTS:
                    options = [(None, None)] + [(prep, place) for place in PLACES for prep in PLACE_PREPS]
                    for prep, place in options:
                        text = _make_prompt(phrasing, length, mood, subject, prep, place)
                        table[text] = {"mood": mood, "subject": subject, "length": length, "place": place}
    return table


PROMPT_ATTRS = _enumerate_prompts()
"""Raw prompt -> the attributes it asks for (``mood``, ``subject``, ``length``, ``place`` or None)."""
ALL_PROMPTS = tuple(PROMPT_ATTRS)  # the whole prompt space, in a fixed order


def parse_prompt(prompt: str) -> dict:
    """Return the attributes a raw prompt asks for.

    Returns a dict with keys ``mood``, ``subject``, ``length`` and ``place`` (``None`` if no place is asked).
    Raises ``ValueError`` if ``prompt`` is not a prompt of the tiny-world grammar (including when it is still wrapped
    in :data:`PROMPT_TEMPLATE`). Runs of whitespace are tolerated.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    key = " ".join(prompt.split())
    attrs = PROMPT_ATTRS.get(key)
    if attrs is None:
        hint = ""
        if key.startswith(ROLE_TOKENS[0]) or key.endswith(ROLE_TOKENS[1]):
            hint = " (pass the raw prompt, not the one formatted with PROMPT_TEMPLATE)"
        raise ValueError(
            f"not a tiny-world prompt{hint}: {prompt!r}; expected e.g. "
            f"'write a short happy sentence about the cat .' or 'give me a long sad line about the fox at the river .'"
        )
    return dict(attrs)


def random_attrs(rng: random.Random) -> dict:
    """Attributes drawn at random (a place 60% of the time): what an off-prompt, well-formed response is about."""
    return {
        "mood": rng.choice(MOODS),
        "subject": rng.choice(SUBJECTS),
        "length": rng.choice(LENGTHS),
        "place": rng.choice(PLACES) if rng.random() < 0.6 else None,
    }
