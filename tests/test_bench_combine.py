"""`branchgrpo bench --combine`: benches over disjoint seeds pooled into one learning-efficiency table."""

import json
import shutil

import pytest
from test_bench_seeds import METHODS, TINY, brightness_reward, tiny_generator

from branchgrpo.bench import run_bench
from branchgrpo.bench_combine import CombineError, combine_benches
from branchgrpo.bench_stats import RunCurve, learning_efficiency
from branchgrpo.cli import main
from branchgrpo.train.trainer import Trainer


@pytest.fixture(scope="module")
def two_benches(tmp_path_factory):
    """Two tiny equal-time benches: seeds 3–4 and seed 7."""
    root = tmp_path_factory.mktemp("combine")

    def make_trainer(config):
        return Trainer(config, model=tiny_generator(), reward=brightness_reward)

    for name, seed, seeds in (("a", 3, 2), ("b", 7, 1)):
        run_bench(METHODS, iterations=1, eval_every=1, out_dir=root / name, overrides=[*TINY, f"run.seed={seed}"],
                  make_trainer=make_trainer, equal_time=True, seeds=seeds)
    return root


def curves_of(folder):
    """Every run of a bench folder as :class:`RunCurve`, read from its bench.json here."""
    data = json.loads((folder / "bench.json").read_text())
    return {m: [RunCurve(r["seed"], [e[1] for e in r["evals"]], [e[2] for e in r["evals"]],
                         r["diversity"][-1]["diversity_feature"], r["diversity"][-1]["diversity_pixel"],
                         [d["diversity_feature"] for d in r["diversity"]]) for r in runs]
            for m, runs in data["seeds"].items()}


def test_pooled_table_is_the_table_of_every_seed(two_benches):
    a, b = curves_of(two_benches / "a"), curves_of(two_benches / "b")
    pooled = {m: sorted(a[m] + b[m], key=lambda c: c.seed) for m in METHODS}
    expected = learning_efficiency(pooled, "dancegrpo")
    got = combine_benches([two_benches / "b", two_benches / "a"], two_benches / "pooled")  # any order
    assert got["seeds"] == [3, 4, 7]
    assert got == json.loads(json.dumps(expected))  # as written to bench.json (tuples become lists)
    saved = json.loads((two_benches / "pooled" / "bench.json").read_text())
    assert saved["learning_efficiency"] == got and saved["meta"]["seeds"] == [3, 4, 7]
    assert [s["seeds"] for s in saved["meta"]["sources"]] == [[7], [3, 4]]
    md = (two_benches / "pooled" / "bench.md").read_text()
    assert "3 seeds pooled from 2 benches" in md and "## Learning efficiency" in md and "Paired with `dancegrpo`" in md
    assert f"`{two_benches / 'a'}`: seeds 3, 4" in md
    assert (two_benches / "pooled" / "reward_vs_time_seeds.png").is_file() or not _has_matplotlib()


def test_pooled_measured_over_ideal_is_every_seeds_own(two_benches, tmp_path):
    """The pooled cost section lists each source's per-seed readings (each run against its own
    bench's reference run); pooling a pooled result with another bench keeps them."""
    combine_benches([two_benches / "a", two_benches / "b"], tmp_path / "pooled")
    saved = json.loads((tmp_path / "pooled" / "bench.json").read_text())
    per_source = {}
    for name in ("a", "b"):
        source = json.loads((two_benches / name / "bench.json").read_text())["cost_over_seeds"]["branchgrpo-mix"]
        per_source.update(zip(source["seeds"], source["per_seed"]))
    pooled = saved["cost_over_seeds"]["branchgrpo-mix"]
    assert pooled["seeds"] == [3, 4, 7] and pooled["n"] == 3
    assert pooled["per_seed"] == pytest.approx([per_source[s] for s in (3, 4, 7)])
    assert pooled["mean"] == pytest.approx(sum(pooled["per_seed"]) / 3)
    assert "## measured/ideal over seeds" in (tmp_path / "pooled" / "bench.md").read_text()
    # seed 7 moved to a copy with new seeds: the pooled folder re-pools with it
    other = tmp_path / "other"
    shutil.copytree(two_benches / "b", other)
    data = json.loads((other / "bench.json").read_text())
    for runs in data["seeds"].values():
        for r in runs:
            r["seed"] = 11
    (other / "bench.json").write_text(json.dumps(data))
    combine_benches([tmp_path / "pooled", other], tmp_path / "again")
    again = json.loads((tmp_path / "again" / "bench.json").read_text())["cost_over_seeds"]["branchgrpo-mix"]
    assert again["seeds"] == [3, 4, 7, 11] and again["per_seed"][:3] == pytest.approx(pooled["per_seed"])


def test_benches_record_every_methods_settings_and_differing_ones_are_refused(two_benches, tmp_path):
    settings = json.loads((two_benches / "a" / "bench.json").read_text())["meta"]["settings"]
    assert set(settings) == set(METHODS)
    mix = settings["branchgrpo-mix"]
    assert mix["method.engine.train_micro_batch"] == 16 and mix["method.tree.steps"] == 6
    assert "run.seed" not in mix and "run.output_dir" not in mix
    assert settings["dancegrpo"]["method.name"] == "dancegrpo"

    def edit(data):
        data["meta"]["settings"]["branchgrpo-mix"]["method.engine.train_micro_batch"] = 64
        data["meta"]["settings"]["branchgrpo-mix"]["a.key.from.newer.code"] = 1  # one-sided: ignored
    with pytest.raises(CombineError, match=r"`branchgrpo-mix` ran with method.engine.train_micro_batch = 64, but"):
        combine_benches([two_benches / "a", _copy_with(two_benches, tmp_path, edit)], tmp_path / "out")

    def newer(data):
        data["meta"]["settings"]["branchgrpo-mix"]["a.key.from.newer.code"] = 1
    combine_benches([two_benches / "a", _copy_with(two_benches, tmp_path / "n", newer)], tmp_path / "ok")

    def older(data):
        del data["meta"]["settings"]
    combine_benches([two_benches / "a", _copy_with(two_benches, tmp_path / "o", older)], tmp_path / "old")
    assert "(written before benches recorded them): not checked there" in (tmp_path / "old" / "bench.md").read_text()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _copy_with(two_benches, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(two_benches / "b", folder)
    data = json.loads((folder / "bench.json").read_text())
    edit(data)
    (folder / "bench.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["meta"].update(iterations=5), "iterations = 5, but .* has 1"),
    (lambda d: d["meta"].update(equal_time=False), "equal_time = False"),
    (lambda d: d["meta"].update(method_overrides={"dancegrpo": {"preset": "dancegrpo", "overrides": ["lr=1"]}}),
     "method_overrides"),
    (lambda d: d["seeds"].pop("branchgrpo-mix"), r"methods \['dancegrpo'\], but"),
    (lambda d: [r.update(seed=4) for runs in d["seeds"].values() for r in runs], "seed 4 is in both"),
    (lambda d: d.pop("seeds"), "without per-seed runs"),
])
def test_benches_that_differ_are_refused_by_name(two_benches, tmp_path, edit, message):
    edited = _copy_with(two_benches, tmp_path, edit)
    with pytest.raises(CombineError, match=message):
        combine_benches([two_benches / "a", edited], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_combines_and_refuses_in_one_line(two_benches, tmp_path, capsys):
    assert main(["bench", "--combine", str(two_benches / "a"), str(two_benches / "b"), "--out",
                 str(tmp_path / "pooled")]) == 0
    assert "3 seeds pooled from 2 benches" in capsys.readouterr().out
    for args, message in (([str(two_benches / "a")], "at least two bench folders"),
                          ([str(two_benches / "a"), str(tmp_path / "none")], "no bench.json"),
                          ([str(two_benches / "a"), str(two_benches / "b")], "is one of the benches")):
        out = str(two_benches / "a") if message == "is one of the benches" else str(tmp_path / "x")
        assert main(["bench", "--combine", *args, "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("branchgrpo: error: --combine: ") and message in err[0]


def test_settings_are_read_before_training(tmp_path):
    """A run whose tree moves while it trains (``tree.adaptive_splits``) is recorded with the
    split plan it started from, so two benches of one configuration pool; ``settings_at`` says so."""
    class MovingSplits(Trainer):
        def step(self):
            row = super().step()
            self.config.method.tree.split_plan = {1: 2, 3: 2}  # what adaptive placement does between iterations
            return row

    run_bench(METHODS, iterations=1, eval_every=1, out_dir=tmp_path / "bench", overrides=[*TINY, "run.seed=5"],
              make_trainer=lambda c: MovingSplits(c, model=tiny_generator(), reward=brightness_reward), seeds=1)
    meta = json.loads((tmp_path / "bench" / "bench.json").read_text())["meta"]
    assert meta["settings_at"] == "start"
    assert meta["settings"]["branchgrpo-mix"]["method.tree.split_plan"] == {"0": 2, "2": 2}


def _reseed(folder, seed):
    """Give every run of a bench folder ``seed`` (so two copies of one bench hold disjoint seeds)."""
    data = json.loads((folder / "bench.json").read_text())
    for runs in data["seeds"].values():
        for r in runs:
            r["seed"] = seed
    (folder / "bench.json").write_text(json.dumps(data))


def _adaptive(plan, at_start):
    def edit(data):
        for method in data["meta"]["settings"].values():
            method.pop("method.tree.adaptive_splits", None)  # as run_settings flattens the dataclass
            method.update({"method.tree.adaptive_splits.every": 1, "method.tree.adaptive_splits.decay": 0.5})
        data["meta"]["settings"]["branchgrpo-mix"]["method.tree.split_plan"] = plan
        if not at_start:
            data["meta"].pop("settings_at", None)
    return edit


def test_a_moved_adaptive_split_plan_is_compared_only_where_it_was_read_at_the_start(two_benches, tmp_path):
    """Benches written before ``settings_at: start`` recorded an adaptive method's split plan after
    training (moved, different per seed): pooled with a note saying it was not compared. Read at
    the start in both, a different plan is a different configuration and is refused; a method
    without adaptive splits is always compared."""
    old_a = _copy_with(two_benches, tmp_path / "oa", _adaptive({"2": 2, "3": 2}, at_start=False))
    old_b = _copy_with(two_benches, tmp_path / "ob", _adaptive({"0": 2, "5": 2}, at_start=False))
    _reseed(old_b, 9)
    combine_benches([old_a, old_b], tmp_path / "pooled")
    md = (tmp_path / "pooled" / "bench.md").read_text()
    assert "`branchgrpo-mix`'s method.tree.split_plan not compared: adaptive splits move it" in md
    saved = json.loads((tmp_path / "pooled" / "bench.json").read_text())["meta"]
    assert len(saved["settings_not_compared"]) == 1 and "settings_at" not in saved

    new_b = _copy_with(two_benches, tmp_path / "nb", _adaptive({"0": 2, "5": 2}, at_start=True))
    new_a = _copy_with(two_benches, tmp_path / "na", _adaptive({"2": 2, "3": 2}, at_start=True))
    _reseed(new_b, 9)
    with pytest.raises(CombineError, match=r"`branchgrpo-mix` ran with method.tree.split_plan"):
        combine_benches([new_a, new_b], tmp_path / "refused")

    def fixed_plan(data):
        data["meta"].pop("settings_at", None)
        data["meta"]["settings"]["branchgrpo-mix"]["method.tree.split_plan"] = {"0": 2, "5": 2}
    with pytest.raises(CombineError, match=r"method.tree.split_plan"):
        combine_benches([two_benches / "a", _copy_with(two_benches, tmp_path / "f", fixed_plan)], tmp_path / "x")


def test_one_bench_re_paired_with_another_method_by_hand(two_benches, tmp_path):
    """--reference: every method paired with branchgrpo-mix; rewards at equal wall-clock still read
    at dancegrpo's final seconds (the seconds the runs trained to), computed here with numpy/scipy."""
    import numpy as np
    from scipy import stats

    got = combine_benches([two_benches / "a"], tmp_path / "re", reference="branchgrpo-mix")
    curves = curves_of(two_benches / "a")
    dance, mix = curves["dancegrpo"], curves["branchgrpo-mix"]
    assert got["reference"] == "branchgrpo-mix" and got["equal_time_from"] == "dancegrpo"
    at = [d.times[-1] for d in dance]
    dance_eq = [float(np.interp(t, d.times, d.rewards)) for t, d in zip(at, dance)]
    mix_eq = [float(np.interp(t, m.times, m.rewards)) for t, m in zip(at, mix)]
    rows = got["methods"]["dancegrpo"]["per_seed"]
    assert [r["equal_time_seconds"] for r in rows] == pytest.approx(at)
    assert [r["reward_at_equal_time"] for r in rows] == pytest.approx(dance_eq)
    assert [r["reference_final_reward"] for r in rows] == pytest.approx([m.rewards[-1] for m in mix])
    diffs = [a - b for a, b in zip(dance_eq, mix_eq)]
    paired = got["methods"]["dancegrpo"]["paired"]["reward_at_equal_time"]
    assert paired["differences"] == pytest.approx(diffs)
    assert paired["mean"] == pytest.approx(np.mean(diffs))
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert (paired["low"], paired["high"]) == pytest.approx((low, high))
    assert "paired" not in got["methods"]["branchgrpo-mix"]
    saved = json.loads((tmp_path / "re" / "bench.json").read_text())["meta"]
    assert saved["reference"] == "branchgrpo-mix" and saved["trained_against"] == "dancegrpo"
    md = (tmp_path / "re" / "bench.md").read_text()
    assert "paired with `branchgrpo-mix`" in md and "Paired with `branchgrpo-mix`" in md
    assert "trained up to `dancegrpo`'s seconds" in md and "--reference branchgrpo-mix" in md
    # the cost readings stay against the run each alternated with, as in the source bench
    source = json.loads((two_benches / "a" / "bench.json").read_text())["cost_over_seeds"]["branchgrpo-mix"]
    again = json.loads((tmp_path / "re" / "bench.json").read_text())["cost_over_seeds"]["branchgrpo-mix"]
    assert again["per_seed"] == pytest.approx(source["per_seed"])
    # a re-paired folder pools with another bench re-paired the same way, not with a plain one
    combine_benches([two_benches / "b"], tmp_path / "re-b", reference="branchgrpo-mix")
    pooled = combine_benches([tmp_path / "re", tmp_path / "re-b"], tmp_path / "pooled")
    assert pooled["reference"] == "branchgrpo-mix" and pooled["seeds"] == [3, 4, 7]
    with pytest.raises(CombineError, match="reference 'dancegrpo', but"):
        combine_benches([tmp_path / "re", two_benches / "b"], tmp_path / "mixed")


def test_re_pairing_refuses_an_unknown_method_and_the_cli_says_where_it_applies(two_benches, tmp_path, capsys):
    with pytest.raises(CombineError, match="'mixgrpo' is not a method of the benches; they ran dancegrpo, "
                                           "branchgrpo-mix"):
        combine_benches([two_benches / "a"], tmp_path / "x", reference="mixgrpo")
    assert main(["bench", "--combine", str(two_benches / "a"), "--reference", "dancegrpo", "--out",
                 str(tmp_path / "same")]) == 0
    assert "paired with" not in capsys.readouterr().out.splitlines()[0]  # its own reference: a plain re-read
    assert main(["bench", "--reference", "mixgrpo", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference: only with --combine" in err[0]
