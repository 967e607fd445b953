"""The GPU suite's cases: scales (full FLUX.1-dev, tiny CPU), the preset × resolution × training
cases, and the randomly initialised transformer they run on (benchmarks/gpu/run_suite.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().parent / "wheels"
CONFIG = ROOT / "configs" / "flux-dev-hps.yaml"
INIT_STD = 0.02  # random linear weights ~ N(0, 0.02²), biases 0, norm weights 1


SDPA_CHOICES = ("auto", "flash", "efficient", "cudnn", "math")  # branchgrpo.models.speed.ATTENTION_KERNELS


def select_sdpa(name: str) -> None:
    """``model.attention``'s setting (:func:`branchgrpo.models.speed.select_attention`)."""
    sys.path.insert(0, str(ROOT / "src"))
    from branchgrpo.models.speed import select_attention

    select_attention(name)


def import_with_wheels(name: str, folder: Path = WHEELS) -> tuple[Any, str]:
    """``import name``; if that fails, put every ``*.whl`` of ``folder`` on ``sys.path`` (a
    pure-Python wheel is a zip that zipimport reads) and import again. Returns the module and
    where it came from."""
    import importlib

    try:
        return importlib.import_module(name), "installed"
    except ImportError:
        wheels = sorted(folder.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"run_suite: {name} is not installed and {folder} holds no wheels; "
                             f"run `bash benchmarks/gpu/prepare_wheels.sh` first") from None
        for wheel in reversed(wheels):
            sys.path.insert(0, str(wheel))
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]  # a half-imported package from the first try
        return importlib.import_module(name), ", ".join(w.name for w in wheels)


# --------------------------------------------------------------------------------------------
# Models and scales
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SuiteModel:
    """One architecture the suite runs: its diffusers class, the job config whose model options,
    micro-batches and LoRA settings the cases use, and the cases (label, preset, training); a
    preset of None runs the job's own method as written (e.g. Flow-GRPO's on SD3.5)."""

    name: str  # --model
    title: str
    family: str  # model.family of the job
    transformer_class: str  # a diffusers class
    hub: str  # key of branchgrpo.resources.HUB_CONFIGS: the full-size config
    job: Path
    cases: tuple[tuple[str, str | None, str], ...]
    full_blocks: tuple[str, ...]  # what the "blocks" cases fine-tune fully at full size
    # whether another preset keeps the file's method section under it (FLUX.1, Wan: steps, η, rates); False
    # when that section pins another method (SD3.5's Flow-GRPO flat group): only its micro-batches are kept
    method_fits_presets: bool = True


FLUX_CASES = (("branchgrpo", "branchgrpo", "lora"), ("dancegrpo", "dancegrpo", "lora"),
              ("branchgrpo", "branchgrpo", "blocks"))
MODELS: dict[str, SuiteModel] = {
    "flux-dev": SuiteModel(
        "flux-dev", "FLUX.1-dev transformer", "flux", "FluxTransformer2DModel", "flux-dev", CONFIG, FLUX_CASES,
        ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
         "single_transformer_blocks.1")),
    # Flow-GRPO's own job (24 independent roots, 10 steps, CFG 4.5, LoRA r32, KL 0.01) and BranchGRPO's tree
    "sd3.5-medium": SuiteModel(
        "sd3.5-medium", "SD3.5-medium transformer", "sd3", "SD3Transformer2DModel", "sd3.5-medium",
        ROOT / "configs" / "sd35-medium-flowgrpo.yaml",
        (("flowgrpo", None, "lora"), ("branchgrpo", "branchgrpo", "lora"), ("branchgrpo", "branchgrpo", "blocks")),
        ("transformer_blocks.0", "transformer_blocks.1"), method_fits_presets=False),
    "wan2.1-1.3b": SuiteModel(
        "wan2.1-1.3b", "Wan2.1-T2V-1.3B transformer", "wan", "WanTransformer3DModel", "wan2.1-t2v-1.3b",
        ROOT / "configs" / "wan21-1.3b-branchgrpo.yaml",
        # dancegrpo last: ~3.4× the tree's calls, the budget may skip it
        (("branchgrpo", "branchgrpo", "lora"), ("branchgrpo", "branchgrpo", "blocks"),
         ("dancegrpo", "dancegrpo", "lora")),
        ("blocks.0", "blocks.1")),
}


@dataclass(frozen=True)
class Scale:
    """The model and job sizes of one suite run."""

    name: str
    config: dict[str, Any]  # the transformer class's kwargs
    text_tokens: int  # tokens per text row (SD3: CLIP's 77 + T5's)
    sizes: tuple[int, ...]  # image sizes in pixels (square; video: the height), first measured first
    steps: int
    lora_rank: int
    blocks: tuple[str, ...]  # what the "blocks" cases fine-tune fully
    device: str
    weights_dtype: str  # frozen weights; trained tensors are float32 masters (use_master_weights)
    budget_s: float
    micro_batches: tuple[int, int] | None = None  # (rollout, train); None: the job config's
    checkpointing: bool = True  # gradient checkpointing of every block in the update (the job config's)
    train_micro_batch: int | None = None  # overrides micro_batches' / the job config's training micro-batch
    model: str = "flux-dev"  # a key of MODELS
    widths: tuple[tuple[int, int], ...] = ()  # (height, width) where a size is not square (Wan's 480 × 832)
    frames: int | None = None  # video frames (Wan)

    @property
    def suite_model(self) -> SuiteModel:
        return MODELS[self.model]

    def width(self, size: int) -> int:
        return dict(self.widths).get(size, size)


def hub_config(name: str) -> dict[str, Any]:
    from branchgrpo.resources import HUB_CONFIGS

    return {k: v for k, v in HUB_CONFIGS[name].items() if not k.startswith("_")}


def flux_dev_config() -> dict[str, Any]:
    return hub_config("flux-dev")


SD3_CLIP_TOKENS = 77  # CLIP-L/G's padded length before the T5 tokens (branchgrpo.resources.families)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "flux-dev": {"in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                 "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]},
    "sd3.5-medium": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
                     "num_attention_heads": 2, "joint_attention_dim": 12, "caption_projection_dim": 16,
                     "pooled_projection_dim": 10, "out_channels": 4, "pos_embed_max_size": 16,
                     "dual_attention_layers": [0], "qk_norm": "rms_norm"},
    "wan2.1-1.3b": {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
                    "out_channels": 4, "text_dim": 12, "freq_dim": 16, "ffn_dim": 40, "num_layers": 2,
                    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
}


def full_scale(model: str = "flux-dev") -> Scale:
    """The model at its hub size on one GPU in bf16, at the job's text length and resolutions."""
    m = MODELS[model]
    common = dict(steps=20, lora_rank=32, blocks=m.full_blocks, device="cuda", weights_dtype="bfloat16",
                  budget_s=400.0, model=model)
    if m.family == "sd3":  # Flow-GRPO's 512² and SD3.5's native 1024²; its job samples 10 steps
        return Scale("full", hub_config(m.hub), SD3_CLIP_TOKENS + 128, (512, 1024), **{**common, "steps": 10})
    if m.family == "wan":  # the job's 480 × 832, 33 frames (14,040 tokens), UMT5's 512 tokens; 10 steps (the
        # preset's splits fit) so that an iteration is ~2 min, not ~8: per-call speed and memory are the job's
        return Scale("full", hub_config(m.hub), 512, (480,), widths=((480, 832),), frames=33,
                     **{**common, "steps": 10})
    return Scale("full", hub_config(m.hub), 512, (720, 512), **common)


def tiny_scale(model: str = "flux-dev") -> Scale:
    """The same code on CPU in float32 with a 2-block model of the architecture (the tests)."""
    m = MODELS[model]
    blocks = {"flux": ("transformer_blocks.0", "single_transformer_blocks.0"), "sd3": ("transformer_blocks.0",),
              "wan": ("blocks.0",)}[m.family]
    common = dict(steps=10, lora_rank=4, blocks=blocks, device="cpu", weights_dtype="float32", budget_s=400.0,
                  micro_batches=(64, 32), model=model)
    if m.family == "sd3":
        return Scale("tiny", TINY_CONFIGS[model], SD3_CLIP_TOKENS + 3, (32,), **common)
    if m.family == "wan":
        return Scale("tiny", TINY_CONFIGS[model], 7, (16,), widths=((16, 32),), frames=5, **common)
    return Scale("tiny", TINY_CONFIGS[model], 8, (64, 32), **common)


SCALES: dict[str, Callable[..., Scale]] = {"full": full_scale, "tiny": tiny_scale}


@dataclass(frozen=True)
class Case:
    preset: str  # a preset's name, or (own_method) the label of the job's own method, e.g. flowgrpo
    size: int
    training: str  # "lora" (rank scale.lora_rank) or "blocks" (scale.blocks fully trained)
    own_method: bool = False  # the job's preset and method as its file writes them

    @property
    def name(self) -> str:
        return f"{self.preset}-{self.size}-{self.training}"


def all_cases(scale: Scale) -> list[Case]:
    return [Case(label, size, training, preset is None)
            for size in scale.sizes for label, preset, training in scale.suite_model.cases]


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------

def build_transformer(config: dict[str, Any], device, dtype, seed: int,
                      class_name: str = "FluxTransformer2DModel"):
    """``diffusers.<class_name>(**config)`` with random weights made directly on ``device`` in
    ``dtype``: parameters built on the meta device (buffers, e.g. rotary tables and positional
    embeddings, computed as usual on the CPU), cast, ``to_empty`` (one allocation of the final
    size, no float32 copy), the buffers copied back, then ``N(0, INIT_STD²)`` matrices, zero biases,
    unit norm weights."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = getattr(diffusers, class_name)(**config)
    torch.nn.Module.to(model, dtype=dtype)  # nn.Module's: diffusers' own .to warns about fp32 modules
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, buffer in buffers.items():
            model.get_buffer(name).copy_(buffer)
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model


def prepare_training(transformer, case: Case, scale: Scale, lora: Any = None) -> None:
    """LoRA (the trainer's ``add_lora`` with ``lora``, a :class:`LoraSpec`; default rank
    ``scale.lora_rank`` on FLUX.1's targets) or full training of ``scale.blocks``; checkpointing as
    ``scale.checkpointing`` says."""
    if case.training == "lora":
        from branchgrpo.models.lora import LoraSpec, add_lora

        add_lora(transformer, lora or LoraSpec(rank=scale.lora_rank))
    else:
        transformer.requires_grad_(False)
        for prefix in scale.blocks:
            transformer.get_submodule(prefix).requires_grad_(True)
    if scale.checkpointing:
        transformer.enable_gradient_checkpointing()
