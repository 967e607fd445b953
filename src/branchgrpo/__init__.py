"""BranchGRPO: tree-structured GRPO for flow-matching generators.

The public API (see docs/api.md)::

    from branchgrpo import Trainer, load_config

    config = load_config(preset="branchgrpo-deppru", overrides=["run.iterations=20"])
    summary = Trainer(config).run()

Custom models and rewards plug in through :func:`register_family` and :func:`register_reward`;
the method's maths is documented in docs/method.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> "module:attribute"; imported on first use so `import branchgrpo` stays light
_EXPORTS = {
    "Trainer": "branchgrpo.train.trainer:Trainer",
    "RunSummary": "branchgrpo.train.trainer:RunSummary",
    "train": "branchgrpo.train.trainer:train",
    "TrainConfig": "branchgrpo.train.config:TrainConfig",
    "load_config": "branchgrpo.train.config:load_train_config",
    "dump_config": "branchgrpo.train.config:dump_config",
    "ConfigError": "branchgrpo.config:ConfigError",
    "ModelFamily": "branchgrpo.families:ModelFamily",
    "PolicyBundle": "branchgrpo.families:PolicyBundle",
    "register_family": "branchgrpo.families:register_family",
    "available_families": "branchgrpo.families:available_families",
    "Reward": "branchgrpo.rewards:Reward",
    "RewardOutput": "branchgrpo.rewards:RewardOutput",
    "register_reward": "branchgrpo.rewards:register_reward",
    "available_rewards": "branchgrpo.rewards:available_rewards",
    "build_reward": "branchgrpo.rewards:build_reward",
    "MethodConfig": "branchgrpo.tree.spec:MethodConfig",
    "method_config": "branchgrpo.tree.presets:method_config",
    "list_presets": "branchgrpo.tree.presets:list_presets",
    "plan": "branchgrpo.tree.nfe:plan",
    "evaluate": "branchgrpo.train.evaluation:evaluate",
    "sample": "branchgrpo.train.evaluation:sample",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'branchgrpo' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from branchgrpo.config import ConfigError
    from branchgrpo.families import ModelFamily, PolicyBundle, available_families, register_family
    from branchgrpo.rewards import Reward, RewardOutput, available_rewards, build_reward, register_reward
    from branchgrpo.train.config import TrainConfig, dump_config
    from branchgrpo.train.config import load_train_config as load_config
    from branchgrpo.train.evaluation import evaluate, sample
    from branchgrpo.train.trainer import RunSummary, Trainer, train
    from branchgrpo.tree.nfe import plan
    from branchgrpo.tree.presets import list_presets, method_config
    from branchgrpo.tree.spec import MethodConfig
