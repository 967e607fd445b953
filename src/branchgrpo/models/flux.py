"""FLUX.1 adapter: latent packing, position ids, the velocity call of a diffusers
``FluxTransformer2DModel`` behind the :class:`~branchgrpo.models.protocol.VelocityModel` protocol,
and :class:`FluxAdapter` (text encoding with an on-disk cache, VAE decoding, loading).

Conventions match diffusers' ``FluxPipeline``: latents ``[B, C, H, W]`` are packed into 2×2
patches ``[B, (H/2)(W/2), 4C]``; the transformer takes ``timestep = σ`` (it multiplies by 1000
itself) and, for guidance-distilled models, ``guidance = guidance_scale`` per row.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, autocast_context
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.loading import FLUX_FILES, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter
from branchgrpo.models.protocol import Conditioning


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, (H/2)(W/2), 4C]`` (diffusers ``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """``[B, (H/2)(W/2), 4C]`` → ``[B, C, H, W]`` for latent height/width ``H, W``."""
    b, n, c4 = packed.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not match a {height}x{width} latent")
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` of the packed tokens (diffusers' convention)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxVelocity(torch.nn.Module):
    """``vθ(x, σ, c)`` of a ``FluxTransformer2DModel`` on packed latents ``[B, N, 4C]``.

    Conditioning keys: ``prompt_embeds [B, L, D]`` and ``pooled_prompt_embeds [B, D']``.
    ``compute_dtype`` (e.g. bfloat16 on GPU) runs the transformer under autocast; outputs are float32.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        latent_height: int,
        latent_width: int,
        guidance_scale: float | None = 3.5,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.latent_height = latent_height
        self.latent_width = latent_width
        uses_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
        self.guidance_scale = guidance_scale if uses_guidance else None
        self.compute_dtype = compute_dtype
        self.register_buffer("img_ids", latent_image_ids(latent_height, latent_width), persistent=False)

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        param = next(self.transformer.parameters())
        prompt_embeds = conditioning["prompt_embeds"].to(latents.device)
        pooled = conditioning["pooled_prompt_embeds"].to(latents.device)
        batch = latents.shape[0]
        dtype = self.compute_dtype or param.dtype
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=dtype)
        guidance = (
            torch.full((batch,), float(self.guidance_scale), device=latents.device, dtype=dtype)
            if self.guidance_scale is not None
            else None
        )
        with autocast_context(latents.device, self.compute_dtype):
            out = self.transformer(
                hidden_states=latents.to(param.dtype),
                encoder_hidden_states=prompt_embeds.to(param.dtype),
                pooled_projections=pooled.to(param.dtype),
                timestep=sigmas.to(param.dtype),
                img_ids=self.img_ids.to(dtype),
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        return out.float()


def diffusers_dynamic_shift(height: int, width: int, vae_scale_factor: int = 8) -> float:
    """The ``shift`` that reproduces diffusers' FLUX.1-dev default schedule at ``height × width``.

    FLUX.1-dev's scheduler uses resolution-dependent ("dynamic") shifting: ``μ`` from the packed
    token count, ``σ' = e^μ / (e^μ + 1/σ − 1)``, which is docs/method.md §2's formula with ``shift = e^μ``
    (2.22 at 720², 3.16 at 1024²). The anchors and docs/method.md §2 use a fixed ``shift = 3`` instead.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))
    return math.exp(calculate_shift(tokens, 256, 4096, 0.5, 1.15))  # FLUX.1-dev scheduler_config.json


# --------------------------------------------------------------------------------------------
# The full FLUX adapter: text encoding (with an on-disk cache), the velocity model and decoding.
# --------------------------------------------------------------------------------------------

def flux_encoder_config(
    text_encoder_config: Any,
    text_encoder_2_config: Any,
    tokenizer: Any,
    tokenizer_2: Any,
    max_sequence_length: int,
    dtype: torch.dtype | str,
) -> dict[str, Any]:
    """Everything that changes FLUX prompt embeddings, hashed into the cache's encoder identity."""
    return _encoder_fingerprint(
        "flux", {"text_encoder": text_encoder_config, "text_encoder_2": text_encoder_2_config},
        {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}, max_sequence_length, dtype,
    )


class FluxAdapter(DiffusersAdapter):
    """FLUX.1 (dev/schnell-style) behind the engine's protocols.

    Holds the ``FluxTransformer2DModel``, the ``AutoencoderKL`` and the CLIP-L + T5-XXL text
    encoders with their tokenizers (any may be ``None`` when a job does not need it, e.g. no
    transformer for prompt preprocessing, no text encoders when every prompt is cached).

    - :meth:`encode_prompts` → ``{"prompt_embeds": [P, L, D], "pooled_prompt_embeds": [P, D']}``
      through diffusers' ``FluxPipeline.encode_prompt``, read from / written to the prompt cache
      when ``prompt_cache_dir`` is set;
    - :meth:`velocity_model` → a :class:`FluxVelocity` on packed latents of one image size;
    - :meth:`latent_shape` → ``(tokens, channels)`` of one packed latent;
    - :meth:`decode` → images ``[B, 3, H, W]`` in ``[0, 1]``, in VAE batches.

    Args:
        source: path or hub id the weights came from (part of the prompt-cache identity).
        height, width: default image size in pixels (multiples of ``2 · vae_scale_factor``).
        compute_dtype: transformer autocast dtype; ``"auto"`` = bfloat16 on CUDA, none on CPU.
        text_encoder_loader: returns ``(text_encoder, text_encoder_2)`` on first need (lazy load).
        encoder_config: the :func:`flux_encoder_config` of the text encoders, needed for the cache
            identity when the encoders are not loaded; derived from them when they are.
    """

    family = "flux"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    required_text_encoders = 2
    dtype_text_encoder = "text_encoder_2"
    device_modules = ("transformer", "text_encoder_2", "vae")

    def __init__(
        self,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: Any = None,
        *,
        source: str = "custom",
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        height: int = 720,
        width: int = 720,
        compute_dtype: torch.dtype | str | None = "auto",
        prompt_cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 8,
        decode_batch_size: int = 4,
        device: torch.device | str | None = None,
        text_encoder_loader: Callable[[], tuple[torch.nn.Module, torch.nn.Module]] | None = None,
        encoder_config: Mapping[str, Any] | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.guidance_scale = guidance_scale
        self.height, self.width = int(height), int(width)
        self._init_common(
            source=source, max_sequence_length=max_sequence_length, compute_dtype=compute_dtype,
            prompt_cache_dir=prompt_cache_dir, encode_batch_size=encode_batch_size,
            decode_batch_size=decode_batch_size, device=device, text_encoder_loader=text_encoder_loader,
            encoder_config=encoder_config,
        )

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "FluxAdapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_flux_adapter`."""
        return load_flux_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    # -- sizes --------------------------------------------------------------------------------
    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Unpacked latent ``(H, W)`` of an image of ``height × width`` pixels."""
        height, width = height or self.height, width or self.width
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(
                f"FLUX image size must be a multiple of {multiple} pixels (VAE factor {self.vae_scale_factor} "
                f"× 2×2 packing), got {height}x{width}"
            )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Shape ``(tokens, channels)`` of one packed latent: ``((H/2)(W/2), 4·latent_channels)``."""
        latent_h, latent_w = self.latent_size(height, width)
        return (latent_h // 2) * (latent_w // 2), self._transformer_channels("latent_channels", 64, per_vae_channel=4)

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
    ) -> FluxVelocity:
        """The transformer as ``vθ(x, σ, c)`` on packed latents of one image size (docs/method.md §1–2).

        ``guidance_scale``/``compute_dtype`` default to the adapter's; ``torch.float32`` = no autocast.
        """
        transformer = self._require_transformer()
        latent_h, latent_w = self.latent_size(height, width)
        return FluxVelocity(transformer, latent_h, latent_w, **self._velocity_options(guidance_scale, compute_dtype))

    # -- prompts ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Encode without the cache, through diffusers' ``FluxPipeline.encode_prompt``."""
        from diffusers import FluxPipeline

        prompts = [str(p) for p in prompts]
        self._ensure_text_encoders(prompts)
        pipeline = FluxPipeline(
            scheduler=None, vae=None, transformer=None,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
        )
        prompt_embeds, pooled, _ = pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        packed_latents: Tensor,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Packed latents ``[B, N, 4C]`` → images ``[B, 3, H, W]`` float32 in ``[0, 1]``.

        As ``FluxPipeline``: unpack, ``z / scaling_factor + shift_factor``, ``vae.decode``,
        denormalise; ``batch_size`` (default ``decode_batch_size``) latents per VAE call.
        """
        self._require_vae()
        latent_h, latent_w = self.latent_size(height, width)
        return self._decode_scaled(packed_latents, batch_size, self.vae_scale_factor * 2,
                                   unpack=lambda packed: unpack_latents(packed, latent_h, latent_w))


def load_flux_adapter(
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
):
    """Build a :class:`FluxAdapter` from pretrained FLUX weights.

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``FLUX_LAYOUT_TEXT``) or a hub id such as
            ``black-forest-labs/FLUX.1-dev``.
        dtype: weights dtype of the transformer and text encoders (bfloat16 for FLUX.1-dev).
        device: where the modules go (default: stay on CPU).
        vae_dtype: VAE weights dtype (default ``dtype``).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (tokenizers
            and configs are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need (e.g. prompt preprocessing).
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to ``FluxAdapter`` (max_sequence_length, guidance_scale, height, …).
    Raises:
        ModelFilesNotFoundError: a folder lacks files, or a hub id cannot be fetched.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    needed = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]
    needed += ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, FLUX_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(CLIPTokenizer, "tokenizer")
        tokenizer_2 = folder.config(T5TokenizerFast, "tokenizer_2")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = flux_encoder_config(
            folder.config(CLIPTextConfig, "text_encoder"), folder.config(T5Config, "text_encoder_2"),
            tokenizer, tokenizer_2, max_sequence_length, dtype,
        )
    return build_adapter(
        folder, FluxAdapter, dtype=dtype,
        text_encoders={"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel},
        models={"transformer": (FluxTransformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKL, vae_dtype or dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, **adapter_kwargs,
    )
