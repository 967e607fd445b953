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


def test_reward_and_encode_phases_are_priced_so_a_run_without_overhead_reads_one():
    """Both methods score 64 samples and encode 4 prompt groups per iteration at the same cost, and
    every model call costs the reference's price: measured/ideal is exactly 1. Priced on the model
    calls only (a run saved before samples were counted), the same run reads (a + r) / (A + r)
    over a / A > 1 with no overhead at all."""
    def record(method, roll_calls, train_rows):
        phases = {"rollout": roll_calls * 2e-3, "train": train_rows * 8e-3, "reward": 64 * 1e-2, "encode": 4 * 1e-2}
        calls = {"rollout_calls": roll_calls, "training_forwards": train_rows, "scored_samples": 64, "prompt_groups": 4}
        return MethodRecord(method, seed=0, iteration_times=[sum(phases.values())] * 2,
                            phase_times={k: [v] * 2 for k, v in phases.items()},
                            calls={k: 2 * v for k, v in calls.items()}, iteration_calls=[calls] * 2)

    ref, mix = record("dancegrpo", 1000, 1000), record("mix", 800, 60)
    assert ref.unit_costs() == pytest.approx({"rollout_calls": 2e-3, "training_forwards": 8e-3,
                                              "scored_samples": 1e-2, "prompt_groups": 1e-2})
    assert measured_over_ideal(mix, ref) == pytest.approx(1.0)
    a, big_a, r = 800 * 2e-3 + 60 * 8e-3, 1000 * 2e-3 + 1000 * 8e-3, 64 * 1e-2 + 4 * 1e-2
    older = MethodRecord("mix", seed=0, iteration_times=mix.iteration_times, phase_times=mix.phase_times,
                         calls={k: v for k, v in mix.calls.items() if k in ("rollout_calls", "training_forwards")})
    assert measured_over_ideal(older, ref) == pytest.approx(((a + r) / (big_a + r)) / (a / big_a))
    assert measured_over_ideal(older, ref) > 1.2


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


def test_bench_counts_the_scored_samples_and_prompt_groups_it_prices(seeded_bench):  # noqa: F811
    """Every iteration's scored samples are the plan's leaves per prompt × prompts (one process), and
    the reward and encode phases are priced per sample and per prompt group at the reference's cost."""
    from test_bench_seeds import METHODS, TINY

    from branchgrpo.train.config import load_train_config
    from branchgrpo.tree.nfe import plan

    out, _, _ = seeded_bench
    saved = json.loads((out / "bench.json").read_text())
    prompts = saved["meta"]["prompts_per_iteration"]
    for method in METHODS:
        leaves = plan(load_train_config(None, method, TINY).method).nodes_per_depth[-1]
        for run in saved["seeds"][method]:
            assert {(c["scored_samples"], c["prompt_groups"]) for c in run["iteration_calls"]} == {(leaves * prompts, prompts)}
    ref = MethodRecord.from_saved("dancegrpo", saved["seeds"]["dancegrpo"][0]).first(saved["meta"]["iterations"])
    samples = sum(c["scored_samples"] for c in ref.iteration_calls)
    assert saved["meta"]["unit_cost_reward_sample_s"] == pytest.approx(sum(ref.phase_times["reward"]) / samples)
    assert saved["meta"]["unit_cost_encode_group_s"] == pytest.approx(
        sum(ref.phase_times["encode"]) / sum(c["prompt_groups"] for c in ref.iteration_calls))


def test_interleaved_costs_fills_in_the_counts_of_older_benches(tmp_path, capsys):
    """benchmarks/interleaved_costs.py on a bench saved without scored-sample and prompt-group counts
    (16 leaves × 4 prompts, the reward and encode phases as in the test above): as saved it prices
    the model calls only; with ``--leaves-per-prompt 16`` the run without overhead reads 1."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import interleaved_costs

    def saved(seed, roll_calls, train_rows):
        phases = {"rollout": roll_calls * 2e-3, "train": train_rows * 8e-3, "reward": 64 * 1e-2, "encode": 4 * 1e-2}
        calls = {"rollout_calls": roll_calls, "training_forwards": train_rows}
        return MethodRecord("m", seed=seed, iteration_times=[sum(phases.values())] * 3,
                            phase_times={k: [v] * 3 for k, v in phases.items()},
                            calls={k: 3 * v for k, v in calls.items()}, iteration_calls=[calls] * 3).saved()

    bench = {"meta": {"iterations": 2, "reference": "dancegrpo", "prompts_per_iteration": 4},
             "seeds": {"dancegrpo": [saved(s, 1000, 1000) for s in (0, 1)], "mix": [saved(s, 800, 60) for s in (1, 0)]}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))

    def interleaved(*args) -> list[float]:
        interleaved_costs.main([*args, str(tmp_path)])
        row = next(line for line in capsys.readouterr().out.splitlines() if "`mix`" in line)
        return [float(v) for v in row.split("|")[5].split("/")]

    assert interleaved("--leaves-per-prompt", "16") == [1.0, 1.0]
    a, big_a, r = 800 * 2e-3 + 60 * 8e-3, 1000 * 2e-3 + 1000 * 8e-3, 64 * 1e-2 + 4 * 1e-2
    assert interleaved() == pytest.approx([((a + r) / (big_a + r)) / (a / big_a)] * 2, abs=6e-4)
