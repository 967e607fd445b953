"""FLUX.1 Kontext: instruction editing with a source image per JSONL row, on tiny random models of the
real architectures (tests/models/test_flux.py's, guidance embedding on), against ``FluxKontextPipeline``.

The oracle: at η = 0 our frontier rollout of three rows (different instructions, source images of
three sizes, so one micro-batch mixes source grids and token counts) reproduces the pipeline run on
each row alone (same noise, same σ grid) — latents and decoded images. The pipeline resizes every
source to the nearest of its ``PREFERRED_KONTEXT_RESOLUTIONS`` (~1 MP); here that list is replaced by
small sizes (the adapter's ``resolutions``) so the tiny VAE encodes 16–24 px sources;
``test_condition_size_is_the_pipelines`` pins the size rule to the pipeline with its own list.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from branchgrpo.config import ConfigError
from branchgrpo.models.base import spec_sigmas_for_pipeline
from branchgrpo.models.flux_kontext import (
    KONTEXT_GUIDANCE,
    FluxKontextAdapter,
    FluxKontextFilesNotFoundError,
    kontext_condition_size,
    source_image_ids,
)
from branchgrpo.models.prompt_cache import PromptNotCachedError
from branchgrpo.models.qwenimage_edit import read_edit_rows
from branchgrpo.rewards.base import as_reward
from branchgrpo.sde import sigma_schedule
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

import test_flux as flux  # noqa: E402  (tests/models/ is on sys.path)
from diffusers.pipelines.flux import pipeline_flux_kontext  # noqa: E402
from conformance import (  # noqa: E402
    FamilyCase,
    check_decode,
    check_encode_prompts,
    check_lora_export,
    check_round_trip,
    check_trainer_iteration,
)

HEIGHT, WIDTH = 16, 24  # the edited image: tiny VAE factor 2 → 8×12 latent → 24 packed tokens
RESOLUTIONS = [(24, 16), (20, 20), (16, 24)]  # (width, height), standing in for PREFERRED_KONTEXT_RESOLUTIONS
# sources (width, height) → resized to (24, 16): 24 tokens; (20, 20): 25 tokens; (16, 24): 24 tokens
SOURCES = [(30, 21), (22, 23), (17, 26)]
INSTRUCTIONS = ("a photo of a red car", "blue tree on the street", "a dog")
MAX_SEQ, SHIFT, STEPS = flux.MAX_SEQ, 3.0, 4
GUIDANCE = 4.0  # the embedded guidance (any value; the family's default is KONTEXT_GUIDANCE)
STOCK_RESOLUTIONS = list(pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS)  # read before the fixture patches


def tiny_components(seed: int = 0) -> dict:
    return flux.tiny_components(guidance=True, seed=seed)


def make_adapter(components: dict, **kwargs) -> FluxKontextAdapter:
    kwargs = {"height": HEIGHT, "width": WIDTH, "guidance_scale": GUIDANCE, "max_sequence_length": MAX_SEQ,
              "resolutions": RESOLUTIONS, **kwargs}
    return FluxKontextAdapter(**components, **kwargs)


def kontext_pipeline(components: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT, use_dynamic_shifting=False)
    return FluxKontextPipeline(scheduler=scheduler, **components)


@pytest.fixture(scope="module", autouse=True)
def small_preferred_resolutions():
    """The pipeline picks among RESOLUTIONS, as the adapter is told to (module scope: before the
    module-scoped oracle runs; tests that change the list restore it)."""
    from diffusers.pipelines.flux import pipeline_flux_kontext as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "PREFERRED_KONTEXT_RESOLUTIONS", list(RESOLUTIONS))
        yield


def write_rows(folder: Path, sizes=SOURCES, seed: int = 0) -> list[str]:
    """Random source images of ``sizes`` and their JSONL lines (image paths relative to ``folder``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for index, (width, height) in enumerate(sizes):
        name = f"source_{seed}_{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(folder / name)
        lines.append(json.dumps({"prompt": INSTRUCTIONS[index % len(INSTRUCTIONS)], "image": name}))
    (folder / "rows.jsonl").write_text("# edit rows\n" + "\n".join(lines) + "\n")
    return lines


def source_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def pipeline_call(pipe, row, noise: torch.Tensor | None, output_type: str, **overrides):
    """``FluxKontextPipeline`` on one row (its instruction and source), from our noise, on our σ grid."""
    call = dict(height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH, guidance_scale=GUIDANCE,
                num_inference_steps=STEPS, sigmas=spec_sigmas_for_pipeline(STEPS), max_sequence_length=MAX_SEQ)
    call.update(overrides)
    return pipe(prompt=row.prompt, image=source_image(row.image), latents=noise, output_type=output_type,
                **call).images


def pipeline_source_tokens(pipe, row) -> tuple[torch.Tensor, torch.Tensor]:
    """What the pipeline's own ``prepare_latents`` makes of a row's source: packed latents ``[M, 4C]``
    and their position ids ``[M, 3]`` (a 1-step call, recorded)."""
    seen = {}
    original = pipe.prepare_latents

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["latents"], seen["ids"] = out[1], out[3]
        return out

    pipe.prepare_latents = record
    try:
        pipeline_call(pipe, row, None, "latent", num_inference_steps=1, sigmas=None)
    finally:
        del pipe.prepare_latents
    return seen["latents"][0], seen["ids"]


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kontext_rows")
    write_rows(folder)
    return folder


def consistency_reward(rows: dict, seen: list):
    """A reward that sees each row's source: 1 − mean |edit − source| (source resized to the edit's size)."""
    import torch.nn.functional as F

    def consistency(images: torch.Tensor, prompts) -> torch.Tensor:
        scores = []
        for image, prompt in zip(images, prompts):
            source = torch.from_numpy(np.asarray(source_image(rows[prompt].image), dtype=np.float32) / 255.0)
            source = F.interpolate(source.permute(2, 0, 1)[None], size=image.shape[-2:], mode="bilinear")[0]
            scores.append(1.0 - (image.float().cpu() - source).abs().mean())
            seen.append(prompt)
        return torch.stack(scores)

    return as_reward(consistency, modality="image")


@pytest.fixture(scope="module")
def case(rows_dir):
    rows = read_edit_rows(rows_dir / "rows.jsonl")
    keys = tuple(rows)
    seen: list[str] = []

    def adapter(components, **kwargs):
        return make_adapter(components, **{"rows": rows, **kwargs})

    def pipeline_embeds(pipe, prompts):
        """The pipeline's ``encode_prompt`` of the instructions, and per row its recorded source tokens
        (padded to the longest) with the source latent size read off their position ids."""
        embeds, pooled, _ = pipe.encode_prompt([rows[key].prompt for key in prompts], max_sequence_length=MAX_SEQ)
        tokens, sizes = [], []
        for key in prompts:
            latents, ids = pipeline_source_tokens(pipe, rows[key])
            assert bool((ids[:, 0] == 1).all())
            tokens.append(latents)
            sizes.append([2 * (ids[:, 1].max() + 1), 2 * (ids[:, 2].max() + 1)])
        longest = max(t.shape[0] for t in tokens)
        padded = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[0])) for t in tokens])
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "image_latents": padded,
                "image_latent_shape": torch.tensor(sizes, dtype=torch.float32)}

    return FamilyCase(
        name="flux-kontext", components=tiny_components, adapter=adapter, pipeline=kontext_pipeline, call={},
        pipeline_embeds=pipeline_embeds, output_shape=(3, HEIGHT, WIDTH), prompts=keys, shift=SHIFT,
        reward=lambda: consistency_reward(rows, seen), extra={"rows": rows, "seen": seen},
        load=lambda folder, cache_dir: FluxKontextAdapter.from_pretrained(
            folder, dtype=torch.float32, text_encoders="lazy", height=HEIGHT, width=WIDTH, guidance_scale=GUIDANCE,
            max_sequence_length=MAX_SEQ, resolutions=RESOLUTIONS, prompt_cache_dir=cache_dir, rows=rows),
    )


# -- the oracle -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(case):
    """Our ODE rollout of the three rows (one micro-batch: three source sizes) and the pipeline per row."""
    components = tiny_components(seed=1)
    adapter = case.adapter(components)
    keys = list(case.prompts)
    conditioning = adapter.encode_prompts(keys)
    spec = TreeSpec(steps=STEPS, shift=SHIFT, eta=0.0, split_plan={})
    trees = {micro: rollout(adapter.velocity_model(), conditioning, spec, num_prompts=3,
                            latent_shape=adapter.latent_shape(), generator=torch.Generator().manual_seed(0),
                            micro_batch=micro) for micro in (3, 1)}
    noise = trees[3].latents[0]
    pipe = kontext_pipeline(components)
    rows = [adapter.row(key) for key in keys]
    expected = {output: torch.cat([pipeline_call(pipe, row, noise[i : i + 1].clone(), output)
                                   for i, row in enumerate(rows)]) for output in ("latent", "pt")}
    unguided = torch.cat([pipeline_call(pipe, row, noise[i : i + 1].clone(), "latent", guidance_scale=1.0)
                          for i, row in enumerate(rows)])
    return dict(adapter=adapter, conditioning=conditioning, trees=trees, noise=noise, expected=expected,
                unguided=unguided, sigmas=pipe.scheduler.sigmas.clone())


@pytest.mark.parametrize("micro_batch", [3, 1])
def test_ode_rollout_reproduces_the_kontext_pipeline_row_by_row(oracle, micro_batch):
    tree, adapter = oracle["trees"][micro_batch], oracle["adapter"]
    conditioning = oracle["conditioning"]
    assert conditioning["image_latents"].shape == (3, 25, 16)  # padded to the square source's 5×5 tokens
    assert conditioning["image_latent_shape"].tolist() == [[8, 12], [10, 10], [12, 8]]
    assert torch.equal(tree.latents[0], oracle["noise"])
    eps = float(torch.finfo(torch.float32).eps)
    torch.testing.assert_close(oracle["sigmas"], sigma_schedule(STEPS, SHIFT).float(), rtol=0, atol=eps)
    latents, images = oracle["expected"]["latent"], oracle["expected"]["pt"]
    decoded = adapter.decode(tree.leaf_x0)
    diffs = {"latent": (tree.latents[-1] - latents).abs().max().item(),
             "x0": (tree.leaf_x0 - latents).abs().max().item(),
             "decoded": (decoded - images).abs().max().item()}
    print(f"flux-kontext micro_batch={micro_batch}: " + " ".join(f"max|Δ{k}|={v:.2e}" for k, v in diffs.items())
          + f" (latent scale {latents.abs().max():.2f})")
    assert decoded.shape == images.shape == (3, 3, HEIGHT, WIDTH)
    assert max(diffs.values()) <= 1e-5, diffs
    assert latents.abs().max() > 0.1 and ((decoded > 0.01) & (decoded < 0.99)).float().mean() > 0.5
    # the guidance embedding is part of what was compared
    assert (oracle["unguided"] - latents).abs().max() > 100 * max(diffs["latent"], 1e-7)


NEGATIVE = "blurry, low quality"
TRUE_CFG = 3.0


def test_true_cfg_with_a_negative_prompt_reproduces_the_kontext_pipeline(case):
    """true_cfg_scale > 1 with a negative prompt (FluxKontextPipeline: v_neg + s·(v_pos − v_neg), two passes
    per step on top of the embedded guidance): our η = 0 rollout of the three rows, one micro-batch."""
    components = tiny_components(seed=2)
    adapter = case.adapter(components, true_cfg_scale=TRUE_CFG, negative_prompt=NEGATIVE)
    keys = list(case.prompts)
    conditioning = adapter.encode_prompts(keys)
    assert {"negative_prompt_embeds", "negative_pooled_prompt_embeds"} <= set(conditioning)
    velocity = adapter.velocity_model()
    assert velocity.uses_cfg and velocity.true_cfg_scale == TRUE_CFG
    spec = TreeSpec(steps=STEPS, shift=SHIFT, eta=0.0, split_plan={})
    tree = rollout(velocity, conditioning, spec, num_prompts=3, latent_shape=adapter.latent_shape(),
                   generator=torch.Generator().manual_seed(0), micro_batch=3)
    noise = tree.latents[0]
    pipe = kontext_pipeline(components)
    rows = [adapter.row(key) for key in keys]

    def run(**overrides):
        return torch.cat([pipeline_call(pipe, row, noise[i : i + 1].clone(), "latent", **overrides)
                          for i, row in enumerate(rows)])

    expected = run(true_cfg_scale=TRUE_CFG, negative_prompt=NEGATIVE)
    without = run()
    diff = (tree.latents[-1] - expected).abs().max().item()
    print(f"flux-kontext true CFG {TRUE_CFG}: max|Δlatent|={diff:.2e}")
    assert diff <= 1e-5
    assert (without - expected).abs().max() > 100 * max(diff, 1e-7)  # the negative branch was part of it
    # the same adapter without a negative prompt (or with scale 1) makes no negative rows and one pass
    plain = case.adapter(components, true_cfg_scale=TRUE_CFG)
    assert not plain.uses_negative_prompt and not plain.velocity_model().uses_cfg
    assert "negative_prompt_embeds" not in plain.encode_prompts(keys[:1])
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        velocity(noise, torch.full((3,), 0.5), {k: v for k, v in conditioning.items() if not k.startswith("neg")})


def test_the_source_image_conditions_every_call(oracle, case):
    """Another source (same instruction) moves the velocity; the source tokens carry ids (1, i, j)."""
    adapter, conditioning = oracle["adapter"], oracle["conditioning"]
    velocity = adapter.velocity_model()
    x, sigma = oracle["noise"][:1], torch.full((1,), 0.6)
    first = {key: value[:1] for key, value in conditioning.items()}
    # row 0's instruction with row 2's source (same token count, another grid and content)
    swapped = {**first, "image_latents": conditioning["image_latents"][2:3],
               "image_latent_shape": conditioning["image_latent_shape"][2:3]}
    with torch.no_grad():
        moved = (velocity(x, sigma, swapped) - velocity(x, sigma, first)).abs().max().item()
    assert moved > 1e-3, moved
    ids = source_image_ids(4, 6)
    assert ids.shape == (6, 3) and bool((ids[:, 0] == 1).all())
    assert ids[:, 1:].tolist() == [[i, j] for i in range(2) for j in range(3)]
    with pytest.raises(KeyError, match="image_latents"):
        velocity(x, sigma, {k: v for k, v in first.items() if not k.startswith("image_")})


def test_a_micro_batch_mixing_source_sizes_equals_each_row_alone(oracle):
    """Training micro-batches mix rows of different sources: grouped calls, rows back in order, gradients flow."""
    adapter, conditioning = oracle["adapter"], oracle["conditioning"]
    velocity = adapter.velocity_model()
    order = torch.tensor([2, 0, 1, 0])  # three sizes, a repeated row, not sorted by size
    cond = {key: value[order] for key, value in conditioning.items()}
    x = torch.randn(4, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.5, 0.3, 0.7])
    mixed = velocity(x, sigma, cond)
    with torch.no_grad():
        alone = torch.cat([velocity(x[i : i + 1], sigma[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()})
                           for i in range(4)])
    torch.testing.assert_close(mixed.detach(), alone, rtol=0, atol=1e-6)
    mixed.square().mean().backward()
    grads = [p.grad for p in adapter.transformer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    adapter.transformer.zero_grad(set_to_none=True)


def test_guidance_embedding_convention():
    """The transformer gets ``guidance = embedded_guidance`` per row as float32, as the pipeline passes it;
    the family's default is the pipeline example's 2.5 (its ``__call__`` default is 3.5)."""
    import inspect

    from diffusers import FluxKontextPipeline
    from diffusers.pipelines.flux import pipeline_flux_kontext

    assert inspect.signature(FluxKontextPipeline.__call__).parameters["guidance_scale"].default == 3.5
    assert "guidance_scale=2.5" in pipeline_flux_kontext.EXAMPLE_DOC_STRING and KONTEXT_GUIDANCE == 2.5
    from branchgrpo.families import get_family
    from branchgrpo.train.config import load_train_config

    config = load_train_config(None, "branchgrpo", ["model.family=flux-kontext"])
    assert get_family("flux-kontext").options(config).embedded_guidance == KONTEXT_GUIDANCE
    assert FluxKontextAdapter(height=16, width=16).guidance_scale == KONTEXT_GUIDANCE

    components = tiny_components(seed=3)
    seen = []
    hook = components["transformer"].register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["guidance"].clone()), with_kwargs=True)
    try:
        adapter = make_adapter(components, guidance_scale=2.5)
        x = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
        cond = {"prompt_embeds": torch.randn(2, MAX_SEQ, 32), "pooled_prompt_embeds": torch.randn(2, 16),
                "image_latents": torch.randn(2, 24, 16), "image_latent_shape": torch.tensor([[8., 12.], [8., 12.]])}
        with torch.no_grad():
            adapter.velocity_model()(x, torch.full((2,), 0.5), cond)
    finally:
        hook.remove()
    (guidance,) = seen
    assert guidance.dtype == torch.float32 and guidance.tolist() == [2.5, 2.5]


def test_condition_size_is_the_pipelines():
    """Our size rule against the pipeline's own resize (its preprocess call recorded, stock resolutions)."""
    from diffusers.pipelines.flux import pipeline_flux_kontext as module

    stock = STOCK_RESOLUTIONS
    pipe = kontext_pipeline(tiny_components(seed=0))
    multiple = pipe.vae_scale_factor * 2

    class Stop(Exception):
        pass

    def recorded(width, height, auto_resize):
        from PIL import Image

        def preprocess(image, height=None, width=None, **kwargs):
            raise Stop((width, height))

        pipe.image_processor.preprocess = preprocess
        try:
            with pytest.raises(Stop) as info:
                pipe(prompt="a dog", image=Image.new("RGB", (width, height)), num_inference_steps=1, height=16,
                     width=16, max_area=256, max_sequence_length=MAX_SEQ, _auto_resize=auto_resize)
        finally:
            del pipe.image_processor.preprocess
        return info.value.args[0]

    try:
        for module_list in (stock, RESOLUTIONS):
            module.PREFERRED_KONTEXT_RESOLUTIONS = list(module_list)
            for width, height in [(1000, 700), (640, 480), (333, 1000), (1024, 1024), (1920, 1080), (61, 90),
                                  (22, 23)]:
                for auto in (True, False):
                    theirs = recorded(width, height, auto)
                    ours = kontext_condition_size(width, height, multiple, auto, module_list)
                    assert ours == theirs, (width, height, auto, module_list is stock)
    finally:
        module.PREFERRED_KONTEXT_RESOLUTIONS = list(RESOLUTIONS)  # as the module fixture set it
    # the real model (VAE factor 8 → multiples of 16), stock list: hand-checked nearest aspect ratios
    assert kontext_condition_size(1000, 700, 16, resolutions=stock) == (1248, 832)  # 992/688 = 1.44 → 1.5
    assert kontext_condition_size(1024, 1024, 16, resolutions=stock) == (1024, 1024)
    assert kontext_condition_size(1000, 700, 16, auto_resize=False) == (992, 688)
    with pytest.raises(ValueError, match="at least 16x16"):
        kontext_condition_size(10, 700, 16)


# -- the generic checks that fit an edit family ------------------------------------------------------


def test_encode_prompts_equals_pipeline_encode_prompt_and_source_latents(case):
    check_encode_prompts(case, tiny_components(seed=0))


def test_decode_is_batched_and_in_unit_range(case):
    check_decode(case, tiny_components(seed=0))


def test_exported_lora_loads_in_the_kontext_pipeline(case, tmp_path):
    pytest.importorskip("peft")
    check_lora_export(case, tmp_path)


def test_one_branchgrpo_iteration_with_a_reward_that_sees_the_source(case, tmp_path):
    """Two rows (a 3:2 and a square source: micro-batches mix source grids and token counts)."""
    seen = case.extra["seen"]
    seen.clear()
    two_rows = dataclasses.replace(case, prompts=case.prompts[:2])
    train = check_trainer_iteration(two_rows, tmp_path)
    assert set(seen) == set(case.prompts[:2])  # the reward was handed both rows and read their sources
    assert train["reward_std"] > 0


def test_from_pretrained_round_trip_with_lazy_text_encoders(case, tmp_path):
    check_round_trip(case, tiny_components(seed=0), tmp_path)


# -- rows and the prompt cache --------------------------------------------------------------------


def test_prompt_cache_holds_instructions_and_serves_rows(case, rows_dir, tmp_path):
    """The text is the instruction alone: rows sharing it share one cache entry whatever their image;
    an adapter without text encoders serves rows from the cache; an uncached instruction is one clear error."""
    components = tiny_components(seed=0)
    encoder = case.adapter(components)
    keys = list(case.prompts)
    same_instruction = json.dumps({"prompt": INSTRUCTIONS[0], "image": str(rows_dir / "source_0_2.png")})
    report = encoder.preprocess_prompts(keys + [same_instruction], tmp_path, batch_size=2)
    assert (report.unique_prompts, report.encoded) == (3, 3)
    assert encoder.preprocess_prompts(keys, tmp_path).encoded == 0
    trainer_side = case.adapter({**components, "text_encoder": None, "text_encoder_2": None},
                                prompt_cache_dir=tmp_path, encoder_config=encoder.encoder_config)
    cached, direct = trainer_side.encode_prompts(keys), encoder.encode_prompts(keys)
    assert set(cached) == set(direct) == {"prompt_embeds", "pooled_prompt_embeds", "image_latents",
                                          "image_latent_shape"}
    for key in direct:
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=1e-6)
    assert trainer_side.text_encoder is None
    other = json.dumps({"prompt": "a photo of a cat", "image": str(rows_dir / "source_0_0.png")})
    with pytest.raises(PromptNotCachedError, match="branchgrpo preprocess"):
        trainer_side.encode_prompts([other])
    with pytest.raises(ValueError, match="not an edit row"):
        encoder.encode_prompts(["a photo of a cat"])
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        encoder.encode_prompts([json.dumps({"prompt": "a dog", "image": str(rows_dir / "nowhere.png")})])


# -- the family -------------------------------------------------------------------------------------


def test_family_options_lora_targets_check_and_config(rows_dir, tmp_path):
    from branchgrpo.families import get_family
    from branchgrpo.models.lora import LoraSpec, add_lora
    from branchgrpo.train.config import load_train_config

    family = get_family("flux-kontext")
    config = load_train_config(None, "branchgrpo", ["model.family=flux-kontext",
                                                    f"data.train_prompts={rows_dir / 'rows.jsonl'}"])
    opts = family.options(config)
    assert (opts.height, opts.width, opts.embedded_guidance, opts.max_sequence_length, opts.auto_resize) == (
        1024, 1024, 2.5, 512, True)
    assert not [p for p in family.check(config) if p.field.startswith("data.")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "image": "nowhere.png"}\n')
    config.data.train_prompts = str(tmp_path / "bad.jsonl")
    assert any(p.field == "data.train_prompts" and "nowhere.png" in str(p) for p in family.check(config))
    cfg = load_train_config(None, "branchgrpo", ["model.family=flux-kontext", "model.options.true_cfg_scale=2.5",
                                                 "model.options.negative_prompt=blurry"])
    kwargs = family._adapter_kwargs(cfg)
    assert (kwargs["true_cfg_scale"], kwargs["negative_prompt"]) == (2.5, "blurry")
    assert (opts.true_cfg_scale, opts.negative_prompt) == (1.0, None)
    for override, field in [("model.options.height=1000", "height"), ("model.options.embedded_guidance=-1",
                                                                      "embedded_guidance"),
                            ("model.options.true_cfg_scale=0.5", "true_cfg_scale"),
                            ("model.options.true_cfg_scale=2", "negative_prompt")]:
        with pytest.raises(ConfigError, match=rf"model\.options\.{field}"):
            load_train_config(None, "branchgrpo", ["model.family=flux-kontext", override])
    # LoRA targets: attention projections of both block kinds of the FLUX transformer
    transformer = tiny_components()["transformer"]
    add_lora(transformer, LoraSpec(rank=2, alpha=2.0, target_modules=family.lora_target_modules(None)))
    adapted = {name.split(".")[0] for name, _ in transformer.named_parameters() if ".lora_" in name}
    assert adapted == {"transformer_blocks", "single_transformer_blocks"}
    # preflight: a missing folder is one line with the Kontext fetch command; a missing part is named
    config.model.path = str(tmp_path / "absent" / "kontext")
    (problem,) = family.file_problems(config)
    assert "hf download black-forest-labs/FLUX.1-Kontext-dev" in str(problem) and "licence" in str(problem)
    (tmp_path / "partial").mkdir()
    config.model.path = str(tmp_path / "partial")
    missing = " ".join(str(p) for p in family.file_problems(config))
    assert all(part in missing for part in ("transformer", "vae", "text_encoder_2", "tokenizer_2"))
    assert "transformer" not in " ".join(str(p) for p in family.file_problems(config, job="preprocess"))
    root = Path(__file__).resolve().parents[2]
    shipped = load_train_config(root / "configs" / "flux-kontext-branchgrpo.yaml", None, [])
    assert shipped.model.family == "flux-kontext" and shipped.method.tree.steps == 20
    assert shipped.data.train_prompts.endswith(".jsonl")
    assert family.options(shipped).embedded_guidance == 2.5


def test_family_export_writes_a_kontext_folder_and_a_lora_file(case, tmp_path):
    """``branchgrpo export``'s two paths for this family: the full folder loads as FluxKontextPipeline with
    our transformer; the LoRA file loads with its ``load_lora_weights`` (velocity: the conformance check)."""
    pytest.importorskip("peft")
    from diffusers import FluxKontextPipeline

    from branchgrpo.families import get_family
    from branchgrpo.train.config import load_train_config
    from conformance import add_family_lora, bundle_for

    family = get_family("flux-kontext")
    components = tiny_components(seed=4)
    base = tmp_path / "base"
    kontext_pipeline(components).save_pretrained(str(base), safe_serialization=True)
    config = load_train_config(None, "branchgrpo", ["model.family=flux-kontext", f"model.path={base}"])
    trained = tiny_components(seed=5)["transformer"]  # other weights than the base folder's
    adapter = case.adapter({**components, "transformer": trained})
    message = family.export(bundle_for(case, adapter), config, tmp_path / "full", "symlink")
    assert "FluxKontextPipeline.from_pretrained" in message
    loaded = FluxKontextPipeline.from_pretrained(str(tmp_path / "full"))
    assert type(loaded).__name__ == "FluxKontextPipeline"
    for (name, ours), theirs in zip(trained.state_dict().items(), loaded.transformer.state_dict().values()):
        assert torch.equal(ours, theirs), name
    add_family_lora(case, adapter, rank=2, alpha=4.0)
    message = family.export_lora(bundle_for(case, adapter), config, tmp_path / "lora.safetensors")
    pipe = kontext_pipeline(tiny_components(seed=5))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert "load_lora_weights" in message and any(".lora_" in n for n, _ in pipe.transformer.named_parameters())


def test_missing_folder_raises_a_download_hint(tmp_path):
    with pytest.raises(FluxKontextFilesNotFoundError) as info:
        FluxKontextAdapter.from_pretrained(tmp_path / "kontext", dtype=torch.float32)
    message = str(info.value)
    assert "FLUX.1 Kontext weights not found" in message
    assert "hf download black-forest-labs/FLUX.1-Kontext-dev" in message and "gated" in message
    assert "text_encoder_2/" in message


def test_preprocess_and_build_from_a_jsonl_config(tmp_path, capsys):
    """`branchgrpo preprocess` on a JSONL edit file, then the bundle training builds from the same config:
    it knows every row's source, serves the instructions from the cache without the text encoders, and
    its conditioning equals the in-memory adapter's."""
    from branchgrpo.cli import main
    from branchgrpo.train.components import build_policy
    from branchgrpo.train.config import load_train_config

    from conformance import save_layout

    components = tiny_components(seed=2)
    folder = tmp_path / "kontext"
    save_layout(components, folder)
    lines = write_rows(tmp_path / "data", sizes=SOURCES[:2])
    config_file = tmp_path / "kontext.yaml"
    config_file.write_text(f"""\
model:
  family: flux-kontext
  path: {folder}
  options: {{height: 32, width: 48, embedded_guidance: {GUIDANCE}, max_sequence_length: {MAX_SEQ}}}
  prompt_cache_dir: {tmp_path / 'cache'}
data:
  train_prompts: {tmp_path / 'data' / 'rows.jsonl'}
  heldout_prompts: {tmp_path / 'data' / 'rows.jsonl'}
run:
  device: cpu
  output_dir: {tmp_path / 'run'}
""")
    assert main(["preprocess", "--config", str(config_file)]) == 0, capsys.readouterr().err
    assert "encoded=2" in capsys.readouterr().out  # the two instructions (no negative prompt)
    bundle = build_policy(load_train_config(config_file, None, []), torch.device("cpu"))
    assert bundle.train_prompts == lines and bundle.adapter.text_encoder is None
    cached = bundle.encode_prompts(bundle.train_prompts)
    assert bundle.adapter.text_encoder is None, "a cache miss loaded the text encoders"
    direct = make_adapter(components, rows=read_edit_rows(tmp_path / "data" / "rows.jsonl")).encode_prompts(lines)
    assert set(cached) == set(direct)
    for key in direct:
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=1e-6)
