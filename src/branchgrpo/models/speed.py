"""GPU speed settings shared by every family: which attention kernel runs, and regional
``torch.compile`` of a transformer's repeated blocks (``model.attention``, ``model.compile``).

Both were chosen from measurements on one H100 (benchmarks/results/gpu/2026-11-26-h100/): with
torch 2.11, the default scaled-dot-product-attention kernel on Hopper is cuDNN's, whose backward
failed at FLUX's shapes; flash attention ran, within 6 % of cuDNN's forward. Compiling every
block made FLUX.1-dev's forward 1.48× faster (25 s of compilation), the backward under compilation
is not measured yet, so compilation stays opt-in.
"""

from __future__ import annotations

from typing import Literal

import torch

AttentionKernel = Literal["auto", "flash", "efficient", "cudnn", "math"]
ATTENTION_KERNELS: tuple[str, ...] = ("auto", "flash", "efficient", "cudnn", "math")


def select_attention(kernel: str) -> None:
    """Let CUDA's ``scaled_dot_product_attention`` use ``kernel`` alone, with the math kernel kept
    as the fallback for inputs ``kernel`` does not take (float32, odd head sizes); ``auto`` leaves
    torch's own order. Process-wide (torch's flags are global); CPU attention is not affected."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel: allowed {', '.join(ATTENTION_KERNELS)}; got {kernel!r}")
    if kernel == "auto":
        return
    cuda = torch.backends.cuda
    cuda.enable_flash_sdp(kernel == "flash")
    cuda.enable_mem_efficient_sdp(kernel == "efficient")
    cuda.enable_cudnn_sdp(kernel == "cudnn")
    cuda.enable_math_sdp(True)


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of every ``ModuleList`` in ``module`` whose entries are two or more modules of one
    class (FLUX's ``transformer_blocks`` and ``single_transformer_blocks``, Wan's ``blocks``, ...):
    the regions worth compiling once and reusing."""
    blocks: list[torch.nn.Module] = []
    for child in module.modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) >= 2 and len({type(m) for m in child}) == 1:
            blocks.extend(child)
    return blocks


# Compiled variants dynamo may keep per block class. Training calls a block with and without
# gradients, in train and eval mode, with one row (a size dynamo always specialises) and with many,
# on inputs that do or do not require grad and, in FLUX's single blocks, on strided views: a tiny
# FLUX with LoRA and checkpointing needs 9 variants of its double block in one iteration, past
# torch's default of 8, after which dynamo silently runs that block (and all it calls) eagerly.
RECOMPILE_LIMIT = 64


def compile_blocks(module: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` each of :func:`repeated_blocks` in place (``nn.Module.compile``): blocks of
    one class share their compiled code, so compilation costs one block per class, and gradient
    checkpointing, LoRA and FSDP wrap the compiled blocks as they wrap eager ones. Raises dynamo's
    process-wide ``recompile_limit`` to :data:`RECOMPILE_LIMIT` (never lowers it). Returns how many
    blocks were compiled; ``ValueError`` when there are none."""
    blocks = repeated_blocks(module)
    if not blocks:
        raise ValueError(f"{type(module).__name__} has no repeated blocks (a ModuleList of one block class) to compile")
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


__all__ = ["ATTENTION_KERNELS", "AttentionKernel", "RECOMPILE_LIMIT", "compile_blocks", "repeated_blocks", "select_attention"]
