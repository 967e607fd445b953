"""MetricsLogger's TensorBoard and W&B side: namespaced names (``train/``, ``eval/``, ``time/``, ``nfe/``;
nothing flat), the evaluation grid as an image, and ``purge_step`` on resume — read back with
TensorBoard's own ``EventAccumulator`` (what the TensorBoard UI shows), not with our writer."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from branchgrpo.train.evaluation import save_image_grid
from branchgrpo.train.logging import MetricsLogger, scalar_tag, truncate_metrics

pytest.importorskip("tensorboard")


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def iteration_row(iteration: int, offset: float = 0.0) -> dict:
    """A row with the key shapes Trainer.step produces (plain, nfe/, time/, reward/, memory/)."""
    return {"reward_mean": 0.5 + iteration + offset, "loss": -0.25 * iteration, "lr": 5e-4, "grad_norm": 1.5,
            "nfe/rollout_calls": 203.0, "time/rollout": 4.25, "reward/digits_mean": 0.125, "memory/peak_gb": 1.0,
            "iteration": iteration, "processes": 2}


def test_every_tag_is_namespaced_and_values_round_trip(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True, progress=False)
    logger.log(iteration_row(0))
    logger.log_eval(1, 0.375, {"diversity_pixel": 0.25})
    logger.close()
    events = read_events(tmp_path / "tensorboard")
    tags = set(events.Tags()["scalars"])
    assert tags == {"train/reward_mean", "train/loss", "train/lr", "train/grad_norm", "train/processes",
                    "nfe/rollout_calls", "time/rollout", "reward/digits_mean", "memory/peak_gb",
                    "eval/reward", "eval/diversity_pixel"}
    row = iteration_row(0)
    for key, value in row.items():
        if key != "iteration":
            (event,) = events.Scalars(scalar_tag(key))
            assert event.step == 0 and event.value == np.float32(value)
    (event,) = events.Scalars("eval/reward")
    assert (event.step, event.value) == (1, 0.375)
    assert scalar_tag("time/train") == "time/train" and scalar_tag("kl") == "train/kl"


def test_eval_grid_is_logged_as_the_same_picture(tmp_path):
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    grid = save_image_grid(images, tmp_path / "samples" / "iter_000003.png", columns=2,
                           prompts=["a handwritten 7"] * 2 + ["the number two"] * 2, rewards=torch.rand(4))
    logger = MetricsLogger(tmp_path, tensorboard=True, progress=False)
    logger.log_eval(3, 0.5, grid=grid)
    logger.log_images(4, "eval/other", np.zeros((5, 7, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        logger.log_images(5, "eval/bad", np.zeros((5, 7), dtype=np.float32))
    logger.close()
    events = read_events(tmp_path / "tensorboard")
    (logged,) = events.Images("eval/samples")
    assert logged.step == 3
    decoded = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("L"))
    assert np.array_equal(decoded, np.asarray(Image.open(grid)))  # TensorBoard stores the grid losslessly
    (other,) = events.Images("eval/other")
    assert (other.width, other.height) == (7, 5)


def test_resume_purges_the_interrupted_steps_and_keeps_the_checkpoint_eval(tmp_path):
    # first run: iterations 0..4, evaluations at 0, 2, 4; killed after its checkpoint at iteration 2
    first = MetricsLogger(tmp_path, tensorboard=True, progress=False)
    first.log_eval(0, 0.25)
    for it in range(5):
        first.log(iteration_row(it))
        if (it + 1) % 2 == 0:
            first.log_eval(it + 1, 0.25 + it)
    first.close()
    truncate_metrics(tmp_path / "metrics.jsonl", 2)  # what Trainer._start does before the logger opens
    # the resumed run: iterations 2..5 again, with other values
    second = MetricsLogger(tmp_path, tensorboard=True, progress=False, initial=2)
    for it in range(2, 6):
        second.log(iteration_row(it, offset=100.0))
        if (it + 1) % 2 == 0:
            second.log_eval(it + 1, 10.0 + it)
    second.close()

    events = read_events(tmp_path / "tensorboard")
    train = [(e.step, e.value) for e in events.Scalars("train/reward_mean")]
    assert train == [(0, 0.5), (1, 1.5), (2, 102.5), (3, 103.5), (4, 104.5), (5, 105.5)]  # each step once
    evals = [(e.step, e.value) for e in events.Scalars("eval/reward")]
    # step 2's evaluation came before the checkpoint: logged again from metrics.jsonl; step 4 is the new run's
    assert evals == [(0, 0.25), (2, 1.25), (4, 13.0), (6, 15.0)]


def test_wandb_gets_the_same_names_and_the_grid(tmp_path, monkeypatch):
    calls: list[tuple[dict, int]] = []

    class FakeImage:
        def __init__(self, data):
            self.data = data

    class FakeRun:
        def log(self, values, step):
            calls.append((values, step))

        def finish(self):
            calls.append(({"finished": True}, -1))

    fake = types.SimpleNamespace(init=lambda **kwargs: FakeRun(), Image=FakeImage)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    grid = save_image_grid(torch.rand(2, 3, 8, 8), tmp_path / "g.png", columns=2, rewards=torch.tensor([0.5, 1.0]))
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False, wandb_project="p")
    logger.log(iteration_row(0))
    logger.log_eval(1, 0.75, {"diversity_pixel": 0.5}, grid=grid)
    logger.close()
    assert calls[0][1] == 0 and set(calls[0][0]) == {scalar_tag(k) for k in iteration_row(0) if k != "iteration"}
    assert calls[1] == ({"eval/reward": 0.75, "eval/diversity_pixel": 0.5}, 1)
    (tag, image), = calls[2][0].items()
    assert tag == "eval/samples" and calls[2][1] == 1
    assert np.array_equal(image.data, np.asarray(Image.open(grid).convert("RGB")))
    assert calls[-1] == ({"finished": True}, -1)
