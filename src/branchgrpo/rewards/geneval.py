"""Compositional correctness (``geneval``): GenEval's object, count, colour and position checks as a reward.

Pipeline per image: the prompt is parsed into object clauses (:func:`~branchgrpo.rewards.geneval_rules.parse_prompt`);
an OWLv2 detector (transformers ``Owlv2ForObjectDetection``, the user's folder = the checkpoint)
scores every class of the vocabulary (GenEval's 80 COCO names by default) on every image patch;
GenEval's selection keeps, per class, boxes above the threshold (a higher one for counting
prompts), highest first, at most ``max_objects``, then class-wise NMS; the first ``count`` boxes
of each clause that asks for a colour are cropped and classified by CLIP zero-shot over GenEval's
ten colours with its three templates; the rules in :mod:`~branchgrpo.rewards.geneval_rules` score
the result. GenEval itself runs Mask2Former (mmdetection) with open_clip ViT-L-14; here the
detector is OWLv2 and CLIP is a transformers ``CLIPModel`` folder (``openai/clip-vit-large-patch14``
is GenEval's CLIP). See docs/rewards.md for the formulas and what was verified.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from branchgrpo.rewards.base import CheckpointError, Reward, RewardError, is_finite_number, require_dir
from branchgrpo.rewards.geneval_rules import (
    COLOR_TEMPLATES,
    COLORS,
    KINDS,
    OBJECT_NAMES,
    Detection,
    GenEvalPrompt,
    colour_requests,
    flow_grpo_score,
    geneval_correct,
    parse_prompt,
    partial_credit,
    select_objects,
)
from branchgrpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SCORES = ("partial", "binary", "flow_grpo")
UNPARSED = ("error", "zero")
WEIGHT_FILES = "model.safetensors|pytorch_model.bin|model.safetensors.index.json|pytorch_model.bin.index.json"
CLIP_FOLDER = "a transformers CLIP folder given as clip_model (GenEval uses openai/clip-vit-large-patch14)"
NO_CLIP = f"no CLIP model given for the colour checks; pass clip_model=FOLDER, {CLIP_FOLDER}"


# -- OWLv2 ------------------------------------------------------------------------------------


def owlv2_preprocess(images: Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] → OWLv2's pixels ``[B, 3, *size]``, as ``Owlv2ImageProcessor``:
    zero-pad bottom/right to a square, Gaussian anti-aliasing blur (sigma ``(factor - 1) / 2`` per
    axis, kernel ``2 ceil(3 sigma) + 1``, reflect padding; skipped unless both axes shrink),
    bilinear resize without antialias, normalise."""
    images = images.float()
    height, width = images.shape[-2:]
    side = max(height, width)
    images = F.pad(images, (0, side - width, 0, side - height), value=0.0)
    factors = (side / size[0], side / size[1])
    sigmas = [max((f - 1.0) / 2.0, 0.0) for f in factors]
    if all(s > 0 for s in sigmas):
        kernels = []
        for sigma in sigmas:
            k = 2 * math.ceil(3 * sigma) + 1
            x = torch.linspace(-(k - 1) / 2.0, (k - 1) / 2.0, k, dtype=images.dtype, device=images.device)
            kernels.append(torch.softmax(-(x / sigma).pow(2) / 2.0, dim=0))
        ky, kx = kernels
        channels = images.shape[1]
        images = F.pad(images, (kx.numel() // 2,) * 2 + (ky.numel() // 2,) * 2, mode="reflect")
        images = F.conv2d(images, (ky[:, None] * kx[None, :]).expand(channels, 1, -1, -1), groups=channels)
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


@dataclass
class RawDetections:
    """Every patch's box and best query of one image: ``boxes [Q, 4]`` (x0, y0, x1, y1 in the image's
    pixels, clipped to it), ``scores [Q]`` (sigmoid of the best query's logit), ``labels [Q]``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


class OwlV2Detector:
    """``Owlv2ForObjectDetection`` from a local folder with cached text queries, one per class."""

    what = ("an OWLv2 transformers folder (config.json with model_type owlv2, model.safetensors, "
            "preprocessor_config.json, tokenizer files), e.g. google/owlv2-base-patch16-ensemble")

    def __init__(self, reward: str, checkpoint: Any, classes: Sequence[str], query_template: str,
                 device: torch.device, dtype: torch.dtype):
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        needs = ("config.json", WEIGHT_FILES, "preprocessor_config.json", "tokenizer.json|vocab.json")
        folder = require_dir(reward, None if checkpoint is None else Path(checkpoint).expanduser(), self.what, needs)
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != "owlv2":
            raise CheckpointError(reward, folder / "config.json",
                                  f"has model_type {model_type!r}; expected {self.what}")
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        size = processor.get("size", {"height": 960, "width": 960})
        self.size = (int(size["height"]), int(size["width"]))
        self.mean = tuple(processor.get("image_mean", OPENAI_CLIP_MEAN))
        self.std = tuple(processor.get("image_std", OPENAI_CLIP_STD))
        try:
            model = Owlv2ForObjectDetection.from_pretrained(str(folder), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:
            raise CheckpointError(reward, folder, f"could not be loaded ({type(err).__name__}: {str(err)[:300]}); "
                                  f"expected {self.what}") from err
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        queries = [query_template.format(name) for name in classes]
        tokens = tokenizer(queries, padding="max_length", truncation=True, return_tensors="pt",
                           max_length=int(model.config.text_config.max_position_embeddings))
        with torch.no_grad():
            out = self.model.owlv2.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                     attention_mask=tokens["attention_mask"].to(device))
        text = (out if isinstance(out, Tensor) else out.pooler_output).float()
        self.query_embeds = (text / text.norm(dim=-1, keepdim=True)).to(dtype)  # as Owlv2Model.forward

    def __call__(self, images: Tensor) -> list[RawDetections]:
        """Detections of ``images [B, 3, H, W]`` (float in [0, 1] on the detector's device), on the CPU."""
        height, width = images.shape[-2:]
        return self.detect(owlv2_preprocess(images, self.size, self.mean, self.std), height, width)

    def detect(self, pixels: Tensor, height: int, width: int) -> list[RawDetections]:
        """Detections from OWLv2's pixels ``[B, 3, S, S]`` of images ``height`` × ``width``."""
        feature_map = self.model.image_embedder(pixel_values=pixels.to(self.dtype))[0]
        batch, rows, cols, hidden = feature_map.shape
        feats = feature_map.reshape(batch, rows * cols, hidden)
        queries = self.query_embeds[None].expand(batch, -1, -1)
        logits = self.model.class_predictor(feats, queries, None)[0].float()
        boxes = self.model.box_predictor(feats, feature_map).float()  # cx, cy, w, h in the padded square
        best = logits.max(dim=-1)
        corners = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], dim=-1)
        corners = corners * max(height, width)
        limit = torch.tensor([width, height, width, height], dtype=corners.dtype, device=corners.device)
        corners = torch.minimum(corners.clamp_min(0.0), limit)
        return [RawDetections(corners[i].cpu(), torch.sigmoid(best.values[i]).cpu(), best.indices[i].cpu())
                for i in range(batch)]


# -- CLIP colours -----------------------------------------------------------------------------


class ClipColourClassifier:
    """GenEval's colour classifier on a transformers CLIP folder: per object class, the three
    templates × ten colours, each text embedding L2-normalised, averaged over templates and
    normalised again; a crop's colour is the argmax of its normalised image embedding against them."""

    def __init__(self, reward: str, folder: Any, device: torch.device, dtype: torch.dtype):
        from branchgrpo.rewards.clip_rewards import load_clip_model, load_clip_processing, resolve_model_folder

        if folder is None:
            raise CheckpointError(reward, None, NO_CLIP)
        folder = resolve_model_folder(reward, folder, CLIP_FOLDER)
        self.tokenizer, self.preprocess = load_clip_processing(
            reward, folder, "the clip_model folder with preprocessor_config.json and tokenizer files")
        self.model = load_clip_model(reward, folder, device, dtype)
        self.device, self.dtype = device, dtype
        self._classifiers: dict[str, Tensor] = {}

    def classifier(self, name: str) -> Tensor:
        """``[len(COLORS), D]`` zero-shot weights for objects of class ``name`` (cached)."""
        if name not in self._classifiers:
            texts = [t.format(c=c, name=name) for c in COLORS for t in COLOR_TEMPLATES]
            tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                    max_length=int(self.model.config.text_config.max_position_embeddings))
            pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            feats = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            weights = feats.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._classifiers[name] = F.normalize(weights, dim=-1)
        return self._classifiers[name]

    def logits(self, crops: list[Tensor], name: str) -> Tensor:
        """``[N, len(COLORS)]`` cosine similarities of crops ``[3, h, w]`` of class ``name`` to each colour."""
        pixels = torch.cat([self.preprocess(crop[None]) for crop in crops]).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        feats = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
        return feats @ self.classifier(name).T


def crop_box(image: Tensor, box: Sequence[float]) -> Tensor:
    """``image [3, H, W]`` cropped to ``box`` rounded as PIL's ``Image.crop`` (Python ``round``),
    at least one pixel wide and high."""
    height, width = image.shape[-2:]
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    return image[:, y0:y1, x0:x1]


# -- the reward -------------------------------------------------------------------------------


@dataclass
class GenEvalResult:
    """One image's analysis: the parsed prompt (None: unparsed, scored 0), the kept detections per
    class (with colours where classified), and its scores."""

    prompt: GenEvalPrompt | None
    objects: dict[str, list[Detection]]
    total: float
    components: dict[str, float]


class GenEvalReward(Reward):
    """GenEval-style compositional reward; see the module docstring and docs/rewards.md.

    Args:
        checkpoint: the OWLv2 folder (``Owlv2ForObjectDetection`` + processor + tokenizer).
        clip_model: the CLIP folder for the colour checks (required).
        score: ``"partial"`` (default: the mean credit over GenEval's checks, 1 iff GenEval says
            correct), ``"binary"`` (GenEval's verdict, 0 or 1) or ``"flow_grpo"`` (Flow-GRPO's
            training score, can be negative).
        threshold, counting_threshold: detection score thresholds (counting prompts use the second).
        max_objects: detections kept per class. nms_iou: class-wise NMS IoU (1.0: off, as GenEval).
        position_threshold: GenEval's margin, a fraction of the summed box sizes.
        classes: the object vocabulary (parsing and detector queries); default GenEval's 80 names.
        query_template: the detector's text query per class.
        unparsed: a prompt outside the grammar: ``"error"`` or ``"zero"`` (scores and components 0).
    """

    name = "geneval"
    modality = "image"
    needs_checkpoint = True
    input_channels = 3

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        clip_model: Any = None,
        device: Any = "cpu",
        dtype: Any = "float32",
        score: Literal["partial", "binary", "flow_grpo"] = "partial",
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        nms_iou: float = 0.5,
        position_threshold: float = 0.1,
        classes: Sequence[str] | None = None,
        query_template: str = "a photo of a {}",
        unparsed: Literal["error", "zero"] = "error",
    ):
        super().__init__(device, dtype)
        if score not in SCORES:
            raise RewardError(f"reward 'geneval': score must be one of {', '.join(SCORES)}, got {score!r}")
        if unparsed not in UNPARSED:
            raise RewardError(f"reward 'geneval': unparsed must be one of {', '.join(UNPARSED)}, got {unparsed!r}")
        unit = (("threshold", threshold), ("counting_threshold", counting_threshold), ("nms_iou", nms_iou))
        for field, value in unit:
            if not is_finite_number(value) or not 0.0 <= value <= 1.0:
                raise RewardError(f"reward 'geneval': {field} must be a number in [0, 1], got {value!r}")
        if not is_finite_number(position_threshold) or position_threshold < 0:
            raise RewardError(f"reward 'geneval': position_threshold must be a number >= 0, got {position_threshold!r}")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise RewardError(f"reward 'geneval': max_objects must be a positive integer, got {max_objects!r}")
        classes = OBJECT_NAMES if classes is None else classes
        names_ok = not isinstance(classes, str) and all(isinstance(c, str) and c.strip() for c in classes)
        if not names_ok or not classes or len(set(classes)) != len(classes):
            raise RewardError("reward 'geneval': classes must be a non-empty list of distinct object names")
        if not isinstance(query_template, str) or query_template.count("{}") != 1:
            raise RewardError(f"reward 'geneval': query_template must contain '{{}}' once, got {query_template!r}")
        self.score_mode, self.unparsed = score, unparsed
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects, self.nms_iou = max_objects, float(nms_iou)
        self.position_threshold, self.classes = float(position_threshold), tuple(classes)
        if clip_model is None:  # before loading the detector
            raise CheckpointError(self.name, None, NO_CLIP)
        self.detector = OwlV2Detector(self.name, checkpoint, classes, query_template, self.device, self.dtype)
        self.colours = ClipColourClassifier(self.name, clip_model, self.device, self.dtype)

    def parse(self, prompts: Sequence[str]) -> list[GenEvalPrompt | None]:
        """Each prompt's clauses (None for an unparsed prompt when ``unparsed="zero"``)."""
        parsed = []
        for index, prompt in enumerate(prompts):
            try:
                parsed.append(parse_prompt(prompt, self.classes))
            except ValueError as err:
                if self.unparsed == "error":
                    raise RewardError(f"reward 'geneval': prompt {index}: {err}; or build the reward with "
                                      "unparsed='zero'") from None
                parsed.append(None)
        return parsed

    def _select(self, raw: RawDetections, prompt: GenEvalPrompt) -> dict[str, list[Detection]]:
        threshold = self.counting_threshold if prompt.tag == "counting" else self.threshold
        keep = torch.nonzero(raw.scores > threshold).flatten()
        return select_objects(raw.boxes[keep].tolist(), raw.scores[keep].tolist(), raw.labels[keep].tolist(),
                              self.classes, threshold=threshold, max_objects=self.max_objects, nms_iou=self.nms_iou)

    def _classify_colours(self, images: Tensor, parsed, objects) -> None:
        by_class: dict[str, list[tuple[int, int]]] = {}
        for row, (prompt, found) in enumerate(zip(parsed, objects)):
            if prompt is not None:
                for name, index in colour_requests(prompt, found):
                    by_class.setdefault(name, []).append((row, index))
        for name, where in by_class.items():
            crops = [crop_box(images[row], objects[row][name][index].box) for row, index in where]
            labels = self.colours.logits(crops, name).argmax(dim=-1).tolist()
            for (row, index), label in zip(where, labels):
                detection = objects[row][name][index]
                objects[row][name][index] = Detection(detection.box, detection.score, COLORS[label])

    def analyse(self, images: Tensor, prompts: Sequence[str]) -> list[GenEvalResult]:
        """Per image: parsed prompt, kept detections (with colours) and scores; ``images [B, 3, H, W]``."""
        prompts = self.check_inputs(images, prompts)
        parsed = self.parse(prompts)
        if images.shape[0] == 0:
            return []
        with torch.no_grad():
            images = self._prepare(images)
            raw = self.detector(images)
            objects = [self._select(r, p) if p is not None else {} for r, p in zip(raw, parsed)]
            self._classify_colours(images, parsed, objects)
        return [self._result(p, found) for p, found in zip(parsed, objects)]

    def _result(self, prompt: GenEvalPrompt | None, objects: dict[str, list[Detection]]) -> GenEvalResult:
        if prompt is None:
            return GenEvalResult(None, objects, 0.0, {kind: 0.0 for kind in (*KINDS, "correct")})
        credit = partial_credit(prompt, objects, self.position_threshold)
        correct = geneval_correct(prompt, objects, self.position_threshold)
        total = {"partial": credit.total, "binary": float(correct),
                 "flow_grpo": flow_grpo_score(prompt, objects, self.position_threshold)}[self.score_mode]
        parts = {kind: (1.0 if credit.component(kind) is None else credit.component(kind)) for kind in KINDS}
        return GenEvalResult(prompt, objects, total, {**parts, "correct": float(correct)})

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        results = self.analyse(images, prompts)
        return torch.tensor([r.total for r in results], dtype=torch.float32, device=images.device)

    def components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"geneval": total, "geneval/object", "geneval/count", "geneval/colour", "geneval/position",
        "geneval/correct"}``, each ``[B]`` float32 on the images' device (a kind the prompt lacks: 1)."""
        results = self.analyse(images, prompts)

        def column(values):
            return torch.tensor(values, dtype=torch.float32, device=images.device)

        out = {self.name: column([r.total for r in results])}
        for kind in (*KINDS, "correct"):
            out[f"{self.name}/{kind}"] = column([r.components[kind] for r in results])
        return out
