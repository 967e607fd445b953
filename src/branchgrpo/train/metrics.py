"""One iteration's metrics row, assembled from what the iteration produced (kept out of the loop)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from branchgrpo.rewards.base import RewardOutput
from branchgrpo.train.logging import peak_memory_gb


def iteration_metrics(scored: RewardOutput, tree, scores, edges, stats, times: dict[str, float], method,
                      dist, *, lr: float, device: torch.device, reward_name: str | None = None) -> dict[str, Any]:
    """Rewards (gathered over processes), advantages, update statistics, NFE counts, phase times.

    Reward components are logged when the reward has parts of its own (a weighted list), as
    ``reward/<component>_{mean,std,min,max}``.
    """
    all_rewards = dist.gather(scored.total.float())
    metrics: dict[str, Any] = {
        "reward_mean": float(all_rewards.mean()),
        "reward_std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
        "reward_min": float(all_rewards.min()),
        "reward_max": float(all_rewards.max()),
    }
    advantages = torch.cat([a for a in scores.edge_advantage[1:]])
    trained_adv = edges.advantage.float()
    local = {
        "advantage_abs_mean": float(advantages.abs().mean()),
        "advantage_trained_mean": float(trained_adv.mean()) if trained_adv.numel() else 0.0,
        "advantage_trained_std": float(trained_adv.std()) if trained_adv.numel() > 1 else 0.0,
        "advantage_trained_absmax": float(trained_adv.abs().max()) if trained_adv.numel() else 0.0,
        "advantage_clipped_fraction": float((advantages.abs() >= method.advantage.advantage_clip).float().mean()),
        "fusion_entropy_ratio": scores.fused.root_entropy_ratio(),
        "loss": stats.loss,
        "ratio_mean": stats.ratio_mean,
        "ratio_max_deviation_first_step": stats.ratio_max_deviation_first_step,
        "clip_fraction": stats.clip_fraction,
        "kl": stats.kl,
        "grad_norm": stats.grad_norms[-1] if stats.grad_norms else 0.0,
        "optimizer_steps": stats.optimizer_steps,
        "skipped_steps": stats.skipped_steps,
        "lr": lr,
        "nonfinite_micro_batches": stats.nonfinite_micro_batches,
        **{f"nfe/{k}": v for k, v in asdict(scores.nfe).items()},
        "nfe/rollout_calls_measured": tree.rollout_calls,
        **{f"time/{k}": v for k, v in times.items()},
        "time/iteration": sum(times.values()),
        "memory/peak_gb": peak_memory_gb(device),
    }
    if set(scored.components) != {reward_name}:
        for name, values in scored.components.items():
            everything = dist.gather(values.float())
            metrics.update({f"reward/{name}_mean": float(everything.mean()), f"reward/{name}_std": float(everything.std()),
                            f"reward/{name}_min": float(everything.min()), f"reward/{name}_max": float(everything.max())})
    metrics.update(dist.mean(local))
    return metrics
