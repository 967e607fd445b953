"""Held-out evaluation: fixed prompts and seeds, flat sampling, mean reward, sample diversity; sample grids.

Diversity (:mod:`branchgrpo.diversity`): per prompt, the mean pairwise distance among its samples,
in pixels (RMS difference) and in a fixed random-conv-net feature space; averaged over prompts.

:func:`save_image_grid` writes images ``[N, C, H, W]`` as one PNG grid, labelled when given the
prompts (one line above each row) and rewards (one under each cell); given videos
``[N, F, C, H, W]`` (what ``WanAdapter.decode`` returns) it writes :func:`save_video_grid`'s PNG
strip of evenly spaced frames (one row per video) and an animated GIF of the whole grid next to it
(PIL only: no imageio or ffmpeg).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from branchgrpo.diversity import Diversity, sample_diversity
from branchgrpo.families import PolicyBundle
from branchgrpo.rewards.base import Reward
from branchgrpo.train.components import score_rewards
from branchgrpo.train.config import TrainConfig
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec


@dataclass
class EvalResult:
    prompts: list[str]  # one per image (video)
    images: Tensor  # [P·S, C, H, W] in [0, 1], prompt-major (videos: [P·S, F, C, H, W])
    rewards: Tensor  # [P·S] (a weighted list: the weighted sum of raw component scores)
    components: dict[str, Tensor] | None = None  # raw scores per component of a weighted list
    diversity: Diversity | None = None  # mean pairwise sample distances per prompt (None: 1 sample each)
    grid: Path | None = None  # the labelled sample grid written for it, if any

    @property
    def mean_reward(self) -> float:
        return float(self.rewards.mean())

    def diversity_metrics(self) -> dict[str, float]:
        """``{"diversity_pixel", "diversity_feature"}``: means over prompts (empty without diversity)."""
        if self.diversity is None:
            return {}
        return {"diversity_pixel": self.diversity.pixel, "diversity_feature": self.diversity.feature}

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
    generator: PolicyBundle,
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


def evaluate(generator: PolicyBundle, reward: Reward, prompts: list[str], config: TrainConfig, device) -> EvalResult:
    """Mean reward and diversity of ``eval.samples_per_prompt`` samples per held-out prompt (fixed seed)."""
    if not prompts:
        raise ValueError("no held-out prompts to evaluate; set data.heldout_prompts")
    eta = config.method.tree.eta if config.eval.eta is None else config.eval.eta
    images, image_prompts = sample(
        generator, prompts, config.eval.samples_per_prompt, config.method.tree, eta, config.eval.seed,
        config.method.engine.rollout_micro_batch, device,
    )
    # held-out scores are absolute: raw components and their weighted sum, never normalised per group
    scored = score_rewards(reward, images, image_prompts, torch.zeros(len(image_prompts), dtype=torch.long),
                           config.reward.batch_size, absolute=True)
    components = scored.components if len(scored.components) > 1 else None
    images = images.cpu()
    diversity = sample_diversity(images, image_prompts) if config.eval.samples_per_prompt >= 2 else None
    return EvalResult(prompts=image_prompts, images=images, rewards=scored.total, components=components,
                      diversity=diversity)


VIDEO_FPS = 16.0  # Wan2.1's frame rate: what a GIF of its videos plays at unless told otherwise


def _cells(images: Tensor, min_cell: int) -> Tensor:
    """``images [N, C, H, W]`` in [0, 1] → uint8 ``[N, C, h, w]``, upscaled by an integer factor (nearest)
    when smaller than ``min_cell`` pixels."""
    images = images.detach().float().clamp(0, 1).cpu()
    h, w = images.shape[-2:]
    scale = max(1, min_cell // max(h, w))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    return (images * 255).round().to(torch.uint8)


def _grid_array(images: Tensor, columns: int, min_cell: int = 64, pad: int = 2):
    """``images [N, C, H, W]`` in [0, 1] → one uint8 grid array ``[rows·(h+pad)+pad, columns·(w+pad)+pad(, C)]``.

    Images smaller than ``min_cell`` pixels are upscaled by an integer factor (nearest); gaps are white.
    """
    cells = _cells(images, min_cell)
    n, c, h, w = cells.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    grid = torch.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = cells[i]
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def _font(cell_width: int):
    """PIL's default font, sized to the cells (11–24 px) where FreeType is available."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(11, min(24, cell_width // 5)))
    except (TypeError, ValueError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, shortened with "…" until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def labelled_grid(images: Tensor, columns: int, prompts: list[str] | None = None, rewards: Tensor | None = None,
                  min_cell: int = 64, pad: int = 2):
    """A PIL grid of ``images [N, C, H, W]`` in [0, 1] with each row's prompt above it and each cell's
    reward (3 decimals) under it.

    ``prompts``/``rewards`` hold one entry per image (prompt-major, as :class:`EvalResult`); a row whose
    images have several prompts lists them in order, joined by " | ". Cells are upscaled (nearest) to
    at least ``min_cell`` pixels so that the text under them is legible. Grey images stay grey ("L").
    """
    from PIL import Image, ImageDraw

    n = images.shape[0]
    for name, labels in (("prompts", prompts), ("rewards", rewards)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"labelled_grid: {len(labels)} {name} for {n} images; give one per image")
    cells = _cells(images, min_cell)
    _, c, h, w = cells.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    font = _font(w)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line = ascent + descent + 2
    head = line if prompts is not None else 0
    foot = line if rewards is not None else 0
    block = head + h + foot + pad
    width = columns * (w + pad) + pad
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (width, rows * block + pad), 255 if mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if mode == "L" else (0, 0, 0)
    values = rewards.detach().float().cpu().tolist() if rewards is not None else None
    for r in range(rows):
        top = pad + r * block
        members = range(r * columns, min(n, (r + 1) * columns))
        if prompts is not None:
            text = " | ".join(dict.fromkeys(prompts[i] for i in members))
            draw.text((pad, top + 1), _fit(draw, text, font, width - 2 * pad), fill=ink, font=font)
        for col, i in enumerate(members):
            left = pad + col * (w + pad)
            cell = cells[i].permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(cell[..., 0] if c == 1 else cell).convert(mode), (left, top + head))
            if values is not None:
                text = _fit(draw, f"{values[i]:.3f}", font, w)
                x = left + (w - draw.textlength(text, font=font)) / 2
                draw.text((x, top + head + h + 1), text, fill=ink, font=font)
    return canvas


def save_image_grid(images: Tensor, path: Path, columns: int, min_cell: int = 64, *,
                    prompts: list[str] | None = None, rewards: Tensor | None = None, fps: float = VIDEO_FPS,
                    video_frames: int = 4, video_max_cell: int | None = 256) -> Path:
    """Write ``images [N, C, H, W]`` in [0, 1] as one PNG grid (small images upscaled, nearest).

    With ``prompts`` and/or ``rewards`` (one per image) the grid is :func:`labelled_grid`'s: each
    row's prompt above it, each cell's reward under it. Videos ``[N, F, C, H, W]`` go to
    :func:`save_video_grid` unlabelled (a PNG of ``video_frames`` frames per video and a GIF at
    ``fps`` beside it, frames shrunk to ``video_max_cell`` pixels on their long side so that every
    evaluation's files stay small); the PNG's path is returned either way.
    """
    from PIL import Image

    if images.ndim == 5:
        return save_video_grid(images, path, columns, min_cell, fps=fps, frames=video_frames,
                               max_cell=video_max_cell)[0]
    if images.ndim != 4:
        raise ValueError(
            f"a sample grid needs images [N, C, H, W] or videos [N, F, C, H, W], got {tuple(images.shape)}"
        )
    if prompts is not None or rewards is not None:
        picture = labelled_grid(images, columns, prompts, rewards, min_cell)
    else:
        picture = Image.fromarray(_grid_array(images, columns, min_cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def strip_frames(num_frames: int, count: int) -> Tensor:
    """``count`` evenly spaced frame indices of ``num_frames``, first and last included (all if fewer)."""
    if count >= num_frames:
        return torch.arange(num_frames)
    if count == 1:
        return torch.tensor([num_frames // 2])
    return torch.linspace(0, num_frames - 1, count).round().long()


def _shrink(images: Tensor, max_cell: int | None) -> Tensor:
    """``images [N, C, H, W]`` scaled down (antialiased) so the long side is at most ``max_cell``."""
    h, w = images.shape[-2:]
    if not max_cell or max(h, w) <= max_cell:
        return images
    scale = max_cell / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True,
                                           align_corners=False)


def save_video_grid(videos: Tensor, path: Path, columns: int, min_cell: int = 64, *, fps: float = VIDEO_FPS,
                    frames: int = 4, max_cell: int | None = None) -> tuple[Path, Path]:
    """Write videos ``[N, F, C, H, W]`` in [0, 1] as a PNG frame strip and an animated GIF.

    - ``path.with_suffix(".png")``: one row per video, ``frames`` evenly spaced frames of it
      (:func:`strip_frames`: first and last included) left to right;
    - ``path.with_suffix(".gif")``: ``F`` frames, frame ``t`` is the grid of every video's frame ``t``
      laid out ``columns`` videos per row (as :func:`save_image_grid` lays out images); it loops,
      each frame shown ``1/fps`` s (GIF timing is in 1/100 s, so 16 fps plays as 60 ms frames;
      Pillow merges consecutive identical frames into one longer frame).

    ``max_cell`` (None: full size) shrinks frames whose long side is larger (antialiased bilinear);
    frames smaller than ``min_cell`` are enlarged (nearest), as in :func:`save_image_grid`.
    Returns ``(png, gif)``.
    """
    from PIL import Image

    if videos.ndim != 5:
        raise ValueError(f"save_video_grid needs videos [N, F, C, H, W], got {tuple(videos.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    videos = videos.detach()
    num_frames = videos.shape[1]
    png, gif = path.with_suffix(".png"), path.with_suffix(".gif")
    png.parent.mkdir(parents=True, exist_ok=True)
    index = strip_frames(num_frames, frames).to(videos.device)
    strip = videos.index_select(1, index)  # [N, K, C, H, W]
    Image.fromarray(_grid_array(_shrink(strip.flatten(0, 1).cpu(), max_cell), strip.shape[1], min_cell)).save(png)
    # one time step at a time: a batch of 480p videos is gigabytes in float32 already
    pictures = [Image.fromarray(_grid_array(_shrink(videos[:, t].cpu(), max_cell), columns, min_cell))
                for t in range(num_frames)]
    pictures = [p.convert("RGB") for p in pictures]  # grey videos too: one palette conversion path
    pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=max(10, round(1000.0 / fps)),
                     loop=0, disposal=1)
    return png, gif
