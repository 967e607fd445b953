"""Qwen-Image-Edit: instruction editing with a source image per JSONL row, on tiny random models of the
real architectures (tests/models/test_qwenimage.py's, with a tokenizer for the edit template and
Qwen2.5-VL's vision tokens, and a Qwen2VLProcessor), against ``QwenImageEditPipeline``.

The oracle: at η = 0 our frontier rollout of two rows (different instructions, different source
images of one size) reproduces the pipeline run on each row alone (same noise, its own dynamic-shift
scheduler) — latents and decoded images. The pipeline sees every source at 1024² pixels; here its
``calculate_dimensions`` is given a small area (the adapter's ``condition_area``) so the tiny VAE
encodes 96×64 sources; ``test_condition_size_is_the_pipelines`` pins the two to each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.models.base import spec_sigmas_for_pipeline
from branchgrpo.models.qwenimage_edit import (
    QwenImageEditAdapter,
    QwenImageEditFilesNotFoundError,
    condition_size,
    parse_edit_row,
    read_edit_rows,
)
from branchgrpo.sde import sigma_schedule
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

import test_qwenimage as qwen  # noqa: E402  (tests/models/ is on sys.path)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (  # noqa: E402
    calculate_dimensions as stock_calculate_dimensions,
)
from conformance import (  # noqa: E402
    FamilyCase,
    check_decode,
    check_encode_prompts,
    check_lora_export,
    check_round_trip,
    check_trainer_iteration,
)

EDIT_TEMPLATE = (  # QwenImageEditPipeline.prompt_template_encode
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n")
HEIGHT, WIDTH = qwen.HEIGHT, qwen.WIDTH  # the edited image: 32×48 → 6 packed tokens
AREA = 96 * 64  # condition area: a 3:2 source → 96×64 → 12×8 latent → 24 packed source tokens
SOURCE = (96, 64)
INSTRUCTIONS = ("a photo of a red car on the street", "blue tree")
NEGATIVE, GUIDANCE = qwen.NEGATIVE, qwen.GUIDANCE
SHIFT = qwen.SHIFT  # the pipeline's mu comes from the generated latents' tokens only


def edit_tokenizer():
    return qwen.qwen_tokenizer(EDIT_TEMPLATE, qwen.SPECIAL + qwen.VISION_SPECIAL)


def tiny_components(seed: int = 0) -> dict:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = edit_tokenizer()
    components = qwen.tiny_components(seed=seed, tokenizer=tokenizer)
    components["processor"] = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                               video_processor=Qwen2VLVideoProcessor())
    return components


def make_adapter(components: dict, **kwargs) -> QwenImageEditAdapter:
    kwargs = {"height": HEIGHT, "width": WIDTH, "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE,
              "condition_area": AREA, **kwargs}
    return QwenImageEditAdapter(**components, **kwargs)


def edit_pipeline(components: dict):
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline(scheduler=qwen.pipeline_scheduler(), **components)


@pytest.fixture(autouse=True)
def small_condition_area(monkeypatch):
    """The pipeline's calculate_dimensions(1024 * 1024, ratio) at the adapter's AREA."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: stock_calculate_dimensions(AREA, ratio))


def write_rows(folder: Path, count: int = 3, size: tuple[int, int] = SOURCE, seed: int = 0) -> list[str]:
    """``count`` random source images and their JSONL lines (image paths relative to ``folder``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index in range(count):
        name = f"source_{seed}_{index}.png"
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        prompt = (INSTRUCTIONS + ("red tree",))[index % 3]
        lines.append(json.dumps({"prompt": prompt, "image": name}))
    (folder / "rows.jsonl").write_text("# edit rows\n" + "\n".join(lines) + "\n")
    return lines


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit_rows")
    write_rows(folder)
    return folder


@pytest.fixture(scope="module")
def case(rows_dir):
    rows = read_edit_rows(rows_dir / "rows.jsonl")
    keys = tuple(rows)

    def adapter(components, **kwargs):
        return make_adapter(components, **{"rows": rows, **kwargs})

    def pipeline_embeds(pipe, prompts):
        """As the pipeline's __call__ does it: each source resized to its condition size, ``encode_prompt``
        of the instructions (and of the negative prompt) with their images in one batch, and
        ``prepare_latents``' packed source latents; both texts padded to one length."""
        images, out = [], {}
        for key in prompts:
            image = source_image(rows[key].image)
            width, height, _ = stock_calculate_dimensions(AREA, image.width / image.height)
            images.append(pipe.image_processor.resize(image, height, width))
            pixels = pipe.image_processor.preprocess(images[-1], height, width).unsqueeze(2)
            _, latents = pipe.prepare_latents(pixels, 1, 16, HEIGHT, WIDTH, torch.float32, torch.device("cpu"), None)
            out.setdefault("image_latents", []).append(latents[0])
            out.setdefault("image_latent_shape", []).append(torch.tensor([height // 16, width // 16]).float())
        out = {key: torch.stack(values) for key, values in out.items()}
        texts = {"": [rows[key].prompt for key in prompts], "negative_": [NEGATIVE] * len(prompts)}
        for prefix, batch in texts.items():
            embeds, mask = pipe.encode_prompt(batch, image=images)
            out[f"{prefix}prompt_embeds"] = embeds
            out[f"{prefix}prompt_embeds_mask"] = (torch.ones(embeds.shape[:2]) if mask is None else mask).float()
        length = max(out["prompt_embeds"].shape[1], out["negative_prompt_embeds"].shape[1])
        for key in [k for k in out if "prompt_embeds" in k]:
            value = out[key]
            out[key] = torch.nn.functional.pad(value, [0, 0] * (value.ndim - 2) + [0, length - value.shape[1]])
        return out

    return FamilyCase(
        name="qwenimage-edit", components=lambda seed: tiny_components(seed), adapter=adapter, pipeline=edit_pipeline,
        call={}, pipeline_embeds=pipeline_embeds, output_shape=(3, HEIGHT, WIDTH), prompts=keys, shift=SHIFT,
        decode_atol=2e-6, adapter_guidance_off={"guidance_scale": 1.0},
        load=lambda folder, cache_dir: QwenImageEditAdapter.from_pretrained(
            folder, dtype=torch.float32, text_encoders="lazy", height=HEIGHT, width=WIDTH, guidance_scale=GUIDANCE,
            negative_prompt=NEGATIVE, condition_area=AREA, prompt_cache_dir=cache_dir, rows=rows),
    )


def source_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


# -- the oracle -----------------------------------------------------------------------------------


def pipeline_rows(components, rows, noise, output_type, **overrides):
    """``QwenImageEditPipeline`` on each row alone (its instruction and source), from our noise."""
    pipe = edit_pipeline(components)
    call = dict(negative_prompt=NEGATIVE, true_cfg_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
                num_inference_steps=4, sigmas=spec_sigmas_for_pipeline(4))
    call.update(overrides)
    outputs = [pipe(prompt=row.prompt, image=source_image(row.image), latents=noise[i : i + 1].clone(),
                    output_type=output_type, **call).images for i, row in enumerate(rows)]
    return torch.cat(outputs), pipe.scheduler.sigmas


@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0])
def test_ode_rollout_reproduces_the_edit_pipeline_row_by_row(case, guidance):
    components = tiny_components(seed=1)
    adapter = case.adapter(components, guidance_scale=guidance)
    keys = list(case.prompts[:2])
    conditioning = adapter.encode_prompts(keys)
    assert conditioning["image_latents"].shape == (2, 24, 64)
    assert conditioning["image_latent_shape"].tolist() == [[4, 6], [4, 6]]  # 64/16 × 96/16
    spec = TreeSpec(steps=4, shift=SHIFT, eta=0.0, split_plan={})
    tree = rollout(adapter.velocity_model(), conditioning, spec, num_prompts=2, latent_shape=adapter.latent_shape(),
                   generator=torch.Generator().manual_seed(0), micro_batch=2)
    rows = [adapter.row(key) for key in keys]
    noise = tree.latents[0]
    expected, sigmas = pipeline_rows(components, rows, noise, "latent", true_cfg_scale=guidance)
    eps = float(torch.finfo(torch.float32).eps)
    torch.testing.assert_close(sigmas, sigma_schedule(4, SHIFT).float(), rtol=0, atol=eps)
    images, _ = pipeline_rows(components, rows, noise, "pt", true_cfg_scale=guidance)
    decoded = adapter.decode(tree.leaf_x0)
    diffs = {"latent": (tree.latents[-1] - expected).abs().max().item(),
             "x0": (tree.leaf_x0 - expected).abs().max().item(),
             "decoded": (decoded - images).abs().max().item()}
    print(f"qwenimage-edit guidance={guidance}: " + " ".join(f"max|Δ{k}|={v:.2e}" for k, v in diffs.items())
          + f" (latent scale {expected.abs().max():.2f})")
    assert max(diffs.values()) <= 1e-5, diffs
    assert expected.abs().max() > 0.1 and ((decoded > 0.01) & (decoded < 0.99)).float().mean() > 0.5
    # the source image is part of what was compared: another source, another edit
    other = adapter.encode_prompts(keys[::-1])
    swapped = {k: (v if k.startswith(("prompt_embeds", "negative_")) else other[k]) for k, v in conditioning.items()}
    velocity = adapter.velocity_model()
    x, sigma = noise, torch.full((2,), 0.6)
    moved = (velocity(x, sigma, swapped) - velocity(x, sigma, conditioning)).abs().max().item()
    assert moved > 100 * max(*diffs.values(), 1e-7), moved


def test_condition_size_is_the_pipelines():
    for width, height in [(1024, 1024), (1664, 928), (640, 480), (333, 1000), (96, 64)]:
        for area in (1024 * 1024, AREA):
            ours = condition_size(width, height, area)
            theirs = stock_calculate_dimensions(area, width / height)[:2]
            assert ours == theirs, (width, height, area)
    assert condition_size(1664, 928) == (1376, 768) and condition_size(500, 500) == (1024, 1024)


# -- the generic checks that fit an edit family ------------------------------------------------------


def test_encode_prompts_equals_pipeline_encode_prompt(case):
    check_encode_prompts(case, tiny_components(seed=0))


def test_decode_is_batched_and_in_unit_range(case):
    check_decode(case, tiny_components(seed=0))


def test_exported_lora_loads_in_the_edit_pipeline(case, tmp_path):
    pytest.importorskip("peft")
    check_lora_export(case, tmp_path)


def test_one_branchgrpo_iteration_through_the_trainer(case, tmp_path):
    check_trainer_iteration(case, tmp_path)


def test_from_pretrained_round_trip_with_lazy_text_encoder(case, tmp_path):
    check_round_trip(case, tiny_components(seed=0), tmp_path)


# -- rows, sources, the cache ---------------------------------------------------------------------


def test_rows_parse_and_errors_name_the_line(tmp_path):
    lines = write_rows(tmp_path)
    rows = read_edit_rows(tmp_path / "rows.jsonl")
    assert list(rows) == lines and rows[lines[0]].image == tmp_path / "source_0_0.png"
    assert parse_edit_row('{"prompt": "x", "image": "/abs/a.png"}').image == Path("/abs/a.png")
    bad = tmp_path / "bad.jsonl"
    for text, message in [("not json\n", "line 1: not a JSON object"),
                          (lines[0] + '\n["a"]\n', "line 2: expected a JSON object"),
                          ('{"prompt": "", "image": "a.png"}\n', '"prompt" must be a non-empty string'),
                          ('{"prompt": "x"}\n', '"image" must be the path'),
                          ('{"prompt": "x", "image": "missing.png"}\n', "missing.png does not exist")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match="data.train_prompts") as info:
            read_edit_rows(bad)
        assert message in str(info.value) and str(bad) in str(info.value)


def test_conditioning_per_row_and_sources_of_other_sizes_are_refused(case, rows_dir, tmp_path):
    adapter = case.adapter(tiny_components(seed=0))
    keys = list(case.prompts)
    cond = adapter.encode_prompts(keys)
    assert {k for k in cond} == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                                 "negative_prompt_embeds_mask", "image_latents", "image_latent_shape"}
    # the negative prompt is encoded with each row's image: the rows differ
    assert (cond["negative_prompt_embeds"][0] - cond["negative_prompt_embeds"][1]).abs().max() > 1e-3
    # a row given as a JSON line with an absolute path is the same row
    row = adapter.row(keys[0])
    inline = json.dumps({"prompt": row.prompt, "image": str(row.image)})
    fresh = make_adapter(tiny_components(seed=0)).encode_prompts([inline])
    for key, value in fresh.items():
        torch.testing.assert_close(value, cond[key][:1, : value.shape[1]], rtol=0, atol=1e-6)
    square = write_rows(tmp_path, count=1, size=(64, 64), seed=5)[0]
    other = json.dumps({"prompt": "red car", "image": str(tmp_path / json.loads(square)["image"])})
    with pytest.raises(ValueError, match="one aspect ratio"):
        adapter.encode_prompts([keys[0], other])
    with pytest.raises(ValueError, match="not an edit row"):
        adapter.encode_prompts(["a photo of a cat"])


def test_prompt_cache_keys_rows_by_instruction_and_image_content(case, tmp_path):
    components = tiny_components(seed=0)
    encoder = case.adapter(components)
    keys = list(case.prompts)
    report = encoder.preprocess_prompts(keys, tmp_path, batch_size=2)
    assert (report.unique_prompts, report.encoded) == (6, 6)  # 3 instructions + the negative, with 3 images
    assert encoder.preprocess_prompts(keys, tmp_path).encoded == 0
    trainer_side = case.adapter({**components, "text_encoder": None}, prompt_cache_dir=tmp_path,
                                encoder_config=encoder.encoder_config)
    cached, direct = trainer_side.encode_prompts(keys), encoder.encode_prompts(keys)
    for key in direct:
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=1e-6)
    assert trainer_side.text_encoder is None
    other_area = case.adapter(components, condition_area=2 * AREA)
    assert other_area.encoder_identity != encoder.encoder_identity


# -- the family -------------------------------------------------------------------------------------


def test_family_options_check_and_config(rows_dir, tmp_path):
    from branchgrpo.families import get_family
    from branchgrpo.train.config import load_train_config

    family = get_family("qwenimage-edit")
    config = load_train_config(None, "branchgrpo", ["model.family=qwenimage-edit",
                                                    f"data.train_prompts={rows_dir / 'rows.jsonl'}"])
    opts = family.options(config)
    assert (opts.height, opts.width, opts.condition_area, opts.guidance_scale, opts.negative_prompt) == (
        1024, 1024, 1048576, 4.0, " ")
    assert not [p for p in family.check(config) if p.field.startswith("data.")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "image": "nowhere.png"}\n')
    config.data.train_prompts = str(tmp_path / "bad.jsonl")
    problems = family.check(config)
    assert any(p.field == "data.train_prompts" and "nowhere.png" in str(p) for p in problems)
    with pytest.raises(ConfigError, match=r"model\.options\.condition_area"):
        load_train_config(None, "branchgrpo", ["model.family=qwenimage-edit", "model.options.condition_area=10"])
    root = Path(__file__).resolve().parents[2]
    shipped = load_train_config(root / "configs" / "qwenimage-edit-branchgrpo.yaml", None, [])
    assert shipped.model.family == "qwenimage-edit" and shipped.method.tree.steps == 20
    assert shipped.data.train_prompts.endswith(".jsonl")


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(QwenImageEditFilesNotFoundError) as info:
        QwenImageEditAdapter.from_pretrained(tmp_path / "edit", dtype=torch.float32)
    message = str(info.value)
    assert "Qwen-Image-Edit weights not found" in message and "hf download Qwen/Qwen-Image-Edit" in message
    assert "processor/" in message


def test_guidance_off_needs_no_negative_rows(case):
    plain = case.adapter(tiny_components(seed=0), guidance_scale=1.0)
    cond = plain.encode_prompts(list(case.prompts[:1]))
    assert not [k for k in cond if k.startswith("negative_")]


def test_preprocess_and_build_from_a_jsonl_config(tmp_path, capsys):
    """`branchgrpo preprocess` on a JSONL edit file; the bundle training builds from the same config knows
    every row's source, serves the texts from the cache without the text encoder, and its conditioning
    equals the in-memory adapter's."""
    from branchgrpo.cli import main
    from branchgrpo.train.components import build_policy
    from branchgrpo.train.config import load_train_config

    from conformance import save_layout

    components = tiny_components(seed=2)
    folder = tmp_path / "edit"
    save_layout(components, folder)
    lines = write_rows(tmp_path / "data", count=2)
    config_file = tmp_path / "edit.yaml"
    config_file.write_text(f"""\
model:
  family: qwenimage-edit
  path: {folder}
  options: {{height: {HEIGHT}, width: {WIDTH}, condition_area: {AREA}, guidance_scale: {GUIDANCE},
             negative_prompt: '{NEGATIVE}'}}
  prompt_cache_dir: {tmp_path / 'cache'}
data:
  train_prompts: {tmp_path / 'data' / 'rows.jsonl'}
  heldout_prompts: {tmp_path / 'data' / 'rows.jsonl'}
run:
  device: cpu
  output_dir: {tmp_path / 'run'}
""")
    assert main(["preprocess", "--config", str(config_file)]) == 0, capsys.readouterr().err
    assert "encoded=4" in capsys.readouterr().out  # 2 instructions + the negative prompt, each with its image
    bundle = build_policy(load_train_config(config_file, None, []), torch.device("cpu"))
    assert bundle.train_prompts == lines and bundle.adapter.text_encoder is None
    cached = bundle.encode_prompts(bundle.train_prompts)
    assert bundle.adapter.text_encoder is None, "a cache miss loaded the text encoder"
    rows = read_edit_rows(tmp_path / "data" / "rows.jsonl")
    direct = make_adapter(components, rows=rows).encode_prompts(lines)
    assert set(cached) == set(direct)
    for key in direct:
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=1e-6)
