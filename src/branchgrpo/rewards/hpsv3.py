"""HPSv3 (MizzenAI/HPSv3): Qwen2-VL-7B-Instruct with a reward head; the score is ``mu``.

As read in the ``hpsv3`` 1.0.0 wheel (``inference.py``, ``model/qwen2vl_trainer.py``,
``dataset/data_collator_qwen.py``, ``config/HPSv3_7B.yaml``): the tokenizer gains the special
token ``<|Reward|>`` (embeddings resized), the image is resized to exactly ``256 * 28 * 28``
pixels (``min_pixels = max_pixels``), the user turn is the image then ``INSTRUCTION`` (with the
prompt) followed by ``"\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"``,
and the "ranknet" ``rm_head`` (Linear 1024, ReLU, Dropout, Linear 16, ReLU, Linear 2) reads the
last hidden state at ``<|Reward|>``: outputs ``(mu, sigma)``; the reward is ``mu`` (``[:, 0]``).
See :mod:`branchgrpo.rewards.qwen2vl_common` for the shared model and pixel path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from branchgrpo.rewards.base import Reward, RewardError, check_finite, require_file
from branchgrpo.rewards.qwen2vl_common import QwenVisionPreprocess, encode_prompts, load_qwen_reward

HPSV3_PIXELS = 256 * 28 * 28
REWARD_TOKEN = "<|Reward|>"
# The authors' INSTRUCTION (hpsv3/dataset/data_collator_qwen.py), formatted with the prompt.
INSTRUCTION = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n'
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n'
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n'
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n'
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\n'
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
)
PROMPT_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


class HPSv3Reward(Reward):
    """HPSv3 score ``mu`` of images ``[B, 3, H, W]`` in [0, 1] for their prompts.

    Args:
        checkpoint: ``HPSv3.safetensors`` (the authors' full state dict: ``model.*``, ``visual.*``,
            ``lm_head.*``, ``rm_head.*``; a torch pickle is read with ``weights_only=True``).
        base_model: folder with Qwen2-VL-7B-Instruct's ``config.json`` and tokenizer files
            (default: the checkpoint's folder).
        pixels: the resized image's area (the authors' ``256 * 28 * 28``).
    """

    name = "hpsv3"
    needs_checkpoint = True

    def __init__(self, checkpoint: str | Path | None = None, *, base_model: str | Path | None = None,
                 device="cpu", dtype="float32", pixels: int = HPSV3_PIXELS, trust_pickle: bool = False):
        super().__init__(device, dtype)
        path = require_file(self.name, checkpoint, "HPSv3.safetensors (hf download MizzenAI/HPSv3)")
        folder = Path(base_model).expanduser() if base_model is not None else path.parent
        self.model, self.tokenizer = load_qwen_reward(self.name, path, folder, [REWARD_TOKEN], trust_pickle)
        if self.model.rm_head(torch.zeros(1, self.model.config.text_config.hidden_size)).shape[-1] != 2:
            raise RewardError("reward 'hpsv3': the checkpoint's rm_head must output (mu, sigma), 2 values")
        self.model.to(device=self.device, dtype=self.dtype)
        self.preprocess = QwenVisionPreprocess(self.model.config.vision_config, pixels, pixels)

    def texts(self, prompts: list[str]) -> list[str]:
        """The user text after the image, as the authors build it."""
        return [INSTRUCTION.format(text_prompt=p) + PROMPT_SUFFIX for p in prompts]

    def mu_sigma(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[B, 2]``: the head's (mu, sigma) for images ``[B, 3, H, W]`` in [0, 1]."""
        pixel_values, grid = self.preprocess(images[:, None])
        merge = self.preprocess.merge_size ** 2
        counts = (grid.prod(-1) // merge).tolist()
        ids, mask = encode_prompts(self.tokenizer, self.texts(prompts), counts, False, self.device)
        return self.model(ids, mask, pixel_values.to(self.device, self.dtype), grid.to(self.device), video=False)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return check_finite(self.name, self.mu_sigma(images, prompts)[:, 0])


__all__ = ["HPSv3Reward", "INSTRUCTION", "PROMPT_SUFFIX", "REWARD_TOKEN"]
