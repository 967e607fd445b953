"""Weighted sums of rewards (``"hps:1.0,clip:0.5"``), optionally normalised per group first.

Multi-reward GRPO (DanceGRPO's HPS+CLIP, MixGRPO, TreeGRPO) adds rewards whose scales differ by
orders of magnitude (HPS ~0.3, PickScore ~20); normalising each reward within its group (the
leaves of one prompt tree) before weighting makes the weights mean what they say. With
``normalize="group"`` each component is z-scored per group exactly as
:func:`branchgrpo.tree.advantages.depth_advantages` z-scores rewards: unbiased std,
``(r - mean) / (std + 1e-8)``, and 0 for a group of one image or with ``std < 1e-6``.

A weighted list scores images ``[B, C, H, W]`` or, when every component is a video reward
(``modality = "video"``: ``frames``, ``videoalign``), videos ``[B, F, C, H, W]``; a list that
mixes the two is refused when it is built.
"""

from __future__ import annotations

import math
import re
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.rewards.base import Reward, RewardError, RewardOutput, check_video_inputs

Normalize = Literal["none", "group", "batch"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class RewardSpecError(ValueError):
    """A malformed reward list such as ``"hps:1.0,,clip"``; the message points at the bad item."""


def parse_reward_weights(text: str, known: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """``"hps:1.0,clip:0.5"`` → ``[("hps", 1.0), ("clip", 0.5)]``; a bare name weighs 1.0.

    Raises:
        RewardSpecError: empty list or item, bad name, weight that is not a finite number,
            duplicate name, name not in ``known`` (when given), or all weights zero.
    """
    if not isinstance(text, str) or not text.strip():
        raise RewardSpecError("empty reward list; write e.g. 'hps:1.0,clip:0.5'")
    out: list[tuple[str, float]] = []
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            raise RewardSpecError(f"reward list {text!r}: item {position} is empty (stray comma?)")
        name, sep, weight_text = item.partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise RewardSpecError(f"reward list {text!r}: item {position} {item!r} has no valid reward name before ':'")
        if sep:
            weight_text = weight_text.strip()
            try:
                weight = float(weight_text)
            except ValueError:
                raise RewardSpecError(
                    f"reward list {text!r}: weight {weight_text!r} of {name!r} is not a number (write {name}:0.5)"
                ) from None
            if not math.isfinite(weight):
                raise RewardSpecError(f"reward list {text!r}: weight of {name!r} must be finite, got {weight_text!r}")
        else:
            weight = 1.0
        if any(n == name for n, _ in out):
            raise RewardSpecError(f"reward list {text!r}: {name!r} appears twice")
        if known is not None and name not in known:
            raise RewardSpecError(f"reward list {text!r}: unknown reward {name!r}; known: {', '.join(known)}")
        out.append((name, weight))
    if all(w == 0 for _, w in out):
        raise RewardSpecError(f"reward list {text!r}: every weight is 0")
    return out


def group_normalize(scores: Tensor, group_ids: Tensor, eps: float = 1e-8, min_std: float = 1e-6) -> Tensor:
    """Per-group z-scores: ``(r - mean_g) / (std_g + eps)`` with the unbiased std of group ``g``;
    0 where the group has one member or ``std_g < min_std``. ``group_ids`` ``[B]``: any integers."""
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids must be [B] like the scores ({tuple(scores.shape)}), got {tuple(group_ids.shape)}")
    values = scores.double()
    _, index = torch.unique(group_ids.to(scores.device), return_inverse=True)
    groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(groups, dtype=torch.float64, device=scores.device).index_add_(0, index, torch.ones_like(values))
    mean = torch.zeros_like(count).index_add_(0, index, values) / count
    centred = values - mean[index]
    var = torch.zeros_like(count).index_add_(0, index, centred * centred) / (count - 1).clamp_min(1)
    std = var.sqrt()
    degenerate = (count <= 1) | (std < min_std)
    z = centred / (std[index] + eps)
    return torch.where(degenerate[index], torch.zeros_like(z), z).to(scores.dtype)


class CompositeReward(Reward):
    """``total = Σ_k w_k · norm(r_k)``; ``score()`` also returns every raw ``r_k``.

    Args:
        rewards: name → reward (each keeps its own device and dtype).
        weights: name → weight (same names).
        normalize: ``"none"`` (raw scores), ``"group"`` (z-score within each group; needs
            ``group_ids``), ``"batch"`` (z-score over the whole call).

    Group normalisation needs all members of a group in one call: score the leaves of whole
    prompt trees together, or score components in chunks with :meth:`components` and finish with
    :meth:`combine`.
    """

    name = "composite"
    input_channels = None
    modality = "image"  # "video" when every component scores videos

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float], normalize: Normalize = "none"):
        if not rewards:
            raise RewardSpecError("a composite reward needs at least one component")
        if set(rewards) != set(weights):
            raise RewardSpecError(f"rewards {sorted(rewards)} and weights {sorted(weights)} name different components")
        if normalize not in ("none", "group", "batch"):
            raise RewardSpecError(f"normalize must be 'none', 'group' or 'batch', got {normalize!r}")
        super().__init__("cpu", "float32")
        self.rewards = dict(rewards)
        self.weights = {k: float(weights[k]) for k in rewards}
        self.normalize = normalize
        self.name = ",".join(f"{k}:{self.weights[k]:g}" for k in self.rewards)
        channels = {r.input_channels for r in self.rewards.values()} - {None}
        self.input_channels = channels.pop() if len(channels) == 1 else None
        kinds = {name: getattr(r, "modality", "image") for name, r in self.rewards.items()}
        videos = sorted(name for name, kind in kinds.items() if kind == "video")
        images = sorted(name for name, kind in kinds.items() if kind != "video")
        if videos and images:
            raise RewardSpecError(
                f"reward list {self.name!r} mixes video rewards ({', '.join(videos)}: videos [B, F, C, H, W]) and "
                f"image rewards ({', '.join(images)}: images [B, C, H, W]); a weighted list scores one or the other. "
                "For videos, average an image reward over frames with 'frames' (option image_reward=NAME)"
            )
        self.modality = "video" if videos else "image"
        self.embeds = any(getattr(r, "embeds", False) for r in self.rewards.values())

    def __repr__(self) -> str:
        return f"CompositeReward({self.name!r}, normalize={self.normalize!r})"

    def check_inputs(self, images: Tensor, prompts: Sequence[str]) -> list[str]:
        """Images ``[B, C, H, W]``, or videos ``[B, F, C, H, W]`` when every component scores videos."""
        if self.modality == "video":
            return check_video_inputs(self, images, prompts)
        return super().check_inputs(images, prompts)

    def components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Raw scores of every component ``{name: [B]}`` (float32, on the images' device)."""
        return {name: reward(images, prompts) for name, reward in self.rewards.items()}

    def embed(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The components' embeddings (those that have one), joined and renormalised: each unit vector
        weighs the same in the joined distance."""
        parts = [reward.embed(images, prompts) for reward in self.rewards.values() if getattr(reward, "embeds", False)]
        if not parts:
            raise RewardError(f"reward list {self.name!r}: no component has an image embedding")
        return torch.nn.functional.normalize(torch.cat(parts, dim=-1), dim=-1)

    def combine(self, components: Mapping[str, Tensor], group_ids: Tensor | None = None) -> RewardOutput:
        """Weighted (normalised) sum of raw component scores computed earlier."""
        first = next(iter(components.values()))
        if self.normalize == "group":
            if group_ids is None:
                raise ValueError(
                    f"composite reward {self.name!r} normalises per group: pass group_ids [B] (the prompt tree of each image)"
                )
            group_ids = torch.as_tensor(group_ids).reshape(-1)
            if group_ids.numel() != first.numel():
                raise ValueError(f"group_ids has {group_ids.numel()} entries for {first.numel()} images")
        normalized = {}
        total = torch.zeros_like(first, dtype=torch.float32)
        for name in self.rewards:
            raw = components[name].float()
            if self.normalize == "group":
                norm = group_normalize(raw, group_ids)
            elif self.normalize == "batch":
                norm = group_normalize(raw, torch.zeros(raw.shape, dtype=torch.long, device=raw.device))
            else:
                norm = raw
            normalized[name] = norm
            total = total + self.weights[name] * norm
        return RewardOutput(total=total, components={k: components[k] for k in self.rewards}, normalized=normalized)

    def raw_total(self, components: Mapping[str, Tensor]) -> Tensor:
        """``Σ_k w_k · r_k`` of the raw scores (no normalisation)."""
        return sum(self.weights[name] * components[name].float() for name in self.rewards)

    def score(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor | None = None) -> RewardOutput:
        prompts = self.check_inputs(images, prompts)
        if self.normalize == "group" and group_ids is None:  # fail before the (expensive) scoring
            raise ValueError(
                f"composite reward {self.name!r} normalises per group: pass group_ids [B] (the prompt tree of each image)"
            )
        return self.combine(self.components(images, prompts), group_ids)

    def __call__(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor | None = None) -> Tensor:
        return self.score(images, prompts, group_ids).total
