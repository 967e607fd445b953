"""The VLM judge's HTTP client: one POST with a hard per-attempt time limit, and the shared state of
one reward call (deadline, open sockets) that lets the calling thread shut stuck sockets down.
Used by :mod:`branchgrpo.rewards.vlm`."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Mapping

_MAX_BODY = 16 * 2**20
_POLL_S = 0.02  # how often the calling thread checks the deadlines


class _Cancelled(Exception):
    """The call was abandoned (another request failed or the deadline passed)."""


class _Call:
    """Shared state of one reward call: its deadline, the open sockets and when their attempts end."""

    def __init__(self, deadline_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + deadline_s
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
        self.open: dict[int, tuple[socket.socket, float]] = {}
        self.attempts = 0
        self.last_error = "none"

    def register(self, key: int, sock: socket.socket, end: float) -> None:
        with self.lock:
            if self.cancelled.is_set():
                raise _Cancelled
            self.open[key] = (sock, end)

    def unregister(self, key: int) -> None:
        with self.lock:
            self.open.pop(key, None)

    def expire(self, now: float, everything: bool = False) -> None:
        """Shut down the sockets whose attempt is over; blocked reads in other threads then return."""
        with self.lock:
            late = [sock for sock, end in self.open.values() if everything or end <= now]
        for sock in late:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self.cancelled.set()
        self.expire(0.0, everything=True)


def post_once(call: _Call, payload: bytes, *, scheme: str, host: str, port: int | None, path: str,
              headers: Mapping[str, str], timeout: float) -> tuple[int, bytes, float | None]:
    """One POST of ``payload``: ``(status, body, Retry-After seconds or None)``.

    The attempt ends after ``timeout`` seconds or at ``call.deadline``; the calling thread shuts the
    socket down when the attempt's time is up (:meth:`_Call.expire`).
    """
    now = time.monotonic()
    end = min(now + timeout, call.deadline)
    if end <= now:
        raise TimeoutError("total deadline reached")
    with call.lock:
        call.attempts += 1
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=end - now,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=end - now)
    key = id(conn)
    try:
        try:
            conn.connect()  # bounded by the socket timeout
            sock = conn.sock  # kept: the connection drops it once the answer says "close"
            call.register(key, sock, end)
            conn.request("POST", path, body=payload, headers=headers)
            response = conn.getresponse()
            chunks, size = [], 0
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = response.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > _MAX_BODY:
                    raise http.client.HTTPException(f"answer larger than {_MAX_BODY} bytes")
            if time.monotonic() >= end:  # the socket was shut down under the read
                raise TimeoutError
            if not response.chunked and response.length:  # the server closed before the end
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
        except (OSError, http.client.HTTPException):
            if time.monotonic() >= end - 1e-3:
                raise TimeoutError(f"timed out after {end - now:.2g} s") from None
            raise
        retry_after = response.getheader("Retry-After")
        try:
            retry_s = float(retry_after) if retry_after is not None else None
        except ValueError:
            retry_s = None
        return response.status, b"".join(chunks), retry_s
    finally:
        call.unregister(key)
        conn.close()


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError) and str(err):
        return str(err)
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timed out"
    return f"{type(err).__name__}: {err}"
