"""FLUX.2 adapter ([dev] and [klein]): latent packing, 4-axis position ids, the velocity call of a
diffusers ``Flux2Transformer2DModel`` behind the :class:`~branchgrpo.models.protocol.VelocityModel`
protocol, and :class:`Flux2Adapter` (one LLM text encoder with an on-disk prompt cache, VAE
decoding, loading). The parts live beside it and are re-exported here: latents, position ids and
the velocity call in :mod:`~branchgrpo.models.flux2_transformer`, variants and the text encoder's
cache identity in :mod:`~branchgrpo.models.flux2_text`, loading in :mod:`~branchgrpo.models.flux2_loading`.

Conventions match diffusers' ``Flux2Pipeline`` / ``Flux2KleinPipeline``:

- the VAE (``AutoencoderKLFlux2``, 32 channels) latent ``[B, C, H, W]`` is *patchified* into
  ``[B, 4C, H/2, W/2]`` and the noise lives there; the transformer sees it packed channel-last,
  ``[B, (H/2)(W/2), 4C]``, row-major over the patch grid (``_pack_latents``);
- position ids have four axes ``(t, h, w, l)``: image tokens ``(0, h, w, 0)``, text tokens
  ``(0, 0, 0, l)``;
- the transformer takes ``timestep = σ`` (it multiplies by 1000 itself);
- [dev] is guidance-distilled: ``guidance = g`` per row feeds an embedding, one call per step;
  [klein] base models have no guidance embedding and use true classifier-free guidance with the
  negative prompt (the pipeline's is ``""``), here one call on the doubled batch; step-distilled
  [klein] models (``is_distilled``) use neither;
- prompts go through the pipeline's ``encode_prompt``: a chat template, then hidden states of
  layers (10, 20, 30) of Mistral-Small-3.2 ([dev]) or (9, 18, 27) of Qwen3 ([klein]), stacked
  along the channels → ``prompt_embeds [B, L, 3·D]``; there is no pooled embedding;
- decoding undoes the VAE's batch-norm latent statistics (``bn.running_mean``/``running_var``),
  unpatchifies and decodes;
- the scheduler shifts σ with ``μ = compute_empirical_mu(tokens, steps)``, i.e. docs/method.md §2's
  ``shift = e^μ`` (:func:`flux2_dynamic_shift`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, module_device
from branchgrpo.models.flux2_loading import (
    FLUX2_DEV_HUB_ID,
    FLUX2_FILES,
    FLUX2_KLEIN_FILES,
    FLUX2_KLEIN_HUB_ID,
    FLUX2_LAYOUT,
    Flux2FilesNotFoundError,
    Flux2KleinFilesNotFoundError,
    load_flux2_adapter,
)
from branchgrpo.models.flux2_text import (  # noqa: F401  (re-exported)
    PIPELINE_CLASSES,
    TEXT_ENCODER_OUT_LAYERS,
    VARIANTS,
    Variant,
    _check_variant,
    _sha256,
    _text_tokenizer,
    flux2_encoder_config,
)
from branchgrpo.models.flux2_transformer import (
    Flux2Velocity,
    flux2_dynamic_shift,
    flux2_lora_target_modules,
    latent_image_ids,
    pack_latents,
    patchify_latents,
    text_ids,
    unpack_latents,
    unpatchify_latents,
)


class Flux2Adapter(DiffusersAdapter):
    """FLUX.2 [dev] or [klein] behind the engine's protocols.

    Holds the ``Flux2Transformer2DModel``, the ``AutoencoderKLFlux2`` and the text encoder with its
    tokenizer: ``Mistral3ForConditionalGeneration`` + ``PixtralProcessor`` for [dev], ``Qwen3ForCausalLM``
    + ``Qwen2Tokenizer`` for [klein] (any may be ``None`` when a job does not need it).

    - :meth:`encode_prompts` → ``{"prompt_embeds": [P, L, 3·D]}`` (+ ``negative_prompt_embeds`` with
      true CFG) through the pipeline's ``encode_prompt``, via the prompt cache when set;
    - :meth:`velocity_model` → a :class:`Flux2Velocity` on packed latents of one image size;
    - :meth:`latent_shape` → ``(tokens, channels)`` of one packed latent (``(4096, 128)`` at 1024²);
    - :meth:`decode` → images ``[B, 3, H, W]`` in ``[0, 1]``, in VAE batches.

    Args:
        variant: ``"dev"`` (``Flux2Pipeline``) or ``"klein"`` (``Flux2KleinPipeline``).
        is_distilled: a step-distilled [klein] model (the pipeline's ``is_distilled``): no CFG.
        guidance_scale: [dev]: the guidance embedding; [klein] base: the CFG scale (``<= 1``: off).
        negative_prompt: [klein] base only: the unconditional prompt (the pipeline's ``""``).
        text_encoder_out_layers: hidden-state layers stacked into the embedding (default: the pipeline's).
        compute_dtype: transformer autocast dtype; ``"auto"`` = bfloat16 on CUDA, none on CPU.
        text_encoder_loader: returns ``(text_encoder,)`` on first need (lazy load).
        encoder_config: :func:`flux2_encoder_config` of the encoder, for the cache identity when it
            is not loaded; derived from it when it is.
    """

    family = "flux2"
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
        variant: Variant = "dev",
        is_distilled: bool = False,
        source: str = "custom",
        max_sequence_length: int = 512,
        guidance_scale: float = 4.0,
        negative_prompt: str | None = None,
        height: int = 1024,
        width: int = 1024,
        text_encoder_out_layers: Sequence[int] | None = None,
        compute_dtype: torch.dtype | str | None = "auto",
        prompt_cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 8,
        decode_batch_size: int = 4,
        device: torch.device | str | None = None,
        text_encoder_loader: Callable[[], tuple[torch.nn.Module]] | None = None,
        encoder_config: Mapping[str, Any] | None = None,
    ):
        _check_variant(variant)
        self.variant = variant
        self.is_distilled = bool(is_distilled)
        self.family = "flux2" if variant == "dev" else "flux2-klein"
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.guidance_scale = float(guidance_scale)
        if self.uses_true_cfg:
            self.negative_prompt = "" if negative_prompt is None else str(negative_prompt)
        elif negative_prompt:
            kind = "guidance-distilled (no CFG)" if variant == "dev" else "step-distilled (no CFG)"
            raise ValueError(f"FLUX.2 [{variant}] here is {kind}: it takes no negative prompt, got {negative_prompt!r}")
        else:
            self.negative_prompt = None
        layers = text_encoder_out_layers or TEXT_ENCODER_OUT_LAYERS[variant]
        self.text_encoder_out_layers = tuple(int(i) for i in layers)
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
                        device: torch.device | str | None = None, **kwargs: Any) -> "Flux2Adapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_flux2_adapter`."""
        return load_flux2_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    @property
    def uses_true_cfg(self) -> bool:
        """Whether this model is sampled with classifier-free guidance ([klein] base models)."""
        return self.variant == "klein" and not self.is_distilled

    @property
    def encoder_config(self) -> dict[str, Any]:
        """The text encoder's :func:`flux2_encoder_config` (what the cache identity hashes)."""
        if self._encoder_config is not None:
            return {**self._encoder_config, "max_sequence_length": self.max_sequence_length}
        if self.text_encoder is not None and self.tokenizer is not None:
            return flux2_encoder_config(self.variant, self.text_encoder.config, self.tokenizer,
                                        self.max_sequence_length, self.text_encoder.dtype, self.text_encoder_out_layers)
        raise ValueError("the prompt-cache identity needs the text encoder or its encoder_config "
                         "(Flux2Adapter.from_pretrained provides it)")

    # -- sizes --------------------------------------------------------------------------------
    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of ``height × width`` pixels (VAE factor × 2)."""
        height, width = height or self.height, width or self.width
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple or height < multiple or width < multiple:
            raise ValueError(
                f"FLUX.2 image size must be a positive multiple of {multiple} pixels (VAE factor "
                f"{self.vae_scale_factor} × 2×2 patches), got {height}x{width}"
            )
        return height // multiple, width // multiple

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Shape ``(tokens, channels)`` of one packed latent: ``(h·w, 4·latent_channels)``."""
        h, w = self.latent_size(height, width)
        return h * w, self._transformer_channels("latent_channels", 128, per_vae_channel=4)

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
    ) -> Flux2Velocity:
        """The transformer as ``vθ(x, σ, c)`` on packed latents of one image size (docs/method.md §1–2).

        ``guidance_scale``/``compute_dtype`` default to the adapter's; ``torch.float32`` = no autocast.
        """
        transformer = self._require_transformer()
        h, w = self.latent_size(height, width)
        return Flux2Velocity(
            transformer, h, w, **self._velocity_options(guidance_scale, compute_dtype),
            true_cfg=self.uses_true_cfg and not bool(getattr(transformer.config, "guidance_embeds", False)),
        )

    # -- prompts ----------------------------------------------------------------------------
    def encoding_pipeline(self):
        """A text-only ``Flux2Pipeline`` / ``Flux2KleinPipeline`` around the loaded text encoder."""
        import diffusers

        cls = getattr(diffusers, PIPELINE_CLASSES[self.variant])
        kwargs = {"is_distilled": self.is_distilled} if self.variant == "klein" else {}
        return cls(scheduler=None, vae=None, transformer=None, text_encoder=self.text_encoder,
                   tokenizer=self.tokenizer, **kwargs)

    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Positive embeddings without the cache, through the pipeline's own ``encode_prompt``."""
        prompts = [str(p) for p in prompts]
        self._ensure_text_encoders(prompts)
        prompt_embeds, _ = self.encoding_pipeline().encode_prompt(
            prompt=prompts, device=module_device(self.text_encoder), max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"prompt_embeds": prompt_embeds}

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        packed_latents: Tensor,
        height: int | None = None,
        width: int | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Packed latents ``[B, h·w, 4C]`` → images ``[B, 3, H, W]`` float32 in ``[0, 1]``.

        As the pipelines: unpack, ``z·sqrt(bn.running_var + eps) + bn.running_mean``, unpatchify,
        ``vae.decode``, denormalise; ``batch_size`` (default ``decode_batch_size``) latents per call.
        """
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        vae = self._require_vae()
        h, w = self.latent_size(height, width)
        mean = vae.bn.running_mean.detach().float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.detach().float() + vae.config.batch_norm_eps).view(1, -1, 1, 1)

        def vae_input(packed: Tensor) -> Tensor:
            z = unpack_latents(packed, h, w)
            return unpatchify_latents(z * std.to(z.device) + mean.to(z.device))

        processor = Flux2ImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        return self._decode_batches(packed_latents, batch_size, vae_input=vae_input,
                                    postprocess=lambda image: processor.postprocess(image, output_type="pt"))


__all__ = [
    "FLUX2_DEV_HUB_ID",
    "FLUX2_FILES",
    "FLUX2_KLEIN_FILES",
    "FLUX2_KLEIN_HUB_ID",
    "FLUX2_LAYOUT",
    "Flux2Adapter",
    "Flux2FilesNotFoundError",
    "Flux2KleinFilesNotFoundError",
    "Flux2Velocity",
    "flux2_dynamic_shift",
    "flux2_encoder_config",
    "flux2_lora_target_modules",
    "latent_image_ids",
    "load_flux2_adapter",
    "pack_latents",
    "patchify_latents",
    "text_ids",
    "unpack_latents",
    "unpatchify_latents",
]
