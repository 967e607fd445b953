"""What the FLUX, SD3 and Wan adapters share, so each family file holds only its conventions.

- :func:`text_encoder_config` — the prompt-cache fingerprint of a family's text encoders;
- :class:`GuidedVelocity` — ``vθ(x, σ, c)`` of a transformer that takes ``timestep = 1000·σ``,
  with classifier-free guidance as **one** call on the doubled batch (SD3, Wan);
- :class:`DiffusersAdapter` — device placement, the prompt-cache identity, lazily loaded text
  encoders, negative-prompt rows and batched VAE decoding.

A family subclasses both and adds its latent layout, ``encode_prompts_uncached`` (through the
diffusers pipeline's own ``encode_prompt``), ``velocity_model`` and ``decode`` (docs/adapters.md).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

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

TIMESTEP_SCALE = 1000.0  # diffusers' FlowMatchEulerDiscreteScheduler: timestep = σ · num_train_timesteps


def spec_sigmas_for_pipeline(steps: int) -> np.ndarray:
    """``sigmas=`` for a diffusers flow-matching pipeline that make its scheduler's σ equal ``sigma_schedule``.

    ``FlowMatchEulerDiscreteScheduler`` shifts what it is given, so pass the unshifted grid
    ``linspace(1, 1/T, T)`` (docs/method.md §2's ``u`` without the final 0, which the scheduler appends).
    """
    return np.linspace(1.0, 1.0 / steps, steps)


def module_device(module: torch.nn.Module | None) -> torch.device | None:
    """Device of a module's first parameter (None for no module or no parameters)."""
    if module is None:
        return None
    param = next(module.parameters(), None)
    return param.device if param is not None else None


def text_encoder_config(
    family: str,
    configs: Mapping[str, Any],
    tokenizers: Mapping[str, Any],
    max_sequence_length: int,
    dtype: torch.dtype | str,
) -> dict[str, Any]:
    """Everything that changes a family's prompt embeddings, hashed into the cache's encoder identity.

    ``configs``: ``{attribute: transformers config or None}``; ``tokenizers``: ``{attribute: tokenizer or None}``.
    """
    return {
        "family": family,
        **{name: config_fingerprint(config) if config is not None else None for name, config in configs.items()},
        **{name: tokenizer_fingerprint(tokenizer) for name, tokenizer in tokenizers.items()},
        "max_sequence_length": int(max_sequence_length),
        "dtype": str(dtype).replace("torch.", ""),
    }


def resolve_compute_dtype(compute_dtype: torch.dtype | str | None, transformer: torch.nn.Module) -> torch.dtype | None:
    """``"auto"`` → bfloat16 autocast on CUDA, none on CPU; anything else unchanged."""
    if compute_dtype == "auto":
        on_cuda = (module_device(transformer) or torch.device("cpu")).type == "cuda"
        return torch.bfloat16 if on_cuda else None
    return compute_dtype


def autocast_context(device: torch.device, compute_dtype: torch.dtype | None):
    """Autocast to ``compute_dtype`` (None or float32: none)."""
    if compute_dtype is not None and compute_dtype != torch.float32:
        return torch.autocast(device.type, dtype=compute_dtype)
    return nullcontext()


class GuidedVelocity(torch.nn.Module):
    """``vθ(x, σ, c)`` with classifier-free guidance in one batched transformer call.

    Conditioning keys: :attr:`condition_keys` (``[B, ...]`` each) and, when ``guidance_scale > 1``,
    the same keys prefixed ``negative_``. With guidance the transformer is called **once** on the
    doubled batch ``[x; x]`` with ``[negative; positive]`` conditioning (the diffusers pipelines'
    order) and the result is ``v_u + g·(v_c − v_u)``; with ``guidance_scale <= 1`` it is one plain
    call (no negatives needed). The transformer gets ``timestep = timestep_scale·σ`` (float32).
    ``compute_dtype`` (e.g. bfloat16 on GPU) runs it under autocast; outputs are float32.
    A family only says which conditioning key feeds which transformer argument
    (:attr:`transformer_inputs`), its default guidance and the adapter that makes the conditioning.
    """

    transformer_inputs: ClassVar[Mapping[str, str]] = {"prompt_embeds": "encoder_hidden_states"}
    default_guidance_scale: ClassVar[float] = 4.5
    adapter_name: ClassVar[str] = "the adapter"

    def __init__(
        self,
        transformer: torch.nn.Module,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | None = None,
        timestep_scale: float = TIMESTEP_SCALE,
    ):
        super().__init__()
        self.transformer = transformer
        self.guidance_scale = float(self.default_guidance_scale if guidance_scale is None else guidance_scale)
        self.compute_dtype = compute_dtype
        self.timestep_scale = float(timestep_scale)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0  # diffusers' do_classifier_free_guidance

    @property
    def condition_keys(self) -> tuple[str, ...]:
        return tuple(self.transformer_inputs)

    @property
    def negative_keys(self) -> tuple[str, ...]:
        return tuple(f"negative_{key}" for key in self.condition_keys)

    def _base_param(self) -> Tensor:
        # the dtype of the base weights (LoRA tensors may be float32 on a bf16 base)
        for name, param in self.transformer.named_parameters():
            if ".lora_" not in name:
                return param
        return next(self.transformer.parameters())

    def _require_negatives(self, conditioning: Conditioning) -> None:
        """Under CFG: a ``KeyError`` naming the ``negative_*`` keys that ``conditioning`` lacks."""
        missing = [key for key in self.negative_keys if key not in conditioning]
        if missing:
            raise KeyError(
                f"guidance_scale={self.guidance_scale} > 1 needs {missing} in the conditioning "
                f"({self.adapter_name}.encode_prompts returns them)"
            )

    def _guide(self, uncond: Tensor, cond: Tensor) -> Tensor:
        """The guided velocity from the two halves of the doubled call: ``v_u + g·(v_c − v_u)``."""
        return uncond + self.guidance_scale * (cond - uncond)

    def _extra_inputs(self, x: Tensor, inputs: Mapping[str, Tensor]) -> dict[str, Any]:
        """More transformer arguments for the call on ``x`` (e.g. position ids); ``inputs``: the text ones."""
        return {}

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        param = self._base_param()
        device = latents.device
        embeds = {key: conditioning[key].to(device) for key in self.condition_keys}
        x = latents
        timestep = sigmas.to(device=device, dtype=torch.float32) * self.timestep_scale
        if self.uses_cfg:
            self._require_negatives(conditioning)
            embeds = {key: torch.cat([conditioning[f"negative_{key}"].to(device), value], dim=0)
                      for key, value in embeds.items()}
            x = torch.cat([latents, latents], dim=0)
            timestep = torch.cat([timestep, timestep], dim=0)
        inputs = {self.transformer_inputs[key]: value.to(param.dtype) for key, value in embeds.items()}
        inputs.update(self._extra_inputs(x, inputs))
        with autocast_context(device, self.compute_dtype):
            out = self.transformer(hidden_states=x.to(param.dtype), timestep=timestep, **inputs, return_dict=False)[0]
        out = out.float()
        if self.uses_cfg:
            out = self._guide(*out.chunk(2))
        return out


class DiffusersAdapter:
    """The family-independent half of an adapter (FLUX, SD3, Wan).

    A subclass sets the class attributes below, stores its modules (``transformer``, ``vae``, the
    text encoders and tokenizers named by :attr:`text_encoder_names` / :attr:`tokenizer_names`),
    calls :meth:`_init_common` and implements ``encode_prompts_uncached``, ``velocity_model``,
    ``latent_shape`` and ``decode``. Text encoders may be absent: every prompt then comes from the
    on-disk cache, or ``text_encoder_loader`` loads them on the first miss.
    """

    family: ClassVar[str]  # part of the prompt-cache identity
    text_encoder_names: ClassVar[tuple[str, ...]]  # attributes, in the order text_encoder_loader returns them
    tokenizer_names: ClassVar[tuple[str, ...]]
    required_text_encoders: ClassVar[int]  # the first N must be loaded to encode (SD3's T5 is optional)
    dtype_text_encoder: ClassVar[str]  # whose dtype the cache identity records
    device_modules: ClassVar[tuple[str, ...]]  # where :attr:`device` looks, in order

    negative_prompt: str | None = None  # None: the family has no negative prompt (no CFG)
    guidance_scale: float = 1.0
    transformer: torch.nn.Module | None
    vae: torch.nn.Module | None

    def _init_common(
        self,
        *,
        source: str,
        max_sequence_length: int,
        compute_dtype: torch.dtype | str | None,
        prompt_cache_dir: str | os.PathLike | None,
        encode_batch_size: int,
        decode_batch_size: int,
        device: torch.device | str | None,
        text_encoder_loader: Callable[[], tuple] | None,
        encoder_config: Mapping[str, Any] | None,
    ) -> None:
        self.source = str(source)
        self.max_sequence_length = int(max_sequence_length)
        self.compute_dtype = compute_dtype
        self.prompt_cache_dir = prompt_cache_dir
        self.encode_batch_size = int(encode_batch_size)
        self.decode_batch_size = int(decode_batch_size)
        self._device = torch.device(device) if device is not None else None
        self._text_encoder_loader = text_encoder_loader
        self._encoder_config = dict(encoder_config) if encoder_config is not None else None

    # -- devices ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where outputs go: the given device, else that of the first loaded :attr:`device_modules`, else CPU."""
        if self._device is not None:
            return self._device
        for name in self.device_modules:
            found = module_device(getattr(self, name))
            if found is not None:
                return found
        return torch.device("cpu")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for FLUX and SD3), diffusers' ``2 ** (len(block_out_channels) − 1)``."""
        if self.vae is None:
            return 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _transformer_channels(self, vae_field: str, default: int, per_vae_channel: int = 1) -> int:
        """Channels of the transformer's input: its ``in_channels``, else ``per_vae_channel ×`` the VAE
        config's ``vae_field`` (4 where 2×2 patches are packed into channels), else ``default``."""
        if self.transformer is not None:
            return int(self.transformer.config.in_channels)
        if self.vae is not None:
            return per_vae_channel * int(getattr(self.vae.config, vae_field))
        return default

    def _require_transformer(self) -> torch.nn.Module:
        if self.transformer is None:
            raise ValueError(
                f"this {type(self).__name__} was built without a transformer (load it with load_transformer=True)"
            )
        return self.transformer

    def _require_vae(self) -> torch.nn.Module:
        if self.vae is None:
            raise ValueError(f"this {type(self).__name__} was built without a VAE (load it with load_vae=True)")
        return self.vae

    def _compute_dtype(self, compute_dtype: torch.dtype | str | None) -> torch.dtype | None:
        """The velocity model's autocast dtype: the argument, else the adapter's, ``"auto"`` resolved."""
        return resolve_compute_dtype(self.compute_dtype if compute_dtype is None else compute_dtype, self.transformer)

    def _velocity_options(self, guidance_scale: float | None, compute_dtype: torch.dtype | str | None
                          ) -> dict[str, Any]:
        """``guidance_scale`` and ``compute_dtype`` of a velocity model: the arguments, else the adapter's."""
        return {"guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
                "compute_dtype": self._compute_dtype(compute_dtype)}

    # -- the prompt cache ---------------------------------------------------------------------
    def _encoders_loaded(self) -> bool:
        required = self.text_encoder_names[: self.required_text_encoders]
        return all(getattr(self, name) is not None for name in required)

    @property
    def encoder_config(self) -> dict[str, Any]:
        """The text encoders' :func:`text_encoder_config` (what the cache identity hashes)."""
        if self._encoder_config is not None:  # fixed at load time, so lazy loading never moves the cache
            return {**self._encoder_config, "max_sequence_length": self.max_sequence_length}
        if self._encoders_loaded():
            encoders = {name: getattr(self, name) for name in self.text_encoder_names}
            return text_encoder_config(
                self.family,
                {name: module.config if module is not None else None for name, module in encoders.items()},
                {name: getattr(self, name) for name in self.tokenizer_names},
                self.max_sequence_length,
                encoders[self.dtype_text_encoder].dtype,
            )
        raise ValueError(
            "the prompt-cache identity needs the text encoders or their encoder_config "
            f"({type(self).__name__}.from_pretrained provides it)"
        )

    @property
    def encoder_identity(self) -> str:
        """Cache folder name: ``source`` + hash of :attr:`encoder_config`."""
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

    def _ensure_text_encoders(self, missing: Sequence[str]) -> None:
        if self._encoders_loaded():
            return
        if self._text_encoder_loader is None:
            where = f" in the prompt cache {self.prompt_cache(None).directory}" if self.prompt_cache_dir else ""
            negative = " (and the negative prompt)" if self.negative_prompt is not None else ""
            raise PromptNotCachedError(
                f"{len(missing)} prompt(s) have no embedding{where} and no text encoders are loaded "
                f"(first: {missing[0]!r}). Run `branchgrpo preprocess` on these prompts{negative} first, or load "
                "the adapter with text_encoders='load' or 'lazy'."
            )
        for name, module in zip(self.text_encoder_names, self._text_encoder_loader()):
            setattr(self, name, module)

    def release_text_encoders(self) -> None:
        """Drop the text encoders (e.g. after preprocessing) so their memory can be reclaimed."""
        if self._encoders_loaded() and self._encoder_config is None:
            self._encoder_config = self.encoder_config
        for name in self.text_encoder_names:
            setattr(self, name, None)

    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def uses_negative_prompt(self) -> bool:
        """Whether :meth:`encode_prompts` adds negative rows by default (CFG on: ``guidance_scale > 1``)."""
        return self.negative_prompt is not None and self.guidance_scale > 1.0

    def encode_prompts(self, prompts: Sequence[str], with_negative: bool | None = None) -> dict[str, Tensor]:
        """``P`` prompts → embeddings with leading dim ``P`` on :attr:`device`.

        With ``prompt_cache_dir`` set, cached prompts are read back and the others encoded in
        batches of ``encode_batch_size`` and stored (text encoders load only on a miss). The
        negative prompt (CFG families) is encoded once — through the cache, like any prompt: its
        embedding is the positive-path embedding of the same text, as in the pipelines'
        ``encode_prompt`` — and repeated per row as ``negative_<key>``. ``with_negative`` defaults
        to :attr:`uses_negative_prompt`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        cache = self.prompt_cache()
        encoded = cached_encode(self, prompts, cache, self.encode_batch_size)
        out = {name: value.to(self.device) for name, value in encoded.items()}
        if with_negative if with_negative is not None else self.uses_negative_prompt:
            if self.negative_prompt is None:
                raise ValueError(f"{type(self).__name__} has no negative prompt (its family uses no CFG)")
            negative = cached_encode(self, [self.negative_prompt], cache, self.encode_batch_size)
            for name, value in negative.items():
                out[f"negative_{name}"] = value.to(self.device).expand(len(prompts), *value.shape[1:]).contiguous()
        return out

    def preprocess_prompts(self, prompts: Iterable[str], cache_dir: str | os.PathLike | None = None,
                           batch_size: int | None = None, progress=None) -> PreprocessReport:
        """Fill the prompt cache with ``prompts`` and the negative prompt, if any (what training reads)."""
        cache_dir = cache_dir if cache_dir is not None else self.prompt_cache_dir
        if cache_dir is None:
            raise ValueError("preprocess_prompts needs a cache_dir (or the adapter's prompt_cache_dir)")
        extra = [self.negative_prompt] if self.negative_prompt is not None else []
        return preprocess_prompts(self, [*prompts, *extra], cache_dir,
                                  batch_size=batch_size or self.encode_batch_size, progress=progress)

    # -- decoding -----------------------------------------------------------------------------
    def _decode_batches(
        self,
        latents: Tensor,
        batch_size: int | None,
        vae_input: Callable[[Tensor], Tensor],
        postprocess: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """``vae.decode`` over ``batch_size`` (default ``decode_batch_size``) latents per call.

        ``vae_input`` maps float32 latents to what the VAE decodes (unpacking, scaling), and
        ``postprocess`` its float32 output to ``[0, 1]``; the VAE runs in its own device and dtype.
        """
        vae = self._require_vae()
        batch_size = batch_size or self.decode_batch_size
        vae_device, vae_dtype = module_device(vae), vae.dtype
        outputs = []
        for start in range(0, latents.shape[0], batch_size):
            z = vae_input(latents[start : start + batch_size].float())
            decoded = vae.decode(z.to(device=vae_device, dtype=vae_dtype), return_dict=False)[0]
            outputs.append(postprocess(decoded.float()))
        return torch.cat(outputs, dim=0)

    def _decode_scaled(self, latents: Tensor, batch_size: int | None, processor_scale: int,
                       unpack: Callable[[Tensor], Tensor] = lambda z: z) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from a VAE that decodes ``unpack(z) / scaling_factor +
        shift_factor`` (FLUX.1, SD3, Z-Image), denormalised by a ``VaeImageProcessor(processor_scale)``."""
        from diffusers.image_processor import VaeImageProcessor

        config = self._require_vae().config
        shift = getattr(config, "shift_factor", None) or 0.0
        processor = VaeImageProcessor(vae_scale_factor=processor_scale)
        return self._decode_batches(
            latents, batch_size,
            vae_input=lambda z: unpack(z) / config.scaling_factor + shift,
            postprocess=lambda image: processor.postprocess(image, output_type="pt"),
        )

    def _check_latent_size(self, latents: Tensor, height: int | None, width: int | None) -> None:
        """A ``ValueError`` when ``height``/``width`` (pixels, if given) do not match the latents' last two axes."""
        if height is not None or width is not None:
            if tuple(latents.shape[-2:]) != tuple(self.latent_size(height, width)):
                raise ValueError(f"latents {tuple(latents.shape)} do not match a {height}x{width} image")


def latent_statistics(config: Any, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """A video VAE's per-channel ``latents_mean`` and ``latents_std`` (Wan, Qwen-Image), float32 ``[1, C, 1, 1, 1]``."""
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=device).view(shape)
    std = torch.tensor(config.latents_std, dtype=torch.float32, device=device).view(shape)
    return mean, std


__all__ = [
    "DiffusersAdapter",
    "GuidedVelocity",
    "TIMESTEP_SCALE",
    "autocast_context",
    "latent_statistics",
    "module_device",
    "resolve_compute_dtype",
    "spec_sigmas_for_pipeline",
    "text_encoder_config",
]
