"""The "tiny world": a synthetic instruction-following task small enough for SFT -> RM -> PPO on 2 CPU cores.

Why a synthetic world: real RLHF needs human labelers and large models. Here a rule-based GOLD JUDGE plays the
human labeler, so every stage can be measured against the true objective (e.g. over-optimisation of a learned
reward model is visible as proxy reward going up while the gold score goes down).

Prompts
-------
Prompts come from a template grammar. Words are lowercase and tokens are separated by single spaces; punctuation is
its own token. Three fixed phrasings::

    write a {length} {mood} sentence about the {subject} [{prep} the {place}] .
    tell me a {length} {mood} sentence about the {subject} [{prep} the {place}] .
    give me a {length} {mood} line about the {subject} [{prep} the {place}] .

with ``mood`` in {happy, sad}, ``subject`` one of 12 animals, ``length`` in {short, long}, ``place`` one of 5 places
(introduced by "in", "at" or "near") or absent. That is 3 * 2 * 2 * 12 * (1 + 5 * 3) = 2304 distinct prompts.
Every stage formats a prompt with :data:`PROMPT_TEMPLATE` (``"Human: {prompt} Assistant:"``) and appends the
completion after a single space.

Responses
---------
A response is a sentence from a small word grammar, e.g. ``"the cat is happy and it plays in the park ."``. Moods
have their own word sets (:data:`MOOD_WORDS`); everything else is neutral filler. The whole vocabulary (prompts and
responses) is 135 words (139 token ids with the 4 special tokens), see :data:`VOCAB`.

Gold judge
----------
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

Data
----
:func:`build_tiny_world` writes a tokenizer, a tiny Llama config and the JSONL data of every stage (see its
docstring). Everything is a deterministic function of the seed: ``random.Random`` instances derived from the seed
are the only source of randomness, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

PROMPT_TEMPLATE = "Human: {prompt} Assistant:"

# ---------------------------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------------------------

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

# Words that may repeat freely: a long sentence naturally has several "and it ...".
REPEAT_EXEMPT = frozenset({"the", "and", "a", "it", "is"})
MAX_REPEATS = 2

JUDGE_WEIGHTS = {"subject": 0.3, "mood": 0.3, "length": 0.2, "place": 0.1, "ending": 0.1}
LENGTH_DECAY_PER_WORD = 0.25  # fraction of the length weight lost per word outside the range (0.05 of the score)

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
    # Deterministic order: itertools-like nested loops over the fixed tuples.
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


_PROMPTS = _enumerate_prompts()
ALL_PROMPTS = tuple(_PROMPTS)  # the whole prompt space, in a fixed order


def parse_prompt(prompt: str) -> dict:
    """Return the attributes a raw prompt asks for.

    Returns a dict with keys ``mood``, ``subject``, ``length`` and ``place`` (``None`` if no place is asked).
    Raises ``ValueError`` if ``prompt`` is not a prompt of the tiny-world grammar (including when it is still wrapped
    in :data:`PROMPT_TEMPLATE`). Runs of whitespace are tolerated.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    key = " ".join(prompt.split())
    attrs = _PROMPTS.get(key)
    if attrs is None:
        hint = ""
        if key.startswith(ROLE_TOKENS[0]) or key.endswith(ROLE_TOKENS[1]):
            hint = " (pass the raw prompt, not the one formatted with PROMPT_TEMPLATE)"
        raise ValueError(
            f"not a tiny-world prompt{hint}: {prompt!r}; expected e.g. "
            f"'write a short happy sentence about the cat .' or 'give me a long sad line about the fox at the river .'"
        )
    return dict(attrs)


# ---------------------------------------------------------------------------------------------------------------
# Gold judge
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# Demonstrators: generate responses with controlled flaws
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Flaws:
    """What one response gets wrong on purpose (None = that criterion is done right)."""

    mood: str | None = None  # "mixed" | "wrong" | "none"
    length: str | None = None  # "band": word count from the other length band
    place: str | None = None  # "forget" | "wrong" | "ramble"
    subject: str | None = None  # "extra" | "wrong" | "none"
    ending: str | None = None  # "no_period" | "double_period" | "repeat"


# Probability that a demonstrator gets each criterion wrong. "noisy" is the SFT demonstrator: tuned so that its mean
# gold score is ~0.8, which leaves headroom for RL. The others add quality spread to the comparison data.
_DEMONSTRATORS = {
    "expert": {"mood": 0.0, "length": 0.0, "place": 0.0, "subject": 0.0, "ending": 0.0},
    "noisy": {"mood": 0.3, "length": 0.25, "place": 0.2, "subject": 0.15, "ending": 0.1},
    "sloppy": {"mood": 0.5, "length": 0.5, "place": 0.4, "subject": 0.35, "ending": 0.3},
    "bad": {"mood": 0.85, "length": 0.8, "place": 0.7, "subject": 0.7, "ending": 0.5},
}
_COMPARISON_DEMONSTRATOR_WEIGHTS = {"expert": 0.15, "noisy": 0.4, "sloppy": 0.25, "bad": 0.2}
# Word counts used when a demonstrator misses the length: the other band, a bit widened.
_WRONG_LENGTH_RANGES = {"short": (10, 18), "long": (3, 7)}


def _sample_flaws(rng: random.Random, demonstrator: str, attrs: dict) -> _Flaws:
    p = _DEMONSTRATORS[demonstrator]
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
    # against the prompt (with mostly "extra" slips, a policy learned to swap animals unpunished).
    subject = rng.choices(("extra", "wrong", "none"), (0.3, 0.5, 0.2))[0] if rng.random() < p["subject"] else None
    ending = rng.choice(("no_period", "double_period", "repeat")) if rng.random() < p["ending"] else None
    return _Flaws(mood=mood, length=length, place=place, subject=subject, ending=ending)


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


def _compose(rng: random.Random, attrs: dict, flaws: _Flaws) -> str:
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
    lo, hi = (_WRONG_LENGTH_RANGES if flaws.length == "band" else LENGTH_RANGES)[attrs["length"]]
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


def _respond(rng: random.Random, attrs: dict, demonstrator: str) -> str:
    return _compose(rng, attrs, _sample_flaws(rng, demonstrator, attrs))


def _random_attrs(rng: random.Random) -> dict:
    return {
        "mood": rng.choice(MOODS),
        "subject": rng.choice(SUBJECTS),
        "length": rng.choice(LENGTHS),
        "place": rng.choice(PLACES) if rng.random() < 0.6 else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Data set construction
# ---------------------------------------------------------------------------------------------------------------


class _PromptSampler:
    """Draws training prompts: cycles through shuffled copies of each sub-pool (even coverage), and over-samples
    no-place prompts, which are only 1/16 of the prompt space but deserve a real share of the training signal."""

    def __init__(self, rng: random.Random, no_place: list[str], with_place: list[str], p_no_place: float = 0.2):
        self.rng, self.p_no_place = rng, p_no_place
        self.pools = {True: list(no_place), False: list(with_place)}
        self.queues: dict[bool, list[str]] = {True: [], False: []}

    def draw(self) -> str:
        key = self.rng.random() < self.p_no_place
        if not self.queues[key]:
            self.queues[key] = list(self.pools[key])
            self.rng.shuffle(self.queues[key])
        return self.queues[key].pop()


# Share of comparison prompts whose responses include minimal pairs (see _ranked).
_MINIMAL_PAIR_SHARE = 0.5


def _swapped_variants(rng: random.Random, attrs: dict, response: str) -> list[str]:
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


def _ranked(rng: random.Random, prompt: str, k: int, min_gap: float) -> tuple[list[str], list[float]]:
    """K distinct responses from demonstrators of varied quality, best first, consecutive gold scores >= min_gap apart.

    Resampled until the gap holds so that every pairwise preference is meaningful under the gold judge."""
    attrs = parse_prompt(prompt)
    names, weights = zip(*_COMPARISON_DEMONSTRATOR_WEIGHTS.items())
    chosen: dict[str, float] = {}
    if rng.random() < _MINIMAL_PAIR_SHARE:
        # Minimal pairs: a good response and copies of it with one prompt-dependent detail swapped, so the only way
        # to rank them is to check the response against the prompt (not a prior over animals or moods).
        base = _respond(rng, attrs, rng.choice(("expert", "noisy")))
        for response in [base, *_swapped_variants(rng, attrs, base)]:
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
        response = _respond(rng, attrs, rng.choices(names, weights)[0])
        score = gold_judge(prompt, response)
        if response not in chosen and all(abs(score - s) >= min_gap - 1e-9 for s in chosen.values()):
            chosen[response] = score
    else:
        raise RuntimeError(f"could not sample {k} responses with gold gaps >= {min_gap} for {prompt!r}")
    ranked = sorted(chosen, key=lambda r: (-chosen[r], r))
    return ranked, [chosen[r] for r in ranked]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def word_level_tokenizer(words: list[str], model_max_length: int):
    """A word-level fast tokenizer: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, then ``words`` in order.

    No decoder is set: ``tokenizers`` then joins tokens with single spaces, which inverts the ``WhitespaceSplit``
    pre-tokenizer for single-space texts. No BOS/EOS is added on encode (no post-processor template).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        # The default cleanup would glue " ." to the previous word and break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tokenizer(out_dir: str | Path):
    """Build the word-level tokenizer of the task (:data:`VOCAB` in sorted order after the special tokens), save it
    with ``save_pretrained`` and return it."""
    tokenizer = word_level_tokenizer(VOCAB, model_max_length=128)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model_config(out_dir: str | Path, tokenizer):
    """Save and return the tiny ``LlamaConfig`` (~0.1M parameters) matching ``tokenizer``."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
    )
    config.save_pretrained(str(out_dir))
    return config


def build_tiny_world(out_dir: str | Path, seed: int = 0, *, label_noise: float = 0.1) -> dict[str, Path]:
    """Write the tiny world under ``out_dir`` and return ``{name: path}``.

    Files (prompts are raw, completions/responses raw text without EOS)::

        tokenizer/                   word-level HF tokenizer (see build_tokenizer)
        model_config/config.json     tiny LlamaConfig
        data/pretrain.jsonl          {"text"} 6000 docs: half "Human: p Assistant: r" with r well-formed but for
                                     random attributes (teaches the format, not instruction following), half
                                     paragraphs of 2-3 sentences about one subject, mood and place
        data/pretrain_eval.jsonl     {"text"} 300 held-out docs of the same distribution (no doc shared)
        data/sft.jsonl               {"prompt", "completion"} 3000 demonstrations by the noisy demonstrator
        data/sft_eval.jsonl          {"prompt", "completion"} 200 demonstrations on a held-out prompt slice
        data/comparisons.jsonl       {"prompt", "ranked"} 2500 prompts, 4 responses best..worst by the gold judge,
                                     consecutive gold scores >= 0.05 apart; with prob. ``label_noise`` one random
                                     adjacent pair is swapped
        data/comparisons_eval.jsonl  300 held-out prompts, gold ordering (no label noise)
        data/prompts.jsonl           {"prompt"} 1000 PPO training prompts
        data/eval_prompts.jsonl      {"prompt"} 128 held-out prompts, disjoint from every other file's prompts
        world.json                   seed, label_noise, counts, mean gold scores

    The prompt space is shuffled and cut into disjoint slices: eval prompts, comparisons_eval, sft_eval and the
    training pool (pretrain, sft, comparisons, PPO prompts). Each file uses its own RNG derived from ``seed`` so
    that changing one file's size does not change the others.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    out = Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)

    def rng_for(name: str) -> random.Random:
        # str seeds are hashed with sha512 by random.seed, hence stable across processes (unlike hash()).
        return random.Random(f"tiny-world/{seed}/{name}")

    # --- Disjoint prompt slices, stratified so that every slice has some no-place prompts.
    split_rng = rng_for("split")
    no_place = [p for p in ALL_PROMPTS if _PROMPTS[p]["place"] is None]
    with_place = [p for p in ALL_PROMPTS if _PROMPTS[p]["place"] is not None]
    split_rng.shuffle(no_place)
    split_rng.shuffle(with_place)
    slices: dict[str, tuple[list[str], list[str]]] = {}
    for name, n_none, n_place in (("eval", 16, 112), ("comparisons_eval", 24, 276), ("sft_eval", 16, 184)):
        slices[name] = (no_place[:n_none], with_place[:n_place])
        no_place, with_place = no_place[n_none:], with_place[n_place:]
    train_no_place, train_with_place = no_place, with_place

    def held_out(name: str) -> list[str]:
        prompts = slices[name][0] + slices[name][1]
        rng_for(f"{name}-order").shuffle(prompts)
        return prompts

    def sampler(name: str) -> _PromptSampler:
        return _PromptSampler(rng_for(f"{name}-prompts"), train_no_place, train_with_place)

    paths: dict[str, Path] = {}
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}

    def write(name: str, rows: list[dict]) -> None:
        paths[name] = data / f"{name}.jsonl"
        counts[name] = len(rows)
        _write_jsonl(paths[name], rows)

    # --- Pretraining documents.
    def pretrain_docs(rng: random.Random, prompts: _PromptSampler, n: int, exclude: set[str]) -> list[str]:
        docs: list[str] = []
        while len(docs) < n:
            attrs = _random_attrs(rng)
            if rng.random() < 0.5:
                doc = PROMPT_TEMPLATE.format(prompt=prompts.draw()) + " " + _compose(rng, attrs, _Flaws())
            else:
                # A coherent paragraph: 2-3 sentences about one subject, mood and place. Like real text, it rewards
                # copying what came before, which is the skill instruction following and reward modelling build on.
                doc = " ".join(_compose(rng, attrs, _Flaws()) for _ in range(rng.randint(2, 3)))
            if doc not in exclude:
                docs.append(doc)
        return docs

    pretrain = pretrain_docs(rng_for("pretrain"), sampler("pretrain"), 6000, set())
    pretrain_eval = pretrain_docs(rng_for("pretrain_eval"), sampler("pretrain_eval"), 300, set(pretrain))
    write("pretrain", [{"text": t} for t in pretrain])
    write("pretrain_eval", [{"text": t} for t in pretrain_eval])
    # Gold score of the pretraining chat docs: what a base model that only learned the format would get.
    chat = [t for t in pretrain if t.startswith(ROLE_TOKENS[0])]
    base_scores = []
    for doc in chat:
        prompt, response = doc[len("Human: ") :].split(" Assistant: ")
        base_scores.append(gold_judge(prompt, response))
    scores["pretrain_chat"] = _mean(base_scores)

    # --- SFT demonstrations.
    def demonstrations(name: str, prompts: list[str]) -> None:
        rng = rng_for(name)
        rows = [{"prompt": p, "completion": _respond(rng, parse_prompt(p), "noisy")} for p in prompts]
        write(name, rows)
        scores[name] = _mean([gold_judge(r["prompt"], r["completion"]) for r in rows])

    sft_sampler = sampler("sft")
    demonstrations("sft", [sft_sampler.draw() for _ in range(3000)])
    demonstrations("sft_eval", held_out("sft_eval"))

    # --- Comparisons.
    def comparisons(name: str, prompts: list[str], noise: float) -> None:
        rng = rng_for(name)
        rows, best, worst, swapped = [], [], [], 0
        for prompt in prompts:
            ranked, gold = _ranked(rng, prompt, k=4, min_gap=0.05)
            best.append(gold[0])
            worst.append(gold[-1])
            if noise > 0 and rng.random() < noise:
                i = rng.randrange(len(ranked) - 1)
                ranked[i], ranked[i + 1] = ranked[i + 1], ranked[i]
                swapped += 1
            rows.append({"prompt": prompt, "ranked": ranked})
        write(name, rows)
        scores[f"{name}_best"] = _mean(best)
        scores[f"{name}_worst"] = _mean(worst)
        counts[f"{name}_label_noise_swaps"] = swapped

    comparisons_sampler = sampler("comparisons")
    comparisons("comparisons", [comparisons_sampler.draw() for _ in range(2500)], label_noise)
    comparisons("comparisons_eval", held_out("comparisons_eval"), 0.0)

    # --- Prompt-only files for PPO and evaluation.
    ppo_sampler = sampler("ppo")
    write("prompts", [{"prompt": ppo_sampler.draw()} for _ in range(1000)])
    write("eval_prompts", [{"prompt": p} for p in held_out("eval")])

    # --- Tokenizer and model config (independent of the seed).
    tokenizer = build_tokenizer(out / "tokenizer")
    build_model_config(out / "model_config", tokenizer)
    paths["tokenizer"] = out / "tokenizer"
    paths["model_config"] = out / "model_config"

    world = {
        "seed": seed,
        "label_noise": label_noise,
        "counts": counts,
        "mean_gold_score": scores,
        "vocab_size": len(tokenizer),
        "judge_weights": JUDGE_WEIGHTS,
        "prompt_space": len(ALL_PROMPTS),
    }
    paths["world"] = out / "world.json"
    with open(paths["world"], "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(world, sort_keys=True, indent=2) + "\n")
    return paths
