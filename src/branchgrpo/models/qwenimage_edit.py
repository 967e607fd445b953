"""Qwen-Image-Edit adapter: instruction editing with the Qwen-Image transformer, as diffusers'
``QwenImageEditPipeline`` does it, behind the :class:`~branchgrpo.models.protocol.VelocityModel`
protocol.

A training row is an instruction and a source image: one line of a JSONL file,
``{"prompt": "make the sky red", "image": "images/0001.png"}`` (relative paths are read from the
file's folder); that line is the row's "prompt" everywhere in the trainer (sampling, rewards).
Conventions match ``QwenImageEditPipeline`` (diffusers 0.42):

- the source image is resized to ``calculate_dimensions(1024·1024, aspect)`` (sides multiples of 32,
  ~1 MP; ``condition_area`` here), VAE-encoded (the posterior's mode), normalised
  ``(z − latents_mean) / latents_std`` and packed like the generated latents; these tokens are
  appended to the noisy latents' in **every** transformer call (rollout and training), with
  ``img_shapes = [(1, h, w), (1, h_src, w_src)]``, and the output is cut back to the generated tokens;
- the instruction is wrapped in the edit chat template with the source image
  (``<|vision_start|><|image_pad|><|vision_end|>``, the resized image through Qwen2.5-VL's vision
  tower via the ``Qwen2VLProcessor``); the template's first 64 tokens are dropped (the image tokens
  stay); the edit pipeline does not truncate. The negative prompt is encoded **with the row's
  image** too, so negative rows differ per source;
- true CFG, timestep, packing and decoding as Qwen-Image (:mod:`branchgrpo.models.qwenimage`);
  the dynamic shift follows the generated image's token count.

One batch (one ``encode_prompts`` call) needs source images of one condition size (one aspect
ratio at the same area): the transformer's RoPE takes one ``img_shapes`` per call, as the
pipeline's does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import latent_statistics
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.flux import pack_latents
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, download_patterns
from branchgrpo.models.protocol import Conditioning
from branchgrpo.models.qwenimage import (
    QWEN_IMAGE_LAYOUT,
    QwenImageAdapter,
    QwenImageVelocity,
)

QWEN_IMAGE_EDIT_HUB_ID = "Qwen/Qwen-Image-Edit"
CONDITION_AREA = 1024 * 1024  # QwenImageEditPipeline: calculate_dimensions(1024 * 1024, aspect)


@dataclass(frozen=True)
class EditRow:
    """One editing example: the instruction and the source image's file."""

    prompt: str
    image: Path


def parse_edit_row(line: str, base_dir: str | os.PathLike | None = None) -> EditRow:
    """A JSONL row ``{"prompt": str, "image": path}``; a relative ``image`` is read from ``base_dir``
    (default: the working directory). Raises ``ValueError`` saying what is wrong."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not a JSON object ({err.msg} at column {err.colno})") from None
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object {"prompt": ..., "image": ...}')
    prompt, image = data.get("prompt"), data.get("image")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError('"prompt" must be a non-empty string (the edit instruction)')
    if not isinstance(image, str) or not image.strip():
        raise ValueError('"image" must be the path of the source image')
    path = Path(image).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else ".") / path
    return EditRow(prompt=prompt, image=path)


def read_edit_rows(path: str | os.PathLike, field: str = "data.train_prompts") -> dict[str, EditRow]:
    """The rows of a JSONL file, keyed by their line as ``read_prompt_file`` returns it (stripped;
    blank and ``#`` lines skipped). Every problem is a ``ConfigError(field, "<file> line N: ...")``,
    a missing image included."""
    from branchgrpo.config import ConfigError
    from branchgrpo.train.components import read_prompt_file

    file = Path(path)
    read_prompt_file(str(file), field)  # the file's own errors (missing, not UTF-8, empty), as for prompts
    rows: dict[str, EditRow] = {}
    for number, raw in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            row = parse_edit_row(line, file.parent)
        except ValueError as err:
            raise ConfigError(field, f"{file} line {number}: {err}") from None
        if not row.image.is_file():
            raise ConfigError(field, f"{file} line {number}: source image {row.image} does not exist")
        rows[line] = row
    return rows


def condition_size(width: int, height: int, area: int = CONDITION_AREA) -> tuple[int, int]:
    """``(width, height)`` the pipeline resizes a ``width × height`` source to: the aspect kept at
    ``area`` pixels, each side rounded to a multiple of 32 (``calculate_dimensions``)."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    return int(round(new_width / 32) * 32), int(round(new_height / 32) * 32)


class QwenImageEditVelocity(QwenImageVelocity):
    """:class:`QwenImageVelocity` with the source image's packed latents appended to the image stream.

    Extra conditioning keys: ``image_latents [B, M, 64]`` (normalised, packed) and
    ``image_latent_shape [B, 2]`` (its packed grid as float32, the same in every row of a call). Under CFG both
    halves of the doubled batch get the same source tokens; the output keeps the generated tokens.
    """

    adapter_name = "QwenImageEditAdapter"

    def _image_tokens(self, x: Tensor, conditioning: Conditioning, doubled: bool) -> tuple[Tensor, list]:
        missing = [key for key in ("image_latents", "image_latent_shape") if key not in conditioning]
        if missing:
            raise KeyError(f"an edit model needs {missing} in the conditioning ({self.adapter_name}.encode_prompts "
                           "returns them)")
        image = conditioning["image_latents"].to(device=x.device, dtype=x.dtype)
        grid = conditioning["image_latent_shape"]
        if bool((grid != grid[:1]).any()):
            raise ValueError("one call needs source images of one condition size (aspect ratio); got "
                             f"{sorted({tuple(g) for g in grid.tolist()})}")
        if doubled:
            image = torch.cat([image, image], dim=0)
        height, width = (int(round(v)) for v in grid[0].tolist())
        shapes = [[(1, self.latent_height // 2, self.latent_width // 2), (1, height, width)]] * x.shape[0]
        return torch.cat([x, image], dim=1), shapes


def qwenimage_edit_encoder_config(text_encoder_config: Any, tokenizer: Any, image_processor: Any,
                                  condition_area: int, dtype: torch.dtype | str) -> dict[str, Any]:
    """Everything that changes Qwen-Image-Edit text embeddings (the encoder, the tokenizer, the vision
    preprocessing and the condition area), hashed into the cache's encoder identity."""
    return _encoder_fingerprint(
        "qwenimage-edit",
        {"text_encoder": text_encoder_config, "image_processor": image_processor,
         "condition": {"area": int(condition_area)}},
        {"tokenizer": tokenizer}, 0, dtype,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit behind the engine's protocols (a :class:`QwenImageAdapter` whose prompts are edit rows).

    - :meth:`encode_prompts` takes row keys (JSONL lines, or any key given to :meth:`register_rows`)
      → the Qwen-Image text keys (per row: instruction + source image; the negative prompt with the
      row's image) + ``image_latents [P, M, 64]`` and ``image_latent_shape [P, 2]``. Text embeddings
      go through ``QwenImageEditPipeline.encode_prompt`` and the prompt cache, keyed by instruction,
      the image file's SHA-256 and the condition size; the VAE latents of a source are kept in
      memory after its first use;
    - :meth:`velocity_model` → a :class:`QwenImageEditVelocity`; :meth:`decode` as Qwen-Image.

    Args (besides :class:`QwenImageAdapter`'s):
        processor: the ``Qwen2VLProcessor`` (tokenizer + Qwen2.5-VL image processor).
        condition_area: pixels of the resized source image (the pipeline's 1024·1024).
        rows: ``{key: EditRow}`` known in advance (the family registers its data files').
    """

    family = "qwenimage-edit"

    def __init__(
        self,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        processor: Any = None,
        *,
        condition_area: int = CONDITION_AREA,
        rows: Mapping[str, EditRow] | None = None,
        height: int = 1024,
        width: int = 1024,
        max_sequence_length: int = 1024,
        encoder_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.processor = processor
        self.condition_area = int(condition_area)
        if self.condition_area < 32 * 32:
            raise ValueError(f"condition_area must be at least 32x32 pixels, got {condition_area}")
        if encoder_config is None and text_encoder is not None and processor is not None:
            encoder_config = qwenimage_edit_encoder_config(text_encoder.config, tokenizer, processor.image_processor,
                                                           self.condition_area, text_encoder.dtype)
        super().__init__(transformer, vae, text_encoder, tokenizer, height=height, width=width,
                         max_sequence_length=max_sequence_length, encoder_config=encoder_config, **kwargs)
        self.rows: dict[str, EditRow] = dict(rows or {})
        self._text_keys: dict[str, tuple[str, Path]] = {}
        self._sources: dict[tuple[str, float], tuple[Any, str]] = {}  # (path, mtime) -> (resized image, sha256)
        self._source_latents: dict[tuple[str, float], tuple[Tensor, tuple[int, int]]] = {}

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "QwenImageEditAdapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_qwenimage_edit_adapter`."""
        return load_qwenimage_edit_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    @property
    def encoder_config(self) -> dict[str, Any]:
        if self._encoder_config is None:
            raise ValueError("the prompt-cache identity needs the text encoder and processor, or encoder_config "
                             "(QwenImageEditAdapter.from_pretrained provides it)")
        return dict(self._encoder_config)

    # -- rows and source images -------------------------------------------------------------
    def register_rows(self, rows: Mapping[str, EditRow]) -> None:
        """Make ``rows`` (``{key: EditRow}``, e.g. :func:`read_edit_rows`) known to :meth:`encode_prompts`."""
        self.rows.update(rows)

    def row(self, key: str) -> EditRow:
        """The row of ``key``: registered, else the key parsed as a JSONL row (paths from the working directory)."""
        if key in self.rows:
            return self.rows[key]
        try:
            row = parse_edit_row(key)
        except ValueError as err:
            raise ValueError(f"{key[:80]!r} is not an edit row ({err}); Qwen-Image-Edit prompts are JSONL rows "
                             '{"prompt": ..., "image": ...}') from None
        self.rows[key] = row
        return row

    def _source(self, path: Path) -> tuple[Any, str]:
        """The source image resized as the pipeline resizes it (PIL), and its file's SHA-256."""
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"source image {path} does not exist")
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in self._sources:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            width, height = condition_size(image.width, image.height, self.condition_area)
            resized = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2).resize(image, height, width)
            self._sources[key] = (resized, _sha256(path))
        return self._sources[key]

    def _source_tokens(self, path: Path) -> tuple[Tensor, tuple[int, int]]:
        """Packed, normalised VAE latents ``[M, 64]`` of a source and their packed grid ``(h, w)``."""
        from diffusers.image_processor import VaeImageProcessor

        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in self._source_latents:
            vae = self._require_vae()
            resized, _ = self._source(path)
            processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
            pixels = processor.preprocess(resized, resized.height, resized.width).unsqueeze(2)  # [1, 3, 1, H, W]
            with torch.no_grad():
                z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode().float()
            mean, std = latent_statistics(vae.config, z.device)
            z = ((z - mean) / std)[:, :, 0]  # the pipeline's _encode_vae_image, frame axis dropped
            self._source_latents[key] = (pack_latents(z)[0].cpu(), (z.shape[2] // 2, z.shape[3] // 2))
        return self._source_latents[key]

    def _text_key(self, prompt: str, image: Path) -> str:
        """The cache key of an instruction with a source image (the image by content and condition size)."""
        resized, digest = self._source(image)
        key = json.dumps({"prompt": prompt, "image_sha256": digest, "size": [resized.width, resized.height]},
                         sort_keys=True, ensure_ascii=False)
        self._text_keys[key] = (prompt, Path(image))
        return key

    # -- prompts ----------------------------------------------------------------------------
    def _encoding_pipeline(self):
        from diffusers import QwenImageEditPipeline

        return QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                     processor=self.processor, transformer=None)

    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Text keys (:meth:`_text_key`) → ``QwenImageEditPipeline.encode_prompt`` of each instruction with
        its resized source image: ``prompt_embeds [P, L, D]``, ``prompt_embeds_mask [P, L]``."""
        unknown = [key for key in prompts if key not in self._text_keys]
        if unknown:
            raise KeyError(f"not a text key of this adapter: {unknown[0][:80]!r} (encode rows with encode_prompts)")
        self._ensure_text_encoders(list(prompts))
        texts = [self._text_keys[key][0] for key in prompts]
        images = [self._source(self._text_keys[key][1])[0] for key in prompts]
        embeds, mask = self._encoding_pipeline().encode_prompt(prompt=texts, image=images, device=self.device)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.float()}

    def encode_prompts(self, prompts: Sequence[str], with_negative: bool | None = None) -> dict[str, Tensor]:
        """Row keys → the Qwen-Image text conditioning of each instruction with its source image, the
        negative prompt with the same image (under CFG), ``image_latents`` and ``image_latent_shape``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.row(str(key)) for key in prompts]
        if not rows:
            raise ValueError("encode_prompts needs at least one row")
        negative = with_negative if with_negative is not None else self.uses_negative_prompt
        keys = [self._text_key(row.prompt, row.image) for row in rows]
        texts = self._embedding_rows(keys)
        negatives = None
        if negative:
            negative_keys = [self._text_key(self.negative_prompt, row.image) for row in rows]
            negative_texts = self._embedding_rows(negative_keys)
            negatives = [negative_texts[key] for key in negative_keys]
        out = self._text_conditioning([texts[key] for key in keys], negatives)
        tokens = [self._source_tokens(row.image) for row in rows]
        grids = {grid for _, grid in tokens}
        if len(grids) > 1:
            raise ValueError(f"the source images of one batch have different condition sizes (packed grids "
                             f"{sorted(grids)}): Qwen-Image-Edit batches need sources of one aspect ratio")
        out["image_latents"] = torch.stack([latents for latents, _ in tokens]).to(self.device)
        # float32 like every conditioning tensor (small integers, exact)
        out["image_latent_shape"] = torch.tensor([grid for _, grid in tokens], dtype=torch.float32, device=self.device)
        return out

    def preprocess_prompts(self, prompts: Iterable[str], cache_dir: str | os.PathLike | None = None,
                           batch_size: int | None = None, progress=None):
        """Fill the prompt cache with every row's instruction and the negative prompt, each with the row's image."""
        from branchgrpo.models.prompt_cache import preprocess_prompts

        cache_dir = cache_dir if cache_dir is not None else self.prompt_cache_dir
        if cache_dir is None:
            raise ValueError("preprocess_prompts needs a cache_dir (or the adapter's prompt_cache_dir)")
        keys = []
        for key in prompts:
            row = self.row(str(key))
            keys.append(self._text_key(row.prompt, row.image))
            keys.append(self._text_key(self.negative_prompt, row.image))
        return preprocess_prompts(self, keys, cache_dir, batch_size=batch_size or self.encode_batch_size,
                                  progress=progress)

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(self, height: int | None = None, width: int | None = None, guidance_scale: float | None = None,
                       compute_dtype: torch.dtype | str | None = None) -> QwenImageEditVelocity:
        """The transformer as ``vθ(x, σ, c)`` on packed latents of one output size, the source tokens appended."""
        transformer = self._require_transformer()
        latent_h, latent_w = self.latent_size(height, width)
        return QwenImageEditVelocity(transformer, latent_h, latent_w,
                                     **self._velocity_options(guidance_scale, compute_dtype))


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

QWEN_IMAGE_EDIT_LAYOUT: dict[str, tuple[tuple[str, ...], ...]] = {
    **QWEN_IMAGE_LAYOUT,
    # the hub folder's preprocessor_config.json, or processor_config.json as transformers 5 saves it
    "processor": (("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")),
}

QWEN_IMAGE_EDIT_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    scheduler/        scheduler_config.json         (FlowMatchEulerDiscreteScheduler, dynamic shift; not used)
    transformer/      config.json, diffusion_pytorch_model-000{01..09}-of-00009.safetensors,
                      diffusion_pytorch_model.safetensors.index.json       (QwenImageTransformer2DModel)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKLQwenImage)
    text_encoder/     config.json, model-0000{1..4}-of-00004.safetensors,
                      model.safetensors.index.json                         (Qwen2.5-VL-7B-Instruct)
    tokenizer/        vocab.json, merges.txt, tokenizer_config.json, ...   (Qwen2Tokenizer)
    processor/        preprocessor_config.json, tokenizer files            (Qwen2VLProcessor)"""


class QwenImageEditFilesNotFoundError(ModelFilesNotFoundError):
    """Qwen-Image-Edit weights or configs are missing (a ``ModelFilesNotFoundError``)."""


QWEN_IMAGE_EDIT_FILES = ModelFiles(
    title="Qwen-Image-Edit", hub_id=QWEN_IMAGE_EDIT_HUB_ID, layout=QWEN_IMAGE_EDIT_LAYOUT,
    layout_text=QWEN_IMAGE_EDIT_LAYOUT_TEXT, download_patterns=download_patterns(QWEN_IMAGE_EDIT_LAYOUT),
    placeholder="/path/to/Qwen-Image-Edit", gated=False, error_class=QwenImageEditFilesNotFoundError,
)


def load_qwenimage_edit_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    vae_dtype: torch.dtype = torch.float32,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> QwenImageEditAdapter:
    """Build a :class:`QwenImageEditAdapter` from Qwen-Image-Edit weights (diffusers layout, see
    ``QWEN_IMAGE_EDIT_LAYOUT_TEXT``); arguments as :func:`~branchgrpo.models.qwenimage.load_qwenimage_adapter`.
    The VAE is needed for the source images as well as for decoding.

    Raises:
        QwenImageEditFilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

    needed = ["tokenizer", "processor", "text_encoder"] + ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, QWEN_IMAGE_EDIT_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(Qwen2Tokenizer, "tokenizer")
        processor = folder.config(Qwen2VLProcessor, "processor")
        condition_area = int(adapter_kwargs.pop("condition_area", CONDITION_AREA))
        encoder_config = qwenimage_edit_encoder_config(folder.config(Qwen2_5_VLConfig, "text_encoder"), tokenizer,
                                                       processor.image_processor, condition_area, dtype)
    return build_adapter(
        folder, QwenImageEditAdapter, dtype=dtype, text_encoders={"text_encoder": Qwen2_5_VLForConditionalGeneration},
        models={"transformer": (QwenImageTransformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKLQwenImage, vae_dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=adapter_kwargs.pop("max_sequence_length", 1024),
        tokenizer=tokenizer, processor=processor, condition_area=condition_area, **adapter_kwargs,
    )


__all__ = [
    "CONDITION_AREA",
    "EditRow",
    "QWEN_IMAGE_EDIT_FILES",
    "QWEN_IMAGE_EDIT_HUB_ID",
    "QwenImageEditAdapter",
    "QwenImageEditFilesNotFoundError",
    "QwenImageEditVelocity",
    "condition_size",
    "load_qwenimage_edit_adapter",
    "parse_edit_row",
    "qwenimage_edit_encoder_config",
    "read_edit_rows",
]
