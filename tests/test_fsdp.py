"""FSDP2 sharding and mixed precision: equal updates, portable checkpoints, CPU offload, config errors.

The reference for every FSDP run is the plain single-process trainer (itself tested against the
DDP path in test_distributed.py): with one update per iteration, N sharded processes sharing the
global batch compute the same update (docs/method.md §8 loss normalised over all ranks; FSDP reduce-scatter
sums). Tolerances are the ones test_distributed.py uses for the DDP all-reduce (float32 sums in
another order).
"""

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import COMMON, make, rows
from test_distributed import run_two as run_two_processes
from test_trainer import brightness_reward, tiny_generator

from branchgrpo.config import ConfigError
from branchgrpo.train.config import load_train_config
from branchgrpo.update import GradientSync


def run_two(out, *overrides, **kwargs):
    run_two_processes(out, overrides=overrides, **kwargs)


def assert_same_weights(a, b, name="model.safetensors"):
    wa, wb = load_file(str(a / "weights" / name)), load_file(str(b / "weights" / name))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wb[key].dtype == wa[key].dtype == torch.float32, key
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def assert_same_rows(a, b, iterations):
    ra = {r["iteration"]: r for r in rows(a)}
    rb = {r["iteration"]: r for r in rows(b)}
    for it in iterations:
        for key in ("reward_mean", "reward_std", "reward_max", "grad_norm", "nfe/trained_edges"):
            assert rb[it][key] == pytest.approx(ra[it][key], rel=1e-4, abs=1e-6), (it, key)


def test_two_fsdp_processes_equal_one_process(tmp_path):
    make(tmp_path / "one").run()
    run_two(tmp_path / "two", "run.parallel=fsdp")
    assert [r["processes"] for r in rows(tmp_path / "two")] == [2, 2, 2]
    # grad_norm is the global norm: a reduce-scatter that averaged instead of summing would halve it
    assert_same_rows(tmp_path / "one", tmp_path / "two", range(3))
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def make_lora(out, *overrides):
    """The tiny trainer with rank-4 LoRA on the transformer and the KL term (reference = adapter off)."""
    from branchgrpo.models.lora import LoraSpec, LoraWeights, add_lora
    from branchgrpo.train.trainer import Trainer

    generator = tiny_generator()
    add_lora(generator.trainable, LoraSpec(rank=4, alpha=8.0))
    generator.trainable = LoraWeights(generator.trainable)
    config = load_train_config(None, "branchgrpo", [
        f"run.output_dir={out}", *COMMON, "model.lora.rank=4", "model.lora.alpha=8", "update.kl_coef=0.1", *overrides,
    ])
    return Trainer(config, model=generator, reward=brightness_reward)


def test_lora_with_kl_on_two_fsdp_processes_equals_one_process(tmp_path):
    """The frozen base is sharded with the LoRA tensors; the KL reference runs the sharded base."""
    make_lora(tmp_path / "one").run()
    run_two_processes(tmp_path / "two", overrides=["run.parallel=fsdp"], factory=make_lora)
    assert_same_rows(tmp_path / "one", tmp_path / "two", range(3))
    assert all(r["kl"] > 0 for r in rows(tmp_path / "two")[1:])
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def make_lora_checkpointed(out, *overrides):
    """As :func:`make_lora`, with activation checkpointing on the real FLUX block types."""
    trainer = make_lora(out, *overrides)
    transformer = trainer.model.policy.transformer
    transformer.enable_gradient_checkpointing()
    assert transformer.is_gradient_checkpointing
    names = {type(m).__name__ for m in transformer.modules()}  # FSDP renames a wrapped class FSDP<name>
    assert all(any(n.endswith(block) for n in names) for block in ("FluxTransformerBlock", "FluxSingleTransformerBlock"))
    return trainer


def test_fsdp_with_checkpointing_and_lora_equals_the_unsharded_update(tmp_path):
    """FluxTransformerBlock / FluxSingleTransformerBlock return views, on which an in-place op would skip
    FSDP's pre-backward all-gather (torch warns). Sharded + recomputed activations + LoRA must still
    give the plain single-process update: same rows and weights after 3 iterations."""
    make_lora(tmp_path / "one").run()
    run_two_processes(tmp_path / "two", overrides=["run.parallel=fsdp"], factory=make_lora_checkpointed)
    assert_same_rows(tmp_path / "one", tmp_path / "two", range(3))
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_ranks_with_different_micro_batch_counts_stay_in_step(tmp_path):
    """Rank 0 trains one parent per micro-batch, rank 1 all at once: rank 1 pads with zero-gradient
    passes (else the collectives would deadlock) and the update is still the one-process update."""
    make(tmp_path / "one", "run.iterations=2").run()
    run_two(tmp_path / "two", "run.parallel=fsdp", "run.iterations=2",
            rank_overrides={0: ["engine.train_micro_batch=1"], 1: ["engine.train_micro_batch=64"]})
    assert_same_rows(tmp_path / "one", tmp_path / "two", range(2))
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_nan_micro_batch_under_fsdp_skips_the_step_on_every_rank(tmp_path):
    run_two(tmp_path, "run.parallel=fsdp", inject="nan_output")
    data = rows(tmp_path)
    assert len(data) == 3  # no rank waited for ever
    assert sum(r["nonfinite_micro_batches"] for r in data) > 0 and sum(r["skipped_steps"] for r in data) > 0
    weights = load_file(str(tmp_path / "weights" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_checkpoints_move_between_one_process_and_fsdp_processes(tmp_path):
    ckpt = ["run.checkpoint_every=1", "run.ema_decay=0.9", "run.iterations=4"]
    straight, sharded, single = tmp_path / "straight", tmp_path / "fsdp", tmp_path / "single"
    make(straight, *ckpt).run()
    # one process wrote iteration 2; two FSDP processes resume it and write 3 and 4 ...
    run_two(sharded, *ckpt, "run.parallel=fsdp", f"run.resume={straight / 'checkpoints' / 'iter_000002'}")
    # ... and one process resumes the FSDP checkpoint of iteration 3
    make(single, *ckpt, f"run.resume={sharded / 'checkpoints' / 'iter_000003'}").run()
    assert sorted(r["iteration"] for r in rows(sharded)) == [2, 3]
    assert_same_rows(straight, sharded, [2, 3])
    assert_same_rows(straight, single, [3])
    for out in (sharded, single):
        for name in ("model.safetensors", "ema.safetensors"):
            assert_same_weights(straight, out, name)
    saved = load_file(str(sharded / "checkpoints" / "iter_000003" / "model.safetensors"))
    whole = load_file(str(straight / "checkpoints" / "iter_000003" / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in whole.items()}  # unsharded


@pytest.fixture
def single_process_fsdp():
    """Close the one-rank process group a single-process FSDP trainer opens in this process."""
    jobs = []
    yield jobs
    for job in jobs:
        job.dist.close()


def test_cpu_offload_runs_and_equals_the_plain_update(tmp_path, single_process_fsdp):
    plain = make(tmp_path / "plain", "run.iterations=1")
    plain.step()
    job = make(tmp_path / "offload", "run.iterations=1", "run.parallel=fsdp", "run.cpu_offload=true")
    single_process_fsdp.append(job)
    assert job.dist.sharded
    metrics = job.step()
    assert metrics["optimizer_steps"] == 1
    params = dict(job.model.trainable.named_parameters())
    assert all(type(p).__name__ == "DTensor" and p.device.type == "cpu" for p in params.values())
    for name, want in plain.model.trainable.named_parameters():
        torch.testing.assert_close(params[name].full_tensor(), want.detach(), rtol=1e-4, atol=1e-6)


def test_fsdp_bf16_compute_keeps_float32_master_shards(tmp_path, single_process_fsdp):
    job = make(tmp_path, "run.iterations=1", "run.parallel=fsdp", "model.dtype=bfloat16")
    single_process_fsdp.append(job)
    job.step()
    root = job.model.trainable
    assert root.transformer_blocks[0]._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in root.parameters())
    states = [v for s in job.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert states and all(v.dtype == torch.float32 and type(v).__name__ == "DTensor" for v in states)


# -- mixed precision without FSDP ---------------------------------------------------------------

def test_bf16_compute_keeps_float32_masters_and_optimizer_state(tmp_path):
    job = make(tmp_path, "run.iterations=1", "model.dtype=bfloat16")
    assert job.model.policy.compute_dtype == torch.bfloat16
    job.step()
    assert all(p.dtype == torch.float32 for p in job.model.trainable.parameters())
    states = [v for s in job.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert states and all(v.dtype == torch.float32 for v in states)


def tiny_flux_edges(micro_batch: int = 16):
    """A tiny random FLUX policy, its conditioning, a method config and the trained edges of one tree."""
    from policies import tiny_flux, tiny_flux_conditioning

    from branchgrpo.tree.presets import method_config
    from branchgrpo.tree.rollout import rollout
    from branchgrpo.tree.scoring import score_tree
    from branchgrpo.update import gather_training_edges

    config = method_config("branchgrpo", [
        "tree.steps=6", "split_plan=0:2,3:2", "update.updates_per_iteration=1", "update.max_grad_norm=0",
        "update.shuffle_edges=false", f"engine.train_micro_batch={micro_batch}",
    ])
    policy, info = tiny_flux(seed=0)
    cond = tiny_flux_conditioning(2)
    with torch.no_grad():
        tree = rollout(policy, cond, config.tree, 2, (info["tokens"], info["channels"]),
                       generator=torch.Generator().manual_seed(0))
    rewards = torch.randn(tree.parent[-1].numel(), generator=torch.Generator().manual_seed(1))
    scores = score_tree(tree, rewards.double(), config)
    return policy, cond, config, gather_training_edges(tree, scores.selection, scores.edge_advantage)


def sgd_change(model, edges, cond, config, sync=None):
    """policy_update with SGD(lr=1): (stats, parameter change = the gradient, flattened)."""
    from branchgrpo.update import policy_update

    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    stats = policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), edges, cond, config, sync=sync)
    return stats, before - torch.cat([p.detach().flatten() for p in model.parameters()])


class LockstepSync(GradientSync):
    """One process of a sharded run whose busiest peer has ``extra`` more micro-batches per step."""

    sharded = True

    def __init__(self, extra: int = 0):
        self.extra = extra

    def max(self, value: float) -> float:
        return value + self.extra


class CountingPolicy(torch.nn.Module):
    """Counts forwards with gradients; ``poison`` makes the n-th of them return NaN."""

    def __init__(self, policy, poison: int | None = None):
        super().__init__()
        self.policy, self.poison, self.forwards = policy, poison, 0

    def forward(self, latents, sigmas, conditioning):
        out = self.policy(latents, sigmas, conditioning)
        if torch.is_grad_enabled():
            self.forwards += 1
            if self.forwards == self.poison:
                out = out * float("nan")
        return out


def test_padding_passes_add_exactly_zero_gradient():
    import copy

    policy, cond, config, edges = tiny_flux_edges(micro_batch=4)
    _, plain = sgd_change(copy.deepcopy(policy), edges, cond, config)
    model = CountingPolicy(copy.deepcopy(policy))
    stats, padded = sgd_change(model, edges, cond, config, sync=LockstepSync(extra=3))
    assert model.forwards == -(-edges.num_parents // 4) + 3  # its own micro-batches, then 3 padding passes
    assert stats.optimizer_steps == 1
    assert torch.equal(padded, plain)


def test_sharded_nonfinite_micro_batch_still_runs_backward_and_skips_the_step():
    import copy

    policy, cond, config, edges = tiny_flux_edges(micro_batch=4)
    stats, change = sgd_change(CountingPolicy(copy.deepcopy(policy), poison=1), edges, cond, config)
    assert (stats.nonfinite_micro_batches, stats.skipped_steps, stats.optimizer_steps) == (1, 0, 1)  # DDP: dropped
    stats, change = sgd_change(CountingPolicy(copy.deepcopy(policy), poison=1), edges, cond, config,
                               sync=LockstepSync())
    assert (stats.nonfinite_micro_batches, stats.skipped_steps, stats.optimizer_steps) == (1, 1, 0)
    assert torch.equal(change, torch.zeros_like(change))


def test_bf16_compute_gradient_is_close_to_the_float32_gradient():
    """Same trained edges, each policy on-policy in its own compute dtype (ratio 1, nothing
    clipped), SGD(lr=1) so the change is the gradient. bf16 keeps 8 significant bits (relative
    rounding 2⁻⁸ ≈ 0.4 %); a few roundings per layer put the velocity 1.7 % off the float32 one
    here, the bf16 backward about as much again: the gradient differs by 4.5 % (measured). The
    bound, 10 %, is that with a 2x margin; zero would mean the forward did not run in bf16."""
    import copy

    from branchgrpo.update import edge_log_probs

    policy, cond, config, edges = tiny_flux_edges()
    counts = edges.edges_per_parent()
    changes = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(policy)
        model.compute_dtype = None if dtype == torch.float32 else dtype
        with torch.no_grad():  # on-policy in this dtype
            lp, rows_, _, _ = edge_log_probs(model, edges, torch.arange(edges.num_parents), cond, config,
                                             torch.cumsum(counts, 0) - counts, counts)
        edges.lp_old[rows_] = lp
        stats, changes[dtype] = sgd_change(model, edges, cond, config)
        assert stats.clip_fraction == 0 and stats.optimizer_steps == 1
        assert all(p.dtype == torch.float32 for p in model.parameters())
    full, half = changes[torch.float32], changes[torch.bfloat16]
    relative = float((half - full).norm() / full.norm())
    assert 0 < relative < 0.1, relative


# -- config --------------------------------------------------------------------------------------

def test_cpu_offload_without_fsdp_is_a_config_error():
    with pytest.raises(ConfigError, match="run.cpu_offload.*run.parallel=fsdp"):
        load_train_config(None, "branchgrpo", ["run.cpu_offload=true"])


def test_unknown_parallel_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="run.parallel.*allowed values: ddp, fsdp"):
        load_train_config(None, "branchgrpo", ["run.parallel=zero3"])


def test_block_lists_of_the_digits_generator_are_found():
    from branchgrpo.train.distributed import transformer_blocks
    from branchgrpo.worlds.digits.generator import TRANSFORMER_CONFIG, build_transformer

    transformer = build_transformer()
    blocks = transformer_blocks(transformer)
    assert len(blocks) == TRANSFORMER_CONFIG["num_layers"] + TRANSFORMER_CONFIG["num_single_layers"]
    assert blocks[0] is transformer.transformer_blocks[0] and blocks[-1] is transformer.single_transformer_blocks[-1]
