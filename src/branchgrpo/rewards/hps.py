"""HPS v2.1: open_clip ViT-H-14 with the HPSv2.1 weights, scored as the HPSv2 repo does.

``hpsv2.img_score.score`` builds ``ViT-H-14`` with open_clip, loads ``checkpoint["state_dict"]``,
preprocesses with ``image_transform(224, is_train=False, resize_longest_max=True)`` (resize the
longest edge to 224 with bicubic, zero-pad to 224x224, OpenAI CLIP mean/std), tokenises with the
ViT-H-14 tokenizer and takes ``diag(image_features @ text_features.T)`` of the L2-normalised
features: the score is the **cosine** (no ×100; typical values 0.2-0.35).

Needs ``open_clip_torch`` (which needs torchvision); the tokenizer's BPE vocabulary and the
ViT-H-14 config ship inside open_clip, so the checkpoint is the only file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from branchgrpo.rewards.base import (
    CheckpointError,
    Reward,
    RewardError,
    check_finite,
    load_state_dict_file,
    load_strict,
    require_file,
)
from branchgrpo.rewards.clip_rewards import PromptCache
from branchgrpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess


def import_open_clip():
    try:
        import open_clip
    except Exception as err:  # ImportError, or torchvision failing to load beside this torch
        raise RewardError(
            "reward 'hps' needs open_clip_torch, which needs a torchvision matching your torch "
            f"(pip install open_clip_torch); importing it failed: {type(err).__name__}: {str(err)[:200]}"
        ) from err
    return open_clip


def hps_preprocess(image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> ImagePreprocess:
    """HPSv2's ``preprocess_val``: longest edge → ``image_size`` (bicubic), zero-pad to a square."""
    return ImagePreprocess(
        size=image_size, crop=(image_size, image_size), mean=tuple(mean), std=tuple(std),
        resize_mode="longest", interpolation="bicubic", crop_rounding="round", pad_fill=0.0,
    )


class HPSReward(Reward):
    """HPS v2.1 (or v2.0) score: cosine of open_clip ViT-H-14 image and text features.

    Args:
        checkpoint: ``HPS_v2.1_compressed.pt`` (a torch pickle holding ``{"state_dict": ...}``,
            read with ``weights_only=True``) or a safetensors file of the same state dict.
        model_name: open_clip architecture (``ViT-H-14``).
        model_config: an open_clip model config (dict or JSON file) used instead of
            ``model_name``'s built-in one (tests use a tiny one).
    """

    name = "hps"
    embeds = True  # the open_clip image feature it scores with

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        device="cpu",
        dtype="float32",
        model_name: str = "ViT-H-14",
        model_config: Mapping[str, Any] | str | Path | None = None,
        trust_pickle: bool = False,
        text_cache_size: int = 4096,
    ):
        super().__init__(device, dtype)
        path = require_file(self.name, checkpoint, "HPS_v2.1_compressed.pt (the HPSv2.1 open_clip ViT-H-14 weights)")
        open_clip = import_open_clip()
        if model_config is not None:
            cfg = dict(model_config) if isinstance(model_config, Mapping) else json.loads(Path(model_config).read_text())
            model = open_clip.CLIP(**cfg)
            context_length = int(cfg.get("text_cfg", {}).get("context_length", 77))
            self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        else:
            try:
                model = open_clip.create_model(model_name, pretrained=None, device="cpu", precision="fp32")
            except RuntimeError as err:
                raise RewardError(f"reward 'hps': open_clip has no model {model_name!r}: {err}") from err
            self.tokenizer = open_clip.get_tokenizer(model_name)
        state = load_state_dict_file(self.name, path, trust_pickle=trust_pickle)
        load_strict(self.name, model, state, path)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
        self.preprocess = hps_preprocess(int(image_size), mean, std)
        self._text_cache = PromptCache(text_cache_size)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def _embed(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.model.encode_image(self.preprocess(images).to(self.dtype), normalize=True).float()

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        image_features = self._embed(images, prompts)
        text_features = self._text_cache.lookup(prompts, self._encode_text)
        return check_finite(self.name, (image_features * text_features).sum(dim=-1))


__all__ = ["HPSReward", "hps_preprocess", "CheckpointError"]
