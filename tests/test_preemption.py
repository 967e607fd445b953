"""Real processes: SIGTERM stops cleanly with exit 0; kill -9 then resume=auto continues exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FAST = ["data.prompts_per_iteration=1", "eval.samples_per_prompt=1", "eval.max_prompts=2", "eval.every=0",
        "tree.steps=8", "split_plan=0:2,3:2", "run.progress=false", "run.device=cpu", "run.dump_tree_every=0",
        "run.tensorboard=false"]


def start(run: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "branchgrpo", "train", f"run.output_dir={run}", *FAST, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def train_rows(run: Path) -> dict[int, dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "reward_mean" in row:
            rows[row["iteration"]] = row
    return rows


def wait_for(predicate, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "run.iterations=500", "run.checkpoint_every=0")
    wait_for(lambda: len(train_rows(run)) >= 1 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    done = len(train_rows(run))
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"iter_{done:06d}"]
    assert (checkpoints[0] / "COMPLETE").is_file()


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    proc = start(straight, "run.iterations=5", "run.checkpoint_every=1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    run = tmp_path / "killed"
    proc = start(run, "run.iterations=5", "run.checkpoint_every=1")
    wait_for(lambda: (run / "checkpoints" / "iter_000002" / "COMPLETE").is_file() or proc.poll() is not None)
    proc.kill()  # SIGKILL: no handler, may land while iteration 3 or a checkpoint is being written
    proc.wait()
    resumed = start(run, "run.iterations=5", "run.checkpoint_every=1", "run.resume=auto")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = train_rows(straight), train_rows(run)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    for it in range(5):
        for key in ("reward_mean", "loss", "grad_norm"):
            assert abs(a[it][key] - b[it][key]) <= 1e-6 * (1 + abs(a[it][key])), (it, key)
