"""Fetch the HPDv2 benchmark prompts and write them as the prompt files the configs name.

    .venv/bin/python scripts/fetch_hpdv2_prompts.py --out data/hpdv2

Downloads the four benchmark prompt files of the HPDv2 dataset (``zhwang/HPDv2`` on the Hugging Face
hub, ``benchmark/{anime,concept-art,paintings,photo}.json``, each a JSON list of prompt strings; the
files hpsv2's ``download_benchmark_prompts`` fetches) and writes ``train_prompts.txt`` and
``test_prompts.txt`` into ``--out``, one prompt per line, as ``data.train_prompts`` /
``data.heldout_prompts`` read them. ``--from DIR`` reads ``DIR/<style>.json`` instead (no network).

These are the HPDv2 *benchmark* prompts. The paper trains on "HPDv2.1 prompts"; whether its exact
prompt list is this one is not verified here (docs/flux.md, "Download layout").

The split is deterministic and does not depend on file order: each prompt's whitespace is collapsed
to single spaces; empty prompts and prompts that start with ``#`` (a comment to the prompt-file
reader) are dropped; a prompt seen in an earlier style (in the order anime, concept-art, paintings,
photo) or earlier in its file is kept once. Per style, the ``--test-per-style`` prompts (default 16,
so 64 held-out prompts, the configs' ``eval.max_prompts``) with the smallest SHA-256 of their UTF-8
text go to the test file; the rest go to the train file in their original order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

REPO_ID = "zhwang/HPDv2"
STYLES = ("anime", "concept-art", "paintings", "photo")
TEST_PER_STYLE = 16


def clean_prompt(text: str) -> str | None:
    """The prompt on one line (whitespace runs collapsed to a space), or None when it is empty or starts
    with ``#`` (the prompt-file reader would skip it as a comment)."""
    line = " ".join(str(text).split())
    if not line or line.startswith("#"):
        return None
    return line


def read_style_file(path: Path) -> list[str]:
    """A benchmark file: a JSON list of prompt strings (ValueError naming the file otherwise)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise ValueError(f"{path}: expected a JSON list of prompt strings")
    return data


def split_prompts(styles: Mapping[str, Sequence[str]], test_per_style: int = TEST_PER_STYLE
                  ) -> tuple[list[str], list[str], int]:
    """``(train, test, dropped)`` from ``{style: prompts}`` (in the mapping's order), as the module says."""
    if test_per_style < 0:
        raise ValueError(f"test_per_style must be >= 0, got {test_per_style}")
    seen: set[str] = set()
    train: list[str] = []
    test: list[str] = []
    dropped = 0
    for prompts in styles.values():
        kept = []
        for raw in prompts:
            prompt = clean_prompt(raw)
            if prompt is None:
                dropped += 1
            elif prompt not in seen:
                seen.add(prompt)
                kept.append(prompt)
        held_out = set(sorted(kept, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())[:test_per_style])
        test += [p for p in kept if p in held_out]
        train += [p for p in kept if p not in held_out]
    return train, test, dropped


def write_prompt_files(train: Sequence[str], test: Sequence[str], out: Path) -> tuple[Path, Path]:
    """``out/train_prompts.txt`` and ``out/test_prompts.txt``, one prompt per line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train_prompts.txt", out / "test_prompts.txt"
    for path, prompts in zip(paths, (train, test)):
        path.write_text("".join(f"{p}\n" for p in prompts), encoding="utf-8")
    return paths


def download_style_files() -> dict[str, Path]:
    """The four benchmark files from the hub (huggingface_hub's cache; honours HF_HUB_OFFLINE)."""
    from huggingface_hub import hf_hub_download

    return {style: Path(hf_hub_download(REPO_ID, f"{style}.json", subfolder="benchmark", repo_type="dataset"))
            for style in STYLES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/hpdv2", help="folder for train_prompts.txt and test_prompts.txt")
    parser.add_argument("--from", dest="source", help="read <style>.json from this folder instead of the hub")
    parser.add_argument("--test-per-style", type=int, default=TEST_PER_STYLE,
                        help=f"held-out prompts per style (default {TEST_PER_STYLE})")
    args = parser.parse_args(argv)
    try:
        files = ({style: Path(args.source) / f"{style}.json" for style in STYLES} if args.source
                 else download_style_files())
        styles = {style: read_style_file(path) for style, path in files.items()}
        train, test, dropped = split_prompts(styles, args.test_per_style)
    except Exception as err:  # noqa: BLE001 - a download or file problem: one line, no traceback
        print(f"fetch_hpdv2_prompts: error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
              file=sys.stderr)
        return 1
    train_path, test_path = write_prompt_files(train, test, Path(args.out))
    print(f"wrote {len(train)} prompts to {train_path} and {len(test)} to {test_path} "
          f"({', '.join(f'{s}: {len(p)}' for s, p in styles.items())}; {dropped} empty or '#' prompts dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
