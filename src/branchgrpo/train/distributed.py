"""torch.distributed at the edge: process-group set-up, gradient sums, sharding, metric reductions.

Launch with ``torchrun --nproc-per-node N -m branchgrpo train ...`` (gloo on CPU, NCCL on GPU;
multi-node through torchrun's rendezvous flags). Each rank rolls out whole trees for its share of
the prompts, so advantages need no communication. Gradients meet in one of two ways
(``run.parallel``):

- ``ddp``: every rank holds the whole model; one flattened all-reduce per optimizer step sums the
  gradients (DDP semantics, :meth:`DistributedContext.gradients`);
- ``fsdp``: the transformer is sharded with FSDP2 (``fully_shard`` per block, then the root,
  :meth:`DistributedContext.shard`); parameters are all-gathered inside every forward and
  gradients reduce-scattered inside every backward, so the ranks must run the same number of
  forwards and backwards (the update pads with zero-gradient passes).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, distribute_tensor

from branchgrpo.update import GradientSync

# ModuleLists whose children FSDP shards one by one: diffusers' FLUX/SD3 (`transformer_blocks`,
# FLUX's `single_transformer_blocks`), Wan (`blocks`), and generic decoder stacks (`layers`).
BLOCK_LIST_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


def launched_distributed() -> bool:
    """True when started by torchrun (or anything setting WORLD_SIZE > 1: ``accelerate launch
    --multi_gpu`` runs torchrun's launcher, which sets RANK/WORLD_SIZE/LOCAL_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def accelerate_started_one_of_many() -> bool:
    """True when ``accelerate launch --num_processes N`` (N > 1) started only this process: without
    ``--multi_gpu`` and with fewer than 2 GPUs visible it runs its simple launcher, which sets
    MASTER_ADDR (for N > 1) and ACCELERATE_* but no WORLD_SIZE."""
    env = os.environ
    return "WORLD_SIZE" not in env and "MASTER_ADDR" in env and any(k.startswith("ACCELERATE_") for k in env)


class DistributedContext(GradientSync):
    """Rank/world info and the reductions the trainer needs (also the update's GradientSync)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.sharded = False  # True once shard() has wrapped the model (FSDP reduces gradients itself)
        self._owns_single_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def initialise(
        cls, device: torch.device, parallel: str = "ddp", cpu_offload: bool = False
    ) -> "DistributedContext":
        """Join the process group torchrun describes; a single process gets a no-op context.

        ``parallel="fsdp"``: a single process still gets a one-rank process group (FSDP needs one
        to shard over, e.g. for CPU offload on one GPU); reductions stay no-ops. ``cpu_offload``
        on GPUs adds gloo for CPU tensors next to NCCL: offloaded shards and their gradients are
        host tensors, and the gradient norm and the checkpoint gathers communicate them.
        """
        backend = ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl") if device.type == "cuda" else "gloo"
        if not launched_distributed():
            if accelerate_started_one_of_many():
                print("branchgrpo: warning: accelerate launch started 1 process (without --multi_gpu, accelerate runs "
                      "one process when fewer than 2 GPUs are visible); for N processes use accelerate launch "
                      "--multi_gpu --num_processes N (gloo on CPU) or torchrun --nproc-per-node N", file=sys.stderr)
            context = cls()
            if parallel == "fsdp" and not dist.is_initialized():
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
                context._owns_single_group = True
            return context
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if not dist.is_initialized():
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

    def max(self, value: float) -> float:
        return float(self._reduce(self._tensor([value]), dist.ReduceOp.MAX if self.active else None)[0])

    def gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active or self.sharded:  # FSDP reduce-scattered them inside backward
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
        """Make every rank start from rank 0's weights (before :meth:`shard`)."""
        if self.active:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    # FSDP2
    def shard(self, module: torch.nn.Module, compute_dtype: torch.dtype, cpu_offload: bool = False) -> None:
        """Shard ``module`` with FSDP2: ``fully_shard`` on every block of its block lists, then the root.

        Parameters become DTensors sharded on dim 0 (so the optimizer built afterwards holds only
        this rank's shard of the fp32 master weights and of its state). ``MixedPrecisionPolicy``:
        all-gathered parameters and the forward in ``compute_dtype`` (bf16) and gradients reduced
        and accumulated in fp32. Reduce-scatter *sums* (divide factor 1): the loss is already
        normalised by the edge count over all ranks, exactly as the DDP path sums. ``cpu_offload``
        keeps sharded parameters, gradients and optimizer state in host memory (the optimizer step
        then runs on the CPU). Needs a process group (also for one process).
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
        )

        if not dist.is_initialized():
            raise RuntimeError("FSDP needs a process group: create the context with parallel='fsdp'")
        device_type = next(module.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
        options = {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=None if compute_dtype == torch.float32 else compute_dtype, reduce_dtype=torch.float32
            ),
            # pinned host memory needs CUDA; on a CPU mesh "offload" only moves nothing
            "offload_policy": CPUOffloadPolicy(pin_memory=device_type == "cuda") if cpu_offload else OffloadPolicy(),
        }
        for block in transformer_blocks(module):
            fully_shard(block, **options)
        fully_shard(module, **options)
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.set_gradient_divide_factor(1.0)
                # a plain SUM collective: gloo has no PREMUL_SUM (what a custom factor maps to otherwise)
                sub.set_force_sum_reduction_for_comms(True)
        self.sharded = True

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
        if (self.active or self._owns_single_group) and dist.is_initialized():
            dist.destroy_process_group()


def transformer_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: children of ModuleLists named in ``BLOCK_LIST_NAMES``
    (outermost lists only, so a block's own inner lists stay inside its shard unit)."""
    blocks: list[torch.nn.Module] = []
    taken: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        if isinstance(child, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            blocks.extend(child)
            taken.append(name)
    return blocks


def full_tensor(value: Tensor, keep: bool = True) -> Tensor | None:
    """A plain CPU copy of ``value`` (``None`` when not ``keep``). A sharded DTensor is all-gathered
    first, so with FSDP every rank must call this for the same tensors in the same order; ranks
    that do not write files pass ``keep=False`` and hold one gathered tensor at a time."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().cpu() if keep else None


def place_like(full: Tensor, reference: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``full`` (a whole tensor, e.g. read from a checkpoint) with ``reference``'s device and layout
    and ``dtype`` (default: the reference's): this rank's shard when ``reference`` is a sharded
    DTensor. No communication: every rank read the same file and keeps its own slice. The result
    owns its memory (``full`` may be backed by a memory-mapped file)."""
    dtype = dtype or reference.dtype
    if not isinstance(reference, DTensor):
        return full.to(device=reference.device, dtype=dtype, copy=True)
    shard = distribute_tensor(full.to(dtype), reference.device_mesh, reference.placements, src_data_rank=None)
    local = shard.to_local().to(reference.to_local().device, copy=True)  # CPU offload: shards live in host memory
    return DTensor.from_local(local, reference.device_mesh, reference.placements, run_check=False,
                              shape=reference.shape, stride=reference.stride())
