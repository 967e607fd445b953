"""Specification tests for the policy update (docs/method.md §7–8).

The reference for every gradient here is a naive loss written from docs/method.md §3/§8 in this file: a
Python loop over trained edges read straight off the rollout tree, one model forward per *edge*
(no parent sharing), the transition mean and Gaussian log-prob by hand in float64, and the clipped
surrogate as a max of two scalars. ``policy_update`` is run with plain SGD (lr = 1, no weight
decay) and no gradient clipping, so its parameter change is exactly minus its gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import rollout
from branchgrpo.tree.scoring import score_tree
from branchgrpo.update import all_finite, edge_log_probs, gather_training_edges, policy_update
from policies import TinyMLPPolicy, tiny_conditioning, tiny_flux, tiny_flux_conditioning

DIM = 8


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matmuls: OpenMP hand-off between threads costs ~1000x the work on a 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def flux():
    model, info = tiny_flux(seed=0)
    return model, (info["tokens"], info["channels"])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def hand_sigmas(steps: int, shift: float) -> list[float]:
    """docs/method.md §2."""
    return [shift * (1 - i / steps) / (1 + (shift - 1) * (1 - i / steps)) for i in range(steps + 1)]


def hand_mean_std(x, v, sigma: float, sigma_next: float, eta: float):
    """docs/method.md §3 SDE mean and std, float64."""
    x, v = x.double(), v.double()
    delta = sigma - sigma_next
    x0 = x - sigma * v
    score = -(x - (1 - sigma) * x0) / sigma**2
    mu = x - delta * v + 0.5 * eta**2 * score * delta
    return mu, max(eta * math.sqrt(delta), 1e-8)


def hand_log_prob(sample, mu, std: float, reduction: str):
    elem = -((sample.double() - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return elem.mean() if reduction == "mean" else elem.sum()


def hand_surrogate(lp_new, lp_old: float, adv: float, eps: float):
    """docs/method.md §8: L = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) for one edge (autograd through ρ)."""
    rho = torch.exp(lp_new - lp_old)
    clipped = torch.clamp(rho, 1 - eps, 1 + eps)
    return torch.maximum(-adv * rho, -adv * clipped), rho


def scored_tree(model, cond, config, num_prompts, shape=(DIM,), seed=0):
    gen = torch.Generator().manual_seed(seed)
    tree = rollout(
        model, cond, config.tree, num_prompts, shape, generator=gen, micro_batch=config.engine.rollout_micro_batch
    )
    rewards = torch.randn(tree.parent[-1].numel(), generator=torch.Generator().manual_seed(seed + 100))
    scores = score_tree(tree, rewards, config)
    return tree, scores


def trained_edge_list(tree, scores):
    """Brute force: every selected edge as (step, parent latent, child, lp_old, A, prompt, parent id)."""
    out = []
    for d in range(1, len(tree.parent)):
        for j in range(tree.parent[d].numel()):
            if not bool(scores.selection.mask[d][j]):
                continue
            p = int(tree.parent[d][j])
            out.append(
                dict(
                    step=d - 1, x=tree.latents[d - 1][p], child=tree.latents[d][j], lp_old=float(tree.logp[d][j]),
                    adv=float(scores.edge_advantage[d][j]), prompt=int(tree.group[d][j]), parent=(d - 1, p),
                )
            )
    return out


def forward_one(model, x, sigma: float, cond, prompt: int):
    c = {k: v[prompt : prompt + 1] for k, v in cond.items()}
    return model(x.unsqueeze(0), torch.full((1,), sigma, dtype=torch.float32), c)[0]


def naive_loss(model, cond, config, edge_list, reference=None, kl_coef=0.0):
    """Mean over edges of the docs/method.md §8 per-edge loss, one forward per edge. Returns (loss, info)."""
    spec = config.tree
    sig = hand_sigmas(spec.steps, spec.shift)
    total, kl_total, ratios, clipped = 0.0, 0.0, [], 0
    for e in edge_list:
        i = e["step"]
        v = forward_one(model, e["x"], sig[i], cond, e["prompt"])
        mu, std = hand_mean_std(e["x"], v, sig[i], sig[i + 1], spec.eta)
        lp = hand_log_prob(e["child"], mu, std, spec.logprob_reduction)
        loss_e, rho = hand_surrogate(lp, e["lp_old"], e["adv"], config.update.clip_range)
        total = total + loss_e
        ratios.append(float(rho.detach()))
        clipped += abs(float(rho.detach()) - 1) > config.update.clip_range
        if reference is not None:
            with torch.no_grad():
                v_ref = forward_one(reference, e["x"], sig[i], cond, e["prompt"])
                mu_ref, _ = hand_mean_std(e["x"], v_ref, sig[i], sig[i + 1], spec.eta)
            sq = (mu - mu_ref) ** 2 / (2 * std**2)  # docs/method.md §8 / Flow-GRPO: ‖μ − μ_ref‖²/(2s²)
            kl_e = sq.mean() if spec.logprob_reduction == "mean" else sq.sum()
            kl_total = kl_total + kl_e
            total = total + kl_coef * kl_e
    n = len(edge_list)
    return total / n, dict(ratios=ratios, clipped=clipped, kl=float(kl_total) / n if reference is not None else 0.0)


def grads_of(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def sgd_update(model, edges, cond, config, **kw):
    """Run policy_update with SGD(lr=1): returns (stats, gradient read from the parameter change)."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = policy_update(model, optimizer, edges, cond, config, generator=torch.Generator().manual_seed(0), **kw)
    change = [b - p.detach() for b, p in zip(before, model.parameters())]
    return stats, change


def perturbed(model, scale=0.05, seed=42):
    """A copy of the policy with every parameter moved by ``scale``·N(0, 1) (off-policy ratios)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def assert_grads_close(got, want, rtol):
    """Per-tensor comparison scaled by the tensor's largest entry."""
    for g, w in zip(got, want):
        scale = float(w.abs().max())
        assert scale > 0
        torch.testing.assert_close(g, w, rtol=0, atol=rtol * scale)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, latents, sigmas, conditioning):
        self.rows.append(int(latents.shape[0]))
        return self.inner(latents, sigmas, conditioning)


BASE = ["tree.steps=8", "tree.split_plan={0: 2, 3: 2, 5: 2}"]


# ---------------------------------------------------------------------------------------------
# on-policy ratio
# ---------------------------------------------------------------------------------------------

RATIO_CASES = [
    # (preset, rollout micro-batch, train micro-batch, shuffle)
    ("branchgrpo", 1, 1, False),
    ("branchgrpo", 1024, 1024, True),
    ("branchgrpo", 7, 3, True),
    ("branchgrpo", 64, 16, False),
    ("branchgrpo-mix", 5, 4, True),
    ("dancegrpo", 3, 2, True),
]


def _ratio_check(model, cond, shape, preset, rmb, tmb, shuffle, tol):
    overrides = [
        f"engine.rollout_micro_batch={rmb}", f"engine.train_micro_batch={tmb}", f"update.shuffle_edges={shuffle}"
    ]
    if preset == "branchgrpo":
        overrides += BASE
    elif preset == "dancegrpo":
        overrides += ["tree.steps=4"]
    config = method_config(preset, overrides)
    tree, scores = scored_tree(model, cond, config, 2, shape=shape, seed=rmb + tmb)
    edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
    assert edges.num_edges == scores.selection.trained_edges > 0
    # only SDE steps are trained (docs/method.md §7.4): every trained edge has a non-zero old log-prob
    assert (edges.lp_old != 0).all()
    # (a) edge_log_probs over all parents, micro-batched like the trainer
    counts = edges.edges_per_parent()
    starts = torch.cumsum(counts, 0) - counts
    order = torch.randperm(edges.num_parents, generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(edges.num_edges, dtype=torch.long)
    with torch.no_grad():
        for parents in order.split(tmb):
            lp_new, rows, _, _ = edge_log_probs(model, edges, parents, cond, config, starts, counts)
            seen[rows] += 1
            ratio = torch.exp(lp_new - edges.lp_old[rows])
            assert float((ratio - 1).abs().max()) <= tol
    assert seen.eq(1).all(), "every trained edge must be evaluated exactly once"
    # (b) the trainer's own measurement before its first step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    saved = copy.deepcopy(model.state_dict())
    stats = policy_update(model, optimizer, edges, cond, config, generator=torch.Generator().manual_seed(2))
    model.load_state_dict(saved)
    assert stats.trained_edges == edges.num_edges
    assert stats.ratio_max_deviation_first_step <= tol
    assert stats.clip_fraction == 0.0


@pytest.mark.parametrize("preset,rmb,tmb,shuffle", RATIO_CASES)
def test_on_policy_ratio_is_one_mlp(preset, rmb, tmb, shuffle):
    model = TinyMLPPolicy(dim=DIM, seed=0)
    # float64 row-wise model, float32 log-probs computed by the same float32 ops in rollout and
    # training: any deviation is float32 rounding of lp (|lp| ~ 1, ulp 1e-7); 1e-6 is 10 ulp.
    _ratio_check(model, tiny_conditioning(2), (DIM,), preset, rmb, tmb, shuffle, tol=1e-6)


@pytest.mark.parametrize("preset,rmb,tmb,shuffle", [c for c in RATIO_CASES if c[0] != "dancegrpo"][:4])
def test_on_policy_ratio_is_one_flux(flux, preset, rmb, tmb, shuffle):
    model, shape = flux
    # float32 transformer: batch composition moves v by a few ulp, lp by ≈ mean(ξ·Δ·δv/s) ≲ 1e-6
    # (measured ≤ 1e-7 in the rollout tests); ε = 1e-3 is the FLUX clip range, 1e-5 is 100x below.
    _ratio_check(model, tiny_flux_conditioning(2), shape, preset, rmb, tmb, shuffle, tol=1e-5)


# ---------------------------------------------------------------------------------------------
# gradient of the loss
# ---------------------------------------------------------------------------------------------


def _clip_between_ratios(ratios):
    """A clip range halfway between two consecutive |ρ − 1| near the median (no edge at the edge)."""
    dev = sorted(abs(r - 1) for r in ratios)
    m = len(dev) // 2
    return 0.5 * (dev[m - 1] + dev[m])


@pytest.mark.parametrize("reduction,tmb,shuffle", [("mean", 3, True), ("mean", 1000, False), ("sum", 1, True)])
def test_shared_parent_gradient_equals_per_edge_reference(reduction, tmb, shuffle):
    old = TinyMLPPolicy(dim=DIM, seed=0)
    cond = tiny_conditioning(2)
    config = method_config(
        "branchgrpo", BASE + [f"tree.logprob_reduction={reduction}", f"engine.train_micro_batch={tmb}",
                              f"update.shuffle_edges={shuffle}", "update.max_grad_norm=0"],
    )
    tree, scores = scored_tree(old, cond, config, 2, seed=3)
    edge_list = trained_edge_list(tree, scores)
    current = perturbed(old, scale=0.05 if reduction == "mean" else 0.01)
    # choose ε so that about half the edges are clipped
    with torch.no_grad():
        _, info = naive_loss(current, cond, config, edge_list)
    config.update.clip_range = _clip_between_ratios(info["ratios"])
    naive_model = copy.deepcopy(current)
    loss, info = naive_loss(naive_model, cond, config, edge_list)
    loss.backward()
    want = grads_of(naive_model)
    # both kinds of clipping happen, and so do active edges
    eps = config.update.clip_range
    clipped_pos = sum(1 for e, r in zip(edge_list, info["ratios"]) if e["adv"] > 0 and r > 1 + eps)
    clipped_neg = sum(1 for e, r in zip(edge_list, info["ratios"]) if e["adv"] < 0 and r < 1 - eps)
    assert clipped_pos > 0 and clipped_neg > 0 and info["clipped"] < len(edge_list)

    model = CountingModel(copy.deepcopy(current))
    edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
    stats, change = sgd_update(model, edges, cond, config)
    # amortisation: one forward row per distinct parent, fewer than edges (docs/method.md §7, §10)
    distinct_parents = {e["parent"] for e in edge_list}
    assert stats.training_forwards == edges.num_parents == len(distinct_parents) == sum(model.rows)
    assert stats.trained_edges == len(edge_list) > len(distinct_parents)
    # float32 lp in the engine vs float64 here: relative error of each per-edge term ~1e-6
    # (float32 rounding amplified by 1/s ≤ 25); measured ≤ 5e-6 of the largest entry, tol 1e-4.
    assert_grads_close(grads_of(model), want, rtol=1e-4)
    assert_grads_close(change, want, rtol=1e-4)  # SGD lr = 1: Δθ = −∇L, one optimizer step
    assert stats.optimizer_steps == 1
    assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-7)
    assert stats.clip_fraction == pytest.approx(info["clipped"] / len(edge_list))


def test_gradient_clipping_scales_the_step():
    old = TinyMLPPolicy(dim=DIM, seed=0)
    cond = tiny_conditioning(2)
    config = method_config("branchgrpo", BASE + ["update.clip_range=10"])
    tree, scores = scored_tree(old, cond, config, 2, seed=5)
    edge_list = trained_edge_list(tree, scores)
    naive_model = copy.deepcopy(old)
    loss, _ = naive_loss(naive_model, cond, config, edge_list)
    loss.backward()
    want = grads_of(naive_model)
    norm = math.sqrt(sum(float((g**2).sum()) for g in want))
    config.update.max_grad_norm = 0.25 * norm  # clipping is active
    edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
    stats, change = sgd_update(copy.deepcopy(old), edges, cond, config)
    assert stats.grad_norms[0] == pytest.approx(norm, rel=1e-4)  # reported before clipping
    assert_grads_close(change, [0.25 * g for g in want], rtol=1e-4)


def test_train_micro_batch_and_shuffle_do_not_change_the_gradient():
    old = TinyMLPPolicy(dim=DIM, seed=0)
    cond = tiny_conditioning(2)
    current = perturbed(old)
    results = []
    for tmb, shuffle in [(1, True), (5, True), (10_000, False)]:
        config = method_config(
            "branchgrpo", BASE + [f"engine.train_micro_batch={tmb}", f"update.shuffle_edges={shuffle}",
                                  "update.max_grad_norm=0", "update.clip_range=0.01"],
        )
        tree, scores = scored_tree(old, cond, config, 2, seed=8)
        edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
        _, change = sgd_update(copy.deepcopy(current), edges, cond, config)
        results.append(change)
    # each edge's gradient is the same float32 computation whatever its micro-batch; only the
    # float64 accumulation order of the parameter gradients differs (measured 2e-15 relative)
    for other in results[1:]:
        assert_grads_close(other, results[0], rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# zero-advantage skip (docs/method.md §7.1: exact)
# ---------------------------------------------------------------------------------------------


def test_zero_advantage_skip_is_exact():
    old = TinyMLPPolicy(dim=DIM, seed=0)
    cond = tiny_conditioning(2)
    current = perturbed(old)
    overrides = ["tree.steps=8", "tree.split_plan={2: 2, 5: 2}", "update.max_grad_norm=0", "update.clip_range=0.01"]
    changes, trained = {}, {}
    for skip in (True, False):
        config = method_config("branchgrpo", overrides + [f"selection.skip_zero_advantage={skip}"])
        tree, scores = scored_tree(old, cond, config, 2, seed=4)
        # the trunk (depths 1–2: one node per tree) has advantage exactly 0 (docs/method.md §6)
        assert scores.edge_advantage[1].eq(0).all() and scores.edge_advantage[2].eq(0).all()
        assert scores.edge_advantage[3].ne(0).all()
        edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
        stats, changes[skip] = sgd_update(copy.deepcopy(current), edges, cond, config)
        trained[skip] = stats.trained_edges
    assert trained[False] == trained[True] + 2 * 2  # 2 trees × 2 trunk edges
    ratio = math.sqrt(sum(float((a**2).sum()) for a in changes[True])) / math.sqrt(
        sum(float((b**2).sum()) for b in changes[False])
    )
    # skipping edges that contribute exactly zero gradient must leave the update unchanged
    # (float32 summation order only: 1e-5 relative)
    for a, b in zip(changes[True], changes[False]):
        scale = float(b.abs().max())
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * scale), (
            f"gradient with skip_zero_advantage=True is {ratio:.4f}x the one without "
            f"(trained edges {trained[True]} vs {trained[False]})"
        )


# ---------------------------------------------------------------------------------------------
# optimizer steps per iteration
# ---------------------------------------------------------------------------------------------


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, model, **kw):
        super().__init__(params, **kw)
        self.model = model
        self.rows_at_step: list[int] = []

    def step(self, closure=None):
        self.rows_at_step.append(sum(self.model.rows))
        return super().step(closure)


@pytest.mark.parametrize("updates", [1, 2, 3, 7])
def test_updates_per_iteration_gives_that_many_optimizer_steps(updates):
    cond = tiny_conditioning(2)
    overrides = [f"update.updates_per_iteration={updates}", "engine.train_micro_batch=4"]
    config = method_config("branchgrpo", BASE + overrides)
    policy = TinyMLPPolicy(dim=DIM, seed=0)
    tree, scores = scored_tree(policy, cond, config, 2, seed=6)
    edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
    assert edges.num_parents >= updates
    model = CountingModel(policy)
    optimizer = CountingSGD(model.parameters(), model, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    stats = policy_update(model, optimizer, edges, cond, config, generator=torch.Generator().manual_seed(0))
    assert stats.optimizer_steps == updates == len(optimizer.rows_at_step) == len(stats.grad_norms)
    # every parent is forwarded exactly once per iteration, split evenly among the steps
    assert sum(model.rows) == edges.num_parents
    per_step = [b - a for a, b in zip([0] + optimizer.rows_at_step[:-1], optimizer.rows_at_step)]
    assert sum(per_step) == edges.num_parents
    assert max(per_step) - min(per_step) <= 1
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------
# KL to a reference (docs/method.md §8, Flow-GRPO)
# ---------------------------------------------------------------------------------------------


def _kl_setup(reduction="mean"):
    policy = TinyMLPPolicy(dim=DIM, seed=0)
    cond = tiny_conditioning(2)
    config = method_config("branchgrpo", BASE + ["update.max_grad_norm=0", f"tree.logprob_reduction={reduction}"])
    tree, scores = scored_tree(policy, cond, config, 2, seed=7)
    edges = gather_training_edges(tree, scores.selection, scores.edge_advantage)
    return policy, cond, config, tree, scores, edges


def test_kl_without_reference_raises():
    policy, cond, config, _, _, edges = _kl_setup()
    config.update.kl_coef = 0.1
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(ValueError, match="reference"):
        policy_update(policy, optimizer, edges, cond, config)
    assert all(torch.equal(b, p) for b, p in zip(before, policy.parameters()))


def test_kl_to_identical_reference_is_zero():
    policy, cond, config, _, _, edges = _kl_setup()
    _, change_plain = sgd_update(copy.deepcopy(policy), edges, cond, config)
    config.update.kl_coef = 0.5
    stats, change_kl = sgd_update(copy.deepcopy(policy), edges, cond, config, reference_model=copy.deepcopy(policy))
    assert stats.kl == 0.0
    for a, b in zip(change_kl, change_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_gradient_matches_closed_form(reduction):
    policy, cond, config, tree, scores, edges = _kl_setup(reduction)
    reference = perturbed(policy, scale=0.05, seed=9)
    kl_coef = 0.3
    config.update.kl_coef = kl_coef
    # zero advantages isolate the KL term: the surrogate then has zero gradient
    zero_adv = dataclasses.replace(edges, advantage=torch.zeros_like(edges.advantage))
    edge_list = [dict(e, adv=0.0) for e in trained_edge_list(tree, scores)]
    naive_model = copy.deepcopy(policy)
    loss, info = naive_loss(naive_model, cond, config, edge_list, reference=reference, kl_coef=kl_coef)
    loss.backward()
    want = grads_of(naive_model)
    assert info["kl"] > 0
    stats, change = sgd_update(copy.deepcopy(policy), zero_adv, cond, config, reference_model=reference)
    # KL(N(μ, s²) ‖ N(μ_ref, s²)) = ‖μ − μ_ref‖²/(2s²), reduced like the log-prob, mean over edges;
    # float32 means in the engine vs float64 here: ~1e-6 relative; tolerance 1e-4.
    assert stats.kl == pytest.approx(info["kl"], rel=1e-4)
    assert_grads_close(change, want, rtol=1e-4)


def test_make_adamw_is_torchs_adamw_fused_where_it_can_be():
    """The trainer's optimizer: the fused kernel on plain CPU tensors, the same steps as the default
    (per-tensor) AdamW up to float rounding; the default where the fused kernel does not apply."""
    from branchgrpo.update import make_adamw

    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    fast, reference = make_adamw(ours, 1e-2, 1e-4), torch.optim.AdamW(plain, lr=1e-2, weight_decay=1e-4)
    assert fast.defaults["fused"] is True and not reference.defaults.get("fused")
    for _ in range(5):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for params, optimizer in ((ours, fast), (plain, reference)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b, before in zip(ours, plain, start):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert (a - before).abs().min() > 1e-3  # five steps of lr 1e-2 moved every entry
    assert not make_adamw([torch.nn.Parameter(torch.zeros(3, dtype=torch.int64).float().to("meta"))], 1e-3, 0).defaults.get("fused")
    assert not make_adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], 1e-3, 0).defaults.get("fused")


def test_a_loaded_optimizer_state_keeps_the_loading_optimizers_kernel():
    """A state saved by the fused optimizer, loaded into one without it (as FSDP shards are), keeps
    the loader's choice; the hyperparameters and moments come from the save."""
    from branchgrpo.train.checkpoint import _place_optimizer_state
    from branchgrpo.update import make_adamw

    saved_params = [torch.nn.Parameter(torch.ones(3))]
    saver = make_adamw(saved_params, 1e-2, 0.1)
    saved_params[0].grad = torch.full((3,), 0.5)
    saver.step()
    loader = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    loader.load_state_dict(_place_optimizer_state(loader, saver.state_dict()))
    group = loader.param_groups[0]
    assert saver.param_groups[0]["fused"] is True and not group["fused"]
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.1
    torch.testing.assert_close(loader.state[loader.param_groups[0]["params"][0]]["exp_avg"], torch.full((3,), 0.05))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_every_tensor_checked_one_by_one(dtype):
    """One max-norm and one sync agree with an isfinite check per tensor: NaN and ±inf anywhere,
    large finite values (whose 2-norm would overflow), empty tensors and an empty list."""
    big = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        tensors = [torch.randn(int(torch.randint(0, 6, (1,), generator=gen)), 3, generator=gen).to(dtype)
                   for _ in range(int(torch.randint(1, 5, (1,), generator=gen)))]
        for t in tensors:
            if t.numel() and trial % 4:
                flat = t.view(-1)
                flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = [
                    float("nan"), float("inf"), -float("inf"), big][trial % 4]
        expected = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert all_finite(tensors) == expected
    assert all_finite([]) and all_finite([torch.zeros(0)])
    assert all_finite([torch.full((8,), big, dtype=dtype)])
