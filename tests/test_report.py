"""`branchgrpo report`: a real tiny run → one self-contained HTML page, checked as text and in headless Chromium.

The browser part drives Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
NUL-separated JSON on file descriptors 3 and 4), so it needs no port, no websocket package and no
network. It is skipped only when no Chromium binary is installed (``scripts/ci_install_chromium.sh``).
Set ``BRANCHGRPO_REPORT_ARTIFACTS=DIR`` to keep the reports and screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from branchgrpo.report import SECTIONS, decode_tree_blob, main, read_report_data, write_report
from branchgrpo.report.png import encode_png, png_size
from branchgrpo.tree.dump import load_tree

THUMB_DUMP = "iter_000001.safetensors"


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 3-iteration BranchGRPO-Mix run of the tiny trainer: a trunk edge before the first split
    (zero advantage), ODE steps outside the SDE window (never trained), dumps with the trainer's
    prompts and x̂0 thumbnails (one dump's replaced by synthetic colour ones)."""
    from test_trainer import brightness_reward, make_trainer, tiny_generator  # noqa: F401 - conftest puts tests/ on the path

    out = tmp_path_factory.mktemp("run")
    trainer = make_trainer(out, "branchgrpo-mix", "split_plan=1:2,3:2", "tree.sde_window.size=3",
                           "run.iterations=3", "eval.every=1")
    trainer.run()
    add_thumbnails(out / "trees" / THUMB_DUMP)
    return out


def add_thumbnails(path: Path) -> None:
    """Store an ``x0_thumbnails [N, 3, 6, 8]`` tensor beside the dump's columns (as a trainer may)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    n = tensors["parent"].shape[0]
    ramp = torch.linspace(0, 1, n)[:, None, None, None]
    noise = torch.rand(n, 1, 6, 8, generator=torch.Generator().manual_seed(0))
    thumbs = torch.cat([ramp.expand(n, 1, 6, 8), 1 - ramp.expand(n, 1, 6, 8), noise], 1)
    tensors["x0_thumbnails"] = thumbs.contiguous()
    save_file(tensors, str(path), metadata=metadata)


def big_tree_run(root: Path, source: Path, leaves_k: int = 4, splits: tuple[int, ...] = (0, 3, 6, 9), steps: int = 20,
                 groups: int = 2) -> Path:
    """A run directory holding one synthetic dump of ``K^len(splits)`` = 256-leaf trees (T = 20)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "config.yaml", root / "config.yaml")
    shutil.copy(source / "metrics.jsonl", root / "metrics.jsonl")
    gen = np.random.default_rng(0)
    parent, depth, tree_id = [], [], []
    frontier: list[list[int]] = [[] for _ in range(groups)]  # per group: rows of the current frontier
    rows = 0
    for d in range(steps + 1):
        level = []
        for g in range(groups):
            if d == 0:
                level.append((g, [-1]))
            else:
                k = leaves_k if (d - 1) in splits else 1
                level.append((g, [p for p in frontier[g] for _ in range(k)]))
        new_frontier = []
        for g, parents in level:
            ids = list(range(rows, rows + len(parents)))
            parent += parents
            depth += [d] * len(parents)
            tree_id += [g] * len(parents)
            rows += len(parents)
            new_frontier.append(ids)
        frontier = new_frontier
    n = rows
    depth_a = np.array(depth, dtype=np.int32)
    leaf_reward = np.full(n, np.nan, dtype=np.float32)
    leaf_reward[depth_a == steps] = gen.random(int((depth_a == steps).sum())).astype(np.float32)
    columns = {
        "parent": torch.tensor(parent, dtype=torch.int64), "depth": torch.from_numpy(depth_a),
        "step": torch.from_numpy(depth_a - 1), "tree_id": torch.tensor(tree_id, dtype=torch.int32),
        "logp": torch.from_numpy(gen.normal(1, 0.05, n).astype(np.float32)), "is_sde": torch.ones(n, dtype=torch.bool),
        "leaf_reward": torch.from_numpy(leaf_reward),
        "fused_reward": torch.from_numpy(gen.random(n).astype(np.float32)),
        "advantage": torch.from_numpy(gen.normal(0, 1, n).astype(np.float32)),
        "trained": torch.from_numpy(gen.random(n) < 0.6),
    }
    columns["advantage"][columns["depth"] == 0] = 0
    metadata = {"format": "branchgrpo-tree/1", "spec": json.dumps({"steps": steps}),
                "method": json.dumps({"name": "synthetic"}), "beta": "1.0", "reduction": "mean", "iteration": "7",
                "num_groups": str(groups), "root_entropy_ratio": "0.99"}
    (root / "trees").mkdir(exist_ok=True)
    save_file(columns, str(root / "trees" / "iter_000007.safetensors"), metadata=metadata)
    return root


def keep_artifact(path: Path) -> None:
    target = os.environ.get("BRANCHGRPO_REPORT_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


# ----------------------------------------------------------------------------- page content
def test_report_content(run_dir, tmp_path):
    out = write_report(run_dir, tmp_path / "report.html")
    assert out == tmp_path / "report.html" and out.is_file()
    html = out.read_text(encoding="utf-8")
    for sid, title in SECTIONS:
        assert f'<section id="{sid}">' in html and title in html
    # self-contained: no URL to fetch anywhere, inline script/style only, a CSP forbidding the network
    assert not re.search(r"(?i)(https?:|wss?:|ftp:)//", html)
    assert not re.search(r"(?i)<script[^>]+src=|<link\b|@import|url\((?!#)", html)
    assert "default-src 'none'" in html

    data = read_report_data(out)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_reward" in r]
    assert data["train"]["iteration"] == [0, 1, 2]
    for key in ("reward_mean", "reward_min", "reward_max", "loss", "clip_fraction", "ratio_mean", "grad_norm", "kl",
                "nfe/rollout_calls", "nfe/trained_edges", "nfe/training_forwards", "time/rollout", "time/train"):
        assert data["train"][key] == pytest.approx([r[key] for r in train], rel=1e-6), key
    assert data["eval"]["iteration"] == [0, 1, 2, 3]
    assert data["eval"]["eval_reward"] == pytest.approx([r["eval_reward"] for r in evals], rel=1e-6)
    for key in ("diversity_pixel", "diversity_feature"):  # two samples per prompt: diversity in every eval row
        assert data["eval"][key] == pytest.approx([r[key] for r in evals], rel=1e-6), key
    assert all(v > 0 for v in data["eval"]["diversity_feature"])
    # every sample grid, as the PNG bytes of the file
    assert [s["iteration"] for s in data["samples"]] == [0, 1, 2, 3]
    for s in data["samples"]:
        png = base64.b64decode(s["src"].removeprefix("data:image/png;base64,"))
        assert png == (run_dir / "samples" / s["file"]).read_bytes()
        assert (s["width"], s["height"]) == png_size(png)
        assert s["diversity_feature"] == pytest.approx(evals[s["iteration"]]["diversity_feature"], rel=1e-6)
    # every tree dump, column for column
    assert [t["file"] for t in data["trees"]] == [f"iter_00000{i}.safetensors" for i in range(3)]
    for tree in data["trees"]:
        columns, meta = load_tree(run_dir / "trees" / tree["file"])
        decoded = decode_tree_blob(tree)
        assert tree["iteration"] == meta["iteration"] and tree["nodes"] == len(columns["parent"])
        for name, values in columns.items():
            if name == "x0_thumbnails":
                continue
            np.testing.assert_array_equal(decoded[name], values.numpy().astype(decoded[name].dtype), err_msg=name)
        assert sum(g["nodes"] for g in tree["groups"]) == tree["nodes"]
        assert tree["trained_edges"] == int(columns["trained"].sum())
    # the run has every edge kind the viewer draws
    cols = decode_tree_blob(data["trees"][-1])
    edge = cols["parent"] >= 0
    assert (edge & (cols["advantage"] == 0)).any() and (edge & ~cols["is_sde"].astype(bool)).any()
    assert (edge & cols["trained"].astype(bool)).any() and (edge & ~cols["trained"].astype(bool)).any()
    thumbs = {t["file"]: t["thumbs"] for t in data["trees"]}
    # the trainer's thumbnails: the tiny generator's [1, 16, 1] images; THUMB_DUMP's were replaced
    assert (thumbs["iter_000000.safetensors"]["w"], thumbs["iter_000000.safetensors"]["h"]) == (1, 16)
    assert thumbs[THUMB_DUMP]["w"] == 8 and thumbs[THUMB_DUMP]["h"] == 6
    for tree in data["trees"]:  # each group's prompt, from the dump's metadata
        _, meta = load_tree(run_dir / "trees" / tree["file"])
        assert [g["prompt"] for g in tree["groups"]] == [meta["prompts"][g["id"]] for g in tree["groups"]]
    assert data["highlights"] and data["warnings"] == []
    keep_artifact(out)


def test_trainer_dumps_carry_prompts_and_the_leaves_pictures(run_dir):
    """The leaf thumbnails are the pictures the reward scored: the tiny run's reward is mean brightness,
    so each leaf's thumbnail mean (uint8, rounding ≤ 0.5/255) gives back its leaf_reward."""
    from test_trainer import PROMPTS

    for path in sorted((run_dir / "trees").glob("iter_*.safetensors")):
        if path.name == THUMB_DUMP:
            continue
        columns, meta = load_tree(path)
        assert len(meta["prompts"]) == meta["num_groups"] == 2 and set(meta["prompts"]) <= set(PROMPTS)
        thumbs = columns["x0_thumbnails"]
        assert thumbs.dtype == torch.uint8 and tuple(thumbs.shape) == (len(columns["parent"]), 1, 16, 1)
        leaves = columns["depth"] == int(columns["depth"].max())
        brightness = thumbs[leaves].flatten(1).double().mean(1) / 255
        np.testing.assert_allclose(brightness.numpy(), columns["leaf_reward"][leaves].double().numpy(),
                                   atol=0.5 / 255 + 1e-6)
        assert path.stat().st_size < 40_000


def test_default_output_limits_and_partial_runs(run_dir, tmp_path):
    assert write_report(run_dir) == run_dir / "report.html"
    limited = read_report_data(write_report(run_dir, tmp_path / "limited.html", max_tree_dumps=2, max_sample_grids=3))
    assert [t["iteration"] for t in limited["trees"]] == [0, 2] and limited["trees_omitted"] == 1
    assert [s["iteration"] for s in limited["samples"]] == [0, 2, 3] and limited["samples_omitted"] == 1
    # a run that has only just started: config and a cut metrics line, nothing else
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "config.yaml", partial / "config.yaml")
    (partial / "metrics.jsonl").write_text('{"iteration": 0, "eval_reward": 0.5}\n{"reward_mean": 0.4, "iter')
    (partial / "trees").mkdir()
    (partial / "trees" / "iter_000000.safetensors").write_bytes(b"cut short")
    (partial / "samples").mkdir()
    (partial / "samples" / "iter_000000.png").write_bytes(b"not a png")
    data = read_report_data(write_report(partial))
    assert data["train"]["iteration"] == [] and data["eval"]["eval_reward"] == [0.5]
    assert data["eval"]["diversity_pixel"] == data["eval"]["diversity_feature"] == [None]  # not logged then
    assert data["trees"] == [] and data["samples"] == []
    assert [w.split(":")[0] for w in data["warnings"]] == ["metrics.jsonl", "samples/iter_000000.png",
                                                           "trees/iter_000000.safetensors"]


def test_thumbnails_are_downscaled_to_fit():
    from branchgrpo.report.data import THUMBNAIL_MAX_SIDE, THUMBNAIL_PIXEL_BUDGET, _thumbnail_sprite, _Warnings

    sprite = _thumbnail_sprite(torch.rand(20, 3, 64, 48), 20, "x", _Warnings())
    assert (sprite["h"], sprite["w"], sprite["cols"]) == (THUMBNAIL_MAX_SIDE, 24, 5)
    many = 5000
    sprite = _thumbnail_sprite(torch.rand(many, 1, 32, 32), many, "x", _Warnings())
    assert sprite["h"] == sprite["w"] and many * sprite["h"] ** 2 <= THUMBNAIL_PIXEL_BUDGET < many * 32**2
    warnings = _Warnings()
    assert _thumbnail_sprite(torch.rand(3, 3, 8, 8), 4, "x", warnings) is None
    assert "expected [4, C, h, w]" in warnings.items[0]


def test_png_encoder_round_trip():
    import io

    from PIL import Image

    pixels = (np.arange(5 * 7 * 3).reshape(5, 7, 3) * 7 % 256).astype(np.uint8)
    for array in (pixels, pixels[..., 0]):
        image = Image.open(io.BytesIO(encode_png(array)))
        np.testing.assert_array_equal(np.asarray(image), array)


def test_large_sample_grids_are_embedded_smaller():
    from branchgrpo.report.data import SAMPLE_MAX_SIDE, shrink_image

    gen = np.random.default_rng(0)
    small = encode_png(gen.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    assert shrink_image(small, (60, 40)) == (small, "image/png", (60, 40))
    big = encode_png(gen.integers(0, 255, (300, SAMPLE_MAX_SIDE + 400, 3), dtype=np.uint8), level=1)
    data, mime, size = shrink_image(big, (SAMPLE_MAX_SIDE + 400, 300))
    assert mime == "image/jpeg" and max(size) == SAMPLE_MAX_SIDE and len(data) < len(big)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "branchgrpo.report", str(tmp_path / "missing")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_cli_writes_report(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert "r.html" in capsys.readouterr().out and (tmp_path / "r.html").is_file()


def test_css_and_js_are_package_data_inlined_in_the_page(run_dir, tmp_path):
    from importlib import resources

    static = resources.files("branchgrpo.report") / "static"
    css = (static / "report.css").read_text(encoding="utf-8")
    js = (static / "report.js").read_text(encoding="utf-8")
    assert "#tree-svg" in css and "report-data" in js
    html = write_report(run_dir, tmp_path / "r.html").read_text(encoding="utf-8")
    assert f"<style>\n{css}</style>" in html and f"<script>\n{js}</script>" in html
    assert not re.search(r"(?i)<script[^>]+src=|<link\b", html)


# ----------------------------------------------------------------------------- headless Chromium
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    explicit = os.environ.get("BRANCHGRPO_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


# Exec the browser with the DevTools pipe on fds 3 (commands in) and 4 (replies out).
_PIPE_EXEC = """
import fcntl, os, sys
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]
for fd in sys.argv[1:3]:
    os.close(int(fd))
os.dup2(high[0], 3)
os.dup2(high[1], 4)
for fd in high:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the browser)."""

    FLAGS = (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check", "--mute-audio",
        "--remote-debugging-pipe",
    )

    def __init__(self, binary: str, profile: Path, log: Path, timeout: float = 20.0):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - the browser's stdout/stderr until close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PIPE_EXEC, str(to_browser_r), str(from_browser_w),
             binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None
        self.viewport = (0, 0)

    # -- protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium\n" + self.log_tail())
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe\n" + self.log_tail())
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: bool = True, timeout: float | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        for i, event in enumerate(self.events):
            if event["method"] == method:
                return self.events.pop(i)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            message = self._read_message(deadline)
            if message.get("method") == method:
                return message
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout: float | None = None):
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                           timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0):
        """Poll a page expression until it is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied {expression!r}")

    # -- set-up
    def open_page(self, width: int = 1400, height: int = 1000) -> None:
        targets = self.call("Target.getTargets", session=False)["targetInfos"]
        pages = [t for t in targets if t["type"] == "page"]
        if pages:
            target = pages[0]["targetId"]
        else:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.set_viewport(width, height)

    def navigate(self, url: str) -> None:
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def screenshot(self, path: Path, selector: str | None = None, full_page: bool = False,
                   max_height: int = 8000) -> Path:
        """PNG of the viewport, of the whole page, or of one element.

        For a page or an element taller than the window the viewport itself is made taller for the
        capture (Chromium's captureBeyondViewport can return a blank first image)."""
        width, height = self.viewport
        target = None
        if full_page:
            target = "document.documentElement"
        elif selector:
            target = f"document.querySelector({json.dumps(selector)})"
        if target is not None:
            need = self.evaluate(f"Math.ceil({target}.getBoundingClientRect().height)")
            if need > height:
                self.set_viewport(width, min(need, max_height), remember=False)
            self.evaluate(f"{target}.scrollIntoView()")
        # let the compositor draw a frame after a resize or scroll
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        params: dict = {"format": "png"}
        if target is not None:
            clip = self.evaluate(f"(() => {{ const r = {target}.getBoundingClientRect();"
                                 " return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; })()")
            clip["height"] = min(clip["height"], max_height)
            params["clip"] = dict(clip, scale=1)
        try:
            path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", params, timeout=30)["data"]))
        finally:
            if self.viewport != (width, height) or target is not None:
                self.set_viewport(width, height)
        return path

    def set_viewport(self, width: int, height: int, remember: bool = True) -> None:
        if remember:
            self.viewport = (width, height)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # -- what went wrong on the page
    def problems(self) -> list[str]:
        out = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                out.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append("log: " + params["entry"].get("text", ""))
        return out

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.session = None
                os.write(self._to_browser, json.dumps({"id": 10**6, "method": "Browser.close"}).encode() + b"\0")
                self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the browser's own process group (start_new_session)
                self.proc.wait(timeout=5)
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log_file.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (bash scripts/ci_install_chromium.sh, or set BRANCHGRPO_CHROMIUM)")
    root = tmp_path_factory.mktemp("chromium")
    b = Browser(binary, root / "profile", root / "chromium.log")
    try:
        b.open_page()
        yield b
    finally:
        b.close()


def colourful_pixels(png: Path) -> int:
    """Pixels that are clearly coloured (not white/grey/black): the drawn tree nodes."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return int((spread > 60).sum())


def node_center(browser: Browser, index: int) -> tuple[float, float]:
    """Window coordinates of a drawn node (a circle, or a nested <svg> thumbnail) after scrolling to it."""
    return tuple(browser.evaluate(
        f"(() => {{ const n = document.querySelectorAll('#tree-svg [data-i]')[{index}];"
        " n.scrollIntoView({block: 'center'});"
        " const s = document.getElementById('tree-svg').getBoundingClientRect(), a = k => +n.getAttribute(k);"
        " return n.tagName === 'circle' ? [s.x + a('cx'), s.y + a('cy')]"
        " : [s.x + a('x') + a('width') / 2, s.y + a('y') + a('height') / 2]; })()"
    ))


def count(browser: Browser, selector: str) -> int:
    return browser.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length")


def set_control(browser: Browser, element_id: str, value) -> None:
    """Set a <select> value or a checkbox as a user would (a change event follows)."""
    prop = "checked" if isinstance(value, bool) else "value"
    browser.evaluate(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); "
                     f"e.{prop} = {json.dumps(value if isinstance(value, bool) else str(value))}; "
                     "e.dispatchEvent(new Event('change')); })()")


def hover(browser: Browser, x: float, y: float) -> None:
    browser.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})


def test_report_in_headless_chromium(run_dir, browser, tmp_path):
    out = write_report(run_dir, tmp_path / "report.html")
    data = read_report_data(out)
    browser.navigate(out.as_uri())
    browser.wait_for("document.body.dataset.treeReady")
    assert browser.evaluate("document.body.dataset.treeReady") == "1"

    # every section rendered, charts have lines, images decoded
    for sid, _ in SECTIONS:
        assert browser.evaluate(f"document.querySelector('#{sid}-body').children.length > 0"), sid
    # train reward, eval reward, loss, and the diversity card's two curves next to the reward
    assert count(browser, "#rewards svg.chart path.line") >= 5
    assert browser.evaluate("document.querySelector('#rewards-body').textContent.includes('Sample diversity')")
    assert count(browser, "#metrics svg.chart path.line") >= 4
    assert count(browser, "#cost #time-bars rect") >= 3 * 4
    assert count(browser, "#nfe-table tbody tr") >= 7
    assert browser.evaluate("[...document.querySelectorAll('#samples img')].every(i => i.naturalWidth > 0)")
    assert count(browser, "#samples figure") == len(data["samples"])

    # the tree: default = last dump, first group (its prompt above it); one circle per node of that group
    last = decode_tree_blob(data["trees"][-1])
    in_group = last["tree_id"] == data["trees"][-1]["groups"][0]["id"]
    prompt = data["trees"][-1]["groups"][0]["prompt"]
    shown = browser.evaluate("document.getElementById('tree-prompt').textContent")
    assert prompt and shown == f"prompt: \u201c{prompt}\u201d"
    assert prompt in browser.evaluate("document.getElementById('tree-group').selectedOptions[0].textContent")
    assert count(browser, "#tree-svg circle.n") == int(in_group.sum())
    assert count(browser, "#tree-svg path.e-sz, #tree-svg path.e-oz") >= 1  # zero advantage (the trunk)
    assert count(browser, "#tree-svg path.e-ou") == 1  # ODE edges (never trained: dashed)
    assert count(browser, "#tree-svg path.e-st") == 1  # trained SDE edges

    # hover a leaf: tooltip with the node's numbers and the highlighted path to the root
    hover(browser, *node_center(browser, int(in_group.sum()) - 1))
    browser.wait_for("!document.getElementById('tip').hidden")
    text = browser.evaluate("document.getElementById('tip').textContent")
    for word in ("depth", "step", "log p", "fused reward", "advantage", "leaf reward", "trained"):
        assert word in text, text
    points = browser.evaluate("document.getElementById('tree-hl').getAttribute('d').split('L').length")
    assert points == int(last["depth"][in_group].max()) + 1
    screenshot = browser.screenshot(tmp_path / "report-tree-hover.png", "#trees")
    assert colourful_pixels(screenshot) > 200, "the tree's nodes are not drawn"
    keep_artifact(screenshot)
    hover(browser, 5, 5)

    # controls: colour by advantage, second group, the dump with thumbnails drawn on the nodes
    browser.evaluate("document.querySelector('#tree-color button[data-mode=advantage]').click()")
    browser.wait_for("document.querySelector('#tree-legend').textContent.includes('edge advantage')")
    thumb_index = [t["file"] for t in data["trees"]].index(THUMB_DUMP)
    set_control(browser, "tree-dump", thumb_index)
    set_control(browser, "tree-group", 1)
    group1 = int((decode_tree_blob(data["trees"][thumb_index])["tree_id"] == 1).sum())
    browser.wait_for(f"document.querySelectorAll('#tree-svg circle.n').length === {group1}")
    set_control(browser, "tree-thumbs", True)
    browser.wait_for(f"document.querySelectorAll('#tree-svg svg.th use').length === {group1}")
    browser.evaluate("window.scrollTo(0, 0)")
    keep_artifact(browser.screenshot(tmp_path / "report-full.png", full_page=True))
    hover(browser, *node_center(browser, 0))
    browser.wait_for("document.getElementById('tip-thumb') && document.getElementById('tip-thumb').width > 0")
    keep_artifact(browser.screenshot(tmp_path / "report-thumbnails.png", "#trees"))

    # resizing redraws charts and the tree without errors
    browser.set_viewport(1000, 900)
    time.sleep(0.4)
    browser.set_viewport(1400, 1000)

    assert browser.problems() == []
    assert [u for u in browser.requested_urls() if not u.startswith(("file:", "data:", "about:"))] == []


def test_256_leaf_tree_is_fast(run_dir, browser, tmp_path):
    big = big_tree_run(tmp_path / "big", run_dir)
    out = write_report(big)
    data = read_report_data(out)
    group = data["trees"][0]["groups"][0]
    assert group["leaves"] == 256 and group["nodes"] == 1 + 3 * 4 + 3 * 16 + 3 * 64 + 11 * 256
    browser.events.clear()
    browser.navigate(out.as_uri())
    browser.wait_for("document.body.dataset.treeReady")
    assert count(browser, "#tree-svg .n") == group["nodes"]
    ms = float(browser.evaluate("document.getElementById('tree-svg').dataset.renderMs"))
    assert ms < 1500, f"drawing a 256-leaf tree took {ms:.0f} ms"
    # switching colour mode redraws the whole tree
    t0 = browser.evaluate("performance.now()")
    browser.evaluate("document.querySelector('#tree-color button[data-mode=advantage]').click()")
    browser.wait_for("document.querySelector('#tree-legend').textContent.includes('edge advantage')")
    assert browser.evaluate("performance.now()") - t0 < 3000
    keep_artifact(browser.screenshot(tmp_path / "report-256-leaves.png", "#trees", max_height=1400))
    assert browser.problems() == []
