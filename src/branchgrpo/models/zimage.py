"""Z-Image (Tongyi-MAI, 6B single-stream DiT) text-to-image adapter: the velocity call of a diffusers
``ZImageTransformer2DModel`` behind the :class:`~branchgrpo.models.protocol.VelocityModel` protocol,
and :class:`ZImageAdapter` (Qwen3 text encoder with the on-disk prompt cache, ``AutoencoderKL``
decoding, loading).

Conventions match diffusers' ``ZImagePipeline`` (0.42), which differ from SD3/FLUX in four ways:

- **Timestep.** The transformer is fed ``t = (1000 − 1000·σ)/1000 = 1 − σ`` (it multiplies by its
  ``t_scale = 1000`` inside): *clean is 1, noise is 0*, the reverse of SD3's ``1000·σ``.
- **Sign.** The transformer predicts ``x0 − ε``; the pipeline negates it before the scheduler step,
  so ``vθ = −transformer(...)`` in the flow convention of docs/method.md §1 (``v ≈ ε − x0``).
- **Guidance.** ``v = v_c + g·(v_c − v_u)`` (``ZImagePipeline``'s formula, i.e. standard CFG with
  scale ``1 + g``), on whenever ``g > 0``: ``g = 0`` is the single unguided call that the distilled
  Z-Image-Turbo uses, and ``g = 1`` is *not* "off". Options the pipeline has and that are kept:
  ``cfg_normalization`` (per image, cap ``‖v‖`` at ``c·‖v_c‖``; the base model's card passes
  ``True`` = 1.0) and ``cfg_truncation`` (no guidance on rows whose ``1 − σ`` exceeds it; default
  1.0 = never). The positive and negative rows run in **one** transformer call on the doubled batch
  ``[positive; negative]`` (the pipeline's order).
- **Prompts.** Each prompt is wrapped in the Qwen chat template (``add_generation_prompt=True,
  enable_thinking=True``), tokenised to ``max_sequence_length`` (512) and encoded by Qwen3; the
  second-to-last hidden state is kept **only at the prompt's tokens**, so prompts have different
  lengths and the transformer takes a *list* of ``[L_i, D]`` captions. The conditioning stores them
  zero-padded to ``max_sequence_length`` with a ``prompt_mask`` (float32 1/0, so any dtype cast of
  the conditioning keeps it), and the velocity model hands the transformer exactly the masked rows
  (padding never reaches it).

Latents are ``[B, 16, 2·⌊H/16⌋, 2·⌊W/16⌋]`` (the FLUX VAE's 16 channels at 8×; the transformer
patchifies 2×2 itself and takes a list of ``[C, 1, h, w]`` frames); decoding is
``z / scaling_factor + shift_factor``, ``vae.decode``, ``[-1, 1] → [0, 1]``.

The sampler is the engine's (docs/method.md §2–3: Euler/Flow-SDE on ``sigma_schedule(T, shift)``).
Z-Image's ``scheduler_config.json`` is a static-shift ``FlowMatchEulerDiscreteScheduler``
(``use_dynamic_shifting: false``; the pipeline's ``mu`` is then ignored): ``shift = 3.0`` in
Z-Image-Turbo and ``6.0`` in the base Z-Image — set ``method.tree.shift`` to the one you train.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, autocast_context
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns
from branchgrpo.models.protocol import Conditioning

Z_IMAGE_TURBO_HUB_ID = "Tongyi-MAI/Z-Image-Turbo"
Z_IMAGE_HUB_ID = "Tongyi-MAI/Z-Image"

# ZImagePipeline's literal: timesteps = 1000·σ (the scheduler's), fed as (1000 − t)/1000.
_PIPELINE_TIMESTEPS = 1000.0

# LoRA targets: the q/k/v/out projections of every ZImageTransformerBlock's ``attention`` (the main
# ``layers`` and the ``noise_refiner`` / ``context_refiner`` blocks; the model has no add_* text
# projections, it is single-stream). SD3/FLUX's ``attn.*`` names match nothing here.
ZIMAGE_TARGET_MODULES: tuple[str, ...] = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
)


def zimage_timestep(sigmas: Tensor) -> Tensor:
    """The transformer's ``t`` for noise level ``σ`` (float32), as ``ZImagePipeline`` computes it:
    ``(1000 − 1000·σ) / 1000`` (so ``t = 1 − σ``: 0 at pure noise, 1 at the clean image)."""
    return (_PIPELINE_TIMESTEPS - sigmas.float() * _PIPELINE_TIMESTEPS) / _PIPELINE_TIMESTEPS


def pad_captions(captions: Sequence[Tensor], length: int) -> tuple[Tensor, Tensor]:
    """Variable-length caption embeddings ``[L_i, D]`` → ``[P, length, D]`` zero-padded and a
    ``[P, length]`` float32 mask (1 at each caption's tokens, 0 after)."""
    if not captions:
        raise ValueError("pad_captions needs at least one caption")
    longest = max(int(c.shape[0]) for c in captions)
    if longest > length:
        raise ValueError(f"a caption has {longest} tokens, more than max_sequence_length={length}")
    first = captions[0]
    embeds = first.new_zeros((len(captions), length, first.shape[-1]))
    mask = torch.zeros((len(captions), length), dtype=torch.float32, device=first.device)
    for row, caption in enumerate(captions):
        embeds[row, : caption.shape[0]] = caption
        mask[row, : caption.shape[0]] = 1.0
    return embeds, mask


def unpad_captions(embeds: Tensor, mask: Tensor) -> list[Tensor]:
    """The inverse of :func:`pad_captions`: each row's embeddings at its mask (``[L_i, D]``)."""
    if embeds.shape[:2] != mask.shape:
        raise ValueError(f"prompt_embeds {tuple(embeds.shape)} and prompt_mask {tuple(mask.shape)} do not match")
    mask = mask.to(embeds.device) != 0
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a prompt_mask row is all zeros: every caption needs at least one token")
    return [row[keep] for row, keep in zip(embeds, mask)]


class ZImageVelocity(torch.nn.Module):
    """``vθ(x, σ, c)`` of a ``ZImageTransformer2DModel`` on latents ``[B, 16, h, w]``, with Z-Image's CFG.

    Conditioning keys: ``prompt_embeds [B, L, D]`` + ``prompt_mask [B, L]`` and, when
    ``guidance_scale > 0``, ``negative_prompt_embeds`` + ``negative_prompt_mask``. Rows that take
    guidance (all of them unless ``cfg_truncation`` drops some) are run **once** together with
    their positives on ``[x; x_guided]``; the result is ``v_c + g·(v_c − v_u)``, renormalised per
    image when ``cfg_normalization > 0``. The transformer sees ``t = 1 − σ`` (float32) and its
    output is negated (module docstring). ``compute_dtype`` runs it under autocast; outputs are float32.
    """

    condition_keys = ("prompt_embeds", "prompt_mask")
    negative_keys = ("negative_prompt_embeds", "negative_prompt_mask")

    def __init__(
        self,
        transformer: torch.nn.Module,
        guidance_scale: float = 0.0,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        self.compute_dtype = compute_dtype
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (0 = no guidance), got {self.guidance_scale}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 0.0  # ZImagePipeline.do_classifier_free_guidance

    def _base_param(self) -> Tensor:
        # the dtype of the base weights (LoRA tensors may be float32 on a bf16 base)
        for name, param in self.transformer.named_parameters():
            if ".lora_" not in name:
                return param
        return next(self.transformer.parameters())

    def row_guidance(self, sigmas: Tensor) -> Tensor:
        """Per-row guidance ``g`` (float32): 0 where ``cfg_truncation`` switches it off (``1 − σ > truncation``)."""
        t = zimage_timestep(sigmas)
        scale = torch.full_like(t, self.guidance_scale)
        if self.cfg_truncation <= 1.0:  # the pipeline truncates only for values <= 1
            scale = torch.where(t > self.cfg_truncation, torch.zeros_like(scale), scale)
        return scale

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        dtype = self._base_param().dtype
        device = latents.device
        if latents.ndim != 4:
            raise ValueError(f"Z-Image latents are [B, C, H, W], got shape {tuple(latents.shape)}")
        sigmas = sigmas.to(device=device, dtype=torch.float32)
        t = zimage_timestep(sigmas)
        captions = unpad_captions(conditioning["prompt_embeds"].to(device), conditioning["prompt_mask"])
        frames = list(latents.to(dtype).unsqueeze(2).unbind(0))  # [C, 1, h, w] per row, as the pipeline
        timesteps = t
        guided = torch.zeros(0, dtype=torch.long, device=device)
        if self.uses_cfg:
            scale = self.row_guidance(sigmas)
            guided = torch.nonzero(scale > 0).flatten()
        if guided.numel():
            missing = [key for key in self.negative_keys if key not in conditioning]
            if missing:
                raise KeyError(f"guidance_scale={self.guidance_scale} > 0 needs {missing} in the conditioning "
                               "(ZImageAdapter.encode_prompts returns them)")
            negative = unpad_captions(conditioning["negative_prompt_embeds"].to(device),
                                      conditioning["negative_prompt_mask"])
            rows = guided.tolist()
            frames = frames + [frames[i] for i in rows]
            captions = captions + [negative[i] for i in rows]
            timesteps = torch.cat([t, t[guided]])
        captions = [c.to(dtype) for c in captions]
        with autocast_context(device, self.compute_dtype):
            out = self.transformer(frames, timesteps, captions, return_dict=False)[0]
        out = torch.stack([o.float() for o in out], dim=0).squeeze(2)
        batch = latents.shape[0]
        pred = out[:batch]
        if guided.numel():
            pos, neg = pred[guided], out[batch:]
            mixed = pos + scale[guided].view(-1, 1, 1, 1) * (pos - neg)
            if self.cfg_normalization > 0.0:
                pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
                new_norm = torch.linalg.vector_norm(mixed.flatten(1), dim=1)
                max_norm = pos_norm * self.cfg_normalization
                factor = torch.where(new_norm > max_norm, max_norm / new_norm, torch.ones_like(new_norm))
                mixed = mixed * factor.view(-1, 1, 1, 1)
            pred = pred.index_copy(0, guided, mixed)
        return -pred


def zimage_encoder_config(
    text_encoder_config: Any,
    tokenizer: Any,
    max_sequence_length: int,
    dtype: torch.dtype | str,
) -> dict[str, Any]:
    """Everything that changes Z-Image prompt embeddings (the Qwen3 config, the tokenizer and its
    chat template, the length, the dtype), hashed into the cache's encoder identity."""
    config = _encoder_fingerprint("zimage", {"text_encoder": text_encoder_config}, {"tokenizer": tokenizer},
                                  max_sequence_length, dtype)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    config["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None
    return config


class ZImageAdapter(DiffusersAdapter):
    """Z-Image / Z-Image-Turbo text-to-image behind the engine's protocols.

    Holds the ``ZImageTransformer2DModel``, the ``AutoencoderKL`` and the Qwen3 text encoder with
    its tokenizer (any may be ``None`` when a job does not need it).

    - :meth:`encode_prompts` → ``{"prompt_embeds": [P, L, 2560], "prompt_mask": [P, L]}`` (+ the
      ``negative_`` pair when ``guidance_scale > 0``) through ``ZImagePipeline.encode_prompt``,
      with the prompt cache (``L = max_sequence_length``);
    - :meth:`velocity_model` → a :class:`ZImageVelocity`;
    - :meth:`latent_shape` → ``(16, H/8, W/8)``;
    - :meth:`decode` → images ``[B, 3, H, W]`` in ``[0, 1]``, in VAE batches.

    Args:
        source: path or hub id the weights came from (part of the prompt-cache identity).
        max_sequence_length: Qwen tokens, chat template included (``ZImagePipeline``'s 512).
        guidance_scale: Z-Image's ``g`` in ``v_c + g·(v_c − v_u)``; 0 (Turbo) = one unguided call.
        negative_prompt: the unconditional prompt (``ZImagePipeline``'s default ``""``).
        cfg_normalization, cfg_truncation: ``ZImagePipeline``'s options of the same names (0 = off / 1.0 = off).
        height, width: default image size (pixels, multiples of 16).
        compute_dtype: transformer autocast dtype; ``"auto"`` = bfloat16 on CUDA, none on CPU.
        text_encoder_loader: returns ``(text_encoder,)`` on first need (lazy load).
        encoder_config: :func:`zimage_encoder_config` of the encoder, for the cache identity when it
            is not loaded; derived from it when it is.
    """

    family = "zimage"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    required_text_encoders = 1
    dtype_text_encoder = "text_encoder"
    device_modules = ("transformer", "text_encoder", "vae")

    def __init__(
        self,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        *,
        source: str = "custom",
        max_sequence_length: int = 512,
        guidance_scale: float = 0.0,
        negative_prompt: str = "",
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        height: int = 1024,
        width: int = 1024,
        compute_dtype: torch.dtype | str | None = "auto",
        prompt_cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 8,
        decode_batch_size: int = 4,
        device: torch.device | str | None = None,
        text_encoder_loader: Callable[[], tuple[torch.nn.Module]] | None = None,
        encoder_config: Mapping[str, Any] | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.guidance_scale = float(guidance_scale)
        if self.guidance_scale < 0:
            raise ValueError(f"Z-Image guidance_scale must be >= 0 (0 = no guidance), got {guidance_scale}")
        self.negative_prompt = str(negative_prompt)
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        self.height, self.width = int(height), int(width)
        self._init_common(
            source=source, max_sequence_length=max_sequence_length, compute_dtype=compute_dtype,
            prompt_cache_dir=prompt_cache_dir, encode_batch_size=encode_batch_size,
            decode_batch_size=decode_batch_size, device=device, text_encoder_loader=text_encoder_loader,
            encoder_config=encoder_config,
        )
        self.latent_size()  # a bad default size fails here, not at the first rollout

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "ZImageAdapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_zimage_adapter`."""
        return load_zimage_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    @property
    def uses_negative_prompt(self) -> bool:
        """Negative rows by default whenever guidance is on: ``guidance_scale > 0`` (Z-Image's convention)."""
        return self.guidance_scale > 0.0

    @property
    def encoder_config(self) -> dict[str, Any]:
        if self._encoder_config is None and self._encoders_loaded():
            return zimage_encoder_config(self.text_encoder.config, self.tokenizer, self.max_sequence_length,
                                         self.text_encoder.dtype)
        return super().encoder_config

    # -- sizes --------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self._transformer_channels("latent_channels", 16)

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Latent ``(h, w)`` of an image of ``height × width`` pixels (``ZImagePipeline.prepare_latents``).

        The pipeline refuses sizes that are not multiples of ``2 × VAE factor`` (16); so does this.
        """
        height, width = height or self.height, width or self.width
        multiple = self.vae_scale_factor * 2
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise ValueError(
                f"Z-Image image size must be a multiple of {multiple} pixels (VAE factor {self.vae_scale_factor} "
                f"× patch 2), got {height}x{width}"
            )
        return 2 * (height // multiple), 2 * (width // multiple)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Shape ``(C, h, w)`` of one latent (``(16, 128, 128)`` at 1024²)."""
        return (self.latent_channels, *self.latent_size(height, width))

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
        cfg_normalization: float | None = None,
        cfg_truncation: float | None = None,
    ) -> ZImageVelocity:
        """The transformer as ``vθ(x, σ, c)`` with Z-Image's guidance (docs/method.md §1–2).

        The size arguments are only checked (latents carry their size); the guidance options and
        ``compute_dtype`` default to the adapter's; ``torch.float32`` = no autocast.
        """
        transformer = self._require_transformer()
        self.latent_size(height, width)
        return ZImageVelocity(
            transformer, **self._velocity_options(guidance_scale, compute_dtype),
            cfg_normalization=self.cfg_normalization if cfg_normalization is None else cfg_normalization,
            cfg_truncation=self.cfg_truncation if cfg_truncation is None else cfg_truncation,
        )

    # -- prompts ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Positive captions through ``ZImagePipeline.encode_prompt``, zero-padded to
        ``max_sequence_length`` with their mask (the cache stores rows of one shape)."""
        from diffusers import ZImagePipeline

        prompts = [str(p) for p in prompts]
        self._ensure_text_encoders(prompts)
        pipeline = ZImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder,
                                  tokenizer=self.tokenizer, transformer=None)
        captions, _ = pipeline.encode_prompt(
            prompt=list(prompts),  # the pipeline rewrites the list it is given (chat template)
            device=self.device, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        embeds, mask = pad_captions(captions, self.max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor, height: int | None = None, width: int | None = None,
               batch_size: int | None = None) -> Tensor:
        """Latents ``[B, 16, h, w]`` → images ``[B, 3, 8h, 8w]`` float32 in ``[0, 1]``.

        As ``ZImagePipeline``: ``z / scaling_factor + shift_factor``, ``vae.decode``, denormalise;
        ``batch_size`` (default ``decode_batch_size``) latents per VAE call. ``height``/``width``
        (pixels), when given, are checked against the latents.
        """
        self._require_vae()
        if latents.ndim != 4:
            raise ValueError(f"Z-Image latents are [B, C, H, W], got shape {tuple(latents.shape)}")
        self._check_latent_size(latents, height, width)
        return self._decode_scaled(latents, batch_size, self.vae_scale_factor * 2)


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

ZIMAGE_LAYOUT = diffusers_layout(["transformer", "vae", "text_encoder"],
                                 {"tokenizer": ("tokenizer.json", "vocab.json")})

ZIMAGE_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    scheduler/        scheduler_config.json        (FlowMatchEulerDiscreteScheduler, static shift: Turbo 3.0, base 6.0)
    transformer/      config.json, diffusion_pytorch_model-0000*-of-0000*.safetensors (+ .index.json)
                                                   (ZImageTransformer2DModel, 6B single-stream DiT)
    vae/              config.json, diffusion_pytorch_model.safetensors                  (AutoencoderKL, 16 channels)
    text_encoder/     config.json, model-0000*-of-0000*.safetensors (+ .index.json)      (Qwen3-4B, Qwen3Model)
    tokenizer/        tokenizer.json, tokenizer_config.json, vocab.json, merges.txt      (Qwen2Tokenizer + chat template)"""


class ZImageFilesNotFoundError(ModelFilesNotFoundError):
    """Z-Image weights or configs are missing (a ``ModelFilesNotFoundError``; its family is :data:`ZIMAGE_FILES`)."""


ZIMAGE_FILES = ModelFiles(
    title="Z-Image", hub_id=Z_IMAGE_TURBO_HUB_ID, layout=ZIMAGE_LAYOUT, layout_text=ZIMAGE_LAYOUT_TEXT,
    download_patterns=download_patterns(ZIMAGE_LAYOUT), placeholder="/path/to/Z-Image-Turbo",
    gated=False, error_class=ZImageFilesNotFoundError,
)


def load_zimage_adapter(
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
) -> ZImageAdapter:
    """Build a :class:`ZImageAdapter` from pretrained Z-Image / Z-Image-Turbo weights (diffusers layout).

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``ZIMAGE_LAYOUT_TEXT``) or a hub id such as
            ``Tongyi-MAI/Z-Image-Turbo`` or ``Tongyi-MAI/Z-Image``.
        dtype: weights dtype of the transformer and the Qwen3 encoder (bfloat16, the cards' choice).
        vae_dtype: VAE weights dtype (default ``dtype``).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (config and
            tokenizer are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need.
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to :class:`ZImageAdapter` (guidance_scale, negative_prompt, height, …).
    Raises:
        ZImageFilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    needed = ["tokenizer", "text_encoder"] + ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, ZIMAGE_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(AutoTokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = zimage_encoder_config(folder.config(Qwen3Config, "text_encoder"), tokenizer,
                                               max_sequence_length, dtype)
    return build_adapter(
        folder, ZImageAdapter, dtype=dtype, text_encoders={"text_encoder": Qwen3Model},
        models={"transformer": (ZImageTransformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKL, vae_dtype or dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer, **adapter_kwargs,
    )


__all__ = [
    "ZIMAGE_FILES",
    "ZIMAGE_LAYOUT",
    "ZIMAGE_LAYOUT_TEXT",
    "ZIMAGE_TARGET_MODULES",
    "Z_IMAGE_HUB_ID",
    "Z_IMAGE_TURBO_HUB_ID",
    "ZImageAdapter",
    "ZImageFilesNotFoundError",
    "ZImageVelocity",
    "load_zimage_adapter",
    "pad_captions",
    "unpad_captions",
    "zimage_encoder_config",
    "zimage_timestep",
]
