"""Held-out evaluation: fixed prompts and seeds, flat sampling, mean reward; image grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from branchgrpo.train.components import Generator, RewardFn, batched_reward
from branchgrpo.train.config import TrainConfig
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec


@dataclass
class EvalResult:
    prompts: list[str]  # one per image
    images: Tensor  # [P·S, C, H, W] in [0, 1], prompt-major
    rewards: Tensor  # [P·S] (a weighted list: the weighted sum of raw component scores)
    components: dict[str, Tensor] | None = None  # raw scores per component of a weighted list

    @property
    def mean_reward(self) -> float:
        return float(self.rewards.mean())

    def columns(self) -> dict[str, Tensor]:
        """Every reported score: the components of a weighted list (then their sum), or the reward."""
        if self.components:
            return {**self.components, "weighted": self.rewards}
        return {"reward": self.rewards}

    def per_prompt(self) -> dict[str, dict[str, float]]:
        """``{prompt: {column: mean over the prompt's samples}}``."""
        out: dict[str, dict[str, list[float]]] = {}
        for column, values in self.columns().items():
            for prompt, value in zip(self.prompts, values.tolist()):
                out.setdefault(prompt, {}).setdefault(column, []).append(value)
        return {p: {c: sum(v) / len(v) for c, v in cols.items()} for p, cols in out.items()}

    def means(self) -> dict[str, float]:
        return {column: float(values.mean()) for column, values in self.columns().items()}


@torch.no_grad()
def sample(
    generator: Generator,
    prompts: list[str],
    samples_per_prompt: int,
    tree: TreeSpec,
    eta: float,
    seed: int,
    micro_batch: int,
    device: torch.device,
) -> tuple[Tensor, list[str]]:
    """Flat sampling (no splits): ``samples_per_prompt`` independent roots per prompt."""
    spec = TreeSpec(
        steps=tree.steps, shift=tree.shift, eta=eta, split_plan={}, roots_per_prompt=samples_per_prompt,
        logprob_reduction=tree.logprob_reduction,
    )
    conditioning = generator.encode_prompts(prompts)
    generator.policy.eval()
    result = rollout(
        generator.policy, conditioning, spec, len(prompts), generator.latent_shape,
        generator=torch.Generator().manual_seed(seed), micro_batch=micro_batch, device=device,
    )
    images = generator.decode(result.leaf_x0)
    return images, [prompts[int(g)] for g in result.group[-1]]


def evaluate(generator: Generator, reward: RewardFn, prompts: list[str], config: TrainConfig, device) -> EvalResult:
    """Mean reward of ``eval.samples_per_prompt`` samples per held-out prompt (fixed seed)."""
    if not prompts:
        raise ValueError("no held-out prompts to evaluate; set data.heldout_prompts")
    eta = config.method.tree.eta if config.eval.eta is None else config.eval.eta
    images, image_prompts = sample(
        generator, prompts, config.eval.samples_per_prompt, config.method.tree, eta, config.eval.seed,
        config.method.engine.rollout_micro_batch, device,
    )
    from branchgrpo.rewards import CompositeReward

    if isinstance(reward, CompositeReward):
        # held-out scores are absolute: raw components and their weighted sum, never normalised
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, images.shape[0], config.reward.batch_size):
            end = start + config.reward.batch_size
            for name, value in reward.components(images[start:end], image_prompts[start:end]).items():
                parts.setdefault(name, []).append(value.float().cpu())
        components = {name: torch.cat(values) for name, values in parts.items()}
        rewards = sum(reward.weights[name] * value for name, value in components.items())
        return EvalResult(prompts=image_prompts, images=images.cpu(), rewards=rewards, components=components)
    rewards = batched_reward(reward, images, image_prompts, config.reward.batch_size)
    return EvalResult(prompts=image_prompts, images=images.cpu(), rewards=rewards)


def save_image_grid(images: Tensor, path: Path, columns: int, min_cell: int = 64) -> Path:
    """Write ``images [N, C, H, W]`` in [0, 1] as one PNG grid (small images upscaled, nearest)."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    scale = max(1, min_cell // max(h, w))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        h, w = h * scale, w * scale
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    pad = 2
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    if c == 1:
        array = array[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
