"""Checkpoints: atomic, complete-only resume, exact continuation, EMA, SIGTERM."""

import json
import os
import signal

import torch
from safetensors.torch import load_file
from test_trainer import brightness_reward, tiny_generator

from branchgrpo.train.checkpoint import MARKER, complete_checkpoints, find_resume
from branchgrpo.train.config import load_train_config
from branchgrpo.train.trainer import Trainer

COMMON = [
    "run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0", "run.device=cpu",
    "data.prompts_per_iteration=2", "eval.samples_per_prompt=1", "eval.every=0", "tree.steps=5",
    "split_plan=0:2,2:2", "run.checkpoint_every=2", "run.keep_checkpoints=2", "run.ema_decay=0.9",
    "update.learning_rate=1e-3", "update.clip_range=0.2",
]


def trainer(out, *overrides):
    config = load_train_config(None, "branchgrpo", [f"run.output_dir={out}", *COMMON, *overrides])
    return Trainer(config, model=tiny_generator(), reward=brightness_reward)


def train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows if "reward_mean" in r}


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    trainer(straight, "run.iterations=6").run()
    stopped = tmp_path / "stopped"
    first = trainer(stopped, "run.iterations=4").run()
    assert first.iterations == 4
    resumed = trainer(stopped, "run.iterations=6", "run.resume=auto").run()
    assert resumed.iterations == 6
    a, b = train_rows(straight), train_rows(stopped)
    assert sorted(a) == sorted(b) == list(range(6))
    for it in (4, 5):
        for key in ("reward_mean", "loss", "ratio_mean", "grad_norm", "advantage_abs_mean"):
            assert abs(a[it][key] - b[it][key]) <= 1e-6 * (1 + abs(a[it][key])), (it, key, a[it][key], b[it][key])
    for name in ("model.safetensors", "ema.safetensors"):
        wa = load_file(str(straight / "weights" / name))
        wb = load_file(str(stopped / "weights" / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


def test_only_complete_checkpoints_are_resumed_and_old_ones_pruned(tmp_path):
    out = tmp_path / "run"
    trainer(out, "run.iterations=6").run()
    root = out / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["iter_000004", "iter_000006"]  # keep 2
    # a crash while writing leaves a temporary folder or an unmarked one: never picked
    (root / ".tmp-iter_000008-123").mkdir()
    (root / "iter_000010").mkdir()
    (root / "iter_000010" / "model.safetensors").write_bytes(b"truncated")
    assert find_resume(root, "auto").name == "iter_000006"
    assert not (root / "iter_000010" / MARKER).exists()


def test_sigterm_finishes_the_iteration_writes_a_checkpoint_and_returns(tmp_path):
    out = tmp_path / "run"
    job = trainer(out, "run.iterations=50", "run.checkpoint_every=0")
    original_step = job.step

    def step_then_signal():
        metrics = original_step()
        if job.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    job.step = step_then_signal
    summary = job.run()
    assert summary.stopped_by_signal == "SIGTERM"
    assert summary.iterations == 3
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["iter_000003"]
    resumed = trainer(out, "run.iterations=5", "run.resume=auto", "run.checkpoint_every=0").run()
    assert resumed.iterations == 5 and resumed.stopped_by_signal is None
    assert sorted(train_rows(out)) == [0, 1, 2, 3, 4]


def test_ema_follows_the_closed_form(tmp_path):
    job = trainer(tmp_path, "run.iterations=1")
    start = {k: v.detach().float().clone() for k, v in job.model.trainable.state_dict().items()}
    job.step()
    now = job.model.trainable.state_dict()
    for key in start:
        torch.testing.assert_close(job.ema[key], 0.9 * start[key] + 0.1 * now[key].float())
