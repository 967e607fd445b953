"""Qwen-Image adapter: the velocity call of a diffusers ``QwenImageTransformer2DModel`` with Qwen's
true classifier-free guidance behind the :class:`~branchgrpo.models.protocol.VelocityModel`
protocol, and :class:`QwenImageAdapter` (the Qwen2.5-VL text encoder with the on-disk prompt cache,
``AutoencoderKLQwenImage`` decoding, loading).

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

import math
import os
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, GuidedVelocity, autocast_context, latent_statistics
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.flux import pack_latents, unpack_latents
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns
from branchgrpo.models.prompt_cache import PromptEmbeddingCache
from branchgrpo.models.protocol import Conditioning

QWEN_IMAGE_HUB_ID = "Qwen/Qwen-Image"
MAX_SEQUENCE_LENGTH_LIMIT = 1024  # QwenImagePipeline.check_inputs refuses more

# Qwen/Qwen-Image scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
QWEN_IMAGE_SCHEDULER_CONFIG: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


def image_tokens(height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Packed latent tokens of a ``height × width`` image (``QwenImagePipeline``'s ``image_seq_len``)."""
    return (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))


def qwenimage_dynamic_shift(height: int, width: int, vae_scale_factor: int = 8,
                            scheduler_config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER_CONFIG) -> float:
    """The ``shift`` of Qwen-Image's resolution-dependent schedule at ``height × width``: ``e^μ``.

    ``μ`` is the pipeline's ``calculate_shift`` of the packed token count with the scheduler's
    anchors (``base_shift``/``max_shift`` at ``base_image_seq_len``/``max_image_seq_len``, not
    clamped); the exponential time shift ``e^μ / (e^μ + 1/σ − 1)`` is docs/method.md §2's with
    ``shift = e^μ``: 2.00 at 1024², 2.30 at 1328² (the model card's 1:1 size).
    """
    return math.exp(_mu(height, width, vae_scale_factor, scheduler_config))


def _mu(height: int, width: int, vae_scale_factor: int, scheduler_config: Mapping[str, Any]) -> float:
    """``QwenImagePipeline``'s ``μ = calculate_shift(image_seq_len, ...)`` with the scheduler's anchors."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    return calculate_shift(
        image_tokens(height, width, vae_scale_factor),
        scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15),
    )


def diffusers_qwenimage_sigmas(steps: int, height: int, width: int, vae_scale_factor: int = 8,
                               scheduler_config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER_CONFIG) -> Tensor:
    """The σ grid ``QwenImagePipeline`` samples on by default (``[T + 1]``, float64), for comparison.

    It is ``sigma_schedule(T, qwenimage_dynamic_shift(h, w))`` stretched so that the last σ before 0
    is ``shift_terminal`` (0.02): ``σ' = 1 − (1 − σ)·(1 − 0.02)/(1 − σ_{T−1})``. Our trees keep
    ``sigma_schedule`` (the stretch would move every σ but the first).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**dict(scheduler_config))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps),
                            mu=_mu(height, width, vae_scale_factor, scheduler_config))
    return scheduler.sigmas.double()


def true_cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Qwen-Image's guided prediction: ``c = u + g·(v − u)`` rescaled to ``‖v‖`` over the last axis.

    ``QwenImagePipeline``'s ``comb_pred * (‖noise_pred‖ / ‖comb_pred‖)`` with norms over the
    packed channels of each token (``dim=-1``), so every token keeps the conditional magnitude.
    """
    combined = uncond + scale * (cond - uncond)
    return combined * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                       / torch.linalg.vector_norm(combined, dim=-1, keepdim=True))


def pad_text(embeds: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``[B, L, D]`` embeddings and their ``[B, L]`` mask to ``length`` tokens."""
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {embeds.shape[1]} tokens to {length}")
    if extra == 0:
        return embeds, mask
    return (torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


def trim_text(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing tokens that no row attends to (they change nothing: the transformer masks
    them out of every attention and the text RoPE positions of the others do not move)."""
    used = mask.bool().any(dim=0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return embeds[:, :length], mask[:, :length]


class QwenImageVelocity(GuidedVelocity):
    """``vθ(x, σ, c)`` of a ``QwenImageTransformer2DModel`` on packed latents ``[B, N, 64]``, with true CFG.

    Conditioning keys: ``prompt_embeds [B, L, D]``, ``prompt_embeds_mask [B, L]`` (1 = token,
    0 = padding) and, when ``guidance_scale > 1``, ``negative_prompt_embeds`` /
    ``negative_prompt_embeds_mask``. With guidance the transformer is called **once** on ``[x; x]``
    with ``[negative; positive]`` texts padded to one length, and the result is :func:`true_cfg`
    (the pipeline's norm-preserving mix); ``guidance_scale <= 1`` is one plain call. Trailing
    padding that no row uses is dropped first, and an all-ones mask is passed as ``None`` (as the
    pipeline does). Timestep ``σ`` (float32); outputs float32.
    """

    transformer_inputs = {"prompt_embeds": "encoder_hidden_states", "prompt_embeds_mask": "encoder_hidden_states_mask"}
    default_guidance_scale = 4.0  # the model card's true_cfg_scale
    adapter_name = "QwenImageAdapter"

    def __init__(self, transformer: torch.nn.Module, latent_height: int, latent_width: int,
                 guidance_scale: float | None = None, compute_dtype: torch.dtype | None = None):
        if getattr(transformer.config, "guidance_embeds", False):
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported; "
                             "Qwen-Image uses true classifier-free guidance")
        super().__init__(transformer, guidance_scale, compute_dtype, timestep_scale=1.0)
        self.latent_height, self.latent_width = int(latent_height), int(latent_width)

    def _image_tokens(self, x: Tensor, conditioning: Conditioning, doubled: bool) -> tuple[Tensor, list]:
        """The transformer's image-stream input for latents ``x`` (``[x; x]`` when ``doubled``) and its
        ``img_shapes`` (the packed grid per row, for RoPE)."""
        return x, [[(1, self.latent_height // 2, self.latent_width // 2)]] * x.shape[0]

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        param = self._base_param()
        device = latents.device
        embeds = conditioning["prompt_embeds"].to(device)
        mask = conditioning["prompt_embeds_mask"].to(device)
        x = latents
        timestep = sigmas.to(device=device, dtype=torch.float32) * self.timestep_scale
        if self.uses_cfg:
            self._require_negatives(conditioning)
            negative = conditioning["negative_prompt_embeds"].to(device)
            negative_mask = conditioning["negative_prompt_embeds_mask"].to(device)
            length = max(embeds.shape[1], negative.shape[1])
            negative, negative_mask = pad_text(negative, negative_mask, length)
            embeds, mask = pad_text(embeds, mask, length)
            embeds, mask = torch.cat([negative, embeds], dim=0), torch.cat([negative_mask, mask], dim=0)
            x = torch.cat([latents, latents], dim=0)
            timestep = torch.cat([timestep, timestep], dim=0)
        embeds, mask = trim_text(embeds, mask)
        attention_mask = None if bool(mask.bool().all()) else mask.bool()
        hidden, img_shapes = self._image_tokens(x, conditioning, doubled=self.uses_cfg)
        with autocast_context(device, self.compute_dtype):
            out = self.transformer(
                hidden_states=hidden.to(param.dtype), timestep=timestep, encoder_hidden_states=embeds.to(param.dtype),
                encoder_hidden_states_mask=attention_mask, img_shapes=img_shapes, return_dict=False,
            )[0]
        out = out[:, : latents.shape[1]].float()  # the generated image's tokens (an edit model appends others)
        return self._guide(*out.chunk(2)) if self.uses_cfg else out

    def _guide(self, uncond: Tensor, cond: Tensor) -> Tensor:
        return true_cfg(cond, uncond, self.guidance_scale)


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


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

QWEN_IMAGE_LAYOUT = diffusers_layout(["transformer", "vae", "text_encoder"],
                                     {"tokenizer": ("tokenizer.json", "vocab.json")})

QWEN_IMAGE_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    scheduler/        scheduler_config.json         (FlowMatchEulerDiscreteScheduler, dynamic shift; not used)
    transformer/      config.json, diffusion_pytorch_model-000{01..09}-of-00009.safetensors,
                      diffusion_pytorch_model.safetensors.index.json       (QwenImageTransformer2DModel)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKLQwenImage)
    text_encoder/     config.json, model-0000{1..4}-of-00004.safetensors,
                      model.safetensors.index.json                         (Qwen2.5-VL-7B-Instruct)
    tokenizer/        vocab.json, merges.txt, tokenizer_config.json, ...   (Qwen2Tokenizer)"""


class QwenImageFilesNotFoundError(ModelFilesNotFoundError):
    """Qwen-Image weights or configs are missing (a ``ModelFilesNotFoundError``; its family is
    :data:`QWEN_IMAGE_FILES`)."""


QWEN_IMAGE_FILES = ModelFiles(
    title="Qwen-Image", hub_id=QWEN_IMAGE_HUB_ID, layout=QWEN_IMAGE_LAYOUT, layout_text=QWEN_IMAGE_LAYOUT_TEXT,
    download_patterns=download_patterns(QWEN_IMAGE_LAYOUT), placeholder="/path/to/Qwen-Image",
    gated=False, error_class=QwenImageFilesNotFoundError,
)


def load_qwenimage_adapter(
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
) -> QwenImageAdapter:
    """Build a :class:`QwenImageAdapter` from pretrained Qwen-Image weights (diffusers layout).

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``QWEN_IMAGE_LAYOUT_TEXT``) or the hub id
            ``Qwen/Qwen-Image``.
        dtype: weights dtype of the transformer and the Qwen2.5-VL encoder.
        vae_dtype: VAE weights dtype (float32 by default).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (config and
            tokenizer are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need.
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to :class:`QwenImageAdapter` (guidance_scale, negative_prompt, height, …).
    Raises:
        QwenImageFilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    needed = ["tokenizer", "text_encoder"] + ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, QWEN_IMAGE_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(Qwen2Tokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = qwenimage_encoder_config(folder.config(Qwen2_5_VLConfig, "text_encoder"), tokenizer,
                                                  max_sequence_length, dtype)
    return build_adapter(
        folder, QwenImageAdapter, dtype=dtype, text_encoders={"text_encoder": Qwen2_5_VLForConditionalGeneration},
        models={"transformer": (QwenImageTransformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKLQwenImage, vae_dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer, **adapter_kwargs,
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
