"""The intra-group diversity bonus (docs/beyond-the-paper.md §5) against a brute-force computation."""

from __future__ import annotations

import math

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.tree.diversity_bonus import group_diversity_bonus
from branchgrpo.tree.spec import AdvantageSpec


def brute_force(leaves: torch.Tensor, group: list[int], weight: float) -> list[float]:
    rows = [[float(v) for v in leaf.flatten()] for leaf in leaves]
    size = len(rows[0])
    to_others = []
    for i, row in enumerate(rows):
        others = [j for j in range(len(rows)) if j != i and group[j] == group[i]]
        distances = [math.sqrt(sum((a - b) ** 2 for a, b in zip(row, rows[j])) / size) for j in others]
        to_others.append(sum(distances) / len(distances) if distances else 0.0)
    out = []
    for i in range(len(rows)):
        members = [j for j in range(len(rows)) if group[j] == group[i]]
        scale = sum(to_others[j] for j in members) / len(members)
        out.append(weight * to_others[i] / scale if len(members) > 1 and scale > 0 else 0.0)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bonus_matches_brute_force_with_interleaved_groups(seed):
    generator = torch.Generator().manual_seed(seed)
    leaves = torch.randn(11, 3, 4, generator=generator)
    group = [2, 0, 2, 1, 0, 2, 0, 5, 2, 1, 0]  # unsorted ids, a group of one (5)
    got = group_diversity_bonus(leaves, torch.tensor(group), 0.3)
    assert got.dtype == torch.float64 and got.shape == (11,)
    assert got.tolist() == pytest.approx(brute_force(leaves, group, 0.3), rel=1e-9, abs=1e-12)
    assert got[7] == 0  # alone in its group: no pair, no bonus
    for g in (0, 1, 2):  # every group's bonuses average the weight
        assert float(got[torch.tensor(group) == g].mean()) == pytest.approx(0.3)


def test_outlier_gets_more_than_duplicates_and_scale_does_not_matter():
    base = torch.zeros(4, 8)
    base[3] = 1.0  # three identical leaves and one far away
    group = torch.zeros(4, dtype=torch.long)
    bonus = group_diversity_bonus(base, group, 1.0)
    assert bool((bonus[3] > bonus[:3]).all())
    assert torch.allclose(bonus[:3], bonus[0].expand(3))
    assert torch.allclose(group_diversity_bonus(base * 1000.0, group, 1.0), bonus)


def test_off_identical_and_shape_errors():
    leaves = torch.randn(6, 5)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.equal(group_diversity_bonus(leaves, group, 0.0), torch.zeros(6, dtype=torch.float64))
    same = torch.ones(3, 5)
    assert torch.equal(group_diversity_bonus(same, torch.zeros(3, dtype=torch.long), 0.5), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one entry per leaf"):
        group_diversity_bonus(leaves, group[:5], 0.5)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_config_refuses_bad_weights(bad):
    with pytest.raises(ConfigError, match="advantage.diversity_bonus"):
        AdvantageSpec(diversity_bonus=bad)
