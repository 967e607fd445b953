"""torch.distributed at the edge: process-group set-up, gradient sums, metric reductions.

Launch with ``torchrun --nproc-per-node N -m branchgrpo train ...`` (gloo on CPU, NCCL on GPU;
multi-node through torchrun's rendezvous flags). Each rank rolls out whole trees for its share of
the prompts, so advantages need no communication; the only traffic is one gradient reduction per
optimizer step and a few scalars for logging.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from branchgrpo.update import GradientSync


def launched_distributed() -> bool:
    """True when started by torchrun (or anything setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class DistributedContext(GradientSync):
    """Rank/world info and the reductions the trainer needs (also the update's GradientSync)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def initialise(cls, device: torch.device) -> "DistributedContext":
        """Join the process group torchrun describes; a single process gets a no-op context."""
        if not launched_distributed():
            return cls()
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        return cls(rank, world, local_rank)

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per local rank."""
        if requested.type == "cuda" and self.active:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    def _reduce(self, value: torch.Tensor, op) -> torch.Tensor:
        if self.active:
            dist.all_reduce(value, op=op)
        return value

    def _tensor(self, values) -> torch.Tensor:
        device = torch.device("cuda", self.local_rank) if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
        return torch.tensor(values, dtype=torch.float64, device=device)

    # GradientSync
    def sum(self, value: float) -> float:
        return float(self._reduce(self._tensor([value]), dist.ReduceOp.SUM if self.active else None)[0])

    def any(self, flag: bool) -> bool:
        return bool(self._reduce(self._tensor([float(flag)]), dist.ReduceOp.MAX if self.active else None)[0] > 0)

    def gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)

    # metrics and bookkeeping
    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (every rank holds the same number of prompts)."""
        if not self.active or not values:
            return dict(values)
        keys = sorted(values)
        reduced = self._reduce(self._tensor([float(values[k]) for k in keys]), dist.ReduceOp.SUM) / self.world_size
        return dict(zip(keys, reduced.tolist()))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from all ranks (rank order)."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank start from rank 0's weights."""
        if self.active:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_objects(self, obj):
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
