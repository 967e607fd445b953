"""Write / read a scored rollout tree as one ``.safetensors`` file, one row per node.

Rows are ordered by depth, then by index within the depth. See ``docs/tree-dump.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from branchgrpo.atomic import atomic_save_safetensors

from branchgrpo.config import to_dict
from branchgrpo.tree.rollout import RolloutTree
from branchgrpo.tree.scoring import TreeScores
from branchgrpo.tree.spec import MethodConfig

DUMP_FORMAT = "branchgrpo-tree/1"
COLUMNS = (
    "parent", "depth", "step", "tree_id", "logp", "is_sde",
    "leaf_reward", "fused_reward", "advantage", "trained",
)


def tree_rows(tree: RolloutTree, scores: TreeScores) -> dict[str, torch.Tensor]:
    """The dump's columns as CPU tensors, one row per node (roots first)."""
    sizes = [p.numel() for p in tree.parent]
    offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
    parent, depth, step, tree_id, logp, is_sde, leaf_reward, fused, advantage, trained = ([] for _ in range(10))
    for d, n in enumerate(sizes):
        parent.append(tree.parent[d] + offsets[d - 1] if d > 0 else torch.full((n,), -1, dtype=torch.long))
        depth.append(torch.full((n,), d, dtype=torch.int32))
        step.append(torch.full((n,), d - 1, dtype=torch.int32))
        tree_id.append(tree.group[d].to(torch.int32))
        logp.append(tree.logp[d].detach().float().cpu())
        is_sde.append(torch.full((n,), bool(tree.sde[d - 1]) if d > 0 else False, dtype=torch.bool))
        leaf_reward.append(
            scores.leaf_rewards.detach().float().cpu() if d == len(sizes) - 1 else torch.full((n,), float("nan"))
        )
        fused.append(scores.fused.reward[d].detach().float().cpu())
        advantage.append(scores.edge_advantage[d].detach().float().cpu() if d > 0 else torch.zeros(n))
        trained.append(scores.selection.mask[d].cpu() if d > 0 else torch.zeros(n, dtype=torch.bool))
    columns = dict(
        parent=parent, depth=depth, step=step, tree_id=tree_id, logp=logp, is_sde=is_sde,
        leaf_reward=leaf_reward, fused_reward=fused, advantage=advantage, trained=trained,
    )
    return {name: torch.cat(parts).contiguous() for name, parts in columns.items()}


def save_tree(
    path: str | os.PathLike,
    tree: RolloutTree,
    scores: TreeScores,
    config: MethodConfig,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the scored tree atomically (temporary file, then rename).

    Metadata (JSON strings): ``format``, ``spec`` (the resolved TreeSpec), ``method`` (the whole
    MethodConfig), ``beta``, ``reduction``, ``iteration``, ``num_groups``. ``extra_tensors`` (e.g.
    x̂0 thumbnails) are stored beside the columns under their own names.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = tree_rows(tree, scores)
    for name, value in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor name {name!r} clashes with a dump column")
        tensors[name] = value.detach().cpu().contiguous()
    metadata = {
        "format": DUMP_FORMAT,
        "spec": json.dumps(to_dict(config.tree), default=str),
        "method": json.dumps(to_dict(config), default=str),
        "beta": json.dumps(config.advantage.fusion_beta),
        "reduction": config.tree.logprob_reduction,
        "iteration": str(tree.iteration),
        "num_groups": str(tree.num_groups),
        "root_entropy_ratio": json.dumps(scores.fused.root_entropy_ratio()),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def load_tree(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a dump: ``(columns, metadata)`` with JSON metadata decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    if raw.get("format") != DUMP_FORMAT:
        raise ValueError(f"{path} is not a branchgrpo tree dump (format {raw.get('format')!r})")
    meta: dict[str, object] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    return load_file(str(path)), meta
