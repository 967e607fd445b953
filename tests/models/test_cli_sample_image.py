"""`branchgrpo sample --image`: edits of one source image for the editing families, on tiny saved
FLUX.1 Kontext and Qwen-Image-Edit folders (tests/models/test_flux_kontext.py's and
test_qwenimage_edit.py's builders), and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from branchgrpo.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

import test_flux_kontext as kontext  # noqa: E402  (tests/models/ is on sys.path)
import test_qwenimage_edit as qwen_edit  # noqa: E402
from conformance import save_layout  # noqa: E402


@pytest.fixture(scope="module")
def kontext_config(tmp_path_factory):
    """A flux-kontext config on a tiny saved folder (sources at their own size: auto_resize off), 4 steps."""
    root = tmp_path_factory.mktemp("kontext_cli")
    save_layout(kontext.tiny_components(seed=2), root / "kontext")
    kontext.write_rows(root / "data", sizes=kontext.SOURCES[:2])
    config = root / "kontext.yaml"
    config.write_text(f"""\
model:
  family: flux-kontext
  path: {root / 'kontext'}
  options: {{height: 16, width: 32, embedded_guidance: 2.5, max_sequence_length: {kontext.MAX_SEQ}, auto_resize: false}}
data:
  train_prompts: {root / 'data' / 'rows.jsonl'}
  heldout_prompts: {root / 'data' / 'rows.jsonl'}
method:
  tree: {{steps: 4, split_plan: {{0: 2, 2: 2}}}}
run:
  device: cpu
  output_dir: {root / 'run'}
""")
    return config, root


def grid(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_sample_image_edits_one_source_per_instruction(kontext_config, tmp_path, capsys):
    config, root = kontext_config
    sources = [root / "data" / "source_0_0.png", root / "data" / "source_0_1.png"]  # 30×21 and 22×23 pixels
    outputs = []
    for index, source in enumerate(sources):
        out = tmp_path / f"edits_{index}.png"
        code = main(["sample", "--config", str(config), "--image", str(source), "--prompt", "a dog",
                     "--prompt", "blue tree", "--num", "2", "--eta", "0", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        assert f"wrote 4 images (2 prompts x 2) to {out}" in capsys.readouterr().out
        outputs.append(grid(out))
    assert outputs[0].shape == outputs[1].shape and outputs[0].shape[-1] == 3
    # same instructions, seed and noise: only the source differs, and the edits follow it
    # (the tiny random transformer's source tokens move ~6 % of the 8-bit grid's pixels by a level)
    assert (outputs[0] != outputs[1]).mean() > 0.01
    # --image is the edit rows written out: the same grid from the JSON rows given as prompts
    rows = [json.dumps({"prompt": text, "image": str(sources[0].resolve())}) for text in ("a dog", "blue tree")]
    again = tmp_path / "rows.png"
    assert main(["sample", "--config", str(config), "--prompt", rows[0], "--prompt", rows[1], "--num", "2",
                 "--eta", "0", "--out", str(again)]) == 0
    assert np.array_equal(grid(again), outputs[0])


def test_sample_image_rows_are_the_adapters_edit_rows(kontext_config):
    """What --image hands the sampler: one JSON row per instruction with the source's absolute path."""
    import argparse

    from branchgrpo.cli import _edit_rows

    config, root = kontext_config
    source = root / "data" / "source_0_0.png"
    args = argparse.Namespace(config=str(config), run=None, preset=None, overrides=[], image=str(source),
                              prompt=["a dog", "blue tree"])
    rows = [json.loads(line) for line in _edit_rows(args)]
    assert rows == [{"prompt": "a dog", "image": str(source.resolve())},
                    {"prompt": "blue tree", "image": str(source.resolve())}]


@pytest.mark.parametrize("case", ["missing", "folder", "not_an_image", "no_prompt", "not_editing"])
def test_sample_image_errors_are_one_line(kontext_config, tmp_path, capsys, case):
    config, root = kontext_config
    source = root / "data" / "source_0_0.png"
    args = ["sample", "--config", str(config), "--image", str(source), "--prompt", "a dog",
            "--out", str(tmp_path / "x.png")]
    expected = {"missing": "--image: {p} does not exist; expected an image file",
                "folder": "--image: {p} is a folder; expected an image file",
                "not_an_image": "--image: cannot read {p} as an image (UnidentifiedImageError)",
                "no_prompt": "--image needs --prompt INSTRUCTION (repeatable): the edit to make",
                "not_editing": "--image: the digits family does not edit images; --image is for the editing "
                               "families (flux-kontext, qwenimage-edit)"}[case]
    path = source
    if case == "missing":
        path = tmp_path / "nowhere.png"
    elif case == "folder":
        path = tmp_path
    elif case == "not_an_image":
        path = tmp_path / "text.png"
        path.write_text("not a picture")
    args[args.index("--image") + 1] = str(path)
    if case == "no_prompt":
        args = [a for a in args if a not in ("--prompt", "a dog")]
    if case == "not_editing":
        args = ["sample", "--image", str(source), "--prompt", "a handwritten 3", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"branchgrpo: error: {expected.format(p=path)}\n"
    assert not (tmp_path / "x.png").exists()


def test_sample_image_edits_with_qwenimage_edit(tmp_path, capsys):
    """The same command on a tiny Qwen-Image-Edit folder (true CFG 4 with the negative prompt): one grid
    per source; another source moves the edits; the JSON rows as prompts give the same grid."""
    save_layout(qwen_edit.tiny_components(seed=2), tmp_path / "edit")
    qwen_edit.write_rows(tmp_path / "data", count=2)
    config = tmp_path / "edit.yaml"
    config.write_text(f"""\
model:
  family: qwenimage-edit
  path: {tmp_path / 'edit'}
  options: {{height: {qwen_edit.HEIGHT}, width: {qwen_edit.WIDTH}, condition_area: {qwen_edit.AREA},
             guidance_scale: {qwen_edit.GUIDANCE}, negative_prompt: '{qwen_edit.NEGATIVE}'}}
data:
  train_prompts: {tmp_path / 'data' / 'rows.jsonl'}
  heldout_prompts: {tmp_path / 'data' / 'rows.jsonl'}
method:
  tree: {{steps: 4, split_plan: {{0: 2, 2: 2}}}}
run:
  device: cpu
  output_dir: {tmp_path / 'run'}
""")
    sources = [tmp_path / "data" / "source_0_0.png", tmp_path / "data" / "source_0_1.png"]
    outputs = []
    for index, source in enumerate(sources):
        out = tmp_path / f"edits_{index}.png"
        code = main(["sample", "--config", str(config), "--image", str(source), "--prompt", "blue tree",
                     "--num", "2", "--eta", "0", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        assert f"wrote 2 images (1 prompts x 2) to {out}" in capsys.readouterr().out
        outputs.append(grid(out))
    assert outputs[0].shape == outputs[1].shape and outputs[0].shape[-1] == 3
    assert (outputs[0] != outputs[1]).mean() > 0.01
    row = json.dumps({"prompt": "blue tree", "image": str(sources[0].resolve())})
    again = tmp_path / "rows.png"
    assert main(["sample", "--config", str(config), "--prompt", row, "--num", "2", "--eta", "0",
                 "--out", str(again)]) == 0
    assert np.array_equal(grid(again), outputs[0])
