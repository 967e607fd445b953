"""Export trained weights in formats diffusers loads directly.

- :func:`export_lora` writes a LoRA ``.safetensors`` file in diffusers' convention through the
  pipeline's own ``save_lora_weights`` (peft's ``get_peft_model_state_dict`` + the adapter's
  ``LoraConfig`` as metadata, so rank and alpha come back exactly): load it with
  ``pipe.load_lora_weights(path)``.
- :func:`export_full` writes a complete diffusers folder (``DiffusionPipeline.from_pretrained``):
  the transformer (LoRA merged in, if any) saved with ``save_pretrained`` as safetensors, every
  other component symlinked or copied from the base folder — or saved from in-memory components.

Pipelines are inferred from the transformer class (``SD3Transformer2DModel`` →
``StableDiffusion3Pipeline``, ``FluxTransformer2DModel`` → ``FluxPipeline``, ``WanTransformer3DModel`` →
``WanPipeline``) or given.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from branchgrpo.models.lora import has_lora, lora_config_dict, lora_state_dict

LinkMode = Literal["symlink", "copy", "hardlink"]

_PIPELINES = {
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
    "FluxTransformer2DModel": "FluxPipeline",  # FLUX.1 Kontext's too: its LoRA files load in FluxKontextPipeline
    "Flux2Transformer2DModel": "Flux2Pipeline",  # its LoRA files load in Flux2KleinPipeline too
    "QwenImageTransformer2DModel": "QwenImagePipeline",
    "WanTransformer3DModel": "WanPipeline",
    "ZImageTransformer2DModel": "ZImagePipeline",
}


def pipeline_class_for(transformer: torch.nn.Module, pipeline_class: Any = None):
    """The diffusers pipeline class that owns ``transformer`` (or ``pipeline_class`` if given)."""
    if pipeline_class is not None:
        return pipeline_class
    import diffusers

    for cls in type(transformer).__mro__:
        name = _PIPELINES.get(cls.__name__)
        if name is not None:
            return getattr(diffusers, name)
    raise ValueError(
        f"no known diffusers pipeline for {type(transformer).__name__}; pass pipeline_class= "
        f"(known: {', '.join(f'{k} → {v}' for k, v in _PIPELINES.items())})"
    )


def _atomic_target(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def _replace(tmp: Path, out: Path) -> None:
    """Move a finished temporary file/folder onto ``out`` (replacing an old one)."""
    if out.is_dir() and not out.is_symlink():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def export_lora(
    transformer: torch.nn.Module,
    out_file: str | os.PathLike,
    *,
    pipeline_class: Any = None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the transformer's LoRA as a file that ``pipe.load_lora_weights(out_file)`` accepts.

    Args:
        transformer: a transformer with LoRA injected by :func:`branchgrpo.models.lora.add_lora`.
        out_file: target ``.safetensors`` path (written atomically).
        pipeline_class: the pipeline whose ``save_lora_weights`` writes the file (default: inferred).
        dtype: cast the LoRA tensors (e.g. ``torch.bfloat16``); default: as trained (float32).
    Returns the path written. Keys are ``transformer.<module>.lora_{A,B}.weight``; the adapter's
    ``LoraConfig`` (rank, alpha, targets) is stored as safetensors metadata.
    """
    out = Path(out_file)
    if out.suffix != ".safetensors":
        raise ValueError(f"a LoRA file is a .safetensors file, got {out}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    cls = pipeline_class_for(transformer, pipeline_class)
    state = lora_state_dict(transformer, adapter_name)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    metadata = lora_config_dict(transformer, adapter_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        cls.save_lora_weights(
            str(tmp), transformer_lora_layers=state, weight_name=out.name,
            transformer_lora_adapter_metadata=metadata,
        )
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merged_state_dict(transformer: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The transformer's state dict with every active LoRA merged into its base weight.

    Keys are the plain model's (no ``base_layer``/``lora_``); the live model is not modified.
    ``W' = W + Σ_adapters scaling·B·A`` is formed in float32 and cast to ``dtype`` (default: the
    base weight's dtype). A transformer without LoRA gives its own state dict.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, BaseTunerLayer) or module.merged or module.disable_adapters:
            continue
        adapters = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
        if adapters:
            deltas[f"{name}.weight"] = sum(module.get_delta_weight(a).float() for a in adapters)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in transformer.state_dict().items():
            if ".lora_" in key or key.startswith("lora_"):
                continue
            key = key.replace(".base_layer.", ".")
            value = value.detach()
            if key in deltas:
                value = (value.float() + deltas[key].to(value.device)).to(value.dtype)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[key] = value.to("cpu").contiguous()
    return out


def plain_transformer(transformer: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A LoRA-free model of the same class holding the merged weights (``transformer`` itself if it
    has no LoRA and no dtype change). Built on the meta device, then given the merged tensors, so
    no second random initialisation is allocated."""
    if not has_lora(transformer) and dtype is None:
        return transformer
    state = merged_state_dict(transformer, dtype)
    cls = type(transformer)
    try:
        with torch.device("meta"):
            fresh = cls.from_config(transformer.config)
        fresh.load_state_dict(state, strict=True, assign=True)
        leftovers = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
        if leftovers:
            raise RuntimeError(f"tensors left on the meta device: {leftovers[:3]}")
    except (RuntimeError, NotImplementedError, TypeError):
        fresh = cls.from_config(transformer.config)
        fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def _place(source: Path, target: Path, link: LinkMode) -> None:
    if link == "symlink":
        target.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    elif link == "copy":
        if source.is_dir():
            shutil.copytree(source, target, symlinks=False)
        else:
            shutil.copy2(source, target)
    elif link == "hardlink":
        if source.is_dir():
            shutil.copytree(source, target, copy_function=os.link)
        else:
            os.link(source, target)
    else:
        raise ValueError(f"link must be 'symlink', 'copy' or 'hardlink', got {link!r}")


def export_full(
    transformer: torch.nn.Module,
    base: str | os.PathLike | Mapping[str, Any] | Any,
    out_dir: str | os.PathLike,
    *,
    link: LinkMode = "symlink",
    pipeline_class: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers-loadable pipeline folder with the trained transformer.

    Args:
        transformer: the trained transformer; LoRA (if injected) is merged into the saved weights
            (the live model is unchanged).
        base: the base model's diffusers folder (with ``model_index.json``), a mapping of pipeline
            components (``{"vae": …, "text_encoder": …, "scheduler": …, …}``; any ``transformer``
            entry is replaced) or a ``DiffusionPipeline``.
        out_dir: the folder to create (built in a temporary sibling, then renamed into place).
        link: for a base folder, how the other components get there: ``symlink`` (absolute links,
            no disk cost — keep the base folder), ``copy`` or ``hardlink``. Top-level files such as
            ``model_index.json`` are always copied.
        pipeline_class: for in-memory components (default: inferred from the transformer).
        dtype: save the transformer in this dtype (default: its own).
    Returns ``out_dir``: ``StableDiffusion3Pipeline.from_pretrained(out_dir)`` (or FLUX's) loads it.
    """
    out = Path(out_dir)
    model = plain_transformer(transformer, dtype)
    if isinstance(base, (str, os.PathLike)):
        base_dir = Path(base).expanduser()
        if not (base_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{base_dir} is not a diffusers pipeline folder (no model_index.json)")
        if base_dir.resolve() == out.expanduser().resolve():
            raise ValueError("out_dir must differ from the base folder")
    tmp = _atomic_target(out, overwrite)
    try:
        if isinstance(base, (str, os.PathLike)):
            for entry in sorted(base_dir.iterdir()):
                if entry.name == "transformer" or entry.name.startswith("."):
                    continue
                _place(entry, tmp / entry.name, link if entry.is_dir() else "copy")
            model.save_pretrained(tmp / "transformer", safe_serialization=True)
        else:
            components = dict(getattr(base, "components", base))
            components["transformer"] = model
            cls = pipeline_class_for(model, pipeline_class)
            cls(**components).save_pretrained(str(tmp), safe_serialization=True)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["export_full", "export_lora", "merged_state_dict", "pipeline_class_for", "plain_transformer"]
