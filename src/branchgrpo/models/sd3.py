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
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from branchgrpo.models.loading import (
    ModelFilesNotFoundError,
    _dtype_kwarg,
    _looks_like_hub_id,
    is_offline,
    missing_files,
)
from branchgrpo.models.prompt_cache import (
    PreprocessReport,
    PromptEmbeddingCache,
    PromptNotCachedError,
    cached_encode,
    config_fingerprint,
    encoder_identity,
    preprocess_prompts,
    tokenizer_fingerprint,
)
from branchgrpo.models.protocol import Conditioning

SD35_MEDIUM_HUB_ID = "stabilityai/stable-diffusion-3.5-medium"
TIMESTEP_SCALE = 1000.0  # diffusers' FlowMatchEulerDiscreteScheduler: timestep = σ · num_train_timesteps
NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


def diffusers_sd3_sigmas(steps: int, shift: float = 3.0) -> Tensor:
    """The σ schedule ``StableDiffusion3Pipeline`` uses by default (no ``sigmas=`` given), ``[T + 1]``.

    SD3.5's scheduler (``FlowMatchEulerDiscreteScheduler(shift=3.0)``) spaces the unshifted grid
    from 1 to its shifted ``sigma_min = shift(1/1000)`` and shifts it again, then appends 0. That
    is *not* SPEC §2's ``sigma_schedule(T, shift)`` (``u = linspace(1, 0, T + 1)``): e.g. T = 10
    gives σ_9 = 0.0090 here versus 0.25 there. Flow-GRPO samples SD3.5 with this default
    (``retrieve_timesteps(..., sigmas=None)``). Returned as float64 for comparison.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


def spec_sigmas_for_pipeline(steps: int) -> np.ndarray:
    """``sigmas=`` for ``StableDiffusion3Pipeline(…)`` that make its scheduler's σ equal ``sigma_schedule``.

    The scheduler shifts what it is given, so pass the unshifted grid ``linspace(1, 1/T, T)``.
    """
    return np.linspace(1.0, 1.0 / steps, steps)


class SD3Velocity(torch.nn.Module):
    """``vθ(x, σ, c)`` of an ``SD3Transformer2DModel`` on latents ``[B, C, H, W]``, with CFG.

    Conditioning keys: ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, D']`` and, when
    ``guidance_scale > 1``, ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` of the
    same shapes. With guidance the transformer is called **once** on the doubled batch
    ``[x; x]`` with ``[negative; positive]`` embeddings (the pipeline's order) and the result is
    ``v_u + g·(v_c − v_u)``; with ``guidance_scale <= 1`` it is one plain call (no negatives needed).
    ``compute_dtype`` (e.g. bfloat16 on GPU) runs the transformer under autocast; outputs are float32.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        guidance_scale: float = 4.5,
        compute_dtype: torch.dtype | None = None,
        timestep_scale: float = TIMESTEP_SCALE,
    ):
        super().__init__()
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        self.compute_dtype = compute_dtype
        self.timestep_scale = float(timestep_scale)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0  # diffusers' do_classifier_free_guidance

    def _base_param(self) -> Tensor:
        # the dtype of the base weights (LoRA tensors may be float32 on a bf16 base)
        for name, param in self.transformer.named_parameters():
            if ".lora_" not in name:
                return param
        return next(self.transformer.parameters())

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        param = self._base_param()
        device = latents.device
        embeds = conditioning["prompt_embeds"].to(device)
        pooled = conditioning["pooled_prompt_embeds"].to(device)
        x = latents
        timestep = sigmas.to(device=device, dtype=torch.float32) * self.timestep_scale
        if self.uses_cfg:
            missing = [k for k in NEGATIVE_KEYS if k not in conditioning]
            if missing:
                raise KeyError(
                    f"guidance_scale={self.guidance_scale} > 1 needs {missing} in the conditioning "
                    "(SD3Adapter.encode_prompts returns them)"
                )
            embeds = torch.cat([conditioning["negative_prompt_embeds"].to(device), embeds], dim=0)
            pooled = torch.cat([conditioning["negative_pooled_prompt_embeds"].to(device), pooled], dim=0)
            x = torch.cat([latents, latents], dim=0)
            timestep = torch.cat([timestep, timestep], dim=0)
        dtype = self.compute_dtype or param.dtype
        autocast = (
            torch.autocast(device.type, dtype=dtype)
            if self.compute_dtype is not None and self.compute_dtype != torch.float32
            else nullcontext()
        )
        with autocast:
            out = self.transformer(
                hidden_states=x.to(param.dtype),
                timestep=timestep,
                encoder_hidden_states=embeds.to(param.dtype),
                pooled_projections=pooled.to(param.dtype),
                return_dict=False,
            )[0]
        out = out.float()
        if self.uses_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out


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
    return {
        "family": "sd3",
        "text_encoder": config_fingerprint(text_encoder_config),
        "text_encoder_2": config_fingerprint(text_encoder_2_config),
        "text_encoder_3": config_fingerprint(text_encoder_3_config) if text_encoder_3_config is not None else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_2": tokenizer_fingerprint(tokenizer_2),
        "tokenizer_3": tokenizer_fingerprint(tokenizer_3),
        "max_sequence_length": int(max_sequence_length),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _module_device(module: torch.nn.Module | None) -> torch.device | None:
    if module is None:
        return None
    param = next(module.parameters(), None)
    return param.device if param is not None else None


TextEncoders = tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]


class SD3Adapter:
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
        self.source = str(source)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt)
        self.height, self.width = int(height), int(width)
        self.compute_dtype = compute_dtype
        self.prompt_cache_dir = prompt_cache_dir
        self.encode_batch_size = int(encode_batch_size)
        self.decode_batch_size = int(decode_batch_size)
        self._device = torch.device(device) if device is not None else None
        self._text_encoder_loader = text_encoder_loader
        self._encoder_config = dict(encoder_config) if encoder_config is not None else None

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "SD3Adapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_sd3_adapter`."""
        return load_sd3_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    # -- devices and sizes ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where outputs go: the given device, else the transformer's, else a text encoder's, else CPU."""
        if self._device is not None:
            return self._device
        for module in (self.transformer, self.text_encoder_3, self.text_encoder, self.vae):
            found = _module_device(module)
            if found is not None:
                return found
        return torch.device("cpu")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD3), diffusers' ``2 ** (len(block_out_channels) − 1)``."""
        if self.vae is None:
            return 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size) if self.transformer is not None else 2

    @property
    def latent_channels(self) -> int:
        if self.transformer is not None:
            return int(self.transformer.config.in_channels)
        if self.vae is not None:
            return int(self.vae.config.latent_channels)
        return 16

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
        """The transformer as ``vθ(x, σ, c)`` with CFG (SPEC §1–2).

        Same arguments as ``FluxAdapter.velocity_model``; ``height``/``width`` are only checked
        (SD3 latents carry their size). ``guidance_scale``/``compute_dtype`` default to the
        adapter's; ``torch.float32`` = no autocast.
        """
        if self.transformer is None:
            raise ValueError("this SD3Adapter was built without a transformer (load it with load_transformer=True)")
        self.latent_size(height, width)
        compute_dtype = self.compute_dtype if compute_dtype is None else compute_dtype
        if compute_dtype == "auto":
            on_cuda = (_module_device(self.transformer) or torch.device("cpu")).type == "cuda"
            compute_dtype = torch.bfloat16 if on_cuda else None
        return SD3Velocity(
            self.transformer,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            compute_dtype=compute_dtype,
        )

    # -- prompts ----------------------------------------------------------------------------
    @property
    def encoder_config(self) -> dict[str, Any]:
        """:func:`sd3_encoder_config` of the text encoders (what the cache identity hashes)."""
        if self._encoder_config is not None:
            return {**self._encoder_config, "max_sequence_length": self.max_sequence_length}
        if self.text_encoder is not None and self.text_encoder_2 is not None:
            return sd3_encoder_config(
                self.text_encoder.config, self.text_encoder_2.config,
                self.text_encoder_3.config if self.text_encoder_3 is not None else None,
                self.tokenizer, self.tokenizer_2, self.tokenizer_3,
                self.max_sequence_length, self.text_encoder.dtype,
            )
        raise ValueError(
            "the prompt-cache identity needs the text encoders or their encoder_config "
            "(SD3Adapter.from_pretrained provides it)"
        )

    @property
    def encoder_identity(self) -> str:
        return encoder_identity(self.source, self.encoder_config)

    @property
    def encoder_description(self) -> dict[str, Any]:
        return {"source": self.source, "config": self.encoder_config}

    def prompt_cache(self, cache_dir: str | os.PathLike | None = None) -> PromptEmbeddingCache | None:
        """The cache for this encoder under ``cache_dir`` (default: ``prompt_cache_dir``), or None."""
        cache_dir = cache_dir if cache_dir is not None else self.prompt_cache_dir
        if cache_dir is None:
            return None
        return PromptEmbeddingCache(cache_dir, self.encoder_identity, self.encoder_description)

    def _encoders_loaded(self) -> bool:
        return self.text_encoder is not None and self.text_encoder_2 is not None

    def _ensure_text_encoders(self, missing: Sequence[str]) -> None:
        if self._encoders_loaded():
            return
        if self._text_encoder_loader is None:
            where = f" in the prompt cache {self.prompt_cache(None).directory}" if self.prompt_cache_dir else ""
            raise PromptNotCachedError(
                f"{len(missing)} prompt(s) have no embedding{where} and no text encoders are loaded "
                f"(first: {missing[0]!r}). Run `branchgrpo preprocess` on these prompts (and the negative "
                "prompt) first, or load the adapter with text_encoders='load' or 'lazy'."
            )
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = self._text_encoder_loader()

    def release_text_encoders(self) -> None:
        """Drop the text encoders (e.g. after preprocessing) so their memory can be reclaimed."""
        if self._encoders_loaded() and self._encoder_config is None:
            self._encoder_config = self.encoder_config
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None

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

    def encode_prompts(self, prompts: Sequence[str], with_negative: bool | None = None) -> dict[str, Tensor]:
        """``P`` prompts → embeddings with leading dim ``P`` (incl. negatives) on :attr:`device`.

        The negative prompt is encoded once (through the cache, like any prompt: its embedding is
        the positive-path embedding of the same text, as in ``encode_prompt``) and repeated per
        row. ``with_negative`` defaults to ``guidance_scale > 1``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        cache = self.prompt_cache()
        encoded = cached_encode(self, prompts, cache, self.encode_batch_size)
        out = {name: value.to(self.device) for name, value in encoded.items()}
        if with_negative if with_negative is not None else self.guidance_scale > 1.0:
            negative = cached_encode(self, [self.negative_prompt], cache, self.encode_batch_size)
            count = len(prompts)
            for name, value in negative.items():
                out[f"negative_{name}"] = value.to(self.device).expand(count, *value.shape[1:]).contiguous()
        return out

    def preprocess_prompts(self, prompts: Iterable[str], cache_dir: str | os.PathLike | None = None,
                           batch_size: int | None = None, progress=None) -> PreprocessReport:
        """Fill the prompt cache with ``prompts`` **and the negative prompt** (what training reads)."""
        cache_dir = cache_dir if cache_dir is not None else self.prompt_cache_dir
        if cache_dir is None:
            raise ValueError("preprocess_prompts needs a cache_dir (or the adapter's prompt_cache_dir)")
        return preprocess_prompts(self, [*prompts, self.negative_prompt], cache_dir,
                                  batch_size=batch_size or self.encode_batch_size, progress=progress)

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
        from diffusers.image_processor import VaeImageProcessor

        if self.vae is None:
            raise ValueError("this SD3Adapter was built without a VAE (load it with load_vae=True)")
        if latents.ndim != 4:
            raise ValueError(f"SD3 latents are [B, C, H, W], got shape {tuple(latents.shape)}")
        if height is not None or width is not None:
            expected = self.latent_size(height, width)
            if tuple(latents.shape[-2:]) != expected:
                raise ValueError(f"latents {tuple(latents.shape)} do not match a {height}x{width} image")
        batch_size = batch_size or self.decode_batch_size
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        vae_device, vae_dtype = _module_device(self.vae), self.vae.dtype
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        images = []
        for start in range(0, latents.shape[0], batch_size):
            z = latents[start : start + batch_size].float() / config.scaling_factor + shift
            image = self.vae.decode(z.to(device=vae_device, dtype=vae_dtype), return_dict=False)[0]
            images.append(processor.postprocess(image.float(), output_type="pt"))
        return torch.cat(images, dim=0)


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

SD3_LAYOUT: dict[str, tuple[tuple[str, ...], ...]] = {
    "transformer": (("config.json",), ("*.safetensors",)),
    "vae": (("config.json",), ("*.safetensors",)),
    "text_encoder": (("config.json",), ("*.safetensors",)),
    "text_encoder_2": (("config.json",), ("*.safetensors",)),
    "text_encoder_3": (("config.json",), ("*.safetensors",)),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "tokenizer_2": (("tokenizer.json", "vocab.json"),),
    "tokenizer_3": (("tokenizer.json", "spiece.model"),),
}

_SD3_DOWNLOAD_PATTERNS = ("model_index.json", "scheduler/*", "transformer/*", "vae/*", "text_encoder/*",
                          "text_encoder_2/*", "text_encoder_3/*", "tokenizer/*", "tokenizer_2/*", "tokenizer_3/*")

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
                 detail: str | None = None):
        self.location = location
        self.missing = list(missing)
        self.hub_id = hub_id
        lines = [f"Stable Diffusion 3 weights not found at {location!r}."]
        if self.missing:
            lines.append("Missing: " + "; ".join(self.missing) + ".")
        if detail:
            lines.append(f"({detail})")
        target = location if not _looks_like_hub_id(location) or os.path.isabs(location) else "/path/to/sd3.5-medium"
        include = " ".join(f"--include '{pattern}'" for pattern in _SD3_DOWNLOAD_PATTERNS)
        lines += [
            f"Download {hub_id} (gated: accept its licence on https://huggingface.co/{hub_id} and run "
            "`hf auth login` first), only the diffusers subfolders:",
            f"    hf download {hub_id} --local-dir {target} {include}",
            "and pass that folder as the model path. Expected layout:",
            SD3_LAYOUT_TEXT,
        ]
        FileNotFoundError.__init__(self, "\n".join(lines))


def _resolve(path_or_hub_id: str, local_files_only: bool | None) -> tuple[str, bool]:
    """``(location, is_local_folder)``; an offline hub id becomes its cached snapshot folder."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists() or not _looks_like_hub_id(path_or_hub_id):
        return str(path.resolve()), True
    if not (local_files_only or (local_files_only is None and is_offline())):
        return path_or_hub_id, False
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_hub_id, local_files_only=True), True
    except Exception as err:  # noqa: BLE001 - any hub failure means "not downloaded"
        raise SD3FilesNotFoundError(
            path_or_hub_id, ["the whole model (not in the local hub cache; offline)"],
            detail=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
        ) from None


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
    from huggingface_hub.errors import EntryNotFoundError
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    if text_encoders not in ("load", "lazy", "none"):
        raise ValueError(f"text_encoders must be 'load', 'lazy' or 'none', got {text_encoders!r}")
    requested = str(path_or_hub_id)
    location, is_local = _resolve(requested, local_files_only)
    needed = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]
    needed += ["tokenizer_3", "text_encoder_3"] * load_t5
    needed += ["transformer"] * load_transformer + ["vae"] * load_vae
    if is_local:
        absent = missing_files(location, needed, layout=SD3_LAYOUT)
        if absent:
            raise SD3FilesNotFoundError(location if Path(requested).expanduser().exists() else requested, absent)
    common: dict[str, Any] = {"local_files_only": True} if is_local else {"local_files_only": bool(local_files_only)}
    if revision is not None:
        common["revision"] = revision
    weights = {**common, "use_safetensors": True}
    device = torch.device(device) if device is not None else None

    def place(module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(device) if device is not None else module
        return module.eval().requires_grad_(False)

    def load_text_encoders() -> TextEncoders:
        te = CLIPTextModelWithProjection.from_pretrained(location, subfolder="text_encoder", **weights, **_dtype_kwarg(dtype))
        te2 = CLIPTextModelWithProjection.from_pretrained(location, subfolder="text_encoder_2", **weights,
                                                          **_dtype_kwarg(dtype))
        te3 = (T5EncoderModel.from_pretrained(location, subfolder="text_encoder_3", **weights, **_dtype_kwarg(dtype))
               if load_t5 else None)
        return place(te), place(te2), (place(te3) if te3 is not None else None)

    try:
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **common)
        tokenizer_2 = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer_2", **common)
        tokenizer_3 = T5TokenizerFast.from_pretrained(location, subfolder="tokenizer_3", **common) if load_t5 else None
        configs = [
            CLIPTextConfig.from_pretrained(location, subfolder="text_encoder", **common),
            CLIPTextConfig.from_pretrained(location, subfolder="text_encoder_2", **common),
            T5Config.from_pretrained(location, subfolder="text_encoder_3", **common) if load_t5 else None,
        ]
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 256)
        encoder_config = sd3_encoder_config(*configs, tokenizer, tokenizer_2, tokenizer_3, max_sequence_length, dtype)
        text_encoder = text_encoder_2 = text_encoder_3 = None
        if text_encoders == "load":
            text_encoder, text_encoder_2, text_encoder_3 = load_text_encoders()
        transformer = vae = None
        if load_transformer:
            transformer = place(SD3Transformer2DModel.from_pretrained(
                location, subfolder="transformer", torch_dtype=dtype, **weights))
        if load_vae:
            vae = place(AutoencoderKL.from_pretrained(
                location, subfolder="vae", torch_dtype=vae_dtype or dtype, **weights))
    except (OSError, EntryNotFoundError) as err:
        if isinstance(err, ModelFilesNotFoundError):
            raise
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SD3FilesNotFoundError(requested, needed if not is_local else [],
                                    detail=f"{type(err).__name__}: {first_line}") from None
    return SD3Adapter(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        source=location if Path(requested).expanduser().exists() else requested,
        max_sequence_length=max_sequence_length,
        device=device,
        text_encoder_loader=load_text_encoders if text_encoders == "lazy" else None,
        encoder_config=encoder_config,
        **adapter_kwargs,
    )


__all__ = [
    "SD35_MEDIUM_HUB_ID",
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
