"""Wan2.1 text-to-video adapter: the velocity call of a diffusers ``WanTransformer3DModel`` with
classifier-free guidance behind the :class:`~branchgrpo.models.protocol.VelocityModel` protocol,
and :class:`WanAdapter` (UMT5 text encoder with the on-disk prompt cache, ``AutoencoderKLWan``
video decoding, loading).

Conventions match diffusers' ``WanPipeline``:

- video latents are ``[B, C, F', H/8, W/8]`` with ``C = 16`` and ``F' = (frames − 1)/4 + 1`` (the
  VAE is causal in time: the first frame is coded alone, then 4 frames per latent frame); the
  transformer patchifies ``(1, 2, 2)`` itself;
- ``timestep = 1000·σ``; classifier-free guidance runs the negative and the positive prompt in
  one call on the doubled batch ``[uncond; cond]`` and mixes ``v = v_u + g·(v_c − v_u)``
  (the pipeline makes two calls; the result is the same);
- prompts are cleaned (ftfy, HTML unescape, whitespace), tokenised to ``max_sequence_length = 512``
  and the UMT5 states beyond each prompt's mask are **zeros** (no attention mask reaches the
  transformer) — all inside the pipeline's own ``encode_prompt``, which the adapter calls;
- decoding un-normalises with the VAE's per-channel ``latents_mean`` / ``latents_std``
  (``z·std + mean``), runs ``vae.decode`` and maps ``[-1, 1]`` to ``[0, 1]``.

The sampler is the engine's (docs/method.md §2–3: Euler/Flow-SDE on ``sigma_schedule(T, shift)``); Wan2.1's
own ``scheduler/`` (UniPC, ``flow_shift = 3.0`` in the 1.3B diffusers folder, the 480p value of
the model card) is not used — set ``method.tree.shift: 3.0`` for 480p.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, GuidedVelocity, latent_statistics
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns

WAN21_T2V_1_3B_HUB_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


class WanVelocity(GuidedVelocity):
    """``vθ(x, σ, c)`` of a ``WanTransformer3DModel`` on video latents ``[B, C, F', H, W]``, with CFG.

    Conditioning keys: ``prompt_embeds [B, L, D]`` and, when ``guidance_scale > 1``,
    ``negative_prompt_embeds [B, L, D]``. With guidance the transformer is called **once** on
    ``[x; x]`` with ``[negative; positive]`` embeddings and the result is ``v_u + g·(v_c − v_u)``;
    ``guidance_scale <= 1`` is one plain call. Timestep ``1000·σ`` (float32); outputs float32.
    """

    transformer_inputs = {"prompt_embeds": "encoder_hidden_states"}
    default_guidance_scale = 5.0  # WanPipeline's default
    adapter_name = "WanAdapter"


def wan_encoder_config(
    text_encoder_config: Any,
    tokenizer: Any,
    max_sequence_length: int,
    dtype: torch.dtype | str,
) -> dict[str, Any]:
    """Everything that changes Wan prompt embeddings, hashed into the cache's encoder identity."""
    return _encoder_fingerprint("wan", {"text_encoder": text_encoder_config}, {"tokenizer": tokenizer},
                                max_sequence_length, dtype)


class WanAdapter(DiffusersAdapter):
    """Wan2.1 text-to-video (T2V 1.3B / 14B) behind the engine's protocols.

    Holds the ``WanTransformer3DModel``, the ``AutoencoderKLWan`` and the UMT5 text encoder with
    its tokenizer (any may be ``None`` when a job does not need it).

    - :meth:`encode_prompts` → ``{"prompt_embeds": [P, 512, 4096]}`` (+ ``negative_prompt_embeds``
      when ``guidance_scale > 1``) through ``WanPipeline.encode_prompt``, with the prompt cache;
    - :meth:`velocity_model` → a :class:`WanVelocity` (CFG in one batched call);
    - :meth:`latent_shape` → ``(16, F', H/8, W/8)`` of one video latent;
    - :meth:`decode` → videos ``[B, F, 3, H, W]`` in ``[0, 1]`` (frame-major, so ``video[:, k]`` is
      a batch of images a reward can score), in VAE batches.

    Args:
        source: path or hub id the weights came from (part of the prompt-cache identity).
        max_sequence_length: UMT5 tokens (``WanPipeline``'s 512; embeddings are zero beyond the prompt).
        guidance_scale: CFG scale ``g`` (``WanPipeline``'s default 5.0); ``<= 1`` turns CFG off.
        negative_prompt: the unconditional prompt (``WanPipeline``'s default ``""``).
        height, width, num_frames: default video size (pixels multiple of 16; ``4k + 1`` frames).
        compute_dtype: transformer autocast dtype; ``"auto"`` = bfloat16 on CUDA, none on CPU.
        decode_batch_size: videos per VAE call (a 33-frame 480p video decodes in a few GB).
        text_encoder_loader: returns ``(text_encoder,)`` on first need (lazy load).
        encoder_config: :func:`wan_encoder_config` of the encoder, for the cache identity when it
            is not loaded; derived from it when it is.
    """

    family = "wan"
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
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        compute_dtype: torch.dtype | str | None = "auto",
        prompt_cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 8,
        decode_batch_size: int = 2,
        device: torch.device | str | None = None,
        text_encoder_loader: Callable[[], tuple[torch.nn.Module]] | None = None,
        encoder_config: Mapping[str, Any] | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt)
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self._init_common(
            source=source, max_sequence_length=max_sequence_length, compute_dtype=compute_dtype,
            prompt_cache_dir=prompt_cache_dir, encode_batch_size=encode_batch_size,
            decode_batch_size=decode_batch_size, device=device, text_encoder_loader=text_encoder_loader,
            encoder_config=encoder_config,
        )
        self.latent_size()  # a bad default size fails here, not at the first rollout

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "WanAdapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_wan_adapter`."""
        return load_wan_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8), the VAE config's ``scale_factor_spatial`` as ``WanPipeline`` reads it."""
        return int(self.vae.config.scale_factor_spatial) if self.vae is not None else 8

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Frames per latent frame after the first (4), the VAE config's ``scale_factor_temporal``."""
        return int(self.vae.config.scale_factor_temporal) if self.vae is not None else 4

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The transformer's ``(t, h, w)`` patch, ``(1, 2, 2)`` for Wan2.1."""
        return tuple(self.transformer.config.patch_size) if self.transformer is not None else (1, 2, 2)

    @property
    def latent_channels(self) -> int:
        return self._transformer_channels("z_dim", 16)

    def latent_size(self, height: int | None = None, width: int | None = None,
                    num_frames: int | None = None) -> tuple[int, int, int]:
        """Latent ``(F', H, W)`` of a ``num_frames × height × width`` video.

        ``WanPipeline`` silently rounds bad sizes; here they are errors, so the size trained is the size asked.
        """
        height, width = height or self.height, width or self.width
        num_frames = num_frames or self.num_frames
        _, patch_h, patch_w = self.patch_size
        spatial, temporal = self.vae_scale_factor, self.vae_scale_factor_temporal
        if height % (spatial * patch_h) or width % (spatial * patch_w):
            raise ValueError(
                f"Wan video size must be a multiple of {spatial * patch_h}x{spatial * patch_w} pixels (VAE factor "
                f"{spatial} × patch {patch_h}x{patch_w}), got {height}x{width}"
            )
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(
                f"Wan num_frames must be {temporal}k + 1 (1, 5, …, 33, …, 81: the causal VAE codes the first frame "
                f"alone, then {temporal} per latent frame), got {num_frames}"
            )
        return (num_frames - 1) // temporal + 1, height // spatial, width // spatial

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, int, int, int]:
        """Shape ``(C, F', H, W)`` of one video latent (``(16, 9, 60, 104)`` for 33 frames at 480×832)."""
        return (self.latent_channels, *self.latent_size(height, width, num_frames))

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
        num_frames: int | None = None,
    ) -> WanVelocity:
        """The transformer as ``vθ(x, σ, c)`` with CFG (docs/method.md §1–2).

        The size arguments are only checked (latents carry their size); ``guidance_scale`` /
        ``compute_dtype`` default to the adapter's; ``torch.float32`` = no autocast.
        """
        transformer = self._require_transformer()
        self.latent_size(height, width, num_frames)
        return WanVelocity(transformer, **self._velocity_options(guidance_scale, compute_dtype))

    # -- prompts ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Positive embeddings ``[P, max_sequence_length, D]`` through ``WanPipeline.encode_prompt``."""
        from diffusers import WanPipeline

        prompts = [str(p) for p in prompts]
        self._ensure_text_encoders(prompts)
        pipeline = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=None,
                               scheduler=None, transformer=None)
        prompt_embeds, _ = pipeline.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": prompt_embeds}

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int | None = None) -> Tensor:
        """Video latents ``[B, C, F', H, W]`` → videos ``[B, F, 3, 8H, 8W]`` float32 in ``[0, 1]``.

        As ``WanPipeline``: ``z·latents_std + latents_mean`` per channel, ``vae.decode``, then
        ``VideoProcessor.postprocess_video`` (``[-1, 1]`` → ``[0, 1]``, frames first);
        ``batch_size`` (default ``decode_batch_size``) videos per VAE call.
        """
        from diffusers.video_processor import VideoProcessor

        config = self._require_vae().config
        if latents.ndim != 5:
            raise ValueError(f"Wan latents are [B, C, F', H, W], got shape {tuple(latents.shape)}")
        mean, std = latent_statistics(config, latents.device)
        inverse_std = 1.0 / std
        processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)
        return self._decode_batches(
            latents, batch_size,
            vae_input=lambda z: z / inverse_std + mean,  # the pipeline's own arithmetic
            postprocess=lambda video: processor.postprocess_video(video, output_type="pt"),
        )


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

WAN_LAYOUT = diffusers_layout(["transformer", "vae", "text_encoder"],
                              {"tokenizer": ("tokenizer.json", "spiece.model")})

WAN_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    scheduler/        scheduler_config.json          (UniPCMultistepScheduler, flow_shift 3.0; not used)
    transformer/      config.json, diffusion_pytorch_model*.safetensors   (WanTransformer3DModel)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKLWan)
    text_encoder/     config.json, model*.safetensors (+ model.safetensors.index.json)   (UMT5-XXL encoder)
    tokenizer/        spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json"""


class WanFilesNotFoundError(ModelFilesNotFoundError):
    """Wan weights or configs are missing (a ``ModelFilesNotFoundError``; its family is :data:`WAN_FILES`)."""


WAN_FILES = ModelFiles(
    title="Wan2.1", hub_id=WAN21_T2V_1_3B_HUB_ID, layout=WAN_LAYOUT, layout_text=WAN_LAYOUT_TEXT,
    download_patterns=download_patterns(WAN_LAYOUT), placeholder="/path/to/Wan2.1-T2V-1.3B-Diffusers",
    gated=False, error_class=WanFilesNotFoundError,
)


def load_wan_adapter(
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
) -> WanAdapter:
    """Build a :class:`WanAdapter` from pretrained Wan2.1 T2V weights (diffusers layout).

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``WAN_LAYOUT_TEXT``) or a hub id such as
            ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``.
        dtype: weights dtype of the transformer and the UMT5 encoder (the transformer keeps its
            norms and time embedding in float32, diffusers' ``_keep_in_fp32_modules``).
        vae_dtype: VAE weights dtype (float32, as diffusers' Wan examples load it).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (config and
            tokenizer are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need.
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to :class:`WanAdapter` (num_frames, guidance_scale, negative_prompt, …).
    Raises:
        WanFilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    needed = ["tokenizer", "text_encoder"] + ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, WAN_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(AutoTokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = wan_encoder_config(folder.config(UMT5Config, "text_encoder"), tokenizer,
                                            max_sequence_length, dtype)
    return build_adapter(
        folder, WanAdapter, dtype=dtype, text_encoders={"text_encoder": UMT5EncoderModel},
        models={"transformer": (WanTransformer3DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKLWan, vae_dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer, **adapter_kwargs,
    )


__all__ = [
    "WAN21_T2V_1_3B_HUB_ID",
    "WAN_FILES",
    "WAN_LAYOUT",
    "WAN_LAYOUT_TEXT",
    "WanAdapter",
    "WanFilesNotFoundError",
    "WanVelocity",
    "load_wan_adapter",
    "wan_encoder_config",
]
