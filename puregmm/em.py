"""Expectation-maximisation (Bishop PRML §9.2.2): one iteration is
``m_step(sufficient_stats(params, x), params)``.

* **E-step** (:mod:`puregmm.estep`): with responsibilities r_nk = softmax_k(log w_k + log
  N(x_n | μ_k, Σ_k)) and sample weights ω_n, the sums n_k = Σ ω r, X_k = Σ ω r (x - c_k) and
  S_k = Σ ω r (x - c_k)(x - c_k)ᵀ (or its diagonal / trace) about the current means c_k, by one
  chunk loop; the centres come from the params, so every chunk, shard or rank uses the same
  ones without communication.
* **Statistics** (:mod:`puregmm.stats`): sums, so :func:`puregmm.combine` folds chunks, passes
  or ranks together and a distributed fit all-reduces them (the ``reduce`` hook below).
* **M-step** (:mod:`puregmm.mstep`): scikit-learn's update, made safe (re-seeding, repairs).

Kernels here check static shapes only (no ``.item()``, no value-dependent branches, no boolean
indexing), so ``torch.func.vmap`` and ``torch.compile`` work; the one exception (plain eager
tensors only) is the E-step's whitened mode for components too narrow for the natural form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from puregmm import _masked, _validate
from puregmm._given_mode import label_stats, responsibility_stats
from puregmm._masked import Plan
from puregmm.estep import default_chunk_size, statistics, sufficient_stats
from puregmm.mstep import m_step, maximise
from puregmm.params import GMMParams
from puregmm.stats import EMInfo, Stats, combine

__all__ = [
    "EMInfo", "Stats", "combine", "default_chunk_size", "em_step", "label_stats", "m_step",
    "responsibility_stats", "sufficient_stats",
]  # fmt: skip


def em_step(
    params: GMMParams,
    x: Tensor,
    *,
    reg_covar: float | Tensor = 1e-6,
    sample_weight: Tensor | None = None,
    return_info: bool = False,
    chunk_size: int | None = None,
    reduce: Callable[[Stats], Stats] | None = None,
    observed: Tensor | Plan | None = None,
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
        observed: optional bool mask of ``x``'s shape, True = observed: the exact EM step for
            incomplete data (Ghahramani & Jordan 1994; Little & Rubin ch. 11). The E-step uses
            each row's marginal density of its observed entries, the conditional means of its
            missing entries and their conditional covariance (:func:`puregmm.estep.missing_stats`),
            so the observed-data log-likelihood never decreases (up to ``reg_covar``); the
            unobserved entries are ignored whatever they hold (NaN included). A mask shared by
            the batch ([N, D]) is grouped by pattern once, eagerly; a batched one takes the
            branch-free per-row form.

    Returns:
        new params, or ``(params, info)``.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> p = pg.init(x, 2, "diagonal")
    >>> p, info = pg.em_step(p, x, return_info=True)
    >>> info.n_resets
    tensor(0)
    >>> seen = torch.rand(100, 2) > 0.2  # about 20 % of the entries missing
    >>> p = pg.em_step(p, torch.where(seen, x, torch.nan), observed=seen)
    """
    _validate.data_shape(params, x)
    reg_covar = _validate.kernel_reg_covar(reg_covar)  # a float, or a fit's standardised 0-d tensor
    plan = None if observed is None else _observed_plan(observed, x)

    def stats_of(p: GMMParams, xs: Tensor, ws: Tensor | None, ob: Any = plan) -> Stats:
        return statistics(p, xs, ws, chunk_size, ob)  # x checked above

    def update(p: GMMParams, stats: Stats) -> tuple[GMMParams, EMInfo]:
        new, n_resets = maximise(stats, p, reg_covar, return_info=True)
        return new, EMInfo(stats.log_lik_sum / stats.weight_sum, n_resets)

    def one(p: GMMParams, xs: Tensor, ws: Tensor | None, ob: Any = plan) -> tuple[GMMParams, EMInfo]:
        return update(p, stats_of(p, xs, ws, ob))

    fn: Any = one
    batch = params.batch_shape
    x_batched = x.dim() > 2
    if x_batched and tuple(x.shape[:-2]) != batch:
        raise ValueError(f"x has batch dims {tuple(x.shape[:-2])} but the params have batch dims {batch}")
    w_batched = sample_weight is not None and sample_weight.dim() > 1
    in_dims: tuple[Any, ...] = (0, 0 if x_batched else None, 0 if w_batched else None)
    if isinstance(plan, Tensor):  # a batched mask [B..., N, D]: into the vmap
        in_dims = (*in_dims, 0)
        fn = lambda p, xs, ws, ob: one(p, xs, ws, ob)  # noqa: E731
        for _ in batch:
            fn = torch.func.vmap(fn, in_dims=in_dims)
        new, info = fn(params, x, sample_weight, plan)
        return (new, info) if return_info else new
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


def _observed_plan(observed: Tensor | Plan, x: Tensor) -> Tensor | Plan:
    """A plan of a mask shared by the batch (grouped once, eagerly); a batched mask as it is."""
    if isinstance(observed, Plan) or (isinstance(observed, Tensor) and observed.dim() == 2):
        if x.dim() != 2:
            mask = observed.observed if isinstance(observed, Plan) else observed
            raise ValueError(f"observed must have x's shape {tuple(x.shape)}; got shape {tuple(mask.shape)}")
        return _masked.as_plan(observed, x)
    _masked.check_mask(observed, x)
    return observed
