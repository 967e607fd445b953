"""Qwen-Image adapter: the velocity call of a diffusers ``QwenImageTransformer2DModel`` with Qwen's
true classifier-free guidance behind the :class:`~branchgrpo.models.protocol.VelocityModel`
protocol, and :class:`QwenImageAdapter` (the Qwen2.5-VL text encoder with the on-disk prompt cache,
``AutoencoderKLQwenImage`` decoding, loading). The parts live beside it and are re-exported here:
the schedule, true CFG and the velocity call in :mod:`~branchgrpo.models.qwenimage_transformer`,
loading in :mod:`~branchgrpo.models.qwenimage_loading`.

Conventions match diffusers' ``QwenImagePipeline``:

- latents ``[B, 16, H/8, W/8]`` are packed into 2×2 patches ``[B, (H/16)(W/16), 64]`` outside the
  transformer (FLUX's layout; the pipeline's VAE latent has a frame axis of 1, dropped here), and
  the transformer gets ``img_shapes = [(1, H/16, W/16)]`` per row for its RoPE;
- the transformer takes ``timestep = σ`` (its time projection multiplies by 1000 itself);
- prompts are wrapped in Qwen-Image's system/user chat template, run through Qwen2.5-VL, and the
  template's first 34 tokens (system turn and ``<|im_start|>user\\n``) are dropped: a prompt of n
  tokens gives n + 5 embeddings (``<|im_end|>\\n<|im_start|>assistant\\n`` stay). Prompts of
  different lengths are zero-padded to the longest with an attention mask
  (``encoder_hidden_states_mask``) — all inside the pipeline's own ``encode_prompt``;
- true CFG (the pipeline's ``true_cfg_scale`` with a negative prompt): ``c = v_u + g·(v_c − v_u)``
  rescaled per token to the conditional prediction's norm, ``v = c · ‖v_c‖ / ‖c‖`` (norms over the
  64 packed channels). The pipeline makes two calls (its positive and negative texts have their
  own lengths); here one call on the doubled batch, both padded to one length and masked;
- decoding: unpack, ``z·latents_std + latents_mean`` per channel, ``vae.decode`` of a one-frame
  video, ``[-1, 1]`` → ``[0, 1]``.

**Schedule.** Qwen-Image's scheduler shifts by resolution ("dynamic shifting", ``μ`` from the
packed token count with its own anchors: 0.5 at 256 tokens, 0.9 at 8192), which is
docs/method.md §2's shift with ``shift = e^μ`` (:func:`qwenimage_dynamic_shift`: 2.30 at 1328²),
and then stretches the grid so its last non-zero σ is ``shift_terminal = 0.02``
(:func:`diffusers_qwenimage_sigmas`). Our trees use ``sigma_schedule(T, shift)`` without the stretch.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, latent_statistics
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.flux import pack_latents, unpack_latents
from branchgrpo.models.prompt_cache import PromptEmbeddingCache
from branchgrpo.models.qwenimage_loading import (
    QWEN_IMAGE_FILES,
    QWEN_IMAGE_HUB_ID,
    QWEN_IMAGE_LAYOUT,
    QWEN_IMAGE_LAYOUT_TEXT,
    QwenImageFilesNotFoundError,
    load_qwenimage_adapter,
)
from branchgrpo.models.qwenimage_transformer import (  # noqa: F401  (re-exported)
    QWEN_IMAGE_SCHEDULER_CONFIG,
    QwenImageVelocity,
    _mu,
    diffusers_qwenimage_sigmas,
    image_tokens,
    pad_text,
    qwenimage_dynamic_shift,
    trim_text,
    true_cfg,
)

MAX_SEQUENCE_LENGTH_LIMIT = 1024  # QwenImagePipeline.check_inputs refuses more


# --------------------------------------------------------------------------------------------
# The full Qwen-Image adapter: text encoding (with an on-disk cache), the velocity model and decoding.
# --------------------------------------------------------------------------------------------

def qwenimage_encoder_config(text_encoder_config: Any, tokenizer: Any, max_sequence_length: int,
                             dtype: torch.dtype | str) -> dict[str, Any]:
    """Everything that changes Qwen-Image prompt embeddings, hashed into the cache's encoder identity."""
    return _encoder_fingerprint("qwenimage", {"text_encoder": text_encoder_config}, {"tokenizer": tokenizer},
                                max_sequence_length, dtype)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


class QwenImageAdapter(DiffusersAdapter):
    """Qwen-Image (text-to-image, 20B MMDiT) behind the engine's protocols.

    Holds the ``QwenImageTransformer2DModel``, the ``AutoencoderKLQwenImage`` and the Qwen2.5-VL
    text encoder with its tokenizer (any may be ``None`` when a job does not need it).

    - :meth:`encode_prompts` → ``{"prompt_embeds": [P, L, D], "prompt_embeds_mask": [P, L]}`` (+ the
      ``negative_`` pair under CFG) through ``QwenImagePipeline.encode_prompt``; ``L`` is the longest
      row (each prompt's own length, the negative prompt included), shorter rows zero-padded and
      masked. The cache stores each prompt's tokens (``prompt_embeds`` and its mask as encoded;
      rows are cut to their mask when read), so rows of any length combine;
    - :meth:`velocity_model` → a :class:`QwenImageVelocity` (true CFG in one batched call);
    - :meth:`latent_shape` → ``((H/16)(W/16), 64)`` of one packed latent;
    - :meth:`decode` → images ``[B, 3, H, W]`` in ``[0, 1]``, in VAE batches.

    Args:
        source: path or hub id the weights came from (part of the prompt-cache identity).
        max_sequence_length: text tokens kept after the template (``QwenImagePipeline``'s 512; ≤ 1024).
        guidance_scale: true-CFG scale ``g`` (the model card's 4.0); ``<= 1`` turns CFG off.
        negative_prompt: the unconditional prompt (the model card's ``" "``).
        height, width: default image size in pixels (multiples of ``2 · vae_scale_factor``).
        compute_dtype: transformer autocast dtype; ``"auto"`` = bfloat16 on CUDA, none on CPU.
        text_encoder_loader: returns ``(text_encoder,)`` on first need (lazy load).
        encoder_config: :func:`qwenimage_encoder_config` of the encoder, for the cache identity when
            it is not loaded; derived from it when it is.
    """

    family = "qwenimage"
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
        guidance_scale: float = 4.0,
        negative_prompt: str = " ",
        height: int = 1328,
        width: int = 1328,
        compute_dtype: torch.dtype | str | None = "auto",
        prompt_cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 8,
        decode_batch_size: int = 4,
        device: torch.device | str | None = None,
        text_encoder_loader: Callable[[], tuple[torch.nn.Module]] | None = None,
        encoder_config: Mapping[str, Any] | None = None,
    ):
        if not 1 <= int(max_sequence_length) <= MAX_SEQUENCE_LENGTH_LIMIT:
            raise ValueError(f"Qwen-Image max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH_LIMIT}], "
                             f"got {max_sequence_length}")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt)
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
                        device: torch.device | str | None = None, **kwargs: Any) -> "QwenImageAdapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_qwenimage_adapter`."""
        return load_qwenimage_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8): ``2 ** len(vae.temperal_downsample)``, as ``QwenImagePipeline`` reads it."""
        return 2 ** len(self.vae.config.temperal_downsample) if self.vae is not None else 8

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Unpacked latent ``(H, W)`` of an image of ``height × width`` pixels.

        ``QwenImagePipeline`` silently rounds other sizes down; here they are errors, so the size
        trained is the size asked.
        """
        height, width = height or self.height, width or self.width
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple or height < multiple or width < multiple:
            raise ValueError(
                f"Qwen-Image image size must be a multiple of {multiple} pixels (VAE factor {self.vae_scale_factor} "
                f"× 2×2 packing), got {height}x{width}"
            )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Shape ``(tokens, channels)`` of one packed latent: ``((H/2)(W/2), 4·16)``."""
        latent_h, latent_w = self.latent_size(height, width)
        return (latent_h // 2) * (latent_w // 2), self._transformer_channels("z_dim", 64, per_vae_channel=4)

    def recommended_shift(self, height: int | None = None, width: int | None = None) -> float:
        """:func:`qwenimage_dynamic_shift` at this (or the given) size: the shift of the model's own schedule."""
        return qwenimage_dynamic_shift(height or self.height, width or self.width, self.vae_scale_factor)

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
    ) -> QwenImageVelocity:
        """The transformer as ``vθ(x, σ, c)`` on packed latents of one image size, with true CFG.

        ``guidance_scale``/``compute_dtype`` default to the adapter's; ``torch.float32`` = no autocast.
        """
        transformer = self._require_transformer()
        latent_h, latent_w = self.latent_size(height, width)
        return QwenImageVelocity(transformer, latent_h, latent_w,
                                 **self._velocity_options(guidance_scale, compute_dtype))

    # -- prompts ----------------------------------------------------------------------------
    def _encoding_pipeline(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                 transformer=None)

    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``QwenImagePipeline.encode_prompt``: ``prompt_embeds [P, L, D]`` and ``prompt_embeds_mask [P, L]``
        (float32 1/0; the pipeline's ``None`` for "no padding" becomes ones), ``L`` the longest prompt."""
        prompts = [str(p) for p in prompts]
        self._ensure_text_encoders(prompts)
        embeds, mask = self._encoding_pipeline().encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.float()}

    @staticmethod
    def _row_tokens(row: Mapping[str, Tensor]) -> Tensor:
        """One prompt's embeddings ``[n, D]`` without padding (its mask is a prefix of ones)."""
        embeds = row["prompt_embeds"]
        mask = row.get("prompt_embeds_mask")
        return embeds if mask is None else embeds[: int(mask.bool().sum())]

    def _embedding_rows(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Each unique text's unpadded embeddings, from the cache or encoded (misses in batches) and stored."""
        cache: PromptEmbeddingCache | None = self.prompt_cache()
        rows: dict[str, Tensor] = {}
        missing = []
        for text in _unique(texts):
            hit = cache.load(text) if cache is not None else None
            if hit is None:
                missing.append(text)
            else:
                rows[text] = self._row_tokens(hit)
        for start in range(0, len(missing), self.encode_batch_size):
            batch = missing[start : start + self.encode_batch_size]
            encoded = self.encode_prompts_uncached(batch)
            for index, text in enumerate(batch):
                row = {name: value[index].detach().to("cpu").contiguous() for name, value in encoded.items()}
                if cache is not None:
                    cache.save(text, row)
                rows[text] = self._row_tokens(row)
        return rows

    def encode_prompts(self, prompts: Sequence[str], with_negative: bool | None = None) -> dict[str, Tensor]:
        """``P`` prompts → ``prompt_embeds [P, L, D]`` and ``prompt_embeds_mask [P, L]`` on :attr:`device`.

        ``L`` is the longest of the prompts (and of the negative prompt, with CFG), the others
        zero-padded and masked, as ``encode_prompt`` pads a batch. With ``prompt_cache_dir`` set,
        cached prompts are read back and the others encoded in batches of ``encode_batch_size`` and
        stored. The negative prompt (``with_negative``, default: CFG on) is encoded once and
        repeated per row as ``negative_prompt_embeds`` / ``negative_prompt_embeds_mask``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        negative = with_negative if with_negative is not None else self.uses_negative_prompt
        if negative and self.negative_prompt is None:
            raise ValueError(f"{type(self).__name__} has no negative prompt")
        rows = self._embedding_rows(prompts)
        negatives = None
        if negative:
            negative_row = self._embedding_rows([self.negative_prompt])[self.negative_prompt]
            negatives = [negative_row] * len(prompts)
        return self._text_conditioning([rows[p] for p in prompts], negatives)

    def _text_conditioning(self, rows: Sequence[Tensor], negatives: Sequence[Tensor] | None) -> dict[str, Tensor]:
        """Unpadded ``[n_i, D]`` rows (and negative rows) → the padded, masked conditioning tensors."""
        length = max(row.shape[0] for row in [*rows, *(negatives or [])])

        def stack(items: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
            embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in items])
            mask = torch.stack([torch.cat([torch.ones(r.shape[0]), torch.zeros(length - r.shape[0])]) for r in items])
            return embeds.to(self.device), mask.to(self.device)

        embeds, mask = stack(rows)
        out = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if negatives is not None:
            out["negative_prompt_embeds"], out["negative_prompt_embeds_mask"] = stack(negatives)
        return out

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, packed_latents: Tensor, height: int | None = None, width: int | None = None,
               batch_size: int | None = None) -> Tensor:
        """Packed latents ``[B, N, 64]`` → images ``[B, 3, H, W]`` float32 in ``[0, 1]``.

        As ``QwenImagePipeline``: unpack to a one-frame video latent, ``z·latents_std +
        latents_mean`` per channel, ``vae.decode``, frame 0, denormalise; ``batch_size`` (default
        ``decode_batch_size``) latents per VAE call.
        """
        from diffusers.image_processor import VaeImageProcessor

        config = self._require_vae().config
        if packed_latents.ndim != 3:
            raise ValueError(f"Qwen-Image latents are packed [B, N, C], got shape {tuple(packed_latents.shape)}")
        latent_h, latent_w = self.latent_size(height, width)
        mean, std = latent_statistics(config)
        inverse_std = 1.0 / std
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

        def vae_input(packed: Tensor) -> Tensor:
            z = unpack_latents(packed, latent_h, latent_w).unsqueeze(2)  # [B, C, 1, H, W]
            return z / inverse_std.to(z.device) + mean.to(z.device)  # the pipeline's own arithmetic

        return self._decode_batches(
            packed_latents, batch_size, vae_input=vae_input,
            postprocess=lambda video: processor.postprocess(video[:, :, 0], output_type="pt"),
        )


__all__ = [
    "QWEN_IMAGE_FILES",
    "QWEN_IMAGE_HUB_ID",
    "QWEN_IMAGE_LAYOUT",
    "QWEN_IMAGE_LAYOUT_TEXT",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "QwenImageAdapter",
    "QwenImageFilesNotFoundError",
    "QwenImageVelocity",
    "diffusers_qwenimage_sigmas",
    "image_tokens",
    "load_qwenimage_adapter",
    "pack_latents",
    "qwenimage_dynamic_shift",
    "qwenimage_encoder_config",
    "true_cfg",
    "unpack_latents",
]
