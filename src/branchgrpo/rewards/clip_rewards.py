"""Rewards on a transformers ``CLIPModel``: PickScore, CLIP score, the LAION aesthetic predictor.

Each loads a transformers-layout folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) with local files only, reads the preprocessing from the folder's
``preprocessor_config.json`` and tokenises with the folder's CLIP tokenizer. Image features are
``visual_projection(vision_model(pixels).pooler_output)`` and text features
``text_projection(text_model(ids).pooler_output)`` — what ``CLIPModel.get_image_features`` /
``get_text_features`` compute in every transformers version.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from branchgrpo.rewards.base import (
    CheckpointError,
    Reward,
    check_finite,
    load_state_dict_file,
    load_strict,
    require_dir,
    require_file,
)
from branchgrpo.rewards.preprocess import ImagePreprocess

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = "tokenizer.json|vocab.json"


class PromptCache:
    """LRU cache prompt → feature row (features of a frozen text tower never change)."""

    def __init__(self, size: int = 4096):
        self.size = int(size)
        self._items: OrderedDict[str, Tensor] = OrderedDict()

    def lookup(self, prompts: list[str], encode) -> Tensor:
        """Features ``[B, D]`` for ``prompts``; unique misses go to ``encode(list) -> [U, D]`` once."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._items))
        fresh = {}
        if missing:
            feats = encode(missing)
            fresh = dict(zip(missing, feats))
            if self.size > 0:
                for p, f in fresh.items():
                    self._items[p] = f
                    self._items.move_to_end(p)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        rows = []
        for p in prompts:
            if p in fresh:
                rows.append(fresh[p])
            else:
                self._items.move_to_end(p)
                rows.append(self._items[p])
        return torch.stack(rows)


def resolve_model_folder(reward: str, checkpoint: str | Path | None, what: str) -> Path:
    """The transformers folder of ``checkpoint`` (a folder, or a weights file inside one)."""
    if checkpoint is None:
        raise CheckpointError(reward, None, f"no checkpoint given; expected {what}")
    path = Path(checkpoint).expanduser()
    if path.is_file():
        if path.name not in WEIGHT_FILES:
            raise CheckpointError(reward, path, f"is not a transformers weights file ({' or '.join(WEIGHT_FILES)}); expected {what}")
        path = path.parent
    shards = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
    return require_dir(reward, path, what, needs=("config.json", "|".join(WEIGHT_FILES + shards)))


def load_clip_model(reward: str, folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except Exception as err:
        raise CheckpointError(reward, folder, f"could not be loaded as a transformers CLIPModel ({type(err).__name__}: {str(err)[:300]})") from err
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_clip_processing(reward: str, folder: Path, what: str):
    """(tokenizer, ImagePreprocess) from a folder with ``preprocessor_config.json`` and a CLIP tokenizer."""
    from transformers import AutoTokenizer

    folder = require_dir(reward, folder, what, needs=("preprocessor_config.json", TOKENIZER_FILES))
    try:
        preprocess = ImagePreprocess.from_hf_config(folder / "preprocessor_config.json")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(reward, folder / "preprocessor_config.json", f"is not a usable CLIP processor config: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise CheckpointError(reward, folder, f"holds no loadable CLIP tokenizer ({type(err).__name__}: {str(err)[:200]})") from err
    return tokenizer, preprocess


class HFClipReward(Reward):
    """Base of the CLIPModel rewards: preprocessing, image/text features (L2-normalised, float32)."""

    what = "a transformers CLIP folder (config.json + model.safetensors or pytorch_model.bin)"

    def __init__(
        self,
        checkpoint: str | Path | None,
        *,
        processor: str | Path | None = None,
        device="cpu",
        dtype="float32",
        max_length: int = 77,
        text_cache_size: int = 4096,
    ):
        super().__init__(device, dtype)
        folder = resolve_model_folder(self.name, checkpoint, self.what)
        processor_folder = Path(processor).expanduser() if processor is not None else folder
        self.tokenizer, self.preprocess = load_clip_processing(
            self.name, processor_folder,
            "a folder with the CLIP processor: preprocessor_config.json and tokenizer files "
            "(tokenizer.json or vocab.json + merges.txt)" + ("" if processor is not None else "; or pass processor=FOLDER"),
        )
        self.model = load_clip_model(self.name, folder, self.device, self.dtype)
        self.max_length = min(int(max_length), int(self.model.config.text_config.max_position_embeddings))
        self._text_cache = PromptCache(text_cache_size)

    def image_features(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        feats = self.model.visual_projection(pooled).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        ).pooler_output
        feats = self.model.text_projection(pooled).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def text_features(self, prompts: list[str]) -> Tensor:
        return self._text_cache.lookup(prompts, self._encode_text)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(dim=-1)


class _EmbedsClipImage:
    """Mixin of the CLIP rewards whose score compares image and text features: their embedding is
    the image feature they score with."""

    embeds = True

    def _embed(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.image_features(images)


class PickScoreReward(_EmbedsClipImage, HFClipReward):
    """PickScore v1: ``logit_scale.exp() * cos(image, text)`` (CLIP ViT-H/14 fine-tuned on Pick-a-Pic).

    ``checkpoint``: the ``yuvalkirstain/PickScore_v1`` folder; ``processor``: the folder of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (preprocessor_config.json + tokenizer), as the
    PickScore repo loads its processor from there. Typical scores: ~18-23.
    """

    name = "pickscore"
    what = "the PickScore_v1 transformers folder (config.json + model.safetensors or pytorch_model.bin)"

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        scale = self.model.logit_scale.float().exp()
        return check_finite(self.name, scale * self.cosine(images, prompts))


class ClipScoreReward(_EmbedsClipImage, HFClipReward):
    """CLIP score: ``scale * cos(image, text)`` (default scale 100, as torchmetrics' CLIPScore).

    ``clamp=True`` also clamps at 0 as torchmetrics does (default off: the sign carries signal).
    """

    name = "clip"

    def __init__(self, checkpoint=None, *, scale: float = 100.0, clamp: bool = False, **kwargs):
        self.scale = float(scale)
        self.clamp = bool(clamp)
        super().__init__(checkpoint, **kwargs)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        scores = self.scale * self.cosine(images, prompts)
        return check_finite(self.name, scores.clamp_min(0.0) if self.clamp else scores)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (also ImageReward's): 5 linear layers, no activations.

    Keys ``layers.{0,2,4,6,7}.{weight,bias}`` as in ``sac+logos+ava1-l14-linearMSE.pth``.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AestheticReward(HFClipReward):
    """LAION aesthetic predictor v2: MLP head on the L2-normalised CLIP ViT-L/14 image embedding.

    ``checkpoint``: the head (``sac+logos+ava1-l14-linearMSE.pth`` or a safetensors copy);
    ``clip_model``: the ``openai/clip-vit-large-patch14`` transformers folder (its processor is
    used unless ``processor`` is given). Prompts are ignored. Typical scores: 4-7.
    """

    name = "aesthetic"
    what = "the aesthetic MLP head file (sac+logos+ava1-l14-linearMSE.pth)"

    def __init__(self, checkpoint=None, *, clip_model: str | Path | None = None, trust_pickle: bool = False, **kwargs):
        head_path = require_file(self.name, checkpoint, self.what)
        if clip_model is None:
            raise CheckpointError(
                self.name, None,
                "no CLIP model given; pass clip_model=FOLDER (the openai/clip-vit-large-patch14 transformers folder)",
            )
        self.what = "the CLIP ViT-L/14 transformers folder given as clip_model (config.json + weights)"
        super().__init__(clip_model, **kwargs)
        state = load_state_dict_file(self.name, head_path, trust_pickle=trust_pickle)
        in_features = state.get("layers.0.weight")
        if in_features is None or in_features.ndim != 2:
            raise CheckpointError(self.name, head_path, "is not the aesthetic MLP head (no layers.0.weight)")
        projection = int(self.model.config.projection_dim)
        if in_features.shape[1] != projection:
            raise CheckpointError(
                self.name, head_path,
                f"expects {in_features.shape[1]}-d CLIP embeddings but the CLIP model gives {projection}-d ones "
                "(the v2 head goes with CLIP ViT-L/14, 768-d)",
            )
        self.head = AestheticMLP(projection)
        load_strict(self.name, self.head, state, head_path)
        self.head = self.head.to(self.device, torch.float32).eval().requires_grad_(False)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return check_finite(self.name, self.head(self.image_features(images)).squeeze(-1))
