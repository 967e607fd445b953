"""The VLM judge against fake OpenAI-compatible servers on 127.0.0.1 (ephemeral ports).

A fake that answers like vLLM's /v1/chat/completions checks each request's structure and derives
its answer from the decoded image, so rewards are known exactly; a pairwise fake prefers the
brighter image and the win rates are checked against a brute-force count. Failure cases (a server
that drips bytes, malformed JSON, no choices, unparseable answers, 5xx then success, a server that
is down) each end in one RewardError, within the stated deadline where time matters.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import random
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from branchgrpo.rewards import RewardError, build_reward
from branchgrpo.rewards.vlm import PAIRWISE_TEMPLATE, POINTWISE_TEMPLATE, VLMJudgeReward, pair_schedule

MODEL = "fake/judge-vl"


class FakeJudge:
    """State of a fake server: every request body seen, and how to answer the k-th request."""

    def __init__(self, answer):
        self.answer = answer  # (judge, body: dict | None, raw: bytes, handler) -> None (writes the answer)
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.count = 0
        self.lock = threading.Lock()


def _handler(judge: FakeJudge):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            with judge.lock:
                judge.count += 1
                self.ordinal = judge.count  # 1 for the first request this server saw
                judge.headers.append(dict(self.headers))
                try:
                    body = json.loads(raw)
                    judge.bodies.append(body)
                except ValueError:
                    body = None
            try:
                judge.answer(judge, body, self)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@contextmanager
def serving(answer):
    judge = FakeJudge(answer)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(judge))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", judge
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _send(handler, status: int, payload: bytes | dict, headers=()):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in headers:
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def _completion(text: str) -> dict:
    return {"id": "cmpl-1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def _decode(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.array(Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))))


def _image_urls(body: dict) -> list[str]:
    return [part["image_url"]["url"] for part in body["messages"][-1]["content"] if part["type"] == "image_url"]


def _score_of(pixels: np.ndarray) -> float:
    """The pointwise fake's score: 1 + 9 · mean brightness of the 8-bit image."""
    return 1.0 + 9.0 * float(pixels.astype(np.float64).mean()) / 255.0


def pointwise_answer(judge, body, handler):
    pixels = _decode(_image_urls(body)[0])
    _send(handler, 200, _completion(f"Score: {_score_of(pixels)!r}"))


def brighter_answer(judge, body, handler):
    first, second = (_decode(u).astype(np.float64).mean() for u in _image_urls(body))
    _send(handler, 200, _completion("Image 1 is better." if first > second else "I prefer Image 2."))


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    """The 8-bit pixels the client must send: round(255 x), [B, H, W, C]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _judge(url, **kw):
    kw = {"model": MODEL, "timeout": 5.0, "deadline": 20.0, "retries": 2, "backoff": 0.01, "concurrency": 4, **kw}
    return VLMJudgeReward(base_url=url, **kw)


def test_pointwise_requests_and_exact_scores():
    images = torch.rand(5, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt number {i}" for i in range(5)]
    with serving(pointwise_answer) as (url, judge):
        reward = _judge(url, temperature=0.3, max_tokens=7, api_key="sk-test")
        scores = reward(images, prompts)
    pixels = _as_uint8(images)
    expected = torch.tensor([_score_of(p) for p in pixels], dtype=torch.float32)
    assert torch.equal(scores, expected)
    assert reward.last_requests == reward.last_attempts == judge.count == 5
    seen = set()
    for body, headers in zip(judge.bodies, judge.headers):
        assert body["model"] == MODEL and body["temperature"] == 0.3 and body["max_tokens"] == 7
        assert headers["Authorization"] == "Bearer sk-test"
        (message,) = body["messages"]
        assert message["role"] == "user"
        (image_part, text_part) = message["content"]
        assert image_part["type"] == "image_url" and text_part["type"] == "text"
        sent = _decode(image_part["image_url"]["url"])
        # which prompt was this? the text must be the template with that prompt filled in
        index = next(i for i, p in enumerate(prompts) if text_part["text"] == POINTWISE_TEMPLATE.replace("{prompt}", p))
        np.testing.assert_array_equal(sent, pixels[index])
        seen.add(index)
    assert seen == set(range(5))


def test_pointwise_score_range_template_pattern_and_grey_images(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def answer(judge, body, handler):  # reasoning first, then the verdict; the think part holds numbers
        pixels = _decode(_image_urls(body)[0])
        _send(handler, 200, _completion(f"<think>Step 1: look. 3 things.</think>Verdict: {_score_of(pixels)!r}/10"))

    with serving(answer) as (url, judge):
        reward = build_reward("vlm", base_url=url, model=MODEL, score_range=[1, 10], template="Q: {prompt}!",
                              score_pattern=r"Verdict:\s*([\d.]+)", retries=0)
        scores = reward.score(images, ["a", "b", "c"]).components["vlm"]
    pixels = _as_uint8(images)
    assert pixels.shape[-1] == 1
    expected = torch.tensor([(_score_of(p) - 1.0) / 9.0 for p in pixels], dtype=torch.float32)
    assert torch.equal(scores, expected)
    assert sorted(b["messages"][0]["content"][1]["text"] for b in judge.bodies) == ["Q: a!", "Q: b!", "Q: c!"]
    assert all(h["Authorization"] == "Bearer sk-env" for h in judge.headers)
    for body in judge.bodies:  # grey images decode back to the same 2-D pixels
        index = "abc".index(body["messages"][0]["content"][1]["text"][3])
        np.testing.assert_array_equal(_decode(_image_urls(body)[0]), pixels[index, ..., 0])


def _brightness_images(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


def _brute_force_win_rates(values: list[float], group_of: list) -> list[float]:
    rates = []
    for i, v in enumerate(values):
        others = [values[j] for j in range(len(values)) if j != i and group_of[j] == group_of[i]]
        rates.append(sum(v > o for o in others) / len(others) if others else 0.5)
    return rates


def test_pairwise_win_rates_match_brute_force():
    rng = random.Random(3)
    values = [round(v, 3) for v in rng.sample([k / 40 for k in range(1, 40)], 10)]  # distinct brightnesses
    group_ids = [0, 1, 0, 2, 1, 0, 1, 0, 3, 1]  # interleaved groups of 4, 4, 1, 1
    prompts = [f"prompt {g}" for g in group_ids]
    images = _brightness_images(values)
    with serving(brighter_answer) as (url, judge):
        reward = _judge(url, mode="pairwise")
        scores = reward(images, prompts, torch.tensor(group_ids))
        assert reward.last_requests == judge.count == 4 * 3 // 2 + 4 * 3 // 2
        by_prompt = reward(images, prompts)  # no group ids: identical prompts form the groups
    expected = torch.tensor(_brute_force_win_rates(values, group_ids), dtype=torch.float32)
    assert torch.equal(scores, expected) and torch.equal(by_prompt, expected)
    body = judge.bodies[0]
    assert len(_image_urls(body)) == 2
    assert body["messages"][0]["content"][-1]["text"] in {PAIRWISE_TEMPLATE.replace("{prompt}", p) for p in prompts}


def test_pairwise_groups_are_group_ids_within_one_prompt():
    values = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    prompts = ["same prompt"] * 6
    group_ids = [0, 0, 0, 1, 1, 1]
    with serving(brighter_answer) as (url, judge):
        scores = _judge(url, mode="pairwise").score(_brightness_images(values), prompts, torch.tensor(group_ids)).total
    assert torch.equal(scores, torch.tensor(_brute_force_win_rates(values, group_ids)))
    assert judge.count == 3 + 3
    # one group id over several prompts (held-out evaluation): a pair is only judged against one prompt
    prompts = ["p", "q", "p", "q", "p", "q"]
    with serving(brighter_answer) as (url, judge):
        scores = _judge(url, mode="pairwise")(_brightness_images(values), prompts, torch.zeros(6, dtype=torch.long))
    assert torch.equal(scores, torch.tensor(_brute_force_win_rates(values, prompts)))
    assert judge.count == 3 + 3
    for body in judge.bodies:  # both images of a pair have the prompt the question names
        i, j = (int(np.argmin([abs(_decode(u).mean() / 255 - v) for v in values])) for u in _image_urls(body))
        assert prompts[i] == prompts[j]
        assert body["messages"][0]["content"][-1]["text"] == PAIRWISE_TEMPLATE.replace("{prompt}", prompts[i])


@pytest.mark.parametrize("both_orders", [False, True])
def test_pairwise_capped_pairs_win_rates_over_the_pairs_asked(both_orders):
    values = [k / 12 for k in (5, 1, 9, 3, 11, 7, 2, 8, 10)]  # one group of 9
    with serving(brighter_answer) as (url, judge):
        reward = _judge(url, mode="pairwise", max_pairs_per_image=4, both_orders=both_orders, seed=7)
        scores = reward(_brightness_images(values), ["p"] * 9)
    # the pairs the server was asked, identified by brightness
    asked = [tuple(int(round(_decode(u).mean() / 255 * 12)) for u in _image_urls(b)) for b in judge.bodies]
    index = {int(round(v * 12)): i for i, v in enumerate(values)}
    asked = [(index[a], index[b]) for a, b in asked]
    unordered = {tuple(sorted(p)) for p in asked}
    assert len(asked) == (2 if both_orders else 1) * len(unordered) == (2 if both_orders else 1) * 9 * 4 // 2
    if both_orders:
        assert sorted(asked) == sorted([p for p in unordered] + [(b, a) for a, b in unordered])
    opponents = [sum(i in p for p in unordered) for i in range(9)]
    assert opponents == [4] * 9
    wins = [sum(values[i] > values[j if a == i else a] for a, j in unordered if i in (a, j)) for i in range(9)]
    assert torch.allclose(scores, torch.tensor([w / 4 for w in wins]), atol=0, rtol=0)


def test_pair_schedule_degrees_brute_force():
    for size in range(1, 12):
        for cap in [None, 1, 2, 3, 4, 5, 20]:
            pairs = pair_schedule(size, cap, random.Random(size * 31 + (cap or 0)))
            assert all(0 <= a < b < size for a, b in pairs) and len(set(pairs)) == len(pairs)
            degree = [sum(i in p for p in pairs) for i in range(size)]
            k = size - 1 if cap is None else min(cap, size - 1)
            if k == size - 1:
                assert sorted(pairs) == list(itertools.combinations(range(size), 2))
            else:
                assert set(degree) == ({k + 1} if k % 2 and size % 2 else {k}), (size, cap, degree)


@pytest.mark.parametrize("where", ["headers", "body"])
def test_dripping_server_ends_within_the_deadline(where):
    stop = threading.Event()

    def drip(judge, body, handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        if where == "body":
            handler.wfile.write(b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        else:
            handler.wfile.write(b"X-Drip: ")  # one header line that never ends
        while not stop.wait(0.02):  # a byte every 20 ms, never done
            handler.wfile.write(b" ")
            handler.wfile.flush()

    images = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with serving(drip) as (url, judge):
        reward = _judge(url, timeout=30.0, deadline=0.6, retries=3)
        start = time.monotonic()
        with pytest.raises(RewardError, match="total deadline of 0.6 s") as err:
            reward(images, ["a", "b", "c"])
        elapsed = time.monotonic() - start
        # the request threads were not left hanging on their sockets (the server still drips)
        hanging = [t for t in threading.enumerate() if t.name.startswith("vlm-judge")]
        for thread in hanging:
            thread.join(timeout=2.0)
        stop.set()
    assert elapsed < 0.6 + 1.0, elapsed  # the deadline, plus the polling and thread start-up slack
    assert "\n" not in str(err.value) and url in str(err.value)
    assert not any(t.is_alive() for t in hanging)


def test_one_bad_answer_ends_the_call_and_frees_the_other_requests():
    stop = threading.Event()

    def answer(judge, body, handler):
        if handler.ordinal == 1:  # garbage, once the other two requests are in flight
            while judge.count < 3 and not stop.wait(0.01):
                pass
            _send(handler, 200, b"{not json")
            return
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        while not stop.wait(0.02):
            handler.wfile.write(b" ")
            handler.wfile.flush()

    with serving(answer) as (url, judge):
        reward = _judge(url, timeout=30.0, deadline=30.0, concurrency=3)
        start = time.monotonic()
        with pytest.raises(RewardError, match="not JSON: '{not json'"):
            reward(torch.rand(3, 3, 4, 4), ["a", "b", "c"])
        elapsed = time.monotonic() - start
        hanging = [t for t in threading.enumerate() if t.name.startswith("vlm-judge")]
        for thread in hanging:
            thread.join(timeout=2.0)
        alive = [t.name for t in hanging if t.is_alive()]
        stop.set()
    assert judge.count == 3 and elapsed < 5.0 and not alive, (judge.count, elapsed, alive)


@pytest.mark.parametrize("server", ["silent", "dripping"])
def test_per_request_timeout_is_retried_then_reported(server):
    stop = threading.Event()

    def slow(judge, body, handler):
        if server == "silent":
            stop.wait(10)
            return
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        while not stop.wait(0.02):  # each byte arrives well within any socket timeout
            handler.wfile.write(b" ")
            handler.wfile.flush()

    with serving(slow) as (url, judge):
        reward = _judge(url, timeout=0.2, deadline=10.0, retries=1)
        with pytest.raises(RewardError, match=r"image 0 .*no answer after 2 attempt\(s\).*timed out"):
            reward(torch.rand(1, 3, 4, 4), ["a"])
        stop.set()
    assert reward.last_attempts == judge.count == 2


def test_server_error_then_success_is_retried():
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))

    def flaky(judge, body, handler):
        if handler.ordinal <= 2:  # the first two requests fail (one 500, one 429)
            _send(handler, 500 if handler.ordinal == 1 else 429, {"error": "overloaded"})
        else:
            pointwise_answer(judge, body, handler)

    with serving(flaky) as (url, judge):
        reward = _judge(url, concurrency=1, retries=2)
        scores = reward(images, ["a", "b"])
    assert torch.equal(scores, torch.tensor([_score_of(p) for p in _as_uint8(images)], dtype=torch.float32))
    assert reward.last_requests == 2 and reward.last_attempts == judge.count == 4


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"<html>Bad Gateway</html>", "image 0 .*the answer is not JSON: '<html>Bad Gateway</html>'"),
        ({"choices": []}, "the answer has no choices"),
        (_completion("I like this picture a lot " * 10), "no score matching score_pattern .* 'I like this picture"),
        (_completion("Score: 42"), r"score 42 is outside score_range \[1, 10\]"),
        ({"choices": [{"message": {"content": None}, "finish_reason": "length"}]}, "finish_reason='length'"),
        ({"choices": [{"message": {"content": "<think>The 3 cubes are"}, "finish_reason": "length"}]},
         "reasoning ends before </think> .finish_reason='length'; raise max_tokens"),
    ],
)
def test_misbehaving_answers_raise_one_clear_error(payload, message):
    with serving(lambda judge, body, handler: _send(handler, 200, payload)) as (url, judge):
        reward = _judge(url, score_range=(1, 10), concurrency=1)
        with pytest.raises(RewardError, match=message) as err:
            reward(torch.rand(1, 3, 4, 4), ["a red cube"])
    text = str(err.value)
    assert "\n" not in text and "'a red cube'" in text and judge.count == 1  # not retried
    if "I like" in text:
        assert repr(("I like this picture a lot " * 10)[:80] + "…") in text  # the first 80 characters


def test_pairwise_unparseable_choice_and_refusal():
    with serving(lambda judge, body, handler: _send(handler, 200, _completion("Both are lovely."))) as (url, _):
        with pytest.raises(RewardError, match=r"images 0 vs 1 .*no choice \(1/2 or A/B\).*'Both are lovely.'"):
            _judge(url, mode="pairwise")(torch.rand(2, 3, 4, 4), ["p", "p"])
    refuse = {"message": "The model does not exist."}
    with serving(lambda judge, body, handler: _send(handler, 404, refuse)) as (url, j):
        with pytest.raises(RewardError, match="refused the request .HTTP 404.*does not exist"):
            _judge(url)(torch.rand(1, 3, 4, 4), ["p"])
        assert j.count == 1


def test_server_down_connection_refused():
    with socket.socket() as probe:  # a port that was free a moment ago; nothing listens there now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reward = _judge(f"http://127.0.0.1:{port}/v1", retries=2)
    with pytest.raises(RewardError, match=r"no answer after 3 attempt\(s\).*ConnectionRefusedError.*vllm serve") as err:
        reward(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert f"127.0.0.1:{port}/v1/chat/completions" in str(err.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"base_url": None}, "base_url must be"),
        ({"model": ""}, "model must name"),
        ({"mode": "listwise"}, "mode must be 'pointwise' or 'pairwise'"),
        ({"score_range": [10, 1]}, "score_range must be"),
        ({"score_pattern": r"\d+"}, "exactly one group"),
        ({"concurrency": 0}, "concurrency must be"),
        ({"deadline": "soon"}, "deadline must be a number"),
    ],
)
def test_bad_options_name_the_field(options, message):
    kw = {"base_url": "http://127.0.0.1:1/v1", "model": MODEL, **options}
    with pytest.raises(RewardError, match=message):
        build_reward("vlm", **kw)


def test_registry_and_contract():
    reward = build_reward("vlm", base_url="http://127.0.0.1:1/v1/", model=MODEL, concurrency="3", score_range="0,5")
    assert reward.url == "http://127.0.0.1:1/v1/chat/completions" and reward.concurrency == 3
    assert reward.score_range == (0.0, 5.0)
    assert (reward.name, reward.modality, reward.needs_checkpoint) == ("vlm", "image", False)
    assert not reward.needs_groups
    assert _judge("http://127.0.0.1:1/v1", mode="pairwise").needs_groups
    with pytest.raises(RewardError, match="no option 'temprature'"):
        build_reward("vlm", base_url="http://127.0.0.1:1/v1", model=MODEL, temprature=0.1)
    assert reward(torch.zeros(0, 3, 4, 4), []).shape == (0,)  # nothing to ask, no request
