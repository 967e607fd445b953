"""A reward scored by another process over HTTP (:class:`RemoteReward`) and its wire format.

For judges that need their own GPU or environment (VLM judges such as UnifiedReward), or to share
one reward model between trainers. The reference server is :mod:`branchgrpo.rewards.server`.

Wire format (version ``branchgrpo-reward/1``):

* ``POST /score``, ``Content-Type: application/octet-stream``, body = safetensors bytes with one
  tensor ``images`` ``[B, C, H, W]`` (``uint8`` 0-255, or ``float16``/``float32`` in [0, 1]) and
  metadata ``{"format": "branchgrpo-reward/1", "prompts": "<JSON list of B strings>"}``.
* ``200`` with JSON ``{"scores": [B floats], "reward": name}``; ``4xx`` with JSON ``{"error": ...}``
  for a request the server refuses (not retried); ``5xx`` for a failure while scoring (retried).
* ``GET /health`` → ``{"status": "ok", "reward": name, "input_channels": C or null}``.

The client retries connection failures, timeouts and 5xx answers with exponential back-off and
then raises :class:`RemoteRewardError`; an answer that is not exactly ``B`` finite numbers is an
error at once. It never fills in scores.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import torch
from torch import Tensor

from branchgrpo.rewards.base import Reward, RewardError, is_finite_number

FORMAT = "branchgrpo-reward/1"
WIRE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


class RemoteRewardError(RewardError):
    """The remote reward gave no valid scores (server down, timing out, refusing, or garbage)."""


class WireFormatError(ValueError):
    """A request or answer body that does not follow the wire format."""


def encode_images(images: Tensor, prompts: Sequence[str], wire_dtype: str = "uint8") -> bytes:
    """Request body: safetensors bytes of ``images`` (quantised to ``wire_dtype``) + prompts."""
    from safetensors.torch import save

    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    images = images.detach().float().cpu().clamp(0.0, 1.0)
    if wire_dtype == "uint8":
        payload = (images * 255.0).round().to(torch.uint8)
    else:
        payload = images.to(WIRE_DTYPES[wire_dtype])
    metadata = {"format": FORMAT, "prompts": json.dumps(list(prompts))}
    return save({"images": payload.contiguous()}, metadata=metadata)


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    if len(body) < 8:
        raise WireFormatError("body too short for safetensors")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > len(body) - 8 or header_len > 100 * 2**20:
        raise WireFormatError("safetensors header length is out of range")
    try:
        header = json.loads(body[8 : 8 + header_len])
    except ValueError as err:
        raise WireFormatError(f"safetensors header is not JSON: {err}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise WireFormatError("safetensors header has no __metadata__")
    return meta


def decode_images(body: bytes) -> tuple[Tensor, list[str]]:
    """Inverse of :func:`encode_images`: float32 images in [0, 1] and the prompts."""
    from safetensors.torch import load

    meta = _safetensors_metadata(body)
    if meta.get("format") != FORMAT:
        raise WireFormatError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        prompts = json.loads(meta["prompts"])
    except (KeyError, ValueError):
        raise WireFormatError("metadata 'prompts' is missing or not JSON") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise WireFormatError("metadata 'prompts' must be a JSON list of strings")
    try:
        tensors = load(body)
    except Exception as err:
        raise WireFormatError(f"body is not valid safetensors: {err}") from None
    if set(tensors) != {"images"}:
        raise WireFormatError(f"expected one tensor 'images', got {sorted(tensors)}")
    images = tensors["images"]
    if images.ndim != 4:
        raise WireFormatError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif images.dtype in (torch.float16, torch.float32):
        images = images.float()
    else:
        raise WireFormatError(f"images dtype {images.dtype} is not uint8, float16 or float32")
    if images.shape[0] != len(prompts):
        raise WireFormatError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts


def decode_scores(body: bytes, expected: int) -> list[float]:
    """The ``scores`` of an answer body; :class:`WireFormatError` unless exactly ``expected`` finite numbers."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WireFormatError(f"answer is not JSON: {body[:120]!r}") from None
    if not isinstance(data, dict) or "scores" not in data:
        raise WireFormatError(f"answer has no 'scores': {str(data)[:120]}")
    scores = data["scores"]
    if not isinstance(scores, list) or len(scores) != expected:
        got = len(scores) if isinstance(scores, list) else type(scores).__name__
        raise WireFormatError(f"answer has {got} scores for {expected} images")
    if not all(is_finite_number(s) for s in scores):
        raise WireFormatError("answer holds scores that are not finite numbers")
    return [float(s) for s in scores]


_RETRYABLE = (
    ConnectionError, TimeoutError, socket.timeout, http.client.RemoteDisconnected,
    http.client.IncompleteRead, http.client.BadStatusLine, BrokenPipeError,
)


class RemoteReward(Reward):
    """Scores from a reward server (``python -m branchgrpo.rewards.server``).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765`` (``checkpoint`` may carry it instead).
        timeout: seconds for one attempt (connect and each read).
        retries: further attempts after the first on connection errors, timeouts and 5xx.
        backoff: seconds before the first retry; doubles each time, capped at ``backoff_max``.
        wire_dtype: ``uint8`` (default: images as 8-bit, 4x smaller, as an image file would be),
            ``float16`` or ``float32`` (lossless).
        name: name of the reward in logs and composites.

    Worst case before :class:`RemoteRewardError`: ``(retries + 1) * timeout`` plus the back-offs.
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
        name: str = "remote",
    ):
        super().__init__(device, dtype)
        url = url if url is not None else checkpoint
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"reward 'remote' needs url='http://HOST:PORT' of a reward server, got {url!r}")
        if wire_dtype not in WIRE_DTYPES:
            raise RewardError(f"reward 'remote': wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise RewardError("reward 'remote': timeout must be > 0, retries and backoff >= 0")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.wire_dtype = wire_dtype
        self.name = name
        self.attempts_made = 0  # attempts of the last call (for logs and tests)

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, name={self.name!r})"

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's ``/health`` answer (raises on any failure, no retries)."""
        with urllib.request.urlopen(self.url + "/health", timeout=timeout or self.timeout) as resp:
            return json.loads(resp.read())

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.1) -> dict[str, Any]:
        """Poll ``/health`` until the server answers or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return self.health(timeout=max(0.1, min(self.timeout, deadline - time.monotonic())))
            except Exception as err:  # not up yet
                last = err
                time.sleep(poll)
        raise RemoteRewardError(f"reward server {self.url} did not come up within {timeout:.0f} s (last error: {last})")

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(
            self.url + "/score", data=body, method="POST",
            headers={"Content-Type": "application/octet-stream", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as resp:
            return resp.read()

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        body = encode_images(images, prompts, self.wire_dtype)
        start = time.monotonic()
        errors: list[str] = []
        self.attempts_made = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.backoff_max))
            self.attempts_made = attempt + 1
            try:
                answer = self._post(body)
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if 400 <= err.code < 500:
                    raise RemoteRewardError(
                        f"reward server {self.url} refused the request (HTTP {err.code}): {detail}"
                    ) from None
                errors.append(f"HTTP {err.code}: {detail}")
                continue
            except urllib.error.URLError as err:
                errors.append(_describe(err.reason))
                continue
            except _RETRYABLE as err:
                errors.append(_describe(err))
                continue
            try:
                scores = decode_scores(answer, len(prompts))
            except WireFormatError as err:
                raise RemoteRewardError(f"reward server {self.url} answered garbage: {err}") from None
            return torch.tensor(scores, dtype=torch.float32)
        elapsed = time.monotonic() - start
        raise RemoteRewardError(
            f"reward server {self.url} gave no scores after {self.retries + 1} attempts in {elapsed:.1f} s "
            f"(timeout {self.timeout:g} s each); last error: {errors[-1] if errors else 'none'}. "
            "Is it running? Start one with: python -m branchgrpo.rewards.server --reward NAME --port PORT"
        )


def _describe(err: BaseException | str) -> str:
    if isinstance(err, BaseException):
        if isinstance(err, (TimeoutError, socket.timeout)):
            return "timed out"
        return f"{type(err).__name__}: {err}"
    return str(err)


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read()
        data = json.loads(body)
        return str(data.get("error", data))[:500]
    except Exception:
        return str(err.reason)[:200]
