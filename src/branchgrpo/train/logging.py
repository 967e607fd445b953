"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard events, W&B, a progress bar.

TensorBoard and W&B get namespaced names (:func:`scalar_tag`): a metric that has a namespace keeps
it (``time/rollout``, ``nfe/rollout_calls``, ``reward/hps_mean``, ``eval/reward``), every other
iteration metric goes under ``train/`` (``train/reward_mean``, ``train/loss``); ``metrics.jsonl``
keeps the plain keys. A resumed run (``initial > 0``) opens its TensorBoard writer with
``purge_step=initial``, so TensorBoard drops what the interrupted run logged from that step on, and
the evaluation already recorded at ``initial`` is logged again.
"""

from __future__ import annotations

import json
import math
import numbers
import resource
import sys
from pathlib import Path

import numpy as np
import torch


class MetricsLogger:
    """Writes every iteration's metrics to ``metrics.jsonl``, TensorBoard and W&B; shows progress.

    ``initial``: the iteration the run starts at (a resumed run's checkpoint iteration; 0 when new).
    """

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

            # a resume replaces what the interrupted run logged at steps >= initial
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=initial or None)
        if initial:
            self._relog_eval(initial)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", file=sys.stderr, dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        self.file.write(metrics_line(metrics) + "\n")
        step = int(metrics["iteration"])
        scalars = {scalar_tag(k): v for k, v in metrics.items()
                   if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._scalars(scalars, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}",
                rollout=f"{metrics['time/rollout']:.1f}s",
                train=f"{metrics['time/train']:.1f}s",
                nfe=f"{metrics['nfe/rollout_calls']:.0f}/{metrics['nfe/training_forwards']:.0f}",
            )

    def log_eval(self, iteration: int, mean_reward: float, extra: dict[str, float] | None = None,
                 grid: Path | None = None) -> None:
        """One eval row: ``eval_reward`` and ``extra`` (e.g. ``diversity_pixel``) as ``eval/*``; the sample
        ``grid`` (a PNG, e.g. :func:`~branchgrpo.train.evaluation.save_image_grid`'s) as image ``eval/samples``."""
        extra = extra or {}
        self.file.write(metrics_line({"iteration": iteration, "eval_reward": mean_reward, **extra}) + "\n")
        self._scalars({"eval/reward": mean_reward, **{f"eval/{k}": v for k, v in extra.items()}}, iteration)
        if grid is not None:
            self.log_images(iteration, "eval/samples", grid)
        if self.bar is not None:
            self.bar.write(f"eval @ {iteration}: held-out mean reward {mean_reward:.4f}")

    def log_images(self, step: int, tag: str, image) -> None:
        """Log one picture to TensorBoard (``add_image``) and W&B (``wandb.Image``).

        ``image``: a path to an image file, a PIL image, or a uint8 array ``[H, W]`` / ``[H, W, C]``.
        """
        array = image_array(image)
        if self.writer is not None:
            self.writer.add_image(tag, array, step, dataformats="HW" if array.ndim == 2 else "HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(array)}, step=step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def _relog_eval(self, step: int) -> None:
        """After a resume at ``step``: log the evaluation ``metrics.jsonl`` holds for ``step`` (and its grid
        ``samples/iter_{step:06d}.png``) again, since ``purge_step`` hides the interrupted run's copy."""
        path = self.output_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("iteration") == step and "eval_reward" in row:
                values = {("reward" if k == "eval_reward" else k): v for k, v in row.items()
                          if k not in ("iteration", "nonfinite_keys")}
                self._scalars({f"eval/{k}": v for k, v in values.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}, step)
        grid = self.output_dir / "samples" / f"iter_{step:06d}.png"
        if grid.is_file():
            self.log_images(step, "eval/samples", grid)

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


def scalar_tag(key: str) -> str:
    """TensorBoard/W&B name of an iteration metric: namespaced keys as they are, others under ``train/``."""
    return key if "/" in key else f"train/{key}"


def image_array(image) -> np.ndarray:
    """A path, PIL image or array as a uint8 array ``[H, W]`` (grey) or ``[H, W, 3|4]``."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("L" if opened.mode in ("L", "1", "I", "I;16", "F") else "RGB")
            image.load()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image to log must be uint8 [H, W] or [H, W, 1|3|4], got {array.dtype} {array.shape}")
    return array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array


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
