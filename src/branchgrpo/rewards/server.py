"""Reference reward server: any registered reward behind the wire format of :mod:`.remote`.

    python -m branchgrpo.rewards.server --reward pickscore --checkpoint /models/PickScore_v1 \\
        --option processor=/models/CLIP-ViT-H-14-laion2B-s32B-b79K --device cuda:1 --port 8765

Standard library HTTP (``ThreadingHTTPServer``): ``/health`` answers while a batch is scored;
scoring itself is serialised by a lock (one model, one batch at a time). Binds 127.0.0.1 unless
``--host`` says otherwise. Prints ``serving <reward> on http://HOST:PORT`` once listening
(``--port 0`` picks a free port).

Limits that keep a misbehaving or hostile client from exhausting the server:

* size: ``Content-Length`` is required (411) and checked against ``--max-body-mb`` before any of the
  body is read or decoded (413);
* time: a client must deliver its whole request (headers and body) within ``--timeout`` seconds,
  and no socket read or write waits longer than that, so stalled or dripping uploads free their
  thread; scoring itself is not timed;
* threads: at most ``--max-connections`` connections are handled at once; more get 503 (retried
  by the client);
* token: with ``--token`` (or ``$BRANCHGRPO_REWARD_TOKEN``) every request needs
  ``Authorization: Bearer TOKEN`` (401 otherwise; compared in constant time).

Answers never carry internals: a 400 says what is wrong with the request's format or content; a
500 says only ``reward failed while scoring (see server log)`` and the exception goes to the log.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

import torch

from branchgrpo.rewards.base import CheckpointError, Reward, RewardError
from branchgrpo.rewards.remote import TOKEN_ENV, WireFormatError, decode_images

MAX_BODY_BYTES = 256 * 2**20
CLIENT_TIMEOUT = 60.0
MAX_CONNECTIONS = 16
SCORING_FAILED = "reward failed while scoring (see server log)"
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
log = logging.getLogger("branchgrpo.rewards.server")


class RewardServer(ThreadingHTTPServer):
    """Serves one reward; see the module docstring for the limits each argument sets."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, *,
                 max_body_bytes: int = MAX_BODY_BYTES, client_timeout: float = CLIENT_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, token: str | None = None,
                 verbose: bool = False, handler=None):
        if max_body_bytes < 1 or not client_timeout > 0 or max_connections < 1:
            raise ValueError("max_body_bytes and max_connections must be >= 1 and client_timeout > 0")
        self.reward = reward
        self.lock = threading.Lock()
        self.max_body_bytes = int(max_body_bytes)
        self.client_timeout = float(client_timeout)
        self.max_connections = int(max_connections)
        self.token = token or None
        self.verbose = verbose
        self.requests_scored = 0
        self.connections_refused = 0  # turned away with 503 because every slot was taken
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__((host, port), handler or RewardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        with self.lock:
            scores = self.reward(images, prompts)
            self.requests_scored += 1
        return [float(s) for s in scores.double().cpu()]

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.connections_refused += 1
            log.warning("busy: %d connections open, refusing %s with 503", self.max_connections, client_address[0])
            _answer_raw(request, 503, {"error": f"server busy ({self.max_connections} connections open); retry later"})
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the handler thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # the client went away or was cut off by a limit
            log.info("connection from %s ended: %s", client_address[0], err)
        else:
            log.exception("unexpected error while handling a request from %s", client_address[0])


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        self.timeout = self.server.client_timeout  # each socket read/write (applied by StreamRequestHandler)
        super().setup()
        self._receiving = True
        self._guard = threading.Lock()
        self._watchdog = threading.Timer(self.server.client_timeout, self._request_expired)
        self._watchdog.daemon = True
        self._watchdog.start()

    def finish(self) -> None:
        self._watchdog.cancel()
        try:
            super().finish()
        except OSError:
            pass

    def _request_expired(self) -> None:
        """The whole request was not in after the client timeout: cut the connection, freeing the thread."""
        with self._guard:
            if self._receiving:
                log.warning("%s did not send its request within %g s; closing the connection",
                            self.client_address[0], self.server.client_timeout)
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _request_received(self) -> None:
        """From here on (scoring, answering) the request deadline no longer applies."""
        with self._guard:
            self._receiving = False
        self._watchdog.cancel()

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.verbose:
            log.info("%s %s", self.address_string(), fmt % args)

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        expected = self.server.token
        if expected is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        match = hmac.compare_digest(given.strip().encode(), expected.encode())
        if scheme.lower() == "bearer" and match:
            return True
        self._send_json(401, {"error": "missing or wrong token; send the header Authorization: Bearer TOKEN"},
                        {"WWW-Authenticate": 'Bearer realm="branchgrpo-reward"'})
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._request_received()
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/health":
            reward = self.server.reward
            self._send_json(200, {"status": "ok", "reward": reward.name, "input_channels": reward.input_channels})
        else:
            self._send_json(404, {"error": f"no such path {self.path[:100]!r}; use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/score":
            self._send_json(404, {"error": f"no such path {self.path[:100]!r}; use POST /score"})
            return
        length = self.headers.get("Content-Length")
        if length is None or self.headers.get("Transfer-Encoding"):
            self._send_json(411, {"error": "Content-Length is required (chunked uploads are not accepted)"})
            return
        if not length.strip().isdigit():
            self._send_json(400, {"error": "Content-Length must be a non-negative integer"})
            return
        size = int(length)
        if size > self.server.max_body_bytes:
            self._send_json(413, {"error": f"body of {size} bytes exceeds the server limit of "
                                           f"{self.server.max_body_bytes} bytes (--max-body-mb)"})
            return
        try:
            body = self.rfile.read(size)
        except OSError:  # per-read timeout, or the connection was cut by the request deadline
            body = b""
        if len(body) < size:
            log.info("%s sent %d of %d body bytes; dropping the request", self.client_address[0], len(body), size)
            self.close_connection = True
            return
        self._request_received()
        try:
            images, prompts = decode_images(body)
        except WireFormatError as err:
            self._send_json(400, {"error": f"bad request body: {err}"})
            return
        del body
        self._score(images, prompts)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> None:
        try:
            scores = self.server.score(images, prompts)
        except ValueError as err:
            if _raised_in_package(err):  # the reward refused the input (shape, a prompt it cannot read, ...)
                self._send_json(400, {"error": " ".join(str(err).split())[:1000]})
                return
            log.exception("reward %r failed while scoring %d images", self.server.reward.name, len(prompts))
            self._send_json(500, {"error": SCORING_FAILED})
            return
        except Exception:  # out of memory, a bug in the reward, ...: a 5xx the client may retry
            log.exception("reward %r failed while scoring %d images", self.server.reward.name, len(prompts))
            self._send_json(500, {"error": SCORING_FAILED})
            return
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s) or abs(s) > _FLOAT32_MAX]
        if bad:
            log.error("reward %r returned %d scores that are not finite float32 numbers (first at index %d: %r)",
                      self.server.reward.name, len(bad), bad[0], scores[bad[0]])
            self._send_json(500, {"error": SCORING_FAILED})
            return
        self._send_json(200, {"scores": scores, "reward": self.server.reward.name})


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _raised_in_package(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's code (its messages are written for users)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE_DIR)


def _answer_raw(sock: socket.socket, status: int, payload: dict[str, Any]) -> None:
    """A whole JSON answer written straight to a socket no handler thread owns (best effort)."""
    body = json.dumps(payload).encode()
    head = (f"HTTP/1.0 {status} {'Service Unavailable' if status == 503 else 'Error'}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    try:
        sock.settimeout(1.0)
        sock.sendall(head.encode() + body)
    except OSError:
        pass


def make_server(reward: Reward, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> RewardServer:
    """A server for ``reward`` bound to ``host:port`` (not yet serving: call ``serve_forever``)."""
    return RewardServer(reward, host, port, **kwargs)


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be a number > 0, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from branchgrpo.rewards.registry import available_rewards

    parser = argparse.ArgumentParser(
        prog="python -m branchgrpo.rewards.server", description=__doc__.split("\n")[0],
        epilog=f"The token can also come from the environment variable {TOKEN_ENV} (preferred: a --token "
               "value is visible to other users in the process list). See docs/rewards.md, 'Remote rewards'.",
    )
    parser.add_argument("--reward", required=True,
                        help=f"the reward to serve, one of: {', '.join(available_rewards())}")
    parser.add_argument("--checkpoint", default=None, help="the reward's checkpoint file or folder")
    parser.add_argument("--device", default="auto", help="device of the reward model (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (default: bf16 on cuda)")
    parser.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                        help="a reward option (value parsed as JSON when it is JSON); repeatable")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface, "
                             "then set a token)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on; 0 picks a free one")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV} if set)")
    parser.add_argument("--max-body-mb", type=_positive(float, "--max-body-mb"), default=MAX_BODY_BYTES / 2**20,
                        help="largest request body in MiB, checked before reading it (default %(default)g)")
    parser.add_argument("--timeout", type=_positive(float, "--timeout"), default=CLIENT_TIMEOUT,
                        help="seconds a client may take to send its whole request, and the longest any socket "
                             "read or write waits (default %(default)g)")
    parser.add_argument("--max-connections", type=_positive(int, "--max-connections"), default=MAX_CONNECTIONS,
                        help="connections handled at once; more are answered 503 (default %(default)d)")
    parser.add_argument("--threads", type=_positive(int, "--threads"), default=None, help="torch intra-op threads")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from branchgrpo.rewards.registry import build_reward

    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and (not token.isascii() or not token.isprintable() or " " in token):
        parser.error(f"the token (--token or ${TOKEN_ENV}) must be printable ASCII without spaces")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        reward = build_reward(args.reward, args.checkpoint, device=args.device, dtype=args.dtype, **dict(args.option))
        server = make_server(reward, args.host, args.port, max_body_bytes=int(args.max_body_mb * 2**20),
                             client_timeout=args.timeout, max_connections=args.max_connections, token=token,
                             verbose=args.verbose)
    except (RewardError, CheckpointError, ValueError, TypeError, OSError) as err:
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without a token: anyone who can reach this port can use the reward "
              f"(set {TOKEN_ENV} or --token)", file=sys.stderr)
    print(f"serving {reward.name} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
