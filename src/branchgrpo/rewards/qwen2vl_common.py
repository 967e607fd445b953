"""Shared parts of the Qwen2-VL reward models (HPSv3, VideoAlign's VideoReward).

Both upstream models are ``Qwen2VLRewardModelBT``: a ``Qwen2VLForConditionalGeneration`` whose
``forward`` is replaced. As read in the authors' source (``hpsv3/model/qwen2vl_trainer.py`` of the
``hpsv3`` wheel; VideoAlign's ``train_reward.py`` has the same class):

- the token embeddings get the vision tower's merged patch features scattered into the
  ``<|image_pad|>`` / ``<|video_pad|>`` positions, then the **text model** runs with
  ``position_ids=None`` (plain 1-D positions, not the multimodal RoPE index: the override skips
  ``get_rope_index``), and the LM head is unused;
- ``rm_head`` maps the last hidden state at every special reward token (``<|Reward|>`` for HPSv3,
  ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>`` for VideoAlign) to the outputs.

Pixels follow Qwen2-VL's image processor: ``smart_resize`` to multiples of 28 within the pixel
budget (bicubic), OpenAI CLIP mean/std, frames padded to a multiple of ``temporal_patch_size`` by
repeating the last one, then the patch flattening of ``Qwen2VLImageProcessor``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchgrpo.rewards.base import CheckpointError, RewardError, load_state_dict_file, load_strict
from branchgrpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SYSTEM_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"  # add_generation_prompt=True


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of ``factor``, area within ``[min_pixels, max_pixels]``."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def patchify(frames: Tensor, patch_size: int, temporal_patch_size: int, merge_size: int) -> tuple[Tensor, Tensor]:
    """Normalised frames ``[T, C, H, W]`` → (patches ``[t*h*w, C*tp*p*p]``, grid_thw ``[3]``), in
    ``Qwen2VLImageProcessor._preprocess``'s order (merge windows contiguous)."""
    if frames.shape[0] % temporal_patch_size:
        pad = temporal_patch_size - frames.shape[0] % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return patches, torch.tensor([gt, gh, gw])


class QwenVisionPreprocess:
    """``[B, T, 3, H, W]`` in [0, 1] → (pixel_values, grid_thw ``[B, 3]``) as Qwen2-VL's processor."""

    def __init__(self, vision_config, min_pixels: int, max_pixels: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        self.patch_size = int(vision_config.patch_size)
        self.temporal_patch_size = int(vision_config.temporal_patch_size)
        self.merge_size = int(vision_config.spatial_merge_size)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        b, t, c, h, w = clips.shape
        rh, rw = smart_resize(h, w, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        x = clips.reshape(b * t, c, h, w)
        if (rh, rw) != (h, w):  # PIL bicubic on uint8 upstream; bicubic on floats here (clamped)
            x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - self.mean.to(x)) / self.std.to(x)
        x = x.reshape(b, t, c, rh, rw)
        out = [patchify(clip, self.patch_size, self.temporal_patch_size, self.merge_size) for clip in x]
        return torch.cat([p for p, _ in out]), torch.stack([g for _, g in out])


def build_rm_head(state: dict[str, Tensor], hidden_size: int) -> nn.Module:
    """``rm_head`` from its checkpoint keys: one bias-free ``Linear`` (``rm_head.weight``, the
    "default" head) or the ``nn.Sequential`` of the "ranknet" head (Linear, ReLU, Dropout, ...,
    Linear: a ReLU follows every Linear but the last; dropouts are identities at eval)."""
    keys = [k[len("rm_head."):] for k in state if k.startswith("rm_head.")]
    if "weight" in keys:
        w = state["rm_head.weight"]
        return nn.Linear(hidden_size, w.shape[0], bias="bias" in keys)
    index = sorted({int(k.split(".")[0]) for k in keys if k.split(".")[0].isdigit() and k.endswith("weight")})
    if not index:
        raise RewardError("the checkpoint has no rm_head weights (rm_head.weight or rm_head.<i>.weight)")
    layers: list[nn.Module] = []
    for i in range(index[-1] + 1):
        if i in index:
            w = state[f"rm_head.{i}.weight"]
            layers.append(nn.Linear(w.shape[1], w.shape[0], bias=f"{i}.bias" in keys))
        elif i - 1 in index:
            layers.append(nn.ReLU())
        else:
            layers.append(nn.Identity())  # Dropout at eval
    return nn.Sequential(*layers)


def upstream_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Authors' keys (``model.*`` text model, ``visual.*``, ``lm_head``, ``rm_head``; or the newer
    ``model.language_model.*`` / ``model.visual.*``) → this module's (``backbone.*``, ``rm_head.*``)."""
    out = {}
    for k, v in state.items():
        if k.startswith("lm_head."):
            continue  # unused by the reward
        if k.startswith("model.language_model.") or k.startswith("model.visual."):
            out["backbone." + k[len("model."):]] = v
        elif k.startswith("model."):
            out["backbone.language_model." + k[len("model."):]] = v
        elif k.startswith("visual."):
            out["backbone." + k] = v
        else:
            out[k] = v
    return out


class QwenVLRewardModel(nn.Module):
    """Qwen2-VL backbone + ``rm_head`` read at the special reward tokens: ``[B, n_tokens * out_dim]``."""

    def __init__(self, config, rm_head: nn.Module, special_token_ids: Sequence[int]):
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.rm_head = rm_head
        self.config = config
        self.special_token_ids = list(special_token_ids)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, grid_thw: Tensor,
                video: bool) -> Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        visual = self.backbone.visual(pixel_values.to(embeds.dtype), grid_thw=grid_thw).pooler_output
        token = self.config.video_token_id if video else self.config.image_token_id
        mask = (input_ids == token).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, visual.to(embeds.dtype))
        # position_ids=None: plain positions, as the authors' forward (it skips the M-RoPE index)
        hidden = self.backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                              position_ids=None, use_cache=False).last_hidden_state
        special = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.special_token_ids:
            special |= input_ids == token_id
        pooled = hidden[special].float()
        return self.rm_head.float()(pooled).reshape(input_ids.shape[0], -1)


def load_qwen_reward(name: str, checkpoint: Path, base_model: Path, special_tokens: Sequence[str],
                     trust_pickle: bool = False):
    """(model, tokenizer) from the authors' weights file and a folder with the base Qwen2-VL
    ``config.json`` and tokenizer files; the special tokens are added as in the authors' training."""
    from transformers import AutoTokenizer, Qwen2VLConfig

    config_file = base_model / "config.json"
    if not config_file.is_file():
        raise CheckpointError(name, config_file, "does not exist; expected the base Qwen2-VL config.json and "
                              "tokenizer files (reward.options.base_model)")
    config = Qwen2VLConfig(**json.loads(config_file.read_text()))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model), padding_side="right")
    except Exception as err:
        raise CheckpointError(name, base_model, f"holds no readable tokenizer ({type(err).__name__}: "
                              f"{str(err)[:200]})") from err
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    special_ids = tokenizer.convert_tokens_to_ids(list(special_tokens))
    state = upstream_keys(load_state_dict_file(name, checkpoint, unwrap=("model", "state_dict"),
                                               trust_pickle=trust_pickle))
    config.text_config.vocab_size = config.vocab_size = len(tokenizer)  # resize_token_embeddings upstream
    embed = state.get("backbone.language_model.embed_tokens.weight")
    if embed is not None:
        config.text_config.vocab_size = config.vocab_size = embed.shape[0]
    head = build_rm_head(state, config.text_config.hidden_size)
    model = QwenVLRewardModel(config, head, special_ids)
    load_strict(name, model, state, checkpoint)
    if tokenizer.pad_token_id is None:
        raise CheckpointError(name, base_model, "the tokenizer has no pad token")
    return model.eval().requires_grad_(False), tokenizer


def encode_prompts(tokenizer, texts: Sequence[str], vision_tokens: Sequence[int], video: bool,
                   device) -> tuple[Tensor, Tensor]:
    """The chat-template text (system prompt, one vision block, the user text, generation prompt),
    with ``vision_tokens[i]`` pad tokens, tokenised and right-padded: (input_ids, attention_mask)."""
    pad = "<|video_pad|>" if video else "<|image_pad|>"
    strings = [f"{SYSTEM_PREFIX}<|vision_start|>{pad * n}<|vision_end|>{text}{ASSISTANT_SUFFIX}"
               for text, n in zip(texts, vision_tokens)]
    batch = tokenizer(strings, padding=True, return_tensors="pt", add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


__all__ = ["smart_resize", "patchify", "QwenVisionPreprocess", "build_rm_head", "upstream_keys",
           "QwenVLRewardModel", "load_qwen_reward", "encode_prompts"]
