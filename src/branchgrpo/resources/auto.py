"""``engine.rollout_micro_batch: auto`` / ``engine.train_micro_batch: auto``: the largest power of
two whose working set fits the free device memory, from the plan's per-row estimate.

Resolved once, after the policy is loaded and before the first iteration
(:func:`resolve_micro_batches`, called from ``train/components.py`` ``build_policy``), logged,
and made identical on every rank (the minimum over ranks when ``torch.distributed`` is
initialised). On CPU, and for families the plan does not cover, ``auto`` becomes the defaults.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULTS = {"rollout_micro_batch": 64, "train_micro_batch": 16}
SAFETY = 0.8  # the share of free memory the working set may use (fragmentation, kernels' workspace)
FIELDS = {"rollout_micro_batch": "rollout", "train_micro_batch": "update"}


def choose_micro_batch(free_bytes: int, fixed_bytes: int, per_row_bytes: int, limit: int,
                       safety: float = SAFETY) -> int:
    """The largest power of two ``b <= limit`` with ``fixed_bytes + b·per_row_bytes <=
    safety·free_bytes``; 1 when not even one row fits (the run then fails the way a fixed
    micro-batch of 1 would, with the allocator's message) or ``limit < 1``."""
    if per_row_bytes <= 0:
        raise ValueError(f"per_row_bytes must be > 0, got {per_row_bytes}")
    budget = safety * free_bytes - fixed_bytes
    batch = 1
    while batch * 2 <= limit and batch * 2 * per_row_bytes <= budget:
        batch *= 2
    return batch


def _phase_costs(config: Any, processes: int, field: str) -> tuple[int, int, int] | None:
    """(fixed bytes beyond the resident weights, bytes per row, rows per iteration) of the phase
    ``field`` micro-batches, from :func:`branchgrpo.resources.job.estimate_job` at micro-batches
    1 and 2 (their difference is the per-row cost); None when the plan does not cover the family."""
    import copy

    from branchgrpo.resources.job import estimate_job, transformer_config

    try:
        arch, _ = transformer_config(config.model.family, config.model.path, config.model.options)
    except ValueError:
        return None
    peaks = []
    for rows in (1, 2):
        job = copy.deepcopy(config)
        job.method.engine.rollout_micro_batch = job.method.engine.train_micro_batch = rows
        try:
            estimate = estimate_job(job, arch, processes)
        except ValueError:
            return None
        peaks.append(estimate.phase_peak(FIELDS[field]))
    per_row = peaks[1] - peaks[0]
    weights = sum(r.device for r in estimate.persistent[:2])  # frozen + trained weights: already on the device
    fixed = max(peaks[0] - per_row - weights, 0)
    limit = estimate.forwards["rollout" if field == "rollout_micro_batch" else "training"]
    return fixed, per_row, max(limit, 1)


def resolve_micro_batches(config: Any, device: torch.device) -> dict[str, int]:
    """Replace ``auto`` in ``config.method.engine`` by a number (in place) and return what was
    chosen for each ``auto`` field."""
    engine = config.method.engine
    auto = [name for name in DEFAULTS if getattr(engine, name) == "auto"]
    if not auto:
        return {}
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    processes = torch.distributed.get_world_size() if dist else 1
    chosen = {}
    for name in auto:
        value, why = DEFAULTS[name], "default (not CUDA)"
        if device.type == "cuda":
            costs = _phase_costs(config, processes, name)
            if costs is None:
                why = f"default (no plan estimate for model.family={config.model.family})"
            else:
                free, _ = torch.cuda.mem_get_info(device)
                fixed, per_row, limit = costs
                value = choose_micro_batch(free, fixed, per_row, limit)
                why = (f"{free / 2 ** 30:.2f} GiB free, {fixed / 2 ** 30:.2f} GiB fixed, "
                       f"{per_row / 2 ** 30:.3f} GiB per row, at most {limit} rows")
        chosen[name] = (value, why)
    if dist:  # one value on every rank: the smallest
        on_cuda = device.type == "cuda" and torch.distributed.get_backend() == "nccl"
        values = torch.tensor([chosen[n][0] for n in auto], dtype=torch.int64, device=device if on_cuda else "cpu")
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MIN)
        chosen = {n: (int(v), why + " (min over ranks)") for (n, (_, why)), v in zip(chosen.items(), values.tolist())}
    main = not dist or torch.distributed.get_rank() == 0
    for name, (value, why) in chosen.items():
        setattr(engine, name, value)
        log.info("engine.%s=auto -> %d (%s)", name, value, why)
        if main:
            print(f"engine.{name}=auto -> {value} ({why})", flush=True)
    return {name: value for name, (value, _) in chosen.items()}
