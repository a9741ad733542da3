"""The M-step: new params from E-step statistics (scikit-learn's update, made safe).

In centred coordinates: n'_k = n_k + 10·eps, d_k = X_k / n'_k, μ_k ← c_k + d_k,
w_k ← n'_k / Σ n', and the family's covariance update
(:meth:`puregmm.families.Family.m_step_scale`: Σ_k ← S_k / n'_k - d_k d_kᵀ + reg·I reduced to
the family's structure). Empty components are re-seeded at the worst-scoring points,
collapsed ones widened to what float64 resolves, masked ones left alone; all branch-free.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from puregmm import _moments as mo
from puregmm import _validate
from puregmm.families import MStepWeights
from puregmm.params import GMMParams
from puregmm.stats import Stats


def m_step(stats: Stats, params: GMMParams, *, reg_covar: float | Tensor = 1e-6, return_info: bool = False) -> Any:
    """New params (same family) from :class:`puregmm.Stats` taken about ``params``' means.

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
        stats: from :func:`puregmm.sufficient_stats` with the same (unbatched) ``params``.
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
    reg_covar = _validate.m_step_args(stats, params, reg_covar)
    return maximise(stats, params, reg_covar, return_info)


def maximise(stats: Stats, params: GMMParams, reg_covar: float | Tensor, return_info: bool = False) -> Any:
    """:func:`m_step` without its argument checks, for callers that checked them (em_step)."""
    eps = torch.finfo(params.dtype).eps
    nk = stats.resp_sum + 10 * eps  # [K], scikit-learn's guard
    shift = stats.x_sum / nk.unsqueeze(-1)  # [K, D], new mean - centre
    means = params.means.detach() + shift
    eager = mo.plain(stats.resp_sum, stats.x_sum, stats.xx_sum, params.logits, params.means, params.scale)
    n_empty = None  # eager, no component empty (n_k <= eps·Σω) or masked (logit -inf): no selections
    if eager and not bool(((stats.resp_sum <= eps * stats.weight_sum) | (params.logits == -math.inf)).any()):
        weights, nk_new = MStepWeights(nk, None, None, None, eager=True), nk
    else:
        active = params.logits.detach() != -math.inf  # [K]; masked components stay as they are
        empty = (stats.resp_sum <= eps * stats.weight_sum) & active  # [K]
        means, nk_new, weights = _reseed_and_mask(stats, params, empty, active, nk, means, eager)
        n_empty = empty.sum()
    # the least variance a component can resolve at its position: below it, its rows minus its
    # mean are rounding (a collapse onto a few points with reg_covar=0); per dimension
    least = mo.position_resolution(params.dtype) ** 2 * means.detach().square()  # [K, D]
    if weights.active is not None:
        least = torch.where(weights.active.unsqueeze(-1), least, torch.zeros_like(least))
    scale, n_fixed = params.spec.m_step_scale(stats.xx_sum, weights, shift, least, reg_covar, params.scale)

    logits = torch.log(nk_new) - torch.log(nk_new.sum())
    new = GMMParams(logits, means, scale, params.family)
    if return_info:
        return new, n_fixed if n_empty is None else n_empty + n_fixed
    return new


def _reseed_and_mask(
    stats: Stats, params: GMMParams, empty: Tensor, active: Tensor, nk: Tensor, means: Tensor, eager: bool
) -> tuple[Tensor, Tensor, MStepWeights]:
    """Branch-free: empty components re-seeded at the worst points with the good ones' mean count,
    masked ones keeping their mean and weight 0. Returns (means, new counts, the weights)."""
    rank = (torch.cumsum(empty.to(torch.int64), 0) - 1).clamp_min(0)  # j-th empty -> j-th worst
    means = torch.where(empty.unsqueeze(-1), stats.worst_x.index_select(0, rank), means)
    means = torch.where(active.unsqueeze(-1), means, params.means)

    good = ~empty & active
    goodf = good.to(nk.dtype)
    n_good = goodf.sum().clamp_min(1.0)
    nk_good = nk * goodf
    pool = nk_good / nk_good.sum().clamp_min(torch.finfo(nk.dtype).tiny)  # [K], pooling weights of the good ones

    nk_new = torch.where(empty, (nk_good.sum() / n_good).expand_as(nk), nk)
    nk_new = torch.where(active, nk_new, torch.zeros_like(nk_new))  # log 0 = -inf: masked stays masked
    return means, nk_new, MStepWeights(nk, empty, active, pool, eager)
