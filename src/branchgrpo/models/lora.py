"""LoRA for any adapter's transformer, through peft (the library diffusers itself uses).

- :func:`add_lora` injects LoRA layers into the transformer **in place** (the module keeps its
  class, so ``FluxVelocity``/``SD3Velocity`` wrappers and ``transformer.config`` keep working),
  freezes every base weight and leaves only the LoRA tensors trainable;
- :func:`trainable_parameters` is what goes to the optimizer (so only LoRA tensors get gradients
  and optimizer state);
- :func:`disabled_adapter` runs the base model (the frozen reference of the KL term) through the
  same module, without a second copy of the weights;
- :func:`lora_state_dict` is diffusers' LoRA convention (``get_peft_model_state_dict``: keys such
  as ``transformer_blocks.0.attn.to_q.lora_A.weight``), what :mod:`branchgrpo.models.export` writes;
- :class:`LoraWeights` is a module view holding only the LoRA tensors, for code that saves,
  loads, averages or broadcasts ``module.state_dict()`` (checkpoints, EMA, multi-process).

Defaults follow Flow-GRPO's SD3.5 LoRA (``scripts/train_sd3.py`` in yifan123/flow_grpo:
``LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=[...])``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

# Flow-GRPO's SD3 list; the same attention projections exist in FLUX's double-stream blocks and
# (to_q/to_k/to_v) in its single-stream blocks.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)

# Wan's blocks name their self- and cross-attention attn1 / attn2, so the names above match nothing
# there: the same q/k/v/out projections in Wan's naming (Wan has no add_* text projections in T2V).
WAN_TARGET_MODULES: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)


def default_target_modules(transformer: torch.nn.Module) -> list[str]:
    """The LoRA targets for ``transformer``'s family: Wan's attention names, else Flow-GRPO's list."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    return list(WAN_TARGET_MODULES if "WanTransformer3DModel" in names else DEFAULT_TARGET_MODULES)


@dataclass
class LoraSpec:
    """What :func:`add_lora` injects (fields map onto ``peft.LoraConfig``)."""

    rank: int = 32  # r
    alpha: float = 64.0  # lora_alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # lora_dropout (training mode only)
    target_modules: Sequence[str] | str = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    init: str | bool = "gaussian"  # init_lora_weights: B = 0 either way, so the model starts unchanged
    adapter_name: str = "default"
    dtype: torch.dtype | None = torch.float32  # LoRA tensors' dtype (fp32 masters on a bf16 base); None = base's

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module")

    def to_peft(self):
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=int(self.rank),
            lora_alpha=float(self.alpha),
            lora_dropout=float(self.dropout),
            target_modules=targets,
            init_lora_weights=self.init,
        )


def _tuner_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: torch.nn.Module) -> bool:
    """Whether peft LoRA layers are injected into ``module``."""
    return bool(_tuner_layers(module))


def _is_lora_name(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def add_lora(transformer: torch.nn.Module, spec: LoraSpec | None = None) -> torch.nn.Module:
    """Inject LoRA layers into ``transformer`` in place and return it.

    Every base parameter is frozen (``requires_grad=False``); the new LoRA tensors are trainable
    and cast to ``spec.dtype``. A diffusers model goes through its own ``add_adapter`` (so
    diffusers' adapter API and ``peft_config`` work on it); any other module through
    ``peft.inject_adapter_in_model``. Raises ``ValueError`` when no target module matches.
    """
    spec = spec or LoraSpec()
    config = spec.to_peft()
    name = spec.adapter_name
    existing = getattr(transformer, "peft_config", None) or {}
    if name in existing:
        raise ValueError(f"the transformer already has a LoRA adapter named {name!r}")
    transformer.requires_grad_(False)
    try:
        if hasattr(transformer, "add_adapter") and hasattr(transformer, "_hf_peft_config_loaded"):
            transformer.add_adapter(config, adapter_name=name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, transformer, adapter_name=name)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise ValueError(
                f"no module of {type(transformer).__name__} matches LoRA target_modules={config.target_modules}: {err}"
            ) from None
        raise
    for param_name, param in transformer.named_parameters():
        if _is_lora_name(param_name) and f".{name}." in f".{param_name}.":
            if spec.dtype is not None and param.dtype != spec.dtype:
                param.data = param.data.to(spec.dtype)
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)
    if not trainable_parameters(transformer):
        raise ValueError(f"LoRA injection into {type(transformer).__name__} created no trainable tensors")
    return transformer


def lora_named_parameters(transformer: torch.nn.Module, adapter_name: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, tensor)`` of every LoRA tensor (all adapters, or one), in module order."""
    out = []
    for name, param in transformer.named_parameters():
        if _is_lora_name(name) and (adapter_name is None or f".{adapter_name}." in f".{name}."):
            out.append((name, param))
    return out


def trainable_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The tensors that get gradients (and optimizer state): LoRA tensors with ``requires_grad``."""
    return [p for _, p in lora_named_parameters(transformer) if p.requires_grad]


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The LoRA weights in diffusers' convention (peft's ``get_peft_model_state_dict``).

    Keys carry no adapter name (``transformer_blocks.0.attn.to_q.lora_A.weight``); prefix them
    with ``transformer.`` (what ``*Pipeline.save_lora_weights`` does) to get the file layout
    ``pipe.load_lora_weights`` reads. Tensors are detached copies on CPU.
    """
    from peft.utils import get_peft_model_state_dict

    if not has_lora(transformer):
        raise ValueError(f"{type(transformer).__name__} has no LoRA layers (call add_lora first)")
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_state_dict(transformer: torch.nn.Module, state: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Inverse of :func:`lora_state_dict` (into an already injected adapter); strict on LoRA keys."""
    from peft.utils import set_peft_model_state_dict

    expected = set(lora_state_dict(transformer, adapter_name))
    given = set(state)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise KeyError(f"LoRA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_peft_model_state_dict(transformer, dict(state), adapter_name=adapter_name)


def lora_config_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict:
    """The adapter's ``LoraConfig`` as a dict (the metadata diffusers stores to recover alpha/rank)."""
    config = getattr(transformer, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"{type(transformer).__name__} has no LoRA adapter named {adapter_name!r}")
    return config.to_dict()


@contextmanager
def disabled_adapter(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the base model (LoRA switched off) inside the block, e.g. the KL reference forward.

    Only a flag per LoRA layer changes: no second copy of the weights. On exit every layer's
    previous state and every parameter's ``requires_grad`` are restored exactly (peft's
    ``enable_adapters`` toggles ``requires_grad``). A module without LoRA runs unchanged.
    """
    layers = _tuner_layers(transformer)
    was_disabled = [bool(layer.disable_adapters) for layer in layers]
    grad_flags = [(p, p.requires_grad) for p in transformer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield transformer
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for param, flag in grad_flags:
            param.requires_grad_(flag)


class ReferenceVelocity(torch.nn.Module):
    """The frozen base policy for the KL term: calls ``policy`` with every LoRA layer of
    ``transformer`` (default ``policy.transformer``) switched off, under ``torch.no_grad``.

    Pass it as ``reference_model=`` of :func:`branchgrpo.update.policy_update`; it shares every
    weight with the policy (no second copy).
    """

    def __init__(self, policy: torch.nn.Module, transformer: torch.nn.Module | None = None):
        super().__init__()
        object.__setattr__(self, "_policy", policy)  # not submodules: nothing is registered twice
        object.__setattr__(self, "_transformer", transformer if transformer is not None else policy.transformer)

    @torch.no_grad()
    def forward(self, latents: Tensor, sigmas: Tensor, conditioning) -> Tensor:
        with disabled_adapter(self._transformer):
            return self._policy(latents, sigmas, conditioning)


class LoraWeights(torch.nn.Module):
    """A view of a transformer's LoRA tensors that behaves like a module holding only them.

    ``parameters()``, ``named_parameters()``, ``state_dict()`` and ``load_state_dict()`` see only
    the LoRA tensors (the live ones: ``state_dict()`` values share storage with them, so in-place
    broadcasts reach the model). Pass it where a trainer saves/loads/EMAs/broadcasts
    ``trainable.state_dict()``: checkpoints then hold megabytes, not the whole transformer.
    """

    def __init__(self, transformer: torch.nn.Module, adapter_name: str | None = None):
        super().__init__()
        object.__setattr__(self, "_transformer", transformer)  # not a submodule: keep the base out
        self.adapter_name = adapter_name
        if not lora_named_parameters(transformer, adapter_name):
            raise ValueError(f"{type(transformer).__name__} has no LoRA tensors (call add_lora first)")

    @property
    def transformer(self) -> torch.nn.Module:
        return self._transformer

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # noqa: ARG002
        for name, param in lora_named_parameters(self._transformer, self.adapter_name):
            yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self, recurse: bool = True):  # noqa: ARG002
        for _, param in self.named_parameters():
            yield param

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False, **kwargs):  # noqa: ARG002
        out = destination if destination is not None else {}
        for name, param in lora_named_parameters(self._transformer, self.adapter_name):
            out[prefix + name] = param if keep_vars else param.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):  # noqa: ARG002
        own = dict(lora_named_parameters(self._transformer, self.adapter_name))
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if strict and (missing or unexpected):
            raise RuntimeError(f"LoraWeights.load_state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in own:
                    own[name].copy_(value.to(dtype=own[name].dtype, device=own[name].device))
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def forward(self, *args, **kwargs):  # pragma: no cover - a view, not a model
        raise TypeError("LoraWeights is a view of LoRA tensors; call the transformer instead")


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoraSpec",
    "WAN_TARGET_MODULES",
    "LoraWeights",
    "ReferenceVelocity",
    "add_lora",
    "default_target_modules",
    "disabled_adapter",
    "has_lora",
    "load_lora_state_dict",
    "lora_config_dict",
    "lora_named_parameters",
    "lora_state_dict",
    "trainable_parameters",
]
