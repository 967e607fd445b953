"""Specification tests for the schedule, one SDE/ODE transition and its log-prob (docs/method.md §2–4).

Every expected value is computed independently in the test: closed forms in plain Python floats,
``torch.distributions.Normal`` for densities, and sample moments with tolerances derived from the
sample size (5 standard errors, stated next to each check).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from branchgrpo.sde import correlated_split_noise, gaussian_log_prob, sigma_schedule, transition_mean


# ---------------------------------------------------------------------------------------------
# §2 schedule
# ---------------------------------------------------------------------------------------------


def _sigma_by_hand(steps: int, shift: float) -> list[float]:
    out = []
    for i in range(steps + 1):
        u = 1.0 - i / steps  # linspace(1, 0, T + 1)
        out.append(shift * u / (1.0 + (shift - 1.0) * u))
    return out


@pytest.mark.parametrize("steps,shift", [(20, 3.0), (20, 1.0), (7, 0.5), (1, 3.0), (50, 5.0)])
def test_sigma_schedule_matches_formula(steps, shift):
    sigmas = sigma_schedule(steps, shift)
    assert sigmas.dtype == torch.float64
    assert sigmas.shape == (steps + 1,)
    expected = _sigma_by_hand(steps, shift)
    for i in range(steps + 1):
        assert sigmas[i].item() == pytest.approx(expected[i], rel=1e-12, abs=1e-14)
    assert sigmas[0].item() == pytest.approx(1.0, abs=1e-14)
    assert sigmas[-1].item() == pytest.approx(0.0, abs=1e-14)
    assert all(sigmas[i] > sigmas[i + 1] for i in range(steps))  # Δ_i > 0


def test_sigma_schedule_flux_values():
    # T = 20, shift = 3: σ_1 = 3·0.95 / (1 + 2·0.95) = 2.85 / 2.9; σ_10 = 1.5 / 2 = 0.75
    sigmas = sigma_schedule(20, 3.0)
    assert sigmas[1].item() == pytest.approx(2.85 / 2.9, rel=1e-12)
    assert sigmas[10].item() == pytest.approx(0.75, rel=1e-12)
    assert sigmas[19].item() == pytest.approx(0.15 / 1.1, rel=1e-12)


def test_sigma_schedule_shift_one_is_linear():
    sigmas = sigma_schedule(20, 1.0)
    for i in range(21):
        assert sigmas[i].item() == pytest.approx(1.0 - i / 20.0, abs=1e-14)
    deltas = sigmas[:-1] - sigmas[1:]
    assert torch.allclose(deltas, torch.full_like(deltas, 0.05), atol=1e-14)


# ---------------------------------------------------------------------------------------------
# §3 one transition
# ---------------------------------------------------------------------------------------------


def _transition_by_hand(x: float, v: float, s: float, s_next: float, eta: float, sde: bool):
    """docs/method.md §3 for one scalar element, in Python floats."""
    delta = s - s_next
    x0 = x - s * v
    m_ode = x - delta * v
    score = -(x - (1.0 - s) * x0) / (s * s)
    mu = m_ode + 0.5 * eta * eta * score * delta
    std = max(eta * math.sqrt(delta), 1e-8)
    return (mu if sde else m_ode), std, x0


def _check_transition(x, v, sig, sig_next, eta, sde_rows, mean, std, x0):
    n = x.shape[0]
    flat_x = x.double().reshape(n, -1)
    flat_v = v.double().reshape(n, -1)
    flat_mean = mean.double().reshape(n, -1)
    flat_x0 = x0.double().reshape(n, -1)
    std_rows = std.double().reshape(-1)
    for r in range(n):
        for j in range(flat_x.shape[1]):
            m, sd, p0 = _transition_by_hand(
                flat_x[r, j].item(), flat_v[r, j].item(), sig[r], sig_next[r], eta, sde_rows[r]
            )
            # float32 arithmetic on O(1) values: 1e-5 relative / absolute is ~100 ulps
            assert flat_mean[r, j].item() == pytest.approx(m, rel=1e-5, abs=1e-5)
            assert flat_x0[r, j].item() == pytest.approx(p0, rel=1e-5, abs=1e-5)
        expected_std = _transition_by_hand(0.0, 0.0, sig[r], sig_next[r], eta, True)[1]
        got_std = std_rows[r].item() if std_rows.numel() > 1 else std_rows[0].item()
        assert got_std == pytest.approx(expected_std, rel=1e-5)


@pytest.mark.parametrize("step", [0, 1, 9, 19])
@pytest.mark.parametrize("sde", [True, False])
def test_transition_mean_scalar_sigma_matches_spec(step, sde):
    gen = torch.Generator().manual_seed(10 + step)
    x = torch.randn(4, 3, 2, generator=gen)
    v = torch.randn(4, 3, 2, generator=gen)
    sigmas = _sigma_by_hand(20, 3.0)
    s, s_next = sigmas[step], sigmas[step + 1]
    mean, std, x0 = transition_mean(x, v, s, s_next, eta=0.3, sde=sde)
    assert mean.dtype == torch.float32 and x0.dtype == torch.float32 and std.dtype == torch.float32
    assert mean.shape == x.shape and x0.shape == x.shape
    assert std.numel() == 1
    _check_transition(x, v, [s] * 4, [s_next] * 4, 0.3, [sde] * 4, mean, std, x0)


def test_transition_mean_per_row_sigma_and_sde_mask():
    """One micro-batch mixing edges of different steps, SDE and ODE rows (docs/method.md §3, §7)."""
    gen = torch.Generator().manual_seed(3)
    steps = [0, 5, 5, 19, 12, 3, 18, 0]
    sde_rows = [True, False, True, True, False, True, False, False]
    n = len(steps)
    x = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)  # float64 in, float32 out
    v = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)
    sigmas = _sigma_by_hand(20, 3.0)
    sig = [sigmas[i] for i in steps]
    sig_next = [sigmas[i + 1] for i in steps]
    mean, std, x0 = transition_mean(
        x, v, torch.tensor(sig, dtype=torch.float64), torch.tensor(sig_next, dtype=torch.float64),
        eta=0.7, sde=torch.tensor(sde_rows),
    )
    assert mean.dtype == torch.float32 and std.dtype == torch.float32 and x0.dtype == torch.float32
    assert std.shape == (n,)
    _check_transition(x, v, sig, sig_next, 0.7, sde_rows, mean, std, x0)


def test_transition_mean_per_row_equals_row_by_row():
    """Batching rows of different steps gives each row what it would get alone."""
    gen = torch.Generator().manual_seed(4)
    steps = [2, 17, 0, 9]
    sigmas = sigma_schedule(20, 3.0)
    x = torch.randn(4, 5, generator=gen)
    v = torch.randn(4, 5, generator=gen)
    mask = torch.tensor([True, True, False, True])
    mean, std, x0 = transition_mean(x, v, sigmas[steps], sigmas[[i + 1 for i in steps]], 0.3, sde=mask)
    for r, i in enumerate(steps):
        m_r, s_r, p_r = transition_mean(x[r : r + 1], v[r : r + 1], float(sigmas[i]), float(sigmas[i + 1]), 0.3, sde=bool(mask[r]))
        assert torch.allclose(mean[r], m_r[0], atol=1e-6)
        assert torch.allclose(x0[r], p_r[0], atol=1e-6)
        assert std[r].item() == pytest.approx(float(s_r), rel=1e-6)


def test_transition_first_step_score_is_minus_x():
    # σ_0 = 1: x̂0 enters the score with weight 1 − σ = 0, so score = −x and
    # μ = x − Δ·v − ½η²Δ·x exactly.
    x = torch.tensor([[1.0, -2.0, 0.5]])
    v = torch.tensor([[0.3, 0.1, -1.0]])
    delta = 0.25
    mean, std, _ = transition_mean(x, v, 1.0, 1.0 - delta, eta=0.6)
    expected = x - delta * v - 0.5 * 0.36 * delta * x
    assert torch.allclose(mean, expected, atol=1e-6)
    assert float(std) == pytest.approx(0.6 * 0.5, rel=1e-6)


def test_transition_ode_rows_ignore_eta():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=gen)
    v = torch.randn(3, 4, generator=gen)
    m1, _, _ = transition_mean(x, v, 0.6, 0.5, eta=0.3, sde=False)
    m2, _, _ = transition_mean(x, v, 0.6, 0.5, eta=2.0, sde=False)
    assert torch.allclose(m1, m2)
    assert torch.allclose(m1, x - 0.1 * v, atol=1e-6)


def test_transition_std_floor():
    x = torch.ones(2, 3)
    v = torch.ones(2, 3)
    # η = 0: std would be 0; the guard makes it 1e-8 and the SDE mean equals the ODE mean.
    mean, std, _ = transition_mean(x, v, torch.tensor([0.5, 0.9]), torch.tensor([0.4, 0.2]), eta=0.0, sde=True)
    assert torch.all(std == torch.tensor(1e-8, dtype=torch.float32))
    assert torch.allclose(mean[0], x[0] - 0.1 * v[0], atol=1e-6)
    assert torch.allclose(mean[1], x[1] - 0.7 * v[1], atol=1e-6)
    # η tiny: η·√Δ below the floor is raised to it; above the floor it is kept.
    _, std, _ = transition_mean(x, v, torch.tensor([0.5, 0.5]), torch.tensor([0.5 - 1e-4, 0.0]), eta=1e-7)
    assert std[0].item() == pytest.approx(1e-8, rel=1e-6)  # 1e-7·1e-2 = 1e-9 < 1e-8
    assert std[1].item() == pytest.approx(1e-7 * math.sqrt(0.5), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# §3 log-prob
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_log_prob_matches_torch_normal_per_row_std(reduction):
    gen = torch.Generator().manual_seed(6)
    mean = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    std = torch.tensor([0.01, 0.1, 0.3, 1.0, 2.5], dtype=torch.float64)
    sample = mean + std.reshape(-1, 1, 1) * torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    got = gaussian_log_prob(sample, mean, std, reduction)
    assert got.dtype == torch.float32  # float32 output even for float64 inputs
    assert got.shape == (5,)
    for r in range(5):
        ref = torch.distributions.Normal(mean[r], std[r]).log_prob(sample[r])
        expected = ref.mean() if reduction == "mean" else ref.sum()
        assert got[r].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_log_prob_scalar_std(reduction):
    gen = torch.Generator().manual_seed(7)
    mean = torch.randn(3, 6, generator=gen)
    sample = torch.randn(3, 6, generator=gen)
    got = gaussian_log_prob(sample, mean, 0.2, reduction)
    assert got.dtype == torch.float32
    for r in range(3):
        terms = [
            -((sample[r, j].item() - mean[r, j].item()) ** 2) / (2 * 0.04) - math.log(0.2) - 0.5 * math.log(2 * math.pi)
            for j in range(6)
        ]
        expected = sum(terms) / 6 if reduction == "mean" else sum(terms)
        assert got[r].item() == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_gaussian_log_prob_default_is_mean():
    sample = torch.zeros(2, 4)
    mean = torch.ones(2, 4)
    assert torch.allclose(gaussian_log_prob(sample, mean, 1.0), gaussian_log_prob(sample, mean, 1.0, "mean"))
    assert torch.allclose(gaussian_log_prob(sample, mean, 1.0, "sum"), 4 * gaussian_log_prob(sample, mean, 1.0, "mean"))


def test_gaussian_log_prob_bad_reduction_raises():
    with pytest.raises(ValueError):
        gaussian_log_prob(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, "max")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# §4 correlated split noise
# ---------------------------------------------------------------------------------------------

PARENTS = 4000
DIM = 50
N_PER_CHILD = PARENTS * DIM  # 200_000 iid draws per child index b


def _split_draws(k: int, s: float, seed: int) -> torch.Tensor:
    """ξ for ``PARENTS`` parents with ``k`` children each, as ``[PARENTS, k, DIM]`` float64."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(PARENTS, DIM, generator=gen, dtype=torch.float64).repeat_interleave(k, dim=0)
    own = torch.randn(PARENTS * k, DIM, generator=gen, dtype=torch.float64)
    xi = correlated_split_noise(base, own, s)
    assert xi.shape == (PARENTS * k, DIM)
    return xi.reshape(PARENTS, k, DIM)  # children of one parent are contiguous


@pytest.mark.parametrize("s", [0.5, 1.0, 4.0])
def test_correlated_split_noise_marginals_are_standard_normal(s):
    xi = _split_draws(3, s, seed=int(100 * s)).numpy()
    n = N_PER_CHILD
    for b in range(3):
        z = xi[:, b, :].ravel()  # iid N(0, 1) under the claim
        # mean: SE = 1/√n; variance: SE = √(2/(n−1)); 4th moment: SE = √((105 − 9)/n); 5 SE each
        assert abs(z.mean()) < 5 / math.sqrt(n)
        assert abs(z.var(ddof=1) - 1.0) < 5 * math.sqrt(2 / (n - 1))
        assert abs((z**4).mean() - 3.0) < 5 * math.sqrt(96 / n)


@pytest.mark.parametrize("s", [0.5, 1.0, 4.0])
def test_correlated_split_noise_sibling_correlation(s):
    rho = 1.0 / (1.0 + s * s)
    xi = _split_draws(3, s, seed=7 + int(10 * s)).numpy()
    n = N_PER_CHILD
    # SE of a Pearson correlation of n bivariate-normal pairs ≈ (1 − ρ²)/√(n − 1); 5 SE
    tol = 5 * (1 - rho**2) / math.sqrt(n - 1)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        r = np.corrcoef(xi[:, a, :].ravel(), xi[:, b, :].ravel())[0, 1]
        assert abs(r - rho) < tol, (s, a, b, r, rho)
    # children of different parents are independent
    r = np.corrcoef(xi[:-1, 0, :].ravel(), xi[1:, 1, :].ravel())[0, 1]
    assert abs(r) < 5 / math.sqrt(n - DIM - 1)


def test_correlated_split_noise_exact_values():
    base = torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    own = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    for s in (0.0, 0.5, 4.0):
        got = correlated_split_noise(base, own, s)
        expected = torch.tensor(
            [[(b + s * o) / math.sqrt(1 + s * s) for b, o in zip(rb, ro)] for rb, ro in zip(base.tolist(), own.tolist())]
        )
        assert torch.allclose(got, expected, atol=1e-6)
    # s = 0: every sibling is exactly the shared draw (correlation 1)
    assert torch.equal(correlated_split_noise(base, own, 0.0), base)


@pytest.mark.parametrize("k,s", [(2, 4.0), (4, 1.0)])
def test_split_child_marginal_equals_plain_sde_step(k, s):
    """A child of a split step has the same law N(μ, s_i² I) as a plain SDE child (Lemma 1–2),
    and its log-prob under N(μ, s_i²) has the expectation of a correctly-scaled Gaussian."""
    gen = torch.Generator().manual_seed(11 + k)
    dim = 8
    reps = 25_000  # independent replicates of one fixed parent
    x = torch.randn(1, dim, generator=gen)
    v = torch.randn(1, dim, generator=gen)
    sigmas = _sigma_by_hand(20, 3.0)
    step, eta = 3, 0.3
    mean, std, _ = transition_mean(x, v, sigmas[step], sigmas[step + 1], eta)
    sd = _transition_by_hand(0.0, 0.0, sigmas[step], sigmas[step + 1], eta, True)[1]
    mu = [
        _transition_by_hand(x[0, j].item(), v[0, j].item(), sigmas[step], sigmas[step + 1], eta, True)[0]
        for j in range(dim)
    ]

    base = torch.randn(reps, dim, generator=gen).repeat_interleave(k, dim=0)
    own = torch.randn(reps * k, dim, generator=gen)
    split_children = (mean + std * correlated_split_noise(base, own, s)).reshape(reps, k, dim)
    plain_children = mean + std * torch.randn(reps, dim, generator=gen)

    split_np = split_children.double().numpy()
    plain_np = plain_children.double().numpy()
    # per dimension: mean SE = sd/√reps, variance SE = sd²·√(2/(reps−1)); 5 SE
    for j in range(dim):
        for samples in [split_np[:, b, j] for b in range(k)] + [plain_np[:, j]]:
            assert abs(samples.mean() - mu[j]) < 5 * sd / math.sqrt(reps)
            assert abs(samples.var(ddof=1) - sd**2) < 5 * sd**2 * math.sqrt(2 / (reps - 1))

    # E[lp] (mean reduction) = −½ − log s_i − ½ log 2π; per-row lp has variance ½/dim; 5 SE
    lp = gaussian_log_prob(split_children[:, 0, :], mean.expand(reps, dim), std, "mean").double().numpy()
    expected = -0.5 - math.log(sd) - 0.5 * math.log(2 * math.pi)
    assert abs(lp.mean() - expected) < 5 * math.sqrt(0.5 / dim / reps)
