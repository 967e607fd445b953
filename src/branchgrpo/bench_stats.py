"""Learning-efficiency statistics for ``branchgrpo bench --seeds N``: pure functions of numbers.

A run's **curve** is its held-out evaluations as ``(training seconds, reward)`` points, strictly
increasing in seconds and starting at the untrained model (0 s). Between evaluations the curve is
linear in seconds. Per run (one method, one seed), against the reference method's run of the same
seed:

- reward at equal wall-clock: the curve at the reference's final training seconds
  (:func:`interpolate`; ``None`` when the run stopped earlier);
- seconds to the reference's final reward: the first time the curve reaches it
  (:func:`first_crossing`; ``None`` = not reached);
- normalised area: the mean reward over the first ``horizon`` seconds (:func:`normalised_auc`),
  ``horizon`` being the shortest run of the bench so every curve covers it;
- diversity at the reference's final reward: the run's diversity curve (same evaluations) at the
  moment its reward curve first reaches that reward (:func:`value_at_crossing`). A policy that is
  right more often has fewer ways to be right, so end diversity alone mixes "bought reward" with
  "collapsed"; comparing every method at the same reward separates the two.

Seeds pair the runs: every method's run with seed ``k`` starts from the same weights and samples as
the reference's. :func:`paired_differences` gives, per method, the seed-by-seed differences from
the reference (reward at equal wall-clock, reward AUC) with their mean and interval: machine drift and
a seed's luck shared by both runs cancel, so this interval is the one that says whether a method
beats the reference; separate (non-overlapping) per-method intervals are a stricter, weaker test.

Over seeds, :func:`mean_interval` gives the mean and the two-sided Student-t interval
``mean ± t(1 − α/2, n − 1) · s / √n`` (``s`` the sample standard deviation); the t quantile comes
from the exact closed-form CDF for integer degrees of freedom (:func:`student_t_cdf`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def _check_curve(times: Sequence[float], values: Sequence[float]) -> None:
    if len(times) != len(values) or not times:
        raise ValueError(f"a curve needs as many times as values and at least one point, "
                         f"got {len(times)} and {len(values)}")
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"curve times must strictly increase, got {list(times)}")


def interpolate(times: Sequence[float], values: Sequence[float], at: float) -> float | None:
    """The piecewise-linear curve through ``(times[i], values[i])`` at ``at``; ``None`` outside
    ``[times[0], times[-1]]`` (no extrapolation: a run that stopped earlier has no value there)."""
    _check_curve(times, values)
    tolerance = 1e-9 * max(1.0, abs(times[-1]))
    if at < times[0] - tolerance or at > times[-1] + tolerance:
        return None
    for (t0, v0), (t1, v1) in zip(zip(times, values), zip(times[1:], values[1:])):
        if at <= t1:
            return v0 + (v1 - v0) * (max(at, t0) - t0) / (t1 - t0)
    return values[-1]


def first_crossing(times: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The first time the piecewise-linear curve reaches ``target`` (``value >= target``);
    ``None`` when it never does."""
    _check_curve(times, values)
    if values[0] >= target:
        return times[0]
    for (t0, v0), (t1, v1) in zip(zip(times, values), zip(times[1:], values[1:])):
        if v1 >= target:  # v0 < target <= v1 on this segment
            return t0 + (target - v0) / (v1 - v0) * (t1 - t0)
    return None


def value_at_crossing(times: Sequence[float], rewards: Sequence[float], values: Sequence[float | None],
                      target: float) -> float | None:
    """A second curve ``values`` (measured at the same ``times``) at the moment the reward curve first
    reaches ``target`` (:func:`first_crossing`), linear between evaluations; ``None`` when the target
    is never reached or a value needed for the interpolation was not measured."""
    if len(values) != len(times):
        raise ValueError(f"values must be measured at the curve's {len(times)} times, got {len(values)}")
    at = first_crossing(times, rewards, target)
    if at is None:
        return None
    after = next(i for i, t in enumerate(times) if t >= at)
    if times[after] == at or after == 0:
        return values[after]
    v0, v1 = values[after - 1], values[after]
    if v0 is None or v1 is None:
        return None
    t0, t1 = times[after - 1], times[after]
    return v0 + (v1 - v0) * (at - t0) / (t1 - t0)


def normalised_auc(times: Sequence[float], values: Sequence[float], horizon: float) -> float | None:
    """Area under the piecewise-linear curve from ``times[0]`` to ``horizon`` (trapezoids, the curve
    cut at ``horizon``) divided by ``horizon - times[0]``: the curve's mean value over that span.
    ``None`` when the curve does not reach ``horizon``."""
    _check_curve(times, values)
    if horizon <= times[0]:
        raise ValueError(f"horizon must lie after the curve's start {times[0]}, got {horizon}")
    end_value = interpolate(times, values, horizon)
    if end_value is None:
        return None
    area = 0.0
    for (t0, v0), (t1, v1) in zip(zip(times, values), zip(times[1:], values[1:])):
        if t0 >= horizon:
            break
        if t1 > horizon:
            t1, v1 = horizon, end_value
        area += 0.5 * (v0 + v1) * (t1 - t0)
    return area / (horizon - times[0])


def student_t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with integer ``df`` ≥ 1, from the closed forms for
    A(t | ν) = P(|T| ≤ t) (Abramowitz & Stegun 26.7.3–26.7.4), θ = atan(t / √ν):
    odd ν: A = (2/π)(θ + sinθ cosθ (1 + (2/3)cos²θ + … + (2·4⋯(ν−3))/(1·3⋯(ν−2)) cos^(ν−3)θ)),
    A = 2θ/π for ν = 1;
    even ν: A = sinθ (1 + (1/2)cos²θ + … + (1·3⋯(ν−3))/(2·4⋯(ν−2)) cos^(ν−2)θ)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        series, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):  # terms 1, (2/3)c², (2·4)/(3·5)c⁴, …: (ν−1)/2 of them
            series += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        a = 2.0 / math.pi * (theta + sin * math.cos(theta) * series)
    else:
        series, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):  # terms 1, (1/2)c², (1·3)/(2·4)c⁴, …: ν/2 of them
            series += term
            term *= cos2 * (2 * k - 1) / (2 * k)
        a = sin * series
    return 0.5 + math.copysign(0.5 * a, t)


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`student_t_cdf` to double precision)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {probability}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if student_t_cdf(mid, df) < probability:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided ``confidence`` interval; ``low``/``high`` are ``None``
    for n = 1 (no spread to estimate). ``missing`` counts the runs that had no value (e.g. did not
    reach the target); when any is missing, ``mean`` is ``None`` too: a mean over the runs that got
    there would not be the method's mean."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    missing: int = 0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "missing": self.missing}


def mean_interval(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Mean and Student-t interval ``mean ± t((1 + confidence)/2, n − 1) · s/√n`` of ``values``;
    ``None`` entries are runs without a value (see :class:`Interval`)."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    present = [float(v) for v in values if v is not None]
    missing = len(values) - len(present)
    if missing:
        return Interval(None, None, None, len(values), missing)
    n = len(present)
    mean = math.fsum(present) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def format_interval(interval: Interval, digits: int = 3, missing: str = "not reached") -> str:
    """``0.812 [0.790, 0.834]``; ``0.812 (interval n/a, 1 seed)``; ``not reached (2/3 seeds)``."""
    if interval.missing:
        return f"{missing} ({interval.missing}/{interval.n} seed{'s' if interval.n > 1 else ''})"
    if interval.low is None:
        return f"{interval.mean:.{digits}f} (interval n/a, 1 seed)"
    return f"{interval.mean:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def mean_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], grid: Sequence[float],
              confidence: float = 0.95) -> tuple[list[float], list[float | None], list[float | None]]:
    """Pointwise mean and Student-t interval over ``curves`` (each ``(times, values)``) at every
    ``grid`` time; every curve must cover the grid."""
    means, lows, highs = [], [], []
    for at in grid:
        points = [interpolate(times, values, at) for times, values in curves]
        if any(p is None for p in points):
            raise ValueError(f"grid time {at} lies outside a curve; keep the grid within the shortest run")
        interval = mean_interval(points, confidence)
        means.append(interval.mean)
        lows.append(interval.low)
        highs.append(interval.high)
    return means, lows, highs


@dataclass(frozen=True)
class RunCurve:
    """One run's evaluations: ``times`` (training seconds, from 0) and held-out ``rewards``, plus
    the end diversity (last evaluation; ``None`` where not measured) and the feature diversity at every
    evaluation (``None``: not recorded, as in benches written before it was)."""

    seed: int
    times: list[float]
    rewards: list[float]
    end_diversity_feature: float | None = None
    end_diversity_pixel: float | None = None
    diversity_feature: list[float | None] | None = None


EFFICIENCY_METRICS = ("reward_at_equal_time", "seconds_to_reference_final", "fraction_of_reference_time",
                      "reward_auc", "end_diversity_feature", "end_diversity_pixel",
                      "diversity_at_reference_final", "diversity_ratio_at_reference_final")


def learning_efficiency(curves: dict[str, list[RunCurve]], reference: str, confidence: float = 0.95,
                        equal_time_from: str | None = None) -> dict:
    """Per method, per seed and over seeds, the learning-efficiency numbers of the module docstring.

    ``curves[method][i]`` is the method's run with the ``i``-th seed (same seeds, same order for every
    method). Returns ``{"horizon_s", "reference", "methods": {method: {"per_seed": [...],
    metric: Interval.as_dict()}}}``; ``horizon_s`` is the shortest run's final seconds.
    ``equal_time_from`` names the method whose final seconds (per seed) the reward at equal wall-clock
    is read at, default the reference: a bench re-paired with another method keeps reading at the
    seconds its runs trained to (every run reached the original reference's, not always the new one's).
    """
    if reference not in curves:
        raise ValueError(f"reference {reference!r} is not among the methods {list(curves)}")
    seeds = [c.seed for c in curves[reference]]
    for method, runs in curves.items():
        if [c.seed for c in runs] != seeds:
            raise ValueError(f"{method} has seeds {[c.seed for c in runs]}, the reference {seeds}")
    equal_time_from = equal_time_from or reference
    if equal_time_from not in curves:
        raise ValueError(f"equal_time_from {equal_time_from!r} is not among the methods {list(curves)}")
    horizon = min(c.times[-1] for runs in curves.values() for c in runs)
    result = {"reference": reference, "horizon_s": horizon, "seeds": seeds, "methods": {}}
    if equal_time_from != reference:
        result["equal_time_from"] = equal_time_from

    def diversity_at(run: RunCurve, target: float) -> float | None:
        if run.diversity_feature is None:
            return None
        return value_at_crossing(run.times, run.rewards, run.diversity_feature, target)

    for method, runs in curves.items():
        per_seed = []
        for run, ref, clock in zip(runs, curves[reference], curves[equal_time_from]):
            ref_seconds, ref_final = ref.times[-1], ref.rewards[-1]
            reach = first_crossing(run.times, run.rewards, ref_final)
            at_reward, ref_at_reward = diversity_at(run, ref_final), diversity_at(ref, ref_final)
            per_seed.append({
                "seed": run.seed,
                "reference_seconds": ref_seconds,
                "reference_final_reward": ref_final,
                "final_seconds": run.times[-1],
                "final_reward": run.rewards[-1],
                "equal_time_seconds": clock.times[-1],
                "reward_at_equal_time": interpolate(run.times, run.rewards, clock.times[-1]),
                "seconds_to_reference_final": reach,
                "fraction_of_reference_time": None if reach is None else reach / ref_seconds,
                "reward_auc": normalised_auc(run.times, run.rewards, horizon) if horizon > run.times[0] else None,
                "end_diversity_feature": run.end_diversity_feature,
                "end_diversity_pixel": run.end_diversity_pixel,
                "diversity_at_reference_final": at_reward,
                "diversity_ratio_at_reference_final": (at_reward / ref_at_reward if at_reward is not None
                                                       and ref_at_reward else None),
            })
        summary = {key: mean_interval([row[key] for row in per_seed], confidence).as_dict()
                   for key in EFFICIENCY_METRICS}
        result["methods"][method] = {"per_seed": per_seed, **summary}
    reference_rows = result["methods"][reference]["per_seed"]
    for method, numbers in result["methods"].items():
        if method != reference:
            numbers["paired"] = paired_differences(numbers["per_seed"], reference_rows, confidence)
    return result


PAIRED_METRICS = ("reward_at_equal_time", "reward_auc")


def paired_differences(rows: Sequence[dict], reference_rows: Sequence[dict], confidence: float = 0.95) -> dict:
    """Per :data:`PAIRED_METRICS` key: :func:`mean_interval` of ``rows[k][key] − reference_rows[k][key]``
    over the seeds (``None`` where either run has no value), plus ``seeds_above`` (how many
    differences are > 0) and ``separated``: the interval lies wholly above 0 (``1``), below (``-1``) or
    holds 0 (``0``; ``None`` with one seed or a missing value)."""
    if [r["seed"] for r in rows] != [r["seed"] for r in reference_rows]:
        raise ValueError("paired differences need the same seeds in the same order")
    out = {}
    for key in PAIRED_METRICS:
        diffs = [None if a[key] is None or b[key] is None else a[key] - b[key] for a, b in zip(rows, reference_rows)]
        interval = mean_interval(diffs, confidence)
        separated = None
        if interval.low is not None:
            separated = 1 if interval.low > 0 else -1 if interval.high < 0 else 0
        out[key] = {**interval.as_dict(), "differences": diffs,
                    "seeds_above": sum(1 for d in diffs if d is not None and d > 0), "separated": separated}
    return out


def intervals_separate(a: dict, b: dict) -> bool | None:
    """Whether two :meth:`Interval.as_dict` intervals do not overlap (None when either has none)."""
    if a["low"] is None or b["low"] is None:
        return None
    return a["low"] > b["high"] or b["low"] > a["high"]


def _cell(value: float | None, digits: int, missing: str) -> str:
    return missing if value is None else f"{value:.{digits}f}"


def _paired_lines(result: dict) -> list[str]:
    """The paired table of :func:`efficiency_lines` (nothing when only the reference ran)."""
    ref = result["reference"]
    paired = {m: numbers["paired"] for m, numbers in result["methods"].items() if "paired" in numbers}
    if not paired:
        return []
    verdict = {1: "above", -1: "below", 0: "not separated", None: "n/a"}
    lines = ["", f"Paired with `{ref}` (the same seed's runs; cells: mean of the seed-by-seed differences [95 % "
             "interval], how many seeds are above, and whether the interval excludes 0; \"separate intervals\": "
             f"whether the method's and `{ref}`'s own intervals of the first table do not overlap):", "",
             f"| method | reward at equal wall-clock − `{ref}` | seeds above | verdict | separate intervals | "
             f"reward AUC − `{ref}` | seeds above | verdict |", "|---|---|---|---|---|---|---|---|"]
    reference = result["methods"][ref]
    for method, numbers in paired.items():
        cells = []
        for key in PAIRED_METRICS:
            diff = numbers[key]
            shown = format_interval(Interval(diff["mean"], diff["low"], diff["high"], diff["n"], diff["missing"]),
                                    3, "n/a")
            counted = f"{diff['seeds_above']}/{diff['n']}"
            cells += [shown, counted, verdict[diff["separated"]]]
            if key == "reward_at_equal_time":
                apart = intervals_separate(result["methods"][method][key], reference[key])
                cells.append({True: "yes", False: "no", None: "n/a"}[apart])
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def efficiency_lines(result: dict) -> list[str]:
    """``bench.md``'s "Learning efficiency" section (markdown lines) from :func:`learning_efficiency`'s
    result: the over-seeds table, then every seed's numbers."""
    ref, horizon, seeds = result["reference"], result["horizon_s"], result["seeds"]
    plural = "s" if len(seeds) > 1 else ""
    lines = [
        "## Learning efficiency", "",
        f"{len(seeds)} seed{plural} ({', '.join(map(str, seeds))}); every run's held-out evaluations form a curve in "
        f"training seconds, linear between evaluations, compared with `{ref}`'s run of the same seed. Cells: mean "
        "over seeds [95 % Student-t interval] (n/a with one seed).", "",
        (f"- **reward at equal wall-clock**: the curve at `{ref}`'s final training seconds; \"ended earlier\" where a "
         "run stopped before them (run with `--equal-time` to give every run those seconds);"
         if "equal_time_from" not in result else
         f"- **reward at equal wall-clock**: the curve at `{result['equal_time_from']}`'s final training seconds (the "
         f"seconds the benches' runs trained to), the same seconds for `{ref}` and every method of a seed;"),
        f"- **seconds to `{ref}`'s final reward**: the first time the curve reaches `{ref}`'s final held-out reward "
        f"(\"not reached\" where it never did within its run); **fraction**: those seconds over `{ref}`'s;",
        f"- **reward AUC**: the area under reward vs seconds up to {horizon:.1f} s (the shortest run), divided by "
        f"{horizon:.1f} s: the mean held-out reward over that span;",
        "- **end diversity**: the last evaluation's mean pairwise distance among a prompt's samples, in random-conv "
        "features (0–2) and in pixels (RMS);",
        f"- **diversity at `{ref}`'s final reward**: the feature diversity (linear between evaluations) when the "
        f"curve first reaches that reward, and its ratio to `{ref}`'s own at that reward: diversity compared at "
        "equal reward, where end diversity also counts the reward a faster method bought.", "",
        f"| method | reward at equal wall-clock | seconds to `{ref}`'s final reward | fraction of `{ref}`'s time | "
        f"reward AUC (0–{horizon:.1f} s) | end diversity (features) | end diversity (pixels) | "
        f"diversity at `{ref}`'s final reward | vs `{ref}` at that reward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    missing = {"reward_at_equal_time": "ended earlier", "seconds_to_reference_final": "not reached",
               "fraction_of_reference_time": "not reached", "reward_auc": "n/a",
               "end_diversity_feature": "not measured", "end_diversity_pixel": "not measured",
               "diversity_at_reference_final": "n/a", "diversity_ratio_at_reference_final": "n/a"}
    digits = {"seconds_to_reference_final": 1}
    for method, numbers in result["methods"].items():
        cells = [format_interval(Interval(**numbers[key]), digits.get(key, 3), missing[key])
                 for key in EFFICIENCY_METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += _paired_lines(result)
    lines += ["", "Per seed:", "",
              f"| method | seed | `{ref}` seconds | `{ref}` final reward | final seconds | "
              "reward at equal wall-clock | "
              f"seconds to `{ref}`'s final reward | reward AUC | end diversity (features) | "
              f"diversity at `{ref}`'s final reward |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for method, numbers in result["methods"].items():
        for row in numbers["per_seed"]:
            lines.append(
                f"| {method} | {row['seed']} | {row['reference_seconds']:.1f} | {row['reference_final_reward']:.3f} | "
                f"{row['final_seconds']:.1f} | {_cell(row['reward_at_equal_time'], 3, 'ended earlier')} | "
                f"{_cell(row['seconds_to_reference_final'], 1, 'not reached')} | "
                f"{_cell(row['reward_auc'], 3, 'n/a')} | "
                f"{_cell(row['end_diversity_feature'], 3, 'not measured')} | "
                f"{_cell(row['diversity_at_reference_final'], 3, 'n/a')} |")
    return lines


__all__ = ["interpolate", "first_crossing", "value_at_crossing", "normalised_auc", "student_t_cdf", "t_quantile", "Interval",
           "mean_interval", "format_interval", "mean_band", "RunCurve", "learning_efficiency", "EFFICIENCY_METRICS",
           "efficiency_lines", "paired_differences", "PAIRED_METRICS", "intervals_separate"]
