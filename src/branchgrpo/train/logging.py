"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard events, a progress bar."""

from __future__ import annotations

import json
import math
import numbers
import resource
import sys
from pathlib import Path

import torch


class MetricsLogger:
    """Writes every iteration's metrics to ``metrics.jsonl`` and TensorBoard; shows progress."""

    def __init__(
        self, output_dir: Path, tensorboard: bool = True, progress: bool = True, total: int = 0, initial: int = 0,
        wandb_project: str | None = None, config: dict | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.wandb = None
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("run.wandb=true needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, dir=str(self.output_dir), config=config or {},
                                    name=self.output_dir.name, resume="allow")
        self.file = open(self.output_dir / "metrics.jsonl", "a", buffering=1)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", file=sys.stderr, dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        self.file.write(metrics_line(metrics) + "\n")
        step = int(metrics["iteration"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}",
                rollout=f"{metrics['time/rollout']:.1f}s",
                train=f"{metrics['time/train']:.1f}s",
                nfe=f"{metrics['nfe/rollout_calls']:.0f}/{metrics['nfe/training_forwards']:.0f}",
            )

    def log_eval(self, iteration: int, mean_reward: float, extra: dict[str, float] | None = None) -> None:
        """One eval row: ``eval_reward`` and ``extra`` (e.g. ``diversity_pixel``); TensorBoard ``eval/*``."""
        extra = extra or {}
        self.file.write(metrics_line({"iteration": iteration, "eval_reward": mean_reward, **extra}) + "\n")
        scalars = {"eval/reward": mean_reward, **{f"eval/{k}": v for k, v in extra.items()}}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, iteration)
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)
        if self.bar is not None:
            self.bar.write(f"eval @ {iteration}: held-out mean reward {mean_reward:.4f}")

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def metrics_line(row: dict) -> str:
    """One ``metrics.jsonl`` line, always strict JSON (RFC 8259 has no NaN or Infinity).

    A non-finite float becomes ``null`` and its key (``a.b`` / ``a[0]`` when nested) is listed in
    ``nonfinite_keys``; ``allow_nan=False`` makes anything that slips past this an error, not a line
    that JSON readers reject.
    """
    nonfinite: list[str] = []
    clean = _finite_or_null(row, "", nonfinite)
    if nonfinite:
        clean["nonfinite_keys"] = nonfinite
    return json.dumps(clean, allow_nan=False)


def _finite_or_null(value, key: str, nonfinite: list[str]):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats
        value = float(value)
        if math.isfinite(value):
            return value
        nonfinite.append(key)
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{key}.{k}" if key else str(k), nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v, f"{key}[{i}]", nonfinite) for i, v in enumerate(value)]
    return value  # anything else: json.dumps raises rather than writing something unreadable


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric rows at or after ``iteration`` (written by a run killed after its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        is_eval = "eval_reward" in row
        if row.get("iteration", 0) < iteration or (is_eval and row.get("iteration", 0) <= iteration):
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of the process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
