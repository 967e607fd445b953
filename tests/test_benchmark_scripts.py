"""The analysis scripts in ``benchmarks/`` against the saved runs they read, recomputed independently."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def diversity_at(run: dict, target: float) -> float | None:
    """The diversity where the run's reward first reaches ``target``, by a dense grid (no shared code)."""
    times = np.array([e[1] for e in run["evals"]])
    rewards = np.array([e[2] for e in run["evals"]])
    features = np.array([d["diversity_feature"] for d in run["diversity"]])
    grid = np.linspace(0.0, times[-1], 400_001)
    above = np.nonzero(np.interp(grid, times, rewards) >= target)[0]
    return None if not len(above) else float(np.interp(grid[above[0]], times, features))


def test_diversity_at_reward_prints_the_matched_ratios_of_a_saved_bench(tmp_path, capsys):
    saved = ROOT / "benchmarks" / "results" / "le-digits-adaptive" / "bench.json"
    shutil.copy(saved, tmp_path / "bench.json")
    load_script("diversity_at_reward").main([str(tmp_path)])
    table = capsys.readouterr().out
    data = json.loads(saved.read_text())
    refs = data["seeds"]["dancegrpo"]
    for method, runs in data["seeds"].items():
        row = next(line for line in table.splitlines() if f"| `{method}` |" in line)
        matched_cell = row.split(" | ")[-1]
        for run, ref in zip(runs, refs):
            target = ref["evals"][-1][2]
            ours, theirs = diversity_at(run, target), diversity_at(ref, target)
            shown = "not reached" if ours is None else f"{ours / theirs:.0%}"
            assert shown in matched_cell
        assert matched_cell.count("%") + matched_cell.count("not reached") == len(runs) + 1
    pytest.importorskip("matplotlib")
    assert (tmp_path / "diversity_vs_reward.png").stat().st_size > 0


def test_diversity_at_reward_refuses_a_folder_without_a_bench(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_script("diversity_at_reward").main([str(tmp_path)])


def test_train_call_cost_fit_is_least_squares():
    fit = load_script("train_call_cost").fit
    sizes = [1, 2, 4, 8, 16, 32]
    seconds = [0.012 + 0.007 * s + 0.001 * ((-1) ** i) for i, s in enumerate(sizes)]
    slope, intercept = np.polyfit(sizes, seconds, 1)
    assert fit(sizes, seconds) == pytest.approx((intercept, slope))


def test_depth_reward_spread_reads_the_std_that_depth_advantages_divides_by():
    from branchgrpo.tree.advantages import depth_advantages

    median_group_std = load_script("depth_reward_spread").median_group_std
    g = torch.Generator().manual_seed(3)
    group = [torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])]
    fused = [torch.rand(len(grp), generator=g, dtype=torch.float64) for grp in group]
    spread = median_group_std(fused, group, 3)
    assert spread[0] != spread[0]  # one node per group: NaN
    for reward, grp, shown in zip(fused[1:], group[1:], spread[1:]):
        stds = [np.std(reward[grp == k].numpy(), ddof=1) for k in range(3) if int((grp == k).sum()) > 1]
        assert shown == pytest.approx(float(np.median(stds)) if len(stds) % 2 else sorted(stds)[len(stds) // 2 - 1])
    # the same std is what the advantage divides by: centred reward / advantage
    adv = depth_advantages(fused, group, 3)[2]
    mask = group[2] == 0
    centred = fused[2][mask] - fused[2][mask].mean()
    assert (centred / adv[mask].double()).numpy() == pytest.approx([np.std(fused[2][mask].numpy(), ddof=1)] * 3, rel=1e-5)


def test_ode_tail_fidelity_compares_each_tail_with_the_full_schedule(tmp_path, capsys, monkeypatch):
    """On the digits world: the full-schedule row is the reference (no change, z correlation 1),
    each tail row's calls per leaf are what the planner prices, and the group z-scores are computed
    with the population std (checked by hand on a small tensor)."""
    module = load_script("ode_tail_fidelity")
    z = module.group_z(torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0]), torch.tensor([0, 0, 1, 1, 1]))
    assert torch.allclose(z, torch.tensor([-1.0, 1.0, -2 ** -0.5, -2 ** -0.5, 2 ** 0.5]), atol=1e-6)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fidelity.md"
    module.main(["mixgrpo", "--prompts", "2", "--out", str(out), "run.threads=1"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "setting" not in line}
    assert rows["full schedule"][0] == "–" and rows["full schedule"][1] == "19.06"
    assert rows["full schedule"][3:] == ["0.0000", "0.0000", "1.000", "100%"]
    from branchgrpo.tree.nfe import plan
    from branchgrpo.tree.presets import method_config
    for label, keep, order in [("keep 0.4, order 2", 0.4, 2), ("keep 0.2, order 2", 0.2, 2)]:
        calls = plan(method_config("mixgrpo", [f"tree.ode_tail={{keep: {keep}, order: {order}}}"])).counts.per_leaf()
        assert float(rows[label][1]) == pytest.approx(calls["rollout_calls"], abs=0.005)
        assert float(rows[label][3]) > 0  # a coarser tail changes the pixels
    assert "full schedule" in capsys.readouterr().out
