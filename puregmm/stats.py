"""Sufficient statistics of an E-step, and how they combine across chunks, shards and ranks.

:class:`Stats` is what :func:`puregmm.sufficient_stats` returns and :func:`puregmm.m_step`
takes; everything in it is a sum over rows (or a K-smallest merge), so :func:`combine` folds
chunks, streamed passes or ranks together in any order, and a distributed fit all-reduces it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Stats(NamedTuple):
    """Sufficient statistics of one E-step, taken about the centres c_k = the params' means.

    Each field says how it combines across chunks/shards/ranks (see :func:`puregmm.combine`).

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
    uses; the per-component split is an equal share, see :func:`puregmm._pooled_mode.pooled_stats`). Rows with zero
    weight never enter ``worst_*`` (padding: +inf log-likelihood, zero point). The worst points
    re-seed empty components in :func:`puregmm.m_step`.

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
    """Per-step report of :func:`puregmm.em_step`.

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
    for name, s_ in (("a", a), ("b", b)):
        if not isinstance(s_, Stats):
            raise TypeError(f"combine: {name} must be puregmm.Stats (from sufficient_stats); got {type(s_).__name__}")
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


def total(values: Tensor, sample_weight: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ ω v, Σ ω) over the rows of ``x``; without weights (Σ v, N in ``x``'s dtype)."""
    if sample_weight is None:
        return values.sum(), torch.full((), float(x.shape[0]), dtype=x.dtype, device=x.device)
    return (values * sample_weight.to(values.dtype)).sum(), sample_weight.sum()
