"""FLUX.1 Kontext adapter: instruction editing with the FLUX.1 transformer, as diffusers'
``FluxKontextPipeline`` does it, behind the :class:`~branchgrpo.models.protocol.VelocityModel` protocol.

A training row is an instruction and a source image: one JSONL line
``{"prompt": "make the sky red", "image": "images/0001.png"}`` (the data format of
:mod:`branchgrpo.models.qwenimage_edit`, whose parser and reader this module uses); that line is the
row's "prompt" everywhere in the trainer. Conventions match ``FluxKontextPipeline`` (diffusers 0.42):

- the source image is resized to the preferred Kontext resolution nearest its aspect ratio
  (``PREFERRED_KONTEXT_RESOLUTIONS``, the pipeline's ``_auto_resize``; off: its own size), each side
  floored to a multiple of 16, VAE-encoded (the posterior's mode), normalised
  ``(z − shift_factor) · scaling_factor`` and packed into 2×2 patches like the generated latents;
- these tokens are appended to the noisy latents in **every** transformer call (rollout and
  training), with position ids whose first coordinate is 1 (the generated tokens' is 0); the output
  is cut back to the generated tokens;
- the instruction alone is the text (``FluxPipeline.encode_prompt``: CLIP-L pooled + T5), so the
  prompt cache is FLUX's, keyed by the instruction;
- timestep ``σ`` and the guidance embedding as FLUX.1-dev (:class:`~branchgrpo.models.flux.FluxVelocity`);
  the dynamic shift follows the generated tokens only.

Rows of one batch may have sources of different sizes (aspect ratios): ``image_latents`` is padded to
the longest source and :class:`FluxKontextVelocity` calls the transformer once per source size in
the batch (the transformer takes one set of position ids per call).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import autocast_context
from branchgrpo.models.flux import FluxAdapter, FluxVelocity, flux_encoder_config, latent_image_ids, pack_latents
from branchgrpo.models.loading import FLUX_LAYOUT, ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter
from branchgrpo.models.protocol import Conditioning
from branchgrpo.models.qwenimage_edit import EditRow, parse_edit_row

FLUX_KONTEXT_HUB_ID = "black-forest-labs/FLUX.1-Kontext-dev"
KONTEXT_GUIDANCE = 2.5  # FluxKontextPipeline's example and BFL's hosted default (__call__'s own default: 3.5)


def preferred_resolutions() -> list[tuple[int, int]]:
    """diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS`` (``(width, height)`` pairs, as the pipeline reads them)."""
    from diffusers.pipelines.flux import pipeline_flux_kontext

    return [tuple(pair) for pair in pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS]


def kontext_condition_size(width: int, height: int, multiple: int = 16, auto_resize: bool = True,
                           resolutions: Sequence[tuple[int, int]] | None = None) -> tuple[int, int]:
    """``(width, height)`` ``FluxKontextPipeline`` resizes a ``width × height`` source to.

    Both sides are first floored to ``multiple`` (``get_default_height_width``); with ``auto_resize``
    the preferred resolution (``(w, h)`` pairs, default diffusers' list) whose aspect ratio is nearest
    wins, ties to the smaller width; the result is floored to ``multiple`` (VAE factor × 2).
    """
    width, height = width // multiple * multiple, height // multiple * multiple
    if width < multiple or height < multiple:
        raise ValueError(f"a source image needs at least {multiple}x{multiple} pixels, got {width}x{height} "
                         f"after flooring each side to a multiple of {multiple}")
    if auto_resize:
        aspect = width / height
        pairs = preferred_resolutions() if resolutions is None else resolutions
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in pairs)
    return width // multiple * multiple, height // multiple * multiple


def source_image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids ``[(h/2)(w/2), 3]`` of a source's packed tokens: the generated tokens' grid with
    the first coordinate set to 1 (``FluxKontextPipeline.prepare_latents``)."""
    ids = latent_image_ids(latent_height, latent_width, device=device, dtype=dtype)
    ids[:, 0] = 1
    return ids


class FluxKontextVelocity(FluxVelocity):
    """:class:`FluxVelocity` with each row's source tokens appended to its latents.

    Extra conditioning keys: ``image_latents [B, M, 4C]`` (normalised, packed; padded to the longest
    source of the encoded batch) and ``image_latent_shape [B, 2]`` (the source's unpacked latent
    ``(h, w)`` as float32). Rows are grouped by source size, one transformer call per size; the
    outputs come back in row order and keep the generated tokens only.

    ``true_cfg_scale > 1`` is FluxKontextPipeline's true CFG: ``v = v_neg + s·(v_pos − v_neg)`` with
    ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` in the conditioning, both halves with
    the same source tokens and embedded guidance, in one call on the doubled batch ``[neg; pos]``.
    """

    def __init__(self, *args: Any, true_cfg_scale: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.true_cfg_scale = float(true_cfg_scale)

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        missing = [key for key in ("image_latents", "image_latent_shape") if key not in conditioning]
        if self.uses_cfg:
            missing += [key for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
                        if key not in conditioning]
        if missing:
            raise KeyError(f"a FLUX.1 Kontext model needs {missing} in the conditioning "
                           "(FluxKontextAdapter.encode_prompts returns them; the negative ones with a "
                           "negative_prompt and true_cfg_scale > 1)")
        sizes = [(int(round(h)), int(round(w))) for h, w in conditioning["image_latent_shape"].tolist()]
        groups: dict[tuple[int, int], list[int]] = {}
        for row, size in enumerate(sizes):
            groups.setdefault(size, []).append(row)
        if len(groups) == 1:
            return self._forward_size(latents, sigmas, conditioning, sizes[0])
        outputs, order = [], []
        for size, rows in groups.items():
            index = torch.tensor(rows, device=latents.device)
            part = {key: value[index.to(value.device)] for key, value in conditioning.items()}
            outputs.append(self._forward_size(latents[index], sigmas[index], part, size))
            order += rows
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(outputs)[inverse.to(latents.device)]

    def _forward_size(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning,
                      size: tuple[int, int]) -> Tensor:
        """One transformer call on rows whose sources have the unpacked latent size ``size``."""
        param = next(self.transformer.parameters())
        device, batch, tokens = latents.device, latents.shape[0], latents.shape[1]
        dtype = self.compute_dtype or param.dtype
        source_tokens = (size[0] // 2) * (size[1] // 2)
        image = conditioning["image_latents"]
        if image.shape[1] < source_tokens:
            raise ValueError(f"image_latents holds {image.shape[1]} tokens; a {size[0]}x{size[1]} source latent "
                             f"has {source_tokens}")
        hidden = torch.cat([latents, image[:, :source_tokens].to(device=device, dtype=latents.dtype)], dim=1)
        ids = torch.cat([self.img_ids, source_image_ids(*size, device=device)], dim=0)
        prompt_embeds = conditioning["prompt_embeds"].to(device)
        pooled = conditioning["pooled_prompt_embeds"].to(device)
        if self.uses_cfg:  # [neg; pos], one call (the pipeline makes two)
            hidden, sigmas, batch = torch.cat([hidden, hidden]), torch.cat([sigmas, sigmas]), 2 * batch
            prompt_embeds = torch.cat([conditioning["negative_prompt_embeds"].to(device), prompt_embeds])
            pooled = torch.cat([conditioning["negative_pooled_prompt_embeds"].to(device), pooled])
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = (torch.full((batch,), float(self.guidance_scale), device=device, dtype=dtype)
                    if self.guidance_scale is not None else None)
        with autocast_context(device, self.compute_dtype):
            out = self.transformer(
                hidden_states=hidden.to(param.dtype),
                encoder_hidden_states=prompt_embeds.to(param.dtype),
                pooled_projections=pooled.to(param.dtype),
                timestep=sigmas.to(param.dtype),
                img_ids=ids.to(dtype),
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        out = out[:, :tokens].float()
        if self.uses_cfg:
            negative, positive = out.chunk(2)
            return negative + self.true_cfg_scale * (positive - negative)
        return out


def flux_kontext_encoder_config(*args: Any) -> dict[str, Any]:
    """:func:`~branchgrpo.models.flux.flux_encoder_config` (same arguments) under this family's name."""
    return {**flux_encoder_config(*args), "family": "flux-kontext"}


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext behind the engine's protocols (a :class:`FluxAdapter` whose prompts are edit rows).

    - :meth:`encode_prompts` takes row keys (JSONL lines, or keys given to :meth:`register_rows`) →
      FLUX's text keys of each instruction (through the prompt cache) + ``image_latents [P, M, 4C]``
      and ``image_latent_shape [P, 2]``; a source's VAE latents are kept in memory after first use;
    - :meth:`velocity_model` → a :class:`FluxKontextVelocity`; :meth:`decode` as FLUX.

    Args (besides :class:`FluxAdapter`'s; ``height``/``width`` are the edited image's, 1024² by default
    as the pipeline renders, ``guidance_scale`` the embedded guidance, 2.5 by default):
        auto_resize: resize each source to the nearest preferred Kontext resolution (the pipeline's
            ``_auto_resize``); False keeps its own size floored to a multiple of 16.
        resolutions: the preferred ``(width, height)`` list (default diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS``).
        rows: ``{key: EditRow}`` known in advance (the family registers its data files').
        true_cfg_scale, negative_prompt: FluxKontextPipeline's true CFG (on when ``true_cfg_scale > 1``
            and a negative prompt is given: two transformer passes per step, on top of the embedded guidance).
    """

    family = "flux-kontext"

    def __init__(self, *args: Any, auto_resize: bool = True, resolutions: Sequence[tuple[int, int]] | None = None,
                 rows: Mapping[str, EditRow] | None = None, guidance_scale: float = KONTEXT_GUIDANCE,
                 height: int = 1024, width: int = 1024, true_cfg_scale: float = 1.0,
                 negative_prompt: str | None = None, **kwargs: Any):
        super().__init__(*args, guidance_scale=guidance_scale, height=height, width=width, **kwargs)
        self.true_cfg_scale = float(true_cfg_scale)
        self.negative_prompt = negative_prompt
        self.auto_resize = bool(auto_resize)
        self.resolutions = None if resolutions is None else [tuple(pair) for pair in resolutions]
        self.rows: dict[str, EditRow] = dict(rows or {})
        self._source_latents: dict[tuple[str, float], tuple[Tensor, tuple[int, int]]] = {}

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "FluxKontextAdapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_flux_kontext_adapter`."""
        return load_flux_kontext_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    # -- rows and source images -------------------------------------------------------------
    def register_rows(self, rows: Mapping[str, EditRow]) -> None:
        """Make ``rows`` (``{key: EditRow}``, e.g. ``read_edit_rows``) known to :meth:`encode_prompts`."""
        self.rows.update(rows)

    def row(self, key: str) -> EditRow:
        """The row of ``key``: registered, else the key parsed as a JSONL row (paths from the working directory)."""
        if key in self.rows:
            return self.rows[key]
        try:
            row = parse_edit_row(key)
        except ValueError as err:
            raise ValueError(f"{key[:80]!r} is not an edit row ({err}); FLUX.1 Kontext prompts are JSONL rows "
                             '{"prompt": ..., "image": ...}') from None
        self.rows[key] = row
        return row

    def source_pixels(self, path: str | os.PathLike) -> Tensor:
        """The source image as the pipeline feeds it to the VAE: resized (:func:`kontext_condition_size`),
        ``[1, 3, H, W]`` in ``[-1, 1]``."""
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"source image {path} does not exist")
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        multiple = self.vae_scale_factor * 2
        width, height = kontext_condition_size(image.width, image.height, multiple, self.auto_resize,
                                               self.resolutions)
        processor = VaeImageProcessor(vae_scale_factor=multiple)
        return processor.preprocess(processor.resize(image, height, width), height, width)

    def _source_tokens(self, path: Path) -> tuple[Tensor, tuple[int, int]]:
        """Packed, normalised VAE latents ``[M, 4C]`` of a source and its unpacked latent size ``(h, w)``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"source image {path} does not exist")
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in self._source_latents:
            vae = self._require_vae()
            pixels = self.source_pixels(path)
            with torch.no_grad():
                z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode().float()
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            z = (z - shift) * vae.config.scaling_factor  # the pipeline's _encode_vae_image
            self._source_latents[key] = (pack_latents(z)[0].cpu(), (z.shape[2], z.shape[3]))
        return self._source_latents[key]

    # -- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], with_negative: bool | None = None) -> dict[str, Tensor]:
        """Row keys → FLUX's text conditioning of each instruction, ``image_latents`` (padded to the
        longest source) and ``image_latent_shape``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.row(str(key)) for key in prompts]
        if not rows:
            raise ValueError("encode_prompts needs at least one row")
        out = super().encode_prompts([row.prompt for row in rows], with_negative=with_negative)
        sources = [self._source_tokens(row.image) for row in rows]
        longest = max(tokens.shape[0] for tokens, _ in sources)
        padded = [torch.nn.functional.pad(tokens, (0, 0, 0, longest - tokens.shape[0])) for tokens, _ in sources]
        out["image_latents"] = torch.stack(padded).to(self.device)
        # float32 like every conditioning tensor (small integers, exact)
        out["image_latent_shape"] = torch.tensor([size for _, size in sources], dtype=torch.float32,
                                                 device=self.device)
        return out

    def preprocess_prompts(self, prompts, cache_dir: str | os.PathLike | None = None,
                           batch_size: int | None = None, progress=None):
        """Fill the prompt cache with every row's instruction (the text is all FLUX encodes; no VAE needed)."""
        instructions = [self.row(str(key)).prompt for key in prompts]
        return super().preprocess_prompts(instructions, cache_dir, batch_size=batch_size, progress=progress)

    @property
    def uses_negative_prompt(self) -> bool:
        """True CFG is on: a negative prompt and ``true_cfg_scale > 1`` (``guidance_scale`` is the embedded one)."""
        return self.negative_prompt is not None and self.true_cfg_scale > 1.0

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(self, height: int | None = None, width: int | None = None, guidance_scale: float | None = None,
                       compute_dtype: torch.dtype | str | None = None) -> FluxKontextVelocity:
        """The transformer as ``vθ(x, σ, c)`` on packed latents of one output size, the source tokens appended."""
        transformer = self._require_transformer()
        latent_h, latent_w = self.latent_size(height, width)
        return FluxKontextVelocity(
            transformer, latent_h, latent_w,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            compute_dtype=self._compute_dtype(compute_dtype),
            true_cfg_scale=self.true_cfg_scale if self.uses_negative_prompt else 1.0,
        )


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

FLUX_KONTEXT_LAYOUT_TEXT = """\
  <folder>/
    model_index.json                                                       (FluxKontextPipeline)
    transformer/      config.json, diffusion_pytorch_model-*.safetensors,
                      diffusion_pytorch_model.safetensors.index.json       (FluxTransformer2DModel, 12 B)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKL)
    text_encoder/     config.json, model.safetensors                       (CLIP ViT-L/14 text)
    text_encoder_2/   config.json, model-*.safetensors, model.safetensors.index.json   (T5-v1.1-XXL encoder)
    tokenizer/        vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    tokenizer_2/      spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json"""


class FluxKontextFilesNotFoundError(ModelFilesNotFoundError):
    """FLUX.1 Kontext weights or configs are missing (a ``ModelFilesNotFoundError``)."""


FLUX_KONTEXT_FILES = ModelFiles(
    title="FLUX.1 Kontext", hub_id=FLUX_KONTEXT_HUB_ID, layout=FLUX_LAYOUT, layout_text=FLUX_KONTEXT_LAYOUT_TEXT,
    download_patterns=("model_index.json", "transformer/*", "vae/*", "text_encoder/*", "text_encoder_2/*",
                       "tokenizer/*", "tokenizer_2/*"),
    placeholder="/path/to/FLUX.1-Kontext-dev", gated=True, error_class=FluxKontextFilesNotFoundError,
)


def load_flux_kontext_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    vae_dtype: torch.dtype | None = None,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> FluxKontextAdapter:
    """Build a :class:`FluxKontextAdapter` from FLUX.1 Kontext weights (diffusers layout, see
    ``FLUX_KONTEXT_LAYOUT_TEXT``); arguments as :func:`~branchgrpo.models.flux.load_flux_adapter`.
    The VAE encodes the source images as well as decoding.

    Raises:
        FluxKontextFilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    needed = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]
    needed += ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, FLUX_KONTEXT_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)
    with folder.errors():
        tokenizer = folder.config(CLIPTokenizer, "tokenizer")
        tokenizer_2 = folder.config(T5TokenizerFast, "tokenizer_2")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = flux_kontext_encoder_config(
            folder.config(CLIPTextConfig, "text_encoder"), folder.config(T5Config, "text_encoder_2"),
            tokenizer, tokenizer_2, max_sequence_length, dtype,
        )
    return build_adapter(
        folder, FluxKontextAdapter, dtype=dtype,
        text_encoders={"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel},
        models={"transformer": (FluxTransformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKL, vae_dtype or dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, **adapter_kwargs,
    )


__all__ = [
    "FLUX_KONTEXT_FILES",
    "FLUX_KONTEXT_HUB_ID",
    "FluxKontextAdapter",
    "FluxKontextFilesNotFoundError",
    "FluxKontextVelocity",
    "KONTEXT_GUIDANCE",
    "flux_kontext_encoder_config",
    "kontext_condition_size",
    "load_flux_kontext_adapter",
    "preferred_resolutions",
    "source_image_ids",
]
