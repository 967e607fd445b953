"""Intra-group diversity bonus (docs/beyond-the-paper.md §5; an option beyond the paper).

GRPO rewards each sample on its own, so once a prompt's samples agree on one high-reward image
nothing pushes them apart again: reward is bought with diversity. Adding to each leaf's reward a
term that grows with its distance from the other leaves of its prompt tree makes "different from
its siblings" part of what is reinforced, in the spirit of DiverseGRPO's distributional bonus
(Liu et al., 2025, arXiv:2512.21514) and DRIFT's intra-group diversity shaping (Liu et al., 2026,
arXiv:2601.12401); both use semantic features. Three spaces here, none of them the evaluation's
diversity features (which stay an independent measurement):

- ``latent``: the model's own final latents (every family has them; no decoding);
- ``image``: the decoded leaves the reward already scored, area-averaged to ``s × s`` pixels per
  channel (:func:`coarse_images`). A distance between full-resolution latents or pixels is cheap to
  buy with zero-mean speckle (measured on digits: the policy answered a latent bonus with pixel
  noise while every prompt's digits converged); averaging over blocks cancels such noise, so only
  differences in layout, shape and colour earn the bonus;
- ``reward``: the reward model's own image embedding (:meth:`branchgrpo.rewards.Reward.embed`, unit
  vectors: the digits classifier's last hidden layer, the CLIP image feature of clip, pickscore and
  hps), the semantic space DiverseGRPO and DRIFT use, and one whose noise directions the reward
  itself ignores. It costs one more pass of the reward's image tower per leaf.

For leaf ``i`` of group ``g`` (the ``n_g`` leaves of one prompt), with ``x_i`` its final latent,
coarse image or reward embedding:

    d_i = (1 / (n_g − 1)) Σ_{j ∈ g, j ≠ i} rms(x_i − x_j)        rms(v) = sqrt(mean(v²))
    bonus_i = λ · d_i / mean_{j ∈ g} d_j

so a group's bonuses average λ whatever the latents' scale, and what reaches the advantages (which
are normalised per group) is the within-group spread of ``d`` relative to the reward's, weighted by
λ in the reward's units. A group of one leaf, or whose leaves are identical, gets 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from branchgrpo.config import ConfigError
from branchgrpo.diversity import pairwise_distances
from branchgrpo.tree.spec import AdvantageSpec


def group_diversity_bonus(leaves: Tensor, group: Tensor, weight: float) -> Tensor:
    """``bonus [N]`` (float64, on ``leaves``' device) for final latents ``leaves [N, ...]`` of prompt groups ``group [N]``."""
    if leaves.shape[0] != group.numel():
        raise ValueError(f"leaves [{leaves.shape[0]}, ...] and group [{group.numel()}] must have one entry per leaf")
    bonus = torch.zeros(leaves.shape[0], dtype=torch.float64, device=leaves.device)
    if weight == 0 or leaves.shape[0] == 0:
        return bonus
    group = group.to(leaves.device)
    for g in torch.unique(group).tolist():  # a few prompt groups per iteration; no model call inside
        members = (group == g).nonzero().flatten()
        if members.numel() < 2:
            continue
        mean_to_others = pairwise_distances(leaves[members], rms=True).sum(dim=1) / (members.numel() - 1)
        scale = mean_to_others.mean()
        if scale > 0:
            bonus[members] = weight * mean_to_others / scale
    return bonus


def coarse_images(images: Tensor, size: int) -> Tensor:
    """``[N, C·F, size, size]`` float32: decoded leaves ``images [N, C, H, W]`` (or videos ``[N, C, F, H, W]``,
    frames folded into channels) averaged over blocks of pixels to ``size × size`` (area resampling;
    exact block means when ``size`` divides ``H`` and ``W``)."""
    if images.dim() < 4:
        raise ValueError(f"images must be [N, C, H, W] or [N, C, F, H, W], got shape {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    flat = images.reshape(images.shape[0], -1, images.shape[-2], images.shape[-1]).float()
    return F.adaptive_avg_pool2d(flat, size)


def needs_reward_embedding(advantage: AdvantageSpec) -> bool:
    """Whether the bonus is on and measured in the reward's embedding (the reward must have one)."""
    return advantage.diversity_bonus > 0 and advantage.diversity_space == "reward"


def check_bonus_space(advantage: AdvantageSpec, reward) -> None:
    """Refuse a reward-space bonus with a reward that has no image embedding (before any rollout)."""
    if needs_reward_embedding(advantage) and not getattr(reward, "embeds", False):
        raise ConfigError("advantage.diversity_space", f"'reward' needs a reward with an image embedding "
                          f"(Reward.embeds); reward {getattr(reward, 'name', reward)!r} has none")


def bonus_space(images: Tensor, prompts: list[str], advantage: AdvantageSpec, reward) -> Tensor | None:
    """What the bonus measures of the decoded leaves ``images`` (one prompt each): their
    :func:`coarse_images` at ``advantage.diversity_image_size`` (``image``), or ``reward.embed``
    (``reward``); None when the bonus is off or measured on the latents."""
    if advantage.diversity_bonus <= 0 or advantage.diversity_space == "latent":
        return None
    if advantage.diversity_space == "reward":
        return reward.embed(images, prompts)
    return coarse_images(images, advantage.diversity_image_size)
