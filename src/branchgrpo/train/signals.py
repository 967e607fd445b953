"""SIGTERM/SIGUSR1 during start-up: stop before anything is written (training itself handles them
in :meth:`branchgrpo.train.trainer.Trainer.run`, finishing the iteration and checkpointing)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StartupInterrupted(Exception):
    """SIGTERM/SIGUSR1 arrived while a training was starting (checking, loading models): it stops
    before writing anything, so starting it again is always safe."""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        super().__init__(f"stopped by {signal_name} during start-up, before anything was written; start it again "
                         "(run.resume=auto continues from the newest checkpoint)")


def can_handle_signals() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interrupt_on_stop_signals():
    """SIGTERM/SIGUSR1 raise :class:`StartupInterrupted` inside the block (model loading may take
    minutes and has nothing to finish); the previous handlers come back after it."""

    def interrupt(signum, frame):  # noqa: ARG001
        raise StartupInterrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS if can_handle_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
