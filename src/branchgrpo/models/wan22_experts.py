"""Wan2.2's two experts as one trainable module (:class:`WanExperts`), the call of one expert, per-token
timesteps (TI2V-5B) and :class:`Wan22Velocity`, which routes each row to its expert by σ.
Re-exported by :mod:`branchgrpo.models.wan22`."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
from torch import Tensor

from branchgrpo.models.base import TIMESTEP_SCALE
from branchgrpo.models.protocol import Conditioning
from branchgrpo.models.wan import WanVelocity

EXPERT_NAMES = ("transformer", "transformer_2")  # high-noise, low-noise: WanPipeline's component names


class WanExperts(torch.nn.Module):
    """Wan2.2's trainable module: the high-noise ``transformer`` and the low-noise ``transformer_2``
    (absent for TI2V-5B) as one module.

    It is what ``PolicyBundle.trainable`` holds, so checkpoints, EMA, broadcasts and FSDP (each
    expert's ``blocks``) see both experts. It speaks just enough of diffusers' adapter API for
    :func:`branchgrpo.models.lora.add_lora`: ``add_adapter`` injects the same ``LoraConfig`` into
    each expert through the expert's own ``add_adapter`` (so ``pipe.load_lora_weights`` conventions
    and ``peft_config`` hold per expert).
    """

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module | None = None):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    def experts(self) -> Iterator[tuple[str, torch.nn.Module]]:
        """``(component name, transformer)`` of every expert present, high-noise first."""
        for name in EXPERT_NAMES:
            module = getattr(self, name)
            if module is not None:
                yield name, module

    @property
    def config(self) -> Any:
        """The high-noise expert's config (patch size, channels: the same for both experts)."""
        return self.transformer.config

    # -- diffusers' adapter API, as far as add_lora uses it ------------------------------------
    @property
    def _hf_peft_config_loaded(self) -> bool:
        return any(getattr(module, "_hf_peft_config_loaded", False) for _, module in self.experts())

    @property
    def peft_config(self) -> dict[str, Any]:
        """The high-noise expert's adapters (every adapter is added to both experts alike)."""
        return dict(getattr(self.transformer, "peft_config", None) or {})

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        for _, module in self.experts():
            module.add_adapter(copy.deepcopy(adapter_config), adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        for _, module in self.experts():
            module.enable_gradient_checkpointing()

    def forward(self, expert: str, **kwargs: Any):
        """Call one expert (``"transformer"`` or ``"transformer_2"``) through this module, so that hooks
        on it run: FSDP2 shards each expert's blocks and this module as the root, whose forward
        gathers the experts' other parameters (embeddings, heads)."""
        if expert not in EXPERT_NAMES or getattr(self, expert) is None:
            raise ValueError(f"no expert {expert!r}; this model has {[name for name, _ in self.experts()]}")
        return getattr(self, expert)(**kwargs)


class ExpertCall(torch.nn.Module):
    """One expert of a :class:`WanExperts` as a transformer to call: ``experts(name, **kwargs)``."""

    def __init__(self, experts: WanExperts, name: str):
        super().__init__()
        self.experts = experts
        self.name = name

    @property
    def config(self) -> Any:
        return getattr(self.experts, self.name).config

    def forward(self, **kwargs: Any):
        return self.experts(self.name, **kwargs)


class TokenTimesteps(torch.nn.Module):
    """A TI2V transformer called as ``WanPipeline`` does with ``expand_timesteps=True``: the row's
    timestep repeated for every latent token, ``[B, F'·(H/p)·(W/p)]`` (the pipeline's
    ``mask[0][0][:, ::2, ::2] · t``, all ones for text-to-video)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self) -> Any:
        return self.transformer.config

    def forward(self, hidden_states: Tensor, timestep: Tensor, **kwargs: Any):
        frames, height, width = hidden_states.shape[2:]
        _, patch_h, patch_w = self.transformer.config.patch_size
        tokens = frames * -(-height // patch_h) * -(-width // patch_w)
        return self.transformer(hidden_states=hidden_states, timestep=timestep[:, None].expand(-1, tokens), **kwargs)


class Wan22Velocity(torch.nn.Module):
    """``vθ(x, σ, c)`` of Wan2.2: each row goes to its expert by its own σ, with that expert's guidance.

    Rows with ``1000·σ >= boundary_ratio·num_train_timesteps`` (float32, as the pipeline compares its
    ``timesteps``) go to ``experts.transformer`` with ``guidance_scale``, the others to
    ``experts.transformer_2`` with ``guidance_scale_2``; each expert is called once on its rows (a
    :class:`~branchgrpo.models.wan.WanVelocity`: CFG in one doubled call) and the outputs are
    scattered back. Without ``transformer_2`` or ``boundary_ratio`` every row goes to
    ``transformer`` (TI2V-5B, or A14B restricted to one expert). ``expand_timesteps`` feeds
    per-token timesteps (TI2V-5B). ``transformer`` is the :class:`WanExperts` (what LoRA's
    reference switch and the trainer look at); outputs are float32.
    """

    def __init__(
        self,
        experts: WanExperts,
        *,
        boundary_ratio: float | None,
        guidance_scale: float = 4.0,
        guidance_scale_2: float | None = None,
        compute_dtype: torch.dtype | None = None,
        expand_timesteps: bool = False,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        if boundary_ratio is not None and not 0.0 <= boundary_ratio <= 1.0:
            raise ValueError(f"boundary_ratio must be in [0, 1], got {boundary_ratio}")
        guidance_scale_2 = guidance_scale if guidance_scale_2 is None else float(guidance_scale_2)
        if guidance_scale <= 1.0 < guidance_scale_2:
            raise ValueError(
                f"guidance_scale_2={guidance_scale_2} needs guidance_scale > 1: WanPipeline runs classifier-free "
                f"guidance only when guidance_scale > 1 (got {guidance_scale}), for both experts"
            )
        self.transformer = experts
        self.lockstep: bool | None = None  # run both experts in every call (None: when sharded; see in_lockstep)
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.expand_timesteps = bool(expand_timesteps)
        self.num_train_timesteps = int(num_train_timesteps)
        self.timestep_scale = TIMESTEP_SCALE
        def expert(name: str) -> torch.nn.Module:  # called through experts.forward (FSDP's root hooks)
            call = ExpertCall(experts, name)
            return TokenTimesteps(call) if self.expand_timesteps else call

        # per-expert guided velocities; kept out of the module tree (the experts are registered once, above)
        high = WanVelocity(expert("transformer"), guidance_scale=guidance_scale, compute_dtype=compute_dtype)
        low = (WanVelocity(expert("transformer_2"), guidance_scale=guidance_scale_2, compute_dtype=compute_dtype)
               if experts.transformer_2 is not None else None)
        object.__setattr__(self, "_high", high)
        object.__setattr__(self, "_low", low)

    @property
    def guidance_scale(self) -> float:
        return self._high.guidance_scale

    @property
    def guidance_scale_2(self) -> float | None:
        return self._low.guidance_scale if self._low is not None else None

    @property
    def uses_cfg(self) -> bool:
        return self._high.uses_cfg

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return self._high.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, value: torch.dtype | None) -> None:
        for velocity in (self._high, self._low):
            if velocity is not None:
                velocity.compute_dtype = value

    @property
    def boundary_timestep(self) -> float | None:
        """``boundary_ratio · num_train_timesteps`` (875.0 for T2V-A14B), or None: one expert."""
        if self.boundary_ratio is None or self._low is None:
            return None
        return self.boundary_ratio * self.num_train_timesteps

    def high_noise_rows(self, sigmas: Tensor) -> Tensor:
        """Bool ``[B]``: the rows the high-noise expert serves (``WanPipeline``'s ``t >= boundary_timestep``)."""
        timestep = sigmas.to(dtype=torch.float32) * self.timestep_scale
        boundary = self.boundary_timestep
        if boundary is None:
            return torch.ones_like(timestep, dtype=torch.bool)
        return timestep >= boundary

    def in_lockstep(self) -> bool:
        """Whether every call runs both experts (:attr:`lockstep`; None: when they are sharded over
        several processes). FSDP2 all-gathers an expert's blocks in its forward and reduce-scatters
        their gradients in its backward, so every process must call the same experts in the same
        order; a training micro-batch's rows, and so its experts, differ between processes."""
        if self._low is None:
            return False
        if self.lockstep is not None:
            return self.lockstep
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule

        # FSDP shards over every process (DistributedContext.shard); an unsharded parameter tells nothing,
        # as FSDP swaps the root's parameters for unsharded ones between calls
        return isinstance(self.transformer, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, latents: Tensor, sigmas: Tensor, conditioning: Conditioning) -> Tensor:
        high = self.high_noise_rows(sigmas.to(latents.device))
        lockstep = self.in_lockstep()
        if bool(high.all()) and not lockstep:
            return self._high(latents, sigmas, conditioning)
        if not bool(high.any()) and not lockstep:
            return self._low(latents, sigmas, conditioning)
        rows = latents.shape[0]
        index_high, index_low = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)

        def take(index: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
            picked = {key: value[index.to(value.device)] if torch.is_tensor(value) and value.shape[:1] == (rows,)
                      else value for key, value in conditioning.items()}
            return latents[index], sigmas[index.to(sigmas.device)], picked

        outputs, order, idle = [], [], []
        for velocity, index in ((self._high, index_high), (self._low, index_low)):
            if index.numel():
                outputs.append(velocity(*take(index)))
                order.append(index)
            else:  # lockstep: an expert without rows here runs on row 0 and adds exactly zero (and zero gradient)
                idle.append(velocity(*take(index.new_zeros(1))).sum())
        out = torch.cat(outputs)[torch.argsort(torch.cat(order))]
        return out + 0.0 * idle[0] if idle else out
