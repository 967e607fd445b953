"""``edit``: an edit-aware reward for the editing families (flux-kontext, qwenimage-edit).

The editing families hand every reward the row's JSONL line ``{"prompt": <instruction>, "image":
<source path>}`` as its prompt (``branchgrpo.models.qwenimage_edit.parse_edit_row``). This reward reads
the source image from it and scores each edited image with two terms on one transformers CLIP model:

* instruction following — ``instruction="clip"`` (default): ``cos(E(edit), T(instruction))``; or
  ``instruction="directional"`` (the CLIP directional similarity of StyleGAN-NADA / InstructPix2Pix):
  ``cos(E(edit) − E(source), T(target_caption) − T(source_caption))``, with both captions read from the
  row's ``"source_caption"`` and ``"target_caption"`` fields;
* consistency with the source — ``cos(E(edit), E(source))`` (1 for an unchanged image).

``total = instruction_weight · instruction + consistency_weight · consistency`` (cosines, not scaled),
where ``E``/``T`` are the L2-normalised CLIP image/text embeddings (:class:`HFClipReward`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from branchgrpo.rewards.base import RewardError, check_finite, is_finite_number
from branchgrpo.rewards.clip_rewards import HFClipReward

INSTRUCTION_MODES = ("clip", "directional")


def read_source(path: Path) -> Tensor:
    """The source image at ``path`` as float32 ``[3, H, W]`` in ``[0, 1]``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def directional_similarity(edit: Tensor, source: Tensor, target_text: Tensor, source_text: Tensor) -> Tensor:
    """``cos(edit − source, target_text − source_text)`` per row, all inputs ``[B, D]``; ``[B]``."""
    image_direction = edit - source
    text_direction = target_text - source_text
    return torch.nn.functional.cosine_similarity(image_direction, text_direction, dim=-1, eps=1e-8)


class EditReward(HFClipReward):
    """Instruction following + consistency with the source image, on a transformers CLIP folder.

    ``checkpoint``: a transformers CLIP folder (e.g. ``openai/clip-vit-large-patch14``);
    ``instruction_weight`` / ``consistency_weight``: the weights of the two terms; ``instruction``:
    ``"clip"`` or ``"directional"``; ``image_root``: the folder relative source paths are read from
    (default: the working directory — rows from ``read_edit_rows`` hold paths relative to their file).
    """

    name = "edit"

    def __init__(self, checkpoint=None, *, instruction_weight: float = 1.0, consistency_weight: float = 1.0,
                 instruction: str = "clip", image_root: str | Path | None = None, **kwargs):
        for field, value in (("instruction_weight", instruction_weight), ("consistency_weight", consistency_weight)):
            if not is_finite_number(value):
                raise ValueError(f"reward.options.{field} must be a finite number, got {value!r}")
        if instruction not in INSTRUCTION_MODES:
            raise ValueError(f"reward.options.instruction must be one of {', '.join(INSTRUCTION_MODES)}, got {instruction!r}")
        self.instruction_weight = float(instruction_weight)
        self.consistency_weight = float(consistency_weight)
        self.instruction = instruction
        self.image_root = Path(image_root).expanduser() if image_root is not None else None
        super().__init__(checkpoint, **kwargs)

    def parse_row(self, prompt: str) -> dict:
        """The edit row of ``prompt`` (its JSON line); errors name the missing field."""
        try:
            row = json.loads(prompt)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise RewardError(f"reward 'edit' scores edit rows: each prompt must be a JSON line "
                              f'{{"prompt": <instruction>, "image": <source path>}}, got {prompt[:80]!r}')
        needed = ["prompt", "image"] + (["source_caption", "target_caption"] if self.instruction == "directional" else [])
        for field in needed:
            if not isinstance(row.get(field), str) or not row[field].strip():
                why = " (reward.options.instruction=directional reads it)" if field.endswith("caption") else ""
                raise RewardError(f"reward 'edit': the edit row has no {field!r} field{why}: {prompt[:120]!r}")
        return row

    def source_path(self, row: dict) -> Path:
        path = Path(row["image"]).expanduser()
        if not path.is_absolute() and self.image_root is not None:
            path = self.image_root / path
        if not path.is_file():
            raise RewardError(f"reward 'edit': the row's \"image\" (source image) {path} does not exist; "
                              "relative paths are read from reward.options.image_root (default: the working directory)")
        return path

    def terms(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """``{"instruction": [B], "consistency": [B]}`` of edited ``images [B, 3, H, W]`` in ``[0, 1]``."""
        rows = [self.parse_row(p) for p in prompts]
        edit = self.image_features(images)
        source = torch.cat([self.image_features(read_source(self.source_path(r))[None].to(self.device)) for r in rows])
        consistency = (edit * source).sum(dim=-1)
        if self.instruction == "clip":
            instruction = (edit * self.text_features([r["prompt"] for r in rows])).sum(dim=-1)
        else:
            instruction = directional_similarity(edit, source, self.text_features([r["target_caption"] for r in rows]),
                                                 self.text_features([r["source_caption"] for r in rows]))
        return {"instruction": instruction, "consistency": consistency}

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        terms = self.terms(images, prompts)
        total = self.instruction_weight * terms["instruction"] + self.consistency_weight * terms["consistency"]
        return check_finite(self.name, total)
