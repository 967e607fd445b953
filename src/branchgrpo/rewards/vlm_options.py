"""Validation of :class:`~branchgrpo.rewards.vlm.VLMJudgeReward` options: one
:class:`~branchgrpo.rewards.base.RewardError` line naming the field and what is allowed."""

from __future__ import annotations

import math
import re
from typing import Any

from branchgrpo.rewards.base import RewardError

def _regex(field: str, pattern: Any) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError) as err:
        raise RewardError(f"reward 'vlm': {field} {pattern!r} is not a regular expression ({err})") from None
    if compiled.groups != 1:
        raise RewardError(f"reward 'vlm': {field} {pattern!r} must have exactly one group (...), "
                          f"it has {compiled.groups}")
    return compiled


def _number(field: str, value: Any, kind: type, minimum: float | None) -> Any:
    """``value`` as ``kind`` (numeric strings from the command line accepted), ``>= minimum``."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value) if not isinstance(value, str) else kind(float(value) if kind is float else int(value))
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError
    except (TypeError, ValueError):
        raise RewardError(f"reward 'vlm': {field} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}") from None
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise RewardError(f"reward 'vlm': {field} must be a finite number{bound}, got {value!r}")
    return number


def _flag(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RewardError(f"reward 'vlm': {field} must be true or false, got {value!r}")


def _score_range(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        lo, hi = (float(v) for v in items)
    except (TypeError, ValueError):
        raise RewardError(
            f"reward 'vlm': score_range must be two numbers [lo, hi] such as [1, 10], got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise RewardError(f"reward 'vlm': score_range must be [lo, hi] with finite lo < hi, got {value!r}")
    return lo, hi
