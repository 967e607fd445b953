"""What a training job costs per process, from the transformer's architecture config alone.

``branchgrpo plan --config X --processes N`` prints this. Nothing is loaded and no weights are
needed: every number is a function of the transformer's ``config.json`` (FLUX's
``FluxTransformer2DModel``; the digits world uses the same class), the job config and the tree's
shape (:func:`branchgrpo.tree.nfe.plan`).

- **Parameters** are counted linear by linear with diffusers' module names, so LoRA counts follow
  peft's target matching (``tests/test_resources.py`` checks both against the real classes).
- **Memory per process** follows what the trainer does (``train/components.py``
  ``use_master_weights``, ``train/distributed.py``): frozen weights in the compute dtype; trainable
  tensors as float32 masters with float32 gradients and two float32 AdamW moments; everything
  persistent sharded ``1/N`` under ``run.parallel=fsdp`` and moved to host memory under
  ``run.cpu_offload``.
- **Activations** are the tensors autograd saves for backward, derived block by block from the
  diffusers forward code (which op saves what, and only when a gradient needs it), for a fused
  attention kernel (q, k, v, output and a float32 log-sum-exp; no ``L×L`` matrix).
- **FLOPs** are 2 × the multiply-accumulates of every linear plus attention's ``QKᵀ`` and ``AV``;
  backward counts the input and weight gradients that are actually needed.
"""

from branchgrpo.resources.core import (
    Linear, LinearUse, Saved, Tokens, Training, autocast_weight_copies, backward_flops, forward_flops,
    lora_parameter_count, parameter_count,
)
from branchgrpo.resources.flux import FluxArchitecture
from branchgrpo.resources.job import (
    HUB_CONFIGS, JobEstimate, MemoryRow, estimate_job, format_estimate, parse_memory, transformer_config,
)

__all__ = [
    "HUB_CONFIGS", "FluxArchitecture", "JobEstimate", "Linear", "LinearUse", "MemoryRow", "Saved", "Tokens",
    "Training", "autocast_weight_copies", "backward_flops", "estimate_job", "forward_flops", "format_estimate",
    "lora_parameter_count", "parameter_count", "parse_memory", "transformer_config",
]
