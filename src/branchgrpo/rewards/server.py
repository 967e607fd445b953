"""Reference reward server: any registered reward behind the wire format of :mod:`.remote`.

    python -m branchgrpo.rewards.server --reward pickscore --checkpoint /models/PickScore_v1 \\
        --option processor=/models/CLIP-ViT-H-14-laion2B-s32B-b79K --device cuda:1 --port 8765

Standard library HTTP (``ThreadingHTTPServer``): ``/health`` answers while a batch is scored;
scoring itself is serialised by a lock (one model, one batch at a time). Binds 127.0.0.1 unless
``--host`` says otherwise. Prints ``serving <reward> on http://HOST:PORT`` once listening
(``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import torch

from branchgrpo.rewards.base import Reward
from branchgrpo.rewards.remote import WireFormatError, decode_images

MAX_BODY_BYTES = 2 * 2**30


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0,
                 max_body_bytes: int = MAX_BODY_BYTES, verbose: bool = False, handler=None):
        self.reward = reward
        self.lock = threading.Lock()
        self.max_body_bytes = int(max_body_bytes)
        self.verbose = verbose
        self.requests_scored = 0
        super().__init__((host, port), handler or RewardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        with self.lock:
            scores = self.reward(images, prompts)
            self.requests_scored += 1
        return [float(s) for s in scores.float().cpu()]


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.rstrip("/") == "/health":
            reward = self.server.reward
            self._send_json(200, {"status": "ok", "reward": reward.name, "input_channels": reward.input_channels})
        else:
            self._send_json(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send_json(404, {"error": f"no such path {self.path!r}; use POST /score"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send_json(411, {"error": "Content-Length is required"})
            return
        if int(length) > self.server.max_body_bytes:
            self._send_json(413, {"error": f"body of {length} bytes exceeds the server limit {self.server.max_body_bytes}"})
            return
        body = self.rfile.read(int(length))
        try:
            images, prompts = decode_images(body)
        except WireFormatError as err:
            self._send_json(400, {"error": f"bad request body: {err}"})
            return
        try:
            scores = self.server.score(images, prompts)
        except ValueError as err:  # the reward refused the input (shape, prompt it cannot parse, ...)
            self._send_json(400, {"error": str(err)})
            return
        except Exception as err:  # scoring failed (out of memory, ...): a 5xx the client may retry
            self._send_json(500, {"error": f"{type(err).__name__}: {err}"})
            return
        self._send_json(200, {"scores": scores, "reward": self.server.reward.name})


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


def main(argv: Sequence[str] | None = None) -> int:
    from branchgrpo.rewards.registry import available_rewards, build_reward

    parser = argparse.ArgumentParser(prog="python -m branchgrpo.rewards.server", description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help=f"one of: {', '.join(available_rewards())}")
    parser.add_argument("--checkpoint", default=None, help="the reward's checkpoint file or folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                        help="a reward option (value parsed as JSON when it is JSON); repeatable")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reward = build_reward(args.reward, args.checkpoint, device=args.device, dtype=args.dtype, **dict(args.option))
    server = make_server(reward, args.host, args.port, verbose=args.verbose)
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
