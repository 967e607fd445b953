"""Learning-efficiency statistics against brute force, closed forms, scipy and printed t tables."""

import math
import statistics

import numpy as np
import pytest

from branchgrpo.bench_stats import (
    Interval,
    RunCurve,
    efficiency_lines,
    first_crossing,
    format_interval,
    intervals_separate,
    interpolate,
    learning_efficiency,
    mean_band,
    mean_interval,
    normalised_auc,
    paired_differences,
    student_t_cdf,
    t_quantile,
    value_at_crossing,
)


def random_curve(rng: np.random.Generator, points: int) -> tuple[list[float], list[float]]:
    times = np.concatenate([[0.0], np.cumsum(rng.uniform(0.5, 3.0, points - 1))])
    return times.tolist(), rng.uniform(0.0, 1.0, points).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_interpolate_matches_numpy_interp_inside_and_refuses_outside(seed):
    rng = np.random.default_rng(seed)
    times, values = random_curve(rng, 7)
    queries = np.concatenate([rng.uniform(0.0, times[-1], 50), times])
    for at in queries:
        assert interpolate(times, values, float(at)) == pytest.approx(float(np.interp(at, times, values)), abs=1e-12)
    assert interpolate(times, values, times[-1] + 0.01) is None
    assert interpolate(times, values, -0.01) is None


def test_interpolate_by_hand():
    assert interpolate([0.0, 10.0, 20.0], [0.2, 0.6, 0.4], 12.5) == pytest.approx(0.6 - 0.2 * 0.25)
    with pytest.raises(ValueError, match="strictly increase"):
        interpolate([0.0, 1.0, 1.0], [0.0, 1.0, 2.0], 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_first_crossing_matches_a_dense_grid_search(seed):
    rng = np.random.default_rng(seed)
    times, values = random_curve(rng, 8)
    step = times[-1] / 200_000
    grid = np.arange(0.0, times[-1], step)
    dense = np.interp(grid, times, values)
    for target in (0.3, 0.5, 0.8, 0.95, 1.2):
        found = first_crossing(times, values, target)
        above = np.nonzero(dense >= target)[0]
        if not len(above):
            assert found is None or found >= grid[-1]
            continue
        # the first grid point at or above the target lies within one step after the crossing
        assert found is not None and grid[above[0]] - step <= found <= grid[above[0]] + 1e-12
        assert interpolate(times, values, found) == pytest.approx(max(target, values[0]), abs=1e-9)


def test_first_crossing_by_hand():
    times, values = [0.0, 10.0, 20.0, 30.0], [0.4, 0.5, 0.9, 0.6]
    assert first_crossing(times, values, 0.7) == pytest.approx(15.0)  # 0.5 → 0.9 over 10 s: half-way
    assert first_crossing(times, values, 0.35) == 0.0  # already there at the start
    assert first_crossing(times, values, 0.9) == pytest.approx(20.0)
    assert first_crossing(times, values, 0.95) is None  # never, although the curve ends below its peak
    assert first_crossing([0.0, 5.0, 10.0], [0.8, 0.2, 0.9], 0.85) == pytest.approx(5.0 + 0.65 / 0.7 * 5.0)


@pytest.mark.parametrize("seed", range(5))
def test_value_at_crossing_matches_a_dense_grid_search(seed):
    rng = np.random.default_rng(10 + seed)
    times, rewards = random_curve(rng, 8)
    values = rng.uniform(0.0, 2.0, 8).tolist()
    step = times[-1] / 200_000
    grid = np.arange(0.0, times[-1] + step / 2, step)
    dense_reward, dense_value = np.interp(grid, times, rewards), np.interp(grid, times, values)
    slope = max(abs(b - a) / (t1 - t0) for a, b, t0, t1 in zip(values, values[1:], times, times[1:]))
    for target in (0.2, 0.5, 0.8, 0.95, 1.2):
        above = np.nonzero(dense_reward >= target)[0]
        found = value_at_crossing(times, rewards, values, target)
        if not len(above):
            assert found is None
            continue
        # the value curve on the first grid point at or above the target, within one step's change
        assert found == pytest.approx(float(dense_value[above[0]]), abs=slope * step + 1e-9)


def test_value_at_crossing_by_hand():
    times, rewards = [0.0, 10.0, 20.0, 30.0], [0.4, 0.5, 0.9, 0.6]
    diversity = [0.5, 0.4, 0.2, 0.3]
    assert value_at_crossing(times, rewards, diversity, 0.7) == pytest.approx(0.3)  # half-way 0.4 → 0.2
    assert value_at_crossing(times, rewards, diversity, 0.9) == pytest.approx(0.2)  # on an evaluation
    assert value_at_crossing(times, rewards, diversity, 0.3) == 0.5  # reached at the start
    assert value_at_crossing(times, rewards, diversity, 0.95) is None  # never reached
    assert value_at_crossing(times, rewards, [0.5, None, 0.2, 0.3], 0.7) is None  # a neighbour not measured
    assert value_at_crossing(times, rewards, [0.5, None, 0.2, 0.3], 0.9) == 0.2  # exactly on a measured one
    with pytest.raises(ValueError, match="same|times"):
        value_at_crossing(times, rewards, diversity[:3], 0.7)


@pytest.mark.parametrize("seed", range(5))
def test_normalised_auc_matches_a_fine_midpoint_sum(seed):
    rng = np.random.default_rng(seed)
    times, values = random_curve(rng, 9)
    horizon = float(rng.uniform(times[2], times[-1]))
    cells = 400_000
    h = horizon / cells
    midpoints = (np.arange(cells) + 0.5) * h
    riemann = float(np.interp(midpoints, times, values).mean())
    # the midpoint rule is exact on linear pieces; only the ≤ 9 cells holding a kink err, each by at
    # most h·|slope jump|·h/4, so the mean over [0, horizon] errs by at most 9·h·max|jump|/4 / cells
    slopes = np.diff(values) / np.diff(times)
    bound = 9 * h * float(np.abs(np.diff(slopes)).max()) / 4 / cells + 1e-12
    assert normalised_auc(times, values, horizon) == pytest.approx(riemann, abs=bound)


def test_normalised_auc_closed_forms():
    assert normalised_auc([0.0, 10.0], [0.0, 1.0], 5.0) == pytest.approx(0.25)  # mean of a line from 0 to 0.5
    assert normalised_auc([0.0, 3.0, 7.0], [0.6, 0.6, 0.6], 7.0) == pytest.approx(0.6)
    # 0→1 over 10 s, then flat at 1 for 10 s: (5 + 10) / 20
    assert normalised_auc([0.0, 10.0, 20.0], [0.0, 1.0, 1.0], 20.0) == pytest.approx(0.75)
    assert normalised_auc([0.0, 10.0], [0.0, 1.0], 11.0) is None


# two-sided 95 % critical values t(0.975, df) from printed tables (3 decimals)
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
               10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T_TABLE_975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE_975[df], abs=5e-4)


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [75, 200]:
        for t in (-7.5, -2.0, -0.3, 0.0, 0.4, 1.7, 3.3, 12.0):
            assert student_t_cdf(t, df) == pytest.approx(float(stats.t.cdf(t, df)), abs=1e-12)
        for p in (0.9, 0.975, 0.995, 0.05):
            assert t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-9)


def test_t_cdf_closed_forms_for_one_and_two_degrees_of_freedom():
    for t in (-3.0, -0.5, 0.0, 1.0, 4.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi)  # Cauchy
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))


def test_mean_interval_against_the_textbook_formula_and_scipy():
    values = [0.71, 0.64, 0.80, 0.69]
    mean, sd = statistics.mean(values), statistics.stdev(values)
    interval = mean_interval(values)
    half = 3.182 * sd / 2  # t(0.975, 3) from the table, √4 = 2
    assert interval.mean == pytest.approx(mean)
    assert interval.low == pytest.approx(mean - half, abs=1e-3 * sd)
    assert interval.high == pytest.approx(mean + half, abs=1e-3 * sd)
    try:
        from scipy import stats
    except ImportError:
        return
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-9)


def test_mean_interval_one_value_and_missing_values():
    one = mean_interval([0.5])
    assert (one.mean, one.low, one.high, one.n) == (0.5, None, None, 1)
    assert format_interval(one) == "0.500 (interval n/a, 1 seed)"
    some_missing = mean_interval([3.0, None, 5.0])
    assert some_missing == Interval(None, None, None, 3, 1)
    assert format_interval(some_missing) == "not reached (1/3 seeds)"
    assert format_interval(mean_interval([1.0, 2.0, 3.0]), digits=2) == "2.00 [-0.48, 4.48]"  # 2 ± 4.303·1/√3


def test_mean_band_is_the_pointwise_interval_of_the_interpolated_curves():
    curves = [([0.0, 10.0], [0.0, 1.0]), ([0.0, 5.0, 12.0], [0.2, 0.2, 0.9]), ([0.0, 10.0], [0.1, 0.5])]
    grid = [0.0, 2.5, 7.0, 10.0]
    means, lows, highs = mean_band(curves, grid)
    for at, mean, low, high in zip(grid, means, lows, highs):
        expected = mean_interval([float(np.interp(at, t, v)) for t, v in curves])
        assert (mean, low, high) == pytest.approx((expected.mean, expected.low, expected.high))
    with pytest.raises(ValueError, match="outside a curve"):
        mean_band(curves, [11.0])


def test_learning_efficiency_per_seed_numbers_and_summaries():
    curves = {
        "ref": [RunCurve(0, [0.0, 10.0, 20.0], [0.4, 0.6, 0.8], 0.5, 0.2),
                RunCurve(1, [0.0, 10.0, 25.0], [0.4, 0.5, 0.7], 0.4, 0.1)],
        "fast": [RunCurve(0, [0.0, 5.0, 10.0, 15.0, 20.0], [0.4, 0.6, 0.9, 0.8, 0.95], 0.3, 0.1),
                 RunCurve(1, [0.0, 8.0, 16.0, 26.0], [0.4, 0.8, 0.6, 0.9], 0.2, 0.05)],
        "slow": [RunCurve(0, [0.0, 12.0], [0.4, 0.5]), RunCurve(1, [0.0, 30.0], [0.4, 0.6])],
    }
    result = learning_efficiency(curves, "ref")
    assert result["horizon_s"] == 12.0  # the shortest run
    fast = result["methods"]["fast"]["per_seed"]
    # seed 0: reference ends at 20 s with 0.8; fast crosses 0.8 between 5 s (0.6) and 10 s (0.9)
    assert fast[0]["seconds_to_reference_final"] == pytest.approx(5.0 + 0.2 / 0.3 * 5.0)
    assert fast[0]["reward_at_equal_time"] == pytest.approx(0.95)
    assert fast[0]["fraction_of_reference_time"] == pytest.approx((5.0 + 0.2 / 0.3 * 5.0) / 20.0)
    # seed 1: reference ends at 25 s with 0.7; fast climbs 0.4 → 0.8 over 8 s: crosses 0.7 at 6 s
    assert fast[1]["seconds_to_reference_final"] == pytest.approx(6.0)
    assert fast[1]["reward_at_equal_time"] == pytest.approx(0.6 + 0.3 * 9.0 / 10.0)
    # areas over [0, 12]: seed 0 by trapezoids 0–5, 5–10, 10–12 (0.9 → 0.86)
    area = 0.5 * (0.4 + 0.6) * 5 + 0.5 * (0.6 + 0.9) * 5 + 0.5 * (0.9 + 0.86) * 2
    assert fast[0]["reward_auc"] == pytest.approx(area / 12.0)
    summary = result["methods"]["fast"]["seconds_to_reference_final"]
    assert summary["mean"] == pytest.approx(((5.0 + 0.2 / 0.3 * 5.0) + 6.0) / 2) and summary["n"] == 2
    slow = result["methods"]["slow"]
    assert [row["seconds_to_reference_final"] for row in slow["per_seed"]] == [None, None]
    assert slow["seconds_to_reference_final"]["missing"] == 2 and slow["seconds_to_reference_final"]["mean"] is None
    assert slow["per_seed"][0]["reward_at_equal_time"] is None  # stopped at 12 s, before the reference's 20 s
    assert slow["per_seed"][1]["reward_at_equal_time"] == pytest.approx(0.4 + 0.2 * 25 / 30)
    ref = result["methods"]["ref"]
    assert [row["reward_at_equal_time"] for row in ref["per_seed"]] == [0.8, 0.7]
    assert ref["end_diversity_feature"]["mean"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="seeds"):
        learning_efficiency({"ref": curves["ref"], "x": curves["fast"][:1]}, "ref")


def test_learning_efficiency_compares_diversity_at_the_reference_final_reward():
    curves = {
        # the reference ends at 0.8 with diversity 0.5, but it first reached 0.8 at 20 s with 0.6
        "ref": [RunCurve(0, [0.0, 10.0, 20.0, 30.0], [0.4, 0.6, 0.8, 0.8], 0.5, 0.2, [1.0, 0.8, 0.6, 0.5]),
                RunCurve(1, [0.0, 10.0], [0.4, 0.6], 0.7, 0.2, [1.0, 0.7])],
        # fast crosses 0.8 half-way between its evaluations at 5 s and 10 s, and ends far less diverse
        "fast": [RunCurve(0, [0.0, 5.0, 10.0, 30.0], [0.4, 0.6, 1.0, 1.0], 0.1, 0.05, [1.0, 0.9, 0.5, 0.1]),
                 RunCurve(1, [0.0, 10.0], [0.4, 0.5], 0.9, 0.3, [1.0, 0.9])],
        "old": [RunCurve(0, [0.0, 30.0], [0.4, 0.9], 0.3), RunCurve(1, [0.0, 10.0], [0.4, 0.7], 0.3)],
    }
    result = learning_efficiency(curves, "ref")
    ref, fast, old = (result["methods"][m]["per_seed"] for m in ("ref", "fast", "old"))
    assert ref[0]["diversity_at_reference_final"] == pytest.approx(0.6)  # its first crossing, not its end
    assert ref[0]["diversity_ratio_at_reference_final"] == pytest.approx(1.0)
    # fast, seed 0: 0.6 → 1.0 over 5–10 s reaches 0.8 at 7.5 s, where diversity is 0.9 → 0.5 half-way: 0.7
    assert fast[0]["diversity_at_reference_final"] == pytest.approx(0.7)
    assert fast[0]["diversity_ratio_at_reference_final"] == pytest.approx(0.7 / 0.6)
    assert fast[0]["end_diversity_feature"] == 0.1  # the end reading tells another story
    assert fast[1]["diversity_at_reference_final"] is None  # 0.5 never reaches the reference's 0.6
    assert result["methods"]["fast"]["diversity_ratio_at_reference_final"]["missing"] == 1
    assert old[0]["diversity_at_reference_final"] is None  # no per-evaluation diversity recorded
    assert result["methods"]["ref"]["diversity_at_reference_final"]["mean"] == pytest.approx((0.6 + 0.7) / 2)


@pytest.mark.parametrize("seed", range(3))
def test_paired_differences_match_scipys_paired_t_test(seed):
    """The interval of the seed-by-seed differences is the paired t interval (scipy's ttest_rel)."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    n = 4 + seed * 3
    shared = rng.normal(0.5, 0.1, n)  # a seed's luck, shared by both runs
    ours, theirs = shared + rng.normal(0.03, 0.02, n), shared
    rows = [{"seed": k, "reward_at_equal_time": float(a), "reward_auc": float(a) / 2} for k, a in enumerate(ours)]
    ref = [{"seed": k, "reward_at_equal_time": float(b), "reward_auc": float(b) / 2} for k, b in enumerate(theirs)]
    paired = paired_differences(rows, ref)["reward_at_equal_time"]
    ci = stats.ttest_rel(ours, theirs).confidence_interval(0.95)
    assert paired["mean"] == pytest.approx(float(np.mean(ours - theirs)), abs=1e-12)
    assert (paired["low"], paired["high"]) == (pytest.approx(float(ci.low), abs=1e-9), pytest.approx(float(ci.high), abs=1e-9))
    assert paired["seeds_above"] == int(np.sum(ours - theirs > 0)) and paired["n"] == n


def test_paired_differences_by_hand():
    rows = [{"seed": 0, "reward_at_equal_time": 0.6, "reward_auc": 0.5},
            {"seed": 1, "reward_at_equal_time": 0.62, "reward_auc": None},
            {"seed": 2, "reward_at_equal_time": 0.51, "reward_auc": 0.4}]
    ref = [{"seed": 0, "reward_at_equal_time": 0.5, "reward_auc": 0.5},
           {"seed": 1, "reward_at_equal_time": 0.5, "reward_auc": 0.45},
           {"seed": 2, "reward_at_equal_time": 0.4, "reward_auc": 0.3}]
    out = paired_differences(rows, ref)
    equal = out["reward_at_equal_time"]
    assert equal["differences"] == pytest.approx([0.1, 0.12, 0.11]) and equal["seeds_above"] == 3
    half = t_quantile(0.975, 2) * statistics.stdev([0.1, 0.12, 0.11]) / math.sqrt(3)  # 4.303 · 0.01 / √3
    assert (equal["low"], equal["high"]) == (pytest.approx(0.11 - half), pytest.approx(0.11 + half))
    assert equal["separated"] == 1  # 0.11 ± 0.025
    auc = out["reward_auc"]  # one seed has no value: no mean, no verdict
    assert auc["mean"] is None and auc["missing"] == 1 and auc["separated"] is None and auc["seeds_above"] == 1
    below = paired_differences([{**r, "reward_at_equal_time": r["reward_at_equal_time"] - 0.3} for r in rows], ref)
    assert below["reward_at_equal_time"]["separated"] == -1 and below["reward_at_equal_time"]["seeds_above"] == 0
    mixed = paired_differences([{**r, "reward_at_equal_time": v} for r, v in zip(rows, (0.6, 0.4, 0.45))], ref)  # +0.1, −0.1, +0.05
    assert mixed["reward_at_equal_time"]["separated"] == 0
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences(rows[::-1], ref)


def test_intervals_separate():
    a = {"low": 0.1, "high": 0.2}
    assert intervals_separate(a, {"low": 0.21, "high": 0.3}) is True
    assert intervals_separate({"low": 0.25, "high": 0.3}, a) is True
    assert intervals_separate(a, {"low": 0.15, "high": 0.3}) is False
    assert intervals_separate(a, {"low": None, "high": None}) is None


def test_learning_efficiency_adds_the_paired_table():
    curves = {
        "ref": [RunCurve(k, [0.0, 10.0], [0.4, 0.5 + 0.01 * k]) for k in range(3)],
        "tree": [RunCurve(k, [0.0, 5.0, 10.0], [0.4, 0.6, 0.56 + 0.02 * k]) for k in range(3)],
    }
    result = learning_efficiency(curves, "ref")
    assert "paired" not in result["methods"]["ref"]
    paired = result["methods"]["tree"]["paired"]["reward_at_equal_time"]
    assert paired["differences"] == pytest.approx([0.06, 0.07, 0.08]) and paired["separated"] == 1
    row = next(line for line in efficiency_lines(result) if line.startswith("| tree | 0.070"))
    assert "| 3/3 | above |" in row
