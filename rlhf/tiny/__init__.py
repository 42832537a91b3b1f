"""The "tiny world": a synthetic instruction-following task small enough for SFT -> RM -> PPO on 2 CPU cores.

Why a synthetic world: real RLHF needs human labelers and large models. Here a rule-based GOLD JUDGE plays the
human labeler, so every stage can be measured against the true objective (e.g. over-optimisation of a learned
reward model is visible as proxy reward going up while the gold score goes down).

- :mod:`rlhf.tiny.grammar`: the prompt grammar (2304 prompts, :data:`PROMPT_TEMPLATE`), the response words and
  :data:`VOCAB`.
- :mod:`rlhf.tiny.judge`: :func:`gold_judge`, five weighted criteria (subject, mood, length, place, ending).
- :mod:`rlhf.tiny.demonstrators`: responses with controlled flaws and ranked comparisons.
- :mod:`rlhf.tiny.tokenizer`: the word-level tokenizer and the tiny Llama config.
- :mod:`rlhf.tiny.world`: :func:`build_tiny_world`, every stage's data as a deterministic function of the seed.

Config values name ``rlhf.tiny:gold_judge``; the names below are the package's public surface.
"""

from rlhf.tiny.demonstrators import Flaws, compose, ranked_responses, respond
from rlhf.tiny.grammar import (
    ALL_PROMPTS,
    LENGTH_RANGES,
    MOOD_WORDS,
    MOODS,
    PLACES,
    PROMPT_TEMPLATE,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    SUBJECTS,
    VOCAB,
    parse_prompt,
)
from rlhf.tiny.judge import JUDGE_WEIGHTS, MAX_REPEATS, REPEAT_EXEMPT, gold_judge, judge_breakdown
from rlhf.tiny.tokenizer import build_model_config, build_tokenizer, word_level_tokenizer
from rlhf.tiny.world import build_tiny_world

__all__ = [
    "ALL_PROMPTS",
    "JUDGE_WEIGHTS",
    "LENGTH_RANGES",
    "MAX_REPEATS",
    "MOODS",
    "MOOD_WORDS",
    "PLACES",
    "PROMPT_TEMPLATE",
    "REPEAT_EXEMPT",
    "ROLE_TOKENS",
    "SPECIAL_TOKENS",
    "SUBJECTS",
    "VOCAB",
    "Flaws",
    "build_model_config",
    "build_tiny_world",
    "build_tokenizer",
    "compose",
    "gold_judge",
    "judge_breakdown",
    "parse_prompt",
    "ranked_responses",
    "respond",
    "word_level_tokenizer",
]
