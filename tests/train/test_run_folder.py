"""A run folder has one owner; an existing run is resumed, replaced on request, or refused; a failed
start (refused, damaged checkpoint, a signal while loading) leaves the folder byte for byte as it was."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import TinyFamily, brightness_reward, tiny_generator

from branchgrpo.cli import main
from branchgrpo.config import ConfigError
from branchgrpo.families import register_family
from branchgrpo.rewards import register_reward
from branchgrpo.rewards.base import as_reward
from branchgrpo.train.checkpoint import MARKER
from branchgrpo.train.config import RunConfig, load_train_config
from branchgrpo.train.run_folder import LOCK_NAME, RunFolder, Start, check_run_folder, lock_owner, plan_start
from branchgrpo.train.trainer import StartupInterrupted, Trainer

TINY = ["run.progress=false", "run.tensorboard=false", "run.dump_tree_every=0", "run.device=cpu",
        "data.prompts_per_iteration=2", "eval.samples_per_prompt=1", "eval.every=0", "tree.steps=4",
        "split_plan=0:2", "run.checkpoint_every=1", "run.iterations=2"]


def trainer(out, *overrides, model=True):
    config = load_train_config(None, "branchgrpo", [f"run.output_dir={out}", *TINY, *overrides])
    return Trainer(config, model=tiny_generator() if model else None, reward=brightness_reward)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with its content hash (folders: '/')."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = "/" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-iteration run with checkpoints at 1 and 2 (copied per test)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer(out).run()
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def measured(row: dict) -> dict:
    """A metrics row without what depends on the machine's load (times, memory, throughput)."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "memory/", "throughput/"))}


# -- deciding what a start may do ------------------------------------------------------------------
def test_plan_start_covers_every_kind_of_folder(tmp_path):
    empty = tmp_path / "empty"
    assert plan_start(tmp_path / "missing", None, False) is Start.FRESH
    empty.mkdir()
    (empty / "notes.txt").write_text("not a run")
    assert plan_start(empty, None, False) is Start.FRESH
    assert plan_start(empty, "auto", False) is Start.FRESH

    interrupted = tmp_path / "interrupted"  # killed before its first checkpoint
    interrupted.mkdir()
    (interrupted / "config.yaml").write_text("{}\n")
    (interrupted / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"run.output_dir: .*already holds a run \(config.yaml, metrics.jsonl\)"):
        plan_start(interrupted, None, False)
    assert plan_start(interrupted, None, True) is Start.REPLACE
    assert plan_start(interrupted, "auto", False) is Start.START_OVER

    finished = tmp_path / "finished"  # a finished run that kept no checkpoint
    (finished / "weights").mkdir(parents=True)
    (finished / "summary.json").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"run.resume: .*no checkpoint to resume from"):
        plan_start(finished, "auto", False)

    checkpointed = tmp_path / "checkpointed"
    (checkpointed / "checkpoints" / "iter_000002").mkdir(parents=True)
    (checkpointed / "checkpoints" / "iter_000002" / MARKER).write_text("{}\n")
    assert plan_start(checkpointed, "auto", False) is Start.RESUME
    assert plan_start(empty, str(checkpointed / "checkpoints" / "iter_000002"), False) is Start.RESUME


def test_overwrite_and_resume_cannot_be_combined():
    with pytest.raises(ConfigError, match="run.overwrite: cannot be combined with run.resume"):
        RunConfig(overwrite=True, resume="auto")


# -- one owner -------------------------------------------------------------------------------------
HOLDER = "import sys, time\nfrom branchgrpo.train.run_folder import RunFolder\n" \
         "RunFolder.claim(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(600)\n"


def test_a_second_owner_is_refused_naming_the_first_and_a_killed_owner_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert lock_owner(out)["pid"] == holder.pid
        with pytest.raises(ConfigError, match=rf"in use by another training \(pid {holder.pid} on "):
            check_run_folder(out, None, False)
        with pytest.raises(ConfigError, match=rf"pid {holder.pid}"):
            RunFolder.claim(out)
        # the CLI refuses in one line, before any model loads
        assert main(["train", f"run.output_dir={out}", "run.device=cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("branchgrpo: error: run.output_dir:") and str(holder.pid) in err[0]
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    assert lock_owner(out) is None  # the operating system let go of the dead owner's lock
    with RunFolder.claim(out) as folder:
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert folder.fd is not None
    assert not (out / LOCK_NAME).exists()


def test_a_lock_file_unlinked_by_its_owner_is_never_shared(tmp_path):
    """The owner removes the lock file while holding it; a later claim locks a new file, never the old one."""
    first = RunFolder.claim(tmp_path)
    stale_fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)  # opened before the owner lets go
    first.release()
    second = RunFolder.claim(tmp_path)
    try:
        import fcntl

        fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old, unlinked file: locking it means nothing
        assert os.fstat(stale_fd).st_nlink == 0
        with pytest.raises(ConfigError, match="in use by another training"):
            RunFolder.claim(tmp_path)
    finally:
        os.close(stale_fd)
        second.release()


def test_a_folder_that_cannot_be_written_is_one_error_line_and_nothing_is_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(ConfigError, match=r"run.output_dir: cannot write to .*file/run"):
        check_run_folder(blocker / "run", None, False)
    with pytest.raises(ConfigError, match=r"run.output_dir: cannot write to .*file/run"):
        RunFolder.claim(blocker / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- existing runs -----------------------------------------------------------------------------------
def test_training_into_an_existing_run_is_refused_and_changes_nothing(run):
    before = snapshot(run)
    with pytest.raises(ConfigError, match="already holds a run"):
        trainer(run)
    assert snapshot(run) == before


def test_overwrite_replaces_the_runs_outputs_and_keeps_other_files(run):
    (run / "notes.txt").write_text("mine\n")
    old_rows = rows(run)
    summary = trainer(run, "run.iterations=1", "run.overwrite=true").run()
    assert summary.iterations == 1
    assert (run / "notes.txt").read_text() == "mine\n"
    assert [r["iteration"] for r in rows(run) if "reward_mean" in r] == [0]
    assert rows(run)[0] == old_rows[0]  # the same start evaluation, once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001"]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    recorded = load_train_config(run / "config.yaml")
    assert recorded.run.overwrite is False  # running the recorded config again cannot delete this run
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(recorded, model=tiny_generator(), reward=brightness_reward)


# -- a failed start changes nothing ------------------------------------------------------------------
def test_failed_starts_leave_the_folder_as_it_was(run, tmp_path):
    before = snapshot(run)
    # the run kept no EMA: a resume that wants one fails while loading the checkpoint
    with pytest.raises(FileNotFoundError, match="holds no EMA weights"):
        trainer(run, "run.resume=auto", "run.ema_decay=0.9").run()
    assert snapshot(run) == before
    # every checkpoint damaged: nothing to resume, nothing set aside
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "optimizer.pt").write_bytes(b"garbage")
    damaged = snapshot(run)
    with pytest.raises(ConfigError, match="no checkpoint in .* passes its checks"):
        trainer(run, "run.resume=auto").run()
    assert snapshot(run) == damaged
    # a failed start into a new folder leaves no folder behind
    fresh = tmp_path / "new" / "deeper"
    with pytest.raises(ConfigError, match="is damaged"):
        trainer(fresh, f"run.resume={run / 'checkpoints' / 'iter_000002'}").run()
    assert not (tmp_path / "new").exists()


class SignalledFamily(TinyFamily):
    """Loading this model takes long enough for Slurm's pre-emption signal to arrive."""

    name = "tiny-signalled"

    def build(self, config, device, dtype):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(30)  # the handler interrupts this at once
        raise AssertionError("the start-up signal did not interrupt model loading")


register_family(SignalledFamily(), replace=True)
register_reward("tiny-brightness", lambda checkpoint=None, device=None, dtype=None: as_reward(brightness_reward),
                needs_checkpoint=False)


def test_a_signal_while_loading_stops_cleanly_and_writes_nothing(run, capsys):
    before = snapshot(run)
    previous = signal.getsignal(signal.SIGUSR1)
    started = time.monotonic()
    code = main(["train", "model.family=tiny-signalled", "reward.name=tiny-brightness", f"run.output_dir={run}",
                 "run.resume=auto", *TINY])
    assert time.monotonic() - started < 25  # interrupted, not slept through
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert captured.out.startswith("stopped by SIGUSR1 during start-up, before anything was written")
    assert snapshot(run) == before
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers given back
    config = load_train_config(None, "branchgrpo", [f"run.output_dir={run}", "model.family=tiny-signalled",
                                                    "run.resume=auto", *TINY])
    with pytest.raises(StartupInterrupted):  # the Python API raises it
        Trainer(config, reward=brightness_reward)


# -- restarting ----------------------------------------------------------------------------------------
def test_resume_auto_before_the_first_checkpoint_starts_over_without_duplicate_rows(tmp_path, capsys):
    straight = tmp_path / "straight"
    trainer(straight, "run.checkpoint_every=0").run()
    killed = tmp_path / "killed"
    job = trainer(killed, "run.checkpoint_every=0", "run.iterations=5")

    def die():  # killed in its first iteration, after the start evaluation was logged
        raise KeyboardInterrupt

    job.step = die
    with pytest.raises(KeyboardInterrupt):
        job.run()
    assert [r["iteration"] for r in rows(killed)] == [0] and not (killed / "checkpoints").exists()
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / ".tmp-iter_000002-999").mkdir()  # an interrupted checkpoint write
    trainer(killed, "run.checkpoint_every=0", "run.resume=auto").run()
    assert "starting it over" in capsys.readouterr().err
    assert [measured(r) for r in rows(killed)] == [measured(r) for r in rows(straight)]
    assert not (killed / "checkpoints").exists()
