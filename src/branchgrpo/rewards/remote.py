"""A reward scored by another process over HTTP (:class:`RemoteReward`) and its wire format.

For judges that need their own GPU or environment (VLM judges such as UnifiedReward), or to share
one reward model between trainers. The reference server is :mod:`branchgrpo.rewards.server`.

Wire format (version ``branchgrpo-reward/1``, encoded and decoded in
:mod:`branchgrpo.rewards.remote_wire`; the socket helpers are in :mod:`branchgrpo.rewards.remote_http`):

* ``POST /score``, ``Content-Type: application/octet-stream``, body = safetensors bytes with one
  tensor ``images`` ``[B, C, H, W]`` (``uint8`` 0-255, or ``float16``/``float32`` in [0, 1]) and
  metadata ``{"format": "branchgrpo-reward/1", "prompts": "<JSON list of B strings>"}``; with
  ``Authorization: Bearer TOKEN`` when the server requires a token.
* ``200`` with JSON ``{"scores": [B floats], "reward": name}``; ``4xx`` with JSON ``{"error": ...}``
  for a request the server refuses (not retried); ``5xx`` for a failure while scoring (retried).
* ``GET /health`` → ``{"status": "ok", "reward": name, "input_channels": C or null}``.

Every attempt has a deadline for the whole exchange (name resolution, connect, TLS, sending the
request and receiving the whole answer), so a server that drips its answer cannot hang training.
The client retries connection failures, missed deadlines and 5xx answers with exponential
back-off and then raises :class:`RemoteRewardError`; a refusal (4xx) or an answer that is not
exactly ``B`` finite numbers within float32 range is an error at once. It never fills in scores.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import ssl
import time
import urllib.parse
from typing import Any

import torch
from torch import Tensor

from branchgrpo.rewards.base import Reward, RewardError
from branchgrpo.rewards.remote_http import (
    _MAX_HEAD_BYTES,
    _content_length,
    _error_detail,
    _Fail,
    _one_line,
    _parse_answer,
    _resolve,
    _send_all,
    _time_left,
)
from branchgrpo.rewards.remote_wire import (  # noqa: F401  (the wire format's names, re-exported)
    FLOAT32_MAX,
    FORMAT,
    WIRE_DTYPES,
    WireFormatError,
    _preview,
    _safetensors_metadata,
    decode_images,
    decode_scores,
    encode_images,
)

TOKEN_ENV = "BRANCHGRPO_REWARD_TOKEN"  # the bearer token when ``token=`` is not given (client and server)
MAX_ANSWER_BYTES = 4 * 2**20  # default cap on an answer body (B scores are ~25 bytes each)


class RemoteRewardError(RewardError):
    """The remote reward gave no valid scores (server down, timing out, refusing, or garbage)."""



class RemoteReward(Reward):
    """Scores from a reward server (``python -m branchgrpo.rewards.server``).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765`` (``checkpoint`` may carry it instead).
        timeout: the deadline in seconds for one attempt as a whole: name resolution, connect, TLS
            handshake, sending the request and receiving the complete answer (not per socket read).
        retries: further attempts after the first on connection errors, missed deadlines and 5xx.
        backoff: seconds before the first retry; doubles each time, capped at ``backoff_max``.
        wire_dtype: ``uint8`` (default: images as 8-bit, 4x smaller, as an image file would be),
            ``float16`` or ``float32`` (lossless).
        token: sent as ``Authorization: Bearer TOKEN``; when None, the environment variable
            ``BRANCHGRPO_REWARD_TOKEN`` if set, else no header.
        max_answer_bytes: a longer answer body is an error (not retried).
        name: name of the reward in logs and composites.

    Worst case of one call before :class:`RemoteRewardError` (:attr:`worst_case_seconds`), beyond
    encoding the images: ``(retries + 1) * timeout + sum(min(backoff * 2**k, backoff_max) for k <
    retries)``, at most ``(retries + 1) * (timeout + backoff_max)``. The call also holds itself to
    that total, so a late wake-up from a back-off sleep does not add up over the attempts.
    """

    input_channels = None

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        url: str | None = None,
        device="cpu",
        dtype="float32",
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        wire_dtype: str = "uint8",
        token: str | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        name: str = "remote",
    ):
        super().__init__(device, dtype)
        url = url if url is not None else checkpoint
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"reward 'remote' needs url='http://HOST:PORT' of a reward server, got {url!r}")
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port == -1 or parts.query or parts.fragment or not url.isascii() or " " in url:
            raise RewardError(f"reward 'remote': url must look like http://HOST:PORT[/PREFIX], got {url!r}")
        if wire_dtype not in WIRE_DTYPES:
            raise RewardError(
                f"reward 'remote': wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}"
            )
        for field, value, zero_ok in (("timeout", timeout, False), ("backoff", backoff, True),
                                      ("backoff_max", backoff_max, True)):
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and not zero_ok):
                allowed = "a finite number >= 0" if zero_ok else "a finite number > 0"
                raise RewardError(f"reward 'remote': {field} must be {allowed} (seconds), got {value!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise RewardError(f"reward 'remote': retries must be an integer >= 0, got {retries!r}")
        if isinstance(max_answer_bytes, bool) or not isinstance(max_answer_bytes, int) or max_answer_bytes < 1:
            raise RewardError(f"reward 'remote': max_answer_bytes must be an integer >= 1, got {max_answer_bytes!r}")
        token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        if token is not None and (not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]+", token)):
            raise RewardError(
                f"reward 'remote': token (or ${TOKEN_ENV}) must be printable ASCII without spaces, e.g. a hex string"
            )
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.wire_dtype = wire_dtype
        self.max_answer_bytes = max_answer_bytes
        self.name = name
        self.attempts_made = 0  # attempts of the last call (for logs and tests)
        self._token = token
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port or (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._prefix = parts.path

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, name={self.name!r})"

    @property
    def worst_case_seconds(self) -> float:
        """Longest one call waits on the server before raising: every attempt's deadline plus the back-offs."""
        return (self.retries + 1) * self.timeout + sum(self._backoff(k) for k in range(self.retries))

    def _backoff(self, k: int) -> float:
        return min(self.backoff * 2.0**k, self.backoff_max)

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's ``/health`` answer within ``timeout`` (default: the attempt deadline); no retries."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            status, answer = self._exchange("GET", "/health", b"", deadline)
        except _Fail as err:
            raise RemoteRewardError(f"reward server {self.url} {err}") from None
        except (OSError, http.client.HTTPException) as err:
            raise RemoteRewardError(f"reward server {self.url} /health failed: {self._describe(err)}") from None
        if status != 200:
            raise RemoteRewardError(f"reward server {self.url} /health answered HTTP {status}: {_error_detail(answer)}")
        try:
            data = json.loads(answer)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise RemoteRewardError(f"reward server {self.url} /health answered garbage: {_preview(answer)}")
        return data

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.1) -> dict[str, Any]:
        """Poll ``/health`` until the server answers or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.health(timeout=max(0.1, min(self.timeout, deadline - time.monotonic())))
            except RemoteRewardError as err:  # not up yet
                last = err
                time.sleep(poll)
        raise RemoteRewardError(f"reward server {self.url} did not come up within {timeout:g} s (last error: {last})")

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        body = encode_images(images, prompts, self.wire_dtype)
        return torch.tensor(self._request_scores(body, len(prompts)), dtype=torch.float32)

    def _request_scores(self, body: bytes, expected: int) -> list[float]:
        """``POST /score`` with retries; the scores, or :class:`RemoteRewardError` within :attr:`worst_case_seconds`."""
        start = time.monotonic()
        call_deadline = start + self.worst_case_seconds
        errors: list[str] = []
        self.attempts_made = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(max(0.0, min(self._backoff(attempt - 1), call_deadline - time.monotonic())))
            self.attempts_made = attempt + 1
            deadline = min(time.monotonic() + self.timeout, call_deadline)
            try:
                status, answer = self._exchange("POST", "/score", body, deadline)
            except _Fail as err:
                raise RemoteRewardError(f"reward server {self.url} {err}") from None
            except (OSError, http.client.HTTPException) as err:
                errors.append(self._describe(err))
                continue
            if status >= 500:
                errors.append(f"HTTP {status}: {_error_detail(answer)}")
                continue
            if 400 <= status < 500:
                raise RemoteRewardError(
                    f"reward server {self.url} refused the request (HTTP {status}): {_error_detail(answer)}"
                )
            if status != 200:
                raise RemoteRewardError(
                    f"reward server {self.url} answered HTTP {status}, expected 200: {_error_detail(answer)}"
                )
            try:
                return decode_scores(answer, expected)
            except WireFormatError as err:
                raise RemoteRewardError(f"reward server {self.url} answered garbage: {err}") from None
        elapsed = time.monotonic() - start
        raise RemoteRewardError(
            f"reward server {self.url} gave no scores after {self.attempts_made} attempts in {elapsed:.1f} s "
            f"(deadline {self.timeout:g} s per attempt); last error: {errors[-1] if errors else 'none'}. "
            "Is it running? Start one with: python -m branchgrpo.rewards.server --reward NAME --port PORT"
        )

    # -- one HTTP exchange under a deadline ------------------------------------------------------

    def _exchange(self, method: str, path: str, body: bytes, deadline: float) -> tuple[int, bytes]:
        """One request; ``(status, answer body)`` or an exception, by ``deadline`` (``time.monotonic``).

        Each socket operation gets only the time left until the deadline, so the whole exchange
        ends by it however the server paces its bytes.
        """
        head = [f"{method} {self._prefix}{path} HTTP/1.1", f"Host: {self._host_header}", "Connection: close",
                "Accept: application/json", f"Content-Length: {len(body)}"]
        if body:
            head.append("Content-Type: application/octet-stream")
        if self._token is not None:
            head.append(f"Authorization: Bearer {self._token}")
        sock = self._connect(deadline)
        try:
            try:
                _send_all(sock, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), deadline)
                _send_all(sock, body, deadline)
            except (ConnectionResetError, BrokenPipeError) as err:
                # the server may have answered (e.g. 413, 401) and closed before reading the body
                try:
                    raw = self._receive(sock, deadline)
                except OSError:
                    raw = b""
                if not raw:
                    raise err from None
            else:
                raw = self._receive(sock, deadline)
        finally:
            sock.close()
        return _parse_answer(raw)

    def _connect(self, deadline: float) -> socket.socket:
        last: OSError = TimeoutError("deadline passed before connecting")
        for family, kind, proto, _, address in _resolve(self._host, self._port, deadline):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(_time_left(deadline))
                sock.connect(address)
                if self._tls:
                    sock.settimeout(_time_left(deadline))  # CPython bounds the whole handshake by it
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
                return sock
            except ssl.SSLCertVerificationError as err:
                sock.close()
                raise _Fail(f"failed TLS certificate verification: {err.verify_message}") from None
            except OSError as err:
                sock.close()
                last = err
        raise last

    def _receive(self, sock: socket.socket, deadline: float) -> bytes:
        """Bytes of the answer until its Content-Length is complete or the server closes."""
        buf = bytearray()
        body_start: int | None = None  # where the body begins, once the head is in
        need: int | None = None  # total bytes, when the head gave a Content-Length
        while need is None or len(buf) < need:
            sock.settimeout(_time_left(deadline))
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if body_start is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        raise _Fail(f"answered garbage: answer headers exceed {_MAX_HEAD_BYTES} bytes")
                    continue
                body_start = end + 4
                length = _content_length(bytes(buf[:end]))
                if length is not None:
                    if length > self.max_answer_bytes:
                        raise _Fail(f"answered garbage: an answer of {length} bytes exceeds "
                                    f"max_answer_bytes={self.max_answer_bytes}")
                    need = body_start + length
            if len(buf) - body_start > self.max_answer_bytes:
                raise _Fail(f"answered garbage: the answer exceeds max_answer_bytes={self.max_answer_bytes}")
        return bytes(buf)

    def _describe(self, err: BaseException) -> str:
        if isinstance(err, TimeoutError):
            return f"timed out: no complete answer within the {self.timeout:g} s deadline"
        if isinstance(err, ConnectionRefusedError):
            return "connection refused"
        if isinstance(err, http.client.RemoteDisconnected):
            return "connection closed without an answer"
        if isinstance(err, (ConnectionResetError, BrokenPipeError)):
            return "connection reset by the server"
        if isinstance(err, http.client.IncompleteRead):
            return "connection closed in the middle of the answer"
        if isinstance(err, socket.gaierror):
            return f"cannot resolve host {self._host!r}: {err.strerror}"
        return _one_line(f"{type(err).__name__}: {err}")
