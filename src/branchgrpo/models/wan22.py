"""Wan2.2 text-to-video: the A14B mixture of two experts and the dense TI2V-5B, on the Wan2.1 adapter.

Everything Wan2.1 and Wan2.2 share (UMT5 prompts through ``WanPipeline.encode_prompt`` with the
prompt cache, ``AutoencoderKLWan`` decoding with per-channel ``latents_mean`` / ``latents_std``,
video latents ``[B, C, F', H/s, W/s]``, ``timestep = 1000·σ``, classifier-free guidance in one
doubled call) comes from :mod:`branchgrpo.models.wan`. This module adds what diffusers 0.42's
``WanPipeline`` does differently for Wan2.2:

- **Two experts (A14B).** ``transformer`` is the high-noise expert and ``transformer_2`` the
  low-noise one. At a step with scheduler timestep ``t`` the pipeline calls ``transformer`` when
  ``t >= boundary_ratio · num_train_timesteps`` (0.875 · 1000 for T2V-A14B, from
  ``model_index.json``), else ``transformer_2``, with guidance ``guidance_scale`` resp.
  ``guidance_scale_2`` (``None`` = ``guidance_scale``). CFG runs only when ``guidance_scale > 1``
  (the pipeline's ``do_classifier_free_guidance``, for both experts). :class:`Wan22Velocity` makes
  this decision **per row**, from the row's own ``1000·σ`` in float32 (the scheduler's
  ``timesteps``): a rollout frontier sits at one step, but a training micro-batch mixes edges of
  different steps on both sides of the boundary, so the batch is split by mask, each expert is
  called once on its rows and the velocities are put back in row order.
- **Both experts are trained.** :class:`WanExperts` holds the two transformers as one module
  (``transformer.*`` / ``transformer_2.*`` keys in checkpoints); LoRA goes into both (one adapter
  per expert, the same ``LoraConfig``) and :func:`export_expert_loras` writes one diffusers LoRA
  file per expert. diffusers 0.42's ``WanLoraLoaderMixin.save_lora_weights`` writes only
  ``transformer`` layers and ``load_lora_weights`` loads a file into ``transformer``, or into
  ``transformer_2`` with ``load_into_transformer_2=True``; so the high-noise file loads with
  ``pipe.load_lora_weights(path)`` and the low-noise one with
  ``pipe.load_lora_weights(path_2, load_into_transformer_2=True)`` (tested against our velocity).
- **TI2V-5B** is one dense transformer with 48 latent channels on the Wan2.2 VAE
  (``AutoencoderKLWan`` with ``z_dim = 48``, ``patch_size = 2``, ``scale_factor_spatial = 16``:
  4×16×16 compression, so sizes are multiples of 32 pixels with the ``(1, 2, 2)`` patch), and its
  pipeline has ``expand_timesteps = True``: the transformer gets one timestep per latent token,
  ``[B, F'·(H/2)·(W/2)]`` (all equal for text-to-video), which :class:`Wan22Velocity` reproduces.

The sampler is the engine's (docs/method.md §2–3 on ``sigma_schedule(T, shift)``); the folder's
``scheduler/`` (UniPC) is not used.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch
from torch import Tensor

from branchgrpo.models.base import TIMESTEP_SCALE
from branchgrpo.models.loading import ModelFiles, ModelFilesNotFoundError, PretrainedFolder
from branchgrpo.models.pretrained import build_adapter, diffusers_layout, download_patterns
from branchgrpo.models.lora import WAN_TARGET_MODULES
from branchgrpo.models.protocol import Conditioning
from branchgrpo.models.wan import WanAdapter, WanVelocity, wan_encoder_config

WAN22_T2V_A14B_HUB_ID = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
WAN22_TI2V_5B_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
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


class Wan22Adapter(WanAdapter):
    """Wan2.2 T2V-A14B (two experts) or TI2V-5B (one transformer, 48-channel VAE) behind the engine.

    A :class:`~branchgrpo.models.wan.WanAdapter` (prompts, cache, decoding, sizes) plus
    ``transformer_2``, ``boundary_ratio``, ``guidance_scale_2`` and ``expand_timesteps`` (the
    ``WanPipeline`` arguments of the same names); :attr:`experts` is the trainable module and
    :meth:`velocity_model` a :class:`Wan22Velocity`. Sizes follow the VAE config
    (``scale_factor_spatial`` 8 for A14B's Wan2.1 VAE, 16 for the Wan2.2 VAE) times the patch.
    """

    # family stays "wan" (the prompt-cache identity): the prompts go through the same UMT5 and
    # WanPipeline.encode_prompt, so Wan2.1 and Wan2.2 folders with one text encoder share cached embeddings
    device_modules = ("transformer", "transformer_2", "text_encoder", "vae")

    def __init__(
        self,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        transformer_2: torch.nn.Module | None = None,
        *,
        boundary_ratio: float | None = None,
        guidance_scale: float = 4.0,
        guidance_scale_2: float | None = None,
        expand_timesteps: bool = False,
        **kwargs: Any,
    ):
        if transformer is None and transformer_2 is not None:
            raise ValueError("Wan22Adapter needs the high-noise transformer to use transformer_2")
        if transformer_2 is not None and boundary_ratio is None:
            raise ValueError("two Wan2.2 experts need a boundary_ratio (model_index.json's; 0.875 for T2V-A14B)")
        self.transformer_2 = transformer_2
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.expand_timesteps = bool(expand_timesteps)
        self.experts = WanExperts(transformer, transformer_2) if transformer is not None else None
        super().__init__(transformer, vae, text_encoder, tokenizer, guidance_scale=guidance_scale, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str | None = None, **kwargs: Any) -> "Wan22Adapter":
        """Load from a diffusers-layout folder or hub id; see :func:`load_wan22_adapter`."""
        return load_wan22_adapter(path_or_hub_id, dtype=dtype, device=device, **kwargs)

    @property
    def num_experts(self) -> int:
        return 0 if self.experts is None else len(list(self.experts.experts()))

    def velocity_model(
        self,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        compute_dtype: torch.dtype | str | None = None,
        num_frames: int | None = None,
        guidance_scale_2: float | None = None,
    ) -> Wan22Velocity:
        """Both experts as ``vθ(x, σ, c)``, routed per row by σ (docs/method.md §1–2); arguments
        default to the adapter's (``guidance_scale_2`` to ``guidance_scale``, as the pipeline)."""
        self._require_transformer()
        self.latent_size(height, width, num_frames)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        scale_2 = guidance_scale_2 if guidance_scale_2 is not None else self.guidance_scale_2
        return Wan22Velocity(
            self.experts, boundary_ratio=self.boundary_ratio, guidance_scale=scale,
            guidance_scale_2=scale if scale_2 is None else scale_2,
            compute_dtype=self._compute_dtype(compute_dtype), expand_timesteps=self.expand_timesteps,
        )


# --------------------------------------------------------------------------------------------
# LoRA export: one diffusers LoRA file per expert.
# --------------------------------------------------------------------------------------------


def export_expert_loras(experts: WanExperts, out: str | os.PathLike, *, dtype: torch.dtype | None = None
                        ) -> dict[str, Path]:
    """Write each expert's LoRA as ``<out>/lora_<component>.safetensors`` (diffusers' convention).

    Returns ``{component: path}``. Load into a ``WanPipeline`` with
    ``pipe.load_lora_weights(paths["transformer"])`` and
    ``pipe.load_lora_weights(paths["transformer_2"], load_into_transformer_2=True)`` (diffusers 0.42
    has no single-file format for both experts: ``save_lora_weights`` writes ``transformer`` layers only).
    """
    from diffusers import WanPipeline

    from branchgrpo.models.export import export_lora

    folder = Path(out)
    if folder.suffix == ".safetensors":
        raise ValueError(f"Wan2.2 LoRA export writes one file per expert into a folder, got the file name {folder}")
    return {name: export_lora(module, folder / f"lora_{name}.safetensors", pipeline_class=WanPipeline, dtype=dtype)
            for name, module in experts.experts()}


def load_expert_loras_into(pipeline: Any, paths: Mapping[str, str | os.PathLike]) -> None:
    """Load :func:`export_expert_loras`'s files into a ``WanPipeline`` (the two calls diffusers 0.42 needs)."""
    pipeline.load_lora_weights(str(paths["transformer"]))
    if "transformer_2" in paths:
        pipeline.load_lora_weights(str(paths["transformer_2"]), load_into_transformer_2=True)


def export_full_experts(experts: WanExperts, base: str | os.PathLike, out_dir: str | os.PathLike, *,
                        link: str = "symlink", dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """A ``WanPipeline.from_pretrained`` folder with both trained experts (LoRA merged) and every
    other part of the base folder linked or copied (written in a temporary sibling, then renamed)."""
    from branchgrpo.models.export import _atomic_target, _place, _replace, plain_transformer

    base_dir, out = Path(base).expanduser(), Path(out_dir)
    if not (base_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{base_dir} is not a diffusers pipeline folder (no model_index.json)")
    if base_dir.resolve() == out.expanduser().resolve():
        raise ValueError("out_dir must differ from the base folder")
    names = {name for name, _ in experts.experts()}
    tmp = _atomic_target(out, overwrite)
    try:
        for entry in sorted(base_dir.iterdir()):
            if entry.name in names or entry.name.startswith("."):
                continue
            _place(entry, tmp / entry.name, link if entry.is_dir() else "copy")
        for name, module in experts.experts():
            plain_transformer(module, dtype).save_pretrained(tmp / name, safe_serialization=True)
        _replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# Loading from a diffusers-layout folder or the hub.
# --------------------------------------------------------------------------------------------

WAN22_LAYOUT = diffusers_layout(["transformer", "transformer_2", "vae", "text_encoder"],
                                {"tokenizer": ("tokenizer.json", "spiece.model")})

WAN22_LAYOUT_TEXT = """\
  <folder>/
    model_index.json  (WanPipeline; boundary_ratio 0.875 for T2V-A14B, expand_timesteps true for TI2V-5B)
    scheduler/        scheduler_config.json          (UniPCMultistepScheduler; not used)
    transformer/      config.json, diffusion_pytorch_model*.safetensors   (WanTransformer3DModel: high-noise expert)
    transformer_2/    config.json, diffusion_pytorch_model*.safetensors   (low-noise expert; T2V-A14B only)
    vae/              config.json, diffusion_pytorch_model.safetensors     (AutoencoderKLWan; z_dim 48 for TI2V-5B)
    text_encoder/     config.json, model*.safetensors (+ model.safetensors.index.json)   (UMT5-XXL encoder)
    tokenizer/        spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json"""


class Wan22FilesNotFoundError(ModelFilesNotFoundError):
    """Wan2.2 weights or configs are missing (a ``ModelFilesNotFoundError``; its family is :data:`WAN22_FILES`)."""


WAN22_FILES = ModelFiles(
    title="Wan2.2", hub_id=WAN22_T2V_A14B_HUB_ID, layout=WAN22_LAYOUT, layout_text=WAN22_LAYOUT_TEXT,
    download_patterns=download_patterns(WAN22_LAYOUT), placeholder="/path/to/Wan2.2-T2V-A14B-Diffusers",
    gated=False, error_class=Wan22FilesNotFoundError,
)


def read_model_index(path_or_hub_id: str | os.PathLike, *, local_files_only: bool | None = None,
                     revision: str | None = None) -> dict[str, Any]:
    """The folder's ``model_index.json`` (a hub id: through the hub cache), or a :class:`Wan22FilesNotFoundError`."""
    from branchgrpo.models.loading import _resolve_local

    location, is_local = _resolve_local(str(path_or_hub_id), local_files_only, WAN22_FILES)
    if is_local:
        index = Path(location) / "model_index.json"
        if not index.is_file():
            missing = ["model_index.json"] if Path(location).is_dir() else [f"the folder {location} itself"]
            raise WAN22_FILES.error(location if Path(location).exists() else str(path_or_hub_id), missing)
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(location, "model_index.json", revision=revision))
        except Exception as err:  # noqa: BLE001 - any hub failure: the file is not reachable
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise WAN22_FILES.error(str(path_or_hub_id), ["model_index.json"],
                                    detail=f"{type(err).__name__}: {first_line}") from None
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise WAN22_FILES.error(str(path_or_hub_id), [f"model_index.json (unreadable: {err})"]) from None


def _is_component(entry: Any) -> bool:
    """A model_index entry names a component (``["diffusers", "WanTransformer3DModel"]``), not ``[null, null]``."""
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def load_wan22_adapter(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    *,
    vae_dtype: torch.dtype = torch.float32,
    text_encoders: Literal["load", "lazy", "none"] = "lazy",
    load_transformer: bool = True,
    load_vae: bool = True,
    boundary_ratio: float | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    **adapter_kwargs: Any,
) -> Wan22Adapter:
    """Build a :class:`Wan22Adapter` from a Wan2.2 diffusers folder or hub id (T2V-A14B or TI2V-5B).

    ``model_index.json`` decides the structure: ``transformer_2`` listed → two experts switched at
    its ``boundary_ratio`` (``boundary_ratio=`` overrides it); ``expand_timesteps`` → per-token
    timesteps (TI2V-5B). Other arguments as :func:`branchgrpo.models.wan.load_wan_adapter`;
    ``adapter_kwargs`` go to :class:`Wan22Adapter` (sizes, guidance_scale, guidance_scale_2, …).

    Raises:
        Wan22FilesNotFoundError (a ``ModelFilesNotFoundError``): files missing or not fetchable.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    index = read_model_index(path_or_hub_id, local_files_only=local_files_only, revision=revision)
    two_experts = _is_component(index.get("transformer_2"))
    if boundary_ratio is None:
        boundary_ratio = index.get("boundary_ratio")
    if two_experts and boundary_ratio is None:
        raise WAN22_FILES.error(str(path_or_hub_id), [], detail="model_index.json lists transformer_2 but no "
                                "boundary_ratio; pass boundary_ratio=")
    experts = ["transformer", "transformer_2"] if two_experts else ["transformer"]
    needed = ["tokenizer", "text_encoder"] + experts * load_transformer + ["vae"] * load_vae
    folder = PretrainedFolder(path_or_hub_id, WAN22_FILES, needed, text_encoders=text_encoders,
                              local_files_only=local_files_only, revision=revision, device=device)

    with folder.errors():
        tokenizer = folder.config(AutoTokenizer, "tokenizer")
        max_sequence_length = adapter_kwargs.pop("max_sequence_length", 512)
        encoder_config = wan_encoder_config(folder.config(UMT5Config, "text_encoder"), tokenizer,
                                            max_sequence_length, dtype)
    return build_adapter(
        folder, Wan22Adapter, dtype=dtype, text_encoders={"text_encoder": UMT5EncoderModel},
        models={**{name: (WanTransformer3DModel, dtype) if load_transformer else None for name in experts},
                "vae": (AutoencoderKLWan, vae_dtype) if load_vae else None},
        encoder_config=encoder_config, max_sequence_length=max_sequence_length, tokenizer=tokenizer,
        boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=bool(index.get("expand_timesteps", False)), **adapter_kwargs,
    )


def wan22_lora_target_modules() -> list[str]:
    """LoRA targets of each expert: Wan's self-/cross-attention projections (``attn1``/``attn2``)."""
    return list(WAN_TARGET_MODULES)


__all__ = [
    "EXPERT_NAMES",
    "ExpertCall",
    "TokenTimesteps",
    "WAN22_FILES",
    "WAN22_LAYOUT",
    "WAN22_LAYOUT_TEXT",
    "WAN22_T2V_A14B_HUB_ID",
    "WAN22_TI2V_5B_HUB_ID",
    "Wan22Adapter",
    "Wan22FilesNotFoundError",
    "Wan22Velocity",
    "WanExperts",
    "export_expert_loras",
    "export_full_experts",
    "load_expert_loras_into",
    "load_wan22_adapter",
    "read_model_index",
    "wan22_lora_target_modules",
]
