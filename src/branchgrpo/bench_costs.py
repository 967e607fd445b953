"""What an iteration should cost and what it did: the bench's ``measured_over_ideal``, per seed.

An iteration's ideal time prices the work it counts (:data:`PRICED_WORK`: rollout forwards,
training rows, scored samples, prompt groups) at the reference method's own measured cost per unit;
``measured_over_ideal`` is a method's median iteration time relative to the reference's, divided
by that ideal ratio. A value above 1 is what the method's engine adds beyond that work compared
with the reference's (Python around small frontiers, fixed costs of micro-batches and optimizer
steps spread over fewer rows).

One run's reading moves by several percent with the machine's speed during its iterations, so a
multi-seed bench reads it for every seed (each run against the reference's run of the same seed,
which alternated with it) and reports the mean over seeds with its 95 % interval
(:func:`seed_cost_ratios`).
"""

from __future__ import annotations

import statistics
from typing import Mapping, Protocol, Sequence

from branchgrpo.bench_stats import Interval, format_interval, mean_interval


PRICED_WORK = {"rollout_calls": "rollout", "training_forwards": "train", "scored_samples": "reward",
               "prompt_groups": "encode"}
"""Counted work → the phase whose seconds it costs. The reward and prompt-encoding phases are priced
too: they do the same work per sample and per prompt in every method, and leaving them out of the
ideal while the measured time includes them reads every method cheaper than the reference above 1
with no overhead at all ((a + r) / (A + r) > a / A for a < A). Runs saved before samples and prompt
groups were counted are priced on their model calls only."""


class CostRecord(Protocol):
    """What the cost functions read of a run (:class:`branchgrpo.bench.MethodRecord`)."""

    seed: int
    iteration_times: list[float]

    @property
    def calls_per_iteration(self) -> dict[str, float]: ...

    def unit_costs(self) -> dict[str, float]: ...

    def first(self, n: int) -> "CostRecord": ...


def ideal_seconds(record: CostRecord, costs: Mapping[str, float]) -> float:
    """One iteration of ``record`` priced at ``costs`` (seconds per unit of each :data:`PRICED_WORK`
    count; counts missing from ``costs`` are not priced).

    Per iteration, as the measured time it is compared with (a K = 3 tree has 81 leaves per prompt
    against DanceGRPO's 16: per-leaf counts would price a fifth of its iteration)."""
    per_iteration = record.calls_per_iteration
    return sum(per_iteration.get(work, 0.0) * cost for work, cost in costs.items())


def measured_over_ideal(run: CostRecord, reference: CostRecord) -> float:
    """``run``'s median iteration time over ``reference``'s, divided by the ratio of their ideal
    times priced at ``reference``'s in-run unit costs (1.0 for the reference itself); only the work
    both runs counted is priced."""
    counted = run.calls_per_iteration
    costs = {work: cost for work, cost in reference.unit_costs().items() if work in counted}
    time_ratio = statistics.median(run.iteration_times) / statistics.median(reference.iteration_times)
    return time_ratio / (ideal_seconds(run, costs) / ideal_seconds(reference, costs))


def seed_cost_ratios(seed_records: dict[str, Sequence[CostRecord]], reference: str, rounds: int,
                     confidence: float = 0.95) -> dict[str, dict]:
    """Per method other than ``reference``: ``measured_over_ideal`` of every seed's run against the
    reference's run of the same seed, both read over their first ``rounds`` iterations (the
    interleaved rounds, see :meth:`branchgrpo.bench.MethodRecord.first`), and the mean over seeds
    with its ``confidence`` interval (:meth:`branchgrpo.bench_stats.Interval.as_dict` keys)."""
    by_seed = {r.seed: r.first(rounds) for r in seed_records[reference]}
    out = {}
    for method, runs in seed_records.items():
        if method == reference:
            continue
        missing = [r.seed for r in runs if r.seed not in by_seed]
        if missing:
            raise ValueError(f"{method}: seeds {missing} have no `{reference}` run to compare with")
        per_seed = [measured_over_ideal(r.first(rounds), by_seed[r.seed]) for r in runs]
        out[method] = {**mean_interval(per_seed, confidence).as_dict(), "seeds": [r.seed for r in runs],
                       "per_seed": per_seed}
    return out


def cost_lines(costs: dict[str, dict] | None, reference: str, rounds: int) -> list[str]:
    """``bench.md``'s "measured/ideal over seeds" section from :func:`seed_cost_ratios` (nothing
    when ``costs`` is None or empty)."""
    if not costs:
        return []
    lines = ["", "## measured/ideal over seeds", "",
             f"Every seed's run against `{reference}`'s run of the same seed, over the {rounds} interleaved rounds "
             "(median iteration time relative to the reference's, divided by the ideal ratio at the reference's "
             "in-run unit costs of rollout calls, training rows, scored samples and prompt groups); mean over seeds "
             "[95 % interval]; the target is a mean ≤ 1.05.", "",
             "| method | measured/ideal | per seed | mean ≤ 1.05 |", "|---|---|---|---|"]
    for method, c in costs.items():
        shown = format_interval(Interval(c["mean"], c["low"], c["high"], c["n"]), 3)
        per_seed = " / ".join(f"{v:.3f}" for v in c["per_seed"])
        lines.append(f"| `{method}` | {shown} | {per_seed} | {'yes' if c['mean'] <= 1.05 else 'no'} |")
    return lines


__all__ = ["PRICED_WORK", "ideal_seconds", "measured_over_ideal", "seed_cost_ratios", "cost_lines"]
