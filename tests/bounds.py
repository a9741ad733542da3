"""Error bounds for the numerical tests: every tolerance is eps(dtype) times a condition number,
a distance ratio or a count of accumulated terms, times a modest factor; never what one CPU printed.

Why: the same float64 code rounds differently on other CPUs (MKL picks its GEMM and LAPACK
kernels by instruction set: AVX-512 on a Xeon, AVX2 on an EPYC; ``MKL_CBWR=COMPATIBLE`` forces
another), under torch's other vectorised kernels (``ATEN_CPU_CAPABILITY=default``), and in
compiled, vmapped, chunked or distributed code (other summation orders). Two correct results
then differ by rounding, which the classical bounds cap (Higham, *Accuracy and Stability of
Numerical Algorithms*, ch. 3, 8, 10):

* a sum of n terms in any order is off by at most γ_n·Σ|t_i|, γ_n = n·eps/(1 - n·eps);
* a Cholesky factor, solve or eigen-decomposition of a matrix of condition number κ is off by
  ~D·κ·eps relative;
* a log-density, a statistic or an EM update computed at a point r widths from a component
  (r = :func:`width_ratio`) is rounded at the scale r²·σ² while the answer lives at the scale
  σ²: eps·r² relative. (The moment form about a common centre has r up to the spread of the
  means over the narrowest width; per-component whitening only the rows' own distances.)

Each test multiplies what applies to it; ``SLACK`` is the constant those bounds leave out (a
few operations per term, both sides of a comparison off by the bound). A real bug moves a
result by far more than these bounds (1e-3 and up), so the tests still fail on one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor

import puregmm as pg

#: The modest factor the bounds leave out: a few roundings per term, two results compared.
SLACK = 16.0


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (2.2e-16 for float64, 1.2e-7 for float32)."""
    return float(torch.finfo(dtype).eps)


def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    """γ_n = n·eps/(1 - n·eps): the relative error bound of a sum of n terms in any order,
    relative to the sum of their absolute values (Higham, eq. 3.4)."""
    u = n * eps(dtype)
    if u >= 0.5:
        raise ValueError(f"n={n} terms in {dtype}: the bound is void (n·eps = {u:.2g})")
    return u / (1 - u)


def cond(cov: Tensor) -> float:
    """The largest 2-norm condition number λ_max/λ_min over covariances [..., D, D]. At least 1."""
    eig = torch.linalg.eigvalsh(cov.detach().to(torch.float64)).reshape(-1, cov.shape[-1])
    return max(1.0, float((eig.amax(-1) / eig.amin(-1)).max()))


def _live(params: pg.GMMParams) -> tuple[Tensor, Tensor, Tensor]:
    """log w [M], means [M, D] and precision Cholesky factors U [M, D, D] (precision U Uᵀ,
    float64) of the components with a positive weight (masked padding components have
    arbitrary means), batch dims flattened. U, not Σ: no factorisation that could fail on a
    nearly singular covariance."""
    d = params.dim
    logw = torch.log_softmax(params.logits.detach().to(torch.float64), -1).reshape(-1)
    mu = params.means.detach().to(torch.float64).reshape(-1, d)
    u = pg.precision_cholesky(params).detach().to(torch.float64).reshape(-1, d, d)
    live = torch.isfinite(logw)
    return logw[live], mu[live], u[live]


def _variances(u: Tensor) -> Tensor:
    """Eigenvalues of Σ = (U Uᵀ)⁻¹ [M, D], ascending, from the singular values of U."""
    return torch.linalg.svdvals(u).pow(-2)  # svdvals descend: their inverse squares ascend


def _half_log_det(u: Tensor) -> Tensor:
    """|½ log|Σ_k|| [M] from the factor's diagonal."""
    return torch.log(torch.diagonal(u, dim1=-2, dim2=-1).abs()).sum(-1).abs()


def model_cond(params: pg.GMMParams) -> float:
    """The largest condition number λ_max/λ_min of the live components' covariances."""
    var = _variances(_live(params)[2])
    return max(1.0, float((var[:, -1] / var[:, 0]).max()))


def _whitened(params: pg.GMMParams, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For the live components, float64: squared distances ‖x_n - μ_k‖²/σ²_min,k [N, K],
    Mahalanobis distances [N, K] and the log-densities log w_k + log N(x_n | μ_k, Σ_k) [N, K]
    (written here from the factors, not by the library's kernels)."""
    logw, mu, u = _live(params)
    xs = x.detach().to(torch.float64).reshape(-1, mu.shape[-1])
    diff = xs[:, None, :] - mu[None]  # [N, K, D]
    maha = torch.einsum("nkd,kde->nke", diff, u).square().sum(-1)  # [N, K]
    log_det = -2 * torch.log(torch.diagonal(u, dim1=-2, dim2=-1).abs()).sum(-1)  # log|Σ_k|
    joint = logw - 0.5 * (mu.shape[-1] * math.log(2 * math.pi) + log_det + maha)
    ratio2 = diff.square().sum(-1) / _variances(u)[:, 0]  # [N, K]
    return ratio2, maha, joint


def width_ratio(params: pg.GMMParams, x: Tensor | None = None, *, claimed: bool = False, origin: bool = False) -> float:
    """How many of its narrowest widths σ_min,k a component lies from the farthest point it
    is evaluated at: max ‖z - μ_k‖/σ_min,k over the rows z of ``x`` and the other means (and
    the origin when ``origin``: references that take moments about 0, as scikit-learn's
    tied/diag/spherical M-steps do). With ``claimed``, only the rows the component claims
    (responsibility above eps): what per-component whitening rounds. At least 1."""
    _, mu, u = _live(params)
    sigma2 = _variances(u)[:, 0]
    extra = [mu] + ([torch.zeros_like(mu[:1])] if origin else [])
    worst = float(((torch.cdist(mu, torch.cat(extra)) ** 2).amax(-1) / sigma2).max()) if not claimed else 0.0
    if x is not None and x.numel():
        ratio2, _, joint = _whitened(params, x)
        if claimed:
            resp = torch.softmax(joint, -1)
            ratio2 = torch.where(resp > eps(torch.float64), ratio2, torch.zeros((), dtype=ratio2.dtype))
        worst = max(worst, float(ratio2.max()))
    return max(1.0, math.sqrt(worst))


def _positions(params: pg.GMMParams, x: Tensor, about: Tensor | None = None) -> Tensor:
    """(‖x_n - a‖ + ‖μ_k - a‖)/σ_min,k [N, K]: where the row and the mean lie, seen from ``a``
    (default the origin), in the component's narrowest widths. x - μ_k is rounded to eps times
    that (relative to σ), however close the two are: a narrow component far from the origin
    resolves its rows only so well. Code that first subtracts ``a`` in a wider dtype loses
    only the positions about ``a`` in its own."""
    _, mu, u = _live(params)
    xs = x.detach().to(torch.float64).reshape(-1, mu.shape[-1])
    a = torch.zeros(mu.shape[-1], dtype=torch.float64) if about is None else about.detach().to(torch.float64)
    sigma = _variances(u)[:, 0].sqrt()
    return ((xs - a).norm(dim=-1)[:, None] + (mu - a).norm(dim=-1)) / sigma


def log_density_scale(params: pg.GMMParams, x: Tensor, about: Tensor | None = None) -> float:
    """The size of the terms of a row's log-density, largest over rows: Σ_k r_nk·(|log w_k| +
    |½ log|Σ_k|| + ½ m_nk + √m_nk·p_nk + D) with r the responsibilities, m the Mahalanobis
    distances and p :func:`_positions` about ``about`` (the rounding of x - μ moves m by
    2√m·eps·p). Each
    term is rounded relative to its own size, however much they cancel."""
    logw, _, u = _live(params)
    _, maha, joint = _whitened(params, x)
    resp = torch.softmax(joint, -1)
    terms = logw.abs() + _half_log_det(u) + 0.5 * maha + maha.sqrt() * _positions(params, x, about) + params.dim
    return float((resp * terms).sum(-1).max())


def log_lik_atol(
    params: pg.GMMParams, x: Tensor, *, n: int = 1, dtype: torch.dtype | None = None, about: Tensor | None = None
) -> float:
    """Absolute bound (nats) on the rounding of a row's log p(x) (``n=1``) or of the mean of
    ``n`` rows' (a loss, a log-likelihood): SLACK·(D·κ·eps + γ_n)·:func:`log_density_scale`.
    The factorisation of Σ_k costs D·κ·eps relative on log|Σ| and the Mahalanobis term, the
    sum over n rows γ_n; logsumexp adds a few eps. ``dtype``: the working dtype (default the
    params'); ``about``: a point the code subtracts in float64 first (see :func:`_positions`)."""
    dt = dtype or params.dtype
    scale = log_density_scale(params, x, about)
    return SLACK * (params.dim * model_cond(params) * eps(dt) + gamma(n, dt)) * scale


def component_log_prob_atol(params: pg.GMMParams, x: Tensor, dtype: torch.dtype | None = None) -> float:
    """Absolute bound (nats) on every log w_k + log N(x_n | μ_k, Σ_k), far components included:
    SLACK·D·κ·eps·(D + r² + r·p + |log w| + |½ log|Σ||) with r = :func:`width_ratio` and p
    the largest :func:`_positions`."""
    logw, _, u = _live(params)
    r = width_ratio(params, x)
    position = float(_positions(params, x).max())
    size = params.dim + r**2 + r * position + float(logw.abs().max() + _half_log_det(u).max())
    return SLACK * params.dim * model_cond(params) * eps(dtype or params.dtype) * size


def stats_rtol(
    params: pg.GMMParams,
    x: Tensor,
    *,
    steps: int = 1,
    claimed: bool = False,
    origin: bool = False,
    dtype: torch.dtype | None = None,
) -> float:
    """Relative bound on an E-step statistic, an M-step update or a gradient summed over the N
    rows of ``x`` by two different routes (chunks, GEMM kernels, compiled, vmapped, ranks, a
    reference): SLACK·κ·(γ_N·r² + eps·r·p)·steps with r = :func:`width_ratio` (``claimed``/
    ``origin`` as there) and p the largest :func:`_positions`. Each row's term is rounded at
    the scale r²σ² (and x - μ at eps·p·σ), the covariance's factor costs κ, and over ``steps``
    EM steps the errors add (near a fit an EM step contracts its input's errors: the fraction
    of missing information is below 1)."""
    n = x.reshape(-1, params.dim).shape[0]
    dt = dtype or params.dtype
    r = width_ratio(params, x, claimed=claimed, origin=origin)
    p = float(_positions(params, x).max())
    return SLACK * model_cond(params) * (gamma(max(n, 2), dt) * r**2 + eps(dt) * r * p) * steps


def derivative_rtol(params: pg.GMMParams, x: Tensor, order: int = 1) -> float:
    """Relative bound (to a leaf's largest entry) on an ``order``-th derivative of the loss or
    log-density by two routes: :func:`stats_rtol` for a gradient (a sum over rows of terms r²
    widths² in size), and each further differentiation multiplies the terms' size by κ·r² (one
    more factor P(x - μ)(x - μ)ᵀ) while the result need not grow: (κ·r²)^(order - 1)."""
    r = width_ratio(params, x)
    return stats_rtol(params, x) * (model_cond(params) * r**2) ** (order - 1)


def adam_rtol(
    params: pg.GMMParams, x: Tensor, steps: int, w: Tensor | None = None, lr: float = 0.05, adam_eps: float = 1e-8
) -> float:
    """Relative bound (to a leaf's scale) on ``steps`` Adam steps of learning rate at most
    ``lr`` (0.05: the default optimiser's peak) from ``params`` by two routes: Adam divides each
    gradient coordinate by its own running size, so a gradient error ρ relative to its largest
    entry (:func:`derivative_rtol`) becomes lr·ρ·A in a step, A = max|g|/max(min |g_i|,
    adam_eps) over the non-zero coordinates at the start; the steps' errors add up. (Near an
    optimum g → 0 and A grows: no fixed tolerance could hold there, which is why the tests
    start away from one.)"""
    g = torch.cat([t.detach().abs().reshape(-1) for t in pytree.tree_leaves(torch.func.grad(pg.loss)(params, x, w))])
    g = g[g > 0].to(torch.float64)
    amplification = float(g.max() / g.min().clamp_min(adam_eps)) if g.numel() else 1.0
    return SLACK * steps * lr * derivative_rtol(params, x) * amplification


def low_precision_rtol(params: pg.GMMParams, x: Tensor, dtype: torch.dtype, *, steps: int = 1) -> float:
    """Relative bound (to the components' widths) on ``steps`` EM steps run in ``dtype`` against
    float64 on the same data: SLACK·eps·D·κ·(D + r²)·steps with r the claimed
    :func:`width_ratio`. Each row's log-density, hence its responsibilities, loses
    eps·D·κ·(D + m) (m ≤ r², its Mahalanobis distance to the components that claim it; the
    statistics themselves are accumulated in float64 about the means) and the M-step's
    factorisation D·κ·eps. Positions are further rounded to eps·|μ| (see callers)."""
    d = params.dim
    r = width_ratio(params, x, claimed=True)
    return SLACK * eps(dtype) * d * model_cond(params) * (d + r**2) * steps


def sum_atol(
    params: pg.GMMParams,
    x: Tensor,
    w: Tensor | None = None,
    *,
    power: int = 0,
    claimed: bool = False,
    term_rtol: float = 0.0,
    dtype: torch.dtype | None = None,
) -> float:
    """Absolute bound on a weighted sum over the rows of ``x`` of terms of size ρ_n^power (an
    E-step statistic: power 0 for Σ ω r, 1 for Σ ω r (x - μ_k), 2 for the scatter) taken by
    two routes: SLACK·(γ_N + term_rtol)·Σ_n ω_n ρ_n^power. ρ_n = max_k ‖x_n - μ_k‖ + the
    spread of the means (each term is formed about some point among the means, rounded at
    its size); with ``claimed``, the distance to the components that claim the row only
    (responsibility above eps: per-component whitening). ``term_rtol``: a relative error of
    each term's responsibility on one route (from log-densities off by that many nats: r_k
    moves by 2·term_rtol·r_k(1 - r_k), see Higham's softmax conditioning). Plus
    the rounding of x - μ itself, eps·(‖x‖ + ‖μ‖), in each term's factors."""
    _, mu, _ = _live(params)
    xs = x.detach().to(torch.float64).reshape(-1, mu.shape[-1])
    dist = torch.cdist(xs, mu)  # [N, K]
    resp = torch.softmax(_whitened(params, x)[2], -1)
    # a log-density off by δ moves r_k by at most 2δ·r_k(1 - r_k): nothing for a row one component owns
    moved = 2 * (resp * (1 - resp)).amax(-1)  # [N]
    if claimed:
        rho = torch.where(resp > eps(torch.float64), dist, torch.zeros((), dtype=dist.dtype)).amax(-1)
    else:
        rho = dist.amax(-1) + float(torch.cdist(mu, mu).max())  # [N]
    ws = torch.ones(len(xs), dtype=torch.float64) if w is None else w.detach().to(torch.float64).reshape(-1)
    n_terms = gamma(max(len(xs), 2), dtype or params.dtype)
    # x - μ is rounded to eps·(‖x‖ + ‖μ‖) whatever its size: power·ρ^(power-1) times that
    position = xs.norm(dim=-1) + float(mu.norm(dim=-1).max())
    rounding = power * eps(dtype or params.dtype) * position * rho ** max(power - 1, 0)
    return SLACK * float((ws * ((n_terms + term_rtol * moved) * rho**power + rounding)).sum())


def leaf_scale(t: Any, floor: float = 1.0) -> float:
    """The unit a leaf's error is measured in: its largest finite entry, and at least ``floor``
    (1 for logits and log standard deviations: they are logarithms, an absolute error there is
    a relative error of what they encode; 0 for covariances, relative to their largest entry)."""
    a = np.asarray(t.detach().cpu().double() if isinstance(t, Tensor) else t, dtype=np.float64)
    finite = np.abs(a[np.isfinite(a)])
    return max(floor, float(finite.max())) if finite.size else floor


def assert_params_close(got: pg.GMMParams, want: pg.GMMParams, rtol: float, what: str = "") -> None:
    """Params leaf by leaf, each in its own unit: logits and the factor ``scale`` relative to
    :func:`leaf_scale`; means in widths, |Δμ| <= rtol·σ_max + SLACK·eps·max|μ| (a mean is
    known to its width times the relative error, and to the rounding of its position)."""
    assert got.family == want.family, what
    assert_leaves_close((got.logits, got.scale), (want.logits, want.scale), rtol, f"{what} logits/scale")
    _, mu, u = _live(want)
    sigma_max = float(_variances(u)[:, -1].max().sqrt()) if len(mu) else 1.0
    position = SLACK * eps(want.dtype) * float(want.means.detach().abs().max())
    tol = rtol * sigma_max + position
    torch.testing.assert_close(got.means, want.means, rtol=0, atol=tol, msg=_prefixed(f"{what} means (atol {tol:.2g})"))


def _prefixed(note: str) -> Callable[[str], str]:
    return lambda message: f"{note}: {message}"


def assert_leaves_close(got: Any, want: Any, rtol: float, what: str = "", floor: float = 1.0) -> None:
    """Leaf by leaf (tensors or arrays): |got - want| <= rtol·leaf_scale(want, floor);
    infinities must match exactly."""
    a, b = pytree.tree_leaves(got), pytree.tree_leaves(want)
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b)):
        tu, tv = (t if isinstance(t, Tensor) else torch.as_tensor(np.array(t)) for t in (u, v))
        tol = rtol * leaf_scale(tv, floor)
        note = f"{what} leaf {i} (atol {tol:.2g})"
        torch.testing.assert_close(tu.to(tv.dtype), tv, rtol=0, atol=tol, msg=_prefixed(note))


def assert_trees_equal(a: Any, b: Any) -> None:
    """Exact equality of two pytrees of tensors (same structure; NaN leaves equal when all NaN):
    for code that must give the same bits (purity, fast paths that equal the general one)."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for i, (x, y) in enumerate(zip(la, lb)):
        assert torch.equal(x, y) or (torch.isnan(x).all() and torch.isnan(y).all()), f"leaf {i} differs"
