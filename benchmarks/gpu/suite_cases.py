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
# Scales
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """The model and job sizes of one suite run."""

    name: str
    config: dict[str, Any]  # FluxTransformer2DModel kwargs
    text_tokens: int
    sizes: tuple[int, ...]  # image sizes in pixels (square), first measured first
    steps: int
    lora_rank: int
    blocks: tuple[str, ...]  # what the "blocks" cases fine-tune fully
    device: str
    weights_dtype: str  # frozen weights; trained tensors are float32 masters (use_master_weights)
    budget_s: float
    micro_batches: tuple[int, int] | None = None  # (rollout, train); None: the job config's (16, 4)
    checkpointing: bool = True  # gradient checkpointing of every block in the update (the job config's)
    train_micro_batch: int | None = None  # overrides micro_batches' / the job config's training micro-batch


def flux_dev_config() -> dict[str, Any]:
    from branchgrpo.resources import HUB_CONFIGS

    return {k: v for k, v in HUB_CONFIGS["flux-dev"].items() if not k.startswith("_")}


SCALES: dict[str, Callable[[], Scale]] = {
    "full": lambda: Scale(
        "full", flux_dev_config(), text_tokens=512, sizes=(720, 512), steps=20, lora_rank=32,
        blocks=("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                "single_transformer_blocks.1"),
        device="cuda", weights_dtype="bfloat16", budget_s=400.0),
    "tiny": lambda: Scale(
        "tiny", {"in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
                 "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                 "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]},
        text_tokens=8, sizes=(64, 32), steps=10, lora_rank=4,
        blocks=("transformer_blocks.0", "single_transformer_blocks.0"),
        device="cpu", weights_dtype="float32", budget_s=400.0, micro_batches=(64, 32)),
}
PRESETS_AND_TRAINING = (("branchgrpo", "lora"), ("dancegrpo", "lora"), ("branchgrpo", "blocks"))


@dataclass(frozen=True)
class Case:
    preset: str
    size: int
    training: str  # "lora" (rank scale.lora_rank) or "blocks" (scale.blocks fully trained)

    @property
    def name(self) -> str:
        return f"{self.preset}-{self.size}-{self.training}"


def all_cases(scale: Scale) -> list[Case]:
    return [Case(preset, size, training) for size in scale.sizes for preset, training in PRESETS_AND_TRAINING]


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------

def build_transformer(config: dict[str, Any], device, dtype, seed: int):
    """``FluxTransformer2DModel(**config)`` with random weights made directly on ``device`` in
    ``dtype``: built on the meta device, cast there, ``to_empty`` (one allocation of the final
    size, no float32 copy), then ``N(0, INIT_STD²)`` matrices, zero biases, unit norm weights."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    torch.nn.Module.to(model, dtype=dtype)  # nn.Module's: diffusers' own .to warns about fp32 modules
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, INIT_STD, generator=generator)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model


def prepare_training(transformer, case: Case, scale: Scale) -> None:
    """LoRA (the trainer's ``add_lora``) or full training of ``scale.blocks``; checkpointing as
    ``scale.checkpointing`` says."""
    if case.training == "lora":
        from branchgrpo.models.lora import LoraSpec, add_lora

        add_lora(transformer, LoraSpec(rank=scale.lora_rank))
    else:
        transformer.requires_grad_(False)
        for prefix in scale.blocks:
            transformer.get_submodule(prefix).requires_grad_(True)
    if scale.checkpointing:
        transformer.enable_gradient_checkpointing()
