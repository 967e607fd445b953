"""Atomic, resumable checkpoints.

A checkpoint is a folder ``checkpoints/iter_XXXXXX`` holding the trainable weights (and EMA) as
safetensors, the optimizer state (``torch.save`` of tensors only; read back with
``weights_only=True``), the RNG states and ``trainer_state.json``. It is written under a
temporary name, completed with a ``COMPLETE`` marker, then renamed into place, so a folder with
that name and marker is always whole; ``resume=auto`` only ever picks such a folder.

Tensors are always stored whole (unsharded), whatever wrote them: with FSDP every rank joins the
all-gather of each tensor (:func:`full_model_state`, :func:`full_optimizer_state`) and rank 0
writes, and on load every rank keeps its own slice (:func:`load_checkpoint`). So a checkpoint
written by N FSDP processes resumes in one process and vice versa. (The gathering is done per
tensor rather than through ``torch.distributed.checkpoint.state_dict``: the trainable module of a
LoRA run is a :class:`~branchgrpo.models.lora.LoraWeights` view whose names do not resolve as
attribute paths, which those helpers need; the result is the same full, rank-0, CPU state dict.)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from branchgrpo.train.distributed import full_tensor, place_like

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


def full_state(state: Mapping[str, Tensor], keep: bool = True) -> dict[str, Tensor]:
    """Whole CPU copies of a state dict's tensors (sharded ones all-gathered: with FSDP every rank
    calls this; only those with ``keep`` get the tensors, the others an empty dict)."""
    out = {}
    for name, value in state.items():  # the same order on every rank
        full = full_tensor(value, keep)
        if keep:
            out[name] = full.contiguous()
    return out


def full_model_state(module: torch.nn.Module, keep: bool = True) -> dict[str, Tensor]:
    """``module.state_dict()`` unsharded, on the CPU (see :func:`full_state`)."""
    return full_state(module.state_dict(), keep)


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` (keyed by parameter index) with every state tensor unsharded."""
    state_dict = optimizer.state_dict()
    state = {}
    for index in sorted(state_dict["state"]):
        entry = state_dict["state"][index]
        state[index] = {key: full_tensor(entry[key], keep) if torch.is_tensor(entry[key]) else entry[key]
                        for key in sorted(entry)}
    return {"state": state, "param_groups": state_dict["param_groups"]} if keep else {}


def _place_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved (whole) optimizer state with each parameter-shaped tensor placed like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        state[index] = {
            key: place_like(value, param) if torch.is_tensor(value) and value.shape == param.shape else value
            for key, value in entry.items()
        }
    return {"state": state, "param_groups": saved["param_groups"]}


def save_checkpoint(
    root: Path,
    state: TrainerState,
    model_state: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any],
    ema: Mapping[str, Tensor] | None = None,
    keep: int = 3,
    rank_rng_states: list[Tensor] | None = None,
) -> Path:
    """Write ``root/iter_XXXXXX`` atomically and delete all but the newest ``keep`` complete ones.

    ``model_state``/``optimizer_state``/``ema``: whole tensors (:func:`full_model_state`,
    :func:`full_optimizer_state`, :func:`full_state`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.iteration)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(dict(optimizer_state), tmp / "optimizer.pt")
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
) -> tuple[TrainerState, dict[str, Tensor] | None]:
    """Restore weights, optimizer and RNG states; returns the trainer state and the (whole) EMA tensors.

    Works for plain and FSDP-sharded modules alike: tensors are read one at a time and each rank
    keeps its shard, so the file's writer may have run on any number of processes.
    """
    path = Path(path)
    current = model.state_dict()
    placed = {}
    with safe_open(str(path / "model.safetensors"), framework="pt", device="cpu") as handle:
        for name in handle.keys():
            value = handle.get_tensor(name)
            placed[name] = place_like(value, current[name]) if name in current else value
    model.load_state_dict(placed, strict=True)
    saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu", mmap=True)
    optimizer.load_state_dict(_place_optimizer_state(optimizer, saved))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng.get(f"torch_cpu_rank{rank}", rng["torch_cpu"]))
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    return state, ema
