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
* **M-step.** scikit-learn's update (``sklearn/mixture/_gaussian_mixture.py``), written in
  centred coordinates: n'_k = n_k + 10·eps, d_k = X_k / n'_k, μ_k ← c_k + d_k,
  w_k ← n'_k / Σ n', Σ_k ← S_k / n'_k - d_k d_kᵀ + reg·I (tied: Σ_k n'_k Σ_k / Σ n';
  diagonal/isotropic: the diagonal / its mean; shared: the pooled isotropic variance
  Σ_k (tr S_k - n'_k‖d_k‖²) / (D Σ n') + reg; constant: the variance is kept).

Only the data term needs the whole data set; everything in :class:`Stats` is a sum (or a
K-smallest merge) over rows, so ``combine`` folds chunks, shards or ranks together in any
order, and a distributed fit all-reduces the sums and min-merges the two ``worst_*`` fields.

Kernels here check static shapes only: no ``.item()``, no value-dependent branches, no boolean
indexing, so ``torch.func.vmap`` (over stacked params and data) and ``torch.compile`` work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from puregmm import _fused, _validate
from puregmm.density import joint_log_prob_chunk, whitening
from puregmm.families import get_family
from puregmm.params import GMMParams

#: Rows per E-step chunk (default): the [c, D, K] residual block of the density and the [c, P]
#: block of products stay a few MB, reused chunk after chunk (no page faults), while the
#: per-chunk op overhead stays small next to the two GEMMs.
CHUNK_BYTES = 1 << 23
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 8192
MAX_COMPILED_CHUNKS = 8  # under torch.compile the chunk loop is unrolled: at most this many


class Stats(NamedTuple):
    """Sufficient statistics of one E-step, taken about the centres c_k = the params' means.

    How fields combine across chunks/shards/ranks (see :func:`combine`):

    ========================  ==================  =================================  ========
    field                     shape               value                              combine
    ========================  ==================  =================================  ========
    ``resp_sum``              [K]                 n_k = Σ ω r_nk                     sum
    ``x_sum``                 [K, D]              Σ ω r_nk (x_n - c_k)               sum
    ``xx_sum``                family              Σ ω r_nk (x_n - c_k)(x_n - c_k)ᵀ   sum
    ``log_lik_sum``           []                  Σ ω log p(x_n)                     sum
    ``weight_sum``            []                  Σ ω                                sum
    ``worst_log_lik``         [K]                 the K lowest log p(x_n), ascending K-min
    ``worst_x``               [K, D]              the points holding them            K-min
    ========================  ==================  =================================  ========

    ``xx_sum`` is [K, D, D] for full/tied, its diagonal [K, D] for diagonal, its trace [K] for
    isotropic/shared/constant. Rows with zero weight never enter ``worst_*`` (padding: +inf
    log-likelihood, zero point). The worst points re-seed empty components in :func:`m_step`.
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
    """

    log_likelihood: Tensor
    n_resets: Tensor


def default_chunk_size(n: int, k: int, d: int, itemsize: int = 8) -> int:
    """Rows per chunk from static shapes: a [chunk, D, K] block near :data:`CHUNK_BYTES`."""
    rows = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(1, k * d * itemsize)))
    return max(1, min(n, rows))


def combine(a: Stats, b: Stats) -> Stats:
    """Statistics of the union of two disjoint row sets (order-independent up to rounding).

    Sums add; the ``worst_*`` pair keeps the K lowest log-likelihoods of both (a stable sort,
    so ties prefer ``a``).
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


# --- moments about the global centre: one GEMM per chunk ---------------------------------------
#
# A chunk's rows, shifted by the detached centre g of the means (the density's own centre), are
# expanded into a [c, P] block of products ("columns") and the responsibilities contract it in
# one GEMM, r^T [K, c] @ [c, P], into raw moments about g:
#
#   full/tied  the distinct entries of [x - g, 1] [x - g, 1]^T, i.e. Σ r (x-g)(x-g)^T, Σ r (x-g), Σ r;
#              the D+1 = m lifted columns are split in a head a (h of them) and a tail b, and
#              the h x h block holds a a^T on and above its diagonal and b b^T below it (each
#              entry once, the rectangular-full-packed idea), then a b^T: about m^2 / 2 columns
#   diagonal   [(x - g)^2, x - g, 1]
#   scalar     [||x - g||^2, x - g, 1]
#
# then shifted exactly to each component's centre c_k (d_k = c_k - g):
#
#   X_k = X_g - n d_k,   S_k = S_g - X_g d_k^T - d_k X_g^T + n d_k d_k^T.
#
# The products and the GEMM run in float64 (float32 rows and responsibilities are exact in
# float64), so the shift loses nothing in float32 either, for data far from the origin or clusters
# far apart; only the density's GEMM runs in the data's dtype.


class _Layout(NamedTuple):
    """Static column layout of the products of one family and dimension (see above)."""

    ndim: int  # the family's scale_ndim: 2 full/tied, 1 diagonal, 0 scalar
    d: int
    h: int  # full/tied: side of the folded square block; else 0
    width: int  # P, the number of product columns


def _layout(ndim: int, d: int) -> _Layout:
    if ndim == 2:
        m = d + 1
        h = (m + 2) // 2  # ceil((m + 1) / 2): b b^T (upper, m - h <= h - 1 rows) fits below the diagonal
        return _Layout(2, d, h, h * h + h * (m - h))
    return _Layout(ndim, d, 0, 2 * d + 1 if ndim == 1 else d + 2)


def _fold_tables(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the full layout: the [m, m] map from a pair (i, j) of lifted columns to its product
    column, and the [h, h] mask of the folded block's upper triangle (True: a a^T, False: b b^T).

    Row i < h of the folded block holds a_i a_j for j >= i and b_j b_(i-1) for j < i (b_j the
    lifted column h + j), so a pair p <= q of tail columns sits at row q - h + 1, column p - h.
    """
    m, h = d + 1, _layout(2, d).h
    ar = torch.arange(m, device=device)
    p, q = torch.minimum(ar[:, None], ar[None, :]), torch.maximum(ar[:, None], ar[None, :])  # p <= q
    head = p * h + q  # both in the head a
    tail = (q - h + 1) * h + (p - h)  # both in the tail b
    cross = h * h + p * (m - h) + (q - h)  # a_p b_(q-h)
    index = torch.where(q < h, head, torch.where(p >= h, tail, cross))
    return index, torch.ones(h, h, dtype=torch.bool, device=device).triu()


class _Work:
    """Per-call workspace of the plain (no autograd, no ``torch.func``, not compiled) chunk loop:
    the lifted rows, the product block and float64 responsibilities, allocated once and reused
    by every chunk (fresh multi-MB temporaries cost page faults on every chunk)."""

    def __init__(self, lay: _Layout, rows: int, k: int, x: Tensor, dtype: torch.dtype) -> None:
        opts: dict[str, Any] = {"dtype": dtype, "device": x.device}
        d, h = lay.d, lay.h
        self.xl = torch.zeros(rows, max(2 * h, d + 1), **opts)  # [x - g, 1, 0...]
        self.xl[:, d] = 1.0
        self.prod = torch.empty(rows, lay.width, **opts)
        if lay.ndim != 2:
            self.prod[:, -1] = 1.0  # the constant column of the diagonal and scalar layouts
        self.resp = torch.empty(rows, k, **opts)


def _products(lay: _Layout, x: Tensor, centre: Tensor, dtype: torch.dtype, work: _Work | None) -> Tensor:
    """The [c, P] product block of rows ``x`` [c, D] about ``centre`` [D], in ``dtype``."""
    c, d, h = x.shape[0], lay.d, lay.h
    if work is None:
        xg = (x - centre).to(dtype)  # [c, D]
        if lay.ndim == 1:
            return torch.cat([xg.square(), xg, xg.new_ones(c, 1)], 1)
        if lay.ndim == 0:
            return torch.cat([xg.square().sum(1, keepdim=True), xg, xg.new_ones(c, 1)], 1)
        xl = F.pad(F.pad(xg, (0, 1), value=1.0), (0, max(2 * h, d + 1) - d - 1))  # [c, 2h]
        mask = _fold_tables(d, x.device)[1]
        a, lo, hi = xl[:, :h], xl[:, h - 1 : 2 * h - 1], xl[:, h : 2 * h]
        folded = torch.where(mask, a.unsqueeze(2) * a.unsqueeze(1), lo.unsqueeze(2) * hi.unsqueeze(1))  # [c, h, h]
        cross = a.unsqueeze(2) * xl[:, h : d + 1].unsqueeze(1)  # [c, h, m - h]
        return torch.cat([folded.reshape(c, h * h), cross.reshape(c, -1)], 1)
    xl, prod = work.xl[:c], work.prod[:c]
    if lay.ndim == 1:
        xg = torch.sub(x, centre, out=prod[:, d : 2 * d])
        torch.mul(xg, xg, out=prod[:, :d])
        return prod
    if lay.ndim == 0:
        xg = torch.sub(x, centre, out=prod[:, 1 : d + 1])
        torch.sum(xg * xg, 1, keepdim=True, out=prod[:, :1])
        return prod
    torch.sub(x, centre, out=xl[:, :d])
    a, lo, hi = xl[:, :h], xl[:, h - 1 : 2 * h - 1], xl[:, h : 2 * h]
    folded = prod[:, : h * h].view(c, h, h)
    torch.mul(a.unsqueeze(2), a.unsqueeze(1), out=folded)  # a a^T, its lower part overwritten below
    for i in range(1, h):  # b b^T below the diagonal, row by row: no masked pass over the block
        torch.mul(lo[:, i : i + 1], hi[:, :i], out=folded[:, i, :i])
    torch.mul(a.unsqueeze(2), xl[:, h : d + 1].unsqueeze(1), out=prod[:, h * h :].view(c, h, d + 1 - h))
    return prod


def _about_centres(lay: _Layout, raw: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n_k, X_k, S_k) about the centres c_k = g + ``shift`` [K, D] from raw moments [K, P]
    about g (see above); S_k is [K, D, D], [K, D] or [K] by family."""
    d = lay.d
    if lay.ndim == 2:
        index = _fold_tables(d, raw.device)[0]
        full = raw[:, index.reshape(-1)].reshape(-1, d + 1, d + 1)  # [K, m, m]
        s_g, x_g, n = full[:, :d, :d], full[:, :d, d], full[:, d, d]
        outer = x_g.unsqueeze(2) * shift.unsqueeze(1)  # [K, D, D]  X_g d^T
        nd = n[:, None, None] * shift.unsqueeze(2) * shift.unsqueeze(1)
        s = s_g - outer - outer.mT + nd
    elif lay.ndim == 1:
        s_g, x_g, n = raw[:, :d], raw[:, d : 2 * d], raw[:, 2 * d]
        s = s_g - 2 * shift * x_g + n.unsqueeze(1) * shift.square()
    else:
        s_g, x_g, n = raw[:, 0], raw[:, 1 : d + 1], raw[:, d + 1]
        s = s_g - 2 * (shift * x_g).sum(1) + n * shift.square().sum(1)
    return n, x_g - n.unsqueeze(1) * shift, s


def _responsibilities(log_joint: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
    """(r [c, K], log p [c]) from joint log-densities [c, K] in log space: r = exp(ℓ - lse).

    Exponents are clamped at 3 log eps (-108 in float64): such terms are below eps³ of the
    largest, and the clamp keeps responsibilities, and their products in the moment GEMM, out
    of the subnormal range (10-100x slower arithmetic). A row with NaN stays NaN.
    """
    top = log_joint.detach().amax(1, keepdim=True)  # [c, 1]; its gradient cancels exactly
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    floor = 3.0 * math.log(torch.finfo(log_joint.dtype).eps)
    if inplace:
        e = log_joint.sub_(top).clamp_(min=floor).exp_()
    else:
        e = torch.exp(torch.clamp(log_joint - top, min=floor))
    total = e.sum(1, keepdim=True)  # [c, 1]
    lse = (torch.log(total) + top).squeeze(1)
    return (e.div_(total) if inplace else e / total), lse


def _plain(*tensors: Tensor | None) -> bool:
    """Whether chunk code may reuse buffers and work in place: eager, no autograd graph to
    record, no ``torch.func`` wrappers."""
    if torch.compiler.is_compiling():
        return False
    ts = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(wrapped(t) for t in ts)


def _moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for the moment GEMM of float32 (and float64) data; other dtypes keep their own."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else dtype


def _chunks(n: int, chunk_size: int | None, k: int, d: int, itemsize: int = 8) -> list[tuple[int, int]]:
    size = default_chunk_size(n, k, d, itemsize) if chunk_size is None else int(chunk_size)
    if size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if chunk_size is None and torch.compiler.is_compiling():  # the loop unrolls: cap the chunks
        size = max(size, -(-n // MAX_COMPILED_CHUNKS))
    return [(start, min(n, start + size)) for start in range(0, n, size)]


class _Worst:
    """The K lowest scores of the rows seen so far (stable: ties keep the earlier row), merged
    once at the end from each chunk's K lowest (row indices, no points, until then)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.vals: list[Tensor] = []
        self.rows: list[Tensor] = []

    def add(self, ranked: Tensor, start: int) -> None:
        order = torch.sort(ranked, stable=True).indices[: self.k]  # [m], lowest first
        self.vals.append(torch.gather(ranked, 0, order))
        self.rows.append(order + start)

    def result(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        vals, rows = torch.cat(self.vals), torch.cat(self.rows)
        order = torch.sort(vals, stable=True).indices[: self.k]
        worst_ll, worst_x = torch.gather(vals, 0, order).to(dtype), x.index_select(0, rows.index_select(0, order))
        m = worst_ll.shape[0]
        if m < self.k:  # fewer rows than components: pad with "no point"
            worst_ll = torch.cat([worst_ll, worst_ll.new_full((self.k - m,), float("inf"))])
            worst_x = torch.cat([worst_x, worst_x.new_zeros((self.k - m, x.shape[1]))])
        return worst_ll, worst_x


def _ranked(score: Tensor, w: Tensor | None) -> Tensor:
    """Scores with zero-weight rows (padding) sent to +inf, so they are never "worst"."""
    return score if w is None else torch.where(w > 0, score, torch.full_like(score, float("inf")))


def sufficient_stats(
    params: GMMParams, x: Tensor, sample_weight: Tensor | None = None, *, chunk_size: int | None = None
) -> Stats:
    """E-step statistics of unbatched ``params`` on ``x`` [N, D] (see :class:`Stats`).

    Rows are processed in chunks of ``chunk_size`` (default from static shapes,
    :func:`default_chunk_size`) by a static Python loop. Per chunk: the joint log-densities
    [c, K] from the density's whitening GEMM (:func:`puregmm.density.whitening`), the
    responsibilities in log space, and the moments as one float64 GEMM of the responsibilities
    with the rows' products about the centre of the means (module comments above
    :class:`_Layout`). Only [c, K], [c, D, K] and [c, P] blocks exist at a time, reused from
    chunk to chunk when nothing is being differentiated, and an [N] vector of log-densities.
    ``sample_weight`` [N] (non-negative, not checked here) weights rows as counts. Use
    ``torch.func.vmap`` for stacked params/data.
    """
    if x.dim() != 2 or x.shape[-1] != params.dim:
        raise ValueError(f"x must be [N, D] with D={params.dim}; got shape {tuple(x.shape)}")
    if sample_weight is not None and sample_weight.shape != x.shape[:1]:
        raise ValueError(f"sample_weight must be [N]=({x.shape[0]},); got shape {tuple(sample_weight.shape)}")
    spec, k, (n, d) = params.spec, params.n_components, x.shape
    lay = _layout(spec.scale_ndim, d)
    mdtype = _moment_dtype(x.dtype)
    wh = whitening(params)
    parts = _chunks(n, chunk_size, k, d, x.element_size())
    rows = max(e - s for s, e in parts)
    plain = _plain(params.logits, params.means, params.scale, x, sample_weight)
    bufs = _fused.workspace(wh, rows, x) if plain else None
    work = _Work(lay, rows, k, x, mdtype) if bufs is not None else None
    raw = torch.zeros(k, lay.width, dtype=mdtype, device=x.device)
    lse_all = x.new_empty(n, dtype=mdtype) if work is not None else None
    lses: list[Tensor] = []
    worst = _Worst(k)
    for start, stop in parts:
        xs = x[start:stop]
        ws = None if sample_weight is None else sample_weight[start:stop]
        if work is not None and bufs is not None:  # in place, in the workspaces
            lj = _fused.log_joint(wh, _fused.lift(wh, xs, bufs), bufs)
            if lj.dtype != mdtype:
                lj = work.resp[: stop - start].copy_(lj)
            resp, lse = _responsibilities(lj, inplace=True)
            if ws is not None:
                resp.mul_(ws.unsqueeze(1))
            raw.addmm_(resp.mT, _products(lay, xs, wh.center, mdtype, work))
            lse_all_part = lse_all[start:stop] if lse_all is not None else lse
            lse_all_part.copy_(lse)
            worst.add(_ranked(lse_all_part, ws), start)
        else:
            resp, lse = _responsibilities(joint_log_prob_chunk(wh, xs).to(mdtype), inplace=False)
            if ws is not None:
                resp = resp * ws.unsqueeze(1)
            raw = raw + resp.mT @ _products(lay, xs, wh.center, mdtype, None)
            lses.append(lse)
            worst.add(_ranked(lse, ws), start)
    lse_n = lse_all if lse_all is not None else (torch.cat(lses) if len(lses) != 1 else lses[0])
    if sample_weight is None:
        log_lik_sum = lse_n.sum()
        weight_sum = torch.full((), float(n), dtype=x.dtype, device=x.device)
    else:
        log_lik_sum = (lse_n * sample_weight).sum()
        weight_sum = sample_weight.sum()
    centres = params.means.detach()
    resp_sum, x_sum, xx_sum = _about_centres(lay, raw, (centres - wh.center).to(mdtype))
    worst_ll, worst_x = worst.result(x, x.dtype)
    dt = params.dtype
    return Stats(resp_sum.to(dt), x_sum.to(dt), xx_sum.to(dt), log_lik_sum.to(dt), weight_sum, worst_ll, worst_x)


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
    lay = _layout(spec.scale_ndim, d)
    mdtype = _moment_dtype(x.dtype)
    if score is None:
        score = -torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist").square().amin(-1)
    centre = centres.detach().mean(0)  # [D]
    parts = _chunks(n, chunk_size, k, d, x.element_size())
    plain = _plain(x, resp, centres, sample_weight, score)
    work = _Work(lay, max(e - s for s, e in parts), k, x, mdtype) if plain else None
    raw = torch.zeros(k, lay.width, dtype=mdtype, device=x.device)
    worst = _Worst(k)
    for start, stop in parts:
        ws = None if sample_weight is None else sample_weight[start:stop]
        r = resp[start:stop].to(mdtype)
        r = r if ws is None else r * ws.unsqueeze(1)
        prod = _products(lay, x[start:stop], centre, mdtype, work)
        if work is not None:
            raw.addmm_(r.mT, prod)
        else:
            raw = raw + r.mT @ prod
        worst.add(_ranked(score[start:stop], ws), start)
    if sample_weight is None:
        log_lik_sum = score.sum()
        weight_sum = torch.full((), float(n), dtype=x.dtype, device=x.device)
    else:
        log_lik_sum = (score * sample_weight).sum()
        weight_sum = sample_weight.sum()
    resp_sum, x_sum, xx_sum = _about_centres(lay, raw, (centres.detach() - centre).to(mdtype))
    worst_ll, worst_x = worst.result(x, x.dtype)
    dt = x.dtype
    return Stats(resp_sum.to(dt), x_sum.to(dt), xx_sum.to(dt), log_lik_sum, weight_sum, worst_ll, worst_x)


def m_step(stats: Stats, params: GMMParams, *, reg_covar: float = 1e-6, return_info: bool = False) -> Any:
    """New params (same family) from :class:`Stats` taken about ``params``' means.

    Matches scikit-learn's M-step (module docstring). Then, branch-free:

    * an *empty* component (n_k ≤ eps·Σω: all responsibilities underflowed) is re-seeded at
      the j-th lowest-likelihood point (j-th empty component, j-th point), gets the pooled
      covariance of the non-empty components and their mean count n';
    * a covariance that is not positive definite (rounding, ``reg_covar=0`` on degenerate
      data) gets ``10·D·eps·max diag`` added to its diagonal, or failing that is replaced by
      its floored diagonal; variances are floored at sqrt(tiny).

    Both are counted. Never divides by zero. The constant family's ``scale`` is not updated.

    Args:
        stats: from :func:`sufficient_stats` with the same (unbatched) ``params``.
        params: the params of the E-step.
        reg_covar: added to the diagonal of every covariance (scikit-learn's ``reg_covar``).
        return_info: also return the 0-d int64 count of re-seeded/repaired components.

    Returns:
        new params, or ``(params, n_resets)`` with ``return_info``.
    """
    spec, k, d = params.spec, params.n_components, params.dim
    finfo = torch.finfo(params.dtype)
    eps, floor = finfo.eps, finfo.tiny**0.5
    empty = stats.resp_sum <= eps * stats.weight_sum  # [K]
    good = ~empty
    nk = stats.resp_sum + 10 * eps  # [K], scikit-learn's guard
    shift = stats.x_sum / nk.unsqueeze(-1)  # [K, D], new mean - centre
    means = params.means.detach() + shift
    rank = (torch.cumsum(empty.to(torch.int64), 0) - 1).clamp_min(0)  # j-th empty -> j-th worst
    means = torch.where(empty.unsqueeze(-1), stats.worst_x.index_select(0, rank), means)

    goodf = good.to(nk.dtype)
    n_good = goodf.sum().clamp_min(1.0)
    nk_good = nk * goodf
    pool = nk_good / nk_good.sum().clamp_min(finfo.tiny)  # [K], pooling weights of the good ones

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
        cov = 0.5 * (cov + cov.mT) + reg_covar * torch.eye(d, dtype=cov.dtype, device=cov.device)
        scale, n_fixed = _raw_from_cov(cov, eps, floor)
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
        small = var < floor
        n_fixed = small.reshape(k if spec.per_component else 1, -1).any(-1).sum()
        scale = -0.5 * torch.log(torch.where(small, torch.full_like(var, floor), var))

    nk = torch.where(empty, (nk_good.sum() / n_good).expand_as(nk), nk)
    logits = torch.log(nk) - torch.log(nk.sum())
    new = GMMParams(logits, means, scale, params.family)
    if return_info:
        return new, empty.sum() + n_fixed
    return new


def _raw_from_cov(cov: Tensor, eps: float, floor: float) -> tuple[Tensor, Tensor]:
    """The matrix families' ``raw`` (see :mod:`puregmm.families`) from covariances [..., D, D],
    repairing (and counting) the ones whose Cholesky factorisation fails."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)  # [..., D]
    chol, info = torch.linalg.cholesky_ex(cov)
    jitter = 10 * d * eps * diag.amax(-1).clamp_min(floor) + floor  # [...]
    chol2, info2 = torch.linalg.cholesky_ex(cov + jitter[..., None, None] * eye)
    chol3 = torch.diag_embed(diag.clamp_min(floor).sqrt())
    bad, bad2 = (info != 0)[..., None, None], (info2 != 0)[..., None, None]
    chol = torch.where(bad, torch.where(bad2, chol3, chol2), chol)
    u = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False).mT  # U = L⁻ᵀ
    raw = torch.triu(u, 1) + torch.diag_embed(torch.log(torch.diagonal(u, dim1=-2, dim2=-1)))
    return raw, (info != 0).sum()


def em_step(
    params: GMMParams,
    x: Tensor,
    *,
    reg_covar: float = 1e-6,
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
        reg_covar: non-negative value added to every variance (not checked here).
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
