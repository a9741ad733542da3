"""Expectation-maximisation as sufficient statistics plus an M-step (Bishop PRML §9.2.2).

One EM iteration is ``m_step(sufficient_stats(params, x), params)``:

* **E-step statistics.** With responsibilities r_nk = softmax_k(log w_k + log N(x_n | μ_k, Σ_k))
  (log space, ``logsumexp``) and sample weights ω_n, accumulate over row chunks of ``x``

      n_k = Σ ω r,  X_k = Σ ω r (x - c_k),  S_k = Σ ω r (x - c_k)(x - c_k)ᵀ  (or its diagonal / trace),

  about the *current* means c_k = μ_k (detached). The centres come from the params, not the
  data, so every chunk, shard or rank uses the same ones without communication; and because
  they are per-component, the one-pass update below keeps float32 accurate both for data with
  a large common offset and for clusters far apart (the error is ~eps·‖Δμ‖²/σ², with Δμ the
  step of the mean, not its distance from an origin).

  They are computed in exponential-family form (:mod:`puregmm._moments`): per chunk, one
  float64 block of the rows' products about the centre of the means serves two GEMMs, one with
  the natural parameters (the joint log-densities) and one with the responsibilities (the
  moments), which are then shifted exactly to each c_k. float32 data get float64 accuracy.
* **M-step.** scikit-learn's update (``sklearn/mixture/_gaussian_mixture.py``), written in
  centred coordinates: n'_k = n_k + 10·eps, d_k = X_k / n'_k, μ_k ← c_k + d_k,
  w_k ← n'_k / Σ n', Σ_k ← S_k / n'_k - d_k d_kᵀ + reg·I (tied: Σ_k n'_k Σ_k / Σ n';
  diagonal/isotropic: the diagonal / its mean; shared: the pooled isotropic variance
  Σ_k (tr S_k - n'_k‖d_k‖²) / (D Σ n') + reg; constant: the variance is kept).

Only the data term needs the whole data set; everything in :class:`Stats` is a sum (or a
K-smallest merge) over rows, so ``combine`` folds chunks, shards or ranks together in any
order, and a distributed fit all-reduces the sums and min-merges the two ``worst_*`` fields.

Kernels here check static shapes only: no ``.item()``, no value-dependent branches, no boolean
indexing, so ``torch.func.vmap`` (over stacked params and data) and ``torch.compile`` work. The
one exception runs on plain eager tensors only: an E-step whose exponential-family form would
round by more than 1e-8 nats (a very narrow component far from the centre) whitens each row
per component instead (:mod:`puregmm._moments`, "Precision").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from puregmm import _moments as mo
from puregmm import _validate, density
from puregmm.families import get_family
from puregmm.params import GMMParams


class Stats(NamedTuple):
    """Sufficient statistics of one E-step, taken about the centres c_k = the params' means.

    Each field says how it combines across chunks/shards/ranks (see :func:`combine`).

    Attributes:
        resp_sum: [K], n_k = Σ ω r_nk; sum.
        x_sum: [K, D], Σ ω r_nk (x_n - c_k); sum.
        xx_sum: the family's shape (below), Σ ω r_nk (x_n - c_k)(x_n - c_k)ᵀ; sum.
        log_lik_sum: 0-d, Σ ω log p(x_n); sum.
        weight_sum: 0-d, Σ ω; sum.
        worst_log_lik: [K], the K lowest log p(x_n), ascending; K-min.
        worst_x: [K, D], the points holding them; K-min.

    ``xx_sum`` is [K, D, D] for full/tied, its diagonal [K, D] for diagonal, its trace [K] for
    isotropic/shared/constant. For tied only Σ_k ``xx_sum[k]`` is defined (what its M-step
    uses; the per-component split is an equal share, see :func:`_tied_stats`). Rows with zero
    weight never enter ``worst_*`` (padding: +inf log-likelihood, zero point). The worst points
    re-seed empty components in :func:`m_step`.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> s = pg.sufficient_stats(pg.init(x, 3, "diagonal"), x)
    >>> round(float(s.resp_sum.sum()), 9), s.xx_sum.shape, s.worst_x.shape
    (100.0, torch.Size([3, 2]), torch.Size([3, 2]))
    """

    resp_sum: Tensor
    x_sum: Tensor
    xx_sum: Tensor
    log_lik_sum: Tensor
    weight_sum: Tensor
    worst_log_lik: Tensor
    worst_x: Tensor


class EMInfo(NamedTuple):
    """Per-step report of :func:`em_step`.

    Attributes:
        log_likelihood: 0-d, mean (weighted) log-likelihood of the E-step, at the params
            *before* the update (scikit-learn's ``lower_bound_``).
        n_resets: 0-d int64, components re-seeded (empty) or repaired (covariance not
            positive definite) in this step.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> _, info = pg.em_step(pg.init(x, 2, "full"), x, return_info=True)
    >>> info.log_likelihood.shape, info.n_resets
    (torch.Size([]), tensor(0))
    """

    log_likelihood: Tensor
    n_resets: Tensor


def combine(a: Stats, b: Stats) -> Stats:
    """Statistics of the union of two disjoint row sets (order-independent up to rounding).

    Sums add; the ``worst_*`` pair keeps the K lowest log-likelihoods of both (a stable sort,
    so ties prefer ``a``).

    Args:
        a: :class:`Stats` of some rows, taken about the same params' means as ``b``.
        b: :class:`Stats` of other rows.

    Returns:
        the :class:`Stats` of both row sets.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> p = pg.init(x, 3, "full")
    >>> both = pg.combine(pg.sufficient_stats(p, x[:60]), pg.sufficient_stats(p, x[60:]))
    >>> all(torch.allclose(u, v) for u, v in zip(both, pg.sufficient_stats(p, x)))
    True
    """
    k = a.worst_log_lik.shape[-1]
    vals = torch.cat([a.worst_log_lik, b.worst_log_lik], -1)  # [2K]
    pts = torch.cat([a.worst_x, b.worst_x], -2)  # [2K, D]
    order = torch.sort(vals, stable=True).indices[..., :k]  # [K]
    return Stats(
        a.resp_sum + b.resp_sum,
        a.x_sum + b.x_sum,
        a.xx_sum + b.xx_sum,
        a.log_lik_sum + b.log_lik_sum,
        a.weight_sum + b.weight_sum,
        torch.gather(vals, -1, order),
        pts.index_select(-2, order),
    )


def default_chunk_size(n: int, k: int, d: int, family: str = "full") -> int:
    """Rows per E-step chunk from static shapes: the chunk's float64 block of sufficient
    statistics T [chunk, P] near :data:`puregmm._moments.CHUNK_BYTES` (a few MB)."""
    return mo.chunk_rows(n, mo.layout(get_family(family).scale_ndim, d), None)


def _total(values: Tensor, sample_weight: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ ω v, Σ ω) over the rows of ``x``; without weights (Σ v, N in ``x``'s dtype)."""
    if sample_weight is None:
        return values.sum(), torch.full((), float(x.shape[0]), dtype=x.dtype, device=x.device)
    return (values * sample_weight.to(values.dtype)).sum(), sample_weight.sum()


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def sufficient_stats(
    params: GMMParams, x: Tensor, sample_weight: Tensor | None = None, *, chunk_size: int | None = None
) -> Stats:
    """E-step statistics of unbatched ``params`` on ``x`` [N, D] (see :class:`Stats`).

    Rows are processed in chunks of ``chunk_size`` (default from static shapes,
    :func:`default_chunk_size`) by a static Python loop, in exponential-family form
    (:mod:`puregmm._moments`): per chunk, the float64 block T of the rows' products about the
    centre of the means, the joint log-densities ℓ = η Tᵀ [K, c] (one GEMM with the natural
    parameters η of ``params``), responsibilities in log space, and the moments r T (one GEMM),
    shifted exactly to each component's mean at the end. Only the [c, P] and [K, c] blocks and
    an [N] vector of log-densities exist at a time, reused chunk after chunk when nothing is
    being differentiated. ``sample_weight`` [N] (non-negative, not checked here) weights rows
    as counts. Use ``torch.func.vmap`` for stacked params/data. On plain eager tensors, when
    that form would round by more than 1e-8 nats (:func:`puregmm._moments.rounding_bound`),
    the statistics come from whitening each row per component instead (exact; slower).

    Args:
        params: unbatched mixture params.
        x: data [N, D].
        sample_weight: optional [N] non-negative weights (not checked).
        chunk_size: rows per chunk; None: from static shapes.

    Returns:
        :class:`Stats` about ``params``' means, in ``params``' dtype.

    Raises:
        ValueError: ``x`` not [N, D] with the params' D, or ``sample_weight`` not [N].

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> s = pg.sufficient_stats(pg.init(x, 3, "diagonal"), x, chunk_size=32)
    >>> s.resp_sum.shape, s.weight_sum
    (torch.Size([3]), tensor(100., dtype=torch.float64))
    """
    if x.dim() != 2 or x.shape[-1] != params.dim:
        raise ValueError(f"x must be [N, D] with D={params.dim}; got shape {tuple(x.shape)}")
    if sample_weight is not None and sample_weight.shape != x.shape[:1]:
        raise ValueError(f"sample_weight must be [N]=({x.shape[0]},); got shape {tuple(sample_weight.shape)}")
    plain = mo.plain(params.logits, params.means, params.scale, x, sample_weight)
    centre = mo.centre_of(params)  # [D], g
    if plain and bool((mo.rounding_bound(params, centre) > mo.MAX_ROUNDING).any()):
        return _whitened_stats(params, x, sample_weight, chunk_size)
    if params.spec.scale_ndim == 2 and not params.spec.per_component:
        return _tied_stats(params, x, sample_weight, chunk_size)
    k, (n, d) = params.n_components, x.shape
    lay = mo.layout(params.spec.scale_ndim, d, square=not plain and d <= mo.SQUARE_MAX_D)
    mdtype = mo.moment_dtype(x.dtype)
    eta = mo.natural(params, centre, mdtype, lay)  # [K, P]
    rows = mo.chunk_rows(n, lay, chunk_size)
    work = mo.Work(lay, rows, k, x, mdtype) if plain else None
    raw = torch.zeros(k, lay.width, dtype=mdtype, device=x.device)  # Σ r T
    lse_all = x.new_empty(n, dtype=mdtype) if work is not None else None
    lses: list[Tensor] = []
    worst = mo.Worst(k)
    for start, stop in _chunks(n, rows):
        ws = None if sample_weight is None else sample_weight[start:stop]
        t = mo.products(lay, x[start:stop], centre, mdtype, work)  # [c, P]
        if work is not None:  # in place, in the workspace
            assert lse_all is not None
            lj = torch.mm(eta, t.mT, out=work.lj[:, : stop - start])  # [K, c]
            resp, lse = mo.responsibilities(lj, inplace=True, lse_out=lse_all[start:stop])
            if ws is not None:
                resp.mul_(ws)
            raw.addmm_(resp, t)
        else:
            resp, lse = mo.responsibilities(eta @ t.mT, inplace=False)  # [K, c], [c]
            raw = raw + (resp if ws is None else resp * ws) @ t
            lses.append(lse)
        worst.add(mo.ranked(lse, ws), start, eager=work is not None)
    lse_n = lse_all if lse_all is not None else (torch.cat(lses) if len(lses) != 1 else lses[0])
    log_lik_sum, weight_sum = _total(lse_n, sample_weight, x)
    resp_sum, x_sum, xx_sum = mo.about_centres(lay, raw, (params.means.detach() - centre).to(mdtype))
    worst_ll, worst_x = worst.result(x)
    dt = params.dtype
    return Stats(resp_sum.to(dt), x_sum.to(dt), xx_sum.to(dt), log_lik_sum.to(dt), weight_sum, worst_ll, worst_x)


def _whitened_stats(params: GMMParams, x: Tensor, sample_weight: Tensor | None, chunk_size: int | None) -> Stats:
    """:func:`sufficient_stats` the way scikit-learn computes them, for plain eager tensors whose
    exponential-family form would round too much (:func:`puregmm._moments.rounding_bound`: a
    component narrower than ~1e-4 of its mean's distance from the centre, e.g. collapsing onto
    a few points with ``reg_covar=0``): float64 log-densities by whitening each row per
    component (:func:`puregmm.density.joint_log_prob_chunk`; rounding ~eps·‖x - μ_k‖/σ instead
    of its square) and moments about each mean directly (K GEMMs per chunk)."""
    spec, k, (n, d) = params.spec, params.n_components, x.shape
    mdtype = mo.moment_dtype(x.dtype)
    p64 = params.to(mdtype)
    white = density.whitening(p64)
    means = p64.means
    shape = (k, d, d) if spec.scale_ndim == 2 else (k, d) if spec.scale_ndim == 1 else (k,)
    n_k, x_k, s_k = (torch.zeros(sh, dtype=mdtype, device=x.device) for sh in ((k,), (k, d), shape))
    lses: list[Tensor] = []
    worst = mo.Worst(k)
    rows = chunk_size if chunk_size is not None else default_chunk_size(n, k, d, params.family)
    for start, stop in _chunks(n, int(rows)):
        xc = x[start:stop].to(mdtype)
        lj = density.joint_log_prob_chunk(white, xc)  # [c, K]
        lse = torch.logsumexp(lj, 1)
        r = torch.exp(lj - lse.unsqueeze(1))
        ws = None if sample_weight is None else sample_weight[start:stop]
        if ws is not None:
            r = r * ws.to(mdtype).unsqueeze(1)
        n_k += r.sum(0)
        for j in range(k):
            y = xc - means[j]
            ry = r[:, j : j + 1] * y
            x_k[j] += ry.sum(0)
            s_k[j] += _scatter(spec.scale_ndim, ry, y)
        lses.append(lse)
        worst.add(mo.ranked(lse, ws), start, eager=True)
    log_lik_sum, weight_sum = _total(torch.cat(lses), sample_weight, x)
    worst_ll, worst_x = worst.result(x)
    dt = params.dtype
    return Stats(n_k.to(dt), x_k.to(dt), s_k.to(dt), log_lik_sum.to(dt), weight_sum, worst_ll, worst_x)


def _scatter(ndim: int, wy: Tensor, y: Tensor) -> Tensor:
    """Σ_n wy_n y_nᵀ [D, D], its diagonal [D] or its trace [] for a family's ``scale_ndim``."""
    if ndim == 2:
        return wy.mT @ y
    return (wy * y).sum(0) if ndim == 1 else (wy * y).sum()


def _tied_stats(params: GMMParams, x: Tensor, sample_weight: Tensor | None, chunk_size: int | None) -> Stats:
    """:func:`sufficient_stats` of the tied family: no per-component second moments.

    The tied M-step needs only Σ_k S_k = Σ_k Σ_n ω r_nk (x_n - c_k)(x_n - c_k)ᵀ, and as
    Σ_k r_nk = 1 its part about g is the pooled Σ_n ω y yᵀ. So per chunk: the linear
    log-densities [K, c] (a [K, D+1] GEMM; the common quadratic part is added to log p only,
    :func:`puregmm._moments.tied_natural`), the moments r [y, 1] [K, D+1] and the pooled
    scatter yᵀ ω y [D, D]: O(c·(K + D)·D) instead of the full family's O(c·K·D²).
    ``xx_sum[k]`` holds S_g / K (an equal share of the pooled scatter about the centre g)
    shifted to c_k, so that Σ_k xx_sum[k] = Σ_k S_k exactly and every consumer that sums,
    combines or re-centres statistics per component stays exact for the sum.
    """
    k, (n, d) = params.n_components, x.shape
    mdtype = mo.moment_dtype(x.dtype)
    centre = mo.centre_of(params)  # [D], g
    u, eta = mo.tied_natural(params, centre, mdtype)  # [D, D], [K, D+1]
    rows = mo.chunk_rows(n, mo.layout(1, d), chunk_size)
    inplace = mo.plain(params.logits, params.means, params.scale, x, sample_weight)
    lin = torch.zeros(k, d + 1, dtype=mdtype, device=x.device)  # Σ ω r [y, 1]
    scatter = torch.zeros(d, d, dtype=mdtype, device=x.device)  # Σ ω y yᵀ
    lses: list[Tensor] = []
    worst = mo.Worst(k)
    for start, stop in _chunks(n, rows):
        w_rows = None if sample_weight is None else sample_weight[start:stop]
        ws = None if w_rows is None else w_rows.to(mdtype)
        y = (x[start:stop] - centre).to(mdtype)  # [c, D]
        lift = torch.cat([y, y.new_ones(stop - start, 1)], 1)  # [c, D+1]
        resp, lse = mo.responsibilities(eta @ lift.mT, inplace=inplace)  # [K, c], [c]
        lse = lse - 0.5 * (y @ u).square().sum(1)
        wy = y if ws is None else y * ws.unsqueeze(1)
        lin = lin + (resp if ws is None else resp * ws) @ lift
        scatter = scatter + wy.mT @ y
        lses.append(lse)
        worst.add(mo.ranked(lse, w_rows), start, eager=inplace)
    lse_n = torch.cat(lses) if len(lses) != 1 else lses[0]
    log_lik_sum, weight_sum = _total(lse_n, sample_weight, x)
    resp_sum, x_sum, xx_sum = _pooled_about_centres(lin, scatter, params.means.detach() - centre)
    worst_ll, worst_x = worst.result(x)
    dt = params.dtype
    return Stats(resp_sum.to(dt), x_sum.to(dt), xx_sum.to(dt), log_lik_sum.to(dt), weight_sum, worst_ll, worst_x)


def _pooled_about_centres(lin: Tensor, scatter: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n_k, X_k, S_k) about c_k = g + ``shift`` [K, D] from Σ ω r [y, 1] [K, D+1] and the pooled
    Σ ω y yᵀ [D, D] about g; S_k takes the equal share S_g / K (see :func:`_tied_stats`)."""
    k, d = lin.shape[0], lin.shape[1] - 1
    shift = shift.to(lin.dtype)
    x_g, n = lin[:, :d], lin[:, d]
    outer = x_g.unsqueeze(2) * shift.unsqueeze(1)  # X_g dᵀ
    s = scatter / k - outer - outer.mT + n[:, None, None] * shift.unsqueeze(2) * shift.unsqueeze(1)
    return n, x_g - n.unsqueeze(1) * shift, s


def responsibility_stats(
    x: Tensor,
    resp: Tensor,
    centres: Tensor,
    family: str,
    sample_weight: Tensor | None = None,
    score: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> Stats:
    """:class:`Stats` of given responsibilities ``resp`` [N, K] (hard or soft), about ``centres``
    [K, D]; used by :func:`puregmm.init` so that initial covariances come from :func:`m_step`.

    ``score`` [N] ranks points for re-seeding empty components (lowest first; default: minus
    the squared distance to the nearest centre) and fills ``log_lik_sum``. The moments come
    from the same per-chunk GEMM as in :func:`sufficient_stats`.
    """
    spec = get_family(family)
    k, d = centres.shape
    n = x.shape[0]
    lay = mo.layout(spec.scale_ndim, d)
    mdtype = mo.moment_dtype(x.dtype)
    if score is None:
        score = -torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist").square().amin(-1)
    centre = centres.detach().mean(0)  # [D]
    tied = spec.scale_ndim == 2 and not spec.per_component  # the pooled scatter (see _tied_stats)
    rows = mo.chunk_rows(n, mo.layout(1, d) if tied else lay, chunk_size)
    plain = mo.plain(x, resp, centres, sample_weight, score)
    work = mo.Work(lay, rows, k, x, mdtype) if plain and not tied else None
    raw = torch.zeros(k, d + 1 if tied else lay.width, dtype=mdtype, device=x.device)
    scatter = torch.zeros(d, d, dtype=mdtype, device=x.device)
    worst = mo.Worst(k)
    for start, stop in _chunks(n, rows):
        ws = None if sample_weight is None else sample_weight[start:stop]
        r = resp[start:stop].to(mdtype)  # [c, K]
        r = r if ws is None else r * ws.unsqueeze(1)
        if tied:  # rows of r sum to one: Σ_k Σ_n r (y yᵀ) = Σ_n ω y yᵀ
            y = (x[start:stop] - centre).to(mdtype)
            t = torch.cat([y, y.new_ones(stop - start, 1)], 1)  # [c, D+1]
            scatter = scatter + (y if ws is None else y * ws.unsqueeze(1).to(mdtype)).mT @ y
        else:
            t = mo.products(lay, x[start:stop], centre, mdtype, work)
        raw = raw.addmm_(r.mT, t) if work is not None else raw + r.mT @ t
        worst.add(mo.ranked(score[start:stop], ws), start, eager=plain)
    log_lik_sum, weight_sum = _total(score, sample_weight, x)
    shift = (centres.detach() - centre).to(mdtype)
    if tied:
        resp_sum, x_sum, xx_sum = _pooled_about_centres(raw, scatter, shift)
    else:
        resp_sum, x_sum, xx_sum = mo.about_centres(lay, raw, shift)
    worst_ll, worst_x = worst.result(x)
    dt = x.dtype
    return Stats(resp_sum.to(dt), x_sum.to(dt), xx_sum.to(dt), log_lik_sum, weight_sum, worst_ll, worst_x)


def label_stats(
    x: Tensor, labels: Tensor, centres: Tensor, family: str, sample_weight: Tensor | None, score: Tensor
) -> Stats:
    """:func:`responsibility_stats` of hard assignments ``labels`` [N] (eager tensors only).

    Rows are grouped by label (one stable argsort) and each cluster's moments about its centre
    come from its own rows: O(N·D²) work in all instead of the O(N·K·D²) of a one-hot GEMM, one
    cluster's rows copied at a time. Used by :func:`puregmm.init` after k-means(++).
    """
    spec = get_family(family)
    k = centres.shape[0]
    mdtype = mo.moment_dtype(x.dtype)
    order = torch.argsort(labels, stable=True)
    sizes = torch.bincount(labels, minlength=k).tolist()
    n_k, x_k, s_k = [], [], []
    start = 0
    for j, size in enumerate(sizes):
        rows = order[start : start + size]
        start += size
        y = x.index_select(0, rows).to(mdtype) - centres[j].to(mdtype)  # [n_j, D]
        wy = y if sample_weight is None else y * sample_weight.index_select(0, rows).to(mdtype).unsqueeze(1)
        n_k.append(wy.new_tensor(float(size)) if sample_weight is None else sample_weight.index_select(0, rows).sum())
        x_k.append(wy.sum(0))
        s_k.append(_scatter(spec.scale_ndim, wy, y))
    worst = mo.Worst(k)
    worst.add(mo.ranked(score, sample_weight), 0, eager=True)
    worst_ll, worst_x = worst.result(x)
    log_lik_sum, weight_sum = _total(score, sample_weight, x)
    dt = x.dtype
    resp_sum = torch.stack(n_k).to(dt)
    return Stats(resp_sum, torch.stack(x_k).to(dt), torch.stack(s_k).to(dt), log_lik_sum, weight_sum, worst_ll, worst_x)


def m_step(stats: Stats, params: GMMParams, *, reg_covar: float | Tensor = 1e-6, return_info: bool = False) -> Any:
    """New params (same family) from :class:`Stats` taken about ``params``' means.

    Matches scikit-learn's M-step (module docstring). Then, branch-free:

    * an *empty* component (n_k ≤ eps·Σω: all responsibilities underflowed) is re-seeded at
      the j-th lowest-likelihood point (j-th empty component, j-th point), gets the pooled
      covariance of the non-empty components and their mean count n';
    * a covariance that is not positive definite (rounding, ``reg_covar=0`` on degenerate
      data) gets ``10·D·eps·max diag`` added to its diagonal, or failing that is replaced by
      its floored diagonal; variances are floored at sqrt(tiny);
    * a *collapsed* component (``reg_covar=0``: on one point, or on a plane of few points),
      whose smallest variance is below what float64 resolves, is widened: a variance below
      (:data:`~puregmm._moments.POSITION_RESOLUTION`·|μ_i|)² (its rows minus its mean are
      rounding there) is raised to it; for the matrix families a Cholesky pivot below that or
      below 10·D·eps·max variance (the float64 moments' resolution: condition numbers above
      ~1e14) adds D times the larger of the two to the diagonal.

    All are counted. Never divides by zero. The constant family's ``scale`` is not updated.

    A component whose logit is -inf is *masked*: weight 0, never re-seeded, its mean and scale
    kept as they are. Padding a K-component fit to K_max components this way gives the
    K-component fit (how :func:`puregmm.fit_batched` sweeps K in one batch).

    Args:
        stats: from :func:`sufficient_stats` with the same (unbatched) ``params``.
        params: the params of the E-step.
        reg_covar: added to the diagonal of every covariance (scikit-learn's ``reg_covar``).
        return_info: also return the 0-d int64 count of re-seeded/repaired components.

    Returns:
        new params, or ``(params, n_resets)`` with ``return_info``.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> p = pg.init(x, 2, "full")
    >>> new, n_resets = pg.m_step(pg.sufficient_stats(p, x), p, return_info=True)
    >>> torch.equal(new.means, pg.em_step(p, x).means), n_resets
    (True, tensor(0))
    """
    spec, k, d = params.spec, params.n_components, params.dim
    finfo = torch.finfo(params.dtype)
    eps, floor = finfo.eps, finfo.tiny**0.5
    active = params.logits.detach() != -math.inf  # [K]; masked components stay as they are
    empty = (stats.resp_sum <= eps * stats.weight_sum) & active  # [K]
    good = ~empty & active
    nk = stats.resp_sum + 10 * eps  # [K], scikit-learn's guard
    shift = stats.x_sum / nk.unsqueeze(-1)  # [K, D], new mean - centre
    means = params.means.detach() + shift
    rank = (torch.cumsum(empty.to(torch.int64), 0) - 1).clamp_min(0)  # j-th empty -> j-th worst
    means = torch.where(empty.unsqueeze(-1), stats.worst_x.index_select(0, rank), means)
    means = torch.where(active.unsqueeze(-1), means, params.means)

    goodf = good.to(nk.dtype)
    n_good = goodf.sum().clamp_min(1.0)
    nk_good = nk * goodf
    pool = nk_good / nk_good.sum().clamp_min(finfo.tiny)  # [K], pooling weights of the good ones

    nk_new = torch.where(empty, (nk_good.sum() / n_good).expand_as(nk), nk)
    nk_new = torch.where(active, nk_new, torch.zeros_like(nk_new))  # log 0 = -inf: masked stays masked
    # the least variance a component can resolve at its position: below it, its rows minus its
    # mean are rounding (a collapse onto a few points with reg_covar=0); per dimension
    least = mo.position_resolution(params.dtype) ** 2 * means.detach().square()  # [K, D]
    least = torch.where(active.unsqueeze(-1), least, torch.zeros_like(least))

    n_fixed = torch.zeros((), dtype=torch.int64, device=nk.device)
    if not spec.learned:
        scale = params.scale
    elif spec.scale_ndim == 2:
        cov = stats.xx_sum / nk[:, None, None] - shift.unsqueeze(-1) * shift.unsqueeze(-2)  # [K, D, D]
        if spec.per_component:
            pooled = (pool[:, None, None] * cov).sum(0)
            cov = torch.where(empty[:, None, None], pooled.expand_as(cov), cov)
        else:  # tied: Σ_k n'_k Σ_k / Σ n'
            cov = (nk[:, None, None] * cov).sum(0) / nk.sum()
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        cov = 0.5 * (cov + cov.mT) + reg_covar * eye
        if spec.per_component:  # masked: a placeholder that factorises, then the old scale back
            cov = torch.where(active[:, None, None], cov, eye)
        lowest = least.amax(-1) if spec.per_component else least.amax()
        scale, n_fixed = _raw_from_cov(cov, eps, floor, lowest)
        if spec.per_component:
            scale = torch.where(active[:, None, None], scale, params.scale)
    else:
        if spec.scale_ndim == 1:
            var = (stats.xx_sum / nk.unsqueeze(-1) - shift.square()).clamp_min(0.0)  # [K, D]
            var = torch.where(empty.unsqueeze(-1), (pool.unsqueeze(-1) * var).sum(0).expand_as(var), var)
        else:
            var = ((stats.xx_sum / nk - shift.square().sum(-1)) / d).clamp_min(0.0)  # [K]
            if spec.per_component:
                var = torch.where(empty, (pool * var).sum().expand_as(var), var)
            else:  # shared: one variance pooled over components
                var = (nk * var).sum() / nk.sum()
        var = var + reg_covar
        if spec.scale_ndim == 1:
            lim = least
        else:
            lim = least.amax(-1) if spec.per_component else least.amax()
        lim = lim.clamp_min(floor)
        small = var < lim
        if spec.per_component:
            small = small & active.reshape((k,) + (1,) * (small.dim() - 1))
        n_fixed = small.reshape(k if spec.per_component else 1, -1).any(-1).sum()
        scale = -0.5 * torch.log(torch.where(small, lim, var))
        if spec.per_component:
            scale = torch.where(active.reshape((k,) + (1,) * (scale.dim() - 1)), scale, params.scale)

    logits = torch.log(nk_new) - torch.log(nk_new.sum())
    new = GMMParams(logits, means, scale, params.family)
    if return_info:
        return new, empty.sum() + n_fixed
    return new


def _raw_from_cov(cov: Tensor, eps: float, floor: float, lowest: Tensor) -> tuple[Tensor, Tensor]:
    """The matrix families' ``raw`` (see :mod:`puregmm.families`) from covariances [..., D, D],
    repairing (and counting) the ones whose Cholesky factorisation fails and widening (by j·I,
    counted) the numerically singular ones: a Cholesky pivot L_ii² (each at least λ_min) below
    ``lowest`` [...] (the position's resolution) or below 10·D·eps₆₄ times the largest
    variance (what the float64 moments resolve)."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)  # [..., D]
    chol, info = torch.linalg.cholesky_ex(cov)
    limit = torch.maximum(lowest.to(cov.dtype), 10 * d * torch.finfo(torch.float64).eps * diag.amax(-1))
    pivot = torch.diagonal(chol, dim1=-2, dim2=-1).square().amin(-1)
    redo = (info != 0) | ~(pivot >= limit)  # NaN counts as singular
    jitter = torch.where(info != 0, 10 * d * eps * diag.amax(-1).clamp_min(floor) + floor, 0.0)
    jitter = jitter + torch.where(redo, d * limit, 0.0)  # then λ_min >= D·limit
    chol2, info2 = torch.linalg.cholesky_ex(cov + jitter[..., None, None] * eye)
    chol3 = torch.diag_embed(diag.clamp_min(floor).sqrt())
    chol = torch.where(redo[..., None, None], torch.where((info2 != 0)[..., None, None], chol3, chol2), chol)
    u = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False).mT  # U = L⁻ᵀ
    raw = torch.triu(u, 1) + torch.diag_embed(torch.log(torch.diagonal(u, dim1=-2, dim2=-1)))
    return raw, redo.sum()


def em_step(
    params: GMMParams,
    x: Tensor,
    *,
    reg_covar: float | Tensor = 1e-6,
    sample_weight: Tensor | None = None,
    return_info: bool = False,
    chunk_size: int | None = None,
    reduce: Callable[[Stats], Stats] | None = None,
) -> Any:
    """One EM iteration: ``m_step(sufficient_stats(params, x, sample_weight), params)``.

    Pure and branch-free: works under ``torch.func.vmap`` and ``torch.compile``. Equals
    scikit-learn's ``GaussianMixture`` EM iteration for iteration (full/tied/diagonal/isotropic
    = its full/tied/diag/spherical); shared and constant use the M-step derived in the module
    docstring (EM, so the log-likelihood never decreases, up to ``reg_covar``).

    Args:
        params: mixture params, optionally with leading batch dims ``B...``.
        x: data [N, D] (shared by the batch) or [B..., N, D].
        reg_covar: non-negative value added to every variance (not checked here); with 0,
            a component that collapses onto a few points is widened to what float64 resolves
            and counted (:func:`m_step`).
        sample_weight: [N] or [B..., N] non-negative weights acting as counts (not checked).
        return_info: also return an :class:`EMInfo`.
        chunk_size: rows per E-step chunk (default from static shapes).
        reduce: optional static hook ``Stats -> Stats`` applied between the E- and M-step,
            e.g. :class:`puregmm.distributed.Collective` (all-reduce of the sums, K-min merge
            of ``worst_*`` across ranks), so that ``x`` is this rank's shard and every rank
            gets the params of the whole data. It sees the stats with the params' batch dims
            leading. Collectives run eagerly: no ``torch.compile`` or outer ``vmap`` then.

    Returns:
        new params, or ``(params, info)``.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> p = pg.init(x, 2, "diagonal")
    >>> p, info = pg.em_step(p, x, return_info=True)
    >>> info.n_resets
    tensor(0)
    """
    _validate.data_shape(params, x)

    def stats_of(p: GMMParams, xs: Tensor, ws: Tensor | None) -> Stats:
        return sufficient_stats(p, xs, ws, chunk_size=chunk_size)

    def update(p: GMMParams, stats: Stats) -> tuple[GMMParams, EMInfo]:
        new, n_resets = m_step(stats, p, reg_covar=reg_covar, return_info=True)
        return new, EMInfo(stats.log_lik_sum / stats.weight_sum, n_resets)

    def one(p: GMMParams, xs: Tensor, ws: Tensor | None) -> tuple[GMMParams, EMInfo]:
        return update(p, stats_of(p, xs, ws))

    fn: Any = one
    batch = params.batch_shape
    x_batched = x.dim() > 2
    if x_batched and tuple(x.shape[:-2]) != batch:
        raise ValueError(f"x has batch dims {tuple(x.shape[:-2])} but the params have batch dims {batch}")
    w_batched = sample_weight is not None and sample_weight.dim() > 1
    in_dims = (0, 0 if x_batched else None, 0 if w_batched else None)
    if reduce is not None:  # E-step, reduce across ranks, M-step: collectives stay outside vmap
        fs: Any = stats_of
        fu: Any = update
        for _ in batch:
            fs, fu = torch.func.vmap(fs, in_dims=in_dims), torch.func.vmap(fu)
        new, info = fu(params, reduce(fs(params, x, sample_weight)))
        return (new, info) if return_info else new
    for _ in batch:
        fn = torch.func.vmap(fn, in_dims=in_dims)
    new, info = fn(params, x, sample_weight)
    return (new, info) if return_info else new
