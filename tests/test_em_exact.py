"""EM statistics against independent references (issue 4, target 6, EM half).

* The fast path (per chunk: the density's whitening GEMM, responsibilities in log space, the
  moments as one float64 GEMM of folded products about the centre of the means, then an exact
  shift to each component's mean) against a naive per-component loop in numpy with scipy's
  densities: float64, every family, with and without weights, any chunking.
* The M-step against the closed form computed from the naive statistics.
* Every tolerance is an error bound from tests/bounds.py (eps x condition x distance ratio x
  number of terms), so the checks hold on any CPU and any MKL code path.
* The folded product layout covers each pair of lifted columns exactly once.
* The in-place (workspace) path, the autograd path and the vmap path agree.
* float32 against float64: statistics and several EM steps on data with a large common offset
  and on clusters far apart relative to their width; the float32 loss is within
  1e-5·max(1, |loss|) of the float64 one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import puregmm as pg
from puregmm import _chunks, _moments, em
from tests import bounds
from tests.oracles import mixture_data, random_params, to_np

# --- the naive reference --------------------------------------------------------------------------


def naive_stats(params: pg.GMMParams, x: torch.Tensor, w: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Σ ω r, Σ ω r (x - μ_k), Σ ω r (x - μ_k)(x - μ_k)ᵀ (its diagonal / trace), Σ ω log p, one
    component at a time in numpy float64, densities from scipy."""
    xn = to_np(x)
    n, d = xn.shape
    k = params.n_components
    wn = np.ones(n) if w is None else to_np(w)
    logw = np.log(to_np(pg.weights(params)))
    mu = to_np(params.means)
    cov = to_np(pg.covariances(params))
    joint = np.stack([logw[j] + multivariate_normal(mu[j], cov[j]).logpdf(xn).reshape(n) for j in range(k)], 1)
    lse = logsumexp(joint, axis=1)
    resp = np.exp(joint - lse[:, None]) * wn[:, None]
    out: dict[str, list[np.ndarray]] = {"resp_sum": [], "x_sum": [], "xx_sum": []}
    for j in range(k):
        diff = xn - mu[j]
        r = resp[:, j]
        out["resp_sum"].append(r.sum())
        out["x_sum"].append((r[:, None] * diff).sum(0))
        s = np.zeros((d, d))
        for i in range(n):  # the plainest possible loop
            s += r[i] * np.outer(diff[i], diff[i])
        out["xx_sum"].append(s)
    xx = np.stack(out["xx_sum"])
    spec = params.spec
    if spec.scale_ndim == 2 and not spec.per_component:  # tied: only the sum over components is defined
        xx = xx.sum(0)
    elif spec.scale_ndim == 1:
        xx = np.diagonal(xx, axis1=1, axis2=2)
    elif spec.scale_ndim == 0:
        xx = np.trace(xx, axis1=1, axis2=2)
    return {
        "resp_sum": np.array(out["resp_sum"]),
        "x_sum": np.stack(out["x_sum"]),
        "xx_sum": xx,
        "log_lik_sum": np.array((wn * lse).sum()),
        "weight_sum": np.array(wn.sum()),
        "lse": lse,
    }


def stats_atol(params: pg.GMMParams, x: torch.Tensor, w: torch.Tensor | None, claimed: bool) -> dict[str, float]:
    """Per field, the rounding two correct E-steps may differ by (tests/bounds.py): sums over N
    rows in other orders, each term's responsibility from a log-density rounded otherwise. The
    moment form rounds each row at its distance from the centre of the means in widths
    (component_log_prob_atol); per-component whitening (``claimed``) at its distance from the
    components that claim it."""
    lp_err = bounds.log_lik_atol(params, x) if claimed else bounds.component_log_prob_atol(params, x)
    total = float(x.shape[0] if w is None else w.sum())
    out = {f: bounds.sum_atol(params, x, w, power=p, claimed=claimed, term_rtol=lp_err) for f, p in POWERS.items()}
    out["log_lik_sum"] = total * (bounds.log_lik_atol(params, x, n=x.shape[0]) + lp_err)
    return out


POWERS = {"resp_sum": 0, "x_sum": 1, "xx_sum": 2, "weight_sum": 0}  # size of each term: ‖x - μ‖^power


def assert_stats_match(
    stats: em.Stats,
    ref: dict[str, np.ndarray],
    params: pg.GMMParams,
    x: torch.Tensor,
    w: torch.Tensor | None = None,
    claimed: bool = False,
) -> None:
    atol = stats_atol(params, x, w, claimed)
    for name in ("resp_sum", "x_sum", "xx_sum", "log_lik_sum", "weight_sum"):
        got, want = to_np(getattr(stats, name)), ref[name]
        if name == "xx_sum" and got.ndim == want.ndim + 1:  # tied: Σ_k S_k (see em._tied_stats)
            got = got.sum(0)
        err = np.abs(got - want).max()
        assert err <= atol[name], f"{name}: error {err:.2e} > {atol[name]:.2e} (max |{name}| {np.abs(want).max():.2e})"


# --- float64 exactness ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_stats_equal_naive_loop(family: str, weighted: bool, chunk_size: int | None) -> None:
    x, _ = mixture_data(3, 4, 131, separation=2.0, seed=1)
    x = x + 50.0  # away from the origin: the shift to the centres is exercised
    p = random_params(family, 3, 4, seed=2)
    p = pg.GMMParams(p.logits, p.means + 50.0, p.scale, family)
    w = torch.rand(131, dtype=x.dtype, generator=torch.Generator().manual_seed(3)) * 2 if weighted else None
    stats = em.sufficient_stats(p, x, w, chunk_size=chunk_size)
    ref = naive_stats(p, x, w)
    assert_stats_match(stats, ref, p, x, w)
    ranked = ref["lse"]  # worst points: the K lowest log-densities, lowest first
    order = np.argsort(ranked, kind="stable")[:3]
    lse_atol = bounds.component_log_prob_atol(p, x)
    np.testing.assert_allclose(to_np(stats.worst_log_lik), ranked[order], rtol=0, atol=lse_atol)
    np.testing.assert_array_equal(to_np(stats.worst_x), to_np(x)[order])


@pytest.mark.parametrize("d", [1, 2, 3, 6, 7])
def test_stats_equal_naive_loop_across_dimensions(d: int) -> None:
    """Odd and even D: the folded layout differs (m = D + 1 lifted columns, h = ceil((m+1)/2))."""
    x, _ = mixture_data(2, d, 60, separation=3.0, seed=4 + d)
    for family in ("full", "tied", "diagonal", "isotropic"):
        p = random_params(family, 2, d, seed=5 + d)
        assert_stats_match(em.sufficient_stats(p, x, chunk_size=16), naive_stats(p, x), p, x)


def test_more_components_than_rows_in_a_chunk() -> None:
    x, _ = mixture_data(5, 2, 11, separation=3.0, seed=6)
    p = random_params("full", 5, 2, seed=7)
    stats = em.sufficient_stats(p, x, chunk_size=3)  # chunks of 3 (and 2) rows, K = 5
    ref = naive_stats(p, x)
    assert_stats_match(stats, ref, p, x)
    lse_atol = bounds.component_log_prob_atol(p, x)
    np.testing.assert_allclose(to_np(stats.worst_log_lik), np.sort(ref["lse"])[:5], rtol=0, atol=lse_atol)


def test_zero_weight_rows_are_never_worst() -> None:
    x, _ = mixture_data(2, 2, 20, separation=3.0, seed=8)
    p = random_params("diagonal", 2, 2, seed=9)
    w = torch.ones(20, dtype=x.dtype)
    lse = to_np(pg.log_prob(p, x))
    w[int(np.argmin(lse))] = 0.0  # the worst row is padding
    stats = em.sufficient_stats(p, x, w, chunk_size=6)
    assert_stats_match(stats, naive_stats(p, x, w), p, x, w)
    assert float(stats.worst_log_lik[0]) == pytest.approx(
        np.sort(lse)[1], rel=0, abs=bounds.component_log_prob_atol(p, x)
    )


@pytest.mark.parametrize("family", ["full", "tied", "diagonal", "isotropic", "shared"])
def test_m_step_equals_closed_form_of_naive_stats(family: str) -> None:
    x, _ = mixture_data(3, 3, 200, separation=2.5, seed=10)
    p = random_params(family, 3, 3, seed=11)
    ref = naive_stats(p, x)
    reg = 1e-6
    new = pg.em_step(p, x, reg_covar=reg)
    nk = ref["resp_sum"] + 10 * np.finfo(np.float64).eps
    shift = ref["x_sum"] / nk[:, None]
    means = to_np(p.means) + shift
    # the naive statistics and ours differ by stats_atol; the M-step divides by n_k ~ N/K
    tol = bounds.stats_rtol(p, x) + bounds.component_log_prob_atol(p, x)
    bounds.assert_leaves_close(to_np(new.means), means, tol, "means")
    bounds.assert_leaves_close(to_np(pg.weights(new)), nk / nk.sum(), tol, "weights")
    d = x.shape[1]
    if family in ("full", "tied"):
        outer = shift[:, :, None] * shift[:, None, :]
        if family == "tied":  # Σ_k n'_k Σ_k / Σ n' with n'_k Σ_k = S_k - n'_k d_k d_kᵀ
            pooled = (ref["xx_sum"] - (nk[:, None, None] * outer).sum(0)) / nk.sum()
            cov = np.broadcast_to(pooled, outer.shape)
        else:
            cov = ref["xx_sum"] / nk[:, None, None] - outer
        cov = cov + reg * np.eye(d)
    elif family == "diagonal":
        cov = np.stack([np.diag(v) for v in ref["xx_sum"] / nk[:, None] - shift**2 + reg])
    else:
        var = (ref["xx_sum"] / nk - (shift**2).sum(1)) / d
        if family == "shared":
            var = np.full_like(var, (nk * var).sum() / nk.sum())
        cov = (var + reg)[:, None, None] * np.eye(d)
    bounds.assert_leaves_close(to_np(pg.covariances(new)), cov, tol, "covariances")


# --- internals: the folded layout and the three code paths ----------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8, 16, 31, 32])
def test_folded_products_cover_every_pair_once(d: int) -> None:
    lay = _moments.layout(2, d)
    index = _moments.fold_index(d, torch.device("cpu"))
    m = d + 1
    assert lay.width >= m * (m + 1) // 2
    upper = index[torch.triu_indices(m, m).unbind()]
    assert len(set(upper.tolist())) == m * (m + 1) // 2  # distinct columns for distinct pairs
    assert torch.equal(index, index.T)
    x = torch.randn(9, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    centre = torch.randn(d, dtype=torch.float64)
    t = _moments.products(lay, x, centre, torch.float64, None)  # [9, P]
    xl = torch.cat([x - centre, torch.ones(9, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(t[:, index.reshape(-1)].reshape(9, m, m), xl[:, :, None] * xl[:, None, :])
    work = _moments.Work(lay, 16, 3, x, torch.float64)
    torch.testing.assert_close(_moments.products(lay, x, centre, torch.float64, work), t, rtol=0, atol=0)


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("d", [1, 3, 4])
def test_natural_parameters_give_the_log_density(family: str, d: int) -> None:
    """⟨η_k, T(x)⟩ = log w_k + log N(x | μ_k, Σ_k): against scipy and pg.log_prob, float64."""
    x, _ = mixture_data(3, d, 40, separation=3.0, seed=30 + d)
    x = x + 1e3
    p = random_params(family, 3, d, seed=31 + d)
    p = pg.GMMParams(p.logits, p.means + 1e3, p.scale, family)
    centre = p.means.mean(0)
    lay = _moments.layout(p.spec.scale_ndim, d)
    joint = _moments.natural(p, centre, torch.float64) @ _moments.products(lay, x, centre, torch.float64, None).mT
    w, mu, cov = to_np(pg.weights(p)), to_np(p.means), to_np(pg.covariances(p))
    ref = np.stack([np.log(w[j]) + multivariate_normal(mu[j], cov[j]).logpdf(to_np(x)).reshape(-1) for j in range(3)])
    atol = bounds.component_log_prob_atol(p, x)  # data and means 1e3 from the origin: positions count
    np.testing.assert_allclose(to_np(joint), ref, rtol=0, atol=atol)
    lse = to_np(torch.logsumexp(joint, 0))
    np.testing.assert_allclose(lse, to_np(pg.log_prob(p, x)), rtol=0, atol=atol + bounds.log_lik_atol(p, x))


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_autograd_and_vmap_paths_agree(family: str, dtype: torch.dtype) -> None:
    x, _ = mixture_data(3, 3, 90, separation=3.0, seed=12, dtype=dtype)
    p = random_params(family, 3, 3, seed=13, dtype=dtype)
    w = torch.rand(90, dtype=dtype, generator=torch.Generator().manual_seed(14))
    plain = em.sufficient_stats(p, x, w, chunk_size=32)  # workspace, in place
    leaves = [t.detach().clone().requires_grad_(True) for t in (p.logits, p.means, p.scale)]
    graded = em.sufficient_stats(pg.GMMParams(leaves[0], leaves[1], leaves[2], family), x, w, chunk_size=32)
    stacked = pg.GMMParams(p.logits.unsqueeze(0), p.means.unsqueeze(0), p.scale.unsqueeze(0), family)
    vmapped = torch.func.vmap(lambda q: em.sufficient_stats(q, x, w, chunk_size=32))(stacked)
    # three routes to the same sums; in float32 the densities (responsibilities) round in float32
    atol = stats_atol(p, x, w, claimed=False)
    atol |= {"worst_log_lik": bounds.component_log_prob_atol(p, x), "worst_x": 0.0}
    for name, a, b, c in zip(plain._fields, plain, graded, vmapped):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=atol[name], msg=name)
        torch.testing.assert_close(c[0], a, rtol=0, atol=atol[name], msg=name)
    total = graded.xx_sum.sum() + graded.x_sum.sum()
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)


# --- float32 against float64 -----------------------------------------------------------------------


def _offset_data(far: float) -> torch.Tensor:
    """Two unit-spread clusters near (1e4, -1e4): ``far`` apart (0: overlapping)."""
    x, _ = mixture_data(2, 3, 600, separation=1.5, seed=20)
    x = x + torch.tensor([1e4, -1e4, 3e3], dtype=torch.float64)
    x[:300, 0] += far
    return x


def _second_moments(stats: em.Stats, family: str) -> torch.Tensor:
    """S_k / n_k in float64, whatever the family's shape of ``xx_sum``."""
    n, xx = stats.resp_sum.double(), stats.xx_sum.double()
    if xx.dim() == 3 and family == "tied":  # only Σ_k S_k is defined (see em._tied_stats)
        return xx.sum(0) / n.sum()
    return xx / n.reshape(n.shape + (1,) * (xx.dim() - 1))


@pytest.mark.parametrize("family", ["full", "tied", "diagonal", "isotropic"])
@pytest.mark.parametrize("far", [0.0, 2e3])
def test_float32_stats_match_float64(family: str, far: float) -> None:
    """The moments run in float64 whatever the data's dtype: on the same (float32) data and
    params, a float32 E-step loses only what the float32 densities lose, also for clusters 2e3
    standard deviations apart (a float32 GEMM about a common centre would lose every digit)."""
    x32 = _offset_data(far).float()
    p32 = pg.init(x32, 2, family, key=1)
    p64, x64 = p32.to(torch.float64), x32.double()
    s32 = em.sufficient_stats(p32, x32)
    s64 = em.sufficient_stats(p64, x64)
    # float32 log-densities (taken about the centre of the means, subtracted in float64) move
    # the responsibilities; the sums themselves are float64 (bounds.sum_atol's term_rtol), and
    # returned rounded to float32 (eps32 relative to each: n_k, S_k and Σ r (x - μ) once each)
    delta = bounds.log_lik_atol(p64, x64, dtype=torch.float32, about=p64.means.mean(0))
    n_err, x_err, s_err = (bounds.sum_atol(p64, x64, power=k, claimed=True, term_rtol=delta) for k in (0, 1, 2))
    eps32 = bounds.eps(torch.float32)
    n_min = float(s64.resp_sum.min())
    ref = _second_moments(s64, family)
    m_scale = float(ref.abs().max())
    err = float((_second_moments(s32, family) - ref).abs().max() / m_scale)
    assert err <= (s_err + m_scale * n_err) / n_min / m_scale + 2 * eps32, err
    torch.testing.assert_close(s32.resp_sum.double(), s64.resp_sum, rtol=eps32, atol=n_err)
    shift = s64.x_sum / s64.resp_sum[:, None]
    shift_atol = (x_err + float(shift.abs().max()) * n_err) / n_min + 2 * eps32 * float(shift.abs().max())
    torch.testing.assert_close(s32.x_sum.double() / s64.resp_sum[:, None], shift, rtol=0, atol=shift_atol)


@pytest.mark.parametrize("family", ["full", "tied", "diagonal", "isotropic"])
def test_float32_em_loss_matches_float64_with_large_offset(family: str) -> None:
    """Five EM steps in each dtype from the same start, data ~1e4 from the origin: the float32
    loss is within 1e-5·max(1, |loss|) of the float64 one. (1e-5 is the requirement, issue 4
    target 6, not a rounding bound: float32 data at 1e4 are themselves rounded by 6e-4.)"""
    x64 = _offset_data(0.0)
    p64 = pg.init(x64, 2, family, key=2)
    p32, x32 = p64.to(torch.float32), x64.float()
    for _ in range(5):
        p64, p32 = pg.em_step(p64, x64), pg.em_step(p32, x32)
    loss64 = float(pg.loss(p64, x64))
    loss32 = float(pg.loss(p32.to(torch.float64), x64))  # the float32 fit, scored exactly
    assert abs(loss32 - loss64) <= 1e-5 * max(1.0, abs(loss64)), (loss32, loss64)
    own32 = float(pg.loss(p32, x32))  # and as float32 scores it
    assert abs(own32 - loss64) <= 1e-5 * max(1.0, abs(loss64)), (own32, loss64)


def test_worst_rows_are_distinct_with_few_finite_scores() -> None:
    """The argmin passes (vmap path) never pick a row twice, also when most scores are +inf
    (padding) or NaN, and agree with the stable sort."""
    ranked = torch.tensor([float("inf"), 3.0, float("nan"), float("inf"), 1.0, 3.0], dtype=torch.float64)
    for k in (2, 4, 6):
        plain = _chunks.Worst(k)
        plain.add(ranked, 0)  # not eager: the argmin passes
        rows = plain.rows[0].tolist()
        assert len(set(rows)) == k and rows[:3] == [4, 1, 5][: min(k, 3)]
        batched = torch.func.vmap(lambda r, k=k: _worst_rows(r, k))(ranked.unsqueeze(0))[0]
        assert batched.tolist() == rows


def _worst_rows(r: torch.Tensor, k: int) -> torch.Tensor:
    w = _chunks.Worst(k)
    w.add(r, 0)
    return w.rows[0]


# --- narrow components: the whitened fallback and the collapse repair ------------------------------


def _narrow(family: str, width: float = 1e-5) -> tuple[pg.GMMParams, torch.Tensor]:
    """Two clusters of 40 points, 36 apart, each of standard deviation ``width``, and params one
    step from their moments (means off by width/2, covariances width²·I)."""
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.0, 0.0], [30.0, 20.0]], dtype=torch.float64)
    x = (centres.repeat_interleave(40, 0) + width * torch.randn(80, 2, generator=g, dtype=torch.float64))[
        torch.randperm(80, generator=g)
    ]
    cov = (width**2 * torch.eye(2, dtype=torch.float64)).expand(2, 2, 2)
    weights = torch.tensor([0.4, 0.6], dtype=torch.float64)
    return pg.from_moments(weights, centres + 0.5 * width, cov, family), x


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_narrow_far_components_get_exact_stats(family: str) -> None:
    """Components 1e6 widths from the centre: the exponential-family form would round by
    ~eps·(18/1e-5)² = 7e-4 nats, so eager E-steps whiten each row per component instead: the
    statistics equal the naive per-component loop within the rounding of whitened rows
    (bounds: claimed distances and the rows' positions, ~1e-7 relative here)."""
    p, x = _narrow(family)
    assert float(_moments.rounding_bound(p, _moments.centre_of(p)).max()) > _moments.MAX_ROUNDING
    assert_stats_match(em.sufficient_stats(p, x), naive_stats(p, x), p, x, claimed=True)
    assert_stats_match(em.sufficient_stats(p, x, chunk_size=7), naive_stats(p, x), p, x, claimed=True)
    info = pg.em_step(p, x, reg_covar=0.0, return_info=True)[1]
    ll_atol = 2 * bounds.log_lik_atol(p, x, n=x.shape[0])  # two routes, each within the bound
    torch.testing.assert_close(info.log_likelihood, -pg.loss(p, x), rtol=0, atol=ll_atol)
    # with weights (zeros among them: padding) and a masked component (weight 0)
    w = torch.rand(80, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    w[::7] = 0.0
    padded = pg.pad_components(p, 3)
    with np.errstate(divide="ignore"):  # log 0 of the masked component's weight
        ref = naive_stats(padded, x, w)
    assert_stats_match(em.sufficient_stats(padded, x, w), ref, padded, x, w, claimed=True)
    assert float(pg.em_step(padded, x, sample_weight=w, reg_covar=0.0).logits[-1]) == -math.inf


def test_narrow_far_components_step_like_sklearn() -> None:
    """Three EM steps without regularisation on the narrow clusters equal scikit-learn's (full:
    its M-step takes each covariance about its own mean; its tied/diag/spherical M-steps use
    E[x x] - μ μ, which loses every digit here, so those are held against the naive loop above)."""
    from tests.oracles import sk_covariances_full, sklearn_em

    p0, x = _narrow("full")
    p = p0
    for _ in range(3):
        p, info = pg.em_step(p, x, reg_covar=0.0, return_info=True)
        assert int(info.n_resets) == 0
    gm = sklearn_em(p0, x, 3, reg_covar=0.0)
    # both whiten (scikit-learn: about each own mean): claimed distances and positions count
    tol = bounds.stats_rtol(p0, x, steps=3, claimed=True)
    assert tol < 1e-4  # meaningful: the moment form would be off by ~7e-4 of the widths
    bounds.assert_leaves_close(to_np(pg.weights(p)), gm.weights_, tol, "weights")
    sk = pg.from_moments(torch.as_tensor(gm.weights_), torch.as_tensor(gm.means_), torch.as_tensor(gm.covariances_))
    bounds.assert_params_close(pg.GMMParams(sk.logits, p.means, sk.scale, "full"), sk, tol, "means in widths")
    cov_want = sk_covariances_full(gm, 2, 2)
    bounds.assert_leaves_close(to_np(pg.covariances(p)), cov_want, tol, "covariances", floor=0.0)


def _collapsing(family: str) -> tuple[pg.GMMParams, torch.Tensor]:
    """30 points of N(0, I₃) and one lone point at (4, 4, 4) that a component sits on."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(30, 3, generator=g, dtype=torch.float64), torch.full((1, 3), 4.0, dtype=torch.float64)])
    cov = torch.stack([torch.eye(3, dtype=torch.float64), 1e-6 * torch.eye(3, dtype=torch.float64)])
    means = torch.stack([torch.zeros(3, dtype=torch.float64), torch.full((3,), 4.0 + 1e-4, dtype=torch.float64)])
    return pg.from_moments(torch.tensor([0.9, 0.1], dtype=torch.float64), means, cov, family), x


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_collapse_onto_one_point_is_repaired_and_counted(family: str) -> None:
    """Without regularisation a component on one point collapses: its variance would be the
    rounding of (x - μ)² (~1e-37), which no float64 E-step resolves. The M-step widens it to
    (POSITION_RESOLUTION·max |μ_i|)² and counts a repair; everything stays finite and EM goes on."""
    p, x = _collapsing(family)
    p = pg.em_step(p, x, reg_covar=0.0)  # the mean lands on the point; its variance is ~1e-15 of rounding
    assert float(pg.covariances(p)[1].diagonal().max()) < 1e-6 * 1e-6  # shrunk a millionfold from 1e-6: collapsed
    least = (_moments.POSITION_RESOLUTION**2) * float(x[-1].square().max())
    for _ in range(3):
        p, info = pg.em_step(p, x, reg_covar=0.0, return_info=True)
        assert int(info.n_resets) == 1
        assert torch.isfinite(info.log_likelihood) and all(torch.isfinite(t).all() for t in (p.means, p.scale))
        var = torch.linalg.eigvalsh(pg.covariances(p)[1])
        # at least the floor, up to eigvalsh's rounding (D·eps relative, κ ~ 1); at most 10x it (the design)
        low = least * (1 - bounds.SLACK * 3 * bounds.eps(torch.float64))
        assert low <= float(var.min()) and float(var.max()) <= 10 * least
    # the mean of one point: μ + (x - μ), rounded at the point's position
    position = bounds.SLACK * bounds.eps(torch.float64) * float(x[-1].abs().max())
    torch.testing.assert_close(p.means[1], x[-1], rtol=0, atol=position)


def test_numerically_singular_covariance_is_repaired_and_counted() -> None:
    """Three points in 3-D span a plane: without regularisation the component on them gets a
    covariance whose smallest eigenvalue is rounding (~1e-17 of the largest). The M-step adds
    D·10·D·eps·max variance to it, counted; EM never loses likelihood in uncounted steps."""
    g = torch.Generator().manual_seed(6)
    plane = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64) + 5.0
    x = torch.cat([torch.randn(25, 3, generator=g, dtype=torch.float64), plane])
    cov = torch.stack([torch.eye(3, dtype=torch.float64), 0.3 * torch.eye(3, dtype=torch.float64)])
    means = torch.stack([torch.zeros(3, dtype=torch.float64), plane.mean(0)])
    p = pg.from_moments(torch.tensor([0.9, 0.1], dtype=torch.float64), means, cov, "full")
    counted, last, last_tol = 0, float(-pg.loss(p, x)), bounds.log_lik_atol(p, x, n=x.shape[0])
    for _ in range(12):
        p, info = pg.em_step(p, x, reg_covar=0.0, return_info=True)
        now, tol = float(-pg.loss(p, x)), bounds.log_lik_atol(p, x, n=x.shape[0])
        counted += int(info.n_resets)
        if int(info.n_resets) == 0:  # up to both scores' rounding (κ of the nearly flat component counts)
            assert now >= last - (tol + last_tol), (now, last, tol + last_tol)
        last, last_tol = now, tol
        eig = torch.linalg.eigvalsh(pg.covariances(p)[1])
        # the repair adds 10·D²·eps·max: at least 10·eps·max after eigvalsh's own D·eps
        assert float(eig[0]) >= 10 * bounds.eps(torch.float64) * float(eig[-1])
    assert counted >= 1


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_score_pass_equals_the_statistics_scores_under_vmap(family: str) -> None:
    """A batched fit's final loss takes the natural form's scores alone under vmap (estep.log_lik:
    no moments, no worst rows); it equals the statistics' log-likelihood to the rounding of a
    mean log-density."""
    from puregmm.methods import em_nll

    g = torch.Generator().manual_seed(5)
    xs = torch.randn(3, 200, 3, generator=g, dtype=torch.float64) + 5 * torch.randint(0, 2, (3, 200, 1), generator=g)
    ws = torch.rand(3, 200, generator=g, dtype=torch.float64)
    ps = [pg.init(xs[b], 3, family, key=1) for b in range(3)]
    stacked = torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *ps)
    got = torch.func.vmap(em_nll, in_dims=(0, 0, 0))(stacked, xs, ws)
    for b in range(3):
        s = pg.sufficient_stats(ps[b], xs[b], ws[b])
        want = -s.log_lik_sum / s.weight_sum
        atol = bounds.log_lik_atol(ps[b], xs[b], n=xs.shape[1])
        assert abs(float(got[b] - want)) <= atol, (b, float(got[b] - want), atol)
