"""Prompts of the digits world and :func:`parse_digit`, the prompt → class map of the reward.

Every phrasing is used to pretrain the generator; RL trains on :data:`TRAIN_TEMPLATES` and
evaluates on :data:`HELDOUT_TEMPLATES` (phrasings the RL run never sees).
"""

from __future__ import annotations

import re

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# ``{d}``: the numeral ("7"), ``{w}``: the word ("seven").
TRAIN_TEMPLATES = ("a handwritten {d}", "the digit {d}", "a handwritten digit {d}", "the number {w}")
HELDOUT_TEMPLATES = ("a handwritten {w}", "a drawing of the number {d}")
# Extra phrasings seen only in generator pretraining (so every vocabulary word is trained).
PRETRAIN_ONLY_TEMPLATES = ("an image of the digit {d}", "a picture of a handwritten {w}", "{d}", "{w} written by hand")
PRETRAIN_TEMPLATES = TRAIN_TEMPLATES + HELDOUT_TEMPLATES + PRETRAIN_ONLY_TEMPLATES

_NUMERAL = re.compile(r"(?<![\w.])(\d+)(?![\w]|\.\d)")
_WORD = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


def make_prompt(template: str, digit: int) -> str:
    """``template`` filled with ``digit`` (``{d}`` numeral, ``{w}`` word)."""
    return template.format(d=digit, w=DIGIT_WORDS[digit])


def prompts_for(templates: tuple[str, ...]) -> list[str]:
    """All ``templates × digits 0..9`` prompts, digit-major within each template."""
    return [make_prompt(t, d) for t in templates for d in range(10)]


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for: one numeral ``0``–``9`` or number word (``"seven"``).

    Raises:
        ValueError: naming the prompt when it asks for no digit, for a number outside 0–9, or
            for several different digits.
    """
    numerals = [m.group(1) for m in _NUMERAL.finditer(prompt)]
    found = {int(n) for n in numerals if len(n) == 1}
    found |= {DIGIT_WORDS.index(m.group(1).lower()) for m in _WORD.finditer(prompt)}
    too_long = [n for n in numerals if len(n) > 1]
    if too_long:
        raise ValueError(
            f"prompt {prompt!r} asks for the number {too_long[0]}; the digits world only has single "
            "digits 0-9 (e.g. 'a handwritten 7')"
        )
    if not found:
        raise ValueError(
            f"prompt {prompt!r} names no digit; write one digit 0-9 as a numeral or a word, "
            "e.g. 'a handwritten 7' or 'the number seven'"
        )
    if len(found) > 1:
        raise ValueError(f"prompt {prompt!r} names several digits {sorted(found)}; name exactly one")
    return found.pop()
