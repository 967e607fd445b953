"""Atomic, resumable checkpoints.

A checkpoint is a folder ``checkpoints/iter_XXXXXX`` holding the trainable weights (and EMA) as
safetensors, the optimizer state (``torch.save`` of tensors only; read back with
``weights_only=True``), the RNG states and ``trainer_state.json``. It is written under a
temporary name, completed with a ``COMPLETE`` marker, then renamed into place, so a folder with
that name and marker is always whole; ``resume=auto`` only ever picks such a folder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
PREFIX = "iter_"


@dataclass
class TrainerState:
    """Everything besides tensors that a resume restores."""

    iteration: int
    prompt_position: int
    eval_reward_start: float | None = None
    eval_reward_last: float | None = None


def checkpoint_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"{PREFIX}{iteration:06d}"


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    root: Path,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 3,
    rank_rng_states: list[torch.Tensor] | None = None,
) -> Path:
    """Write ``root/iter_XXXXXX`` atomically and delete all but the newest ``keep`` complete ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.iteration)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_state_tensors(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch_cpu": torch.get_rng_state()}
    for rank, state_tensor in enumerate(rank_rng_states or []):
        rng[f"torch_cpu_rank{rank}"] = state_tensor
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2) + "\n")
    for path in tmp.iterdir():  # make the bytes durable before the marker says they are
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    (tmp / MARKER).write_text(json.dumps({"iteration": state.iteration}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary and unmarked folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_resume(root: Path, resume: str | None) -> Path | None:
    """``None`` → no resume; ``auto`` → newest complete checkpoint (or none yet); else a path."""
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint folder (no {MARKER} marker)")
    return path


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """Restore weights, optimizer and RNG states; returns the trainer state and the EMA tensors."""
    path = Path(path)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng.get(f"torch_cpu_rank{rank}", rng["torch_cpu"]))
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    return state, ema
