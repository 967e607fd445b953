"""`branchgrpo bench --combine`: pool the seeds of finished benches into one learning-efficiency table.

A bench with many seeds takes hours on a small machine; run it as several benches over disjoint
seeds (``run.seed=0 --seeds 10``, then ``run.seed=10 --seeds 10``) and combine them. Each run is
compared with the reference's run of the same seed, which ran interleaved with it in the same
bench, so pooling keeps every pair's shared machine conditions. The benches must agree on
everything that defines the comparison (world, methods and their settings, iterations, equal-time
mode, prompts per iteration, reference); the cost tables stay in the source benches.

``reference=`` re-pairs the runs with another method of the benches (one folder is enough): "is
BranchGRPO-Mix better than MixGRPO?" from a bench that was paired with ``dancegrpo``. The reward at
equal wall-clock is still read at the seconds the runs trained to (the benches' own reference's).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from branchgrpo.bench_plots import diversity_plot, seed_plot
from branchgrpo.bench_costs import cost_lines, seed_cost_ratios
from branchgrpo.bench_stats import efficiency_lines, learning_efficiency

# what must be equal in every source bench's meta for its runs to be pooled
SAME = ("model", "iterations", "equal_time", "prompts_per_iteration", "seconds_budget", "method_overrides")


def _trained_against(meta: dict) -> str:
    """The method whose seconds a bench's runs trained to (its reference before any re-pairing)."""
    return meta.get("trained_against") or meta["reference"]


# a run's own: never compared between benches
PER_RUN = ("run.seed", "run.output_dir")


def run_settings(config) -> dict:
    """A run's resolved config as ``{dotted key: value}`` (JSON values), without :data:`PER_RUN`:
    what two benches' runs of one method must share to be pooled. Only the config's sections are
    split into keys; a mapping-valued field (``split_plan``, ``model.options``) stays one value, so a
    key it has in one bench and not the other still counts as a difference."""
    import dataclasses

    from branchgrpo.config import to_dict

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
        else:
            flat[prefix] = to_dict(value)

    walk("", config)
    return {k: v for k, v in json.loads(json.dumps(flat, default=str)).items() if k not in PER_RUN}


MOVING = "method.tree.split_plan"  # rewritten during a run by tree.adaptive_splits


def _adaptive(settings: dict) -> bool:
    """Whether a run's settings move its split plan (``tree.adaptive_splits`` set; the dataclass is
    recorded as ``method.tree.adaptive_splits.every`` / ``.decay``, None as the bare key)."""
    return any(v is not None for k, v in settings.items() if k.startswith("method.tree.adaptive_splits"))


def _settings_differ(folder: Path, data: dict, first_folder: Path, first: dict) -> tuple[str | None, list[str]]:
    """The first setting a method has with another value in ``first`` (keys present in both; a key
    only one bench knows comes from another version of the code), as a message, or None; and the
    settings left uncompared: an adaptive-split method's ``split_plan`` where a bench read it after
    training (before ``settings_at: start``), when it had already moved per seed."""
    mine, theirs = data["meta"].get("settings") or {}, first["meta"].get("settings") or {}
    read_late = [str(f) for f, d in ((first_folder, first), (folder, data)) if d["meta"].get("settings_at") != "start"]
    skipped = []
    for method in sorted(mine.keys() & theirs.keys()):
        for key in sorted(mine[method].keys() & theirs[method].keys()):
            if mine[method][key] == theirs[method][key]:
                continue
            if key == MOVING and read_late and _adaptive(mine[method]):
                skipped.append(f"`{method}`'s {key} not compared: adaptive splits move it during a run, and "
                               f"{' and '.join(read_late)} recorded it after training")
                continue
            return (f"{folder}: `{method}` ran with {key} = {mine[method][key]!r}, but {first_folder} has "
                    f"{theirs[method][key]!r}"), skipped
    return None, skipped


class CombineError(ValueError):
    """The benches cannot be pooled; the message names the folder and what differs."""


def _load(folder: Path) -> dict:
    path = folder / "bench.json"
    if not path.is_file():
        raise CombineError(f"{folder}: no bench.json (not a finished `branchgrpo bench` folder)")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise CombineError(f"{path}: not JSON ({err})") from None
    if "seeds" not in data or "meta" not in data:
        raise CombineError(f"{path}: written by a bench without per-seed runs (no 'seeds'); rerun it")
    return data


def combine_benches(folders: list[str | Path], out_dir: str | Path, reference: str | None = None) -> dict:
    """Pool the per-seed runs of ``folders`` (``bench.json`` each) and write ``bench.md``, ``bench.json``,
    ``reward_vs_time_seeds.png`` and ``diversity_vs_reward.png`` into ``out_dir``. Returns the
    learning-efficiency result (:func:`branchgrpo.bench_stats.learning_efficiency`). ``reference``
    pairs every method with that one instead of the benches' reference; then one folder may be given."""
    from branchgrpo.bench import MethodRecord

    folders = [Path(f) for f in folders]
    if len(folders) < (1 if reference else 2):
        raise CombineError("needs at least two bench folders (or one with --reference, to re-pair it)")
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == f.resolve() for f in folders):
        raise CombineError(f"--out {out_dir} is one of the benches to combine; write the pooled result elsewhere")
    loaded = [(folder, _load(folder)) for folder in folders]
    first_folder, first = loaded[0]
    methods = list(first["seeds"])
    uncompared: list[str] = []
    for folder, data in loaded[1:]:
        if list(data["seeds"]) != methods:
            raise CombineError(f"{folder}: methods {list(data['seeds'])}, but {first_folder} has {methods}")
        for key in SAME:
            if data["meta"].get(key) != first["meta"].get(key):
                raise CombineError(f"{folder}: {key} = {data['meta'].get(key)!r}, but {first_folder} has "
                                   f"{first['meta'].get(key)!r}")
        mine, theirs = _trained_against(data["meta"]), _trained_against(first["meta"])
        if mine != theirs:
            raise CombineError(f"{folder}: trained to the seconds of {mine!r}, but {first_folder} has {theirs!r}")
        mine, theirs = data["meta"]["reference"], first["meta"]["reference"]
        if reference is None and mine != theirs:  # a new --reference re-pairs them all alike
            raise CombineError(f"{folder}: reference {mine!r}, but {first_folder} has {theirs!r}")
        differ, skipped = _settings_differ(folder, data, first_folder, first)
        if differ:
            raise CombineError(differ)
        uncompared += skipped
    seen: dict[int, Path] = {}
    for folder, data in loaded:
        for run in data["seeds"][methods[0]]:
            if run["seed"] in seen:
                raise CombineError(f"seed {run['seed']} is in both {seen[run['seed']]} and {folder}; combine disjoint seeds")
            seen[run["seed"]] = folder
    runs: dict[str, list[MethodRecord]] = {m: [] for m in methods}
    for _, data in loaded:
        for method in methods:
            runs[method] += [MethodRecord.from_saved(method, saved) for saved in data["seeds"][method]]
    for method in methods:
        runs[method].sort(key=lambda r: r.seed)
    trained_against = _trained_against(first["meta"])
    if reference is not None and reference not in methods:
        raise CombineError(f"--reference {reference!r} is not a method of the benches; they ran {', '.join(methods)}")
    reference = reference or first["meta"]["reference"]
    repaired = reference != trained_against
    efficiency = learning_efficiency({m: [r.curve() for r in rs] for m, rs in runs.items()}, reference,
                                     equal_time_from=trained_against)
    # measured/ideal per seed needs every run's iteration times (a --combine result keeps them too)
    # the cost readings stay against the benches' own reference, whose run each alternated with
    costs = (seed_cost_ratios(runs, trained_against, first["meta"]["iterations"])
             if all(r.iteration_times for rs in runs.values() for r in rs) else None)
    sources = [{"folder": str(folder), "date": data["meta"].get("date"), "machine": data["meta"].get("machine"),
                "seeds": data["meta"].get("seeds")} for folder, data in loaded]
    meta = {key: first["meta"].get(key) for key in SAME}
    meta["reference"] = reference
    if repaired:
        meta["trained_against"] = trained_against
    meta["settings"] = first["meta"].get("settings")
    uncompared = list(dict.fromkeys(uncompared))
    meta["settings_not_compared"] = uncompared
    if all(data["meta"].get("settings_at") == "start" for _, data in loaded):
        meta["settings_at"] = "start"
    meta.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), sources=sources,
                seeds=sorted(seen))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(
        {"meta": meta, "learning_efficiency": efficiency, "cost_over_seeds": costs,
         "seeds": {m: [r.saved() for r in rs] for m, rs in runs.items()}}, indent=2))
    lines = [
        f"# branchgrpo bench — {meta['model']} world, {len(seen)} seeds pooled from {len(loaded)} benches"
        + (f", paired with `{reference}`" if repaired else ""),
        "",
        f"- pooled on {meta['date']} by `branchgrpo bench --combine {' '.join(str(f) for f in folders)} "
        + (f"--reference {reference} " if repaired else "")
        + f"--out {out_dir}`; each run is compared with `{reference}`'s run of the same seed, from the same bench",
        *([f"- the runs trained up to `{trained_against}`'s seconds (the benches' reference); rewards at equal "
           f"wall-clock are read there"] if repaired else []),
        *[f"- `{s['folder']}`: seeds {', '.join(map(str, s['seeds'] or []))}; {s['date']}; {s['machine']}"
          for s in sources],
        f"- {meta['iterations']} interleaved iterations"
        + (f", then each method up to `{trained_against}`'s training seconds" if meta["equal_time"] else "")
        + f"; prompts per iteration: {meta['prompts_per_iteration']}",
        *[f"- `{label}`: preset `{v['preset']}` with " + (", ".join(f"`{o}`" for o in v["overrides"]) or
                                                          "no extra overrides")
          for label, v in (meta["method_overrides"] or {}).items()],
        *[f"- {note}" for note in uncompared],
        "- the cost tables (iteration times, NFE, unit costs): in each source's bench.md",
        "- every method's resolved settings (config file, preset, overrides; all but seed and folder) agree key by key "
        "across the benches" + ("" if all(d["meta"].get("settings") for _, d in loaded) else
                                "; not recorded by " + ", ".join(f"`{f}`" for f, d in loaded if not d["meta"].get("settings"))
                                + " (written before benches recorded them): not checked there"),
        "",
        *efficiency_lines(efficiency),
        *cost_lines(costs, trained_against, meta["iterations"]),
    ]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    seed_plot(runs, out_dir)
    diversity_plot(runs, out_dir / "diversity_vs_reward.png")
    return efficiency


__all__ = ["combine_benches", "CombineError"]
