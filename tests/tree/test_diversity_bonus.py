"""The intra-group diversity bonus (docs/beyond-the-paper.md §5) against a brute-force computation."""

from __future__ import annotations

import math

import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.tree.diversity_bonus import bonus_space, check_bonus_space, coarse_images, group_diversity_bonus
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


@pytest.mark.parametrize("bad", ["pixels", "", None])
def test_config_refuses_bad_spaces(bad):
    with pytest.raises(ConfigError, match="advantage.diversity_space: must be 'latent', 'image' or 'reward'"):
        AdvantageSpec(diversity_space=bad)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_config_refuses_bad_image_sizes(bad):
    with pytest.raises(ConfigError, match="advantage.diversity_image_size: must be an integer >= 1"):
        AdvantageSpec(diversity_image_size=bad)


def test_coarse_images_are_block_means():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 8, 12, generator=generator)
    got = coarse_images(images, 4)  # blocks of 2 × 3 pixels
    assert got.shape == (3, 2, 4, 4) and got.dtype == torch.float32
    for n in range(3):
        for c in range(2):
            for i in range(4):
                for j in range(4):
                    block = [float(images[n, c, y, x]) for y in range(2 * i, 2 * i + 2) for x in range(3 * j, 3 * j + 3)]
                    assert float(got[n, c, i, j]) == pytest.approx(sum(block) / 6, abs=1e-6)


def test_coarse_images_fold_video_frames_into_channels():
    video = torch.rand(2, 3, 5, 8, 8, generator=torch.Generator().manual_seed(1))  # [N, C, F, H, W]
    got = coarse_images(video, 2)
    assert got.shape == (2, 15, 2, 2)
    assert torch.allclose(got[1, 3 * 0 + 4], video[1, 0, 4].reshape(2, 4, 2, 4).mean(dim=(1, 3)), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        coarse_images(torch.zeros(2, 8, 8), 2)


def test_speckle_earns_a_latent_bonus_but_no_image_bonus():
    """Why the image space exists: three leaves that differ only by zero-mean 2 × 2 checkerboard noise
    are far apart pixel by pixel and identical once averaged over 2 × 2 blocks; a leaf whose shape
    differs earns the whole image-space bonus."""
    base = torch.zeros(4, 1, 8, 8)
    base[:, :, 2:6, 2:6] = 1.0
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0  # ±1 checkerboard
    base[1] += 0.4 * checker
    base[2] -= 0.4 * checker
    base[3, :, 2:6, 2:6] = 0.0
    base[3, :, 0:2, 0:2] = 1.0  # the object elsewhere
    group = torch.zeros(4, dtype=torch.long)
    coarse = coarse_images(base, 4)
    assert torch.allclose(coarse[0], coarse[1]) and torch.allclose(coarse[0], coarse[2])
    latent = group_diversity_bonus(base[:3], group[:3], 1.0)
    assert bool((latent > 0).all())  # speckle alone buys a latent-space bonus
    assert torch.equal(group_diversity_bonus(coarse[:3], group[:3], 1.0), torch.zeros(3, dtype=torch.float64))
    image = group_diversity_bonus(coarse, group, 1.0)
    assert bool((image[3] > image[:3]).all()) and torch.allclose(image[:3], image[0].expand(3))


class _Embedding:
    """A stand-in reward with an embedding: records what it was asked to embed."""

    name, embeds = "stand-in", True

    def __init__(self):
        self.calls = []

    def embed(self, images, prompts):
        self.calls.append((images, list(prompts)))
        return torch.nn.functional.normalize(images.flatten(1)[:, :3], dim=-1)


def test_bonus_space_reads_latents_coarse_images_or_the_reward_embedding():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a", "a", "b", "b"]
    reward = _Embedding()
    assert bonus_space(images, prompts, AdvantageSpec(diversity_bonus=0.2), reward) is None  # latent: the trainer's
    assert bonus_space(images, prompts, AdvantageSpec(diversity_space="reward"), reward) is None  # off
    coarse = bonus_space(images, prompts, AdvantageSpec(diversity_bonus=0.2, diversity_space="image",
                                                        diversity_image_size=2), reward)
    assert torch.equal(coarse, coarse_images(images, 2)) and not reward.calls
    got = bonus_space(images, prompts, AdvantageSpec(diversity_bonus=0.2, diversity_space="reward"), reward)
    assert torch.equal(got, reward.embed(images, prompts)) and reward.calls[0][1] == prompts


def test_a_reward_space_bonus_needs_a_reward_with_an_embedding():
    spec = AdvantageSpec(diversity_bonus=0.2, diversity_space="reward")
    check_bonus_space(spec, _Embedding())
    check_bonus_space(AdvantageSpec(diversity_space="reward"), lambda images, prompts: images.mean())  # off: fine
    with pytest.raises(ConfigError, match="advantage.diversity_space: 'reward' needs a reward with an image "
                                          "embedding.*'brightness' has none"):
        check_bonus_space(spec, type("Plain", (), {"name": "brightness", "embeds": False})())
