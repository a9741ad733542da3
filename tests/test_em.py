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
from puregmm import _moments
from puregmm.em import combine, sufficient_stats
from tests import bounds
from tests.oracles import SK_TYPE, mixture_data, random_params, sk_covariances_full, sklearn_em, to_np

SK_FAMILIES = tuple(SK_TYPE)


def leaves(p: pg.GMMParams) -> list[torch.Tensor]:
    return pytree.tree_leaves(p)


def assert_params_close(a: pg.GMMParams, b: pg.GMMParams, rtol: float) -> None:
    """Leaf by leaf within ``rtol`` of each leaf's unit (see bounds.assert_params_close); 0: bitwise."""
    if rtol == 0:
        assert a.family == b.family and all(torch.equal(u, v) for u, v in zip(leaves(a), leaves(b)))
    else:
        bounds.assert_params_close(a, b, rtol, a.family)


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
    # two float64 EM loops (scikit-learn's tied/diag/spherical M-steps take moments about 0)
    tol = bounds.stats_rtol(p0, x, steps=n_steps, origin=True)
    assert tol < 1e-6  # a meaningful check: a wrong update moves these by far more
    bounds.assert_leaves_close(to_np(pg.weights(p)), gm.weights_, tol, "weights")
    bounds.assert_leaves_close(to_np(p.means), gm.means_, tol, "means")
    bounds.assert_leaves_close(to_np(pg.covariances(p)), sk_covariances_full(gm, 3, 3), tol, "covariances")
    prec_chol = to_np(pg.precision_cholesky(p))
    sk_chol = np.asarray(gm.precisions_cholesky_)
    if family == "full":
        bounds.assert_leaves_close(prec_chol, sk_chol, tol, "precision Cholesky")
    elif family == "tied":
        bounds.assert_leaves_close(prec_chol[0], sk_chol, tol, "precision Cholesky")


def test_info_log_likelihood_is_the_e_step_score() -> None:
    x, _ = mixture_data(2, 2, 120, seed=1)
    p = random_params("full", 2, 2, seed=3)
    new, info = pg.em_step(p, x, return_info=True)
    n = x.shape[0]
    torch.testing.assert_close(info.log_likelihood, -pg.loss(p, x), rtol=0, atol=bounds.log_lik_atol(p, x, n=n))
    assert info.n_resets.dtype == torch.int64 and int(info.n_resets) == 0
    assert_params_close(new, pg.em_step(p, x), rtol=bounds.stats_rtol(p, x))


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
    exact one (pg.score, by whitening), and the E-step's agrees with it: within the rounding
    its moment form is allowed by design (MAX_ROUNDING nats a row, up to a small factor) plus
    the exact score's own (bounds.log_lik_atol). Each increase may lose both scores' rounding."""
    p, x = problem
    n = x.shape[0]
    lls, tols, em_only = [float(pg.score(p, x))], [bounds.log_lik_atol(p, x, n=n)], []
    for _ in range(30):
        p, info = pg.em_step(p, x, reg_covar=0.0, return_info=True)
        e_step_tol = bounds.SLACK * _moments.MAX_ROUNDING + tols[-1]
        assert abs(float(info.log_likelihood) - lls[-1]) <= e_step_tol
        lls.append(float(pg.score(p, x)))
        tols.append(bounds.log_lik_atol(p, x, n=n))
        em_only.append(int(info.n_resets) == 0)  # a re-seeded or repaired component is no EM step
    diffs = np.diff(lls)[em_only]
    allowed = (np.array(tols[:-1]) + np.array(tols[1:]))[em_only]
    assert (diffs >= -allowed).all(), (p.family, diffs.min(), allowed.max())


def test_shared_m_step_is_the_pooled_variance_maximiser() -> None:
    """Shared: σ² = Σ_nk r_nk ‖x_n - μ_k‖² / (N D); the likelihood's gradient in σ² vanishes."""
    x, _ = mixture_data(3, 2, 200, separation=3.0, seed=5)
    p = random_params("shared", 3, 2, seed=6)
    new = pg.em_step(p, x, reg_covar=0.0)
    r = pg.predict_proba(p, x)  # [N, K] at the E-step params
    d2 = (x.unsqueeze(1) - new.means.unsqueeze(0)).square().sum(-1)  # [N, K]
    var = (r * d2).sum() / (x.shape[0] * x.shape[1])
    tol = bounds.stats_rtol(p, x)  # two routes to one weighted sum over the N rows
    torch.testing.assert_close(pg.covariances(new)[0, 0, 0], var, rtol=tol, atol=0)
    const = random_params("constant", 3, 2, seed=6)
    new_c = pg.em_step(const, x)
    torch.testing.assert_close(new_c.scale, const.scale, rtol=0, atol=0)  # never updated
    bounds.assert_leaves_close(new_c.means, (r.mT @ x) / r.sum(0).unsqueeze(-1), bounds.stats_rtol(const, x))


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
    assert_params_close(a, b, rtol=0)
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
        # batched kernels sum in other orders (batched GEMMs): rounding of a sum over N rows
        tol = max(bounds.stats_rtol(p, xx) for xx in xs)
        q, qi = pg.em_step(p, x, return_info=True)
        assert_params_close(pytree.tree_map(lambda t, i=i: t[i], shared), q, rtol=tol)
        ll_tol = bounds.SLACK * _moments.MAX_ROUNDING + bounds.log_lik_atol(p, x, n=x.shape[0])
        torch.testing.assert_close(info.log_likelihood[i], qi.log_likelihood, rtol=0, atol=ll_tol)
        per_data_i = pg.em_step(p, xs[i], sample_weight=ws[i])
        assert_params_close(pytree.tree_map(lambda t, i=i: t[i], per_data), per_data_i, rtol=tol)
        assert_params_close(pytree.tree_map(lambda t, i=i: t[i], vmapped), pg.em_step(p, xs[i]), rtol=tol)


@pytest.mark.parametrize("family", ["full", "diagonal", "shared"])
def test_compiled_em_step_equals_eager(family: str) -> None:
    """``fullgraph=True`` proves there is no graph break (no value-dependent branch/.item())."""
    x, _ = mixture_data(3, 2, 100, separation=3.0, seed=8)
    far = random_params(family, 3, 2, seed=9)
    far = pg.GMMParams(far.logits, far.means.index_fill(0, torch.tensor([2]), 1e3), far.scale, family)
    step = torch.compile(lambda p, xx: pg.em_step(p, xx, return_info=True), fullgraph=True, backend="aot_eager")
    for p in (random_params(family, 3, 2, seed=9), far):  # also through the reset path
        a, ia = step(p, x)
        b, ib = pg.em_step(p, x, return_info=True)
        # compiled code runs the out-of-place layout (unfolded for small D): the same sums in
        # another order (and other GEMM kernels on another CPU), rounded at the scale of the
        # farthest point in widths: γ_N·κ·r², r ~ 1e3 with the far component (4.9e-9 was seen
        # on a Xeon with MKL's AVX-512 path, 2.5e-9 on an EPYC, against a fixed 1e-9)
        assert_params_close(a, b, rtol=bounds.stats_rtol(p, x))
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
    # sums over the rows in other orders: γ_N times the sum of the terms' sizes, and each row's
    # log-density rounded at the scale of its distance in widths (the moment form's GEMMs)
    row_atol = bounds.component_log_prob_atol(p, x)
    atol = {
        "resp_sum": bounds.sum_atol(p, x, w),
        "x_sum": bounds.sum_atol(p, x, w, power=1),
        "xx_sum": bounds.sum_atol(p, x, w, power=2),
        "log_lik_sum": float(w.sum()) * (bounds.log_lik_atol(p, x, n=x.shape[0]) + row_atol),
        "weight_sum": bounds.sum_atol(p, x, w),
        "worst_log_lik": row_atol,
        "worst_x": 0.0,  # the same rows
    }
    assert set(atol) == set(whole._fields)
    for other in (chunked, halves, reversed_):
        for name, a, b in zip(whole._fields, whole, other):
            torch.testing.assert_close(a, b, rtol=0, atol=atol[name], msg=name)
    assert whole.worst_log_lik.shape == (3,) and bool((whole.worst_log_lik.diff() >= 0).all())
    lp_min = pg.log_prob(p, x).min()
    torch.testing.assert_close(whole.worst_log_lik[0], lp_min, rtol=0, atol=row_atol + bounds.log_lik_atol(p, x))


def test_stats_shapes() -> None:
    x = torch.randn(20, 4, dtype=torch.float64)
    shapes = {"full": (3, 4, 4), "tied": (3, 4, 4), "diagonal": (3, 4), "isotropic": (3,), "shared": (3,)}
    for family, shape in shapes.items():
        s = sufficient_stats(random_params(family, 3, 4), x)
        assert s.xx_sum.shape == shape and s.x_sum.shape == (3, 4) and s.resp_sum.shape == (3,)
    with pytest.raises(ValueError, match="x has dimension D=2 but the params have D=4"):
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
    torch.testing.assert_close(new.means[1], x[-1], rtol=0, atol=0)  # re-seeded at (a copy of) the worst point
    assert abs(float(pg.weights(new).sum()) - 1) <= bounds.SLACK * bounds.gamma(3, dtype)  # a softmax: a sum of K
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
    torch.testing.assert_close(new.means[[0, 2]], worst, rtol=0, atol=0)  # copies of the rows


# --- sample weights -------------------------------------------------------------------------


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_weighted_em_step_equals_repeated_rows(family: str) -> None:
    x, _ = mixture_data(2, 2, 40, separation=2.0, seed=16)
    counts = torch.arange(40) % 4  # 0..3, zero weight drops the row
    p = random_params(family, 2, 2, seed=17)
    rep = x.repeat_interleave(counts, 0)
    a, ia = pg.em_step(p, x, sample_weight=counts.to(x.dtype), return_info=True)
    b, ib = pg.em_step(p, rep, return_info=True)
    assert_params_close(a, b, rtol=bounds.stats_rtol(p, rep))  # the same sums, grouped otherwise
    ll_tol = bounds.log_lik_atol(p, rep, n=rep.shape[0]) + bounds.component_log_prob_atol(p, x)
    torch.testing.assert_close(ia.log_likelihood, ib.log_likelihood, rtol=0, atol=ll_tol)


def test_weighted_gd_loss_and_gradient_equal_repeated_rows() -> None:
    x, _ = mixture_data(2, 2, 30, seed=18)
    counts = (torch.arange(30) % 3).to(x.dtype)
    p = random_params("full", 2, 2, seed=19)
    rep = x.repeat_interleave(counts.long(), 0)
    ga, la = torch.func.grad_and_value(pg.loss)(p, x, counts)
    gb, lb = torch.func.grad_and_value(pg.loss)(p, rep)
    torch.testing.assert_close(la, lb, rtol=0, atol=bounds.log_lik_atol(p, rep, n=rep.shape[0]))
    bounds.assert_leaves_close(ga, gb, bounds.stats_rtol(p, rep), "gradient")


# --- float32 accuracy -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["full", "diagonal", "tied"])
def test_float32_offset_and_far_clusters_match_float64(family: str) -> None:
    """Data near 1e4 with unit spread, clusters 2e3 apart: a one-pass update about a common
    origin would lose every digit in float32 (eps·(1e4)² ≫ 1). Both dtypes start from the same
    float32 numbers, so what differs is float32 arithmetic alone, bounded by eps(float32) times
    the condition and the claimed width ratio (bounds.low_precision_rtol), and the float32
    positions' own rounding, eps·|μ|."""
    x64, _ = mixture_data(2, 2, 400, separation=1.0, seed=20)
    x64 = x64 + torch.tensor([1e4, -1e4], dtype=torch.float64)
    x64[:200] += 2e3
    x32 = x64.float()
    x64 = x32.double()  # exactly the float32 values
    p32 = pg.init(x64, 2, family).to(torch.float32)
    p64 = p32.to(torch.float64)
    steps = 5
    rtol = bounds.low_precision_rtol(p64, x64, torch.float32, steps=steps)
    assert rtol < 1e-2  # a meaningful check: a moment about the origin would be off by ~10
    for _ in range(steps):
        p64, p32 = pg.em_step(p64, x64), pg.em_step(p32, x32)
    c64, c32 = pg.covariances(p64), pg.covariances(p32).double()
    assert float((c32 - c64).abs().max() / c64.abs().amax()) <= rtol
    width = float(c64.diagonal(dim1=-2, dim2=-1).amax().sqrt())
    position = bounds.SLACK * bounds.eps(torch.float32) * float(p64.means.abs().max()) * steps
    assert float((p32.means.double() - p64.means).abs().max()) <= rtol * width + position
