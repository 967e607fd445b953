"""Scoring that overlaps the rollout (``reward.overlap``; docs/rewards.md).

The trainer rolls out its prompt groups chunk by chunk and hands each chunk's decoded leaves to a
worker, which scores them while the next chunk rolls out. A worker has one method that matters,
``submit(outputs, prompts, group_ids) -> Future``: the future holds that chunk's
:func:`~branchgrpo.train.components.score_reward_chunk`, and the trainer joins the chunks with
:func:`~branchgrpo.train.components.join_reward_chunks`, so the rewards are those of the serial path.

- :class:`ThreadRewardWorker` scores in a background thread of the trainer's process with the
  trainer's own reward (torch and sleeping/HTTP rewards release the GIL).
- :class:`ProcessRewardWorker` scores in a spawned process that builds its own reward from the
  run's config (:class:`RewardFromConfig`), optionally on its own device (``reward.worker_device``).
"""

from __future__ import annotations

import queue
import threading
import traceback
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
from torch import Tensor

from branchgrpo.config import ConfigError
from branchgrpo.rewards.base import Reward, RewardError

if TYPE_CHECKING:
    from branchgrpo.train.config import TrainConfig

class RewardWorker(Protocol):
    """Scores chunks of decoded leaves in the background, in the order they are submitted."""

    def submit(self, outputs: Tensor, prompts: Sequence[str], group_ids: Tensor) -> Future:
        """Start scoring ``outputs [B, ...]`` (whole prompt groups; ``group_ids [B]``); the future
        gives their :func:`score_reward_chunk`."""

    def close(self) -> None:
        """Finish what was submitted and stop."""


class ThreadRewardWorker:
    """Scores with ``reward`` in one background thread of this process."""

    def __init__(self, reward: Reward, batch_size: int):
        self.reward = reward
        self.batch_size = batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="branchgrpo-reward")

    def submit(self, outputs: Tensor, prompts: Sequence[str], group_ids: Tensor) -> Future:
        from branchgrpo.train.components import score_reward_chunk

        return self._pool.submit(score_reward_chunk, self.reward, outputs, list(prompts), group_ids.cpu(),
                                 self.batch_size)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class RewardFromConfig:
    """Builds the reward a run's config names, on ``device`` (picklable: sent to the worker process)."""

    config: "TrainConfig"
    device: str

    def __call__(self) -> Reward:
        from branchgrpo.families import get_family
        from branchgrpo.train.components import build_reward, resolve_device
        from branchgrpo.train.config import import_plugins

        import_plugins(self.config.imports)
        device = resolve_device(self.device)
        bundle = _NoPolicy()
        if self.config.reward.name == "digits" and self.config.model.family == "digits":
            # the digits reward is the digits world's own classifier, which comes with the family
            bundle = get_family("digits").build(self.config, device, torch.float32)
        return build_reward(self.config, bundle, device)


class _NoPolicy:
    builtin_reward = None


class ProcessRewardWorker:
    """Scores in a spawned process whose reward is ``build()`` (a picklable zero-argument callable,
    e.g. :class:`RewardFromConfig`). The process starts at once and builds its reward while the
    trainer rolls out its first chunk; a failure there, or in any chunk, raises :class:`RewardError`
    from that chunk's future (and from every later one).

    Inputs travel through shared memory (CPU) or CUDA IPC (kept alive here until scored); torch in
    the process uses ``threads`` intra-op threads (None: torch's default). The process stops on
    :meth:`close`, when the worker is garbage-collected, or at exit.
    """

    def __init__(self, build: Callable[[], Reward], batch_size: int, threads: int | None = None):
        context = torch.multiprocessing.get_context("spawn")
        self._requests = context.Queue()
        replies = context.Queue()
        self._process = context.Process(
            target=_serve, args=(build, batch_size, threads, self._requests, replies),
            name="branchgrpo-reward", daemon=True,
        )
        self._process.start()
        self._state = _Pending()
        # the reply reader holds the state, not the worker, so dropping the worker stops the process
        self._reader = threading.Thread(target=_read_replies, args=(self._process, replies, self._state),
                                        name="branchgrpo-reward-replies", daemon=True)
        self._reader.start()
        self._finalizer = weakref.finalize(self, _stop, self._process, self._requests)

    def submit(self, outputs: Tensor, prompts: Sequence[str], group_ids: Tensor) -> Future:
        future: Future = Future()
        state = self._state
        with state.lock:
            if state.failure is not None:
                future.set_exception(RewardError(state.failure))
                return future
            key = state.next_key
            state.next_key += 1
            state.futures[key] = (future, outputs)
        self._requests.put((key, outputs.detach(), list(prompts), group_ids.detach().cpu()))
        return future

    def close(self) -> None:
        self._finalizer()
        self._reader.join(timeout=5)


class _Pending:
    """Futures of the chunks sent to the worker process, by key (with their inputs, kept alive)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.futures: dict[int, tuple[Future, Tensor]] = {}
        self.next_key = 0
        self.failure: str | None = None

    def fail(self, message: str) -> None:
        with self.lock:
            self.failure = message
            pending, self.futures = self.futures, {}
        for future, _ in pending.values():
            future.set_exception(RewardError(message))


def _read_replies(process, replies, state: _Pending) -> None:
    """Resolve each chunk's future as its reply arrives; fail them all if the process dies."""
    while True:
        try:
            key, result, error = replies.get(timeout=0.5)
        except queue.Empty:
            if process.is_alive():
                continue
            with state.lock:
                idle = not state.futures
            if process.exitcode != 0 or not idle:
                state.fail(f"the reward worker process exited (code {process.exitcode}) before it scored every chunk")
            return
        except (EOFError, OSError):
            state.fail("lost the connection to the reward worker process")
            return
        if key is None:
            state.fail(error)
            return
        with state.lock:
            future, _ = state.futures.pop(key)
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(RewardError(error))


def _stop(process, requests) -> None:
    """Ask the worker process to finish and wait for it (kill it if it does not)."""
    if process.is_alive():
        requests.put(None)
        process.join(timeout=30)
    if process.is_alive():
        process.kill()
        process.join()


def _serve(build, batch_size: int, threads: int | None, requests, replies) -> None:
    """The worker process: build the reward, then score chunks until ``None`` arrives."""
    from branchgrpo.train.components import score_reward_chunk

    if threads:
        torch.set_num_threads(threads)
    try:
        reward = build()
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the trainer as one line
        replies.put((None, None, f"the reward worker process could not build its reward: {_describe(err)}"))
        return
    while True:
        request = requests.get()
        if request is None:
            return
        key, outputs, prompts, group_ids = request
        try:
            replies.put((key, score_reward_chunk(reward, outputs, prompts, group_ids, batch_size), None))
        except Exception as err:  # noqa: BLE001
            replies.put((key, None, f"reward {reward.name!r} failed in the reward worker process: {_describe(err)}"))


def _describe(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)
    at = f" (at {where[-1].filename}:{where[-1].lineno})" if where else ""
    return f"{type(err).__name__}: {err}{at}"


# -- from the config ------------------------------------------------------------------------------
def start_reward_worker(config: "TrainConfig", reward: Reward, device: torch.device) -> RewardWorker:
    """The worker ``reward.worker`` names: a thread scoring with ``reward``, or a process that builds
    its own reward from ``config`` on ``reward.worker_device`` (default: ``device``)."""
    settings = config.reward
    if settings.worker == "thread":
        return ThreadRewardWorker(reward, settings.batch_size)
    return ProcessRewardWorker(RewardFromConfig(config, settings.worker_device or str(device)), settings.batch_size,
                               threads=torch.get_num_threads())


def overlap_problems(config: "TrainConfig", custom_reward: bool) -> list[ConfigError]:
    """What stops ``reward.overlap`` from giving the serial path's results for ``config``."""
    settings = config.reward
    if not settings.overlap:
        return []
    problems = []
    if config.method.tree.shared_root_noise:
        problems.append(ConfigError("reward.overlap", "cannot be combined with method.tree.shared_root_noise: there "
                                    "every prompt's roots come from the first prompt's noise stream, so a chunk of "
                                    "prompts would not roll out the trees of the whole batch; turn one of them off"))
    if settings.worker == "process" and custom_reward:
        problems.append(ConfigError("reward.worker", "the worker process builds its reward from the config, and a "
                                    "reward given from Python is not in it; register it (branchgrpo.register_reward "
                                    "in an importable module, named in reward.name) or use reward.worker=thread"))
    device = settings.worker_device
    if settings.worker == "process" and device and device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(ConfigError("reward.worker_device", f"{device} was asked for but torch sees no CUDA device"))
    return problems


__all__ = [
    "RewardWorker",
    "ThreadRewardWorker",
    "ProcessRewardWorker",
    "RewardFromConfig",
    "start_reward_worker",
    "overlap_problems",
]
