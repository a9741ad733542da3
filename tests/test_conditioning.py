"""Marginals, conditionals, mixture moments, Gaussian mixture regression and imputation (issue 15).

Oracles: the ``gmr`` library (full covariances), a direct NumPy/SciPy computation from the
moments the params were built from (every family), the joint density divided by the marginal one,
sampling (200k draws) and finite differences. Tolerances are error bounds: SLACK·D·κ·eps of the
dtype times the size of what is compared (Higham: a factorisation or solve of condition κ is off
by ~D·κ·eps relative), never a number one CPU printed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import puregmm as pg
from tests.bounds import SLACK, eps
from tests.strategies import random_covariances

FAMILIES = pg.FAMILIES
F64 = torch.float64


# --- builders and the NumPy/SciPy oracle ------------------------------------------------------------


def moments(family: str, k: int = 3, d: int = 4, seed: int = 0, spread: float = 3.0, dtype=F64):
    """(params, w [K], μ [K, D], Σ [K, D, D]) with the NumPy moments the params were built from."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=gen, dtype=F64) + 0.3
    w = w / w.sum()
    mu = spread * torch.randn(k, d, generator=gen, dtype=F64)
    cov = random_covariances(family, k, d, gen, F64)
    params = pg.from_moments(w.to(dtype), mu.to(dtype), cov.to(dtype), family)
    return params, w.numpy(), mu.numpy(), cov.numpy()


def oracle_condition(w, mu, cov, given, values):
    """Weights [N, K], means [N, K, A], covariances [K, A, A] of p(x_rest | x_given = values [N, B])
    by the covariance-block formulas, SciPy densities and a logsumexp."""
    d = mu.shape[-1]
    rest = [i for i in range(d) if i not in given]
    k = len(w)
    log_w = np.empty((len(values), k))
    means = np.empty((len(values), k, len(rest)))
    covs = np.empty((k, len(rest), len(rest)))
    for j in range(k):
        s_bb = cov[j][np.ix_(given, given)]
        s_ab = cov[j][np.ix_(rest, given)]
        gain = np.linalg.solve(s_bb, s_ab.T).T  # Σ_ab Σ_bb⁻¹
        covs[j] = cov[j][np.ix_(rest, rest)] - gain @ s_ab.T
        means[:, j] = mu[j, rest] + (values - mu[j, given]) @ gain.T
        log_w[:, j] = np.log(w[j]) + multivariate_normal(mu[j, given], s_bb).logpdf(values).reshape(-1)
    return np.exp(log_w - logsumexp(log_w, axis=-1, keepdims=True)), means, covs


def oracle_moments(w, means, covs):
    """Mean and covariance of a mixture (law of total variance), batched over leading dims of w."""
    mean = np.einsum("...k,...kd->...d", w, means)
    second = np.einsum("...k,...kij->...ij", w, covs + np.einsum("...ki,...kj->...kij", means, means))
    return mean, second - np.einsum("...i,...j->...ij", mean, mean)


def cond_number(cov) -> float:
    eig = np.linalg.eigvalsh(cov)
    return float((eig[..., -1] / eig[..., 0]).max())


def rtol(cov, dtype=F64) -> float:
    """SLACK·D·κ·eps: the relative rounding of a factorisation/solve of the covariances (Higham ch. 10)."""
    return SLACK * cov.shape[-1] * cond_number(cov) * eps(dtype)


def mahalanobis_max(mu, cov, given, values) -> float:
    """The largest squared Mahalanobis distance of ``values`` to a component's given block: the size of
    the log-density terms the weights are computed from."""
    out = 0.0
    for j in range(len(mu)):
        diff = values - mu[j, given]
        out = max(out, float(np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov[j][np.ix_(given, given)]), diff).max()))
    return out


def near_values(mu, given, n: int, seed: int) -> np.ndarray:
    """Values [N, B] near the components' given blocks (within a few widths)."""
    rng = np.random.default_rng(seed)
    return mu[rng.integers(0, len(mu), n)][:, given] + rng.normal(size=(n, len(given)))


DIMS = [[0], [2, 0], [1, 3, 2]]  # contiguous, unsorted, the rest a single dimension


# --- against gmr (full covariances) -------------------------------------------------------------------


@pytest.mark.parametrize("given", DIMS, ids=str)
def test_condition_and_regress_match_gmr(given):
    import gmr  # a test dependency (the test extra): missing, this test fails rather than skips

    params, w, mu, cov = moments("full", k=3, d=4, seed=1, spread=1.5)  # overlapping: every weight matters
    model = gmr.GMM(n_components=3, priors=w, means=mu, covariances=cov)
    values = near_values(mu, given, 5, seed=2)
    scale = max(1.0, float(np.abs(mu).max() + np.abs(values).max()), float(np.abs(cov).max()))
    tol = rtol(cov) * scale * (1 + mahalanobis_max(mu, cov, given, values))
    assert tol <= 1e-10  # the bar: these well-conditioned mixtures meet it with room
    c = pg.condition(params, given, torch.as_tensor(values))
    mean, covariance = pg.regress(params, given, torch.as_tensor(values))
    np.testing.assert_allclose(mean.numpy(), model.predict(np.array(given), values), rtol=0, atol=tol)
    for n in range(len(values)):
        ref = model.condition(np.array(given), values[n])
        np.testing.assert_allclose(pg.weights(c)[n].numpy(), ref.priors, rtol=0, atol=tol)
        np.testing.assert_allclose(c.means[n].numpy(), ref.means, rtol=0, atol=tol)
        np.testing.assert_allclose(pg.covariances(c)[n].numpy(), ref.covariances, rtol=0, atol=tol)
        ref_mean, ref_cov = oracle_moments(ref.priors, ref.means, ref.covariances)
        np.testing.assert_allclose(covariance[n].numpy(), ref_cov, rtol=0, atol=tol)
        np.testing.assert_allclose(mean[n].numpy(), ref_mean, rtol=0, atol=tol)


# --- against NumPy/SciPy, every family ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("given", DIMS, ids=str)
def test_condition_matches_numpy_every_family(family, given):
    params, w, mu, cov = moments(family, k=3, d=4, seed=3)
    values = near_values(mu, given, 6, seed=4)
    c = pg.condition(params, given, torch.as_tensor(values))
    ref_w, ref_means, ref_covs = oracle_condition(w, mu, cov, given, values)
    scale = max(1.0, float(np.abs(mu).max() + np.abs(values).max()), float(np.abs(cov).max()))
    tol = rtol(cov) * scale * (1 + mahalanobis_max(mu, cov, given, values))
    assert c.family == family  # every family is closed under conditioning
    assert c.batch_shape == (6,) and c.dim == 4 - len(given)
    np.testing.assert_allclose(pg.weights(c).numpy(), ref_w, rtol=0, atol=tol)
    np.testing.assert_allclose(c.means.numpy(), ref_means, rtol=0, atol=tol)
    np.testing.assert_allclose(pg.covariances(c).numpy(), np.broadcast_to(ref_covs, (6, *ref_covs.shape)), atol=tol)
    mean, covariance = pg.regress(params, given, torch.as_tensor(values))
    ref_mean, ref_cov = oracle_moments(ref_w, ref_means, ref_covs)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=0, atol=tol)
    np.testing.assert_allclose(covariance.numpy(), ref_cov, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_conditional_density_is_joint_over_marginal(family):
    """log p(x_a | x_b) = log p(x_a, x_b) - log p(x_b), both sides from SciPy's multivariate normal."""
    params, w, mu, cov = moments(family, k=3, d=4, seed=5)
    given, rest = [3, 1], [0, 2]
    x = near_values(mu, [0, 1, 2, 3], 7, seed=6)
    joint = logsumexp([np.log(w[j]) + multivariate_normal(mu[j], cov[j]).logpdf(x) for j in range(3)], axis=0)
    marg = [multivariate_normal(mu[j, given], cov[j][np.ix_(given, given)]).logpdf(x[:, given]) for j in range(3)]
    want = joint - logsumexp([np.log(w[j]) + marg[j] for j in range(3)], axis=0)
    c = pg.condition(params, given, torch.as_tensor(x[:, given]))
    got = pg.log_prob(c, torch.as_tensor(x[:, rest]).unsqueeze(-2)).squeeze(-1)  # batch [7], one row each
    m = mahalanobis_max(mu, cov, [0, 1, 2, 3], x)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=rtol(cov) * (10 + m))


# --- batching, vmap, gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_condition_batched_over_values_equals_a_loop(family):
    params, _, mu, cov = moments(family, k=3, d=4, seed=7)
    given = [2, 0]
    values = torch.as_tensor(near_values(mu, given, 12, seed=8)).reshape(3, 4, 2)
    c = pg.condition(params, given, values)
    assert c.batch_shape == (3, 4) and c.means.shape == (3, 4, 3, 2)
    mean, covariance = pg.regress(params, given, values)
    assert mean.shape == (3, 4, 2) and covariance.shape == (3, 4, 2, 2)
    tol = rtol(cov) * (1 + float(values.abs().max()) + float(np.abs(mu).max())) * 10
    for i in range(3):
        for j in range(4):
            one = pg.condition(params, given, values[i, j])
            assert one.batch_shape == ()
            for got, want in zip((c.logits[i, j], c.means[i, j], c.scale[i, j]), (one.logits, one.means, one.scale)):
                torch.testing.assert_close(got, want, rtol=0, atol=tol)
            m1, c1 = pg.regress(params, given, values[i, j])
            torch.testing.assert_close(mean[i, j], m1, rtol=0, atol=tol)
            torch.testing.assert_close(covariance[i, j], c1, rtol=0, atol=tol)
    vm = torch.func.vmap(lambda v: pg.condition(params, given, v).means)(values.reshape(12, 2))
    torch.testing.assert_close(vm.reshape(c.means.shape), c.means, rtol=0, atol=tol)
    vr = torch.func.vmap(lambda v: pg.regress(params, given, v)[1])(values.reshape(12, 2))
    torch.testing.assert_close(vr.reshape(covariance.shape), covariance, rtol=0, atol=tol)


@pytest.mark.parametrize("family", ["full", "tied", "diagonal", "shared"])
def test_batched_params_broadcast_with_values(family):
    """Params with batch [2] and values [5, 2, B]: result batch [5, 2], each the unbatched answer."""
    p0, _, mu, cov = moments(family, seed=9)
    p1, _, _, cov1 = moments(family, seed=10)
    both = pg.GMMParams(
        *(torch.stack([a, b]) for a, b in zip((p0.logits, p0.means, p0.scale), (p1.logits, p1.means, p1.scale))), family
    )
    values = (
        torch.as_tensor(near_values(mu, [1], 10, seed=11)).reshape(5, 2, 1).to(both.dtype)
    )  # tensors are never cast
    c = pg.condition(both, [1], values)
    assert c.batch_shape == (5, 2)
    mean, _ = pg.regress(both, [1], values)
    tol = max(rtol(cov), rtol(cov1)) * (1 + float(values.abs().max()) + float(np.abs(mu).max())) * 10
    for n in range(5):
        for b, p in enumerate((p0, p1)):
            one = pg.condition(p, [1], values[n, b])
            torch.testing.assert_close(c.logits[n, b], one.logits, rtol=0, atol=tol)
            torch.testing.assert_close(c.means[n, b], one.means, rtol=0, atol=tol)
            torch.testing.assert_close(mean[n, b], pg.regress(p, [1], values[n, b])[0], rtol=0, atol=tol)
    with pytest.raises(ValueError, match="broadcast"):
        pg.condition(both, [1], torch.zeros(3, 1, dtype=both.dtype))


def richardson(f, h: float) -> tuple[float, float]:
    """(Richardson-extrapolated central difference at step h, its error estimate): R(h) = (4 D(h/2) - D(h))/3
    is O(h⁴); |R(h) - R(2h)| estimates R(2h)'s truncation error (16× R(h)'s), plus the rounding
    SLACK·eps·|f|/h of the differences."""

    def central(s: float) -> float:
        return (f(s) - f(-s)) / (2 * s)

    def rich(s: float) -> float:
        return (4 * central(s / 2) - central(s)) / 3

    r1, r2 = rich(h), rich(2 * h)
    return r1, abs(r1 - r2) + SLACK * eps(F64) * (abs(f(0.0)) + 1) / h


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_finite_differences(family):
    """torch.func.grad w.r.t. values and every params leaf, along random directions, against
    Richardson-extrapolated central differences in float64. (The constant family's scale is fixed:
    the density detaches it, so it is not differentiated here.)"""
    params, _, mu, _ = moments(family, k=3, d=4, seed=12)
    given = [3, 1]
    values = torch.as_tensor(near_values(mu, given, 3, seed=13))
    gen = torch.Generator().manual_seed(14)
    y = torch.randn(3, 1, 2, generator=gen, dtype=F64)
    c_mean, c_cov = torch.randn(3, 2, generator=gen, dtype=F64), torch.randn(3, 2, 2, generator=gen, dtype=F64)

    def f(v, logits, means, scale):
        p = pg.GMMParams(logits, means, scale, family)
        mean, cov = pg.regress(p, given, v)
        dens = pg.log_prob(pg.condition(p, given, v), y).sum()
        return (c_mean * mean).sum() + (c_cov * cov).sum() + dens

    leaves = (values, params.logits, params.means, params.scale)
    argnums = (0, 1, 2) if family == "constant" else (0, 1, 2, 3)
    grads = torch.func.grad(f, argnums=argnums)(*leaves)
    for i, g in zip(argnums, grads):
        for trial in range(3):
            direction = torch.randn(leaves[i].shape, generator=gen, dtype=F64)

            def along(s, i=i, direction=direction):
                moved = list(leaves)
                moved[i] = leaves[i] + s * direction
                return float(f(*moved))

            fd, err = richardson(along, 1e-3)
            assert abs(float((g * direction).sum()) - fd) <= 10 * err, (i, trial, float((g * direction).sum()), fd, err)


# --- far values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_far_values_stay_finite_and_pick_the_nearest_component(family, dtype):
    """1e3 standard deviations from every component: each weight underflows to 0 in a plain ratio,
    not in log space; the answer is the component with the largest marginal log-density (SciPy)."""
    params, w, mu, cov = moments(family, k=3, d=4, seed=15, dtype=dtype)
    given = [0, 2]
    sd = float(np.sqrt(max(np.linalg.eigvalsh(c[np.ix_(given, given)]).max() for c in cov)))
    directions = np.array([[1.0, 0.0], [0.0, -1.0], [-0.6, 0.8]])
    values = mu[:, given].mean(0) + 1e3 * sd * directions  # [3, 2]
    c = pg.condition(params, given, torch.as_tensor(values, dtype=dtype))
    mean, covariance = pg.regress(params, given, torch.as_tensor(values, dtype=dtype))
    for t in (c.logits, c.means, c.scale, mean, covariance):
        assert bool(torch.isfinite(t).all())
    ll = np.stack(
        [
            np.log(w[j]) + multivariate_normal(mu[j, given], cov[j][np.ix_(given, given)]).logpdf(values)
            for j in range(3)
        ],
        -1,
    )
    assert (np.sort(ll, -1)[:, -1] - np.sort(ll, -1)[:, -2]).min() > 50  # a clear winner in each row
    assert torch.equal(pg.weights(c).argmax(-1), torch.as_tensor(ll.argmax(-1)))
    torch.testing.assert_close(pg.weights(c).max(-1).values, torch.ones(3, dtype=dtype))
    grad = torch.func.grad(lambda v: pg.regress(params, given, v)[0].sum())(torch.as_tensor(values, dtype=dtype))
    assert bool(torch.isfinite(grad).all())
    if dtype == F64:  # the winner's conditional mean, against the covariance-block formula
        _, ref_means, _ = oracle_condition(w, mu, cov, given, values)
        want = ref_means[np.arange(3), ll.argmax(-1)]
        tol = rtol(cov) * float(np.abs(values).max()) * 10
        np.testing.assert_allclose(mean.numpy(), want, rtol=0, atol=tol)


# --- marginal and moments ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dims", [[1], [3, 0], [2, 0, 3, 1], [0, 1, 2, 3]], ids=str)
def test_marginal_equals_from_moments_of_the_sub_blocks(family, dims):
    params, w, mu, cov = moments(family, seed=16)
    m = pg.marginal(params, dims)
    want = pg.from_moments(
        torch.as_tensor(w), torch.as_tensor(mu[:, dims]), torch.as_tensor(cov[:, dims][:, :, dims]), family
    )
    assert m.family == family and m.scale.shape == want.scale.shape
    tol = rtol(cov) * 10
    torch.testing.assert_close(m.logits, params.logits, rtol=0, atol=0)
    torch.testing.assert_close(m.means, want.means, rtol=0, atol=0)
    torch.testing.assert_close(m.scale, want.scale, rtol=0, atol=tol)
    torch.testing.assert_close(
        pg.covariances(m), torch.as_tensor(cov[:, dims][:, :, dims]), rtol=0, atol=tol * np.abs(cov).max()
    )


def test_marginal_of_batched_params_and_under_vmap():
    p0, *_ = moments("full", seed=17)
    p1, *_ = moments("full", seed=18)
    both = pg.GMMParams(
        *(torch.stack([a, b]) for a, b in zip((p0.logits, p0.means, p0.scale), (p1.logits, p1.means, p1.scale))), "full"
    )
    m = pg.marginal(both, [2, 1])
    assert m.batch_shape == (2,)
    for b, p in enumerate((p0, p1)):
        torch.testing.assert_close(m.scale[b], pg.marginal(p, [2, 1]).scale)
    vm = torch.func.vmap(lambda p: pg.marginal(p, [2, 1]).scale)(both)
    torch.testing.assert_close(vm, m.scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixture_moments_closed_form_and_sampling(family):
    params, w, mu, cov = moments(family, k=3, d=3, seed=19)
    mean, covariance = pg.mixture_mean(params), pg.mixture_covariance(params)
    ref_mean, ref_cov = oracle_moments(w, mu, cov)
    scale = float(np.abs(mu).max() ** 2 + np.abs(cov).max())
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=0, atol=SLACK * eps(F64) * scale)
    np.testing.assert_allclose(covariance.numpy(), ref_cov, rtol=0, atol=rtol(cov) * scale)
    n = 200_000
    x, _ = pg.sample(params, n, key=20)
    xs = x.numpy()
    se_mean = xs.std(0) / math.sqrt(n)  # standard error of each coordinate's mean
    assert (np.abs(xs.mean(0) - ref_mean) < 5 * se_mean).all()
    dev = xs - ref_mean
    prods = dev[:, :, None] * dev[:, None, :]  # [n, D, D]
    se_cov = prods.std(0) / math.sqrt(n)
    assert (np.abs(prods.mean(0) - ref_cov) < 5 * se_cov).all()


def test_mixture_moments_batched():
    p0, *_ = moments("diagonal", seed=21)
    p1, *_ = moments("diagonal", seed=22)
    both = pg.GMMParams(
        *(torch.stack([a, b]) for a, b in zip((p0.logits, p0.means, p0.scale), (p1.logits, p1.means, p1.scale))),
        "diagonal",
    )
    assert pg.mixture_mean(both).shape == (2, 4) and pg.mixture_covariance(both).shape == (2, 4, 4)
    for b, p in enumerate((p0, p1)):
        torch.testing.assert_close(pg.mixture_mean(both)[b], pg.mixture_mean(p))
        torch.testing.assert_close(pg.mixture_covariance(both)[b], pg.mixture_covariance(p))


def test_masked_components_keep_weight_zero():
    params, *_ = moments("full", seed=23)
    padded = pg.pad_components(params, 5)
    values = torch.tensor([[0.5], [-1.0]], dtype=F64)
    c, c_ref = pg.condition(padded, [1], values), pg.condition(params, [1], values)
    assert bool((pg.weights(c)[:, 3:] == 0).all())
    torch.testing.assert_close(pg.regress(padded, [1], values)[0], pg.regress(params, [1], values)[0])
    torch.testing.assert_close(pg.weights(c)[:, :3], pg.weights(c_ref))


# --- impute ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_impute_equals_regress_row_by_row(family):
    params, _, mu, cov = moments(family, k=3, d=4, seed=24)
    x, _ = pg.sample(params, 60, key=25)
    rng = np.random.default_rng(26)
    mask = torch.as_tensor(rng.random((60, 4)) < 0.3)
    mask[0] = True  # nothing observed
    mask[1] = False  # nothing missing
    holey = torch.where(mask, torch.full_like(x, math.nan), x)
    out = pg.impute(params, holey)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert torch.equal(out[~mask], x[~mask])  # observed entries untouched, complete rows unchanged
    tol = rtol(cov) * (1 + float(x.abs().max()) + float(np.abs(mu).max())) * 10
    torch.testing.assert_close(out[0], pg.mixture_mean(params), rtol=0, atol=tol)
    for n in range(2, 60):
        miss = mask[n]
        if not bool(miss.any()) or bool(miss.all()):
            continue
        seen = torch.nonzero(~miss).squeeze(-1).tolist()
        mean, _ = pg.regress(params, seen, x[n, ~miss])
        torch.testing.assert_close(out[n, miss], mean, rtol=0, atol=tol)


def test_impute_accepts_numpy_and_returns_a_copy():
    params, *_ = moments("tied", seed=27)
    x = np.array([[1.0, np.nan, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    out = pg.impute(params, x)
    assert isinstance(out, torch.Tensor) and out.dtype == params.dtype
    complete = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    assert torch.equal(pg.impute(params, complete), complete) and pg.impute(params, complete) is not complete


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_input_is_named():
    params, *_ = moments("full", seed=28)
    v = torch.zeros(2, dtype=F64)
    cases = [
        (lambda: pg.condition(params, [0, 4], v), ValueError, r"dims must lie in \[0, 4\).*\[4\]"),
        (lambda: pg.condition(params, [1, 1], v), ValueError, "dims must be distinct.*repeated: \\[1\\]"),
        (lambda: pg.condition(params, [], v[:0]), ValueError, "at least one dimension"),
        (lambda: pg.condition(params, [0, 1, 2, 3], torch.zeros(4, dtype=F64)), ValueError, "leave at least one"),
        (lambda: pg.condition(params, 1, v), TypeError, "dims must be a sequence of ints"),
        (lambda: pg.condition(params, [True, 2], v), TypeError, "dims must hold ints"),
        (
            lambda: pg.condition(params, [0, 1], torch.zeros(3, dtype=F64)),
            ValueError,
            r"values must have shape \[\.\.\., 2\]",
        ),
        (
            lambda: pg.condition(params, [0, 1], torch.tensor([0.0, math.nan], dtype=F64)),
            ValueError,
            "values must be finite.*nan at index \\(1,\\)",
        ),
        (lambda: pg.regress(params, [0], torch.tensor([math.inf], dtype=F64)), ValueError, "values must be finite"),
        (lambda: pg.condition(params, [0], "a"), TypeError, "values"),
        (lambda: pg.condition("p", [0], v), TypeError, "params must be GMMParams"),
        (lambda: pg.marginal(params, [5]), ValueError, "dims must lie in"),
        (lambda: pg.impute(params, torch.zeros(3, 5, dtype=F64)), ValueError, "dimension D=5"),
        (
            lambda: pg.impute(params, torch.tensor([[0.0, math.inf, 1.0, math.nan]], dtype=F64)),
            ValueError,
            r"finite or NaN.*\(0, 1\)",
        ),
        (
            lambda: pg.impute(
                pg.GMMParams(*(t[None] for t in (params.logits, params.means, params.scale)), "full"),
                torch.zeros(2, 4, dtype=F64),
            ),
            ValueError,
            "unbatched",
        ),
    ]
    for call, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            call()


def test_structure_has_no_family_branches_in_conditioning():
    """The per-family rules live in families.py: the conditioning module reads no family structure."""
    import inspect

    import puregmm.conditioning as module

    src = inspect.getsource(module)
    for word in ("scale_ndim", "per_component", "family ==", '"full"', '"diagonal"'):
        assert word not in src, word
