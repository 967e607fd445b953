"""Stable Diffusion 3 / 3.5 adapter: the velocity call of a diffusers ``SD3Transformer2DModel``
with classifier-free guidance behind the :class:`~branchgrpo.models.protocol.VelocityModel`
protocol, and :class:`SD3Adapter` (three text encoders with an on-disk prompt cache, VAE decoding,
loading).

Conventions match diffusers' ``StableDiffusion3Pipeline``: latents are ``[B, C, H, W]``
(``C = 16``, ``H, W`` = pixels / 8; the transformer patchifies them itself), the transformer takes
``timestep = 1000·σ``, and classifier-free guidance runs the negative and the positive prompt in
one call on the doubled batch ``[uncond; cond]`` and mixes ``v = v_u + g·(v_c − v_u)``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import TIMESTEP_SCALE  # noqa: F401  (public name, now shared)
from branchgrpo.models.base import DiffusersAdapter, GuidedVelocity, spec_sigmas_for_pipeline
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns

SD35_MEDIUM_HUB_ID = "stabilityai/stable-diffusion-3.5-medium"
NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


def diffusers_sd3_sigmas(steps: int, shift: float = 3.0) -> Tensor:
    """The σ schedule ``StableDiffusion3Pipeline`` uses by default (no ``sigmas=`` given), ``[T + 1]``.

    SD3.5's scheduler (``FlowMatchEulerDiscreteScheduler(shift=3.0)``) spaces the unshifted grid
    from 1 to its shifted ``sigma_min = shift(1/1000)`` and shifts it again, then appends 0. That
    is *not* docs/method.md §2's ``sigma_schedule(T, shift)`` (``u = linspace(1, 0, T + 1)``): e.g. T = 10
    gives σ_9 = 0.0090 here versus 0.25 there. Flow-GRPO samples SD3.5 with this default
    (``retrieve_timesteps(..., sigmas=None)``). Returned as float64 for comparison.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


class SD3Velocity(GuidedVelocity):
    """``vθ(x, σ, c)`` of an ``SD3Transformer2DModel`` on latents ``[B, C, H, W]``, with CFG.

    Conditioning keys: ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, D']`` and, when
    ``guidance_scale > 1``, ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` of the
    same shapes. With guidance the transformer is called **once** on the doubled batch
    ``[x; x]`` with ``[negative; positive]`` embeddings (the pipeline's order) and the result is
    ``v_u + g·(v_c − v_u)``; with ``guidance_scale <= 1`` it is one plain call (no negatives needed).
    ``compute_dtype`` (e.g. bfloat16 on GPU) runs the transformer under autocast; outputs are float32.
    """

    transformer_inputs = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"}
    default_guidance_scale = 4.5  # Flow-GRPO's SD3.5-M
    adapter_name = "SD3Adapter"


# --------------------------------------------------------------------------------------------
# The full SD3 adapter: text encoding (with an on-disk cache), the velocity model and decoding.
# --------------------------------------------------------------------------------------------

def sd3_encoder_config(
    text_encoder_config: Any,
    text_encoder_2_config: Any,
    text_encoder_3_config: Any,
    tokenizer: Any,
    tokenizer_2: Any,
    tokenizer_3: Any,
    max_sequence_length: int,
    dtype: torch.dtype | str,
) -> dict[str, Any]:
    """Everything that changes SD3 prompt embeddings, hashed into the cache's encoder identity."""
    return _encoder_fingerprint(
        "sd3",
        {"text_encoder": text_encoder_config, "text_encoder_2": text_encoder_2_config,
         "text_encoder_3": text_encoder_3_config},
        {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "tokenizer_3": tokenizer_3},
        max_sequence_length, dtype,
    )


TextEncoders = tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]


class SD3Adapter(DiffusersAdapter):
    """Stable Diffusion 3 / 3.5 behind the engine's protocols.

    Holds the ``SD3Transformer2DModel``, the ``AutoencoderKL`` and the three text encoders
    (CLIP-L and CLIP-G with projection, T5-XXL) with their tokenizers; any may be ``None`` when a
    job does not need it (no transformer for prompt preprocessing, no text encoders when every
    prompt is cached; ``text_encoder_3=None`` is SD3's "no T5" mode, zeros in its place).

    - :meth:`encode_prompts` → ``{"prompt_embeds": [P, L, D], "pooled_prompt_embeds": [P, D'],
      "negative_prompt_embeds": [P, L, D], "negative_pooled_prompt_embeds": [P, D']}`` through
      diffusers' ``StableDiffusion3Pipeline.encode_prompt``; the negative prompt is encoded (and
      cached) like any prompt and repeated per row;
    - :meth:`velocity_model` → an :class:`SD3Velocity` (CFG in one batched call);
    - :meth:`latent_shape` → ``(C, H/8, W/8)`` of one latent;
    - :meth:`decode` → images ``[B, 3, H, W]`` in ``[0, 1]``, in VAE batches.

    Args:
        source: path or hub id the weights came from (part of the prompt-cache identity).
        max_sequence_length: T5 tokens (diffusers' default 256; Flow-GRPO uses 128).
        guidance_scale: CFG scale ``g`` (Flow-GRPO's SD3.5-M: 4.5); ``<= 1`` turns CFG off.
        negative_prompt: the unconditional prompt (Flow-GRPO and diffusers: ``""``).
        height, width: default image size in pixels (multiples of ``vae_scale_factor · patch_size``).
        compute_dtype: transformer autocast dtype; ``"auto"`` = bfloat16 on CUDA, none on CPU.
        text_encoder_loader: returns the three text encoders on first need (lazy load).
        encoder_config: :func:`sd3_encoder_config` of the encoders, for the cache identity when
            they are not loaded; derived from them when they are.
    """

    family = "sd3"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    required_text_encoders = 2  # text_encoder_3 = None is the no-T5 mode
    dtype_text_encoder = "text_encoder"
    device_modules = ("transformer", "text_encoder_3", "text_encoder", "vae")

    def __init__(
        self,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: Any = None,
        text_encoder_3: torch.nn.Module | None = None,
        tokenizer_3: Any = None,
        *,
        source: str = "custom",
        max_sequence_length: int = 256,
        guidance_scale: float = 4.5,
        negative_prompt: str = "",
        height: int = 512,
        width: int = 512,
        compute_dtype: torch.dtype | str | None = "auto",
        prompt_cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 8,
        decode_batch_size: int = 4,
        device: torch.device | str | None = None,
        text_encoder_loader: Callable[[], TextEncoders] | None = None,
        encoder_config: Mapping[str, Any] | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer_3 = tokenizer_3
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt)
        self.height, self.width = int(height), int(width)
        self._init_common(
            source=source, max_sequence_length=max_sequence_length, compute_dtype=compute_dtype,
            prompt_cache_dir=prompt_cache_dir, encode_batch_size=encode_batch_size,
            decode_batch_size=decode_batch_size, device=device, text_encoder_loader=text_encoder_loader,
            encoder_config=encoder_config,
        )

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "SD3Adapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_sd3_adapter`."""
        return load_sd3_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size) if self.transformer is not None else 2

    @property
    def latent_channels(self) -> int:
        return self._transformer_channels("latent_channels", 16)

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Latent ``(H, W)`` of an image of ``height × width`` pixels."""
        height, width = height or self.height, width or self.width
        multiple = self.vae_scale_factor * self.patch_size
        if height % multiple or width % multiple:
            raise ValueError(
                f"SD3 image size must be a multiple of {multiple} pixels (VAE factor {self.vae_scale_factor} "
                f"× patch size {self.patch_size}), got {height}x{width}"
            )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one latent (``(16, 64, 64)`` at 512² for SD3.5)."""
        latent_h, latent_w = self.latent_size(height, width)
        return self.latent_channels, latent_h, latent_w

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
    ) -> SD3Velocity:
        """The transformer as ``vθ(x, σ, c)`` with CFG (docs/method.md §1–2).

        Same arguments as ``FluxAdapter.velocity_model``; ``height``/``width`` are only checked
        (SD3 latents carry their size). ``guidance_scale``/``compute_dtype`` default to the
        adapter's; ``torch.float32`` = no autocast.
        """
        transformer = self._require_transformer()
        self.latent_size(height, width)
        return SD3Velocity(transformer, **self._velocity_options(guidance_scale, compute_dtype))

    # -- prompts ----------------------------------------------------------------------------
    def _encoding_pipeline(self):
        from diffusers import StableDiffusion3Pipeline

        if self.text_encoder_3 is None and self.transformer is None:
            raise ValueError("SD3 without T5 (text_encoder_3=None) needs the transformer for the embedding width")
        return StableDiffusion3Pipeline(
            transformer=self.transformer if self.text_encoder_3 is None else None,
            scheduler=None, vae=None,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
        )

    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Positive embeddings without the cache, through ``StableDiffusion3Pipeline.encode_prompt``."""
        prompts = [str(p) for p in prompts]
        self._ensure_text_encoders(prompts)
        prompt_embeds, _, pooled, _ = self._encoding_pipeline().encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        latents: Tensor,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Latents ``[B, C, H, W]`` → images ``[B, 3, 8H, 8W]`` float32 in ``[0, 1]``.

        As ``StableDiffusion3Pipeline``: ``z / scaling_factor + shift_factor``, ``vae.decode``,
        denormalise; ``batch_size`` (default ``decode_batch_size``) latents per VAE call.
        ``height``/``width`` (pixels), when given, are checked against the latents.
        """
        self._require_vae()
        if latents.ndim != 4:
            raise ValueError(f"SD3 latents are [B, C, H, W], got shape {tuple(latents.shape)}")
        self._check_latent_size(latents, height, width)
        return self._decode_scaled(latents, batch_size, self.vae_scale_factor)


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

SD3_LAYOUT = diffusers_layout(
    ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"],
    {"tokenizer": ("tokenizer.json", "vocab.json"), "tokenizer_2": ("tokenizer.json", "vocab.json"),
     "tokenizer_3": ("tokenizer.json", "spiece.model")},
)

SD3_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    scheduler/        scheduler_config.json                       (FlowMatchEulerDiscreteScheduler, shift 3)
    transformer/      config.json, diffusion_pytorch_model*.safetensors   (SD3Transformer2DModel, MMDiT-X)
    vae/              config.json, diffusion_pytorch_model.safetensors
    text_encoder/     config.json, model.safetensors              (CLIP ViT-L/14 text, with projection)
    text_encoder_2/   config.json, model.safetensors              (OpenCLIP bigG/14 text, with projection)
    text_encoder_3/   config.json, model-0000{1,2}-of-00002.safetensors,
                      model.safetensors.index.json                (T5-v1.1-XXL encoder)
    tokenizer/        vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    tokenizer_2/      vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    tokenizer_3/      spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json"""


class SD3FilesNotFoundError(ModelFilesNotFoundError):
    """SD3 weights or configs are missing; the message says what to download and where.

    A :class:`~branchgrpo.models.loading.ModelFilesNotFoundError`, so one ``except`` serves all families.
    """

    def __init__(self, location: str, missing: Iterable[str], hub_id: str = SD35_MEDIUM_HUB_ID,
                 detail: str | None = None, *, files: ModelFiles | None = None):
        super().__init__(location, missing, hub_id=hub_id, detail=detail, files=files or SD3_FILES)


SD3_FILES = ModelFiles(
    title="Stable Diffusion 3", hub_id=SD35_MEDIUM_HUB_ID, layout=SD3_LAYOUT, layout_text=SD3_LAYOUT_TEXT,
    download_patterns=download_patterns(SD3_LAYOUT), placeholder="/path/to/sd3.5-medium",
    error_class=SD3FilesNotFoundError,
)


def load_sd3_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    vae_dtype: torch.dtype | None = None,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_t5: bool = True,
    load_transformer: bool = True,
    load_vae: bool = True,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> SD3Adapter:
    """Build an :class:`SD3Adapter` from pretrained SD3 / SD3.5 weights (diffusers layout).

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``SD3_LAYOUT_TEXT``) or a hub id such as
            ``stabilityai/stable-diffusion-3.5-medium``.
        dtype: weights dtype of the transformer and text encoders.
        vae_dtype: VAE weights dtype (default ``dtype``; Flow-GRPO keeps the VAE in float32).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (configs and
            tokenizers are read now, for the cache identity); ``"none"`` never (cache only).
        load_t5: False = SD3's no-T5 mode (zeros in place of the T5 tokens; different embeddings).
        load_transformer, load_vae: skip parts a job does not need.
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to :class:`SD3Adapter` (max_sequence_length, guidance_scale, …).
    Raises:
        SD3FilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    needed = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]
    needed += ["tokenizer_3", "text_encoder_3"] * load_t5
    needed += ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, SD3_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(CLIPTokenizer, "tokenizer")
        tokenizer_2 = folder.config(CLIPTokenizer, "tokenizer_2")
        tokenizer_3 = folder.config(T5TokenizerFast, "tokenizer_3") if load_t5 else None
        configs = [
            folder.config(CLIPTextConfig, "text_encoder"),
            folder.config(CLIPTextConfig, "text_encoder_2"),
            folder.config(T5Config, "text_encoder_3") if load_t5 else None,
        ]
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 256)
        encoder_config = sd3_encoder_config(*configs, tokenizer, tokenizer_2, tokenizer_3, max_sequence_length, dtype)
    return build_adapter(
        folder, SD3Adapter, dtype=dtype,
        text_encoders={"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
                       "text_encoder_3": T5EncoderModel if load_t5 else None},
        models={"transformer": (SD3Transformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKL, vae_dtype or dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3, **adapter_kwargs,
    )


__all__ = [
    "SD35_MEDIUM_HUB_ID",
    "SD3_FILES",
    "SD3_LAYOUT",
    "SD3_LAYOUT_TEXT",
    "SD3Adapter",
    "SD3FilesNotFoundError",
    "SD3Velocity",
    "diffusers_sd3_sigmas",
    "load_sd3_adapter",
    "sd3_encoder_config",
    "spec_sigmas_for_pipeline",
]
