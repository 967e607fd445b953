"""A run folder has one owner, and a start decides up front what it may do to the folder.

Rules (docs/reliability.md):

* **One owner.** A training holds an exclusive ``flock`` on ``RUN/.lock`` (which says its pid, host
  and start time) from the moment it starts writing to its end; a second training on the folder
  fails at once, naming the owner. The operating system drops the lock when its process dies, so
  a crashed (even ``kill -9``) owner never leaves it stuck. With several processes only rank 0
  takes it.
* **An existing run is not trained over by accident.** A folder holding a run (``config.yaml``,
  ``metrics.jsonl``, ``summary.json``, ``checkpoints/`` or ``weights/``) is refused unless
  ``run.resume`` continues it or ``run.overwrite=true`` replaces it. Overwrite *deletes* the old
  run's own outputs (the names in :data:`RUN_OUTPUTS`; other files in the folder are left alone)
  once the new start has succeeded: they are first renamed into one ``.tmp-replaced-*`` folder (a
  rename is atomic), then removed; a kill in between leaves that folder for the next start to clean.
* **A failed start changes nothing.** :func:`check_run_folder` only reads (it runs before any model
  loads); :meth:`RunFolder.claim` creates the folder and the lock, and a start that fails before
  its first write gives both back (:meth:`RunFolder.release` removes the lock file, and the folder
  too if the claim created it and it is still empty).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from branchgrpo.config import ConfigError

LOCK_NAME = ".lock"
# what a training writes into its folder: overwrite (and a start-over) removes exactly these
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "weights", "samples", "trees",
               "tensorboard", "wandb")
# any of these means the folder holds a run that a new start must not silently mix with
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "weights")
STALE_PREFIX = ".tmp-"  # temporary names of interrupted writes (checkpoints, replaced outputs)


class Start(Enum):
    """What a start does to its folder."""

    FRESH = "fresh"  # nothing there (or no run): just write
    RESUME = "resume"  # continue from a checkpoint (metrics after it are dropped)
    REPLACE = "replace"  # run.overwrite=true: the old run's outputs are deleted first
    START_OVER = "start over"  # resume=auto, but the run never reached a checkpoint: its outputs are deleted


def _warn(text: str) -> None:
    print(f"branchgrpo: warning: {text}", file=sys.stderr)


def holds_run(folder: Path) -> list[str]:
    """The run outputs (:data:`RUN_MARKERS`) present in ``folder``."""
    folder = Path(folder)
    return [name for name in RUN_MARKERS if (folder / name).exists()] if folder.is_dir() else []


def plan_start(output_dir: str | Path, resume: str | None, overwrite: bool) -> Start:
    """Decide what a start does to ``output_dir``, or raise a :class:`ConfigError` saying why it may not.

    Reads only. ``resume="auto"`` without any complete checkpoint starts over when the folder holds
    an interrupted run that never reached one, and refuses a run that finished (or kept no
    checkpoints): its weights are not deleted without ``run.overwrite=true``.
    """
    from branchgrpo.train.checkpoint import complete_checkpoints

    folder = Path(output_dir)
    found = holds_run(folder)
    if resume is not None and resume != "auto":
        return Start.RESUME
    if resume == "auto":
        if complete_checkpoints(folder / "checkpoints"):
            return Start.RESUME
        if not found:
            return Start.FRESH
        finished = [name for name in ("summary.json", "weights") if name in found]
        if finished:
            raise ConfigError("run.resume", f"{folder} holds a run ({', '.join(finished)}) but no checkpoint to "
                              "resume from (run.checkpoint_every=0?); set run.overwrite=true without run.resume to "
                              "replace it, or choose another run.output_dir")
        return Start.START_OVER
    if not found:
        return Start.FRESH
    if overwrite:
        return Start.REPLACE
    raise ConfigError("run.output_dir", f"{folder} already holds a run ({', '.join(found)}); continue it with "
                      "run.resume=auto, replace it with run.overwrite=true, or choose another run.output_dir")


def lock_owner(folder: str | Path) -> dict | None:
    """Who holds ``folder``'s lock (``{"pid", "host", "started"}``; empty while it is being written), or
    ``None`` when no live process does. Reads only: the lock is tried and let go at once."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_owner(fd)
        except OSError:  # a file system without locks: nothing to learn
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        owner = {}
    return owner if isinstance(owner, dict) else {}


def busy_error(folder: Path, owner: dict) -> ConfigError:
    pid, host = owner.get("pid", "unknown"), owner.get("host", "unknown host")
    since = f", started {owner['started']}" if owner.get("started") else ""
    return ConfigError("run.output_dir", f"{folder} is in use by another training (pid {pid} on {host}{since}); "
                       f"wait for it to end or stop it (kill -TERM {pid}), or choose another run.output_dir")


def check_run_folder(output_dir: str | Path, resume: str | None, overwrite: bool) -> Start:
    """Everything about the run folder a start can know before loading a model: it is not in use by a
    live training and the start is allowed (:func:`plan_start`). Reads only."""
    folder = Path(output_dir)
    owner = lock_owner(folder)
    if owner is not None:
        raise busy_error(folder, owner)
    nearest = next((p for p in [folder, *folder.absolute().parents] if p.exists()), None)
    if nearest is not None and (not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK)):
        raise ConfigError("run.output_dir", f"cannot write to {folder}: {nearest} is not a writable folder")
    if resume is not None and resume != "auto":
        from branchgrpo.train.checkpoint import MARKER

        if not (Path(resume) / MARKER).is_file():
            raise ConfigError("run.resume", f"{resume} is not a complete checkpoint folder (no {MARKER} marker); "
                              "use run.resume=auto or a RUN/checkpoints/iter_XXXXXX folder")
    return plan_start(folder, resume, overwrite)


@dataclass
class RunFolder:
    """A claimed run folder (rank 0 of a training holds one from its first write to its end)."""

    path: Path
    fd: int | None  # the locked file; None where the file system has no locks
    created: Path | None  # the topmost folder the claim created (removed again by a failed start)

    @classmethod
    def claim(cls, output_dir: str | Path) -> "RunFolder":
        """Create the folder if needed and take its lock, or raise naming the live owner."""
        path = Path(output_dir)
        created = None
        for folder in [path, *path.parents]:
            if folder.exists():
                break
            created = folder
        lock = path / LOCK_NAME
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.close(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as err:
            cls(path, None, created).release()
            raise ConfigError("run.output_dir", f"cannot write to {path}: {err.strerror}") from None
        for _ in range(100):  # the path may be unlinked by the previous owner between open and lock
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                cls(path, None, created).release()
                raise busy_error(path, owner) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                _warn(f"the file system of {path} has no file locks; nothing stops two trainings writing to it")
                return cls(path, None, created)
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise ConfigError("run.output_dir", f"could not take the lock {lock} (it keeps being replaced)")
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        return cls(path, fd, created)

    def release(self) -> None:
        """Give the folder back: unlink the lock file (while still holding it, so no one else's lock is
        removed), then close it; remove the folder if the claim created it and nothing was written."""
        if self.fd is not None:
            try:
                os.unlink(self.path / LOCK_NAME)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
        if self.created is not None:
            for folder in [self.path, *self.path.parents]:
                try:
                    folder.rmdir()  # only an empty folder goes
                except OSError:
                    break
                if folder == self.created:
                    break

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def clean_stale(self) -> list[Path]:
        """Remove what interrupted writes left (``.tmp-*`` folders and files in the run and its
        checkpoints, ``.*.tmp`` files of atomic writes); safe because the lock says no one else writes."""
        stale = []
        for folder in (self.path, self.path / "checkpoints"):
            if folder.is_dir():
                stale += [p for p in folder.iterdir() if p.name.startswith(STALE_PREFIX)]
        for folder in (self.path, self.path / "weights"):
            if folder.is_dir():
                stale += [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        if (self.path / "metrics.tmp").is_file():  # logging.truncate_metrics' temporary file
            stale.append(self.path / "metrics.tmp")
        for path in stale:
            _remove(path)
        return stale

    def clear_outputs(self) -> list[str]:
        """Delete the run's own outputs (:data:`RUN_OUTPUTS`): one rename each into a ``.tmp-replaced-*``
        folder, then that folder goes (a kill in between leaves it to :meth:`clean_stale`)."""
        present = [name for name in RUN_OUTPUTS if (self.path / name).exists()]
        if not present:
            return []
        trash = self.path / f"{STALE_PREFIX}replaced-{os.getpid()}"
        trash.mkdir(exist_ok=True)
        for name in present:
            os.replace(self.path / name, trash / name)
        _remove(trash)
        return present


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
