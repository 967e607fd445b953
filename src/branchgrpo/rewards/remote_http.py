"""Plain-socket HTTP helpers of :class:`~branchgrpo.rewards.remote.RemoteReward`: name resolution,
sending and answer parsing, each bounded by one deadline for the whole exchange."""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import re
import socket
import threading
import time
from typing import Any

from branchgrpo.rewards.remote_wire import _preview

_MAX_HEAD_BYTES = 64 * 2**10  # status line + headers of an answer
_SEND_CHUNK = 2**20


class _Fail(Exception):
    """An attempt failed in a way another attempt would not fix; the message follows the URL."""


class _Replay:
    """A socket stand-in that lets :class:`http.client.HTTPResponse` parse bytes already received."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def _time_left(deadline: float) -> float:
    """Seconds until ``deadline``; :class:`TimeoutError` once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _resolve(host: str, port: int, deadline: float) -> list:
    """``getaddrinfo`` by ``deadline``: the OS resolver has no timeout, so a name is looked up in a thread."""
    try:
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # a literal: no lookup
    except ValueError:
        pass
    found: dict[str, Any] = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            found["error"] = err

    worker = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(_time_left(deadline))
    if worker.is_alive():
        raise TimeoutError(f"resolving {host} took past the deadline")
    if "error" in found:
        raise found["error"]
    return found["infos"]


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        sock.settimeout(_time_left(deadline))
        sent += sock.send(view[sent : sent + _SEND_CHUNK])


def _content_length(head: bytes) -> int | None:
    match = re.search(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*(?:\r\n|$)", head, re.IGNORECASE)
    return int(match.group(1)) if match else None


def _parse_answer(raw: bytes) -> tuple[int, bytes]:
    """``(status, body)`` of a complete HTTP answer; retryable errors for a cut one, :class:`_Fail` for junk."""
    if not raw:
        raise http.client.RemoteDisconnected("connection closed without an answer")
    if b"\r\n\r\n" not in raw:
        raise http.client.IncompleteRead(raw)
    response = http.client.HTTPResponse(_Replay(raw))  # type: ignore[arg-type]
    try:
        response.begin()
    except http.client.HTTPException:
        raise _Fail(f"answered garbage: not an HTTP answer: {_preview(raw)}") from None
    return response.status, response.read()  # IncompleteRead when the body was cut off


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_detail(body: bytes) -> str:
    """The ``error`` of a JSON error answer, else a short preview of the body; one line."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _preview(body) if body else "(no body)"
    if isinstance(data, dict) and "error" in data:
        return _one_line(str(data["error"]))
    return _preview(data)
