"""ImageReward v1.0 on transformers' BLIP modules, loading the official ``ImageReward.pt`` keys.

The upstream ``image-reward`` package (1.5) does not install cleanly here: it pins
``timm==0.6.13``/``fairscale``, imports torchvision (which does not load beside the CPU torch
2.13.0 build) and its ``med.py`` imports names that transformers 5 removed. Its architecture is
BLIP's ViT (timm blocks) + BLIP's BERT with cross-attention (``med.py``) + an MLP head; transformers'
``BlipVisionModel`` and ``BlipTextModel`` are ports of exactly those modules, so the official
weights load with a key rename (:func:`map_upstream_key`, documented in docs/rewards.md):

=======================================================  ===========================================
``ImageReward.pt`` key                                   here
=======================================================  ===========================================
``blip.visual_encoder.cls_token``                        ``vision.embeddings.class_embedding``
``blip.visual_encoder.pos_embed``                        ``vision.embeddings.position_embedding``
``blip.visual_encoder.patch_embed.proj.*``               ``vision.embeddings.patch_embedding.*``
``blip.visual_encoder.blocks.{i}.norm1.*``               ``vision.encoder.layers.{i}.layer_norm1.*``
``blip.visual_encoder.blocks.{i}.attn.qkv.*``            ``vision.encoder.layers.{i}.self_attn.qkv.*``
``blip.visual_encoder.blocks.{i}.attn.proj.*``           ``vision.encoder.layers.{i}.self_attn.projection.*``
``blip.visual_encoder.blocks.{i}.norm2.*``               ``vision.encoder.layers.{i}.layer_norm2.*``
``blip.visual_encoder.blocks.{i}.mlp.fc{1,2}.*``         ``vision.encoder.layers.{i}.mlp.fc{1,2}.*``
``blip.visual_encoder.norm.*``                           ``vision.post_layernorm.*``
``blip.text_encoder.<rest>``                             ``text.<rest>`` (same names)
``mlp.layers.{0,2,4,6,7}.*``                             ``head.layers.{0,2,4,6,7}.*``
``blip.vision_proj.*``, ``blip.text_proj.*``, ...       ignored (unused by the score)
=======================================================  ===========================================

Score (``ImageReward.score``): tokens = BERT tokenizer (bert-base-uncased + ``[DEC]``/``[ENC]``),
``padding="max_length", max_length=35``; image = Resize(224, bicubic) + CenterCrop(224) + CLIP
mean/std; ``h = text_encoder(ids, mask, encoder_hidden_states=visual_encoder(image))[:, 0]``;
``score = (mlp(h) - 0.16717362830052426) / 1.0333394966054072``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from branchgrpo.rewards.base import (
    CheckpointError,
    Reward,
    check_finite,
    load_state_dict_file,
    load_strict,
    require_file,
)
from branchgrpo.rewards.clip_rewards import AestheticMLP, PromptCache
from branchgrpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072

# BLIP create_vit presets (upstream blip.py)
VIT_PRESETS = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
}

# ImageReward's med_config.json (BERT-base + cross-attention, vocabulary + [DEC] + [ENC])
MED_CONFIG = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "max_position_embeddings": 512, "vocab_size": 30524, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
}

IGNORED_PREFIXES = (
    "blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids",
    "blip.text_encoder.pooler.", "blip.itm_head.", "blip.temp",
)

_VIT_BLOCK = {
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_BLOCK_RE = re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")


def map_upstream_key(key: str) -> str | None:
    """Our parameter name for an ``ImageReward.pt`` key; None for keys the score does not use
    (or keys this mapping does not know: those surface as 'unexpected' in the load error)."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    fixed = {
        "blip.visual_encoder.cls_token": "vision.embeddings.class_embedding",
        "blip.visual_encoder.pos_embed": "vision.embeddings.position_embedding",
        "blip.visual_encoder.patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
        "blip.visual_encoder.patch_embed.proj.bias": "vision.embeddings.patch_embedding.bias",
        "blip.visual_encoder.norm.weight": "vision.post_layernorm.weight",
        "blip.visual_encoder.norm.bias": "vision.post_layernorm.bias",
    }
    if key in fixed:
        return fixed[key]
    match = _BLOCK_RE.match(key)
    if match:
        layer, part, kind = match.groups()
        return f"vision.encoder.layers.{layer}.{_VIT_BLOCK[part]}.{kind}"
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder."):]
    if key.startswith("mlp.layers."):
        return "head." + key[len("mlp."):]
    return key  # unknown: kept under its own name so the strict load reports it


def unmap_key(key: str) -> str:
    """Inverse of :func:`map_upstream_key` (ours → ``ImageReward.pt`` key)."""
    fixed = {
        "vision.embeddings.class_embedding": "blip.visual_encoder.cls_token",
        "vision.embeddings.position_embedding": "blip.visual_encoder.pos_embed",
        "vision.embeddings.patch_embedding.weight": "blip.visual_encoder.patch_embed.proj.weight",
        "vision.embeddings.patch_embedding.bias": "blip.visual_encoder.patch_embed.proj.bias",
        "vision.post_layernorm.weight": "blip.visual_encoder.norm.weight",
        "vision.post_layernorm.bias": "blip.visual_encoder.norm.bias",
    }
    if key in fixed:
        return fixed[key]
    match = re.match(r"^vision\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if match:
        layer, part, kind = match.groups()
        upstream = {v: k for k, v in _VIT_BLOCK.items()}[part]
        return f"blip.visual_encoder.blocks.{layer}.{upstream}.{kind}"
    if key.startswith("text."):
        return "blip.text_encoder." + key[len("text."):]
    if key.startswith("head."):
        return "mlp." + key[len("head."):]
    raise KeyError(key)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + MLP head (transformers modules)."""

    def __init__(self, vision_config: Mapping[str, Any], med_config: Mapping[str, Any], image_size: int = 224):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        vision = dict(vision_config)
        hidden = int(vision["hidden_size"])
        self.vision_config = BlipVisionConfig(
            hidden_size=hidden,
            intermediate_size=int(vision.get("intermediate_size", 4 * hidden)),  # timm mlp_ratio 4
            num_hidden_layers=int(vision["num_hidden_layers"]),
            num_attention_heads=int(vision["num_attention_heads"]),
            image_size=int(vision.get("image_size", image_size)),
            patch_size=int(vision.get("patch_size", 16)),
            hidden_act="gelu",
            layer_norm_eps=1e-6,  # BLIP vit.py: partial(nn.LayerNorm, eps=1e-6)
            attention_dropout=0.0,
        )
        med = {**MED_CONFIG, **dict(med_config)}
        vocab = int(med["vocab_size"])
        special = {k: (v if v < vocab else None) for k, v in (("bos_token_id", 30522), ("sep_token_id", 102), ("eos_token_id", 2))}
        self.text_config = BlipTextConfig(
            vocab_size=vocab,
            hidden_size=int(med["hidden_size"]),
            encoder_hidden_size=hidden,  # blip_pretrain: encoder_config.encoder_width = vision_width
            intermediate_size=int(med["intermediate_size"]),
            num_hidden_layers=int(med["num_hidden_layers"]),
            num_attention_heads=int(med["num_attention_heads"]),
            max_position_embeddings=int(med["max_position_embeddings"]),
            hidden_act=med["hidden_act"],
            layer_norm_eps=float(med["layer_norm_eps"]),
            hidden_dropout_prob=float(med["hidden_dropout_prob"]),
            attention_probs_dropout_prob=float(med["attention_probs_dropout_prob"]),
            pad_token_id=int(med.get("pad_token_id", 0)),
            is_decoder=True,  # gives every layer its cross-attention block (med.py: add_cross_attention)
            **special,  # BlipTextConfig defaults (unused by the score), dropped when outside a small vocabulary
        )
        self.vision = BlipVisionModel(self.vision_config)
        self.text = BlipTextModel(self.text_config, add_pooling_layer=False)
        self.head = AestheticMLP(int(med["hidden_size"]))

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
        ).last_hidden_state[:, 0, :].float()
        return (self.head.float()(hidden).squeeze(-1) - SCORE_MEAN) / SCORE_STD


def load_bert_tokenizer(reward: str, path: str | Path | None):
    """bert-base-uncased's tokenizer + ``[DEC]`` (bos) + ``[ENC]`` as BLIP's ``init_tokenizer``."""
    from transformers import BertTokenizer

    if path is None:
        raise CheckpointError(
            reward, None,
            "no tokenizer given; pass tokenizer=PATH (the bert-base-uncased folder or its vocab.txt)",
        )
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / "vocab.txt").is_file() and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(reward, folder / "vocab.txt", "does not exist; expected the bert-base-uncased vocab.txt")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise CheckpointError(reward, folder, f"holds no loadable BERT tokenizer ({type(err).__name__}: {str(err)[:200]})") from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    """ImageReward v1.0 score (typical range about -2..2).

    Args:
        checkpoint: ``ImageReward.pt`` (state dict; read with ``weights_only=True``) or a
            safetensors file with the same keys.
        tokenizer: the bert-base-uncased folder (or its ``vocab.txt``).
        med_config: ImageReward's ``med_config.json`` (path or dict); default: its values.
        vit: ``"large"`` (ImageReward) or ``"base"``; ``vision_config`` overrides
            (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``patch_size``, ...).
    """

    name = "imagereward"

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        tokenizer: str | Path | None = None,
        device="cpu",
        dtype="float32",
        med_config: Mapping[str, Any] | str | Path | None = None,
        vit: str = "large",
        vision_config: Mapping[str, Any] | None = None,
        image_size: int = 224,
        max_length: int = 35,
        trust_pickle: bool = False,
        text_cache_size: int = 4096,
    ):
        super().__init__(device, dtype)
        path = require_file(self.name, checkpoint, "ImageReward.pt (the THUDM/ImageReward v1.0 state dict)")
        self.tokenizer = load_bert_tokenizer(self.name, tokenizer)
        if vit not in VIT_PRESETS:
            raise ValueError(f"reward 'imagereward': vit must be one of {sorted(VIT_PRESETS)}, got {vit!r}")
        if med_config is not None and not isinstance(med_config, Mapping):
            med_file = Path(med_config).expanduser()
            if not med_file.is_file():
                raise CheckpointError(self.name, med_file, "does not exist; expected ImageReward's med_config.json")
            med_config = json.loads(med_file.read_text())
        vision = {**VIT_PRESETS[vit], "image_size": image_size, **dict(vision_config or {})}
        model = ImageRewardModel(vision, dict(med_config or {}), image_size=image_size)
        if len(self.tokenizer) > model.text_config.vocab_size:
            raise CheckpointError(
                self.name, tokenizer,
                f"tokenizer has {len(self.tokenizer)} tokens but the text encoder only {model.text_config.vocab_size}",
            )
        state = load_state_dict_file(self.name, path, trust_pickle=trust_pickle)
        mapped = {}
        for key, value in state.items():
            ours = map_upstream_key(key)
            if ours is not None:
                mapped[ours] = value
        load_strict(self.name, model, mapped, path, ignore=("text.embeddings.position_ids",))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.model.vision.to(self.dtype)
        self.model.text.to(self.dtype)
        self.max_length = int(max_length)
        size = int(model.vision_config.image_size)
        # upstream _transform: Resize(224, BICUBIC) + CenterCrop(224) (torchvision: round offsets)
        self.preprocess = ImagePreprocess(size=size, crop=(size, size), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                          resize_mode="shortest", interpolation="bicubic", crop_rounding="round")
        self._token_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._text_cache_size = int(text_cache_size)

    def _tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
            if len(self._token_cache) + len(missing) > self._text_cache_size:
                self._token_cache.clear()
            for i, p in enumerate(missing):
                self._token_cache[p] = (tok["input_ids"][i], tok["attention_mask"][i])
        ids = torch.stack([self._token_cache[p][0] for p in prompts]).to(self.device)
        mask = torch.stack([self._token_cache[p][1] for p in prompts]).to(self.device)
        return ids, mask

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(images).to(self.dtype)
        ids, mask = self._tokens(prompts)
        return check_finite(self.name, self.model(pixels, ids, mask))


__all__ = ["ImageReward", "ImageRewardModel", "map_upstream_key", "unmap_key", "SCORE_MEAN", "SCORE_STD", "PromptCache"]
