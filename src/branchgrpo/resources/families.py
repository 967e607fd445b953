"""Which families ``branchgrpo plan`` can size, and how it reads each one's geometry.

A family's entry says which architecture class describes its transformer's ``config.json``, how
many tokens one transformer row has for a job's ``model.options`` (resolution, frames, text
length), how many elements one stored latent has, and the hub config to fall back on when
``model.path`` holds no ``transformer/config.json``. Adding a family to ``plan`` is one entry here
plus its architecture module in this package (a ``saved`` walk checked against autograd's saved
tensors on a tiny real model, as ``flux.py`` is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from branchgrpo.resources.core import Architecture, Tokens
from branchgrpo.resources.flux import FluxArchitecture
from branchgrpo.resources.flux2 import FLUX2_DEV as _FLUX2_DEV
from branchgrpo.resources.flux2 import Flux2Architecture as _flux2_architecture
from branchgrpo.resources.qwenimage import QWEN_IMAGE as _QWEN_IMAGE
from branchgrpo.resources.qwenimage import QwenImageArchitecture as _qwen_architecture
from branchgrpo.resources.sd3 import SD35_MEDIUM as _SD35_MEDIUM
from branchgrpo.resources.sd3 import SD3Architecture as _sd3_architecture
from branchgrpo.resources.wan import WAN21_T2V_1_3B as _WAN21_T2V_1_3B
from branchgrpo.resources.wan import WanArchitecture as _wan_architecture
from branchgrpo.resources.zimage import Z_IMAGE_TURBO as _Z_IMAGE_TURBO
from branchgrpo.resources.zimage import ZImageArchitecture as _zimage_architecture

# black-forest-labs/FLUX.1-dev, transformer/config.json (11,901,408,320 parameters)
FLUX_DEV: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "out_channels": None, "patch_size": 1, "pooled_projection_dim": 768,
}


@dataclass(frozen=True)
class PlanFamily:
    """How ``plan`` reads one family (see the module docstring)."""

    architecture: Callable[[dict[str, Any]], Architecture]
    tokens: Callable[[Any, Mapping[str, Any]], Tokens]  # (architecture, model.options) -> one row's tokens
    latent_elements: Callable[[Any, Mapping[str, Any]], int]  # (architecture, model.options) -> one latent
    hub_name: str | None = None  # a key of HUB_CONFIGS, used when model.path has no transformer/config.json
    hub_config: dict[str, Any] | None = None
    # transformer rows per sample in every call: 2 under true classifier-free guidance ([negative; positive])
    rows_per_sample: Callable[[Mapping[str, Any]], int] = lambda options: 1
    # (architecture) -> the family's LoRA targets when model.lora.target_modules is unset (the trainer's
    # ``family.lora_target_modules``); None: FLUX.1's attention projections (models/lora.py DEFAULT_TARGET_MODULES)
    lora_targets: Callable[[Any], tuple[str, ...]] | None = None
    # families with variants of different architectures (wan22): model.options.variant -> its entry
    variants: dict[str, "PlanFamily"] | None = None
    default_variant: str | None = None


def _size(options: Mapping[str, Any]) -> tuple[int, int]:
    return int(options.get("height", 0)), int(options.get("width", 0))


def _flux_tokens(arch: FluxArchitecture, options: Mapping[str, Any]) -> Tokens:
    """FLUX's ``(H/16)·(W/16)`` latent patches and ``model.max_sequence_length`` T5 tokens."""
    return Tokens(arch.image_tokens(*_size(options)), int(options.get("max_sequence_length", 0)))


def _flux_latent(arch: FluxArchitecture, options: Mapping[str, Any]) -> int:
    return arch.image_tokens(*_size(options)) * arch.in_channels


def _digits_tokens(arch: FluxArchitecture, options: Mapping[str, Any]) -> Tokens:
    """The digits world's 64 image and 12 text tokens, whatever the options say."""
    from branchgrpo.worlds.digits.generator import LATENT_SHAPE
    from branchgrpo.worlds.digits.text import MAX_TOKENS

    return Tokens(LATENT_SHAPE[0], MAX_TOKENS)


def _digits_latent(arch: FluxArchitecture, options: Mapping[str, Any]) -> int:
    from branchgrpo.worlds.digits.generator import LATENT_SHAPE

    return math.prod(LATENT_SHAPE)


def _shapes_tokens(arch: FluxArchitecture, options: Mapping[str, Any]) -> Tokens:
    """The shapes world's 64 image tokens (4×4 patches of 32×32 RGB) and its padded prompt length."""
    from branchgrpo.worlds.shapes.generator import LATENT_SHAPE
    from branchgrpo.worlds.shapes.text import MAX_TOKENS

    return Tokens(LATENT_SHAPE[0], MAX_TOKENS)


def _shapes_latent(arch: FluxArchitecture, options: Mapping[str, Any]) -> int:
    from branchgrpo.worlds.shapes.generator import LATENT_SHAPE

    return math.prod(LATENT_SHAPE)


def _kontext_tokens(arch: FluxArchitecture, options: Mapping[str, Any]) -> Tokens:
    """FLUX.1 Kontext: the source image's packed tokens follow the generated ones in every row.
    Sources are resized to the preferred Kontext resolution nearest their aspect ratio (about a
    megapixel, like the 1024² output), so the source is counted at the output's size."""
    image = arch.image_tokens(*_size(options))
    return Tokens(2 * image, int(options.get("max_sequence_length", 512)))


def true_cfg_rows(options: Mapping[str, Any]) -> int:
    """2 when ``model.options.true_cfg_scale > 1`` (one call on ``[negative; positive]``), else 1."""
    return 2 if float(options.get("true_cfg_scale", 1.0) or 1.0) > 1.0 else 1


def _qwen_size(options: Mapping[str, Any], source: bool) -> tuple[int, int]:
    """``(height, width)`` in pixels, the family's defaults where unset (1328² Qwen-Image, 1024² Edit)."""
    if source:
        from branchgrpo.families.qwenimage_edit import QwenImageEditOptions as defaults
    else:
        from branchgrpo.families.qwenimage import QwenImageOptions as defaults
    return int(options.get("height", defaults.height)), int(options.get("width", defaults.width))


def _qwen_tokens(arch: Any, options: Mapping[str, Any], source: bool) -> Tokens:
    """Qwen-Image: ``(H/16)·(W/16)`` packed latent tokens; text up to ``max_sequence_length``
    (the family's 512; Qwen-Image-Edit's adapter keeps up to 1024, vision tokens included), an upper
    bound: the adapter trims padding no row uses. Under true CFG the negative row is padded to the
    prompt's length, so the call carries a text mask. ``source``: Qwen-Image-Edit, whose source
    image's tokens follow the generated ones in every row, counted at ``condition_area`` with the
    output's aspect ratio (the pipeline keeps the source's own aspect; sizes are from
    ``models/qwenimage_edit.py``'s ``condition_size``)."""
    from branchgrpo.resources.qwenimage import QwenTokens

    height, width = _qwen_size(options, source)
    image = arch.image_tokens(height, width)
    text = int(options.get("max_sequence_length", 1024 if source else 512))
    if source:
        from branchgrpo.models.qwenimage_edit import CONDITION_AREA, condition_size

        src_w, src_h = condition_size(width, height, int(options.get("condition_area", CONDITION_AREA)))
        image += arch.image_tokens(src_h, src_w)
    return QwenTokens(image, text, masked=_qwen_cfg_rows(options) > 1)


def _qwen_latent(arch: Any, options: Mapping[str, Any], source: bool) -> int:
    """The generated image's packed latent ``[(H/16)·(W/16), 64]`` (an edit's source is not stored)."""
    return arch.image_tokens(*_qwen_size(options, source)) * arch.in_channels


def _qwen_cfg_rows(options: Mapping[str, Any]) -> int:
    """2 when ``model.options.guidance_scale`` (Qwen-Image's true CFG, default 4.0) is > 1, else 1."""
    return 2 if float(options.get("guidance_scale", 4.0)) > 1.0 else 1


def _wan_video(options: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(num_frames, height, width)``, the wan family's defaults where unset (33 frames at 480×832)."""
    from branchgrpo.families.wan import WanOptions as defaults

    return (int(options.get("num_frames", defaults.num_frames)), int(options.get("height", defaults.height)),
            int(options.get("width", defaults.width)))


def _wan_tokens(arch: Any, options: Mapping[str, Any]) -> Tokens:
    """Wan: latent ``((F − 1)/4 + 1) × H/8 × W/8`` cut into ``patch_size`` patches (``(1, 2, 2)``) and
    ``max_sequence_length`` UMT5 tokens (512: the states are zero-padded to it, no mask)."""
    from branchgrpo.families.wan import WanOptions as defaults

    return Tokens(arch.image_tokens(*_wan_video(options)),
                  int(options.get("max_sequence_length", defaults.max_sequence_length)))


def _wan_latent(arch: Any, options: Mapping[str, Any]) -> int:
    """One video latent ``[16, (F − 1)/4 + 1, H/8, W/8]``."""
    frames, height, width = _wan_video(options)
    return arch.in_channels * ((frames - 1) // 4 + 1) * (height // 8) * (width // 8)


def _wan_cfg_rows(options: Mapping[str, Any]) -> int:
    """2 when ``model.options.guidance_scale`` (WanPipeline's CFG, default 5.0) is > 1: the negative
    and positive rows in one call, rollout and training forward alike (``models/base.py`` ``GuidedVelocity``)."""
    from branchgrpo.families.wan import WanOptions as defaults

    return 2 if float(options.get("guidance_scale", defaults.guidance_scale)) > 1.0 else 1


def _flux2_tokens(arch: Any, options: Mapping[str, Any]) -> Tokens:
    """FLUX.2: ``(H/16)·(W/16)`` packed latent tokens and ``max_sequence_length`` Mistral tokens
    (the prompt cache pads to it), the family's defaults where unset (1024², 512)."""
    from branchgrpo.families.flux2 import Flux2Options as defaults

    height, width = int(options.get("height", defaults.height)), int(options.get("width", defaults.width))
    text = int(options.get("max_sequence_length", defaults.max_sequence_length))
    return Tokens(arch.image_tokens(height, width), text)


def _flux2_latent(arch: Any, options: Mapping[str, Any]) -> int:
    """One packed latent ``[(H/16)·(W/16), 4·32]`` (``Flux2Adapter.latent_shape``)."""
    return _flux2_tokens(arch, options).image * arch.in_channels


def _flux2_lora_targets(arch: Any) -> tuple[str, ...]:
    """The flux2 family's LoRA targets (``flux2_lora_target_modules``, which reads only the number of
    single blocks): the double blocks' attention projections, every single block's fused projection and output."""
    from types import SimpleNamespace

    from branchgrpo.models.flux2_transformer import flux2_lora_target_modules

    return tuple(flux2_lora_target_modules(SimpleNamespace(single_transformer_blocks=range(arch.single))))


def _wan_lora_targets(arch: Any) -> tuple[str, ...]:
    """The wan families' LoRA targets (``models/lora.py`` ``WAN_TARGET_MODULES``: both attentions' projections)."""
    from branchgrpo.models.lora import WAN_TARGET_MODULES

    return tuple(WAN_TARGET_MODULES)


def _zimage_tokens(arch: Any, options: Mapping[str, Any]) -> Tokens:
    """Z-Image: ``(H/16)·(W/16)`` latent patches and the caption's Qwen3 tokens, each padded to a
    multiple of 32 by the transformer. The adapter passes every caption unpadded (its own length,
    chat template included, at most ``max_sequence_length``), so the text count is an upper bound:
    ``max_sequence_length`` rounded up to 32 (the family's defaults where unset: 1024², 512)."""
    from branchgrpo.families.zimage import ZImageOptions as defaults
    from branchgrpo.resources.zimage import padded

    height, width = int(options.get("height", defaults.height)), int(options.get("width", defaults.width))
    text = int(options.get("max_sequence_length", defaults.max_sequence_length))
    return Tokens(arch.image_tokens(height, width), padded(text))


def _zimage_latent(arch: Any, options: Mapping[str, Any]) -> int:
    """One latent ``[16, H/8, W/8]`` (``ZImageAdapter.latent_shape``)."""
    from branchgrpo.families.zimage import ZImageOptions as defaults

    height, width = int(options.get("height", defaults.height)), int(options.get("width", defaults.width))
    return arch.in_channels * (height // 8) * (width // 8)


def _zimage_cfg_rows(options: Mapping[str, Any]) -> int:
    """2 when ``model.options.guidance_scale`` > 0 (Z-Image's convention: any positive ``g`` runs
    the negative caption in the same call, ``ZImageVelocity``), else 1 (Turbo's default 0)."""
    from branchgrpo.families.zimage import ZImageOptions as defaults

    return 2 if float(options.get("guidance_scale", defaults.guidance_scale)) > 0.0 else 1


def _zimage_lora_targets(arch: Any) -> tuple[str, ...]:
    """The zimage family's LoRA targets (``models/zimage.py`` ``ZIMAGE_TARGET_MODULES``)."""
    from branchgrpo.models.zimage import ZIMAGE_TARGET_MODULES

    return tuple(ZIMAGE_TARGET_MODULES)


def _wan22_video(options: Mapping[str, Any]) -> tuple[int, int, int]:
    from branchgrpo.families.wan22 import Wan22Options as defaults

    return (int(options.get("num_frames", defaults.num_frames)), int(options.get("height", defaults.height)),
            int(options.get("width", defaults.width)))


def _wan22_geometry(vae: int, channels: int):
    """Tokens and latent size of a Wan2.2 variant: VAE ``vae``× in space (8: T2V-A14B, 16: TI2V-5B),
    4× in time plus the first frame, ``channels`` latent channels, then ``patch_size`` patches."""

    def frames_and_grid(options: Mapping[str, Any]) -> tuple[int, int, int]:
        frames, height, width = _wan22_video(options)
        return (frames - 1) // 4 + 1, height // vae, width // vae

    def tokens(arch: Any, options: Mapping[str, Any]) -> Tokens:
        from branchgrpo.families.wan22 import Wan22Options as defaults

        f, h, w = frames_and_grid(options)
        pt, ph, pw = (arch.experts[0] if hasattr(arch, "experts") else arch).patch
        return Tokens((f // pt) * (h // ph) * (w // pw),
                      int(options.get("max_sequence_length", defaults.max_sequence_length)))

    def latent(arch: Any, options: Mapping[str, Any]) -> int:
        f, h, w = frames_and_grid(options)
        return channels * f * h * w

    return tokens, latent


def _wan22_cfg_rows(variant: str):
    """2 when either expert's CFG scale (the authors' defaults where unset) is > 1: the larger call counts."""

    def rows(options: Mapping[str, Any]) -> int:
        from branchgrpo.families.wan22 import _DEFAULT_GUIDANCE

        high, low = _DEFAULT_GUIDANCE[variant]
        scales = [options.get("guidance_scale") or high, options.get("guidance_scale_2") or low]
        return 2 if any(s is not None and float(s) > 1.0 for s in scales) else 1

    return rows


def _wan22_entries() -> dict[str, PlanFamily]:
    """Wan2.2's variants: T2V-A14B (two 14 B experts, both held and trained, one per row) and TI2V-5B
    (one transformer, per-token timesteps). Configs: resources/wan.py, from the authors' repository."""
    from branchgrpo.resources.wan import WAN22_T2V_A14B_EXPERT, WAN22_TI2V_5B, WanArchitecture, WanExpertsArchitecture

    a14b_tokens, a14b_latent = _wan22_geometry(8, 16)
    ti2v_tokens, ti2v_latent = _wan22_geometry(16, 48)
    return {
        "t2v-a14b": PlanFamily(WanExpertsArchitecture, a14b_tokens, a14b_latent, "wan2.2-t2v-a14b",
                               WAN22_T2V_A14B_EXPERT, _wan22_cfg_rows("t2v-a14b"), _wan_lora_targets),
        "ti2v-5b": PlanFamily(lambda config: WanArchitecture(config, per_token_timesteps=True), ti2v_tokens,
                              ti2v_latent, "wan2.2-ti2v-5b", WAN22_TI2V_5B, _wan22_cfg_rows("ti2v-5b"),
                              _wan_lora_targets),
    }


_WAN22 = _wan22_entries()


def _hunyuanvideo15_size(options: Mapping[str, Any]) -> tuple[int, int, int]:
    """Latent ``(F', H, W)``: VAE 4× in time plus the first frame, 16× in space, the family's defaults
    where unset (33 frames at 480×848; ``HunyuanVideo15Adapter.latent_size``)."""
    from branchgrpo.families.hunyuanvideo15 import HunyuanVideo15Options as defaults

    frames = int(options.get("num_frames", defaults.num_frames))
    height, width = int(options.get("height", defaults.height)), int(options.get("width", defaults.width))
    return (frames - 1) // 4 + 1, height // 16, width // 16


def _hunyuanvideo15_tokens(arch: Any, options: Mapping[str, Any]) -> Tokens:
    """HunyuanVideo 1.5: the latent cut into ``(patch_size_t, patch_size, patch_size)`` patches; the
    context is ``max_sequence_length`` Qwen2.5-VL + ``glyph_max_length`` ByT5 + 729 image-embedding
    tokens (every call carries all three, padded, with masks; ``models/hunyuanvideo15.py``)."""
    from branchgrpo.families.hunyuanvideo15 import HunyuanVideo15Options as defaults
    from branchgrpo.models.hunyuanvideo15 import VISION_TOKENS
    from branchgrpo.resources.hunyuanvideo15 import HunyuanTokens

    f, h, w = _hunyuanvideo15_size(options)
    pt, ph, pw = arch.patch
    glyph = int(options.get("glyph_max_length", defaults.glyph_max_length))
    mllm = int(options.get("max_sequence_length", defaults.max_sequence_length))
    return HunyuanTokens((f // pt) * (h // ph) * (w // pw), mllm + glyph + VISION_TOKENS, glyph=glyph,
                         vision=VISION_TOKENS)


def _hunyuanvideo15_latent(arch: Any, options: Mapping[str, Any]) -> int:
    """One video latent ``[32, F', H/16, W/16]`` (``latent_shape``; 32 = the transformer's ``out_channels``)."""
    return arch.out_channels * math.prod(_hunyuanvideo15_size(options))


def _hunyuanvideo15_cfg_rows(options: Mapping[str, Any]) -> int:
    """2 when ``model.options.guidance_scale`` (default 6.0) is > 1: ``[negative; positive]`` in one call."""
    from branchgrpo.families.hunyuanvideo15 import HunyuanVideo15Options as defaults

    return 2 if float(options.get("guidance_scale", defaults.guidance_scale)) > 1.0 else 1


def _hunyuanvideo15_lora_targets(arch: Any) -> tuple[str, ...]:
    """The family's ``lora_target_modules``: ``models/lora.py`` ``DEFAULT_TARGET_MODULES``."""
    from branchgrpo.models.lora import DEFAULT_TARGET_MODULES

    return tuple(DEFAULT_TARGET_MODULES)


def _hunyuanvideo15_architecture(config: dict[str, Any]) -> Architecture:
    from branchgrpo.resources.hunyuanvideo15 import HunyuanVideo15Architecture

    return HunyuanVideo15Architecture(config)


def _hunyuanvideo15_entry() -> "PlanFamily":
    from branchgrpo.resources.hunyuanvideo15 import HUNYUANVIDEO15_480P_T2V

    return PlanFamily(_hunyuanvideo15_architecture, _hunyuanvideo15_tokens, _hunyuanvideo15_latent,
                      "hunyuanvideo1.5-480p-t2v", HUNYUANVIDEO15_480P_T2V, _hunyuanvideo15_cfg_rows,
                      _hunyuanvideo15_lora_targets)

def _sd3_size(options: Mapping[str, Any]) -> tuple[int, int]:
    from branchgrpo.families.sd3 import SD3Options as defaults

    return int(options.get("height", defaults.height)), int(options.get("width", defaults.width))


def _sd3_tokens(arch: Any, options: Mapping[str, Any]) -> Tokens:
    """SD3: ``(H/16)·(W/16)`` latent patches; text = CLIP's 77 tokens followed by ``max_sequence_length``
    T5 tokens (``StableDiffusion3Pipeline.encode_prompt`` concatenates them), the family's defaults
    where unset (512², 128)."""
    from branchgrpo.families.sd3 import SD3Options as defaults

    return Tokens(arch.image_tokens(*_sd3_size(options)),
                  SD3_CLIP_TOKENS + int(options.get("max_sequence_length", defaults.max_sequence_length)))


def _sd3_latent(arch: Any, options: Mapping[str, Any]) -> int:
    """One latent ``[16, H/8, W/8]`` (``SD3Adapter.latent_shape``)."""
    height, width = _sd3_size(options)
    return arch.in_channels * (height // 8) * (width // 8)


def _sd3_cfg_rows(options: Mapping[str, Any]) -> int:
    """2 when ``model.options.guidance_scale`` (default 4.5) is > 1: ``SD3Velocity`` runs the negative
    and positive rows in one call, rollout and training forward alike."""
    from branchgrpo.families.sd3 import SD3Options as defaults

    return 2 if float(options.get("guidance_scale", defaults.guidance_scale)) > 1.0 else 1


def _sd3_lora_targets(arch: Any) -> tuple[str, ...]:
    """The sd3 family's LoRA targets (``ModelFamily.lora_target_modules`` → ``default_target_modules``:
    Flow-GRPO's eight joint-attention projections; ``attn2`` is not matched)."""
    from branchgrpo.models.lora import DEFAULT_TARGET_MODULES

    return tuple(DEFAULT_TARGET_MODULES)


SD3_CLIP_TOKENS = 77  # CLIP-L/G's padded length, before the T5 tokens in every row


PLAN_FAMILIES: dict[str, PlanFamily] = {
    "flux": PlanFamily(FluxArchitecture, _flux_tokens, _flux_latent, "flux-dev", FLUX_DEV),
    # black-forest-labs/FLUX.2-dev (guidance-distilled: one row per sample; resources/flux2.py FLUX2_DEV)
    "flux2": PlanFamily(_flux2_architecture, _flux2_tokens, _flux2_latent, "flux2-dev", _FLUX2_DEV,
                        lora_targets=_flux2_lora_targets),
    "digits": PlanFamily(FluxArchitecture, _digits_tokens, _digits_latent),
    "shapes": PlanFamily(FluxArchitecture, _shapes_tokens, _shapes_latent),
    # FLUX.1-Kontext-dev has FLUX.1-dev's 12 B transformer; the tree stores the generated latent alone
    "flux-kontext": PlanFamily(FluxArchitecture, _kontext_tokens, _flux_latent, "flux-kontext-dev", FLUX_DEV,
                               true_cfg_rows),
    # Qwen/Qwen-Image and Qwen/Qwen-Image-Edit share one transformer config (resources/qwenimage.py QWEN_IMAGE)
    "qwenimage": PlanFamily(_qwen_architecture, lambda arch, o: _qwen_tokens(arch, o, False),
                            lambda arch, o: _qwen_latent(arch, o, False), "qwen-image", _QWEN_IMAGE, _qwen_cfg_rows),
    "qwenimage-edit": PlanFamily(_qwen_architecture, lambda arch, o: _qwen_tokens(arch, o, True),
                                 lambda arch, o: _qwen_latent(arch, o, True), "qwen-image-edit", _QWEN_IMAGE,
                                 _qwen_cfg_rows),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers (resources/wan.py WAN21_T2V_1_3B); the 14B T2V is the same class
    "wan": PlanFamily(_wan_architecture, _wan_tokens, _wan_latent, "wan2.1-t2v-1.3b", _WAN21_T2V_1_3B, _wan_cfg_rows,
                      _wan_lora_targets),
    "wan22": PlanFamily(**{**_WAN22["t2v-a14b"].__dict__, "variants": _WAN22, "default_variant": "t2v-a14b"}),
    # stabilityai/stable-diffusion-3.5-medium (resources/sd3.py SD35_MEDIUM); true CFG doubles the rows
    "sd3": PlanFamily(_sd3_architecture, _sd3_tokens, _sd3_latent, "sd3.5-medium", _SD35_MEDIUM, _sd3_cfg_rows,
                      _sd3_lora_targets),
    # Tongyi-MAI/Z-Image-Turbo (resources/zimage.py Z_IMAGE_TURBO); the base Z-Image has the same transformer
    "zimage": PlanFamily(_zimage_architecture, _zimage_tokens, _zimage_latent, "z-image-turbo", _Z_IMAGE_TURBO,
                         _zimage_cfg_rows, _zimage_lora_targets),
    # hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v (resources/hunyuanvideo15.py)
    "hunyuanvideo15": _hunyuanvideo15_entry(),
}


def plan_family(family: str, options: Mapping[str, Any] | None = None) -> PlanFamily:
    """The entry for ``model.family`` (and ``model.options.variant`` where the family has variants),
    or one line naming the families ``plan`` covers."""
    if family not in PLAN_FAMILIES:
        raise ValueError(f"model.family={family}: the resource estimate covers "
                         f"{', '.join(sorted(PLAN_FAMILIES))}")
    entry = PLAN_FAMILIES[family]
    if entry.variants:
        variant = (options or {}).get("variant") or entry.default_variant
        if variant not in entry.variants:
            raise ValueError(f"model.options.variant={variant}: the resource estimate covers "
                             f"{', '.join(entry.variants)}")
        entry = entry.variants[variant]
    return entry
