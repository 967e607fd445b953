"""FLUX.2 adapter ([dev] and [klein]): latent packing, 4-axis position ids, the velocity call of a
diffusers ``Flux2Transformer2DModel`` behind the :class:`~branchgrpo.models.protocol.VelocityModel`
protocol, and :class:`Flux2Adapter` (one LLM text encoder with an on-disk prompt cache, VAE
decoding, loading).

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

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, GuidedVelocity, module_device
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns

FLUX2_DEV_HUB_ID = "black-forest-labs/FLUX.2-dev"
FLUX2_KLEIN_HUB_ID = "black-forest-labs/FLUX.2-klein-base-4B"
Variant = Literal["dev", "klein"]
VARIANTS: tuple[str, ...] = ("dev", "klein")
PIPELINE_CLASSES = {"dev": "Flux2Pipeline", "klein": "Flux2KleinPipeline"}
TEXT_ENCODER_OUT_LAYERS = {"dev": (10, 20, 30), "klein": (9, 18, 27)}  # the pipelines' defaults


# --------------------------------------------------------------------------------------------
# Latent layout and position ids (Flux2Pipeline's static helpers, as plain functions).
# --------------------------------------------------------------------------------------------

def patchify_latents(latents: Tensor) -> Tensor:
    """VAE latents ``[B, C, H, W]`` → ``[B, 4C, H/2, W/2]`` (``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.2 latents need even height and width, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify_latents(latents: Tensor) -> Tensor:
    """``[B, 4C, h, w]`` → VAE latents ``[B, C, 2h, 2w]`` (``Flux2Pipeline._unpatchify_latents``)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def pack_latents(latents: Tensor) -> Tensor:
    """Patchified ``[B, C', h, w]`` → tokens ``[B, h·w, C']``, row-major (``Flux2Pipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Tokens ``[B, h·w, C']`` → ``[B, C', h, w]`` for a patch grid of ``height × width``."""
    b, n, c = packed.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not match a {height}x{width} patch grid")
    return packed.permute(0, 2, 1).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None) -> Tensor:
    """Position ids ``[h·w, 4]`` of the image tokens: ``(t, h, w, l) = (0, row, column, 0)``."""
    zero = torch.zeros(1, dtype=torch.long)
    ids = torch.cartesian_prod(zero, torch.arange(height), torch.arange(width), zero)
    return ids.to(device)


def text_ids(length: int, device=None) -> Tensor:
    """Position ids ``[L, 4]`` of the text tokens: ``(0, 0, 0, l)`` (``Flux2Pipeline._prepare_text_ids``)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def flux2_dynamic_shift(height: int, width: int, steps: int, vae_scale_factor: int = 8) -> float:
    """docs/method.md §2's ``shift`` that reproduces the FLUX.2 pipelines' default σ schedule.

    Both pipelines set ``μ = compute_empirical_mu(image tokens, steps)`` (BFL's fit, which depends
    on the step count too) and the scheduler (``time_shift_type="exponential"``) maps
    ``σ' = e^μ / (e^μ + 1/σ − 1)``: the method's shift formula with ``shift = e^μ``. At 1024²
    (4096 tokens): 9.01 for 20 steps, 7.56 for 50.
    """
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    tokens = (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))
    return math.exp(compute_empirical_mu(image_seq_len=tokens, num_steps=steps))


# --------------------------------------------------------------------------------------------
# The velocity model.
# --------------------------------------------------------------------------------------------

class Flux2Velocity(GuidedVelocity):
    """``vθ(x, σ, c)`` of a ``Flux2Transformer2DModel`` on packed latents ``[B, N, C']``.

    Conditioning keys: ``prompt_embeds [B, L, D]`` and, with true CFG, ``negative_prompt_embeds``.
    ``guidance_scale`` is fed as the guidance embedding when the transformer has one
    (``guidance_embeds``, [dev]); otherwise, when ``true_cfg`` ([klein] base) and
    ``guidance_scale > 1``, the transformer is called once on ``[x; x]`` with
    ``[negative; positive]`` embeddings and ``v_u + g·(v_c − v_u)`` is returned.
    """

    adapter_name = "Flux2Adapter"
    default_guidance_scale = 4.0  # both pipelines' default

    def __init__(
        self,
        transformer: torch.nn.Module,
        latent_height: int,
        latent_width: int,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | None = None,
        true_cfg: bool | None = None,
    ):
        super().__init__(transformer, guidance_scale=guidance_scale, compute_dtype=compute_dtype, timestep_scale=1.0)
        self.latent_height, self.latent_width = int(latent_height), int(latent_width)
        self.embedded_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
        if true_cfg and self.embedded_guidance:
            raise ValueError("a guidance-distilled FLUX.2 transformer (guidance_embeds=True) takes no true CFG")
        self.true_cfg = (not self.embedded_guidance) if true_cfg is None else bool(true_cfg)
        self.register_buffer("img_ids", latent_image_ids(latent_height, latent_width), persistent=False)

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg and self.guidance_scale > 1.0  # Flux2KleinPipeline.do_classifier_free_guidance

    def _extra_inputs(self, x: Tensor, inputs: Mapping[str, Tensor]) -> dict[str, Any]:
        """The guidance embedding's input ([dev]) and the image and text position ids."""
        guidance = (torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
                    if self.embedded_guidance else None)
        return {"guidance": guidance, "img_ids": self.img_ids.to(x.device),
                "txt_ids": text_ids(inputs["encoder_hidden_states"].shape[1], x.device)}


def flux2_lora_target_modules(transformer: torch.nn.Module) -> list[str]:
    """LoRA targets of a ``Flux2Transformer2DModel``: every attention projection.

    Double-stream blocks: ``to_q/k/v``, ``to_out.0`` (image) and ``add_q/k/v_proj``, ``to_add_out``
    (text). Single-stream blocks fuse q, k, v and the MLP input into ``attn.to_qkv_mlp_proj`` and
    the attention and MLP outputs into ``attn.to_out`` (a Linear there, but a ModuleList in the
    double blocks, so those are named one by one).
    """
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
    single = ["attn.to_qkv_mlp_proj"] + [
        f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(transformer.single_transformer_blocks))
    ]
    return double + single


# --------------------------------------------------------------------------------------------
# The adapter: text encoding (with an on-disk cache), the velocity model and decoding.
# --------------------------------------------------------------------------------------------

def _text_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer of a processor ([dev]'s ``PixtralProcessor``), or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def _sha256(text: str | None) -> str:
    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


def flux2_encoder_config(
    variant: str,
    text_encoder_config: Any,
    tokenizer: Any,
    max_sequence_length: int,
    dtype: torch.dtype | str,
    out_layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Everything that changes FLUX.2 prompt embeddings, hashed into the cache's encoder identity:
    the encoder config, the tokenizer, its chat template, [dev]'s system message and the stacked layers."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    _check_variant(variant)
    config = _encoder_fingerprint(
        "flux2" if variant == "dev" else "flux2-klein", {"text_encoder": text_encoder_config},
        {"tokenizer": _text_tokenizer(tokenizer)}, max_sequence_length, dtype,
    )
    template = getattr(tokenizer, "chat_template", None) or getattr(_text_tokenizer(tokenizer), "chat_template", None)
    config["chat_template_sha256"] = _sha256(template if isinstance(template, str) else json.dumps(template))
    config["system_message_sha256"] = _sha256(SYSTEM_MESSAGE) if variant == "dev" else None
    config["text_encoder_out_layers"] = list(out_layers or TEXT_ENCODER_OUT_LAYERS[variant])
    return config


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"FLUX.2 variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


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


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

FLUX2_LAYOUT = diffusers_layout(["transformer", "vae", "text_encoder"],
                                {"tokenizer": ("tokenizer.json", "vocab.json")})

FLUX2_LAYOUT_TEXT = """\
  <folder>/
    model_index.json                                              (Flux2Pipeline)
    scheduler/        scheduler_config.json                       (FlowMatchEulerDiscreteScheduler, dynamic shift)
    transformer/      config.json, diffusion_pytorch_model-*.safetensors + index   (Flux2Transformer2DModel, 32 B)
    vae/              config.json, diffusion_pytorch_model.safetensors            (AutoencoderKLFlux2)
    text_encoder/     config.json, model-*.safetensors + index    (Mistral3ForConditionalGeneration, 24 B)
    tokenizer/        tokenizer.json, tokenizer_config.json, processor_config.json, ...  (PixtralProcessor)"""

FLUX2_KLEIN_LAYOUT_TEXT = """\
  <folder>/
    model_index.json                                              (Flux2KleinPipeline, is_distilled)
    scheduler/        scheduler_config.json                       (FlowMatchEulerDiscreteScheduler, dynamic shift)
    transformer/      config.json, diffusion_pytorch_model*.safetensors   (Flux2Transformer2DModel, no guidance)
    vae/              config.json, diffusion_pytorch_model.safetensors    (AutoencoderKLFlux2)
    text_encoder/     config.json, model*.safetensors             (Qwen3ForCausalLM)
    tokenizer/        vocab.json, merges.txt, tokenizer.json, tokenizer_config.json  (Qwen2Tokenizer)"""


class Flux2FilesNotFoundError(ModelFilesNotFoundError):
    """FLUX.2 weights or configs are missing (a ``ModelFilesNotFoundError``; see :data:`FLUX2_FILES`)."""


class Flux2KleinFilesNotFoundError(Flux2FilesNotFoundError):
    """FLUX.2 [klein] weights or configs are missing (see :data:`FLUX2_KLEIN_FILES`)."""


FLUX2_FILES = ModelFiles(
    title="FLUX.2 [dev]", hub_id=FLUX2_DEV_HUB_ID, layout=FLUX2_LAYOUT, layout_text=FLUX2_LAYOUT_TEXT,
    download_patterns=download_patterns(FLUX2_LAYOUT), placeholder="/path/to/FLUX.2-dev",
    error_class=Flux2FilesNotFoundError,
)
FLUX2_KLEIN_FILES = ModelFiles(
    title="FLUX.2 [klein]", hub_id=FLUX2_KLEIN_HUB_ID, layout=FLUX2_LAYOUT, layout_text=FLUX2_KLEIN_LAYOUT_TEXT,
    download_patterns=download_patterns(FLUX2_LAYOUT), placeholder="/path/to/FLUX.2-klein-base-4B",
    gated=False, error_class=Flux2KleinFilesNotFoundError,
)


def _model_index(folder: PretrainedFolder) -> dict[str, Any]:
    """The folder's ``model_index.json`` (``{}`` when a local folder has none)."""
    if folder.is_local:
        path = Path(folder.location) / "model_index.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(folder.location, "model_index.json", **folder.common)).read_text())


def _variant_of(index: Mapping[str, Any]) -> str | None:
    name = index.get("_class_name")
    return next((v for v, cls in PIPELINE_CLASSES.items() if cls == name), None)


def load_flux2_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    variant: Variant | None = None,
    vae_dtype: torch.dtype | None = None,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> Flux2Adapter:
    """Build a :class:`Flux2Adapter` from pretrained FLUX.2 weights (diffusers layout).

    Args:
        path_or_hub_id: a diffusers-layout folder (see ``FLUX2_LAYOUT_TEXT``) or a hub id such as
            ``black-forest-labs/FLUX.2-dev`` / ``black-forest-labs/FLUX.2-klein-base-4B``.
        variant: ``"dev"`` or ``"klein"``; ``None`` reads it from ``model_index.json``. A folder
            holding the other pipeline is an error.
        dtype: weights dtype of the transformer and text encoder.
        vae_dtype: VAE weights dtype (default ``dtype``).
        text_encoders: ``"load"`` now; ``"lazy"`` on the first prompt not in the cache (config and
            tokenizer are read now, for the cache identity); ``"none"`` never (cache only).
        load_transformer, load_vae: skip parts a job does not need.
        local_files_only: ``None`` = only for folders or when the hub is offline.
        adapter_kwargs: passed to :class:`Flux2Adapter` (max_sequence_length, guidance_scale, …).
    Raises:
        Flux2FilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Mistral3ForConditionalGeneration
    from transformers import Qwen3ForCausalLM

    if variant is not None:
        _check_variant(variant)
    guess = variant or ("klein" if "klein" in str(path_or_hub_id).lower() else "dev")
    files = FLUX2_KLEIN_FILES if guess == "klein" else FLUX2_FILES
    needed = ["tokenizer", "text_encoder"] + ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, files, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)
    with folder.errors():
        index = _model_index(folder)
    found = _variant_of(index)
    if variant is not None and found is not None and found != variant:
        family = "flux2-klein" if found == "klein" else "flux2"
        raise ValueError(f"{folder.source} holds a {index['_class_name']} (FLUX.2 [{found}]), not FLUX.2 [{variant}]; "
                         f"use model.family={family}")
    variant = variant or found or guess
    encoder_cls = Mistral3ForConditionalGeneration if variant == "dev" else Qwen3ForCausalLM

    with folder.errors():
        tokenizer = folder.config(AutoProcessor if variant == "dev" else AutoTokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = flux2_encoder_config(
            variant, folder.config(AutoConfig, "text_encoder"), tokenizer, max_sequence_length, dtype,
            adapter_kwargs.get("text_encoder_out_layers"),
        )
    return build_adapter(
        folder, Flux2Adapter, dtype=dtype, text_encoders={"text_encoder": encoder_cls},
        models={"transformer": (Flux2Transformer2DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKLFlux2, vae_dtype or dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        variant=variant, is_distilled=bool(index.get("is_distilled", False)), **adapter_kwargs,
    )


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
