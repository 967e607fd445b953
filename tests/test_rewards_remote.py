"""The remote reward against the reference server on 127.0.0.1 (ephemeral ports): exact scores,
a slow server (timeout then retry), 5xx retries, garbage answers, refusals, a server that drops
connections, one that is down, and a server process killed mid-run. Every failure case ends in a
RemoteRewardError within a bounded time; no case returns made-up scores."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from branchgrpo.rewards import build_reward
from branchgrpo.rewards.remote import RemoteReward, RemoteRewardError, decode_images, encode_images
from branchgrpo.rewards.server import RewardHandler, make_server

PROMPTS = ["a handwritten 7", "the digit 3", "the number seven", "a handwritten 0"]


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return build_reward("digits")


def _images(n=4, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@contextmanager
def serving(reward, handler=None):
    server = make_server(reward, "127.0.0.1", 0, handler=handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _client(url, **kw):
    kw = {"timeout": 5.0, "retries": 2, "backoff": 0.05, "wire_dtype": "float32", **kw}
    return RemoteReward(url=url, **kw)


def test_wire_format_round_trip():
    images = _images()
    back, prompts = decode_images(encode_images(images, PROMPTS, "float32"))
    assert torch.equal(back, images) and prompts == PROMPTS
    back8, _ = decode_images(encode_images(images, PROMPTS, "uint8"))
    assert (back8 - images).abs().max() <= 0.5 / 255 + 1e-7


def test_remote_scores_equal_local(digits):
    images = _images()
    with serving(digits) as server:
        client = _client(server.url, wire_dtype="float32")
        assert client.wait_ready(timeout=5)["reward"] == "digits"
        torch.testing.assert_close(client(images, PROMPTS), digits(images, PROMPTS), rtol=0, atol=0)
        quantised = (images * 255).round() / 255  # the default uint8 wire is exact for 8-bit images
        via_uint8 = _client(server.url, wire_dtype="uint8")(quantised, PROMPTS)
        torch.testing.assert_close(via_uint8, digits(quantised, PROMPTS), rtol=0, atol=1e-7)
        # behind the registry, inside a composite
        remote = build_reward("remote", url=server.url, wire_dtype="float32", timeout=5.0)
        out = build_reward("digits:1.0,remote:0.5", checkpoint={}, components={"remote": {"url": server.url}}).score(
            quantised, PROMPTS)
        torch.testing.assert_close(out.total, 1.5 * digits(quantised, PROMPTS), atol=1e-6, rtol=0)
        assert remote(images, PROMPTS).shape == (4,)
        assert server.requests_scored >= 4


def test_slow_server_times_out_then_retry_succeeds(digits):
    class SlowOnce(RewardHandler):
        calls = 0

        def do_POST(self):
            type(self).calls += 1
            if type(self).calls == 1:
                time.sleep(1.5)  # longer than the client's timeout
            super().do_POST()

    images = _images()
    with serving(digits, SlowOnce) as server:
        client = _client(server.url, timeout=0.5, retries=2, backoff=0.05)
        start = time.monotonic()
        scores = client(images, PROMPTS)
        elapsed = time.monotonic() - start
    assert client.attempts_made == 2 and SlowOnce.calls == 2
    torch.testing.assert_close(scores, digits(images, PROMPTS), atol=1e-6, rtol=0)
    assert elapsed < 1.4


def test_server_error_is_retried(digits):
    class FailTwice(RewardHandler):
        calls = 0

        def do_POST(self):
            type(self).calls += 1
            if type(self).calls <= 2:
                self.rfile.read(int(self.headers["Content-Length"]))
                self._send_json(503, {"error": "warming up"})
                return
            super().do_POST()

    with serving(digits, FailTwice) as server:
        client = _client(server.url, retries=3)
        scores = client(_images(), PROMPTS)
    assert client.attempts_made == 3 and scores.shape == (4,)


@pytest.mark.parametrize("body,what", [
    (b"<html>oops</html>", "not JSON"),
    (b'{"scores": [0.1, 0.2]}', "2 scores for 4 images"),
    (b'{"scores": [0.1, NaN, 0.3, 0.4]}', "not finite"),
    (b'{"result": 1}', "no 'scores'"),
])
def test_garbage_answer_is_a_clear_error(digits, body, what):
    class Garbage(RewardHandler):
        calls = 0

        def do_POST(self):
            type(self).calls += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(digits, Garbage) as server:
        client = _client(server.url)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=f"answered garbage: .*{what}"):
            client(_images(), PROMPTS)
    assert Garbage.calls == 1 and time.monotonic() - start < 2


def test_refused_request_is_not_retried(digits):
    with serving(digits) as server:
        client = _client(server.url)
        with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 400\).*1-channel"):
            client(torch.rand(2, 3, 16, 16), PROMPTS[:2])
        assert client.attempts_made == 1
        with pytest.raises(RemoteRewardError, match="names no digit"):
            client(_images(1), ["a cat"])


def test_dropped_connections_then_clear_error(digits):
    class Drop(RewardHandler):
        calls = 0

        def do_POST(self):  # dies while handling: closes the socket without an answer
            type(self).calls += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    with serving(digits, Drop) as server:
        client = _client(server.url, retries=2, backoff=0.05)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=r"gave no scores after 3 attempts"):
            client(_images(), PROMPTS)
    assert Drop.calls == 3 and time.monotonic() - start < 3


def test_server_down_is_a_clear_bounded_error():
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}", retries=3, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=r"127\.0\.0\.1:\d+ gave no scores after 4 attempts.*Is it running\?"):
        client(_images(), PROMPTS)
    elapsed = time.monotonic() - start
    assert elapsed < 0.05 + 0.1 + 0.2 + 2.0  # the back-offs plus slack


def _start_server_process():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "branchgrpo.rewards.server", "--reward", "digits", "--port", "0",
         "--device", "cpu", "--dtype", "float32", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("serving digits on "):
                return proc, line.split(" on ", 1)[1].strip()
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"reward server did not start: {proc.stdout.read() if proc.stdout else ''}")


def test_server_process_killed_mid_run(digits):
    proc, url = _start_server_process()
    try:
        client = _client(url, timeout=2.0, retries=2, backoff=0.05, wire_dtype="float32")
        images = _images()
        torch.testing.assert_close(client(images, PROMPTS), digits(images, PROMPTS), atol=1e-6, rtol=0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match="gave no scores after 3 attempts"):
            client(images, PROMPTS)
        assert time.monotonic() - start < 3 * 2.0 + 1.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
