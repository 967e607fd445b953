"""Specification tests for the frontier-batched rollout (docs/method.md §2–4, §10).

Every property is checked against an independent computation written plainly here: the docs/method.md §2
schedule and §3 transition recomputed by hand in float64, a node-at-a-time reference rollout (one
model call per node, Python loops), node counts from the split plan, and sample statistics of the
split noise against their closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch

from branchgrpo.tree.presets import method_config
from branchgrpo.tree.rollout import rollout
from policies import TinyMLPPolicy, tiny_conditioning, tiny_flux, tiny_flux_conditioning

# Nothing here trains: every hand recomputation runs without autograd.
pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matmuls: OpenMP hand-off between threads costs ~1000x the work on a 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield

DIM = 8  # TinyMLPPolicy latent size


# ---------------------------------------------------------------------------------------------
# independent helpers (docs/method.md §2–3 written out by hand, float64)
# ---------------------------------------------------------------------------------------------


def hand_sigmas(steps: int, shift: float) -> list[float]:
    """docs/method.md §2: σ_i = shift·u_i / (1 + (shift − 1)·u_i), u_i = 1 − i/T."""
    out = []
    for i in range(steps + 1):
        u = 1.0 - i / steps
        out.append(shift * u / (1.0 + (shift - 1.0) * u))
    return out


def hand_transition(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, eta: float):
    """docs/method.md §3 in float64: (ODE mean, SDE mean, std, x̂0)."""
    x = x.double()
    v = v.double()
    delta = sigma - sigma_next
    x0 = x - sigma * v
    m_ode = x - delta * v
    score = -(x - (1.0 - sigma) * x0) / sigma**2
    mu = m_ode + 0.5 * eta**2 * score * delta
    std = max(eta * math.sqrt(delta), 1e-8)
    return m_ode, mu, std, x0


def hand_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: float, reduction: str) -> float:
    """docs/method.md §3: lp = −(x' − μ)²/(2s²) − log s − ½ log 2π, reduced over all latent dims."""
    d = sample.double() - mean.double()
    elem = -(d**2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return float(elem.mean() if reduction == "mean" else elem.sum())


def expected_nodes_per_depth(split_plan: dict, steps: int, roots: int) -> list[int]:
    """Brute force: N_0 = roots, N_{i+1} = N_i · K_i."""
    counts = [roots]
    for i in range(steps):
        counts.append(counts[-1] * split_plan.get(i, 1))
    return counts


def hand_sde_steps(steps: int, split_steps, window_steps=None) -> list[bool]:
    """docs/method.md §7.4: split steps are always SDE; with a window only window ∪ splits are SDE."""
    if window_steps is None:
        return [True] * steps
    return [(i in split_steps) or (i in window_steps) for i in range(steps)]


def velocity_one(model, x: torch.Tensor, sigma: float, cond: dict, prompt: int) -> torch.Tensor:
    """One row through the model (batch of one), prompt ``prompt``'s conditioning."""
    sig = torch.full((1,), sigma, dtype=torch.float32)
    c = {k: v[prompt : prompt + 1] for k, v in cond.items()}
    return model(x.float().unsqueeze(0), sig, c)[0]


def naive_rollout(model, cond, spec, num_prompts, shape, seed, sde_steps):
    """Reference rollout: Python loop over nodes, one model call per node, float64 maths.

    The noise is drawn from the generator in the order the engine's contract fixes (one draw per
    step for all children of the frontier, docs/method.md §4): roots; then per SDE step either ``ξ`` for
    every child (K = 1, "independent", "legacy_independent" × s) or ``ξ_0`` per parent followed by
    ``ζ`` per child ("correlated"). ODE steps draw nothing.
    Returns per depth: latents [N_d, ...] float64, logp [N_d], parent [N_d], prompt [N_d], and the
    leaf x̂0 [N_T, ...].
    """
    gen = torch.Generator().manual_seed(seed)
    sig = hand_sigmas(spec.steps, spec.shift)
    rpp = spec.roots_per_prompt
    if spec.shared_root_noise:
        base = torch.randn((rpp, *shape), generator=gen)
        roots = [base[r] for p in range(num_prompts) for r in range(rpp)]
    else:
        base = torch.randn((num_prompts * rpp, *shape), generator=gen)
        roots = [base[j] for j in range(num_prompts * rpp)]
    latents = [[r.double() for r in roots]]
    prompts = [[p for p in range(num_prompts) for _ in range(rpp)]]
    parents = [[-1] * len(roots)]
    logps = [[0.0] * len(roots)]
    leaf_x0 = []
    s = spec.split_noise_scale
    for i in range(spec.steps):
        k = spec.split_plan.get(i, 1)
        n_front = len(latents[i])
        if sde_steps[i]:
            if k == 1 or spec.split_noise == "independent":
                z = torch.randn((n_front * k, *shape), generator=gen)

                def xi(n, b, z=z, k=k):
                    return z[n * k + b].double()
            elif spec.split_noise == "legacy_independent":
                z = torch.randn((n_front * k, *shape), generator=gen)

                def xi(n, b, z=z, k=k):
                    return s * z[n * k + b].double()
            else:
                z0 = torch.randn((n_front, *shape), generator=gen)
                own = torch.randn((n_front * k, *shape), generator=gen)

                def xi(n, b, z0=z0, own=own, k=k):
                    return (z0[n].double() + s * own[n * k + b].double()) / math.sqrt(1 + s * s)
        new_lat, new_pr, new_par, new_lp = [], [], [], []
        for n in range(n_front):
            x = latents[i][n]
            v = velocity_one(model, x, sig[i], cond, prompts[i][n])
            m_ode, mu, std, x0 = hand_transition(x, v, sig[i], sig[i + 1], spec.eta)
            for b in range(k):
                if sde_steps[i]:
                    child = mu + std * xi(n, b)
                    lp = hand_log_prob(child, mu, std, spec.logprob_reduction)
                else:
                    child, lp = m_ode, 0.0
                new_lat.append(child)
                new_pr.append(prompts[i][n])
                new_par.append(n)
                new_lp.append(lp)
                if i == spec.steps - 1:
                    leaf_x0.append(x0)
        latents.append(new_lat)
        prompts.append(new_pr)
        parents.append(new_par)
        logps.append(new_lp)
    return {
        "latents": [torch.stack(d) for d in latents],
        "logp": [torch.tensor(d, dtype=torch.float64) for d in logps],
        "parent": [torch.tensor(d) for d in parents],
        "prompt": [torch.tensor(d) for d in prompts],
        "leaf_x0": torch.stack(leaf_x0),
    }


class CountingModel(torch.nn.Module):
    """Wraps a velocity model and records the batch size of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, latents, sigmas, conditioning):
        self.calls.append(int(latents.shape[0]))
        assert torch.all(sigmas == sigmas[0]), "a rollout call must evaluate one step (one σ)"
        return self.inner(latents, sigmas, conditioning)


def run(model, cond, spec, num_prompts, shape=(DIM,), seed=0, micro_batch=64, **kw):
    gen = torch.Generator().manual_seed(seed)
    return rollout(model, cond, spec, num_prompts, shape, generator=gen, micro_batch=micro_batch, **kw)


@pytest.fixture(scope="module")
def mlp():
    return TinyMLPPolicy(dim=DIM, seed=0)


@pytest.fixture(scope="module")
def flux():
    model, info = tiny_flux(seed=0)
    return model, (info["tokens"], info["channels"])


# ---------------------------------------------------------------------------------------------
# shapes and NFE
# ---------------------------------------------------------------------------------------------

# (preset, num_prompts, roots per prompt, rollout calls per prompt from docs/method.md §10 where it says so)
SHAPE_CASES = [
    ("branchgrpo", 1, 1, 203),  # docs/method.md §10: F = 203 for splits (0,3,6,9), K = 2
    ("branchgrpo", 3, 1, 203),
    # sparse (0,5,10,15): frontier 1 at step 0, then 2, 4, 8 for five steps each, 16 for four
    ("branchgrpo-sparse", 2, 1, 1 + 5 * 2 + 5 * 4 + 5 * 8 + 4 * 16),
    ("branchgrpo-mixed", 2, 1, 1 + 4 * 2 + 4 * 4 + 4 * 8 + 7 * 16),  # (0,4,8,12)
    ("branchgrpo-k3", 1, 1, 1 + 3 * 3 + 3 * 9 + 3 * 27 + 10 * 81),
    ("branchgrpo-k4", 1, 1, 1 + 3 * 4 + 3 * 16 + 3 * 64 + 10 * 256),
    ("dancegrpo", 2, 1, 305),  # docs/method.md §10: one shared step-0 call + 16·19
    ("dancegrpo-indep", 2, 16, 320),  # docs/method.md §10: 16 independent roots, 16·20
    ("mixgrpo", 1, 1, 305),
]


@pytest.mark.parametrize("preset,num_prompts,rpp,calls_per_prompt", SHAPE_CASES)
def test_tree_shapes_and_rollout_calls(mlp, preset, num_prompts, rpp, calls_per_prompt):
    config = method_config(preset)
    spec = config.tree
    assert spec.roots_per_prompt == rpp
    model = CountingModel(mlp)
    micro_batch = 37  # deliberately not a divisor of any frontier size
    tree = run(model, tiny_conditioning(num_prompts), spec, num_prompts, micro_batch=micro_batch)
    counts = expected_nodes_per_depth(spec.split_plan, spec.steps, num_prompts * rpp)
    assert len(tree.latents) == len(tree.parent) == len(tree.logp) == spec.steps + 1
    for d, n in enumerate(counts):
        assert tree.latents[d].shape == (n, DIM), f"depth {d}"
        assert tree.logp[d].shape == (n,)
        assert tree.parent[d].shape == (n,)
        assert tree.group[d].shape == (n,)
    assert tree.leaf_x0.shape == (counts[-1], DIM)
    # docs/method.md §10: F = Σ_i (#frontier nodes at step i), and the hand-counted totals.
    assert tree.rollout_calls == sum(counts[:-1])
    assert tree.rollout_calls == calls_per_prompt * num_prompts
    # The engine really evaluated those rows, frontier-batched: Σ_i ceil(N_i / micro_batch) calls.
    assert sum(model.calls) == tree.rollout_calls
    assert len(model.calls) == sum(math.ceil(n / micro_batch) for n in counts[:-1])
    assert max(model.calls) <= micro_batch


def test_parent_and_group_arrays_brute_force(mlp):
    config = method_config("branchgrpo", ["tree.roots_per_prompt=2", "tree.split_plan={0: 3, 2: 2}", "tree.steps=4"])
    spec = config.tree
    num_prompts = 3
    tree = run(mlp, tiny_conditioning(num_prompts), spec, num_prompts)
    # Roots: prompt-major, roots_per_prompt each; children of one parent are contiguous.
    assert tree.group[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert tree.parent[0].tolist() == [-1] * 6
    for d in range(1, spec.steps + 1):
        k = spec.split_plan.get(d - 1, 1)
        expected_parent = [j // k for j in range(tree.parent[d].numel())]
        assert tree.parent[d].tolist() == expected_parent
        expected_group = [tree.group[d - 1][p].item() for p in expected_parent]
        assert tree.group[d].tolist() == expected_group
    # every prompt owns the same number of leaves: roots_per_prompt · Π K
    assert torch.bincount(tree.group[-1]).tolist() == [2 * 3 * 2] * num_prompts


# ---------------------------------------------------------------------------------------------
# batching invariance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["branchgrpo", "branchgrpo-mix", "dancegrpo-indep"])
def test_micro_batch_does_not_change_the_tree_mlp(mlp, preset):
    spec = method_config(preset).tree
    cond = tiny_conditioning(2)
    a = run(mlp, cond, spec, 2, seed=5, micro_batch=1)
    b = run(mlp, cond, spec, 2, seed=5, micro_batch=1024)
    # TinyMLPPolicy is row-wise in float64 and returns float32: a row's velocity does not depend
    # on its batch (up to float64 BLAS blocking, ≪ float32 ulp), and all later maths is identical
    # element-wise float32, so the trees agree to float32 rounding (1e-6 covers one ulp at |x|≈8).
    for d in range(spec.steps + 1):
        torch.testing.assert_close(a.latents[d], b.latents[d], rtol=0, atol=1e-6)
        torch.testing.assert_close(a.logp[d], b.logp[d], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.leaf_x0, b.leaf_x0, rtol=0, atol=1e-6)
    assert a.rollout_calls == b.rollout_calls


def test_micro_batch_does_not_change_the_tree_flux(flux):
    model, shape = flux
    spec = method_config("branchgrpo", ["tree.steps=6", "tree.split_plan={0: 2, 2: 2, 4: 2}"]).tree
    cond = tiny_flux_conditioning(2)
    a = run(model, cond, spec, 2, shape=shape, seed=3, micro_batch=1)
    b = run(model, cond, spec, 2, shape=shape, seed=3, micro_batch=1024)
    # float32 transformer: batch size changes the matmul blocking, so a velocity moves by a few
    # ulp (≤ 3e-7 at |v|≈1); a step scales that by Δ ≤ 0.3 and six steps add it up, giving
    # latents within ~1e-6 (measured 4.8e-7). The mean-reduced log-prob moves by
    # ≈ mean(ξ·δμ/s) with s ≥ 0.04, i.e. ≲ 1e-6 (measured 6e-8). Tolerances ~10x the estimates.
    for d in range(spec.steps + 1):
        torch.testing.assert_close(a.latents[d], b.latents[d], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.logp[d], b.logp[d], rtol=0, atol=1e-5)
    torch.testing.assert_close(a.leaf_x0, b.leaf_x0, rtol=0, atol=1e-5)
    # and the tree is not degenerate: siblings really differ
    assert (a.latents[1][0] - a.latents[1][1]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# the node-at-a-time reference
# ---------------------------------------------------------------------------------------------

NAIVE_CASES = [
    # (preset, overrides, num_prompts, iteration, sde steps by hand)
    ("branchgrpo", ["tree.steps=12"], 2, 0, None),
    ("branchgrpo", ["tree.steps=12", "tree.split_noise=legacy_independent"], 2, 0, None),
    ("branchgrpo", ["tree.steps=12", "tree.logprob_reduction=sum", "tree.eta=0.7"], 1, 0, None),
    ("branchgrpo-k3", ["tree.steps=10"], 1, 0, None),
    ("dancegrpo", ["tree.steps=6"], 2, 0, None),
    ("dancegrpo-indep", ["tree.steps=5", "tree.roots_per_prompt=3"], 2, 0, None),
    (
        "branchgrpo",
        ["tree.steps=8", "tree.split_plan={1: 2, 4: 2}", "tree.roots_per_prompt=2", "tree.shared_root_noise=true"],
        3, 0, None,
    ),
    # Mix: SDE window [0, 4) at iteration 0, [2, 6) at iteration 60 (a = min(0 + 60 // 25, 16) = 2)
    ("branchgrpo-mix", [], 2, 0, ({0, 3, 6, 9}, range(0, 4))),
    ("branchgrpo-mix", [], 1, 60, ({0, 3, 6, 9}, range(2, 6))),
]


@pytest.mark.parametrize("preset,overrides,num_prompts,iteration,sde_hand", NAIVE_CASES)
def test_batched_rollout_equals_node_at_a_time_reference(mlp, preset, overrides, num_prompts, iteration, sde_hand):
    spec = method_config(preset, overrides).tree
    cond = tiny_conditioning(num_prompts)
    sde = hand_sde_steps(spec.steps, *(sde_hand or (set(), None)))
    tree = run(mlp, cond, spec, num_prompts, seed=11, micro_batch=5, iteration=iteration)
    ref = naive_rollout(mlp, cond, spec, num_prompts, (DIM,), seed=11, sde_steps=sde)
    assert tree.sde == sde
    assert tree.rollout_calls == sum(d.shape[0] for d in ref["latents"][:-1])
    for d in range(spec.steps + 1):
        assert tree.parent[d].tolist() == ref["parent"][d].tolist(), f"depth {d}"
        assert tree.group[d].tolist() == ref["prompt"][d].tolist(), f"depth {d}"
        # float32 engine vs float64 reference: per step the difference is float32 rounding of
        # O(1) values (|x| ≤ 4, ulp ≈ 2.4e-7) fed back through the model (Lipschitz ~1) and
        # scaled by ≤ 1 + Δ; measured ≤ 1.0e-6 over all cases, tolerance 10x that.
        torch.testing.assert_close(tree.latents[d].double(), ref["latents"][d], rtol=0, atol=1e-5)
        # log-probs: the float32 cancellation x' − μ costs ~ulp/s with s ≥ 0.04 in ξ, i.e. a few
        # 1e-6 in a mean-reduced lp, ×8 for a sum (measured ≤ 4.3e-6); tolerance ~10x.
        torch.testing.assert_close(tree.logp[d].double(), ref["logp"][d], rtol=0, atol=5e-5)
    torch.testing.assert_close(tree.leaf_x0.double(), ref["leaf_x0"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# per-edge maths recomputed from the recorded tree
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sde_logp_is_gaussian_log_prob_under_parent_mean(mlp, reduction):
    spec = method_config("branchgrpo", ["tree.steps=10", f"tree.logprob_reduction={reduction}"]).tree
    cond = tiny_conditioning(2)
    tree = run(mlp, cond, spec, 2, seed=2)
    sig = hand_sigmas(spec.steps, spec.shift)
    for d in range(1, spec.steps + 1):
        i = d - 1
        parent = tree.parent[d]
        x = tree.latents[d - 1][parent]
        prompts = tree.group[d - 1][parent]
        v = mlp(x, torch.full((x.shape[0],), sig[i], dtype=torch.float32), {"prompt": cond["prompt"][prompts]})
        _, mu, std, _ = hand_transition(x, v, sig[i], sig[i + 1], spec.eta)
        normal = torch.distributions.Normal(mu, torch.full_like(mu, std))
        lp = normal.log_prob(tree.latents[d].double())
        expected = lp.mean(dim=1) if reduction == "mean" else lp.sum(dim=1)
        # as in the reference test: float32 cancellation in x' − μ, measured ≤ 4.3e-6
        torch.testing.assert_close(tree.logp[d].double(), expected, rtol=0, atol=5e-5)
        # the std is η·√Δ: the standardised residuals are O(1), not O(s) or O(1/s)
        z = (tree.latents[d].double() - mu) / std
        assert z.abs().max() < 6.0
    assert tree.logp[0].eq(0).all()


def test_ode_steps_have_zero_logp_and_euler_children(mlp):
    config = method_config("branchgrpo-mix")
    spec = config.tree
    cond = tiny_conditioning(2)
    tree = run(mlp, cond, spec, 2, seed=4, iteration=0)
    sig = hand_sigmas(spec.steps, spec.shift)
    sde_hand = hand_sde_steps(spec.steps, {0, 3, 6, 9}, range(0, 4))
    assert tree.sde == sde_hand
    ode_steps = [i for i in range(spec.steps) if not sde_hand[i]]
    assert len(ode_steps) == 20 - 6
    for i in range(spec.steps):
        d = i + 1
        parent = tree.parent[d]
        x = tree.latents[d - 1][parent]
        v = mlp(x, torch.full((x.shape[0],), sig[i], dtype=torch.float32), {"prompt": cond["prompt"][tree.group[d]]})
        m_ode, mu, _, _ = hand_transition(x, v, sig[i], sig[i + 1], spec.eta)
        if sde_hand[i]:
            assert tree.logp[d].ne(0).all()
            # an SDE child is not the Euler mean (it carries noise of std η√Δ ≥ 0.04)
            assert (tree.latents[d].double() - m_ode).abs().max() > 1e-2
        else:
            assert tree.logp[d].eq(0).all(), f"ODE step {i} must record logp 0"
            # float32 Euler step of O(1) values: a few ulp
            torch.testing.assert_close(tree.latents[d].double(), m_ode, rtol=0, atol=1e-6)


def test_leaf_x0_is_last_step_prediction_of_leaf_parent(mlp):
    spec = method_config("branchgrpo", ["tree.steps=10"]).tree
    cond = tiny_conditioning(2)
    tree = run(mlp, cond, spec, 2, seed=9, keep_node_x0=True)
    sig = hand_sigmas(spec.steps, spec.shift)
    last = spec.steps - 1
    parent = tree.parent[-1]
    x = tree.latents[last][parent]
    v = mlp(x, torch.full((x.shape[0],), sig[last], dtype=torch.float32), {"prompt": cond["prompt"][tree.group[-1]]})
    expected = x.double() - sig[last] * v.double()  # x̂0 = x − σ_{T−1}·v
    torch.testing.assert_close(tree.leaf_x0.double(), expected, rtol=0, atol=1e-6)
    # node_x0[d] is x̂0 at every node of depth d < T
    assert tree.node_x0 is not None and len(tree.node_x0) == spec.steps
    for d in range(spec.steps):
        xd = tree.latents[d]
        vd = mlp(xd, torch.full((xd.shape[0],), sig[d], dtype=torch.float32), {"prompt": cond["prompt"][tree.group[d]]})
        torch.testing.assert_close(tree.node_x0[d].double(), xd.double() - sig[d] * vd.double(), rtol=0, atol=1e-6)
    # leaves of one parent share x̂0 (it is the parent's prediction, not the leaf's)
    assert torch.equal(tree.leaf_x0, tree.node_x0[last][parent])


# ---------------------------------------------------------------------------------------------
# roots
# ---------------------------------------------------------------------------------------------


def test_shared_root_noise_gives_identical_roots_across_prompts(mlp):
    num_prompts, rpp = 4, 3
    spec = method_config(
        "branchgrpo",
        ["tree.steps=4", "tree.split_plan={1: 2}", f"tree.roots_per_prompt={rpp}", "tree.shared_root_noise=true"],
    ).tree
    tree = run(mlp, tiny_conditioning(num_prompts), spec, num_prompts, seed=1)
    roots = tree.latents[0].reshape(num_prompts, rpp, DIM)
    for p in range(1, num_prompts):
        assert torch.equal(roots[p], roots[0])
    # the roots of one prompt are still distinct draws
    assert torch.cdist(roots[0], roots[0]).add(torch.eye(rpp) * 1e9).min() > 0.1
    # without the option, every root is its own draw
    overrides = ["tree.steps=4", "tree.split_plan={1: 2}", f"tree.roots_per_prompt={rpp}"]
    spec_indep = method_config("branchgrpo", overrides).tree
    tree2 = run(mlp, tiny_conditioning(num_prompts), spec_indep, num_prompts, seed=1)
    r = tree2.latents[0]
    assert torch.cdist(r, r).add(torch.eye(r.shape[0]) * 1e9).min() > 0.1


def test_roots_per_prompt_form_one_group_each(mlp):
    num_prompts, rpp = 2, 4
    spec = method_config("dancegrpo-indep", ["tree.steps=3", f"tree.roots_per_prompt={rpp}"]).tree
    tree = run(mlp, tiny_conditioning(num_prompts), spec, num_prompts, seed=1)
    assert tree.latents[0].shape == (num_prompts * rpp, DIM)
    assert tree.group[0].tolist() == [0] * rpp + [1] * rpp
    assert tree.num_groups == num_prompts
    assert tree.rollout_calls == 3 * num_prompts * rpp


# ---------------------------------------------------------------------------------------------
# split noise statistics (docs/method.md §4, §11)
# ---------------------------------------------------------------------------------------------


def split_residuals(mode: str, s: float = 4.0, num_prompts: int = 16, dim: int = 1024):
    """Standardised deviations (x' − μ)/(η√Δ) of the K = 2 children of every root at step 0."""
    model = TinyMLPPolicy(dim=dim, seed=3)
    spec = method_config(
        "branchgrpo",
        ["tree.steps=2", "tree.split_plan={0: 2}", f"tree.split_noise={mode}", f"tree.split_noise_scale={s}"],
    ).tree
    cond = tiny_conditioning(num_prompts)
    tree = run(model, cond, spec, num_prompts, shape=(dim,), seed=7)
    sig = hand_sigmas(spec.steps, spec.shift)
    x = tree.latents[0]
    v = model(x, torch.full((num_prompts,), sig[0], dtype=torch.float32), {"prompt": cond["prompt"]})
    _, mu, std, _ = hand_transition(x, v, sig[0], sig[1], spec.eta)
    assert std == pytest.approx(spec.eta * math.sqrt(sig[0] - sig[1]))
    z = (tree.latents[1].double() - mu[tree.parent[1]]) / std
    return z.reshape(num_prompts, 2, dim)


def _sibling_corr(z: torch.Tensor) -> float:
    a, b = z[:, 0].flatten(), z[:, 1].flatten()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))


def test_correlated_split_noise_preserves_marginal_std():
    z = split_residuals("correlated", s=4.0)
    # 32768 draws: the sample std of N(0,1) has se 1/√(2n) ≈ 0.004; 0.03 is > 7 se.
    assert float(z.std()) == pytest.approx(1.0, abs=0.03)
    assert float(z.mean()) == pytest.approx(0.0, abs=0.03)
    # sibling correlation 1/(1 + s²) = 1/17 ≈ 0.059; 16384 pairs → se ≈ 0.008, tolerance ~3.5 se
    assert _sibling_corr(z) == pytest.approx(1.0 / 17.0, abs=0.03)


def test_correlated_split_noise_small_s_is_highly_correlated():
    z = split_residuals("correlated", s=0.5)
    assert float(z.std()) == pytest.approx(1.0, abs=0.03)
    assert _sibling_corr(z) == pytest.approx(1.0 / 1.25, abs=0.03)  # 1/(1 + 0.25)


def test_legacy_independent_split_noise_is_s_times_wider():
    s = 4.0
    z = split_residuals("legacy_independent", s=s)
    # authors' code: ξ = s·ζ, so the deviation from μ has std s·η·√Δ (docs/method.md §11)
    assert float(z.std()) == pytest.approx(s, rel=0.03)
    assert abs(_sibling_corr(z)) < 0.03


def test_independent_split_noise_is_standard_and_uncorrelated():
    z = split_residuals("independent")
    assert float(z.std()) == pytest.approx(1.0, abs=0.03)
    assert abs(_sibling_corr(z)) < 0.03


# ---------------------------------------------------------------------------------------------
# prompt conditioning per row
# ---------------------------------------------------------------------------------------------


def test_each_tree_is_conditioned_on_its_own_prompt_mlp(mlp):
    num_prompts = 3
    spec = method_config(
        "branchgrpo", ["tree.steps=8", "tree.split_plan={0: 2, 3: 2}", "tree.shared_root_noise=true"]
    ).tree
    cond = tiny_conditioning(num_prompts)
    changed = {"prompt": cond["prompt"].clone()}
    changed["prompt"][1] += 1.5
    a = run(mlp, cond, spec, num_prompts, seed=6, micro_batch=5)
    b = run(mlp, changed, spec, num_prompts, seed=6, micro_batch=5)
    for d in range(1, spec.steps + 1):
        mine = a.group[d] == 1
        # trees of prompts 0 and 2 see the same rows and the same noise: unchanged (float32 ulp)
        torch.testing.assert_close(a.latents[d][~mine], b.latents[d][~mine], rtol=0, atol=1e-6)
        # every node of prompt 1's tree moved
        assert ((a.latents[d][mine] - b.latents[d][mine]).abs().amax(dim=1) > 1e-4).all(), f"depth {d}"
    # (the node-at-a-time reference, with shared root noise and 3 prompts, additionally checks
    # that each node's velocity used exactly its tree's prompt row)


def test_each_tree_is_conditioned_on_its_own_prompt_flux(flux):
    model, shape = flux
    num_prompts = 3
    spec = method_config("branchgrpo", ["tree.steps=3", "tree.split_plan={0: 2}"]).tree
    cond = tiny_flux_conditioning(num_prompts)
    changed = {k: v.clone() for k, v in cond.items()}
    changed["prompt_embeds"][2] += 1.0
    a = run(model, cond, spec, num_prompts, shape=shape, seed=6, micro_batch=4)
    b = run(model, changed, spec, num_prompts, shape=shape, seed=6, micro_batch=4)
    for d in range(1, spec.steps + 1):
        mine = a.group[d] == 2
        # float32 attention per sample; batch composition only changes rounding (see above)
        torch.testing.assert_close(a.latents[d][~mine], b.latents[d][~mine], rtol=0, atol=1e-5)
        diff = (a.latents[d][mine] - b.latents[d][mine]).flatten(1).abs().amax(dim=1)
        assert (diff > 1e-4).all(), f"depth {d}"
