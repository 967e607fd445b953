"""Read a run directory into the JSON payload the report page renders.

Everything the page shows is in this payload: metric columns, sample grids (PNG data URIs) and
the tree dumps (one zlib-compressed, base64 binary blob of typed columns per dump; see
:data:`TREE_LAYOUT`). The page decodes the blobs lazily in the browser.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from branchgrpo.report.png import encode_png, png_size

PAYLOAD_FORMAT = "branchgrpo-report/1"
# (column, dtype) in blob order: 4-byte columns first so every typed-array view is aligned
TREE_LAYOUT = (
    ("parent", "<i4"), ("depth", "<i4"), ("step", "<i4"), ("tree_id", "<i4"),
    ("logp", "<f4"), ("leaf_reward", "<f4"), ("fused_reward", "<f4"), ("advantage", "<f4"),
    ("is_sde", "u1"), ("trained", "u1"),
)
THUMBNAIL_KEY = "x0_thumbnails"
THUMBNAIL_MAX_SIDE = 32
THUMBNAIL_PIXEL_BUDGET = 4_000_000  # per dump: many-node dumps get smaller thumbnails
SAMPLE_MAX_BYTES = 1_500_000  # larger sample grids are embedded as a JPEG ...
SAMPLE_MAX_SIDE = 2048  # ... of at most this many pixels on a side
_ITER_FILE = re.compile(r"^iter_(\d+)\.(png|safetensors)$")


class ReportError(FileNotFoundError):
    """The run directory is missing or is not a branchgrpo run (printed as one line by CLIs)."""


@dataclass
class _Warnings:
    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)


def _clean(value):
    """JSON-safe number: NaN/inf → None, floats rounded to 7 significant digits."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.7g}")
    return None


def _number(value):
    return _clean(value) if isinstance(value, (int, float)) else None


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory as a Path; :class:`ReportError` when it is missing or not a run."""
    path = Path(run_dir)
    if not path.exists():
        raise ReportError(f"run directory {run_dir} does not exist")
    if not path.is_dir():
        raise ReportError(f"{run_dir} is not a directory; pass the folder `branchgrpo train` wrote")
    if not (path / "config.yaml").is_file() and not (path / "metrics.jsonl").is_file():
        raise ReportError(
            f"{run_dir} is not a run directory (no config.yaml or metrics.jsonl); "
            "pass the folder `branchgrpo train` wrote"
        )
    return path


EVAL_COLUMNS = ("eval_reward", "diversity_pixel", "diversity_feature")  # what an eval row may hold


def read_metrics(path: Path, warnings: _Warnings) -> tuple[dict, dict]:
    """``(train, eval)`` column tables from metrics.jsonl; the last row of a repeated iteration wins.

    The eval table has ``iteration`` and every :data:`EVAL_COLUMNS` column (None where a row lacks it:
    runs from before diversity was logged, or one sample per prompt).
    """
    train_rows: dict[int, dict] = {}
    eval_rows: dict[int, dict] = {}
    bad = 0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                iteration = int(row["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad += 1
                continue
            if "eval_reward" in row:
                eval_rows[iteration] = {key: _number(row.get(key)) for key in EVAL_COLUMNS}
            else:
                train_rows[iteration] = row
    if bad:
        warnings.add(f"metrics.jsonl: skipped {bad} unreadable line(s)")
    keys: list[str] = []
    seen = set()
    for row in train_rows.values():
        for key, value in row.items():
            if key not in seen and key != "iteration" and isinstance(value, (int, float)):
                seen.add(key)
                keys.append(key)
    iterations = sorted(train_rows)
    train = {"iteration": iterations}
    for key in keys:
        train[key] = [_clean(train_rows[i].get(key)) for i in iterations]
    eval_iterations = sorted(eval_rows)
    evals = {"iteration": eval_iterations}
    for key in EVAL_COLUMNS:
        evals[key] = [eval_rows[i][key] for i in eval_iterations]
    return train, evals


def _evenly(items: list, limit: int | None) -> tuple[list, int]:
    """At most ``limit`` items, evenly spaced, first and last kept; and how many were left out."""
    if limit is None or limit <= 0 or len(items) <= limit:
        return list(items), 0
    if limit == 1:
        return [items[-1]], len(items) - 1
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks], len(items) - len(picks)


def _iter_files(folder: Path, suffix: str) -> list[tuple[int, Path]]:
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _ITER_FILE.match(path.name)
            if match and match.group(2) == suffix and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def shrink_image(data: bytes, size: tuple[int, int]) -> tuple[bytes, str, tuple[int, int]]:
    """A large sample grid (full-resolution FLUX grids reach tens of MB) as a smaller JPEG.

    Grids within :data:`SAMPLE_MAX_BYTES` and :data:`SAMPLE_MAX_SIDE` (all small-image grids) are
    kept byte for byte. Needs Pillow (installed with the models extra); without it, kept as is.
    """
    if len(data) <= SAMPLE_MAX_BYTES and max(size) <= SAMPLE_MAX_SIDE:
        return data, "image/png", size
    try:
        import io

        from PIL import Image
    except ImportError:
        return data, "image/png", size
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        scale = min(1.0, SAMPLE_MAX_SIDE / max(image.size))
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=88)
        if out.tell() >= len(data):
            return data, "image/png", size
        return out.getvalue(), "image/jpeg", image.size


def read_samples(run_dir: Path, evals: dict, limit: int | None, warnings: _Warnings) -> tuple[list, int]:
    eval_by_iteration = dict(zip(evals["iteration"], evals["eval_reward"]))
    diversity_by_iteration = dict(zip(evals["iteration"], evals["diversity_feature"]))
    files, omitted = _evenly(_iter_files(run_dir / "samples", "png"), limit)
    samples = []
    for iteration, path in files:
        data = path.read_bytes()
        size = png_size(data)
        if size is None:
            warnings.add(f"samples/{path.name}: not a PNG file; skipped")
            continue
        embedded, mime, shown = shrink_image(data, size)
        samples.append({
            "iteration": iteration, "file": path.name, "width": shown[0], "height": shown[1],
            "original": list(size) if shown != size or mime != "image/png" else None,
            "eval_reward": eval_by_iteration.get(iteration),
            "diversity_feature": diversity_by_iteration.get(iteration),
            "src": f"data:{mime};base64," + base64.b64encode(embedded).decode("ascii"),
        })
    if omitted:
        warnings.add(f"samples: showing {len(samples)} of {len(samples) + omitted} grids (evenly spaced)")
    return samples, omitted


def _thumbnail_sprite(thumbs, nodes: int, name: str, warnings: _Warnings) -> dict | None:
    """All node thumbnails as one PNG sprite sheet (row-major cells of ``w × h``)."""
    import torch

    if thumbs.ndim != 4 or thumbs.shape[0] != nodes:
        warnings.add(
            f"trees/{name}: {THUMBNAIL_KEY} has shape {tuple(thumbs.shape)}, expected [{nodes}, C, h, w]; ignored"
        )
        return None
    x = thumbs.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
    channels = x.shape[1]
    if channels == 4:
        x = x[:, :3]
    elif channels not in (1, 3):
        x = x.mean(dim=1, keepdim=True)
    h, w = x.shape[2], x.shape[3]
    if h < 1 or w < 1:
        return None
    scale = min(THUMBNAIL_MAX_SIDE / max(h, w), math.sqrt(THUMBNAIL_PIXEL_BUDGET / (nodes * h * w)))
    if scale < 1:
        size = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="area")
        h, w = size
    cols = max(1, math.ceil(math.sqrt(nodes)))
    rows = math.ceil(nodes / cols)
    pixels = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [N, h, w, c]
    c = pixels.shape[3]
    sheet = np.zeros((rows * cols, h, w, c), dtype=np.uint8)
    sheet[:nodes] = pixels
    sheet = sheet.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    png = encode_png(sheet)
    return {"src": "data:image/png;base64," + base64.b64encode(png).decode("ascii"), "cols": cols, "w": w, "h": h}


def read_tree(path: Path, warnings: _Warnings) -> dict | None:
    """One dump as payload: metadata, per-group summary and the compressed column blob."""
    from branchgrpo.tree.dump import load_tree

    try:
        columns, meta = load_tree(path)
    except Exception as err:  # noqa: BLE001 - a broken dump must not stop the report
        warnings.add(f"trees/{path.name}: unreadable ({err}); skipped")
        return None
    missing = [name for name, _ in TREE_LAYOUT if name not in columns]
    if missing:
        warnings.add(f"trees/{path.name}: missing column(s) {', '.join(missing)}; skipped")
        return None
    arrays = {name: columns[name].detach().cpu().numpy().astype(dtype) for name, dtype in TREE_LAYOUT}
    nodes = len(arrays["parent"])
    if any(len(a) != nodes for a in arrays.values()) or nodes == 0:
        warnings.add(f"trees/{path.name}: columns of different lengths or no rows; skipped")
        return None
    parent = arrays["parent"]
    if ((parent >= np.arange(nodes)) & (parent != -1)).any() or (parent < -1).any():
        warnings.add(f"trees/{path.name}: parent indices do not point to earlier rows; skipped")
        return None
    blob = b"".join(arrays[name].tobytes() for name, _ in TREE_LAYOUT)
    spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
    max_depth = int(arrays["depth"].max())
    has_child = np.zeros(nodes, dtype=bool)
    has_child[parent[parent >= 0]] = True
    leaf = ~has_child
    prompts = meta.get("prompts")  # one per prompt group (dumps written by the trainer)
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        prompts = []
    groups = []
    for gid in np.unique(arrays["tree_id"]).tolist():
        in_group = arrays["tree_id"] == gid
        leaf_rewards = arrays["leaf_reward"][in_group & leaf]
        finite = leaf_rewards[np.isfinite(leaf_rewards)]
        groups.append({
            "id": int(gid), "prompt": prompts[gid] if 0 <= gid < len(prompts) else None,
            "nodes": int(in_group.sum()), "leaves": int((in_group & leaf).sum()),
            "reward_mean": _clean(float(finite.mean())) if finite.size else None,
            "reward_max": _clean(float(finite.max())) if finite.size else None,
        })
    tree = {
        "file": path.name,
        "iteration": int(meta["iteration"]) if str(meta.get("iteration", "")).lstrip("-").isdigit() else None,
        "nodes": nodes,
        "max_depth": max_depth,
        "steps": spec.get("steps", max_depth),
        "beta": _number(meta.get("beta")),
        "reduction": str(meta.get("reduction", "")),
        "root_entropy_ratio": _number(meta.get("root_entropy_ratio")),
        "method": (meta.get("method") or {}).get("name") if isinstance(meta.get("method"), dict) else None,
        "groups": groups,
        "trained_edges": int(arrays["trained"].sum()),
        "layout": [[name, dtype.lstrip("<")] for name, dtype in TREE_LAYOUT],
        "blob": base64.b64encode(zlib.compress(blob, 6)).decode("ascii"),
        "thumbs": None,
    }
    if THUMBNAIL_KEY in columns:
        tree["thumbs"] = _thumbnail_sprite(columns[THUMBNAIL_KEY], nodes, path.name, warnings)
    return tree


def decode_tree_blob(tree: dict) -> dict[str, np.ndarray]:
    """The columns of one payload tree (for tests and tools): inverse of :func:`read_tree`'s blob."""
    raw = zlib.decompress(base64.b64decode(tree["blob"]))
    out, offset, n = {}, 0, tree["nodes"]
    for name, dtype in tree["layout"]:
        dt = np.dtype(dtype if dtype == "u1" else "<" + dtype)
        out[name] = np.frombuffer(raw, dtype=dt, count=n, offset=offset)
        offset += n * dt.itemsize
    return out


def read_trees(run_dir: Path, limit: int | None, warnings: _Warnings) -> tuple[list, int]:
    files, omitted = _evenly(_iter_files(run_dir / "trees", "safetensors"), limit)
    trees = [t for t in (read_tree(path, warnings) for _, path in files) if t is not None]
    if omitted:
        warnings.add(f"trees: showing {len(trees)} of {len(trees) + omitted} dumps (evenly spaced)")
    return trees, omitted


def _get(mapping, *keys, default=None):
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def _highlights(config: dict, train: dict, evals: dict, summary: dict | None) -> list[list[str]]:
    """Key facts for the page header: (label, value) pairs."""
    out: list[list[str]] = []

    def add(label, value):
        if value is not None and value != "":
            out.append([label, str(value)])

    method = _get(config, "method") or {}
    tree = _get(method, "tree") or {}
    add("method", _get(method, "name") or _get(config, "preset"))
    add("model", _get(config, "model", "family"))
    add("reward", _get(config, "reward", "name"))
    if tree:
        plan = tree.get("split_plan") or {}
        add("steps T", tree.get("steps"))
        moving = " (at the SDE window's first step)" if tree.get("split_at_window_start") else ""
        add("splits", (", ".join(f"{k}:{v}" for k, v in plan.items()) or "none") + moving)
        add("eta", tree.get("eta"))
        window = tree.get("sde_window")
        if window:
            add("SDE window", ", ".join(f"{k}={v}" for k, v in window.items()) if isinstance(window, dict) else window)
        ode_tail = tree.get("ode_tail")
        if ode_tail:
            add("ODE tail", ", ".join(f"{k}={v}" for k, v in ode_tail.items()) if isinstance(ode_tail, dict) else ode_tail)
        add("log-prob reduction", tree.get("logprob_reduction"))
    add("fusion beta", _get(method, "advantage", "fusion_beta"))
    selection = _get(method, "selection") or {}
    if selection.get("width_pruning") not in (None, "none"):
        add("width pruning", selection.get("width_pruning"))
    if selection.get("depth_pruning"):
        add("depth pruning", json.dumps(selection.get("depth_pruning")))
    add("learning rate", _get(method, "update", "learning_rate"))
    add("prompts / iteration", _get(config, "data", "prompts_per_iteration"))
    leaves = train.get("nfe/leaves")
    if leaves:
        add("leaves / prompt", f"{leaves[-1]:g}" if leaves[-1] is not None else None)
    done = (summary or {}).get("iterations", len(train.get("iteration", [])))
    planned = _get(config, "run", "iterations")
    add("iterations", f"{done} / {planned}" if planned is not None else done)
    if summary and summary.get("stopped_by_signal"):
        add("stopped by", summary["stopped_by_signal"])
    return out


def collect(run_dir: str | Path, max_tree_dumps: int | None = 24, max_sample_grids: int | None = 24) -> dict:
    """The whole report payload for ``run_dir`` (raises :class:`ReportError` for a non-run)."""
    import yaml

    from branchgrpo import __version__

    path = check_run_dir(run_dir)
    warnings = _Warnings()
    config_text, config = "", {}
    config_file = path / "config.yaml"
    if config_file.is_file():
        config_text = config_file.read_text(errors="replace")
        try:
            loaded = yaml.safe_load(config_text)
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as err:
            warnings.add(f"config.yaml: not valid YAML ({str(err).splitlines()[0]})")
    else:
        warnings.add("config.yaml: missing")
    summary = None
    summary_file = path / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            warnings.add("summary.json: not valid JSON")
    if summary is not None and not isinstance(summary, dict):
        summary = None
    train, evals = read_metrics(path / "metrics.jsonl", warnings)
    samples, samples_omitted = read_samples(path, evals, max_sample_grids, warnings)
    trees, trees_omitted = read_trees(path, max_tree_dumps, warnings)
    summary_clean = None
    if summary is not None:
        summary_clean = {k: (_clean(v) if isinstance(v, (int, float)) else v) for k, v in summary.items()
                         if isinstance(v, (int, float, str)) or v is None}
    return {
        "format": PAYLOAD_FORMAT,
        "run": {
            "name": path.resolve().name,
            "path": str(path.resolve()),
            "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "version": __version__,
        },
        "config_text": config_text,
        "highlights": _highlights(config, train, evals, summary),
        "summary": summary_clean,
        "train": train,
        "eval": evals,
        "samples": samples,
        "samples_omitted": samples_omitted,
        "trees": trees,
        "trees_omitted": trees_omitted,
        "warnings": warnings.items,
    }
