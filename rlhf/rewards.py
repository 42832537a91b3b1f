"""Reward and judge functions named in configs as `module:function`, and the verifiable rewards shipped with rlhf.

A function takes `(prompt, response)`, or `(prompt, response, reference)` to check a response against its prompt
row's gold answer (the `reference` column of a prompts source, e.g. GSM8K's `answer` through
`field_map: {prompt: question, reference: answer}`); it returns a float. `row_function` adapts either to the rows
the stages hold.

`gsm8k_exact_match`: 1.0 when the response's final number equals the reference's (GSM8K writes it after `####`),
else 0.0 — the reward of RLOO/GRPO on maths, and the judge whose mean is pass@1.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from fractions import Fraction

from rlhf.config import load_function

__all__ = ["final_number", "gsm8k_exact_match", "row_function"]

# a number as people write answers: sign, thousands separators, decimals or a fraction (1,234.5  -3  7/2  .5)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")


def row_function(spec: str, key: str) -> Callable[[dict, str], float]:
    """`module:function` named by config key `key` -> call(row, response) -> float, passing row["reference"] to a
    function that takes a third parameter."""
    fn = load_function(spec, key)
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):  # builtins without a signature: the two-argument form
        params = []
    if len(params) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return lambda row, response: float(fn(row["prompt"], response, row.get("reference", "")))
    return lambda row, response: float(fn(row["prompt"], response))


def final_number(text: str) -> Fraction | None:
    """The answer a text gives: the number after its last `####` if it has one, else its last number; commas,
    currency, units and trailing text ignored. None when there is no number."""
    marked = "####" in text
    if marked:
        text = text.rsplit("####", 1)[1]
    found = [m.group() for m in _NUMBER.finditer(text) if re.search(r"\d", m.group())]
    if not found:
        return None
    # after the marker, the number right after it (not one in trailing words); without one, the last number
    number = found[0 if marked else -1].replace(",", "")
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_exact_match(prompt: str, response: str, reference: str) -> float:
    """1.0 when the response's final number equals the reference answer's (`#### 72` or a bare number), else 0.0."""
    gold, given = final_number(reference), final_number(response)
    return float(gold is not None and given is not None and gold == given)
