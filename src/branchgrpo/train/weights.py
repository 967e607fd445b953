"""Saving and loading trained weights as safetensors (atomic), with the module's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from branchgrpo.atomic import atomic_save_safetensors

__all__ = ["atomic_save_safetensors", "save_weights", "load_weights"]


def save_weights(module: torch.nn.Module, folder: Path, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """``folder/model.safetensors`` (+ ``config.json`` for diffusers/transformers modules).

    ``state``: the tensors to write (default ``module.state_dict()``); an FSDP run passes the
    gathered whole state (:func:`branchgrpo.train.checkpoint.full_model_state`).
    """
    folder = Path(folder)
    state = module.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
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
    module.load_state_dict(load_file(str(path)), strict=True)
