"""Stand-ins for what the shipped configs (configs/*.yaml) read from disk, and the overrides that
make a config tiny without changing what it is.

For every model family a config names, :data:`STANDINS` says how to write a folder laid out like the
real download (the diffusers pipeline's own ``save_pretrained``: ``model_index.json``, ``scheduler/``,
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ...) with the tiny random components of
that family's model tests (tests/models/test_<family>.py), and which ``model.options`` fit those
components. :func:`write_standins` writes the folders and prompt files at the paths the configs name
(relative to a work folder that stands for the repository root), :func:`tiny_overrides` lists the
``key=value`` overrides a user could pass on the command line, and :func:`header_launch` reads the
process count a config's header launches it with.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# The configs' rewards need checkpoints or servers that are not here: launches score with these
# checkpoint-free rewards (mean brightness), registered by the module named in ``imports``.
REWARD_MODULE = "standin_rewards"
STANDIN_REWARD = {"image": "standin_brightness", "video": "standin_video_brightness"}

# Prompts every stand-in tokenizer spells with its own words (tests/models: WORDS of each family).
PROMPTS = ("a photo of a cat", "red car on the street", "blue tree")


def _models_on_path() -> None:
    models = str(TESTS / "models")
    if models not in sys.path:
        sys.path.insert(0, models)


@dataclass(frozen=True)
class Standin:
    """How to fake one family's download: ``write(folder)`` saves tiny random components as the
    pipeline lays them out; ``options`` are the ``model.options`` those components are built for."""

    write: Callable[[Path], None]
    options: dict = field(default_factory=dict)


def _save(module: str, components: str, pipeline: str, **kwargs) -> Callable[[Path], None]:
    """``<pipeline>(<components>(**kwargs)).save_pretrained(folder)`` from tests/models/<module>.py."""

    def write(folder: Path) -> None:
        _models_on_path()
        tests = __import__(module)
        pipe = getattr(tests, pipeline)(getattr(tests, components)(**kwargs))
        pipe.save_pretrained(str(folder), safe_serialization=True)

    return write


STANDINS: dict[str, Standin] = {
    "flux": Standin(_save("test_flux", "tiny_components", "flux_pipeline", guidance=True),  # FLUX.1-dev embeds guidance
                    {"height": 16, "width": 16, "max_sequence_length": 10}),
    "flux-kontext": Standin(_save("test_flux_kontext", "tiny_components", "kontext_pipeline"),
                            {"height": 16, "width": 16, "max_sequence_length": 10, "auto_resize": False}),
    "flux2": Standin(_save("test_flux2", "tiny_components", "flux2_pipeline"),
                     {"height": 16, "width": 16, "max_sequence_length": 48}),
    "hunyuanvideo15": Standin(_save("test_hunyuanvideo15", "tiny_components", "hv15_pipeline"),
                              {"height": 32, "width": 48, "num_frames": 5, "max_sequence_length": 64,
                               "glyph_max_length": 16}),
    "qwenimage": Standin(_save("test_qwenimage", "tiny_components", "qwen_pipeline"),
                         {"height": 32, "width": 48, "max_sequence_length": 12}),
    "qwenimage-edit": Standin(_save("test_qwenimage_edit", "tiny_components", "edit_pipeline"),
                              {"height": 32, "width": 48, "condition_area": 96 * 64}),
    "sd3": Standin(_save("test_sd3", "tiny_components", "sd3_pipeline"),
                   {"height": 16, "width": 16, "max_sequence_length": 10}),
    "wan": Standin(_save("test_wan", "tiny_components", "wan_pipeline"),
                   {"height": 32, "width": 48, "num_frames": 5, "max_sequence_length": 10}),
    "wan22/t2v-a14b": Standin(_save("test_wan22", "tiny_components", "wan22_pipeline"),
                              {"height": 32, "width": 48, "num_frames": 5, "max_sequence_length": 10}),
    "wan22/ti2v-5b": Standin(_save("test_wan22", "tiny_components_5b", "wan22_pipeline"),
                             {"height": 64, "width": 96, "num_frames": 5, "max_sequence_length": 10}),
    "zimage": Standin(_save("test_zimage", "tiny_components", "zimage_pipeline"),
                      {"height": 32, "width": 48, "max_sequence_length": 48}),
}


def standin_key(config) -> str | None:
    """The :data:`STANDINS` key of a loaded config (None: the family ships its weights, e.g. digits)."""
    family = config.model.family
    if family == "wan22":
        return f"wan22/{config.model.options['variant']}"
    if family in ("digits", "shapes"):  # embedded worlds ship their weights
        return None
    if family not in STANDINS:
        raise KeyError(f"no stand-in for model.family={family}: add one to tests/train/standins.py")
    return family


@dataclass(frozen=True)
class Launch:
    """What a config's header says to run: ``processes`` for ``branchgrpo train`` (torchrun's
    ``--nproc-per-node``, 1 without torchrun) and whether ``branchgrpo preprocess`` comes first."""

    processes: int
    preprocess: bool


def header_launch(path: Path) -> Launch:
    """Read the launch command from the comment lines that open ``path``."""
    header = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    train = [line for line in header if "branchgrpo train" in line]
    if not train:
        raise ValueError(f"{path}: its header names no `branchgrpo train` command")
    counts = {int(m) for line in train for m in re.findall(r"--nproc[-_]per[-_]node[ =](\d+)", line)}
    if len(counts) > 1:
        raise ValueError(f"{path}: its header launches with several process counts {sorted(counts)}")
    return Launch(counts.pop() if counts else 1, any("branchgrpo preprocess" in line for line in header))


def tiny_overrides(path: Path) -> list[str]:
    """``key=value`` overrides that shrink the config at ``path`` to tiny stand-in sizes: the family's
    stand-in options, a 3-step tree (two binary splits, or two independent roots for a flat group),
    one prompt per process, one held-out sample, one iteration with a checkpoint, and the stand-in
    reward. Everything else (preset, parallel mode, LoRA, gradient checkpointing, dtype, learning
    rates, KL, paths) is the config's own."""
    from branchgrpo.families import get_family
    from branchgrpo.train.config import load_train_config

    config = load_train_config(path)
    key = standin_key(config)
    out = [f"model.options.{name}={value}" for name, value in (STANDINS[key].options if key else {}).items()]
    tree = config.method.tree
    out += ["method.tree.steps=3"]
    out += ["method.tree.split_plan={0: 2, 1: 2}"] if tree.split_plan else ["method.tree.roots_per_prompt=2"]
    out += ["data.prompts_per_process=1", "eval.samples_per_prompt=1", "eval.max_prompts=1",
            "run.iterations=1", "run.checkpoint_every=1", "run.progress=false"]
    # digits keeps its own reward (no checkpoint, continuous scores); the shapes verifier scores a 3-step
    # tree's blobs in ties (zero advantages: nothing to train), so it gets the stand-in like the rest
    if config.reward.name != "digits":
        modality = get_family(config.model.family).modality
        out += [f"imports=[{REWARD_MODULE}]", f"reward.name={STANDIN_REWARD[modality]}"]
    return out


def _write_prompts(path: Path, edit_rows: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not edit_rows:
        path.write_text("\n".join(PROMPTS) + "\n")
        return
    _models_on_path()
    from test_qwenimage_edit import write_rows  # 96x64 source images beside the rows

    rows = write_rows(path.parent, seed=len(path.stem))
    (path.parent / "rows.jsonl").unlink()
    path.write_text("\n".join(rows) + "\n")


def write_standins(root: Path, configs: list[Path] = CONFIGS) -> None:
    """Under ``root``: every stand-in model folder and prompt file that ``configs`` name (by their
    relative paths, as if ``root`` were the repository), each written once."""
    from branchgrpo.train.config import load_train_config

    for path in configs:
        config = load_train_config(path)
        key = standin_key(config)
        if key is not None and not (root / config.model.path).exists():
            STANDINS[key].write(root / config.model.path)
        for prompts in (config.data.train_prompts, config.data.heldout_prompts):
            if prompts is not None and not (root / prompts).exists():
                _write_prompts(root / prompts, edit_rows=prompts.endswith(".jsonl"))
