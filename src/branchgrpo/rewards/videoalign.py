"""VideoAlign's VideoReward (KwaiVGI/VideoAlign): Qwen2-VL-2B-Instruct with a reward head that
reads the VQ, MQ and TA special tokens; the reward is one of them (default MQ, the paper's
motion-quality reward) or their sum ``Overall``.

As read in the authors' source (``inference.py``, ``prompt_template.py``, ``train_reward.py``,
``utils.py``): the tokenizer gains ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``; the user
turn is the video then ``DETAILED_PROMPT_WITH_SPECIAL_TOKEN`` formatted with the prompt
(``prompt_template_type="detailed_special"``); ``rm_head`` is one bias-free ``Linear(hidden, 1)``
read at each of the three tokens, giving ``[B, 3]`` = (VQ, MQ, TA); with ``use_norm`` each is
standardised by the ``inference_config`` means/stds of ``model_config.json``, and ``Overall`` is
their sum. Checkpoints: ``checkpoint-*/model.pth`` (a full state dict; the LoRA layout
``adapter_model.safetensors`` is not read here).

Frames: the authors decode the file at ``fps`` (or ``num_frames``) with ``qwen_vl_utils``; here the
decoded video ``[B, F, 3, H, W]`` is scored as given, or at ``num_frames`` evenly spaced frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from branchgrpo.rewards.base import CheckpointError, RewardError, check_finite, require_file
from branchgrpo.rewards.qwen2vl_common import QwenVisionPreprocess, encode_prompts, load_qwen_reward
from branchgrpo.rewards.video import VideoReward, frame_indices

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("VQ", "MQ", "TA", "Overall")
# The authors' trained prompt (prompt_template.py, "detailed_special").
DETAILED_PROMPT_WITH_SPECIAL_TOKEN = (
    '\n'
    'You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.\n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:\n'
    '- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n'
    '- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n'
    '\n'
    'Please provide the ratings of Visual Quality: <|VQ_reward|>\n'
    'END\n'
    '\n'
    '**Motion Quality:**  \n'
    'Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:\n'
    '- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).\n'
    '- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).\n'
    '- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.\n'
    '- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n'
    '- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.\n'
    '- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.\n'
    '\n'
    'Please provide the ratings of Motion Quality: <|MQ_reward|>\n'
    'END\n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the video matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n'
    '- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.\n'
    '- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  \n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.\n'
    '- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.\n'
    '\n'
    'Textual prompt - {text_prompt}\n'
    'Please provide the ratings of Text Alignment: <|TA_reward|>\n'
    'END\n'
)


def read_normalization(model_config: Path) -> dict[str, float] | None:
    """``inference_config`` (``VQ_mean``, ``VQ_std``, ...) of the authors' ``model_config.json``, or None."""
    if not model_config.is_file():
        return None
    try:
        inference = json.loads(model_config.read_text()).get("inference_config")
    except (OSError, ValueError) as err:
        raise CheckpointError("videoalign", model_config, f"is not readable JSON ({err})") from err
    return None if inference is None else {k: float(v) for k, v in inference.items() if k[:2] in ("VQ", "MQ", "TA")}


class VideoAlignReward(VideoReward):
    """VideoReward score of videos ``[B, F, 3, H, W]`` in [0, 1] for their prompts.

    Args:
        checkpoint: the authors' ``model.pth`` (``checkpoint-*/model.pth``; ``weights_only=True``)
            or a safetensors file of the same state dict.
        base_model: folder with Qwen2-VL-2B-Instruct's ``config.json`` and tokenizer files
            (default: the folder above the checkpoint's, i.e. the VideoReward folder).
        dimension: ``VQ``, ``MQ``, ``TA`` or ``Overall`` (their sum).
        use_norm: standardise with ``model_config.json``'s ``inference_config`` (or ``normalization``).
        num_frames: frames scored (evenly spaced); None scores every frame.
        min_pixels / max_pixels: the frame area bounds of Qwen2-VL's ``smart_resize``.
    """

    name = "videoalign"
    needs_checkpoint = True

    def __init__(self, checkpoint: str | Path | None = None, *, base_model: str | Path | None = None,
                 dimension: str = "MQ", use_norm: bool = True, normalization: Mapping[str, float] | None = None,
                 num_frames: int | None = None, min_pixels: int = 128 * 28 * 28, max_pixels: int = 448 * 448,
                 device: Any = "cpu", dtype: Any = "float32", trust_pickle: bool = False, name: str = "videoalign"):
        super().__init__(device, dtype)
        self.name = name
        if dimension not in DIMENSIONS:
            raise RewardError(f"reward {name!r}: dimension must be one of {', '.join(DIMENSIONS)}, got {dimension!r}")
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
            raise RewardError(f"reward {name!r}: num_frames must be an integer >= 1 or None, got {num_frames!r}")
        path = require_file(name, checkpoint, "the VideoReward checkpoint-*/model.pth (hf download KwaiVGI/VideoReward)")
        folder = Path(base_model).expanduser() if base_model is not None else path.parent.parent
        self.model, self.tokenizer = load_qwen_reward(name, path, folder, SPECIAL_TOKENS, trust_pickle)
        self.model.to(device=self.device, dtype=self.dtype)
        self.preprocess = QwenVisionPreprocess(self.model.config.vision_config, min_pixels, max_pixels)
        self.dimension, self.num_frames = dimension, num_frames
        norm = dict(normalization) if normalization is not None else read_normalization(path.parent.parent / "model_config.json")
        if use_norm and norm is None:
            raise RewardError(f"reward {name!r}: use_norm needs the VQ/MQ/TA means and stds: model_config.json "
                              "beside the checkpoint folder, or options.normalization, or use_norm=false")
        self.norm = norm if use_norm else None

    def texts(self, prompts: list[str]) -> list[str]:
        """The user text after the video, as the authors build it."""
        return [DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=p) for p in prompts]

    def raw_scores(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """``[B, 3]``: the head at (VQ, MQ, TA), before normalisation."""
        if self.num_frames is not None:
            videos = videos.index_select(1, frame_indices(videos.shape[1], self.num_frames).to(videos.device))
        pixel_values, grid = self.preprocess(videos)
        counts = (grid.prod(-1) // self.preprocess.merge_size ** 2).tolist()
        ids, mask = encode_prompts(self.tokenizer, self.texts(prompts), counts, True, self.device)
        return self.model(ids, mask, pixel_values.to(self.device, self.dtype), grid.to(self.device), video=True)

    def _score(self, videos: Tensor, prompts: list[str]) -> Tensor:
        scores = self.raw_scores(videos, prompts).float()
        if self.norm is not None:
            mean = torch.tensor([self.norm[f"{d}_mean"] for d in ("VQ", "MQ", "TA")], device=scores.device)
            std = torch.tensor([self.norm[f"{d}_std"] for d in ("VQ", "MQ", "TA")], device=scores.device)
            scores = (scores - mean) / std
        out = scores.sum(dim=1) if self.dimension == "Overall" else scores[:, DIMENSIONS.index(self.dimension)]
        return check_finite(self.name, out)


__all__ = ["VideoAlignReward", "DETAILED_PROMPT_WITH_SPECIAL_TOKEN", "SPECIAL_TOKENS", "DIMENSIONS"]
