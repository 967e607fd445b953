"""A vision-language model as judge, behind any OpenAI-compatible chat-completions server.

Serve a judge with vLLM (``vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000``), SGLang or use a
hosted API, and point :class:`VLMJudgeReward` at its ``/v1``. Images travel as
``data:image/png;base64,...`` URLs (8-bit, ``round(255 x)``) in OpenAI vision messages.

Two modes (see docs/rewards.md, "VLM judges"):

* ``pointwise``: one request per image; the answer's score (``score_pattern``, a regex with one
  group) is the reward, mapped to [0, 1] when ``score_range=(lo, hi)`` is set.
* ``pairwise`` (Pref-GRPO's): within each group (images with the same prompt and, when given,
  the same ``group_ids`` entry), pairs of images are compared and each image's reward is its win
  rate against the others it met:
  ``n (n - 1) / 2`` requests per group of ``n``, or about ``n k / 2`` with
  ``max_pairs_per_image=k`` (each image meets ``k`` others of a seeded random circulant design,
  ``k + 1`` when ``k`` and ``n`` are both odd).

Every request has ``timeout`` seconds (connect, headers and body together) and the whole call has
``deadline`` seconds; both are enforced by shutting the socket down, so a server that drips bytes
cannot hang a run. Connection errors, timeouts, 429 and 5xx are retried with exponential back-off
(``backoff · 2^k``, capped at ``backoff_max``, never past the deadline). Anything else that is
wrong (other 4xx, malformed JSON, no choices, an answer that does not parse) raises one
:class:`~branchgrpo.rewards.base.RewardError` line naming the image and prompt and showing the
first 80 characters of the answer. No score is ever filled in.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from branchgrpo.rewards.base import Reward, RewardError, RewardOutput
from branchgrpo.rewards.vlm_http import _POLL_S, _Call, _Cancelled, _describe, post_once
from branchgrpo.rewards.vlm_options import _flag, _number, _regex, _score_range
from branchgrpo.rewards.vlm_prompts import (  # noqa: F401  (public names re-exported)
    CHOICE_PATTERN,
    PAIRWISE_TEMPLATE,
    POINTWISE_TEMPLATE,
    SCORE_PATTERN,
    _FIRST_WINS,
    _THINK,
    _clip,
    _groups,
    _where,
    pair_schedule,
    png_data_url,
)


class VLMJudgeReward(Reward):
    """Scores from a VLM judge on an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1`` (a URL that already ends
            in ``/chat/completions`` is used as is).
        model: the served model name (vLLM: the name given to ``vllm serve``).
        mode: ``"pointwise"`` (a score per image) or ``"pairwise"`` (win rate within each group).
        template: the question; ``{prompt}`` is replaced by the image's prompt. Defaults ask for a
            1-10 score (pointwise) or "1 or 2" (pairwise).
        score_pattern: regex with one group holding the score (pointwise); default the first number.
        score_range: ``(lo, hi)``: reward ``(score - lo) / (hi - lo)``; a score outside is an error.
        choice_pattern: regex with one group matching ``1``/``A`` (first image wins) or ``2``/``B``.
        max_pairs_per_image: pairwise: compare each image with about this many others (seeded).
        both_orders: pairwise: ask every pair in both orders (twice the requests; cancels position bias).
        seed: seed of the pair designs (advanced on every call).
        system_prompt: optional system message.
        api_key: bearer token; default the ``OPENAI_API_KEY`` environment variable, if set.
        temperature, max_tokens: sampling of the answer.
        extra_body: more request fields, e.g. ``{"chat_template_kwargs": {"enable_thinking": false}}``.
        concurrency: requests in flight at once.
        timeout: seconds for one request attempt (connect, headers and body).
        deadline: seconds for the whole call, retries and back-offs included.
        retries: further attempts on connection errors, timeouts, 429 and 5xx.
        backoff, backoff_max: seconds before the first retry (doubling) and its cap.

    ``last_requests`` / ``last_attempts``: judge questions and HTTP attempts of the last call.
    """

    name = "vlm"
    modality = "image"
    needs_checkpoint = False
    input_channels = None  # 1 (grey) or 3 (RGB), checked in check_inputs

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        device: Any = "cpu",
        dtype: Any = "float32",
        mode: str = "pointwise",
        template: str | None = None,
        score_pattern: str = SCORE_PATTERN,
        score_range: Sequence[float] | str | None = None,
        choice_pattern: str = CHOICE_PATTERN,
        max_pairs_per_image: int | None = None,
        both_orders: bool = False,
        seed: int = 0,
        system_prompt: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 64,
        extra_body: Mapping[str, Any] | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        deadline: float = 600.0,
        retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
    ):
        super().__init__(device, dtype)
        if checkpoint is not None:
            raise RewardError("reward 'vlm' takes no checkpoint: set base_url (the judge server's /v1) and model")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise RewardError(f"reward 'vlm': base_url must be the judge server's API root such as "
                              f"'http://127.0.0.1:8000/v1', got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise RewardError("reward 'vlm': model must name the served model (e.g. 'Qwen/Qwen2.5-VL-7B-Instruct')")
        if mode not in ("pointwise", "pairwise"):
            raise RewardError(f"reward 'vlm': mode must be 'pointwise' or 'pairwise', got {mode!r}")
        self.mode = mode
        self.needs_groups = mode == "pairwise"  # win rates need every image of a group in one call
        self.model = model
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        parts = urllib.parse.urlsplit(self.url)
        if not parts.hostname:
            raise RewardError(f"reward 'vlm': base_url {base_url!r} has no host")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        default = POINTWISE_TEMPLATE if mode == "pointwise" else PAIRWISE_TEMPLATE
        self.template = default if template is None else template
        if not isinstance(self.template, str) or not self.template.strip():
            raise RewardError("reward 'vlm': template must be a non-empty string (with {prompt} where the prompt goes)")
        self.score_pattern = _regex("score_pattern", score_pattern)
        self.choice_pattern = _regex("choice_pattern", choice_pattern)
        self.score_range = _score_range(score_range)
        self.max_pairs_per_image = None if max_pairs_per_image is None else _number(
            "max_pairs_per_image", max_pairs_per_image, int, 1)
        self.both_orders = _flag("both_orders", both_orders)
        self.system_prompt = system_prompt
        self.temperature = _number("temperature", temperature, float, 0.0)
        self.max_tokens = _number("max_tokens", max_tokens, int, 1)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise RewardError(f"reward 'vlm': extra_body must be a mapping of request fields, got {extra_body!r}")
        self.extra_body = dict(extra_body or {})
        self.concurrency = _number("concurrency", concurrency, int, 1)
        self.timeout = _number("timeout", timeout, float, 1e-3)
        self.deadline = _number("deadline", deadline, float, 1e-3)
        self.retries = _number("retries", retries, int, 0)
        self.backoff = _number("backoff", backoff, float, 0.0)
        self.backoff_max = _number("backoff_max", backoff_max, float, 0.0)
        self._rng = random.Random(_number("seed", seed, int, None))
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "Connection": "close"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.last_requests = 0
        self.last_attempts = 0

    def __repr__(self) -> str:
        return f"VLMJudgeReward(model={self.model!r}, url={self.url!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ the reward contract

    def check_inputs(self, images: Tensor, prompts: Sequence[str]) -> list[str]:
        prompts = super().check_inputs(images, prompts)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"reward 'vlm' sends grey or RGB images [B, 1 or 3, H, W], got {tuple(images.shape)}")
        return prompts

    def __call__(self, images: Tensor, prompts: Sequence[str],
                 group_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """Rewards ``[B]`` float32 on the images' device; ``group_ids [B]`` used in pairwise mode."""
        prompts = self.check_inputs(images, prompts)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        groups = _groups(prompts, group_ids)
        with torch.no_grad():
            scores = self._judge(self._prepare(images), prompts, groups)
        return scores.to(images.device)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self._judge(images, prompts, _groups(prompts, None))

    def score(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor | None = None) -> RewardOutput:
        """:class:`RewardOutput` ``{vlm: [B]}``; pairwise mode compares within ``group_ids``."""
        total = self(images, prompts, group_ids)
        return RewardOutput(total=total, components={self.name: total})

    # ------------------------------------------------------------------ scoring

    def _judge(self, images: Tensor, prompts: list[str], groups: list[list[int]]) -> Tensor:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, images.shape[0])) as pool:
            urls = list(pool.map(png_data_url, images.cpu()))
        if self.mode == "pointwise":
            jobs = [((i,), prompts[i]) for i in range(len(prompts))]
            answers = self._run(jobs, urls, self._parse_score)
            return torch.tensor(answers, dtype=torch.float32)
        jobs = []
        for members in groups:
            prompt = prompts[members[0]]
            for a, b in pair_schedule(len(members), self.max_pairs_per_image, self._rng):
                jobs.append(((members[a], members[b]), prompt))
                if self.both_orders:
                    jobs.append(((members[b], members[a]), prompt))
        first_wins = self._run(jobs, urls, self._parse_choice)
        wins = [0.0] * len(prompts)
        games = [0] * len(prompts)
        for ((i, j), _), first in zip(jobs, first_wins):
            wins[i if first else j] += 1.0
            games[i] += 1
            games[j] += 1
        # an image that met no other (a group of one) gets the neutral 0.5
        return torch.tensor([w / g if g else 0.5 for w, g in zip(wins, games)], dtype=torch.float32)

    def _request_body(self, job: tuple[tuple[int, ...], str], urls: list[str]) -> bytes:
        images, prompt = job
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": urls[i]}} for i in images]
        content.append({"type": "text", "text": self.template.replace("{prompt}", prompt)})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        body = {**self.extra_body, "model": self.model, "messages": messages,
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        return json.dumps(body).encode("utf-8")

    def _run(self, jobs: list, urls: list[str], parse: Callable[[str, str], Any]) -> list:
        """Answer every job (parsed), at most ``concurrency`` at once, within ``deadline`` seconds."""
        self.last_requests, self.last_attempts = len(jobs), 0
        if not jobs:
            return []
        call = _Call(self.deadline)
        results: list[Any] = [None] * len(jobs)
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)), thread_name_prefix="vlm-judge")
        try:
            futures = {pool.submit(self._ask, call, job, urls, parse): k for k, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                left = call.deadline - time.monotonic()
                if left <= 0:
                    raise RewardError(
                        f"{self._who()}: answered {len(jobs) - len(pending)} of {len(jobs)} requests within the total "
                        f"deadline of {self.deadline:g} s (timeout {self.timeout:g} s per request, concurrency "
                        f"{self.concurrency}); last error: {call.last_error}. Is the server overloaded or stuck? "
                        "Raise deadline or concurrency"
                    )
                done, pending = wait(pending, timeout=min(_POLL_S, left), return_when=FIRST_COMPLETED)
                for future in done:
                    results[futures[future]] = future.result()  # a worker's RewardError ends the call
                call.expire(time.monotonic())
        finally:
            call.cancel()
            pool.shutdown(wait=False, cancel_futures=True)  # stragglers stop at their socket's timeout
            self.last_attempts = call.attempts
        return results

    def _ask(self, call: _Call, job: tuple[tuple[int, ...], str], urls: list[str], parse) -> Any:
        """One job: POST with retries; returns ``parse(answer, where)``."""
        where = _where(job)
        payload = self._request_body(job, urls)
        errors: list[str] = []
        retry_after = None
        attempts, out_of_time = 0, False
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
                if retry_after is not None:
                    delay = min(max(delay, retry_after), self.backoff_max)
                if call.deadline - time.monotonic() <= delay:
                    out_of_time = True
                    break
                if call.cancelled.wait(delay):
                    raise _Cancelled
            attempts += 1
            retry_after = None
            try:
                status, body, retry_after = self._attempt(call, payload)
            except (OSError, http.client.HTTPException) as err:
                if call.cancelled.is_set():
                    raise _Cancelled from None
                errors.append(_describe(err))
                call.last_error = errors[-1]
                continue
            if status == 200:
                return parse(self._content(body, where), where)
            detail = f"HTTP {status}: {_clip(body, 200)}"
            if status == 429 or status >= 500:
                errors.append(detail)
                call.last_error = detail
                continue
            raise RewardError(f"{self._who()}: {where}: the server refused the request ({detail})")
        if out_of_time or time.monotonic() >= call.deadline:
            raise RewardError(
                f"{self._who()}: {where}: no answer within the total deadline of {self.deadline:g} s "
                f"({attempts} attempt(s), timeout {self.timeout:g} s each); last error: {errors[-1]}. "
                "Is the server overloaded or stuck? Raise deadline or concurrency"
            )
        raise RewardError(
            f"{self._who()}: {where}: no answer after {attempts} attempt(s) in {time.monotonic() - call.start:.1f} s; "
            f"last error: {errors[-1]}. Is the server running? (e.g. vllm serve {self.model} --port 8000)"
        )

    def _attempt(self, call: _Call, payload: bytes) -> tuple[int, bytes, float | None]:
        """One POST (:func:`~branchgrpo.rewards.vlm_http.post_once`) to this judge's endpoint."""
        return post_once(call, payload, scheme=self._scheme, host=self._host, port=self._port, path=self._path,
                         headers=self._headers, timeout=self.timeout)

    # ------------------------------------------------------------------ answers

    def _content(self, body: bytes, where: str) -> str:
        """``choices[0].message.content`` of a chat-completions answer, reasoning stripped."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RewardError(f"{self._who()}: {where}: the answer is not JSON: {_clip(body)}") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise RewardError(f"{self._who()}: {where}: the answer has no choices: {_clip(json.dumps(data))}")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise RewardError(
                f"{self._who()}: {where}: the answer has no text (finish_reason={choices[0].get('finish_reason')!r}; "
                f"a reasoning model may need a larger max_tokens): {_clip(json.dumps(choices[0]))}"
            )
        if "<think>" in content and "</think>" not in content:  # numbers in cut-off reasoning are no score
            raise RewardError(
                f"{self._who()}: {where}: the answer's reasoning ends before </think> (finish_reason="
                f"{choices[0].get('finish_reason')!r}; raise max_tokens): {_clip(content)}"
            )
        return _THINK.sub("", content).strip()

    def _parse_score(self, answer: str, where: str) -> float:
        match = self.score_pattern.search(answer)
        try:
            score = float(match.group(1)) if match else math.nan
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise RewardError(f"{self._who()}: {where}: no score matching score_pattern "
                              f"{self.score_pattern.pattern!r} in the answer {_clip(answer)}")
        if self.score_range is None:
            return score
        lo, hi = self.score_range
        if not lo <= score <= hi:
            raise RewardError(f"{self._who()}: {where}: score {score:g} is outside score_range [{lo:g}, {hi:g}] "
                              f"in the answer {_clip(answer)}")
        return (score - lo) / (hi - lo)

    def _parse_choice(self, answer: str, where: str) -> bool:
        match = self.choice_pattern.search(answer)
        choice = (match.group(1) or "").strip().upper() if match else ""
        if choice not in _FIRST_WINS:
            raise RewardError(f"{self._who()}: {where}: no choice (1/2 or A/B) matching choice_pattern "
                              f"{self.choice_pattern.pattern!r} in the answer {_clip(answer)}")
        return _FIRST_WINS[choice]

    def _who(self) -> str:
        return f"reward 'vlm' (judge {self.model!r} at {self.url})"
