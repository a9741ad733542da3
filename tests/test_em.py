"""EM kernel: scikit-learn equality, monotonicity, purity, vmap/compile, chunking, resets,
sample weights, float32 accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import puregmm as pg
from puregmm.em import combine, sufficient_stats
from tests.oracles import SK_TYPE, mixture_data, random_params, sk_covariances_full, sklearn_em, to_np

SK_FAMILIES = tuple(SK_TYPE)


def leaves(p: pg.GMMParams) -> list[torch.Tensor]:
    return pytree.tree_leaves(p)


def assert_params_close(a: pg.GMMParams, b: pg.GMMParams, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    assert a.family == b.family
    for name in ("logits", "means", "scale"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol, msg=name)


def stack(ps: list[pg.GMMParams]) -> pg.GMMParams:
    return pytree.tree_map(lambda *t: torch.stack(t), *ps)


# --- scikit-learn equality ------------------------------------------------------------------


@pytest.mark.parametrize("family", SK_FAMILIES)
@pytest.mark.parametrize("n_steps", [1, 5])
def test_em_step_equals_sklearn(family: str, n_steps: int) -> None:
    x, _ = mixture_data(3, 3, 300, separation=2.5, seed=4)
    p0 = random_params(family, 3, 3, seed=2)
    p = p0
    for _ in range(n_steps):
        p = pg.em_step(p, x, reg_covar=1e-6)
    gm = sklearn_em(p0, x, n_steps, reg_covar=1e-6)
    np.testing.assert_allclose(to_np(pg.weights(p)), gm.weights_, rtol=1e-6)
    np.testing.assert_allclose(to_np(p.means), gm.means_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(to_np(pg.covariances(p)), sk_covariances_full(gm, 3, 3), rtol=1e-6, atol=1e-9)
    prec_chol = to_np(pg.precision_cholesky(p))
    sk_chol = np.asarray(gm.precisions_cholesky_)
    if family == "full":
        np.testing.assert_allclose(prec_chol, sk_chol, rtol=1e-6, atol=1e-9)
    elif family == "tied":
        np.testing.assert_allclose(prec_chol[0], sk_chol, rtol=1e-6, atol=1e-9)


def test_info_log_likelihood_is_the_e_step_score() -> None:
    x, _ = mixture_data(2, 2, 120, seed=1)
    p = random_params("full", 2, 2, seed=3)
    new, info = pg.em_step(p, x, return_info=True)
    torch.testing.assert_close(info.log_likelihood, -pg.loss(p, x), rtol=1e-12, atol=0)
    assert info.n_resets.dtype == torch.int64 and int(info.n_resets) == 0
    assert_params_close(new, pg.em_step(p, x))


# --- monotonicity (EM for every family, derived M-steps for shared/constant) ----------------


@st.composite
def mixture_problem(draw: st.DrawFn) -> tuple[pg.GMMParams, torch.Tensor]:
    family = draw(st.sampled_from(pg.FAMILIES))
    k = draw(st.integers(1, 3))
    d = draw(st.integers(1, 3))
    n = draw(st.integers(20, 60))
    seed = draw(st.integers(0, 2**16))
    sep = draw(st.floats(0.5, 5.0))
    x, _ = mixture_data(k, d, n, separation=sep, seed=seed)
    if draw(st.booleans()):  # a random mixture around the data
        return random_params(family, k, d, seed=seed + 1, spread=float(x.std())), x
    method = draw(st.sampled_from(["kmeans++", "random", "random_from_data"]))
    return pg.init(x, k, family, key=seed, method=method), x


@settings(max_examples=20, deadline=None)
@given(mixture_problem())
def test_log_likelihood_never_decreases(problem: tuple[pg.GMMParams, torch.Tensor]) -> None:
    """Exact EM (reg_covar=0: a regulariser moves the maximiser) never loses likelihood, also
    when components collapse onto a few of these 20-60 points: steps that repair a collapsed
    component (counted in n_resets) are no EM steps and are left out. The likelihood is the
    exact one (pg.score, by whitening), and the E-step's agrees with it."""
    p, x = problem
    lls, em_only = [float(pg.score(p, x))], []
    for _ in range(30):
        p, info = pg.em_step(p, x, reg_covar=0.0, return_info=True)
        assert abs(float(info.log_likelihood) - lls[-1]) <= 1e-8 * (1 + abs(lls[-1]))
        lls.append(float(pg.score(p, x)))
        em_only.append(int(info.n_resets) == 0)  # a re-seeded or repaired component is no EM step
    diffs = np.diff(lls)[em_only]
    assert (diffs >= -1e-8 * (1 + np.abs(lls[:-1])[em_only])).all(), (p.family, diffs.min())


def test_shared_m_step_is_the_pooled_variance_maximiser() -> None:
    """Shared: σ² = Σ_nk r_nk ‖x_n - μ_k‖² / (N D); the likelihood's gradient in σ² vanishes."""
    x, _ = mixture_data(3, 2, 200, separation=3.0, seed=5)
    p = random_params("shared", 3, 2, seed=6)
    new = pg.em_step(p, x, reg_covar=0.0)
    r = pg.predict_proba(p, x)  # [N, K] at the E-step params
    d2 = (x.unsqueeze(1) - new.means.unsqueeze(0)).square().sum(-1)  # [N, K]
    var = (r * d2).sum() / (x.shape[0] * x.shape[1])
    torch.testing.assert_close(pg.covariances(new)[0, 0, 0], var, rtol=1e-10, atol=0)
    const = random_params("constant", 3, 2, seed=6)
    new_c = pg.em_step(const, x)
    torch.testing.assert_close(new_c.scale, const.scale, rtol=0, atol=0)  # never updated
    torch.testing.assert_close(new_c.means, (r.mT @ x) / r.sum(0).unsqueeze(-1), rtol=1e-10, atol=1e-12)


# --- purity, vmap, compile ------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(mixture_problem())
def test_em_step_is_pure(problem: tuple[pg.GMMParams, torch.Tensor]) -> None:
    p, x = problem
    w = torch.linspace(0.5, 2.0, x.shape[0], dtype=x.dtype)
    before = [t.clone() for t in [*leaves(p), x, w]]
    a, ia = pg.em_step(p, x, sample_weight=w, return_info=True)
    b, ib = pg.em_step(p, x, sample_weight=w, return_info=True)
    for t, t0 in zip([*leaves(p), x, w], before):
        assert torch.equal(t, t0)
    assert_params_close(a, b, rtol=0, atol=0)
    assert torch.equal(ia.log_likelihood, ib.log_likelihood)


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_vmap_over_params_and_datasets_equals_loop(family: str) -> None:
    x, _ = mixture_data(3, 2, 150, separation=3.0, seed=7)
    ps = [random_params(family, 3, 2, seed=s) for s in range(3)]
    xs = torch.stack([x, 2 * x, x + 1])
    ws = torch.rand(3, 150, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    shared, info = pg.em_step(stack(ps), x, return_info=True)
    per_data = pg.em_step(stack(ps), xs, sample_weight=ws)
    vmapped = torch.func.vmap(lambda p, xx: pg.em_step(p, xx))(stack(ps), xs)
    for i, p in enumerate(ps):
        q, qi = pg.em_step(p, x, return_info=True)
        assert_params_close(pytree.tree_map(lambda t, i=i: t[i], shared), q)
        torch.testing.assert_close(info.log_likelihood[i], qi.log_likelihood)
        assert_params_close(pytree.tree_map(lambda t, i=i: t[i], per_data), pg.em_step(p, xs[i], sample_weight=ws[i]))
        assert_params_close(pytree.tree_map(lambda t, i=i: t[i], vmapped), pg.em_step(p, xs[i]))


@pytest.mark.parametrize("family", ["full", "diagonal", "shared"])
def test_compiled_em_step_equals_eager(family: str) -> None:
    """``fullgraph=True`` proves there is no graph break (no value-dependent branch/.item())."""
    x, _ = mixture_data(3, 2, 100, separation=3.0, seed=8)
    far = random_params(family, 3, 2, seed=9)
    far = pg.GMMParams(far.logits, far.means.index_fill(0, torch.tensor([2]), 1e3), far.scale, family)
    step = torch.compile(lambda p, xx: pg.em_step(p, xx, return_info=True), fullgraph=True, backend="aot_eager")
    for p, tol in ((random_params(family, 3, 2, seed=9), 1e-12), (far, 1e-9)):  # also through the reset path
        a, ia = step(p, x)
        b, ib = pg.em_step(p, x, return_info=True)
        # compiled code runs the out-of-place layout (unfolded for small D): the same sums in
        # another order, ~1e-16·(‖x - g‖/σ)² apart, ~1e-11 with a component 1e3 away
        assert_params_close(a, b, rtol=tol, atol=tol)
        assert int(ia.n_resets) == int(ib.n_resets)


# --- statistics: chunking and combine -------------------------------------------------------


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_chunked_stats_equal_whole_and_combine(family: str) -> None:
    x, _ = mixture_data(3, 3, 103, seed=10)
    p = random_params(family, 3, 3, seed=11)
    w = torch.rand(103, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    whole = sufficient_stats(p, x, w, chunk_size=1000)
    chunked = sufficient_stats(p, x, w, chunk_size=7)
    halves = combine(sufficient_stats(p, x[:50], w[:50]), sufficient_stats(p, x[50:], w[50:]))
    reversed_ = combine(sufficient_stats(p, x[50:], w[50:]), sufficient_stats(p, x[:50], w[:50]))
    for other in (chunked, halves, reversed_):
        for name, a, b in zip(whole._fields, whole, other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert whole.worst_log_lik.shape == (3,) and bool((whole.worst_log_lik.diff() >= 0).all())
    torch.testing.assert_close(whole.worst_log_lik[0], (pg.log_prob(p, x)).min())


def test_stats_shapes() -> None:
    x = torch.randn(20, 4, dtype=torch.float64)
    shapes = {"full": (3, 4, 4), "tied": (3, 4, 4), "diagonal": (3, 4), "isotropic": (3,), "shared": (3,)}
    for family, shape in shapes.items():
        s = sufficient_stats(random_params(family, 3, 4), x)
        assert s.xx_sum.shape == shape and s.x_sum.shape == (3, 4) and s.resp_sum.shape == (3,)
    with pytest.raises(ValueError, match="x must be"):
        sufficient_stats(random_params("full", 3, 4), x[:, :2])


# --- empty components -----------------------------------------------------------------------


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_far_component_is_reset_not_nan(family: str, dtype: torch.dtype) -> None:
    x, _ = mixture_data(2, 2, 100, separation=3.0, seed=12, dtype=dtype)
    x = torch.cat([x, torch.tensor([[40.0, -40.0]], dtype=dtype)])  # an outlier: the lowest likelihood
    p = random_params(family, 3, 2, seed=13, dtype=dtype)
    p = pg.GMMParams(p.logits, p.means.index_fill(0, torch.tensor([1]), 1e4), p.scale, family)
    new, info = pg.em_step(p, x, return_info=True)
    assert int(info.n_resets) == 1
    for t in leaves(new):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(new.means[1], x[-1])  # re-seeded at the worst point
    assert abs(float(pg.weights(new).sum()) - 1) < 1e-6
    for _ in range(3):
        new, info = pg.em_step(new, x, return_info=True)
    assert torch.isfinite(pg.loss(new, x))


def test_two_empty_components_get_distinct_points() -> None:
    x, _ = mixture_data(2, 2, 80, separation=3.0, seed=14)
    p = pg.init(x, 4, "full", key=15)
    p = pg.GMMParams(p.logits, p.means.index_fill(0, torch.tensor([0, 2]), 1e4), p.scale, "full")
    new, info = pg.em_step(p, x, return_info=True)
    assert int(info.n_resets) == 2
    lp = pg.log_prob(p, x)
    worst = x[torch.argsort(lp)[:2]]
    torch.testing.assert_close(new.means[[0, 2]], worst)


# --- sample weights -------------------------------------------------------------------------


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_weighted_em_step_equals_repeated_rows(family: str) -> None:
    x, _ = mixture_data(2, 2, 40, separation=2.0, seed=16)
    counts = torch.arange(40) % 4  # 0..3, zero weight drops the row
    p = random_params(family, 2, 2, seed=17)
    a, ia = pg.em_step(p, x, sample_weight=counts.to(x.dtype), return_info=True)
    b, ib = pg.em_step(p, x.repeat_interleave(counts, 0), return_info=True)
    assert_params_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ia.log_likelihood, ib.log_likelihood)


def test_weighted_gd_loss_and_gradient_equal_repeated_rows() -> None:
    x, _ = mixture_data(2, 2, 30, seed=18)
    counts = (torch.arange(30) % 3).to(x.dtype)
    p = random_params("full", 2, 2, seed=19)
    rep = x.repeat_interleave(counts.long(), 0)
    ga, la = torch.func.grad_and_value(pg.loss)(p, x, counts)
    gb, lb = torch.func.grad_and_value(pg.loss)(p, rep)
    torch.testing.assert_close(la, lb)
    for u, v in zip(leaves(ga), leaves(gb)):
        torch.testing.assert_close(u, v)


# --- float32 accuracy -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["full", "diagonal", "tied"])
def test_float32_offset_and_far_clusters_match_float64(family: str) -> None:
    """Data near 1e4 with unit spread, clusters 2e3 apart: a one-pass update about a common
    origin would lose every digit in float32 (eps·(1e4)² ≫ 1)."""
    x64, _ = mixture_data(2, 2, 400, separation=1.0, seed=20)
    x64 = x64 + torch.tensor([1e4, -1e4], dtype=torch.float64)
    x64[:200] += 2e3
    p64 = pg.init(x64, 2, family)
    p32 = p64.to(torch.float32)
    x32 = x64.float()
    for _ in range(5):
        p64, p32 = pg.em_step(p64, x64), pg.em_step(p32, x32)
    c64, c32 = pg.covariances(p64), pg.covariances(p32).double()
    scale = c64.abs().amax()
    assert float((c32 - c64).abs().max() / scale) < 1e-3
    assert float((p32.means.double() - p64.means).abs().max()) < 1e-2
