"""The remote reward against the reference server on 127.0.0.1 (ephemeral ports): exact scores,
a slow server (timeout then retry), 5xx retries, garbage answers, refusals, a server that drops
connections, one that is down, and a server process killed mid-run. Every failure case ends in a
RemoteRewardError within a bounded time; no case returns made-up scores.

Then the limits: the client's deadline for a whole answer (a server dripping bytes, an upload the
server never reads) checked against its stated worst case; the server's request-size, time and
connection limits, its token, and 500 answers that carry no internals."""

from __future__ import annotations

import logging
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
from branchgrpo.rewards.base import Reward, RewardError
from branchgrpo.rewards.remote import TOKEN_ENV, RemoteReward, RemoteRewardError, decode_images, encode_images
from branchgrpo.rewards.server import SCORING_FAILED, RewardHandler, make_server
from branchgrpo.rewards.server import main as server_main

PROMPTS = ["a handwritten 7", "the digit 3", "the number seven", "a handwritten 0"]


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return build_reward("digits")


def _images(n=4, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@contextmanager
def serving(reward, handler=None, **options):
    server = make_server(reward, "127.0.0.1", 0, handler=handler, **options)
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
    (b'{"scores": [0.1, NaN, 0.3, 0.4]}', "not a finite number"),
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


# ---------------------------------------------------------------------------------------------
# the client's deadline for the whole answer, against bare TCP servers that misbehave on purpose


@contextmanager
def raw_server(respond, rcvbuf: int | None = None):
    """A bare TCP server on 127.0.0.1 (ephemeral port) running ``respond(conn, stop)`` per connection."""
    listener = socket.socket()
    if rcvbuf is not None:  # a small receive buffer, inherited by accepted sockets: uploads stall sooner
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.02)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def run(conn):
        try:
            respond(conn, stop)
        except OSError:  # the client hung up: what a deadline does
            pass
        finally:
            conn.close()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10.0)
            accepted.append(conn)
            threading.Thread(target=run, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def _canned(answer: bytes):
    def respond(conn, stop):
        _read_request(conn)
        conn.sendall(answer)
    return respond


def test_worst_case_is_the_closed_form():
    client = _client("http://127.0.0.1:9", timeout=0.5, retries=4, backoff=0.1, backoff_max=0.3)
    # attempts x deadline + back-offs 0.1, 0.2, 0.3 (capped), 0.3 (capped)
    assert client.worst_case_seconds == pytest.approx(5 * 0.5 + 0.1 + 0.2 + 0.3 + 0.3, abs=1e-12)
    assert client.worst_case_seconds <= (4 + 1) * (0.5 + 0.3)
    assert _client("http://127.0.0.1:9", timeout=2.0, retries=0).worst_case_seconds == 2.0


def test_dripping_answer_ends_within_the_stated_worst_case():
    """A server that keeps sending one byte at a time would hang a per-read timeout forever."""
    def drip(conn, stop):
        _read_request(conn)
        answer = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n" + b" " * 10**6
        for i in range(len(answer)):
            if stop.is_set():
                return
            conn.sendall(answer[i : i + 1])  # raises once the client has hung up
            time.sleep(0.02)  # far shorter than the client's deadline: no single read ever times out

    with raw_server(drip) as (url, accepted):
        client = _client(url, timeout=0.5, retries=2, backoff=0.05, backoff_max=0.1)
        bound = client.worst_case_seconds + 1.0  # + encoding the images and scheduling slack
        start = time.monotonic()
        with pytest.raises(RemoteRewardError) as caught:
            client(_images(), PROMPTS)
        elapsed = time.monotonic() - start
    message = str(caught.value)
    assert url in message and "\n" not in message
    assert "gave no scores after 3 attempts" in message and "timed out" in message
    assert client.attempts_made == 3 and len(accepted) == 3
    assert 3 * 0.5 <= elapsed <= bound  # every attempt ran to its deadline, and not one moment longer


def test_stalled_upload_ends_within_the_stated_worst_case():
    """A server that accepts but never reads the request: sending blocks, and the deadline ends it."""
    def never_read(conn, stop):
        stop.wait(10)

    images = torch.rand(4, 1, 1024, 1024, generator=torch.Generator().manual_seed(0))  # 16 MiB as float32
    with raw_server(never_read, rcvbuf=4096) as (url, accepted):
        client = _client(url, timeout=0.4, retries=1, backoff=0.05, wire_dtype="float32")
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=r"gave no scores after 2 attempts.*timed out"):
            client(images, PROMPTS)
        elapsed = time.monotonic() - start
    assert len(accepted) == 2
    assert elapsed <= client.worst_case_seconds + 2.0  # + encoding 16 MiB


FINITE = b'{"scores": [0.1, 0.2, 0.3, 0.4]}'


def _http(body: bytes, status: str = "200 OK", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode() + body


@pytest.mark.parametrize("answer,what,attempts", [
    (_http(b'{"scores": [0.1, 1e300, 0.3, 0.4]}'), r"answered garbage: score 1 is 1e\+300, outside the float32", 1),
    (_http(b'{"scores": [0.1, -4e38, 0.3, 0.4]}'), r"score 1 is -4e\+38, outside the float32 range", 1),
    (_http(b'{"scores": [0.1, ' + b"9" * 400 + b', 0.3, 0.4]}'), r"score 1 is an integer of 400 digits, not a", 1),
    (_http(b'{"scores": [0.1, Infinity, 0.3, 0.4]}'), r"score 1 is inf, not a finite number", 1),
    (_http(b'{"scores": [0.1, true, 0.3, 0.4]}'), r"score 1 is True, not a finite number", 1),
    (_http(b'{"scores": [0.1, 0.2, 0.3]}'), r"answer has 3 scores for 4 images", 1),
    (_http(b"[" * 3000), r"answered garbage: answer is not JSON", 1),
    (_http(b"x", length=10**9), r"answered garbage: an answer of 1000000000 bytes exceeds max_answer_bytes=4096", 1),
    (b"HTTP/1.0 200 OK\r\n\r\n" + b"0" * 10000, r"the answer exceeds max_answer_bytes=4096", 1),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", r"answered garbage: not an HTTP answer", 1),
    (_http(b'{"error": "no\\nsuch thing"}', "404 Not Found"), r"refused the request \(HTTP 404\): no such thing", 1),
    (_http(b"", "302 Found"), r"answered HTTP 302, expected 200", 1),
    (_http(b"<html>bad gateway</html>", "502 Bad Gateway"), r"after 2 attempts.*HTTP 502: b'<html>bad gateway", 2),
    (_http(FINITE, length=len(FINITE) + 10), r"after 2 attempts.*closed in the middle of the answer", 2),
    (b"", r"after 2 attempts.*connection closed without an answer", 2),
])
def test_every_failure_is_one_line_naming_the_url(answer, what, attempts):
    with raw_server(_canned(answer)) as (url, accepted):
        client = _client(url, retries=1, backoff=0.01, max_answer_bytes=4096)
        with pytest.raises(RemoteRewardError, match=what) as caught:
            client(_images(), PROMPTS)
    message = str(caught.value)
    assert message.startswith(f"reward server {url} ") and "\n" not in message
    assert client.attempts_made == attempts == len(accepted)


def test_reset_connection_is_retried_then_one_line():
    def reset(conn, stop):
        _read_request(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
    with raw_server(reset) as (url, accepted):
        client = _client(url, retries=2, backoff=0.01)
        with pytest.raises(RemoteRewardError, match=r"after 3 attempts.*(reset by the server|closed without an ans)"):
            client(_images(), PROMPTS)
    assert len(accepted) == 3


def test_client_options_are_validated():
    for bad in ({"timeout": float("nan")}, {"timeout": 0}, {"backoff": -0.5}, {"backoff": float("inf")},
                {"retries": -1}, {"retries": 1.5}, {"token": "two words"}, {"token": ""}, {"max_answer_bytes": 0}):
        with pytest.raises(RewardError, match=f"reward 'remote': {next(iter(bad))}"):
            RemoteReward(url="http://127.0.0.1:1", **bad)
    for url in ("http://127.0.0.1:notaport", "http://127.0.0.1:1/réward", "http://127.0.0.1:1/a b", "http://:1"):
        with pytest.raises(RewardError, match="url must look like"):
            RemoteReward(url=url)
    assert "s3cret" not in repr(RemoteReward(url="http://127.0.0.1:1", token="s3cret"))


# ---------------------------------------------------------------------------------------------
# the server's limits, token and error answers


def _raw_request(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` to the server and read until it closes (fails instead of hanging)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_server_checks_request_size_before_reading(digits):
    with serving(digits, max_body_bytes=1000) as server:
        # a 10 GB claim with no body behind it: answered at once, so nothing was read or decoded
        answer = _raw_request(server.url, b"POST /score HTTP/1.1\r\nContent-Length: 10000000000\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 413") and b"exceeds the server limit of 1000 bytes" in answer
        answer = _raw_request(server.url, b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 411") and b"Content-Length is required" in answer
        answer = _raw_request(server.url, b"POST /score HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 400")
        with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 413\): body of \d+ bytes exceeds"):
            _client(server.url)(_images(), PROMPTS)  # 4 KiB of float32 images
        assert server.requests_scored == 0


def test_server_cuts_stalled_and_dripping_uploads(digits):
    with serving(digits, client_timeout=0.5, max_connections=2) as server:
        host, port = server.url.removeprefix("http://").split(":")
        stalled = socket.create_connection((host, int(port)), timeout=5)
        stalled.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 100\r\n\r\n")  # then nothing
        dripping = socket.create_connection((host, int(port)), timeout=5)
        dripping.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
        time.sleep(0.1)
        # both slots are taken: a third connection is turned away at once, not queued
        assert _raw_request(server.url, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 503")
        assert server.connections_refused == 1
        start = time.monotonic()
        try:
            while time.monotonic() - start < 3.0:  # a byte every 0.1 s never trips a per-read timeout
                dripping.sendall(b"x")
                time.sleep(0.1)
        except OSError:
            pass  # the server cut it: the request deadline, not a per-read timeout
        assert stalled.recv(100) == b""  # closed by the server, no answer to an incomplete request
        stalled.close()
        dripping.close()
        assert time.monotonic() - start < 3.0
        time.sleep(0.1)
        # the handler threads are free again: a real request is scored
        scores = _client(server.url)(_images(), PROMPTS)
        torch.testing.assert_close(scores, digits(_images(), PROMPTS), atol=1e-6, rtol=0)


def test_server_token(digits, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with serving(digits, token="s3cret-token") as server:
        for token in (None, "wrong"):
            client = _client(server.url, token=token)
            with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 401\): missing or wrong token"):
                client(_images(), PROMPTS)
            assert client.attempts_made == 1
            with pytest.raises(RemoteRewardError, match=r"/health answered HTTP 401"):
                client.health()
        # a 16 MiB upload refused before its body is read still gets its 401, not a reset
        big = torch.rand(4, 1, 1024, 1024)
        with pytest.raises(RemoteRewardError, match=r"HTTP 401"):
            _client(server.url, token="wrong", max_answer_bytes=4096)(big, PROMPTS)
        assert _client(server.url, token="s3cret-token").health()["reward"] == "digits"
        monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
        scores = _client(server.url)(_images(), PROMPTS)
        torch.testing.assert_close(scores, digits(_images(), PROMPTS), atol=1e-6, rtol=0)
        assert server.requests_scored == 1


class _Broken(Reward):
    """A reward failing inside its own code (outside this package): internals must stay in the log."""

    name = "broken"
    input_channels = None

    def __init__(self, error: Exception | None = None, scores: list[float] | None = None):
        super().__init__("cpu", "float32")
        self.error, self.scores = error, scores

    def _score(self, images, prompts):
        if self.error is not None:
            raise self.error
        return torch.tensor(self.scores, dtype=torch.float64)


@pytest.mark.parametrize("reward,logged", [
    (_Broken(RuntimeError("CUDA out of memory at /srv/secret/model.py:42")), "/srv/secret/model.py"),
    (_Broken(ValueError("shape mismatch in /srv/secret/layer")), "/srv/secret/layer"),
    (_Broken(scores=[1e300, 0.0, 0.0, 0.0]), "not finite float32 numbers"),
    (_Broken(scores=[float("nan"), 0.0, 0.0, 0.0]), "not finite float32 numbers"),
])
def test_server_500_says_nothing_of_internals(reward, logged, caplog):
    with caplog.at_level(logging.ERROR, logger="branchgrpo.rewards.server"), serving(reward) as server:
        with pytest.raises(RemoteRewardError) as caught:
            _client(server.url, retries=1, backoff=0.01)(_images(), PROMPTS)
    message = str(caught.value)
    assert "after 2 attempts" in message and f"HTTP 500: {SCORING_FAILED}" in message
    assert "secret" not in message
    assert logged in caplog.text  # the server log has what the answer leaves out


def test_server_help_documents_flags(capsys):
    with pytest.raises(SystemExit) as done:
        server_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--host", "127.0.0.1", "--port", "--token", TOKEN_ENV, "--max-body-mb", "--timeout",
                 "--max-connections", "503", "--reward", "--option"):
        assert flag in text, flag
    with pytest.raises(SystemExit):
        server_main(["--reward", "digits", "--port", "0", "--timeout", "nan"])
    assert "--timeout must be a number > 0" in capsys.readouterr().err
