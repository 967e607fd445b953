"""Tensor image preprocessing that matches the upstream processors numerically.

:class:`ImagePreprocess` turns float images ``[B, C, H, W]`` in ``[0, 1]`` into the model's pixel
input: resize, center crop (or pad), normalise with the model's mean/std. It runs on the images'
device, batched, with no PIL or disk round trip.

Matching the upstream processors:

* Output sizes are computed with the same integer arithmetic as the processors:
  shortest-edge resize ``long' = int(size * long / short)`` (transformers'
  ``get_resize_output_image_size`` and torchvision's ``Resize(int)`` agree), longest-edge resize
  ``round(dim * size / longest)`` (open_clip's ``ResizeKeepRatio(longest=1)``/HPSv2's
  ``ResizeMaxSize``), then center crop with ``floor`` offsets (transformers) or ``round`` offsets
  (torchvision ``CenterCrop``), zero-padding first when the image is smaller (both).
* Interpolation is ``torch.nn.functional.interpolate(mode, antialias=True, align_corners=False)``,
  which is exactly what transformers' torchvision-backed processors and torchvision's tensor
  ``Resize(antialias=True)`` run on float input. PIL-based processors (transformers' PIL backend,
  torchvision transforms on PIL images, the HPSv2/ImageReward repos) resize 8-bit images with
  PIL's fixed-point bicubic filter (same a = -0.5 kernel as torch's antialiased bicubic) and round
  to 8 bits after each pass; the difference is a few 1/255 per pixel (see tests/rewards/test_preprocess.py).
  A resize to the same size is skipped (identity, as in PIL and torchvision).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes used in transformers' preprocessor_config.json
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shortest edge to ``size`` (transformers / torchvision arithmetic)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def longest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the longest edge to ``size`` (open_clip ``ResizeKeepRatio(longest=1)``)."""
    ratio = max(height / size, width / size)
    return round(height / ratio), round(width / ratio)


def resize(images: Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """``[B, C, H, W]`` float → ``[B, C, *size]``; antialiased like torchvision's ``Resize``."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if interpolation == "nearest":
        return F.interpolate(images, size=size, mode="nearest")
    return F.interpolate(images, size=size, mode=interpolation, align_corners=False, antialias=True)


def center_crop_or_pad(
    images: Tensor, size: tuple[int, int], rounding: Literal["floor", "round"] = "floor", fill: float = 0.0
) -> Tensor:
    """Center crop to ``size``; an image smaller than ``size`` is zero-padded first (left/top get
    ``(crop - dim) // 2``). Crop offsets: ``floor`` as transformers, ``round`` as torchvision."""
    crop_h, crop_w = size
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_w = max(crop_w - width, 0)
        pad_h = max(crop_h - height, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
        height, width = images.shape[-2:]
    if (height, width) == (crop_h, crop_w):
        return images
    if rounding == "floor":
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    else:
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return images[..., top : top + crop_h, left : left + crop_w]


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize → center crop/pad → normalise, on tensors.

    Attributes:
        size: target of the resize: the shortest edge (``resize_mode="shortest"``), the longest
            edge (``"longest"``), or ``(h, w)`` (``"squash"``).
        crop: ``(h, w)`` of the center crop (zero-padded when larger than the image), or None.
        mean, std: per-channel normalisation applied to ``[0, 1]`` pixels.
        crop_rounding: ``"floor"`` (transformers) or ``"round"`` (torchvision ``CenterCrop``).
    """

    size: int | tuple[int, int] = 224
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resize_mode: Literal["shortest", "longest", "squash", "none"] = "shortest"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    crop_rounding: Literal["floor", "round"] = "floor"
    pad_fill: float = 0.0  # pixel value (in [0, 1]) of padding, before normalisation

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "longest", "squash", "none"):
            raise ValueError(f"resize_mode must be shortest, longest, squash or none, got {self.resize_mode!r}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation must be bicubic, bilinear or nearest, got {self.interpolation!r}")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"crop_rounding must be floor or round, got {self.crop_rounding!r}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.crop is not None:
            return tuple(self.crop)
        return self.resized_size(height, width)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_mode == "none":
            return height, width
        if self.resize_mode == "squash":
            size = self.size if isinstance(self.size, tuple) else (self.size, self.size)
            return tuple(size)
        edge = self.size if isinstance(self.size, int) else int(self.size[0])
        if self.resize_mode == "shortest":
            return shortest_edge_size(height, width, edge)
        return longest_edge_size(height, width, edge)

    def __call__(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` float in ``[0, 1]`` → normalised float32 ``[B, C, h, w]``."""
        images = images.float()
        images = resize(images, self.resized_size(*images.shape[-2:]), self.interpolation)
        if self.crop is not None:
            images = center_crop_or_pad(images, tuple(self.crop), self.crop_rounding, self.pad_fill)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path) -> "ImagePreprocess":
        """From a transformers ``preprocessor_config.json`` (a path, a folder holding it, or a dict).

        Reads ``size`` (``shortest_edge`` or ``height``/``width``), ``crop_size``, ``do_resize``,
        ``do_center_crop``, ``do_normalize``, ``image_mean``/``image_std``, ``resample``. Crop
        offsets follow transformers (floor).
        """
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "preprocessor_config.json"
            config = json.loads(path.read_text())
        if config.get("do_rescale", True) is False or config.get("rescale_factor", 1 / 255) not in (1 / 255, 0.00392156862745098):
            raise ValueError("only processors that rescale 8-bit pixels by 1/255 are supported (images here are in [0, 1])")
        size = config.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if not config.get("do_resize", True):
            resize_mode, target = "none", 0
        elif "shortest_edge" in size:
            resize_mode, target = "shortest", int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            resize_mode, target = "squash", (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(f"unsupported processor size {size!r} (expected shortest_edge or height/width)")
        crop = None
        if config.get("do_center_crop", True) and config.get("crop_size") is not None:
            crop_size = config["crop_size"]
            crop = (crop_size, crop_size) if isinstance(crop_size, int) else (int(crop_size["height"]), int(crop_size["width"]))
        if config.get("do_normalize", True):
            mean = tuple(float(m) for m in config.get("image_mean", OPENAI_CLIP_MEAN))
            std = tuple(float(s) for s in config.get("image_std", OPENAI_CLIP_STD))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        resample = config.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(f"unsupported resample {resample!r}; supported: {sorted(_PIL_RESAMPLE)} (nearest, bilinear, bicubic)")
        return cls(size=target, crop=crop, mean=mean, std=std, resize_mode=resize_mode,
                   interpolation=_PIL_RESAMPLE[resample], crop_rounding="floor")
