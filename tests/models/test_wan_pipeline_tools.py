"""The tools around the Wan2.1 video adapter: sample grids for videos (a PNG strip of frames and an
animated GIF, from a Trainer evaluation and from `branchgrpo sample`), `branchgrpo preprocess` for
sd3 and wan (the cache it writes is the one training reads), and weighted lists of video rewards.

Tiny random models of the real architectures come from tests/models/test_wan.py,
tests/models/test_sd3.py and tests/models/test_flux.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.cli import main
from branchgrpo.rewards import CompositeReward, Reward, RewardSpecError, build_reward, group_normalize
from branchgrpo.rewards.video import FrameAveragedReward
from branchgrpo.train.components import build_policy, score_rewards
from branchgrpo.train.config import load_train_config
from branchgrpo.train.evaluation import VIDEO_FPS, evaluate, save_image_grid, save_video_grid, strip_frames

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import test_flux as flux_tests  # noqa: E402  (pytest puts tests/models/ on sys.path)
import test_sd3 as sd3_tests  # noqa: E402
import test_wan as wan_tests  # noqa: E402
from conformance import save_layout  # noqa: E402

from PIL import Image  # noqa: E402

MODULE = __name__ if __name__ in sys.modules else "test_wan_pipeline_tools"
HEIGHT, WIDTH, FRAMES = wan_tests.HEIGHT, wan_tests.WIDTH, wan_tests.FRAMES  # 32 x 48, 5 frames
PAD = 2  # white gap around grid cells


def brightness(images, prompts):
    return images.flatten(1).mean(dim=1)


def motion_scorer_factory(checkpoint=None, device=None, dtype=None, scale=1.0):
    """A videoalign entry point: mean absolute difference of consecutive frames ("motion")."""
    def scorer(videos, prompts):
        return scale * (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(dim=1)
    return scorer


def gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("RGB"), dtype=np.float32) / 255.0)
        return frames


def cell(array: np.ndarray, row: int, column: int, height: int, width: int) -> np.ndarray:
    top, left = PAD + row * (height + PAD), PAD + column * (width + PAD)
    return array[top: top + height, left: left + width]


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """A [C, H, W] frame in [0, 1] as the grids write it: [H, W, C] uint8."""
    return (frame.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")


# -- sample grids of videos -----------------------------------------------------------------------


def test_trainer_evaluation_writes_a_frame_grid_png_and_an_animated_gif(tmp_path):
    """One held-out evaluation of the tiny Wan generator (2 prompts × 2 samples = 4 videos of 5 frames)
    through the Trainer: samples/<tag>.png holds 4 evenly spaced frames per video, one row per video;
    samples/<tag>.gif has all 5 frames, each the 2 × 2 grid of the videos' frame t, at 16 fps."""
    adapter = wan_tests.make_adapter(wan_tests.tiny_components(seed=3))
    trainer = wan_tests.wan_trainer(tmp_path, adapter, FrameAveragedReward(image_reward=brightness, num_frames=2))
    trainer.config.eval.samples_per_prompt = 2
    trainer.model.heldout_prompts = wan_tests.PROMPTS[:2]
    assert trainer.config.run.sample_grid_every > 0  # the default; the Wan preset no longer turns it off
    mean = trainer.evaluate("iter_000000")
    assert 0 < mean < 1

    png, gif = tmp_path / "samples" / "iter_000000.png", tmp_path / "samples" / "iter_000000.gif"
    assert png.is_file() and gif.is_file()
    # the same evaluation again (fixed seed): the videos that were written
    cpu = torch.device("cpu")
    videos = evaluate(trainer.model, trainer.reward, wan_tests.PROMPTS[:2], trainer.config, cpu).images
    assert videos.shape == (4, FRAMES, 3, HEIGHT, WIDTH)

    strip = strip_frames(FRAMES, 4)
    assert strip.tolist() == [0, 1, 3, 4]  # evenly spaced, first and last frame included
    grid = np.asarray(Image.open(png).convert("RGB"))
    # 4 videos x 4 frames (48 px wide: no upscaling)
    assert grid.shape == (4 * (HEIGHT + PAD) + PAD, 4 * (WIDTH + PAD) + PAD, 3)
    for video in range(4):
        for column, frame in enumerate(strip.tolist()):
            np.testing.assert_array_equal(cell(grid, video, column, HEIGHT, WIDTH), to_uint8(videos[video, frame]))

    with Image.open(gif) as animation:
        assert animation.n_frames == FRAMES
        assert animation.size == (2 * (WIDTH + PAD) + PAD, 2 * (HEIGHT + PAD) + PAD)  # samples_per_prompt columns
        assert animation.info["loop"] == 0 and animation.info["duration"] == 60  # 1000/16 ms in GIF's 10 ms units
    frames = gif_frames(gif)
    for t, picture in enumerate(frames):
        for video in range(4):
            shown = cell(picture, video // 2, video % 2, HEIGHT, WIDTH)
            expected = videos[video, t].permute(1, 2, 0).numpy()
            assert np.abs(shown - expected).mean() < 0.04, (t, video)  # 256 colours for noise-like frames: ~0.02
    # and the frames are in order: frame t is closer to video frame t than to any other
    for t, picture in enumerate(frames):
        errors = [np.abs(cell(picture, 0, 0, HEIGHT, WIDTH) - videos[0, s].permute(1, 2, 0).numpy()).mean()
                  for s in range(FRAMES)]
        assert int(np.argmin(errors)) == t


def test_save_video_grid_fps_frames_grey_and_errors(tmp_path):
    # frame t of video n is flat grey (10·n + t)/100 (distinct, so Pillow merges no GIF frames)
    levels = (10 * torch.arange(3)[:, None] + torch.arange(7)[None, :]).float() / 100
    videos = levels[:, :, None, None, None].expand(3, 7, 1, 8, 8).clone()
    png, gif = save_video_grid(videos, tmp_path / "grey", columns=3, fps=8, frames=3)
    assert (png.name, gif.name) == ("grey.png", "grey.gif")
    grid = np.asarray(Image.open(png)).astype(np.float32) / 255
    size = 8 * 8  # 8-px frames upscaled 8x to the 64-px minimum cell
    assert grid.shape == (3 * (size + PAD) + PAD, 3 * (size + PAD) + PAD)  # grey: one channel
    for video in range(3):
        for column, frame in enumerate([0, 3, 6]):  # strip_frames(7, 3)
            np.testing.assert_allclose(cell(grid, video, column, size, size), levels[video, frame].item(),
                                       atol=0.5 / 255)
    with Image.open(gif) as animation:
        assert animation.n_frames == 7 and animation.info["duration"] == 120  # 8 fps = 125 ms -> 12 cs
        assert animation.size == (3 * (size + PAD) + PAD, size + 2 * PAD)  # 3 videos in one row
    for t, picture in enumerate(gif_frames(gif)):
        for video in range(3):
            np.testing.assert_allclose(cell(picture, 0, video, size, size), levels[video, t].item(), atol=1 / 255)
    assert save_image_grid(videos, tmp_path / "via_image_grid.png", columns=3) == tmp_path / "via_image_grid.png"
    assert (tmp_path / "via_image_grid.gif").is_file() and VIDEO_FPS == 16
    assert strip_frames(7, 1).tolist() == [3] and strip_frames(3, 5).tolist() == [0, 1, 2]
    # large frames shrink to max_cell on the long side (what evaluations write: 256 px)
    big = torch.rand(2, 3, 3, 100, 300)
    png, gif = save_video_grid(big, tmp_path / "big.png", columns=2, max_cell=60)
    assert Image.open(png).size == (3 * (60 + PAD) + PAD, 2 * (20 + PAD) + PAD)
    assert Image.open(gif).size == (2 * (60 + PAD) + PAD, 20 + 2 * PAD)
    save_image_grid(big, tmp_path / "eval.png", columns=2)
    assert Image.open(tmp_path / "eval.gif").size == (2 * (256 + PAD) + PAD, 85 + 2 * PAD)  # round(100 · 256/300)
    with pytest.raises(ValueError, match=r"videos \[N, F, C, H, W\]"):
        save_video_grid(videos[:, 0], tmp_path / "x.png", columns=1)
    with pytest.raises(ValueError, match="fps"):
        save_video_grid(videos, tmp_path / "x.png", columns=1, fps=0)
    with pytest.raises(ValueError, match=r"images \[N, C, H, W\] or videos"):
        save_image_grid(videos[0, 0, 0], tmp_path / "x.png", columns=1)


# -- the CLI on saved tiny Wan / SD3 folders ------------------------------------------------------


def write_config(path: Path, family: str, folder: Path, cache: Path, prompts: Path, extra: str = "") -> Path:
    size = {"wan": f"height: {HEIGHT}, width: {WIDTH}, num_frames: {FRAMES}",
            "sd3": f"height: {sd3_tests.IMAGE}, width: {sd3_tests.IMAGE}",
            "flux": f"height: {flux_tests.IMAGE}, width: {flux_tests.IMAGE}"}[family]
    guidance = {"wan": f"guidance_scale: {wan_tests.GUIDANCE}, negative_prompt: '{wan_tests.NEGATIVE}'",
                "sd3": f"guidance_scale: {sd3_tests.GUIDANCE}, negative_prompt: '{wan_tests.NEGATIVE}'",
                "flux": "embedded_guidance: 3.5"}[family]
    path.write_text(f"""\
model:
  family: {family}
  path: {folder}
  options: {{{size}, {guidance}, max_sequence_length: {wan_tests.MAX_SEQ}}}
  prompt_cache_dir: {cache}
data:
  train_prompts: {prompts}
  heldout_prompts: {prompts}
run:
  device: cpu
  output_dir: {path.parent / 'run'}
{extra}""")
    return path


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan")
    components = wan_tests.tiny_components(seed=4)
    save_layout(components, folder)
    return folder, components


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    components = sd3_tests.tiny_components(seed=4)
    sd3_tests.save_layout(components, folder)
    return folder, components


def test_sample_command_writes_png_and_gif_for_videos(wan_folder, tmp_path, capsys):
    folder, _ = wan_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(wan_tests.PROMPTS) + "\n")
    reward = f"reward:\n  name: videoalign\n  options: {{entry_point: '{MODULE}:motion_scorer_factory'}}\n"
    config = write_config(tmp_path / "wan.yaml", "wan", folder, tmp_path / "cache", prompts,
                          reward + "method:\n  tree: {steps: 2, split_plan: {}}\n")
    out = tmp_path / "out" / "videos.png"
    code = main(["sample", "--config", str(config), "--prompt", "a photo of a cat", "--num", "2", "--out", str(out),
                 "--fps", "10", "--frames", "3", "--max-size", "40"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "2 videos of 5 frames" in printed.out and "10 fps" in printed.out
    width, height = 40, 27  # 48 x 32 shrunk to 40 px on the long side
    assert Image.open(out).size == (3 * (width + PAD) + PAD, 2 * (height + PAD) + PAD)  # 3 frames, 2 videos
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == FRAMES and gif.info["duration"] == 100
        assert gif.size == (2 * (width + PAD) + PAD, height + 2 * PAD)
    assert main(["sample", "--config", str(config), "--fps", "0"]) == 2
    assert "--fps must be > 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    components = flux_tests.tiny_components(guidance=True, seed=4)
    save_layout(components, folder)
    return folder, components


@pytest.mark.parametrize("family", ["wan", "sd3", "flux"])
def test_preprocess_fills_the_cache_that_training_reads(family, request, tmp_path, capsys):
    """`branchgrpo preprocess` with tiny wan/sd3/flux folders; then the generator training builds from
    the same config (text encoders lazy) serves every prompt (and the negative prompt of the CFG
    families) from the cache, never loading a text encoder, with the embeddings the in-memory
    encoders compute."""
    folder, components = request.getfixturevalue(f"{family}_folder")
    tests = {"wan": wan_tests, "sd3": sd3_tests, "flux": flux_tests}[family]
    unique = 3 + (family != "flux")  # 3 prompts (train = held-out) + the negative prompt (sd3, wan)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# train\n" + "\n".join(tests.PROMPTS) + "\n")
    cache = tmp_path / "cache"
    config_file = write_config(tmp_path / f"{family}.yaml", family, folder, cache, prompts)
    assert main(["preprocess", "--config", str(config_file)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"unique_prompts={unique}" in printed and f"encoded={unique}" in printed
    assert "float32" in printed
    assert main(["preprocess", "--config", str(config_file)]) == 0
    assert "encoded=0" in capsys.readouterr().out  # a second run finds everything cached

    config = load_train_config(config_file, None, [])
    generator = build_policy(config, torch.device("cpu"))
    adapter = generator.encode_prompts.__self__
    names = adapter.text_encoder_names
    assert all(getattr(adapter, name) is None for name in names)  # lazy: nothing loaded yet
    cached = generator.encode_prompts(tests.PROMPTS)
    assert all(getattr(adapter, name) is None for name in names), "a cache miss loaded the text encoders"
    direct = tests.make_adapter(components).encode_prompts(tests.PROMPTS)  # same negative prompt, "ugly blurry"
    assert set(cached) == set(direct)
    assert any(name.startswith("negative_") for name in cached) == (family != "flux")
    for name in direct:
        torch.testing.assert_close(cached[name], direct[name], rtol=0, atol=1e-6)


def test_preprocess_errors_are_clear(tmp_path, capsys):
    assert main(["preprocess", "model.family=digits", f"model.prompt_cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.family" in err and "digits" in err and "flux, sd3, wan" in err and "Traceback" not in err
    assert main(["preprocess", "model.family=wan"]) == 2
    assert "model.prompt_cache_dir" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert main(["preprocess", "model.family=sd3", f"model.prompt_cache_dir={tmp_path}",
                 f"data.train_prompts={prompts}"]) == 2
    assert "model.path" in capsys.readouterr().err


# -- weighted lists of video rewards --------------------------------------------------------------


def test_weighted_list_of_video_rewards_scores_videos():
    videos = torch.rand(4, 5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "a", "b", "b"]
    reward = build_reward("frames:1.0,videoalign:0.5", components={
        "frames": {"image_reward": brightness, "num_frames": 2},
        "videoalign": {"entry_point": f"{MODULE}:motion_scorer_factory", "entry_options": {"scale": 2.0}},
    })
    assert isinstance(reward, CompositeReward) and reward.modality == "video"
    frames = videos[:, [1, 3]].flatten(2).mean(dim=(1, 2))  # frame_indices(5, 2)
    motion = motion_scorer_factory(scale=2.0)(videos, prompts)
    torch.testing.assert_close(reward(videos, prompts), frames + 0.5 * motion)
    out = reward.score(videos, prompts)
    torch.testing.assert_close(out.components["frames"], frames)
    torch.testing.assert_close(out.components["videoalign"], motion)
    with pytest.raises(ValueError, match=r"scores videos \[B, F, C, H, W\]"):
        reward(videos[:, 0], prompts)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        reward(videos, prompts[:3])

    grouped = build_reward("frames:1.0,videoalign:0.5", normalize="group", components={
        "frames": {"image_reward": brightness, "num_frames": 2},
        "videoalign": {"entry_point": f"{MODULE}:motion_scorer_factory"},
    })
    group_ids = torch.tensor([0, 0, 1, 1])
    whole = grouped.score(videos, prompts, group_ids).total
    # the trainer's path: components in reward batches of 1 video, normalised once per group
    scored = score_rewards(grouped, videos, prompts, group_ids, batch_size=1)
    torch.testing.assert_close(scored.total, whole)
    assert set(scored.components) == {"frames", "videoalign"}
    z_frames, z_motion = group_normalize(frames, group_ids), group_normalize(motion / 2.0, group_ids)
    assert z_frames.abs().min() > 0.7  # pairs: z = ±1/√2, so the weights act on both components
    torch.testing.assert_close(whole, z_frames + 0.5 * z_motion)


class ImageBrightness(Reward):
    name = "bright"

    def _score(self, images, prompts):
        return images.flatten(1).mean(dim=1)


def test_mixing_image_and_video_rewards_is_refused():
    with pytest.raises(RewardSpecError, match=r"mixes video rewards \(frames.*\) and image rewards \(bright"):
        CompositeReward({"frames": FrameAveragedReward(image_reward=brightness), "bright": ImageBrightness()},
                        {"frames": 1.0, "bright": 1.0})
    images = CompositeReward({"bright": ImageBrightness(), "again": ImageBrightness()}, {"bright": 1.0, "again": 1.0})
    assert images.modality == "image"
    with pytest.raises(ValueError, match=r"images must be a tensor \[B, C, H, W\]"):
        images(torch.rand(2, 5, 3, 4, 4), ["a", "b"])
    torch.testing.assert_close(images(torch.full((2, 3, 4, 4), 0.25), ["a", "b"]), torch.full((2,), 0.5))
