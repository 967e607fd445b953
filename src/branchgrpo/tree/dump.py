"""Write / read a scored rollout tree as one ``.safetensors`` file, one row per node.

Rows are ordered by depth, then by index within the depth. The trainer also stores each prompt
group's prompt (metadata ``prompts``) and a small uint8 x̂0 thumbnail per node (``x0_thumbnails``,
:func:`node_thumbnails`). See ``docs/tree-dump.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from safetensors.torch import load_file

from branchgrpo.atomic import atomic_save_safetensors

from branchgrpo.config import to_dict
from branchgrpo.tree.rollout import RolloutTree
from branchgrpo.tree.scoring import TreeScores
from branchgrpo.tree.spec import MethodConfig

DUMP_FORMAT = "branchgrpo-tree/1"
THUMBNAIL_KEY = "x0_thumbnails"
THUMBNAIL_SIZE = 32  # long side of a stored thumbnail, in pixels (smaller images are kept as they are)
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


def dump_due(iteration: int, every: int) -> bool:
    """Whether the trainer writes a tree dump at ``iteration`` (``run.dump_tree_every``; 0 = never)."""
    return every > 0 and iteration % every == 0


def thumbnails(images: Tensor, size: int = THUMBNAIL_SIZE) -> Tensor | None:
    """Decoded images ``[N, C, H, W]`` in [0, 1] (videos ``[N, F, C, H, W]``: their middle frame) as uint8
    ``[N, C, h, w]`` with the long side at most ``size`` (antialiased bilinear; smaller images keep
    their size). None for outputs that are not images (other ranks, or C not in 1, 3, 4)."""
    if images.ndim == 5:
        images = images[:, images.shape[1] // 2]
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4) or images.shape[0] == 0:
        return None
    images = images.detach().float()
    h, w = images.shape[-2:]
    if max(h, w) > size:
        scale = size / max(h, w)
        target = (max(1, round(h * scale)), max(1, round(w * scale)))
        images = torch.nn.functional.interpolate(images, size=target, mode="bilinear", antialias=True,
                                                 align_corners=False)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def node_thumbnails(
    tree: RolloutTree, decode: Callable[[Tensor], Tensor], leaf_images: Tensor | None = None,
    size: int = THUMBNAIL_SIZE,
) -> Tensor | None:
    """The x̂0 thumbnail of every node, in dump row order: uint8 ``[N_nodes, C, h, w]``.

    Inner nodes (depth d < T) show ``tree.node_x0[d]`` — the clean image predicted at the node, kept
    by ``rollout(..., keep_node_x0=True)`` — decoded one depth at a time; leaves show ``leaf_images``
    (the trainer's already decoded ``tree.leaf_x0``) or ``decode(tree.leaf_x0)``. None when the
    decoded outputs are not images.
    """
    if tree.node_x0 is None:
        raise ValueError("node_thumbnails needs the inner nodes' x̂0: roll out with keep_node_x0=True")
    parts = [thumbnails(decode(x0), size) for x0 in tree.node_x0]
    parts.append(thumbnails(decode(tree.leaf_x0) if leaf_images is None else leaf_images, size))
    if any(part is None for part in parts) or len({part.shape[1:] for part in parts}) != 1:
        return None
    return torch.cat(parts)


def save_tree(
    path: str | os.PathLike,
    tree: RolloutTree,
    scores: TreeScores,
    config: MethodConfig,
    extra_tensors: dict[str, torch.Tensor | None] | None = None,
    prompts: Sequence[str] | None = None,
) -> Path:
    """Write the scored tree atomically (temporary file, then rename).

    Metadata (JSON strings): ``format``, ``spec`` (the resolved TreeSpec), ``method`` (the whole
    MethodConfig), ``beta``, ``reduction``, ``iteration``, ``num_groups``, ``root_entropy_ratio`` and,
    given ``prompts`` (one per prompt group, indexed by ``tree_id``), ``prompts``. ``extra_tensors``
    (e.g. :func:`node_thumbnails` as ``x0_thumbnails``) are stored beside the columns under their own
    names; None values are left out.
    """
    path = Path(path)
    if prompts is not None and len(prompts) != tree.num_groups:
        raise ValueError(f"save_tree: {len(prompts)} prompts for {tree.num_groups} prompt groups; give one per group")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = tree_rows(tree, scores)
    for name, value in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor name {name!r} clashes with a dump column")
        if value is not None:
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
    if prompts is not None:
        metadata["prompts"] = json.dumps(list(prompts), ensure_ascii=False)
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
