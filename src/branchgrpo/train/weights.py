"""Saving and loading trained weights as safetensors (atomic), with the module's config; the
finiteness check every saved tensor passes first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from branchgrpo.atomic import atomic_save_safetensors
from branchgrpo.config import ConfigError

__all__ = ["NonFiniteWeightsError", "atomic_save_safetensors", "load_weights", "nonfinite_tensors", "save_weights"]


class NonFiniteWeightsError(RuntimeError):
    """Weights (or optimizer state) hold NaN/Inf: training cannot go on from them and they are not saved."""


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or ±Inf (a sharded DTensor: this rank's shard)."""
    bad = []
    for name, value in tensors.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def save_weights(module: torch.nn.Module, folder: Path, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """``folder/model.safetensors`` (+ ``config.json`` for diffusers/transformers modules).

    ``state``: the tensors to write (default ``module.state_dict()``); an FSDP run passes the
    gathered whole state (:func:`branchgrpo.train.checkpoint.full_model_state`).
    """
    folder = Path(folder)
    state = module.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteWeightsError(f"refusing to write {folder / 'model.safetensors'}: {len(bad)} of {len(state)} "
                                    f"tensors hold NaN/Inf (first: {bad[0]})")
    path = atomic_save_safetensors(state, folder / "model.safetensors")
    config = getattr(module, "config", None)
    if config is not None:
        try:
            (folder / "config.json").write_text(json.dumps(dict(config), indent=2, default=str) + "\n")
        except (TypeError, ValueError):
            pass
    return path


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Strictly load a safetensors state dict (a file or a folder holding ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError("--weights", f"{path} is not a readable safetensors file ({err})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or ["mismatch"])[0]
        raise ConfigError("--weights", f"{path} does not fit this model ({first}); pass the weights of a run "
                          "with the same model settings") from None
