"""``branchgrpo report RUN_DIR``: one self-contained HTML page about a training run.

The page (inline CSS/JS, images as data URIs, no network) shows reward/loss and other metric
curves, the held-out sample grids, the NFE and time breakdown, and an interactive viewer of the
rollout-tree dumps. See ``docs/report.md``.

    from branchgrpo.report import write_report
    write_report("runs/digits-branchgrpo")            # -> runs/digits-branchgrpo/report.html
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from branchgrpo.report.data import ReportError, check_run_dir, collect, decode_tree_blob
from branchgrpo.report.page import SECTIONS, render_page

__all__ = [
    "SECTIONS",
    "ReportError",
    "add_arguments",
    "build_report",
    "decode_tree_blob",
    "main",
    "read_report_data",
    "run_from_args",
    "write_report",
]

DEFAULT_MAX_TREE_DUMPS = 24
DEFAULT_MAX_SAMPLE_GRIDS = 24


def build_report(
    run_dir: str | Path, *, max_tree_dumps: int | None = DEFAULT_MAX_TREE_DUMPS,
    max_sample_grids: int | None = DEFAULT_MAX_SAMPLE_GRIDS,
) -> str:
    """The report page for ``run_dir`` as one HTML string."""
    return render_page(collect(run_dir, max_tree_dumps=max_tree_dumps, max_sample_grids=max_sample_grids))


def write_report(
    run_dir: str | Path, out: str | Path | None = None, *, max_tree_dumps: int | None = DEFAULT_MAX_TREE_DUMPS,
    max_sample_grids: int | None = DEFAULT_MAX_SAMPLE_GRIDS,
) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``); returns its path.

    At most ``max_tree_dumps`` tree dumps and ``max_sample_grids`` sample grids are embedded,
    evenly spaced over the run with the first and last kept (None: all). The file is written
    atomically. Raises :class:`ReportError` (a ``FileNotFoundError``) when ``run_dir`` is missing
    or is not a run directory.
    """
    run_path = check_run_dir(run_dir)
    page = build_report(run_path, max_tree_dumps=max_tree_dumps, max_sample_grids=max_sample_grids)
    target = Path(out) if out is not None else run_path / "report.html"
    if target.is_dir():
        target = target / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def read_report_data(path: str | Path) -> dict:
    """The JSON payload embedded in a written report (for tests and tools)."""
    import json
    import re

    text = Path(path).read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.DOTALL)
    if match is None:
        raise ValueError(f"{path} holds no branchgrpo report data")
    return json.loads(match.group(1))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The report's arguments, for a ``report`` subcommand of another parser."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `branchgrpo train`")
    parser.add_argument("--out", metavar="FILE", help="output HTML file (default: RUN_DIR/report.html)")
    parser.add_argument("--max-trees", type=int, default=DEFAULT_MAX_TREE_DUMPS, metavar="N",
                        help=f"embed at most N tree dumps, evenly spaced; 0 = all (default {DEFAULT_MAX_TREE_DUMPS})")
    parser.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLE_GRIDS, metavar="N",
                        help="embed at most N sample grids, evenly spaced; 0 = all "
                             f"(default {DEFAULT_MAX_SAMPLE_GRIDS})")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Write the report described by parsed :func:`add_arguments` arguments; prints the path."""
    path = write_report(
        args.run_dir, args.out, max_tree_dumps=args.max_trees or None, max_sample_grids=args.max_samples or None,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m branchgrpo.report RUN_DIR [--out FILE]``; errors are one line, exit status 2."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="branchgrpo report", description="Write a self-contained HTML report of a training run.",
    ))
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ReportError, OSError) as err:
        print(f"branchgrpo report: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("branchgrpo report: interrupted", file=sys.stderr)
        return 130
