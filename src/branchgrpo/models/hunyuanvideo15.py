"""HunyuanVideo 1.5 text-to-video adapter: the velocity call of a diffusers
``HunyuanVideo15Transformer3DModel`` with classifier-free guidance behind the
:class:`~branchgrpo.models.protocol.VelocityModel` protocol, and :class:`HunyuanVideo15Adapter`
(Qwen2.5-VL and glyph-ByT5 prompts with the on-disk cache, ``AutoencoderKLHunyuanVideo15`` decoding,
loading).

Conventions match diffusers 0.42's ``HunyuanVideo15Pipeline`` (text-to-video):

- video latents are ``[B, 32, F', H/16, W/16]`` (``F' = (F − 1)/4 + 1``; the 480p/720p
  transformers have patch 1); the transformer's input is ``[x, 0, 0]`` on channels — the latents,
  zero condition latents and a zero mask channel (``in_channels = 2·32 + 1``) — with all-zero image
  embeddings ``[B, 729, 1152]``, which make the transformer mask its image tokens out
  (:class:`TextToVideoInputs`);
- ``timestep = 1000·σ`` (the pipeline's ``sigmas`` default is docs/method.md §2's unshifted grid,
  ``linspace(1, 0, T + 1)[:-1]``, shifted by its ``FlowMatchEulerDiscreteScheduler``);
- classifier-free guidance (the pipeline's ``ClassifierFreeGuidance`` guider, scale 6.0 in the
  480p/720p T2V configs): ``v_u + g·(v_c − v_u)``, here as **one** call on ``[uncond; cond]``; the
  negative prompt defaults to ``""`` (the pipeline encodes ``None`` as ``""``);
- prompts: the Qwen2.5-VL chat template with the pipeline's system message, 1000 tokens after its
  108 template tokens, the third-last hidden layer (``prompt_embeds`` + ``prompt_embeds_mask``), and
  the quoted text of the prompt through glyph-ByT5 (256 tokens; zeros and an empty mask when the
  prompt quotes nothing) — all inside the pipeline's own ``encode_prompt``, which the adapter calls;
- decoding divides by the VAE's ``scaling_factor`` (1.03682), runs ``vae.decode`` one video at a
  time (diffusers 0.42's mid-block attention of this VAE breaks on batches: its causal mask
  ``[B, L, L]`` broadcasts against ``[B, 1, L, L]``) and maps ``[-1, 1]`` to ``[0, 1]``.

The sampler is the engine's (docs/method.md §2–3 on ``sigma_schedule(T, shift)``; the authors'
``flow_shift`` is 5.0 at 480p and 9.0 for 720p T2V).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.models.base import DiffusersAdapter, GuidedVelocity
from branchgrpo.models.base import text_encoder_config as _encoder_fingerprint
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns

HUNYUANVIDEO15_480P_T2V_HUB_ID = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"
VISION_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: the (all-zero) image embedding's length
MLLM_MAX_LENGTH = 1000  # HunyuanVideo15Pipeline.tokenizer_max_length: Qwen2.5-VL tokens after the template
GLYPH_MAX_LENGTH = 256  # HunyuanVideo15Pipeline.tokenizer_2_max_length: ByT5 tokens of the quoted text


class TextToVideoInputs(torch.nn.Module):
    """``HunyuanVideo15Transformer3DModel`` called as ``HunyuanVideo15Pipeline`` calls it for text-to-video.

    ``hidden_states [B, C, F', H, W]`` → the transformer gets ``[x, zeros(C), zeros(1)]`` on
    channels (no condition latents, a zero mask) and ``image_embeds = zeros [B, 729, image_embed_dim]``
    (all zero: the transformer treats the batch as text-to-video and masks the image tokens out).
    """

    def __init__(self, transformer: torch.nn.Module, vision_tokens: int = VISION_TOKENS):
        super().__init__()
        self.transformer = transformer
        self.vision_tokens = int(vision_tokens)

    @property
    def config(self) -> Any:
        return self.transformer.config

    def forward(self, hidden_states: Tensor, timestep: Tensor, **kwargs: Any):
        batch, channels, frames, height, width = hidden_states.shape
        extra = int(self.transformer.config.in_channels) - channels  # condition latents + mask channel
        x = torch.cat([hidden_states, hidden_states.new_zeros(batch, extra, frames, height, width)], dim=1)
        image_embeds = hidden_states.new_zeros(batch, self.vision_tokens, int(self.transformer.config.image_embed_dim))
        return self.transformer(hidden_states=x, timestep=timestep, image_embeds=image_embeds, **kwargs)


class HunyuanVideo15Velocity(GuidedVelocity):
    """``vθ(x, σ, c)`` of a ``HunyuanVideo15Transformer3DModel`` on latents ``[B, C, F', H, W]``, with CFG.

    Conditioning keys: ``prompt_embeds [B, L, D]``, ``prompt_embeds_mask [B, L]`` (Qwen2.5-VL),
    ``prompt_embeds_2 [B, 256, D2]``, ``prompt_embeds_mask_2 [B, 256]`` (glyph-ByT5) and, when
    ``guidance_scale > 1``, the same keys prefixed ``negative_``. With guidance the transformer is
    called once on ``[x; x]`` with ``[negative; positive]`` conditioning and the result is
    ``v_u + g·(v_c − v_u)``. Timestep ``1000·σ`` (float32); outputs float32. :attr:`transformer`
    is the :class:`TextToVideoInputs` wrapper; ``transformer.transformer`` the diffusers model.
    """

    transformer_inputs = {
        "prompt_embeds": "encoder_hidden_states",
        "prompt_embeds_mask": "encoder_attention_mask",
        "prompt_embeds_2": "encoder_hidden_states_2",
        "prompt_embeds_mask_2": "encoder_attention_mask_2",
    }
    default_guidance_scale = 6.0  # the 480p/720p T2V guider_config
    adapter_name = "HunyuanVideo15Adapter"

    def __init__(self, transformer: torch.nn.Module, guidance_scale: float | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__(TextToVideoInputs(transformer), guidance_scale, compute_dtype)


def hunyuanvideo15_encoder_config(text_encoder_config: Any, text_encoder_2_config: Any, tokenizer: Any,
                                  tokenizer_2: Any, max_sequence_length: int, dtype: torch.dtype | str,
                                  glyph_max_length: int = GLYPH_MAX_LENGTH) -> dict[str, Any]:
    """Everything that changes HunyuanVideo 1.5 prompt embeddings, hashed into the cache's encoder identity."""
    fingerprint = _encoder_fingerprint(
        "hunyuanvideo15", {"text_encoder": text_encoder_config, "text_encoder_2": text_encoder_2_config},
        {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}, max_sequence_length, dtype)
    return {**fingerprint, "glyph_max_length": int(glyph_max_length)}


class HunyuanVideo15Adapter(DiffusersAdapter):
    """HunyuanVideo 1.5 text-to-video (480p / 720p T2V) behind the engine's protocols.

    Holds the ``HunyuanVideo15Transformer3DModel``, the ``AutoencoderKLHunyuanVideo15``, the
    Qwen2.5-VL text model with its tokenizer and the glyph-ByT5 encoder with its tokenizer (any may
    be ``None`` when a job does not need it).

    - :meth:`encode_prompts` → ``prompt_embeds``, ``prompt_embeds_mask``, ``prompt_embeds_2``,
      ``prompt_embeds_mask_2`` (+ ``negative_*`` when ``guidance_scale > 1``) through
      ``HunyuanVideo15Pipeline.encode_prompt``, with the prompt cache;
    - :meth:`velocity_model` → a :class:`HunyuanVideo15Velocity` (CFG in one batched call);
    - :meth:`latent_shape` → ``(32, F', H/16, W/16)``;
    - :meth:`decode` → videos ``[B, F, 3, H, W]`` in ``[0, 1]``, one video per VAE call.

    Args:
        max_sequence_length: Qwen2.5-VL tokens after the template (the pipeline's 1000). Fewer tokens
            give the same velocity for prompts that fit (padding is masked out; tested) at a fraction of
            the text-token cost of every transformer call.
        glyph_max_length: ByT5 tokens of the prompt's quoted text (the pipeline's 256); likewise.
        guidance_scale: CFG scale (6.0, the T2V guider's); ``<= 1`` turns CFG off.
        negative_prompt: the unconditional prompt (``""``, what the pipeline uses for ``None``).
        height, width, num_frames: default video size (multiples of 16 pixels; ``4k + 1`` frames).
    """

    family = "hunyuanvideo15"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    required_text_encoders = 2  # encode_prompt runs both (ByT5 gives zeros for prompts that quote nothing)
    dtype_text_encoder = "text_encoder"
    device_modules = ("transformer", "text_encoder", "vae")

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
        max_sequence_length: int = MLLM_MAX_LENGTH,
        glyph_max_length: int = GLYPH_MAX_LENGTH,
        guidance_scale: float = 6.0,
        negative_prompt: str = "",
        height: int = 480,
        width: int = 848,
        num_frames: int = 121,
        compute_dtype: torch.dtype | str | None = "auto",
        prompt_cache_dir: str | os.PathLike | None = None,
        encode_batch_size: int = 8,
        decode_batch_size: int = 1,
        device: torch.device | str | None = None,
        text_encoder_loader: Callable[[], tuple[torch.nn.Module, torch.nn.Module]] | None = None,
        encoder_config: Mapping[str, Any] | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = str(negative_prompt)
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self._init_common(
            source=source, max_sequence_length=max_sequence_length, compute_dtype=compute_dtype,
            prompt_cache_dir=prompt_cache_dir, encode_batch_size=encode_batch_size,
            decode_batch_size=decode_batch_size, device=device, text_encoder_loader=text_encoder_loader,
            encoder_config=encoder_config,
        )
        self.glyph_max_length = int(glyph_max_length)
        if self.max_sequence_length < 1 or self.glyph_max_length < 1:
            raise ValueError(f"max_sequence_length and glyph_max_length must be >= 1, got "
                             f"{self.max_sequence_length} and {self.glyph_max_length}")
        self.latent_size()  # a bad default size fails here, not at the first rollout

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "HunyuanVideo15Adapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_hunyuanvideo15_adapter`."""
        return load_hunyuanvideo15_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (16): the VAE's ``spatial_compression_ratio``, as the pipeline reads it."""
        return int(self.vae.spatial_compression_ratio) if self.vae is not None else 16

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Frames per latent frame after the first (4): the VAE's ``temporal_compression_ratio``."""
        return int(self.vae.temporal_compression_ratio) if self.vae is not None else 4

    @property
    def patch_size(self) -> tuple[int, int]:
        """The transformer's ``(t, hw)`` patch, ``(1, 1)`` for the 480p/720p models."""
        if self.transformer is None:
            return (1, 1)
        return int(self.transformer.config.patch_size_t), int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        if self.vae is not None:
            return int(self.vae.config.latent_channels)
        if self.transformer is not None:
            return int(self.transformer.config.out_channels)
        return 32

    def latent_size(self, height: int | None = None, width: int | None = None,
                    num_frames: int | None = None) -> tuple[int, int, int]:
        """Latent ``(F', H, W)`` of a ``num_frames × height × width`` video (bad sizes are errors, not rounded)."""
        height, width = height or self.height, width or self.width
        num_frames = num_frames or self.num_frames
        patch_t, patch = self.patch_size
        spatial, temporal = self.vae_scale_factor, self.vae_scale_factor_temporal
        if height % (spatial * patch) or width % (spatial * patch) or height < spatial or width < spatial:
            raise ValueError(f"HunyuanVideo 1.5 video size must be a multiple of {spatial * patch} pixels "
                             f"(VAE {spatial} × patch {patch}), got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % temporal or ((num_frames - 1) // temporal + 1) % patch_t:
            raise ValueError(f"HunyuanVideo 1.5 num_frames must be {temporal}k + 1 (1, 5, …, 33, …, 121: the "
                             f"causal VAE codes the first frame alone, then {temporal} per latent frame), "
                             f"got {num_frames}")
        return (num_frames - 1) // temporal + 1, height // spatial, width // spatial

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, int, int, int]:
        """Shape ``(C, F', H, W)`` of one video latent (``(32, 9, 30, 53)`` for 33 frames at 480×848)."""
        return (self.latent_channels, *self.latent_size(height, width, num_frames))

    # -- velocity ---------------------------------------------------------------------------
    def velocity_model(self, height: int | None = None, width: int | None = None,
                       guidance_scale: float | None = None, compute_dtype: torch.dtype | str | None = None,
                       num_frames: int | None = None) -> HunyuanVideo15Velocity:
        """The transformer as ``vθ(x, σ, c)`` with CFG (docs/method.md §1–2); sizes are only checked."""
        transformer = self._require_transformer()
        self.latent_size(height, width, num_frames)
        return HunyuanVideo15Velocity(transformer, **self._velocity_options(guidance_scale, compute_dtype))

    # -- prompts ----------------------------------------------------------------------------
    @property
    def encoder_config(self) -> dict[str, Any]:
        """The text encoders' identity (:func:`hunyuanvideo15_encoder_config`), with both sequence lengths."""
        return {**super().encoder_config, "glyph_max_length": self.glyph_max_length}

    def encoding_pipeline(self):
        """A ``HunyuanVideo15Pipeline`` holding the text encoders (for its ``encode_prompt``), with
        ``tokenizer_max_length = max_sequence_length`` and ``tokenizer_2_max_length = glyph_max_length``.
        Its ``__init__`` reads ``vae.config``: without the adapter's VAE it gets a weightless stand-in
        on the meta device."""
        from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Pipeline

        vae = self.vae
        if vae is None:
            with torch.device("meta"):
                vae = AutoencoderKLHunyuanVideo15()
        pipeline = HunyuanVideo15Pipeline(
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, transformer=None, vae=vae, scheduler=None,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, guider=None,
        )
        pipeline.tokenizer_max_length = self.max_sequence_length
        pipeline.tokenizer_2_max_length = self.glyph_max_length
        return pipeline

    @torch.no_grad()
    def encode_prompts_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Positive embeddings and masks through ``HunyuanVideo15Pipeline.encode_prompt``."""
        prompts = [str(p) for p in prompts]
        self._ensure_text_encoders(prompts)
        embeds, mask, embeds_2, mask_2 = self.encoding_pipeline().encode_prompt(
            prompt=prompts, device=self.device, batch_size=len(prompts))
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "prompt_embeds_2": embeds_2,
                "prompt_embeds_mask_2": mask_2}

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int | None = None) -> Tensor:
        """Video latents ``[B, C, F', H, W]`` → videos ``[B, F, 3, 16H, 16W]`` float32 in ``[0, 1]``.

        As ``HunyuanVideo15Pipeline``: ``z / scaling_factor``, ``vae.decode``, then
        ``postprocess_video`` (``[-1, 1]`` → ``[0, 1]``, frames first); one video per VAE call
        whatever ``batch_size`` says (see the module docstring).
        """
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        config = self._require_vae().config
        if latents.ndim != 5:
            raise ValueError(f"HunyuanVideo 1.5 latents are [B, C, F', H, W], got shape {tuple(latents.shape)}")
        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=self.vae_scale_factor)
        return self._decode_batches(
            latents, 1,
            vae_input=lambda z: z / config.scaling_factor,
            postprocess=lambda video: processor.postprocess_video(video, output_type="pt"),
        )


def export_hunyuanvideo15_lora(transformer: torch.nn.Module, out_file: str | os.PathLike,
                               dtype: torch.dtype | None = None) -> "os.PathLike":
    """Write the transformer's LoRA in diffusers' convention (``transformer.<module>.lora_{A,B}.weight``,
    the ``LoraConfig`` as metadata) through ``HunyuanVideoPipeline.save_lora_weights``.

    diffusers 0.42's ``HunyuanVideo15Pipeline`` has no LoRA loader mixin (no ``load_lora_weights``);
    load the file with :func:`load_hunyuanvideo15_lora` (the transformer's ``load_lora_adapter`` with
    the file's ``LoraConfig``; tested against our velocity).
    """
    from diffusers import HunyuanVideoPipeline

    from branchgrpo.models.export import export_lora

    return export_lora(transformer, out_file, pipeline_class=HunyuanVideoPipeline, dtype=dtype)


def load_hunyuanvideo15_lora(transformer: torch.nn.Module, path: str | os.PathLike,
                             adapter_name: str | None = None) -> None:
    """Load :func:`export_hunyuanvideo15_lora`'s file into a ``HunyuanVideo15Transformer3DModel``
    (e.g. ``pipe.transformer``).

    ``transformer.load_lora_adapter(path)`` alone ignores the ``LoraConfig`` stored in the file (rank
    and alpha: the update comes out ``alpha / rank`` times too small or large), so the file is read
    with ``HunyuanVideoPipeline.lora_state_dict(..., return_lora_metadata=True)`` and both are passed::

        state, metadata = HunyuanVideoPipeline.lora_state_dict(path, return_lora_metadata=True)
        pipe.transformer.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    """
    from diffusers import HunyuanVideoPipeline

    state, metadata = HunyuanVideoPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    transformer.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name=adapter_name)


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

HUNYUANVIDEO15_LAYOUT = diffusers_layout(["transformer", "vae", "text_encoder", "text_encoder_2"],
                                         {"tokenizer": ("tokenizer.json", "vocab.json"),
                                          "tokenizer_2": ("tokenizer_config.json",)})

HUNYUANVIDEO15_LAYOUT_TEXT = """\
  <folder>/
    model_index.json
    scheduler/, guider/  scheduler_config.json, guider_config.json   (not used: the engine samples, CFG is ours)
    transformer/      config.json, diffusion_pytorch_model*.safetensors   (HunyuanVideo15Transformer3DModel)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKLHunyuanVideo15)
    text_encoder/     config.json, model*.safetensors                       (Qwen2.5-VL-7B text model)
    text_encoder_2/   config.json, model.safetensors                        (glyph-ByT5 encoder)
    tokenizer/        tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (Qwen2, chat template)
    tokenizer_2/      tokenizer_config.json, special_tokens_map.json       (ByT5)"""


class HunyuanVideo15FilesNotFoundError(ModelFilesNotFoundError):
    """HunyuanVideo 1.5 weights or configs are missing (a ``ModelFilesNotFoundError``)."""


HUNYUANVIDEO15_FILES = ModelFiles(
    title="HunyuanVideo 1.5", hub_id=HUNYUANVIDEO15_480P_T2V_HUB_ID, layout=HUNYUANVIDEO15_LAYOUT,
    layout_text=HUNYUANVIDEO15_LAYOUT_TEXT, download_patterns=download_patterns(HUNYUANVIDEO15_LAYOUT, ("scheduler", "guider")),
    placeholder="/path/to/HunyuanVideo-1.5-Diffusers-480p_t2v", gated=False,
    error_class=HunyuanVideo15FilesNotFoundError,
)


def load_hunyuanvideo15_adapter(
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
) -> HunyuanVideo15Adapter:
    """Build a :class:`HunyuanVideo15Adapter` from a HunyuanVideo 1.5 T2V diffusers folder or hub id.

    Arguments as :func:`branchgrpo.models.wan.load_wan_adapter`; ``adapter_kwargs`` go to
    :class:`HunyuanVideo15Adapter` (sizes, guidance_scale, negative_prompt, max_sequence_length, …).

    Raises:
        HunyuanVideo15FilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import AutoConfig, AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    needed = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]
    needed += ["transformer"] * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, HUNYUANVIDEO15_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(AutoTokenizer, "tokenizer")
        tokenizer_2 = folder.config(ByT5Tokenizer, "tokenizer_2")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", MLLM_MAX_LENGTH)
        encoder_config = hunyuanvideo15_encoder_config(
            folder.config(AutoConfig, "text_encoder"), folder.config(T5Config, "text_encoder_2"), tokenizer,
            tokenizer_2, max_sequence_length, dtype, adapter_kwargs.get("glyph_max_length", GLYPH_MAX_LENGTH))
    return build_adapter(
        folder, HunyuanVideo15Adapter, dtype=dtype,
        text_encoders={"text_encoder": Qwen2_5_VLTextModel, "text_encoder_2": T5EncoderModel},
        models={"transformer": (HunyuanVideo15Transformer3DModel, dtype) if load_transformer else None,
                "vae": (AutoencoderKLHunyuanVideo15, vae_dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, **adapter_kwargs,
    )


__all__ = [
    "HUNYUANVIDEO15_480P_T2V_HUB_ID",
    "HUNYUANVIDEO15_FILES",
    "HUNYUANVIDEO15_LAYOUT",
    "HUNYUANVIDEO15_LAYOUT_TEXT",
    "HunyuanVideo15Adapter",
    "HunyuanVideo15FilesNotFoundError",
    "HunyuanVideo15Velocity",
    "GLYPH_MAX_LENGTH",
    "MLLM_MAX_LENGTH",
    "TextToVideoInputs",
    "VISION_TOKENS",
    "export_hunyuanvideo15_lora",
    "hunyuanvideo15_encoder_config",
    "load_hunyuanvideo15_adapter",
    "load_hunyuanvideo15_lora",
]
