"""Real processes: SIGTERM stops cleanly with exit 0; a second training on a live run is refused;
kill -9 (after a checkpoint, or before the first one) then resume=auto gives the uninterrupted run's
metric rows and bit-identical weights."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def measured_rows(run: Path) -> list[dict]:
    """Every metrics row (train and eval, file order) without the load-dependent columns; a kill may cut
    a line, so this is only read from finished runs."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/", "throughput/"))} for r in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "weights" / "model.safetensors")), load_file(str(b / "weights" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def wait_for(predicate, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "run.iterations=500", "run.checkpoint_every=0")
    wait_for(lambda: len(train_rows(run)) >= 1 or proc.poll() is not None)
    # the run folder has one owner: a second training (even a resume) is refused at once, in one line
    second = subprocess.run([sys.executable, "-m", "branchgrpo", "train", f"run.output_dir={run}", *FAST,
                             "run.resume=auto"], capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert f"in use by another training (pid {proc.pid} on " in second.stderr, second.stderr
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    done = len(train_rows(run))
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"iter_{done:06d}"]
    assert (checkpoints[0] / "COMPLETE").is_file()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted five-iteration run the interrupted ones must equal."""
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = start(run, "run.iterations=5", "run.checkpoint_every=1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return run


def test_kill_9_then_resume_equals_uninterrupted(straight, tmp_path):
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
    assert measured_rows(run) == measured_rows(straight)
    assert_same_weights(straight, run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_kill_9_before_the_first_checkpoint_then_resume_equals_uninterrupted(straight, tmp_path):
    run = tmp_path / "killed"
    proc = start(run, "run.iterations=5", "run.checkpoint_every=4")
    wait_for(lambda: len(train_rows(run)) >= 2 or proc.poll() is not None)
    proc.kill()
    proc.wait()
    assert not (run / "checkpoints" / "iter_000004" / "COMPLETE").exists()
    # the same command again: refused (the folder holds a run), and nothing changes
    before = snapshot(run)
    again = start(run, "run.iterations=5", "run.checkpoint_every=4")
    _, err = again.communicate(timeout=240)
    assert again.returncode == 2 and "already holds a run" in err and "Traceback" not in err
    assert snapshot(run) == before
    # resume=auto: nothing to resume from, so the interrupted run starts over
    resumed = start(run, "run.iterations=5", "run.checkpoint_every=4", "run.resume=auto")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "starting it over" in err
    assert measured_rows(run) == measured_rows(straight)
    assert_same_weights(straight, run)
