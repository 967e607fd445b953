"""measured/ideal per seed: the bench's cost reading against a hand computation, paired by seed,
and the mean over seeds with its Student-t interval (scipy)."""

import json
import statistics

import pytest
from scipy import stats
from test_bench_seeds import seeded_bench  # noqa: F401  (the shared 2-seed bench fixture)

from branchgrpo.bench import MethodRecord
from branchgrpo.bench_costs import cost_lines, ideal_seconds, measured_over_ideal, seed_cost_ratios


def run(method, seed, times, rollout, train, roll_calls, train_rows):
    """A record of ``len(times)`` iterations with the given phase seconds and calls per iteration."""
    n = len(times)
    return MethodRecord(method, seed=seed, iteration_times=list(times),
                        phase_times={"rollout": [rollout] * n, "train": [train] * n},
                        calls={"rollout_calls": roll_calls * n, "training_forwards": train_rows * n},
                        iteration_calls=[{"rollout_calls": roll_calls, "training_forwards": train_rows}] * n)


def test_measured_over_ideal_by_hand():
    ref = run("dancegrpo", 0, [10.0, 12.0, 11.0], rollout=2.0, train=8.0, roll_calls=1000, train_rows=1000)
    mix = run("mix", 0, [2.0, 2.4, 2.2], rollout=1.5, train=0.6, roll_calls=800, train_rows=60)
    # reference unit costs: 2 ms per rollout call, 8 ms per training row
    ideal_ref, ideal_mix = 1000 * 2e-3 + 1000 * 8e-3, 800 * 2e-3 + 60 * 8e-3
    assert ideal_seconds(mix, ref.unit_costs()) == pytest.approx(ideal_mix)
    expected = (2.2 / 11.0) / (ideal_mix / ideal_ref)
    assert measured_over_ideal(mix, ref) == pytest.approx(expected)
    assert measured_over_ideal(ref, ref) == pytest.approx(1.0)


def test_seed_cost_ratios_pair_by_seed_and_match_scipy():
    refs, mixes = [], []
    for seed, slow in zip([5, 3, 9, 4], [1.00, 1.10, 0.95, 1.20]):
        refs.append(run("dancegrpo", seed, [10.0, 11.0], 2.0, 8.0, 1000, 1000))
        mixes.append(run("mix", seed, [2.0 * slow, 2.2 * slow], 1.5, 0.6, 800, 60))
    mixes.reverse()  # pairing goes by seed, not by position
    got = seed_cost_ratios({"dancegrpo": refs, "mix": mixes}, "dancegrpo", rounds=2)
    assert list(got) == ["mix"]
    per_seed = {seed: measured_over_ideal(m, r) for r, m in zip(refs, reversed(mixes)) for seed in [r.seed]}
    assert got["mix"]["seeds"] == [m.seed for m in mixes]
    assert got["mix"]["per_seed"] == pytest.approx([per_seed[m.seed] for m in mixes])
    values = got["mix"]["per_seed"]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=statistics.mean(values), scale=stats.sem(values))
    assert got["mix"]["mean"] == pytest.approx(statistics.mean(values))
    assert (got["mix"]["low"], got["mix"]["high"]) == pytest.approx((low, high))
    lines = "\n".join(cost_lines(got, "dancegrpo", 2))
    assert "## measured/ideal over seeds" in lines and ("| no |" in lines) == (got["mix"]["mean"] > 1.05)


def test_seed_cost_ratios_read_only_the_interleaved_rounds():
    ref = run("dancegrpo", 0, [10.0, 10.0, 50.0, 50.0], 2.0, 8.0, 1000, 1000)
    mix = run("mix", 0, [2.0, 2.0, 9.0, 9.0, 9.0], 1.5, 0.6, 800, 60)
    two = seed_cost_ratios({"dancegrpo": [ref], "mix": [mix]}, "dancegrpo", rounds=2)["mix"]["per_seed"][0]
    assert two == pytest.approx(measured_over_ideal(mix.first(2), ref.first(2)))
    assert two != pytest.approx(measured_over_ideal(mix, ref))


def test_a_seed_without_its_reference_run_is_refused():
    ref = run("dancegrpo", 0, [10.0], 2.0, 8.0, 1000, 1000)
    mix = run("mix", 1, [2.0], 1.5, 0.6, 800, 60)
    with pytest.raises(ValueError, match=r"mix: seeds \[1\] have no `dancegrpo` run"):
        seed_cost_ratios({"dancegrpo": [ref], "mix": [mix]}, "dancegrpo", rounds=1)


def test_bench_reports_measured_over_ideal_over_seeds(seeded_bench):  # noqa: F811
    out, result, _ = seeded_bench
    saved = json.loads((out / "bench.json").read_text())
    costs = saved["cost_over_seeds"]["branchgrpo-mix"]
    assert costs["seeds"] == [3, 4] and costs["n"] == 2
    # recomputed from the saved runs; the first seed's value is the cost table's
    runs = {m: [MethodRecord.from_saved(m, r) for r in rs] for m, rs in saved["seeds"].items()}
    again = seed_cost_ratios(runs, "dancegrpo", saved["meta"]["iterations"])["branchgrpo-mix"]
    assert again["per_seed"] == pytest.approx(costs["per_seed"])
    row = next(r for r in result["rows"] if r["method"] == "branchgrpo-mix")
    assert row["measured_over_ideal"] == pytest.approx(costs["per_seed"][0], abs=1e-4)
    md = (out / "bench.md").read_text()
    assert "## measured/ideal over seeds" in md and "(mean over 2 seeds; the cost table's run:" in md
