"""Atomic, resumable checkpoints.

A checkpoint is a folder ``checkpoints/iter_XXXXXX`` holding the trainable weights (and EMA) as
safetensors, the optimizer state (``torch.save`` of tensors only; read back with
``weights_only=True``), the RNG states and ``trainer_state.json``. It is written under a
temporary name, completed with a ``COMPLETE`` marker, then renamed into place, so a folder with
that name and marker was whole when written. The marker is also the manifest: it records every
file's size and SHA-256, and a resume checks them (:func:`verify_checkpoint`): ``resume=auto``
takes the newest checkpoint that passes and sets damaged newer ones aside with a warning, so a
checkpoint damaged after it was written (a disk fault, a partial copy) never stops a resume.
Nothing non-finite is ever written: :func:`save_checkpoint` refuses weights, EMA or optimizer
state holding NaN/Inf.

Tensors are always stored whole (unsharded), whatever wrote them: with FSDP every rank joins the
all-gather of each tensor (:func:`full_model_state`, :func:`full_optimizer_state`) and rank 0
writes, and on load every rank keeps its own slice (:func:`load_checkpoint`). So a checkpoint
written by N FSDP processes resumes in one process and vice versa. (The gathering is done per
tensor rather than through ``torch.distributed.checkpoint.state_dict``: the trainable module of a
LoRA run is a :class:`~branchgrpo.models.lora.LoraWeights` view whose names do not resolve as
attribute paths, which those helpers need; the result is the same full, rank-0, CPU state dict.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from branchgrpo.config import ConfigError
from branchgrpo.train.distributed import full_tensor, place_like
from branchgrpo.train.weights import NonFiniteWeightsError, nonfinite_tensors

MARKER = "COMPLETE"
PREFIX = "iter_"
DAMAGED_PREFIX = "damaged-"  # a checkpoint that failed its checks, set aside (kept for inspection)
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json")
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files do not match its manifest (or cannot be read back)."""

    def __init__(self, message: str):
        super().__init__("run.resume", message)


@dataclass
class TrainerState:
    """Everything besides tensors that a resume restores."""

    iteration: int
    prompt_position: int
    eval_reward_start: float | None = None
    eval_reward_last: float | None = None
    split_placement: dict | None = None  # tree.adaptive_splits: the plan in force and its statistics


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
    """A saved (whole) optimizer state with each parameter-shaped tensor placed like its parameter; the
    kernel choice (``fused``/``foreach``) stays this optimizer's, which suits where its parameters live
    now (a state saved by one process may be loaded into FSDP shards, which the fused kernel skips)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        state[index] = {
            key: place_like(value, param) if torch.is_tensor(value) and value.shape == param.shape else value
            for key, value in entry.items()
        }
    groups = [{**group, **{key: own[key] for key in ("fused", "foreach") if key in own}}
              for group, own in zip(saved["param_groups"], optimizer.param_groups)]
    return {"state": state, "param_groups": groups}


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
    _refuse_nonfinite(state.iteration, model_state, optimizer_state, ema)
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
    files = {}
    for path in sorted(tmp.iterdir()):  # make the bytes durable before the marker says they are
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"iteration": state.iteration, "files": files}
    with open(tmp / MARKER, "w") as handle:
        handle.write(json.dumps(manifest, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    old = None
    if final.exists():  # out of the way first (one rename), so no half-deleted folder keeps the name
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _refuse_nonfinite(iteration: int, model_state: Mapping[str, Tensor], optimizer_state: Mapping[str, Any],
                      ema: Mapping[str, Tensor] | None) -> None:
    """A checkpoint never holds NaN/Inf: it would be resumed from and poison every later iteration."""
    flat_optimizer = {f"{index}.{key}": value for index, entry in optimizer_state.get("state", {}).items()
                      for key, value in entry.items() if torch.is_tensor(value)}
    for what, tensors in (("weights", model_state), ("EMA weights", ema or {}), ("optimizer state", flat_optimizer)):
        bad = nonfinite_tensors(tensors)
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to write checkpoint {PREFIX}{iteration:06d}: {len(bad)} of {len(tensors)} {what} tensors "
                f"hold NaN/Inf (first: {bad[0]}); the newest checkpoint before it is unchanged")


def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    """Hex SHA-256 of a file, read in 8 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty when it is whole).

    Checks the manifest in its marker: every required file listed and present with the recorded size
    and SHA-256. A marker without a file list (written before manifests existed) is taken on trust
    for the checksums; its files must still be there.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return [f"no {MARKER} marker"]
    except (OSError, ValueError) as err:
        return [f"its {MARKER} marker cannot be read ({err})"]
    if not isinstance(manifest, dict):
        return [f"its {MARKER} marker is not a manifest"]
    files = manifest.get("files")
    if files is None:  # an older checkpoint: no checksums recorded
        return [f"{name} is missing" for name in REQUIRED_FILES if not (path / name).is_file()]
    if not isinstance(files, dict):
        return [f"its {MARKER} marker lists no files"]
    problems = [f"{name} is not in the manifest" for name in REQUIRED_FILES if name not in files]
    for name, expected in files.items():
        file = path / name
        if not isinstance(expected, dict) or "/" in name or name.startswith("."):
            problems.append(f"bad manifest entry {name!r}")
        elif not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != expected.get("size"):
            problems.append(f"{name} has {file.stat().st_size} bytes, the manifest says {expected.get('size')}")
        elif file_sha256(file) != expected.get("sha256"):
            problems.append(f"{name} does not match its SHA-256")
    return problems


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete (marked) checkpoint folders, oldest first; temporary, unmarked, set-aside and
    other folders are ignored. Their files are not checked here (see :func:`find_resume`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and p.is_dir() and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def find_resume(root: Path, resume: str | None, set_aside: bool = False) -> Path | None:
    """The checkpoint a run continues from, checked (:func:`verify_checkpoint`).

    ``None`` → no resume; ``"auto"`` → the newest complete checkpoint in ``root`` that passes its
    checks (or ``None`` when there is none yet); each newer damaged one is reported on stderr and,
    with ``set_aside``, renamed ``damaged-iter_XXXXXX`` so it is neither resumed nor pruned. When
    checkpoints exist but none passes, raises :class:`DamagedCheckpoint`. Any other value is a
    checkpoint folder, which must pass.
    """
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise ConfigError("run.resume", f"{path} is not a complete checkpoint folder (no {MARKER} marker)")
        problems = verify_checkpoint(path)
        if problems:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {'; '.join(problems)}; resume from another "
                                    "(run.resume=auto takes the newest good one)")
        return path
    damaged = []
    for path in reversed(complete_checkpoints(root)):
        problems = verify_checkpoint(path)
        if problems:
            damaged.append(path)
            _warn(f"checkpoint {path} is damaged ({'; '.join(problems)}); trying the one before it")
            continue
        for bad in damaged if set_aside else []:  # only once a good one is found: a failed start changes nothing
            aside = bad.with_name(DAMAGED_PREFIX + bad.name)
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
        if damaged:
            names = ", ".join(p.name for p in damaged)
            _warn(f"resuming from {path.name}, the newest checkpoint that passes its checks"
                  + (f" ({names} set aside as {DAMAGED_PREFIX}*)" if set_aside else ""))
        return path
    if damaged:
        raise DamagedCheckpoint(f"no checkpoint in {root} passes its checks ({len(damaged)} damaged); "
                                "start over with run.overwrite=true (without run.resume) or restore the files")
    return None


def _warn(text: str) -> None:
    print(f"branchgrpo: warning: {text}", file=sys.stderr)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0, verify: bool = True
) -> tuple[TrainerState, dict[str, Tensor] | None]:
    """Restore weights, optimizer and RNG states; returns the trainer state and the (whole) EMA tensors.

    Works for plain and FSDP-sharded modules alike: tensors are read one at a time and each rank
    keeps its shard, so the file's writer may have run on any number of processes. ``verify``:
    check the files against the manifest first (skip it for a path :func:`find_resume` just checked).
    A checkpoint that does not fit ``model``/``optimizer`` is one :class:`ConfigError` line.
    """
    path = Path(path)
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    try:
        return _load(path, model, optimizer, rank)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError("run.resume", f"checkpoint {path} does not fit this model and optimizer ({first}); "
                          "resume with the settings the run was started with") from None


def _load(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> tuple[TrainerState, dict[str, Tensor] | None]:
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
