"""``branchgrpo bench``'s PNG plots (optional: without matplotlib the tables are the whole result).

Every plot takes the bench's :class:`branchgrpo.bench.MethodRecord` runs (duck-typed: ``evals``,
``diversity`` and ``curve()``), so saved benches can be redrawn from ``bench.json``.
"""

from __future__ import annotations

from pathlib import Path

from branchgrpo.bench_stats import mean_band


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str | None = None) -> None:
    if title is not None:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reward_plots(records: dict, out_dir: Path) -> None:
    """``reward_vs_iteration.png`` and ``reward_vs_time.png``: one run per method."""
    plt = _pyplot()
    if plt is None:
        return
    for index, label, name in ((0, "iteration", "reward_vs_iteration.png"),
                               (1, "training wall-clock (s)", "reward_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for method, record in records.items():
            ax.plot([e[index] for e in record.evals], [e[2] for e in record.evals], marker="o", ms=3, label=method)
        _finish(plt, fig, ax, out_dir / name, label, "held-out mean reward")


def seed_plot(seed_records: dict, out_dir: Path) -> None:
    """``reward_vs_time_seeds.png``: per method the mean held-out reward over seeds against training
    seconds (each seed's curve linear between evaluations, up to the method's shortest run) and the
    pointwise 95 % Student-t band (none with one seed)."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, runs in seed_records.items():
        curves = [(c.times, c.rewards) for c in (r.curve() for r in runs)]
        end = min(times[-1] for times, _ in curves)
        grid = [end * i / 100 for i in range(101)]
        means, lows, highs = mean_band(curves, grid)
        (line,) = ax.plot(grid, means, label=method)
        if lows[0] is not None:
            ax.fill_between(grid, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
    seeds = len(next(iter(seed_records.values())))
    title = f"mean over {seeds} seeds, 95 % t band" if seeds > 1 else "one seed"
    _finish(plt, fig, ax, out_dir / "reward_vs_time_seeds.png", "training wall-clock (s)", "held-out mean reward",
            title)


def diversity_plot(seed_records: dict, path: Path, title: str = "") -> None:
    """Feature diversity against held-out reward at every evaluation of every seed, one colour per
    method, each run's points joined in order: where the methods' paths overlap, a faster method
    loses diversity only as fast as the reward it gains costs the reference too."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, runs in seed_records.items():
        colour = None
        for run in runs:
            points = [(e[2], d.get("diversity_feature")) for e, d in zip(run.evals, run.diversity)]
            points = [(r, v) for r, v in points if v is not None]
            if not points:
                continue
            (line,) = ax.plot(*zip(*points), marker="o", ms=2.5, lw=0.8, alpha=0.8, color=colour,
                              label=None if colour else method)
            colour = line.get_color()
    _finish(plt, fig, ax, path, "held-out mean reward", "feature diversity (mean pairwise distance)",
            title or "every evaluation of every seed")


__all__ = ["reward_plots", "seed_plot", "diversity_plot"]
