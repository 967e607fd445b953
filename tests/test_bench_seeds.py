"""`branchgrpo bench --seeds N`: every method × seed interleaved, the learning-efficiency table and json."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from policies import tiny_flux, tiny_flux_conditioning

from branchgrpo.bench import run_bench
from branchgrpo.bench_stats import format_interval, mean_interval
from branchgrpo.cli import main
from branchgrpo.families import PolicyBundle
from branchgrpo.train.trainer import Trainer

PROMPTS = ["red", "green"]
METHODS = ["dancegrpo", "branchgrpo-mix"]
TINY = ["run.device=cpu", "data.prompts_per_iteration=1", "eval.samples_per_prompt=2", "tree.steps=6",
        "split_plan=0:2,2:2", "tree.sde_window.size=2", "update.updates_per_iteration=1"]


def tiny_generator() -> PolicyBundle:
    policy, info = tiny_flux(seed=0)
    table = tiny_flux_conditioning(len(PROMPTS))

    def encode(prompts):
        return {k: v[torch.tensor([PROMPTS.index(p) for p in prompts])] for k, v in table.items()}

    return PolicyBundle(
        family="tiny", policy=policy, trainable=policy.transformer, latent_shape=(info["tokens"], info["channels"]),
        encode_prompts=encode, decode=lambda x: x.mean(dim=-1, keepdim=True).unsqueeze(1).sigmoid(),
        train_prompts=PROMPTS, heldout_prompts=PROMPTS[:1],
    )


def brightness_reward(images, prompts):
    return images.flatten(1).mean(dim=1)


@pytest.fixture(scope="module")
def seeded_bench(tmp_path_factory):
    """One 2-seed bench shared by the tests below; records the order in which runs stepped."""
    out = tmp_path_factory.mktemp("bench")
    order = []

    def make_trainer(config):
        trainer = Trainer(config, model=tiny_generator(), reward=brightness_reward)
        step = trainer.step
        trainer.step = lambda: (order.append((config.method.name, config.run.seed)), step())[1]
        return trainer

    result = run_bench(METHODS, iterations=1, eval_every=1, out_dir=out, overrides=[*TINY, "run.seed=3"],
                       make_trainer=make_trainer, equal_time=True, seeds=2)
    return out, result, order


def test_every_method_and_seed_steps_in_turn(seeded_bench):
    _, _, order = seeded_bench
    assert order[:4] == [("dancegrpo", 3), ("branchgrpo-mix", 3), ("dancegrpo", 4), ("branchgrpo-mix", 4)]
    assert order.count(("dancegrpo", 3)) == order.count(("dancegrpo", 4)) == 1  # the reference sets the budget


def test_json_keeps_every_seed_and_the_statistics_follow_from_the_curves(seeded_bench):
    out, result, _ = seeded_bench
    saved = json.loads((out / "bench.json").read_text())
    assert saved["meta"]["seeds"] == [3, 4]
    runs = saved["seeds"]
    assert [r["seed"] for r in runs["dancegrpo"]] == [3, 4] and [r["seed"] for r in runs["branchgrpo-mix"]] == [3, 4]
    for name in METHODS:
        for run in runs[name]:
            assert len(run["iteration_times"]) == run["evals"][-1][0] >= 1  # the last iteration is evaluated
            assert run["evals"][0][:2] == [0, 0.0] and len(run["diversity"]) == len(run["evals"])
    # same weights and evaluation noise: every run starts at the same held-out reward; the seeds then differ
    starts = {run["evals"][0][2] for name in METHODS for run in runs[name]}
    assert len(starts) == 1
    assert runs["dancegrpo"][0]["evals"][-1][2] != runs["dancegrpo"][1]["evals"][-1][2]
    # the first seed's runs are still the cost table's (and the old top-level json fields)
    assert saved["evals"]["dancegrpo"] == runs["dancegrpo"][0]["evals"]
    efficiency = saved["learning_efficiency"]
    horizon = min(r["evals"][-1][1] for name in METHODS for r in runs[name])
    assert efficiency["horizon_s"] == pytest.approx(horizon)
    for name in METHODS:
        rows = efficiency["methods"][name]["per_seed"]
        for row, run, ref in zip(rows, runs[name], runs["dancegrpo"]):
            times, rewards = [e[1] for e in run["evals"]], [e[2] for e in run["evals"]]
            ref_seconds, ref_final = ref["evals"][-1][1], ref["evals"][-1][2]
            assert run["evals"][-1][1] >= ref_seconds - 1e-9  # --equal-time: every run has the reference's seconds
            assert row["reward_at_equal_time"] == pytest.approx(float(np.interp(ref_seconds, times, rewards)))
            grid = np.linspace(0.0, horizon, 20001)
            area = float(np.trapezoid(np.interp(grid, times, rewards), grid))
            assert row["reward_auc"] == pytest.approx(area / horizon, abs=1e-6)
            assert row["end_diversity_feature"] == run["diversity"][-1]["diversity_feature"]
            reach = row["seconds_to_reference_final"]
            if reach is None:
                assert max(rewards) < ref_final
                assert row["diversity_at_reference_final"] is None
            else:
                assert np.interp(reach, times, rewards) >= ref_final - 1e-9
                assert all(r < ref_final for t, r in zip(times, rewards) if t < reach - 1e-9)
                diversities = [d["diversity_feature"] for d in run["diversity"]]
                assert row["diversity_at_reference_final"] == pytest.approx(float(np.interp(reach, times, diversities)))
        summary = efficiency["methods"][name]["reward_at_equal_time"]
        values = [row["reward_at_equal_time"] for row in rows]
        assert summary["mean"] == pytest.approx(np.mean(values)) and summary["n"] == 2
        half = 12.706 * np.std(values, ddof=1) / np.sqrt(2)  # t(0.975, 1) from the table
        assert summary["high"] - summary["mean"] == pytest.approx(half, rel=1e-4)
    dance = efficiency["methods"]["dancegrpo"]["per_seed"]
    finals = [r["evals"][-1][2] for r in runs["dancegrpo"]]
    assert [row["reward_at_equal_time"] for row in dance] == pytest.approx(finals)
    assert result["learning_efficiency"]["methods"].keys() == set(METHODS)


def test_markdown_has_the_learning_efficiency_table_and_keeps_the_cost_columns(seeded_bench):
    out, result, _ = seeded_bench
    text = (out / "bench.md").read_text()
    assert "× 2 seeds" in text.splitlines()[0]
    cost_header = next(line for line in text.splitlines() if line.startswith("| method | iterations |"))
    assert cost_header.split(" | ")[1:6] == ["iterations", "train_seconds", "nfe_old_per_leaf", "nfe_train_per_leaf",
                                             "trained_edges_per_leaf"]
    assert [r["method"] for r in result["rows"]] == METHODS
    section = text[text.index("## Learning efficiency"):]
    header = next(line for line in section.splitlines() if line.startswith("| method | reward at equal"))
    assert header.count("|") == 10
    for name in METHODS:
        numbers = result["learning_efficiency"]["methods"][name]
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} | "))
        values = [r["reward_at_equal_time"] for r in numbers["per_seed"]]
        assert format_interval(mean_interval(values)) in row
        per_seed_rows = [line for line in section.splitlines() if line.startswith(f"| {name} | 3 |")
                         or line.startswith(f"| {name} | 4 |")]
        assert len(per_seed_rows) == 2
    for plot in ("reward_vs_time_seeds.png", "diversity_vs_reward.png"):
        assert (out / plot).stat().st_size > 0 or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_one_seed_says_the_interval_is_not_available_and_unreached_is_not_a_number(tmp_path):
    result = run_bench(METHODS, iterations=1, eval_every=1, out_dir=tmp_path, overrides=TINY,
                       make_trainer=lambda config: Trainer(config, model=tiny_generator(), reward=brightness_reward))
    text = (tmp_path / "bench.md").read_text()
    assert "(interval n/a, 1 seed)" in text
    for name in METHODS:
        row = result["learning_efficiency"]["methods"][name]["per_seed"][0]
        if row["seconds_to_reference_final"] is None:
            section = text[text.index("## Learning efficiency"):].splitlines()
            line = next(x for x in section if x.startswith(f"| {name} |"))
            assert "not reached (1/1 seed)" in line


@pytest.mark.parametrize("args, message", [(["--seeds", "0"], "--seeds: must be >= 1"),
                                           (["--seconds", "-1"], "--seconds: must be >= 0")])
def test_cli_refuses_bad_seed_and_seconds_counts(capsys, args, message):
    assert main(["bench", "--methods", "dancegrpo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def _sweep_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_scores_cells_at_the_common_horizon_and_picks_the_best():
    sweep = _sweep_module()
    runs = {  # label → runs with evals [iteration, seconds, reward]
        "a": [{"seed": 0, "evals": [[0, 0.0, 0.2], [2, 10.0, 0.6]], "iteration_times": [5.0, 5.0],
               "diversity": [{}, {}]}],
        "b": [{"seed": 0, "evals": [[0, 0.0, 0.2], [1, 4.0, 0.3], [3, 12.0, 0.9]], "iteration_times": [4.0, 4.0, 4.0],
               "diversity": [{}, {}, {"diversity_feature": 0.4}]}],
    }
    horizon, scores = sweep.score_cells(runs)
    assert horizon == 10.0
    assert scores["a"]["reward_at_horizon"]["mean"] == pytest.approx(0.6)
    assert scores["b"]["reward_at_horizon"]["mean"] == pytest.approx(0.3 + 0.6 * 6 / 8)  # 4 s → 12 s: 0.3 → 0.9
    assert scores["b"]["reward_auc"]["mean"] == pytest.approx((0.5 * 0.5 * 4 + 0.5 * (0.3 + 0.75) * 6) / 10)
    assert scores["b"]["end_diversity_feature"]["mean"] == 0.4 and scores["a"]["end_diversity_feature"]["missing"] == 1
    cells = [{"name": k, **v} for k, v in scores.items()]
    assert sweep.best_cell(cells)["name"] == "b"  # 0.75 at 10 s beats 0.6


def test_sweep_trains_every_cell_with_its_settings_and_writes_best(tmp_path):
    sweep = _sweep_module()
    seen = []

    def make_trainer(config):
        update = config.method.update
        seen.append((config.method.name, update.learning_rate, update.updates_per_iteration))
        return Trainer(config, model=tiny_generator(), reward=brightness_reward)

    results = sweep.run_sweep(["branchgrpo-mix"], [5e-4, 1e-3], [1, 2], seeds=1, seconds=0.0, iterations=1,
                              eval_every=1, out_dir=tmp_path, overrides=TINY[:-1], make_trainer=make_trainer)
    assert seen == [("branchgrpo-mix", 5e-4, 1), ("branchgrpo-mix", 5e-4, 2), ("branchgrpo-mix", 1e-3, 1),
                    ("branchgrpo-mix", 1e-3, 2)]
    cells = results["methods"]["branchgrpo-mix"]["cells"]
    saved = json.loads((tmp_path / "branchgrpo-mix" / "bench.json").read_text())["seeds"]
    horizon = results["methods"]["branchgrpo-mix"]["horizon_s"]
    for cell in cells:
        run = saved[f"branchgrpo-mix_lr{cell['learning_rate']:g}_u{cell['updates_per_iteration']}"][0]
        times, rewards = [e[1] for e in run["evals"]], [e[2] for e in run["evals"]]
        assert cell["reward_at_horizon"]["mean"] == pytest.approx(float(np.interp(horizon, times, rewards)))
    best = max(cells, key=lambda c: c["reward_at_horizon"]["mean"])
    assert json.loads((tmp_path / "best.json").read_text()) == {"branchgrpo-mix": best["overrides"]}
    assert best["overrides"] == [f"update.learning_rate={best['learning_rate']:g}",
                                 f"update.updates_per_iteration={best['updates_per_iteration']}"]
    rows = [line for line in (tmp_path / "sweep.md").read_text().splitlines() if line.startswith("| 0.")]
    assert len(rows) == 4 and [row.endswith("| **best** |") for row in rows].count(True) == 1
    assert rows[cells.index(best)].endswith("| **best** |")


def test_cli_tuned_file_must_map_methods_to_overrides(tmp_path, capsys):
    bad = tmp_path / "best.json"
    bad.write_text(json.dumps({"dancegrpo": "update.learning_rate=1e-3"}))
    assert main(["bench", "--methods", "dancegrpo", "--tuned", str(bad)]) == 2
    assert "--tuned:" in capsys.readouterr().err
    assert main(["bench", "--methods", "dancegrpo", "--tuned", str(tmp_path / "missing.json")]) == 2
    assert "--tuned: cannot read" in capsys.readouterr().err


def _variants_file(tmp_path, spec) -> str:
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize("spec, message", [
    ({"mix-kl": {"preset": "no-such-preset"}}, "unknown preset 'no-such-preset'"),
    ({"dancegrpo": {"preset": "branchgrpo-mix"}}, "the label is a preset's name"),
    ({"mix kl/2": {"preset": "branchgrpo-mix"}}, "a label is 1-64 letters"),
    ({"mix-kl": {"preset": "branchgrpo-mix", "overrides": "update.kl_coef=0.1"}}, "overrides must be a list"),
    ({"mix-kl": {"preset": "branchgrpo-mix", "lr": 1}}, "expected {preset: NAME"),
    ({"mix-kl": {"preset": "branchgrpo-mix", "overrides": ["update.kl_coef=0.1"]}}, "the KL term needs a reference"),
    ({"mix-kl": {"preset": "branchgrpo-mix", "overrides": ["update.no_such_key=1"]}}, "unknown key"),
])
def test_cli_variants_file_is_checked_before_anything_trains(tmp_path, capsys, spec, message):
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "dancegrpo,mix-kl", "--variants", _variants_file(tmp_path, spec),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("branchgrpo: error: ")
    assert not out.exists()


def test_cli_methods_must_name_a_preset_or_a_variant(tmp_path, capsys):
    variants = _variants_file(tmp_path, {"mix-lora": {"preset": "branchgrpo-mix", "overrides": ["model.lora.rank=4"]}})
    assert main(["bench", "--methods", "dancegrpo,mix-kl", "--variants", variants]) == 2
    err = capsys.readouterr().err
    assert "unknown preset(s) mix-kl" in err and "from --variants: mix-lora" in err
    assert main(["bench", "--methods", "dancegrpo,dancegrpo"]) == 2
    assert "named twice" in capsys.readouterr().err


def test_cli_variant_runs_its_preset_with_tuned_then_its_own_overrides(tmp_path, monkeypatch):
    import branchgrpo.bench

    seen = {}

    def fake_run_bench(methods, *args, variants=None, **kwargs):
        seen.update(methods=methods, variants=variants)
        (Path(args[2]) / "bench.md").parent.mkdir(parents=True, exist_ok=True)
        (Path(args[2]) / "bench.md").write_text("ok")
        return {"rows": [1]}

    monkeypatch.setattr(branchgrpo.bench, "run_bench", fake_run_bench)
    tuned = tmp_path / "best.json"
    tuned.write_text(json.dumps({"dancegrpo": ["update.learning_rate=1e-4"],
                                 "branchgrpo-mix": ["update.learning_rate=2.5e-05"]}))
    variants = _variants_file(tmp_path, {
        "mix-kl": {"preset": "branchgrpo-mix", "overrides": ["model.lora.rank=4", "update.kl_coef=0.04"]},
        "unused": {"preset": "branchgrpo"}})
    assert main(["bench", "--methods", "dancegrpo,branchgrpo-mix,mix-kl", "--variants", variants, "--tuned", str(tuned),
                 "--out", str(tmp_path / "bench")]) == 0
    assert seen["methods"] == ["dancegrpo", "branchgrpo-mix", "mix-kl"]
    assert seen["variants"] == {
        "dancegrpo": ("dancegrpo", ["update.learning_rate=1e-4"]),
        "branchgrpo-mix": ("branchgrpo-mix", ["update.learning_rate=2.5e-05"]),
        # the preset's tuned settings first, so the variant's own overrides win where they overlap
        "mix-kl": ("branchgrpo-mix", ["update.learning_rate=2.5e-05", "model.lora.rank=4", "update.kl_coef=0.04"]),
    }
