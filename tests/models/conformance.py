"""The adapter conformance suite: what every diffusers model family must pass, declared once.

A family's test module declares a :class:`FamilyCase` (tiny random components of the real
architectures, how to build our adapter and the family's diffusers pipeline, the pipeline call) and
pulls the generic tests into its namespace::

    from conformance import FamilyCase, conformance_tests

    CASE = FamilyCase(name="flux", components=tiny_components, adapter=make_adapter, pipeline=flux_pipeline, ...)
    globals().update(conformance_tests(CASE))

It then adds only what is specific to the family (schedule shift, guidance embedding, CFG layout,
video frames, file-layout errors). The generic tests, all on CPU in float32:

1. ``test_ode_rollout_reproduces_the_pipeline`` — at η = 0 our frontier rollout (one trajectory per
   prompt, ``split_plan={}``) and ``decode`` equal the pipeline run from the same initial noise on
   the same σ grid (docs/method.md §2): final latents, x̂0 and decoded output within
   :attr:`FamilyCase.tolerance`; the compared values are not all ~0 (nor all saturated pixels), and
   (with :attr:`FamilyCase.guidance_off`) switching guidance off moves the pipeline's sample, so
   guidance is part of what is compared.
2. ``test_encode_prompts_equals_pipeline_encode_prompt`` — every conditioning key equals the
   pipeline's own ``encode_prompt`` (negative rows included under CFG); no negative rows without CFG.
3. ``test_decode_is_batched_and_in_unit_range`` — output shape, float32, ``[0, 1]``, and decoding in
   batches equals decoding all at once.
4. ``test_prompt_cache_serves_an_adapter_without_text_encoders`` — ``preprocess_prompts`` fills a
   cache that an adapter without text encoders reads back identically; hits skip the encoders;
   the cache identity follows the source and the sequence length; a miss is one clear error.
5. ``test_exported_lora_loads_in_the_pipeline`` — LoRA on the family's default targets
   (``get_family(name).lora_target_modules``), perturbed, written by ``export_lora``, loaded with the
   pipeline's ``load_lora_weights``: the pipeline's transformer gives our velocity.
6. ``test_one_branchgrpo_iteration_through_the_trainer`` — ``Trainer(config, model=PolicyBundle(...),
   reward=...)`` runs one iteration: weights move, the rollout policy is the trained one (ratio 1 at
   the first update), every logged metric is finite.
7. ``test_from_pretrained_round_trip_with_lazy_text_encoders`` (when :attr:`FamilyCase.load` is set) —
   a saved diffusers folder loads with text encoders on demand and behaves as the in-memory adapter.

Each check is also a plain function (:func:`check_oracle`, ...) so a family test can run it on a
variant of its case (``dataclasses.replace(CASE, ...)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pytest
import torch

from branchgrpo.families import PolicyBundle, get_family
from branchgrpo.models.base import spec_sigmas_for_pipeline
from branchgrpo.models.export import export_lora
from branchgrpo.models.lora import LoraSpec, add_lora, trainable_parameters
from branchgrpo.models.prompt_cache import PromptNotCachedError
from branchgrpo.rewards.base import as_reward
from branchgrpo.sde import sigma_schedule
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.spec import TreeSpec

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def brightness(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Mean pixel value of each image (or video): a reward any decoded output can be scored with."""
    return images.flatten(1).mean(dim=1)


@dataclass(eq=False)
class FamilyCase:
    """A model family's tiny test setup, as the conformance suite needs it."""

    name: str  # the registered family (``model.family``), for its LoRA targets, modality and trainer config
    components: Callable[[int], dict]  # seed -> fresh tiny random diffusers components (transformer, vae, ...)
    adapter: Callable[..., Any]  # (components, **kwargs) -> our adapter; kwargs reach the DiffusersAdapter
    pipeline: Callable[[dict], Any]  # components -> the family's diffusers pipeline (scheduler shift = shift)
    call: Mapping[str, Any]  # pipeline __call__ kwargs besides prompt/latents/steps/output_type (size, guidance, ...)
    pipeline_embeds: Callable[[Any, list[str]], dict]  # (pipeline, prompts) -> its encode_prompt as our keys
    output_shape: tuple[int, ...]  # one decoded sample: (3, H, W) or (F, 3, H, W)
    prompts: tuple[str, ...] = ("a photo of a cat", "red car on the street", "blue tree")
    steps: int = 4
    shift: float = 3.0
    tolerance: float = 1e-5  # oracle: max |Δ| of latents, x̂0 and decoded pixels (float32)
    negative_atol: float = 1e-6  # negative rows: encoded once and repeated vs the pipeline's P encodings
    decode_atol: float = 1e-6  # decode in pieces vs at once (other conv kernels per batch size)
    pass_sigmas: bool = True  # call the pipeline with sigmas=spec_sigmas_for_pipeline(steps)
    output_attr: str = "images"  # the pipeline output's field ("frames" for video pipelines)
    guidance_off: Mapping[str, Any] | None = None  # pipeline kwargs that turn guidance off (it must matter)
    adapter_guidance_off: Mapping[str, Any] | None = None  # adapter kwargs without CFG (no negative rows)
    lora: bool = True  # LoRA export loads with the pipeline's load_lora_weights
    trainer: bool = True  # run one BranchGRPO iteration through the Trainer
    reward: Callable[[], Any] | None = None  # the trainer test's reward (default: brightness)
    load: Callable[..., Any] | None = None  # (folder, cache_dir) -> adapter from a saved folder, encoders lazy
    to_pipeline_latents: Callable[[torch.Tensor], torch.Tensor] | None = None  # our noise -> pipeline's latents
    from_pipeline_latents: Callable[[torch.Tensor], torch.Tensor] | None = None  # its latent output -> ours
    extra: Mapping[str, Any] = field(default_factory=dict)  # free for a family's own tests

    @property
    def modality(self) -> str:
        return get_family(self.name).modality


# -- the checks -------------------------------------------------------------------------------------


def pipeline_sample(case: FamilyCase, pipe, noise: torch.Tensor, output_type: str, num_prompts: int = 2,
                    **overrides) -> torch.Tensor:
    """The pipeline's sample from ``noise`` (our layout) on docs/method.md §2's σ grid."""
    call = dict(prompt=list(case.prompts[:num_prompts]), num_inference_steps=case.steps, **case.call)
    if case.pass_sigmas:
        call["sigmas"] = spec_sigmas_for_pipeline(case.steps)
    call.update(overrides)
    latents = noise.clone() if case.to_pipeline_latents is None else case.to_pipeline_latents(noise.clone())
    out = getattr(pipe(latents=latents, output_type=output_type, **call), case.output_attr)
    if output_type == "latent" and case.from_pipeline_latents is not None:
        out = case.from_pipeline_latents(out)
    return out


def ode_tree(case: FamilyCase, adapter, micro_batch: int, num_prompts: int = 2, policy=None):
    """Our frontier rollout at η = 0: one trajectory per prompt, no splits."""
    conditioning = adapter.encode_prompts(list(case.prompts[:num_prompts]))
    spec = TreeSpec(steps=case.steps, shift=case.shift, eta=0.0, split_plan={})
    return rollout(
        policy if policy is not None else adapter.velocity_model(), conditioning, spec, num_prompts=num_prompts,
        latent_shape=adapter.latent_shape(), generator=torch.Generator().manual_seed(0), micro_batch=micro_batch,
    )


def pipeline_oracle(case: FamilyCase, components: dict, noise: torch.Tensor) -> dict:
    """What the pipeline makes of ``noise``: latents, decoded output and (if declared) the unguided latents."""
    pipe = case.pipeline(components)
    latents = pipeline_sample(case, pipe, noise, "latent")
    sigmas = pipe.scheduler.sigmas.clone()
    decoded = pipeline_sample(case, pipe, noise, "pt")
    unguided = None
    if case.guidance_off is not None:
        unguided = pipeline_sample(case, pipe, noise, "latent", **case.guidance_off)
    return dict(noise=noise.clone(), latents=latents, decoded=decoded, sigmas=sigmas, unguided=unguided)


def check_oracle(case: FamilyCase, components: dict | None = None, micro_batch: int = 1,
                 cache: dict | None = None) -> dict:
    """η = 0 rollout + decode vs the pipeline (item 1 of the module docstring); returns the max |Δ|s.

    ``cache`` (a dict) keeps the pipeline's outputs for further calls on the same components."""
    components = components if components is not None else case.components(1)
    adapter = case.adapter(components)
    tree = ode_tree(case, adapter, micro_batch)
    noise = tree.latents[0]
    cache = cache if cache is not None else {}
    if "expected" not in cache:
        cache["expected"] = pipeline_oracle(case, components, noise)
    expected = cache["expected"]
    assert torch.equal(expected["noise"], noise)  # the pipeline started where we did
    torch.testing.assert_close(expected["sigmas"], sigma_schedule(case.steps, case.shift).float(),
                               rtol=0, atol=FLOAT32_EPS)  # the pipeline ran on our σ grid

    decoded = adapter.decode(tree.leaf_x0)
    diffs = {
        "latent": (tree.latents[-1] - expected["latents"]).abs().max().item(),
        "x0": (tree.leaf_x0 - expected["latents"]).abs().max().item(),  # x̂0 of the last step = final at σ_T = 0
        "decoded": (decoded - expected["decoded"]).abs().max().item(),
    }
    print(f"{case.name} micro_batch={micro_batch}: " + " ".join(f"max|Δ{k}|={v:.2e}" for k, v in diffs.items())
          + f" (latent scale {expected['latents'].abs().max():.2f})")
    assert tree.latents[-1].shape == expected["latents"].shape
    assert decoded.shape == expected["decoded"].shape == (2, *case.output_shape)
    assert max(diffs.values()) <= case.tolerance, diffs
    # not a comparison between zeros, nor between saturated pixels
    assert expected["latents"].abs().max() > 0.1
    assert ((decoded > 0.01) & (decoded < 0.99)).float().mean() > 0.5
    if expected["unguided"] is not None:  # guidance is part of what was compared
        moved = (expected["unguided"] - expected["latents"]).abs().max().item()
        assert moved > 100 * max(diffs["latent"], 1e-7), moved
    return diffs


def check_encode_prompts(case: FamilyCase, components: dict) -> None:
    """Our conditioning equals the pipeline's ``encode_prompt`` (item 2)."""
    prompts = list(case.prompts)
    adapter = case.adapter(components)
    ours = adapter.encode_prompts(prompts)
    with torch.no_grad():  # as the pipelines' __call__; grad mode picks other CPU kernels (±1 ulp)
        theirs = case.pipeline_embeds(case.pipeline(components), prompts)
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for key, value in theirs.items():
        assert ours[key].shape[0] == len(prompts) and ours[key].dtype == torch.float32, key
        atol = case.negative_atol if key.startswith("negative_") else 0.0
        torch.testing.assert_close(ours[key], value, rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")
        assert value.abs().max() > 0, key
    negatives = [key for key in ours if key.startswith("negative_")]
    if case.adapter_guidance_off is not None:
        assert negatives, "a family with CFG returns negative rows"
        plain = case.adapter(components, **case.adapter_guidance_off).encode_prompts(prompts[:1])
        assert not [key for key in plain if key.startswith("negative_")]


def check_decode(case: FamilyCase, components: dict) -> None:
    """Decoding: shape, float32, [0, 1], batched = one at a time (item 3)."""
    adapter = case.adapter(components)
    z = 2.0 * torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(4))
    whole = adapter.decode(z, batch_size=2)
    pieces = adapter.decode(z, batch_size=1)
    assert whole.shape == (2, *case.output_shape) and whole.dtype == torch.float32
    assert whole.min() >= 0 and whole.max() <= 1
    assert ((whole > 0.01) & (whole < 0.99)).float().mean() > 0.1  # the range is not met by clamping all
    torch.testing.assert_close(pieces, whole, rtol=0, atol=case.decode_atol)
    assert (whole[0] - whole[1]).abs().max() > 1e-3  # different latents, different outputs


def _count_calls(module: torch.nn.Module, calls: list[int]):
    def hook(_module, args, kwargs, _out):
        first = args[0] if args else next(iter(kwargs.values()))
        calls.append(first.shape[0])
    return module.register_forward_hook(hook, with_kwargs=True)


def check_prompt_cache(case: FamilyCase, components: dict, tmp_path: Path) -> None:
    """``preprocess`` → a cache that serves an adapter without text encoders (item 4)."""
    prompts = list(case.prompts)
    encoder = case.adapter(components)
    negative = [encoder.negative_prompt] if encoder.negative_prompt is not None else []
    unique = len(set(prompts + negative))
    report = encoder.preprocess_prompts(prompts + prompts[:1], tmp_path, batch_size=2)
    assert (report.prompts, report.unique_prompts, report.encoded, report.already_cached) == (
        len(prompts) + 1 + len(negative), unique, unique, 0)
    assert encoder.preprocess_prompts(prompts, tmp_path).encoded == 0
    files = [p.name for p in (tmp_path / encoder.encoder_identity).rglob("*") if p.is_file()]
    assert len([f for f in files if f.endswith(".safetensors")]) == unique
    assert "identity.json" in files and not [f for f in files if f.endswith(".tmp")]

    without = {name: None for name in encoder.text_encoder_names}
    trainer_side = case.adapter({**components, **without}, prompt_cache_dir=tmp_path,
                                encoder_config=encoder.encoder_config)
    cached = trainer_side.encode_prompts(prompts)
    direct = encoder.encode_prompts(prompts)
    assert set(cached) == set(direct)
    for key in direct:  # batch size 2 in preprocess, 3 here: the cache is not what makes them differ
        torch.testing.assert_close(cached[key], direct[key], rtol=0, atol=case.negative_atol)
    with pytest.raises(PromptNotCachedError, match="branchgrpo preprocess"):
        trainer_side.encode_prompts(["a prompt nobody cached"])

    # hits skip the text encoders; a mixed batch encodes only the new prompt, once
    live = case.adapter(components, prompt_cache_dir=tmp_path / "live")
    calls: list[int] = []
    hooks = [_count_calls(getattr(live, name), calls) for name in live.text_encoder_names
             if getattr(live, name) is not None]
    try:
        first = live.encode_prompts(prompts[:2], with_negative=False)
        assert calls and all(rows == 2 for rows in calls)
        seen = len(calls)
        second = live.encode_prompts(prompts[:2], with_negative=False)
        assert len(calls) == seen  # no encoder call on a hit
        for key in first:
            assert torch.equal(first[key], second[key])
        mixed = live.encode_prompts([prompts[2], prompts[0], prompts[2]], with_negative=False)
        assert len(calls) > seen and all(rows == 1 for rows in calls[seen:])
        key = next(iter(first))
        assert torch.equal(mixed[key][1], first[key][0]) and torch.equal(mixed[key][0], mixed[key][2])
    finally:
        for hook in hooks:
            hook.remove()

    # the cache identity follows the encoders' source and sequence length
    base = case.adapter(components, source="org/model")
    assert base.encoder_identity == case.adapter(components, source="org/model").encoder_identity
    others = {case.adapter(components, source="/models/other").encoder_identity,
              case.adapter(components, source="org/model",
                           max_sequence_length=base.max_sequence_length - 1).encoder_identity}
    assert base.encoder_identity not in others and len(others) == 2


def bundle_for(case: FamilyCase, adapter, trainable: torch.nn.Module | None = None) -> PolicyBundle:
    """The :class:`PolicyBundle` the family's ``build`` would return for ``adapter``."""
    return PolicyBundle(
        family=case.name, policy=adapter.velocity_model(), trainable=trainable or adapter.transformer,
        latent_shape=tuple(adapter.latent_shape()), encode_prompts=adapter.encode_prompts, decode=adapter.decode,
        train_prompts=list(case.prompts), heldout_prompts=list(case.prompts[:1]), modality=case.modality,
        adapter=adapter,
    )


def add_family_lora(case: FamilyCase, adapter, rank: int = 4, alpha: float = 8.0) -> list[str]:
    """LoRA on the family's default target modules; returns the targets."""
    targets = get_family(case.name).lora_target_modules(bundle_for(case, adapter))
    add_lora(adapter.transformer, LoraSpec(rank=rank, alpha=alpha, target_modules=targets))
    return targets


def check_lora_export(case: FamilyCase, tmp_path: Path, seed: int = 5) -> None:
    """Our LoRA file loads with the pipeline's ``load_lora_weights`` and gives our velocity (item 5)."""
    from safetensors import safe_open

    trained, fresh = case.components(seed), case.components(seed)
    ours_adapter = case.adapter(trained)
    targets = add_family_lora(case, ours_adapter, rank=4, alpha=12.0)  # alpha ≠ rank: a loader ignoring it is off 3×
    assert targets
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainable_parameters(trained["transformer"]):
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))  # stands in for training
    path = export_lora(trained["transformer"], tmp_path / "lora" / f"{case.name}-grpo.safetensors")
    with safe_open(str(path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    config = json.loads(metadata["lora_adapter_metadata"])  # rank and alpha travel with the file
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 12.0)
    assert not list((tmp_path / "lora").glob(".*"))  # no temporary leftovers

    base = case.adapter(fresh)
    x = torch.randn(2, *base.latent_shape(), generator=torch.Generator().manual_seed(6))
    sigma = torch.tensor([0.7, 0.3])
    cond = base.encode_prompts(list(case.prompts[:2]))
    with torch.no_grad():
        ours = ours_adapter.velocity_model()(x, sigma, cond)
        without = base.velocity_model()(x, sigma, cond)  # before the pipeline loads LoRA into fresh's transformer
    pipe = case.pipeline(fresh)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        loaded = case.adapter({**fresh, "transformer": pipe.transformer}).velocity_model()(x, sigma, cond)
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-6)
    assert (ours - without).abs().max() > 1e-2  # the LoRA is what makes them equal


def make_trainer(case: FamilyCase, tmp_path: Path, adapter, reward=None, lora=None, overrides: Sequence[str] = ()):
    """A :class:`~branchgrpo.train.trainer.Trainer` on ``adapter``: 2 prompts, 4 steps, a 2×2 tree,
    one update at lr 1e-3; ``lora`` (a :class:`~branchgrpo.train.config.LoraConfig`) adds LoRA on the
    family's default targets and trains only it."""
    from branchgrpo.models.lora import LoraWeights
    from branchgrpo.train.config import load_train_config
    from branchgrpo.train.trainer import Trainer

    config = load_train_config(None, "branchgrpo", [
        f"run.output_dir={tmp_path}", "run.iterations=1", "run.progress=false", "run.tensorboard=false",
        "run.dump_tree_every=0", "run.checkpoint_every=0", "run.device=cpu", f"model.family={case.name}",
        "data.prompts_per_iteration=2", "eval.samples_per_prompt=1", "tree.steps=4", "split_plan=0:2,2:2",
        "update.updates_per_iteration=1", "update.learning_rate=1e-3", *overrides,
    ])
    trainable = adapter.transformer
    if lora is not None:
        config.model.lora = lora
        add_family_lora(case, adapter, rank=lora.rank, alpha=lora.alpha)
        trainable = LoraWeights(adapter.transformer)
    if reward is None:
        reward = case.reward() if case.reward is not None else as_reward(brightness, modality=case.modality)
    return Trainer(config, model=bundle_for(case, adapter, trainable), reward=reward)


def check_trainer_iteration(case: FamilyCase, tmp_path: Path, seed: int = 1) -> dict:
    """One BranchGRPO iteration through the Trainer changes the weights and logs finite metrics (item 6)."""
    from branchgrpo.train.logging import MetricsLogger

    adapter = case.adapter(case.components(seed))
    trainer = make_trainer(case, tmp_path, adapter)
    before = {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()}
    metrics = trainer.step()
    after = adapter.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the update changed no weight"
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False)  # what Trainer.run writes per iteration
    logger.log(metrics)
    logger.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    train = json.loads(line)  # strict JSON: a non-finite value would be null and named in nonfinite_keys
    assert "nonfinite_keys" not in train, train.get("nonfinite_keys")
    numbers = {k: v for k, v in train.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert len(numbers) > 10 and all(math.isfinite(v) for v in numbers.values()), numbers
    assert train["optimizer_steps"] == 1 and train["nfe/trained_edges"] > 0
    assert 0 < train["reward_mean"] < 1 and train["reward_std"] > 0
    # the rollout policy is the trained one (CFG, guidance, packing included): ratio 1 at the first update
    assert train["ratio_max_deviation_first_step"] < 1e-4  # docs/method.md §8
    return train


def save_layout(components: dict, folder: Path) -> None:
    """A diffusers folder: one sub-folder per component."""
    for name, part in components.items():
        if part is not None:
            part.save_pretrained(folder / name)


def check_round_trip(case: FamilyCase, components: dict, tmp_path: Path) -> None:
    """A saved folder loads with lazy text encoders and acts as the in-memory adapter (item 7)."""
    save_layout(components, tmp_path)
    loaded = case.load(tmp_path, tmp_path / "cache")
    in_memory = case.adapter(components, source=str(tmp_path.resolve()))
    assert all(getattr(loaded, name) is None for name in loaded.text_encoder_names)
    assert loaded.encoder_identity == in_memory.encoder_identity  # same cache folder either way
    first = loaded.encode_prompts(list(case.prompts[:2]))  # a miss: loads the text encoders now
    assert all(getattr(loaded, name) is not None for name in loaded.text_encoder_names[: loaded.required_text_encoders])
    expected = in_memory.encode_prompts(list(case.prompts[:2]))
    assert set(first) == set(expected)
    for key in expected:  # a reloaded module may pick another matmul kernel: 1-ulp differences
        torch.testing.assert_close(first[key], expected[key], rtol=0, atol=1e-6)
    x = torch.randn(2, *loaded.latent_shape(), generator=torch.Generator().manual_seed(5))
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity_model()(x, sigma, first),
                                   in_memory.velocity_model()(x, sigma, first), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.decode(x), in_memory.decode(x), rtol=0, atol=1e-6)


# -- the generic tests --------------------------------------------------------------------------------


def conformance_tests(case: FamilyCase) -> dict[str, Callable]:
    """The generic tests for ``case``, named ``test_*``: ``globals().update(conformance_tests(CASE))``.

    One set per test module. Components are built once (seed 0 for the read-only checks, seed 1 for
    the oracle, whose pipeline run is shared by the micro-batch variants); LoRA and the trainer get
    fresh ones.
    """
    state: dict[str, Any] = {}

    def shared(key: str, seed: int) -> dict:
        if key not in state:
            state[key] = case.components(seed)
        return state[key]

    @pytest.mark.parametrize("micro_batch", [2, 1])
    def test_ode_rollout_reproduces_the_pipeline(micro_batch):
        check_oracle(case, shared("oracle", 1), micro_batch, cache=state.setdefault("oracle_outputs", {}))

    def test_encode_prompts_equals_pipeline_encode_prompt():
        check_encode_prompts(case, shared("components", 0))

    def test_decode_is_batched_and_in_unit_range():
        check_decode(case, shared("components", 0))

    def test_prompt_cache_serves_an_adapter_without_text_encoders(tmp_path):
        check_prompt_cache(case, shared("components", 0), tmp_path)

    tests: dict[str, Callable] = {
        "test_ode_rollout_reproduces_the_pipeline": test_ode_rollout_reproduces_the_pipeline,
        "test_encode_prompts_equals_pipeline_encode_prompt": test_encode_prompts_equals_pipeline_encode_prompt,
        "test_decode_is_batched_and_in_unit_range": test_decode_is_batched_and_in_unit_range,
        "test_prompt_cache_serves_an_adapter_without_text_encoders":
            test_prompt_cache_serves_an_adapter_without_text_encoders,
    }
    if case.lora:
        def test_exported_lora_loads_in_the_pipeline(tmp_path):
            pytest.importorskip("peft")
            check_lora_export(case, tmp_path)
        tests["test_exported_lora_loads_in_the_pipeline"] = test_exported_lora_loads_in_the_pipeline
    if case.trainer:
        def test_one_branchgrpo_iteration_through_the_trainer(tmp_path):
            check_trainer_iteration(case, tmp_path)
        tests["test_one_branchgrpo_iteration_through_the_trainer"] = test_one_branchgrpo_iteration_through_the_trainer
    if case.load is not None:
        def test_from_pretrained_round_trip_with_lazy_text_encoders(tmp_path):
            check_round_trip(case, shared("components", 0), tmp_path)
        tests["test_from_pretrained_round_trip_with_lazy_text_encoders"] = (
            test_from_pretrained_round_trip_with_lazy_text_encoders)
    for name, test in tests.items():
        test.__name__ = test.__qualname__ = name
        test.__doc__ = f"Conformance ({case.name}): see tests/models/conformance.py."
    return tests


__all__ = [
    "FamilyCase",
    "add_family_lora",
    "brightness",
    "bundle_for",
    "check_decode",
    "check_encode_prompts",
    "check_lora_export",
    "check_oracle",
    "check_prompt_cache",
    "check_round_trip",
    "check_trainer_iteration",
    "conformance_tests",
    "make_trainer",
    "ode_tree",
    "pipeline_oracle",
    "pipeline_sample",
    "save_layout",
]
