"""The float32 E-step (puregmm/_precision.py): plain eager E-steps of float32 data run T and its
two GEMMs in float32 where the error bound allows it, float64 elsewhere.

* the float32 path's statistics and one EM step against the float64 computation on the same
  float32 numbers, within the bound of float32 arithmetic (:func:`_stats_bound`, below);
* a narrow component far from the centre: the bound keeps float64 (the result is the float64
  path's, bit for bit), where float32 would lose far more than the data's own rounding;
* with one such component among many, only it is whitened (float64) and the rest stay float32;
* under ``vmap`` nothing is decided: float64 throughout;
* float32 fits against scikit-learn's float32 EM from the same start.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import puregmm as pg
from puregmm import _moments as mo
from puregmm import _precision, density, em
from puregmm.families import Family
from tests import bounds
from tests.oracles import mixture_data, sk_precisions, to_np

F32, F64 = torch.float32, torch.float64
FAMILIES = ["full", "diagonal", "isotropic"]  # the natural mode (tied is pooled: float64)


@pytest.fixture(autouse=True)
def _natural_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the natural form's precision: keep the full family on it at sizes
    where the E-step would otherwise whiten for speed (Family.whitening_cheaper)."""
    monkeypatch.setattr(Family, "whitening_cheaper", lambda self, n, k, d: False)


def _plan(p: pg.GMMParams, dtype: torch.dtype = F32) -> tuple[torch.dtype, list[int]]:
    centre = mo.centre_of(p)
    return _precision.precision_plan(p, centre, density.whitening(p.to(F64), centre), dtype)


def _float64_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, the float64 computation on the same data: the plan float64 data get."""
    plan = _precision.precision_plan
    monkeypatch.setattr(_precision, "precision_plan", lambda p, c, w, dtype: plan(p, c, w, F64))


def _data(family: str, seed: int = 0, n: int = 3000) -> tuple[pg.GMMParams, torch.Tensor]:
    """Three overlapping clusters (the regime where float32 loses nothing), float32."""
    x, _ = mixture_data(3, 4, n, separation=1.5, seed=seed)
    x32 = x.to(F32)
    return pg.init(x32, 3, family, key=seed), x32


#: Inner products of n float32 terms round by at most λ·√n·eps relative to the sum of their
#: absolute values with probability >= 1 - 2n·exp(-λ²/2) (Higham & Mary, "A new approach to
#: probabilistic rounding error analysis", SIAM J. Sci. Comput. 41, 2019, Thm 2.4; roundings
#: independent and of mean zero): 1e-11 at λ = 8 for n <= 256. The worst case, γ_n = n·eps,
#: is ~√n times larger and would make these tests unable to tell a 1e-3 bug from rounding.
LAMBDA = 8.0


def _gamma(n: int) -> float:
    """The probabilistic γ of :data:`LAMBDA` for n float32 terms."""
    return LAMBDA * math.sqrt(n) * bounds.eps(F32)


def _stats_bound(p: pg.GMMParams, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """Elementwise bounds (n_k [K], X_k [K, D], S_k by family, Σ log p) on |float32 path - float64
    path| on the same float32 data and params.

    Per row n and component k the float32 form rounds ℓ_nk by δ_nk <= (γ_P + 4 eps)·A_nk, A_nk =
    Σ_j |η_kj| |T_nj| (the GEMM's inner product of P terms; η rounded to float32, y = x - g and
    each product once more: 4 eps). A responsibility moves by r_nk·(δ_nk + Σ_j r_nj δ_nj)
    (softmax conditioning) plus a few eps of its own rounding, ρ_nk, and by the float32 floor
    eps³ of the responsibilities' clamp where float64's is ~0. M = Σ r T then errs by Σ_n r_nk
    |T_n| (ρ_nk + 3 eps + γ_256) (T's entries; the float32 block sums of
    :data:`puregmm._precision.SUM_ROWS` rows, then float64 over the blocks: γ_N of float64).
    The shift to μ_k (S_k = S_g - X_g dᵀ - d X_gᵀ + n d dᵀ) turns |T_n| = |ŷ||ŷ|ᵀ into
    (|y_n| + |d_k|)(|y_n| + |d_k|)ᵀ. Σ log p: Σ_n Σ_k r_nk δ_nk, a few eps of each log p and the
    float32 sums over a chunk's rows and over the chunks. The errors of different rows add up
    (aligned, the worst case). Written with the float64 η and T of the library's form."""
    p64, x64 = p.to(F64), x.to(F64)
    d, n = p.dim, x.shape[0]
    centre = mo.centre_of(p).to(F64)
    lay = p.spec.moment_layout(d)
    eta, t = mo.natural(p64, centre, F64, lay), mo.products(lay, x64, centre, F64, None)  # [K, P], [N, P]
    eps32 = bounds.eps(F32)
    delta = (_gamma(lay.width) + 4 * eps32) * (t.abs() @ eta.abs().mT)  # [N, K]
    log_joint = t @ eta.mT
    r = torch.softmax(log_joint, 1)  # [N, K]
    rho = delta + (r * delta).sum(1, keepdim=True) + 4 * eps32
    w = r * (rho + 3 * eps32 + _gamma(_precision.SUM_ROWS) + bounds.gamma(n, F64)) + eps32**3  # [N, K]
    e = (x64 - centre).abs().unsqueeze(1) + (p64.means - centre).abs()  # [N, K, D]: |y_n| + |d_k|
    n_b, x_b = w.sum(0), torch.einsum("nk,nkd->kd", w, e)
    s_b = torch.einsum("nk,nkd,nke->kde", w, e, e)
    if p.spec.scale_ndim == 1:
        s_b = s_b.diagonal(dim1=-2, dim2=-1)
    elif p.spec.scale_ndim == 0:
        s_b = s_b.diagonal(dim1=-2, dim2=-1).sum(-1)
    sums = 4 * eps32 + _gamma(chunk) + _gamma(-(-n // chunk) + 1)
    ll_b = (r * delta).sum() + sums * torch.logsumexp(log_joint, 1).abs().sum()
    return n_b, x_b, s_b, ll_b


def _units(stats: em.Stats, family: str) -> tuple[torch.Tensor, ...]:
    """Each statistic's natural unit: n_k; n_k·σ_k per coordinate for X_k (≈ 0 about the mean);
    √(S_ii S_jj) for S_k."""
    n = stats.resp_sum.double()
    s = stats.xx_sum.double()
    diag = s.diagonal(dim1=-2, dim2=-1) if family == "full" else s
    sd = (diag / n.reshape(-1, *([1] * (diag.dim() - 1)))).sqrt()
    x_unit = n[:, None] * (sd if diag.dim() == 2 else sd[:, None] / math.sqrt(stats.x_sum.shape[1]))
    s_unit = (diag.unsqueeze(-1) * diag.unsqueeze(-2)).sqrt() if family == "full" else s.abs()
    return n, x_unit, s_unit


def _assert_stats_close(got: em.Stats, want: em.Stats, bound: tuple[torch.Tensor, ...]) -> None:
    """|got - want| <= SLACK·bound + eps32·|want| (both rounded to float32 at the end)."""
    eps32 = bounds.eps(F32)
    for name, g, w, b in zip(("resp_sum", "x_sum", "xx_sum"), got[:3], want[:3], bound):
        err = (g.double() - w.double()).abs()
        tol = bounds.SLACK * b + eps32 * w.double().abs()
        assert bool((err <= tol).all()), f"{name}: worst err/tol {float((err / tol).max()):.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_size", [None, 700])
def test_float32_stats_match_the_float64_path(
    family: str, chunk_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same float32 data and params: the float32 path's statistics equal the float64 path's
    within the bound of float32 arithmetic; the bound is tight enough that a wrong block sum
    or layout (an error of 1e-3 relative and up) fails."""
    p, x = _data(family)
    assert _plan(p) == (F32, [])  # standardised-scale overlapping clusters: float32 loses nothing
    got = em.sufficient_stats(p, x, chunk_size=chunk_size)
    _float64_path(monkeypatch)
    want = em.sufficient_stats(p, x, chunk_size=chunk_size)
    bound = _stats_bound(p, x, chunk_size or x.shape[0])
    assert bounds.SLACK * _stats_rtol(p, x, want) < 0.1  # meaningful: a lost block or a wrong layout fails
    _assert_stats_close(got, want, bound[:3])
    ll_tol = bounds.SLACK * float(bound[3]) + bounds.eps(F32) * abs(float(want.log_lik_sum))
    assert abs(float(got.log_lik_sum) - float(want.log_lik_sum)) <= ll_tol


def _stats_rtol(p: pg.GMMParams, x: torch.Tensor, stats: em.Stats) -> float:
    """:func:`_stats_bound` in the statistics' units (:func:`_units`), the largest."""
    return max(float((b / u).max()) for b, u in zip(_stats_bound(p, x, x.shape[0]), _units(stats, p.family)))


def _step_rtol(p: pg.GMMParams, x: torch.Tensor, stats: em.Stats) -> float:
    """An EM step's (weights, means, covariances) in :func:`_gap`'s units from statistics off by
    :func:`_stats_rtol`: w = n/N, μ = c + X/n and Σ = S/n - (X/n)(X/n)ᵀ + reg move by as much,
    and each route's float32 M-step rounds them by a few eps."""
    return bounds.SLACK * (_stats_rtol(p, x, stats) + p.dim * bounds.eps(F32))


def _moments_of(p: pg.GMMParams) -> tuple[torch.Tensor, ...]:
    return pg.weights(p).double(), p.means.double(), pg.covariances(p).double()


def _gap(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """Largest difference of (weights, means, covariances), means in the widest width and
    covariances relative to the largest variance."""
    width2 = float(b[2].diagonal(dim1=-2, dim2=-1).max())
    return max(
        float((a[0] - b[0]).abs().max()),
        float((a[1] - b[1]).abs().max()) / math.sqrt(width2),
        float((a[2] - b[2]).abs().max()) / width2,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_one_em_step_matches_the_float64_path(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One EM step from the same float32 params: the statistics differ by :func:`_stats_bound`
    and the two float32 M-steps round alike (:func:`_step_rtol`)."""
    p, x = _data(family)
    got = pg.em_step(p, x)
    rtol = _step_rtol(p, x, em.sufficient_stats(p, x))
    _float64_path(monkeypatch)
    want = pg.em_step(p, x)
    assert rtol < 0.1  # meaningful: a lost block of rows or a wrong layout moves these by more
    assert _gap(_moments_of(got), _moments_of(want)) <= rtol


def _narrow_far(k: int, width: float = 1e-2) -> tuple[pg.GMMParams, torch.Tensor]:
    """K - 1 unit clusters near (10, 10, 10) and one of ``width`` ~37 from them (float32). At
    1e-2 its float64 form rounds by ~3e-9 nats (no whitening needed), its float32 one by ~2
    nats; at 1e-4 the float64 one by ~3e-5 (whitened)."""
    g = torch.Generator().manual_seed(5)
    means = torch.full((k, 3), 10.0, dtype=F64)
    means[:-1] += torch.randn(k - 1, 3, generator=g, dtype=F64)
    means[-1] = torch.tensor([40.0, -10.0, 20.0], dtype=F64)
    scale = torch.ones(k, dtype=F64)
    scale[-1] = width
    cov = scale[:, None, None] ** 2 * torch.eye(3, dtype=F64)
    p = pg.from_moments(torch.full((k,), 1.0 / k, dtype=F64), means, cov)
    labels = torch.arange(400 * k) % k
    x = means[labels] + scale[labels, None] * torch.randn(400 * k, 3, generator=g, dtype=F64)
    return p.to(F32), x.to(F32)


def test_narrow_far_component_keeps_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """The narrow component ~3e3 widths from the centre: Q/R ~ 2e3 > LOW_PRECISION_RATIO, so the
    E-step stays float64 (the float64 path's result bit for bit; one component of eight is
    enough: whitening it alone would cost more), whereas the float32 form would move its
    covariance by far more than the float32 data's own rounding."""
    p, x = _narrow_far(8)
    assert _plan(p) == (F64, [])
    got = em.sufficient_stats(p, x)
    _float64_path(monkeypatch)
    want = em.sufficient_stats(p, x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    monkeypatch.setattr(_precision, "precision_plan", lambda p, c, w, dtype: (F32, []))  # forced float32
    forced = em.sufficient_stats(p, x)
    var = want.xx_sum[-1].double() / want.resp_sum[-1].double()
    forced_var = forced.xx_sum[-1].double() / forced.resp_sum[-1].double()
    # the data's own rounding moves the variance by ~2·eps32·|μ|/σ relative (~1e-3 here)
    own = 2 * bounds.eps(F32) * float(p.means[-1].abs().max()) / 1e-2
    assert float(((forced_var - var).abs() / var.diagonal().max()).max()) > 10 * own


def test_only_the_far_component_is_whitened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight components, one so narrow and far that its float64 form rounds too much: it is
    whitened in float64, the other seven stay float32; the statistics equal the float64 path's
    (which whitens it too) within the float32 bound of the seven (the whitened one within
    float64's: its rows are claimed by it alone)."""
    p, x = _narrow_far(8, width=1e-4)
    assert _plan(p) == (F32, [7])
    got = em.sufficient_stats(p, x)
    _float64_path(monkeypatch)
    want = em.sufficient_stats(p, x)
    n_b, x_b, s_b, _ = _stats_bound(p, x, x.shape[0])
    far = bounds.stats_rtol(p.to(F64), x.to(F64))  # whitened on both routes, float64
    for b, w in zip((n_b, x_b, s_b), want[:3]):
        b[7] = far * w[7].double().abs().max()
    _assert_stats_close(got, want, (n_b, x_b, s_b))


def test_transforms_keep_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under vmap and autograd (and torch.compile) the plan is never asked: a value-dependent
    branch; the stacked E-step is the float64 path's."""
    p, x = _data("full")
    _float64_path(monkeypatch)
    want = em.sufficient_stats(p, x)

    def refuse(*args: object) -> None:
        raise AssertionError("precision_plan called under a transform")

    monkeypatch.setattr(_precision, "precision_plan", refuse)
    stacked = torch.func.vmap(lambda xs: em.sufficient_stats(p, xs))(x.unsqueeze(0))
    for a, b in zip(stacked[:3], want[:3]):  # float64 sums in another order, each rounded to float32
        torch.testing.assert_close(a[0], b, rtol=2 * bounds.eps(F32), atol=0)
    traced = pg.GMMParams(p.logits.clone().requires_grad_(), p.means, p.scale, p.family)
    em.sufficient_stats(traced, x).resp_sum.sum().backward()  # autograd: not asked either


def _sklearn_em(p: pg.GMMParams, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's EM in ``x``'s dtype from ``p``: (weights, means, covariances [K, D, D])."""
    from sklearn.mixture import GaussianMixture

    npd = to_np(x).dtype
    kind = {"full": "full", "diagonal": "diag", "isotropic": "spherical"}[p.family]
    prec = sk_precisions(p.to(F64)).astype(npd)
    gm = GaussianMixture(p.n_components, covariance_type=kind, tol=0.0, max_iter=steps, reg_covar=1e-6,
                         weights_init=to_np(pg.weights(p.to(F64))).astype(npd), means_init=to_np(p.means).astype(npd),
                         precisions_init=prec)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(to_np(x))
    assert gm.means_.dtype == npd
    cov = torch.as_tensor(gm.covariances_).double()
    d = x.shape[1]
    cov = {"full": cov, "diag": torch.diag_embed(cov), "spherical": cov[:, None, None] * torch.eye(d, dtype=F64)}[kind]
    return torch.as_tensor(gm.weights_).double(), torch.as_tensor(gm.means_).double(), cov


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_em_matches_sklearn_float32_from_the_same_start(family: str) -> None:
    """Two EM steps on float32 data from the same params, puregmm (float32 path) against
    scikit-learn in float32. Triangle inequality: ours32 - ours64 (the float32 bound,
    :func:`_step_rtol` per step), ours64 - sk64 (two float64 routes, bounds.stats_rtol about the
    origin as scikit-learn's products are), sk64 - sk32 (scikit-learn's own float32 rounding,
    taken from scikit-learn in both dtypes: it is not ours to bound)."""
    p0, x32 = _data(family, seed=2, n=1500)
    assert _plan(p0) == (F32, [])
    steps = 2
    ours = p0
    for _ in range(steps):
        ours = pg.em_step(ours, x32)
    sk32, sk64 = _sklearn_em(p0, x32, steps), _sklearn_em(p0.to(F64), x32.double(), steps)
    p64, x64 = p0.to(F64), x32.double()
    rtol = steps * _step_rtol(p0, x32, em.sufficient_stats(p0, x32))
    rtol += bounds.stats_rtol(p64, x64, steps=steps, origin=True)
    assert rtol < 0.1 * steps
    position = (
        bounds.SLACK
        * bounds.eps(F32)
        * float(p0.means.abs().max())
        / math.sqrt(float(sk64[2].diagonal(dim1=-2, dim2=-1).max()))
    )
    assert _gap(_moments_of(ours), sk32) <= rtol + _gap(sk32, sk64) + position
