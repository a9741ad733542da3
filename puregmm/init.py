"""Initial params from data, as scikit-learn's ``GaussianMixture._initialize``: pick
responsibilities, then run the one M-step on them (:func:`puregmm.mstep.maximise`: the M-step
without its argument checks, as both come from here).

Methods (``method=``):

=====================  ===================================================================
``"kmeans++"``         greedy k-means++ seeds (Arthur & Vassilvitskii, 2007), hard-assign each
                       point to its nearest seed
``"kmeans"``           k-means++ seeds, then Lloyd iterations as scikit-learn's ``KMeans``
                       (:mod:`puregmm.kmeans`), hard-assign (the default)
``"random"``           responsibilities uniform at random, normalised per row
``"random_from_data"`` K distinct data points drawn uniformly as seeds, hard-assign
=====================  ===================================================================

``means=`` skips the seeding: points are hard-assigned to the given means, weights and
covariances come from the M-step and the means are kept as given (scikit-learn's
``means_init``). All randomness comes from ``key`` through :mod:`puregmm.keys`: same key, same
params. Distances are computed on data centred by its mean, so a large common offset costs
no accuracy.

Design: one implementation, three pure kernels that ``torch.func.vmap`` over datasets and
keys: :func:`_seed` (centring and seeding), :func:`puregmm.kmeans._lloyd_step` (one Lloyd
iteration) and :func:`_finish` (hard or random responsibilities, then the M-step). :func:`init_batched` runs
them for B datasets at once; :func:`init` is the validated eager front door and runs the same
kernels with B = 1 (called directly, without ``vmap``). Only the Lloyd loop is eager: it stops
once every dataset has converged and advances only the datasets still moving (a dataset's
iterations and stopping rule depend on its data alone, so the result does not depend on the others). Counters of the
random draws are row *ranks* among real rows, so a padded (masked) dataset draws exactly what
the same dataset without its padding draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _moments as mo
from puregmm import _validate, keys
from puregmm.em import label_stats, responsibility_stats
from puregmm.families import get_family
from puregmm.kmeans import (
    KMEANS_MAX_ITER,
    KMEANS_TOL,
    _data_variance,
    _extent,
    _kmeans_plusplus,
    _lloyd_loop,
    _lloyd_one,
    _nearest,
    _one_hot,
    _trials,
    kmeans_plusplus,
    lloyd,
)
from puregmm.mstep import maximise
from puregmm.params import GMMParams

__all__ = ["KMEANS_MAX_ITER", "KMEANS_TOL", "METHODS", "init", "init_batched", "kmeans_plusplus", "lloyd"]

METHODS = ("kmeans++", "kmeans", "random", "random_from_data")


def _seed(
    x: Tensor, w: Tensor | None, rows: Tensor, key: Tensor, given: Tensor | None, k: int, method: str, trials: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kernel: the data's (weighted) mean [D], the centred data [N, D], its transpose [D, N]
    and the seeds [K, D] (zeros for ``"random"``; ``given - mean`` for given means).
    ``rows`` [N] are the draw counters (row ranks among real rows)."""
    wn = torch.ones_like(x[:, 0]) if w is None else w  # [N]
    offset = x.mean(0) if w is None else (w.unsqueeze(-1) * x).sum(0) / w.sum()  # [D]
    xc = x - offset
    xt = xc.mT.contiguous()  # [D, N]: distances run along contiguous rows
    if given is not None:
        centres = given - offset
    elif method == "random":
        centres = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    elif method == "random_from_data":
        u = keys.uniform(key, 0, rows).to(x.device)  # [N]
        u = torch.where(wn > 0, u, torch.full_like(u, 2.0))  # zero-weight rows last
        centres = xc.index_select(0, torch.argsort(u, stable=True)[:k])
    else:
        centres = xc.index_select(0, _kmeans_plusplus(xc, xt, None if w is None else w.double(), key, k, trials))
    return offset, xc, xt, centres


def _finish(
    xc: Tensor,
    xt: Tensor,
    w: Tensor | None,
    rows: Tensor,
    key: Tensor,
    offset: Tensor,
    centres: Tensor,
    variance: Tensor | None,
    *,
    family: str,
    method: str,
    keep_means: bool,
    reg_covar: float,
) -> GMMParams:
    """Kernel: responsibilities (one-hot to the nearest centre, or random), then the M-step."""
    spec = get_family(family)
    k, d = centres.shape
    labels = None
    if method == "random" and not keep_means:
        resp = keys.uniform(key, 0, rows.unsqueeze(-1), torch.arange(k, device=xc.device)).to(xc)  # [N, K]
        resp = resp / resp.sum(-1, keepdim=True)
        score = -xc.square().sum(-1)  # [N]
    else:
        labels, dist2 = _nearest(xt, centres)
        score = -dist2  # [N]
    if spec.learned:
        scale = torch.zeros(spec.scale_shape(k, d), dtype=xc.dtype, device=xc.device)
    else:
        assert variance is not None
        scale = -0.5 * torch.log(variance)
    start = GMMParams(torch.zeros(k, dtype=xc.dtype, device=xc.device), centres, scale, spec.name)
    if labels is None:
        stats = responsibility_stats(xc, resp, centres, spec.name, w, score)
    elif mo.plain(xc, centres, w, score):  # eager: each cluster's moments from its own rows
        stats = label_stats(xc, labels, centres, spec.name, w, score)
    else:  # under vmap/compile: the one-hot GEMM
        stats = responsibility_stats(xc, _one_hot(labels, k, xc.dtype).mT, centres, spec.name, w, score)
    params = maximise(stats, start, reg_covar)  # statistics and params built here: no argument checks
    new_means = centres if keep_means else params.means
    return GMMParams(params.logits, new_means + offset, params.scale, spec.name)


def _map(fn: Callable[..., Any], in_dims: tuple[int | None, ...], b: int | None) -> Callable[..., Any]:
    """``vmap(fn, in_dims)`` for B > 1; for B = 1 a plain call on the first item (no vmap);
    for ``b=None`` (one unbatched dataset) ``fn`` itself."""
    if b is None:
        return fn
    if b > 1:
        return torch.func.vmap(fn, in_dims=in_dims)

    def one(*args: Any) -> Any:
        out = fn(*(a[0] if dim == 0 and a is not None else a for a, dim in zip(args, in_dims, strict=True)))
        return pytree.tree_map(lambda t: t.unsqueeze(0), out)

    return one


def _run(
    x: Tensor,
    w: Tensor | None,
    rows: Tensor,
    run_keys: Tensor,
    k: int,
    family: str,
    *,
    method: str,
    given: Tensor | None = None,
    variance: float | None = None,
    reg_covar: float | Tensor = 1e-6,
    n_local_trials: int | None = None,
    max_iter: int = KMEANS_MAX_ITER,
) -> tuple[GMMParams, Tensor | None]:
    """All stages for B stacked datasets: x [B, N, D] (or [N, D] shared by B keys), w [B, N] or
    [N] or None, rows [B, N] or [N], run_keys [B]. Returns params [B, ...] and, for the
    constant family, the variances [B] it used. A 0-d ``run_keys`` runs one dataset x [N, D]
    unbatched (no batch axis to add and drop): params and variance without the [B]."""
    b = run_keys.shape[0] if run_keys.dim() else None
    xd = 0 if x.dim() == 3 else None
    wd = None if w is None else (0 if w.dim() == 2 else None)
    rd = 0 if rows.dim() == 2 else None
    trials = _trials(k, n_local_trials)

    def seed(xi: Tensor, wi: Tensor | None, ri: Tensor, key: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _seed(xi, wi, ri, key, given, k, method, trials)

    offset, xc, xt, centres = _map(seed, (xd, wd, rd, 0), b)(x, w, rows, run_keys)
    lloyd_runs = method == "kmeans" and given is None
    constant = not get_family(family).learned
    data_var = _map(_data_variance, (0, wd), b)(xc, w) if lloyd_runs or (constant and variance is None) else None
    if lloyd_runs:
        assert data_var is not None
        if b is None:
            centres = _lloyd_one(xt, w, centres, KMEANS_TOL * data_var, max_iter)
        else:
            wb = None if w is None else (w if wd == 0 else w.expand(b, -1))
            centres = _lloyd_loop(xt, wb, max_iter)(centres, KMEANS_TOL * data_var)
    var = None
    if constant:
        var = data_var if variance is None else xc.new_full(() if b is None else (b,), float(variance))

    reg = torch.as_tensor(reg_covar, dtype=x.dtype, device=x.device)  # 0-d, or [B]: one per dataset

    def finish(*args: Any) -> GMMParams:
        *rest, r = args
        return _finish(*rest, family=family, method=method, keep_means=given is not None, reg_covar=r)

    params = _map(finish, (0, 0, wd, rd, 0, 0, 0, None if var is None else 0, 0 if reg.dim() else None), b)(
        xc, xt, w, rows, run_keys, offset, centres, var, reg
    )
    return params, var


def init_batched(
    xs: Tensor,
    n_components: int,
    family: str = "full",
    *,
    keys: Tensor,
    method: str = "kmeans",
    mask: Tensor | None = None,
    variance: float | None = None,
    reg_covar: float | Tensor = 1e-6,
) -> GMMParams:
    """Initial params for B datasets at once: what :func:`init` gives each (same kernels).

    Args:
        xs: [B, N, D] finite data, or [N, D] shared by all B keys (restarts).
        n_components: K, at most the number of real rows of every dataset.
        family: one of :data:`puregmm.FAMILIES`.
        keys: [B] int64, one key per dataset.
        method: as :func:`init`.
        mask: [B, N] bool, True for real rows; dataset b then gets ``init(xs[b][mask[b]])``.
        variance: as :func:`init`.
        reg_covar: as :func:`init`.

    Returns:
        :class:`GMMParams` with batch shape [B].

    Raises:
        ValueError: unknown method, or the constant family on a dataset of zero variance
            without ``variance=``. Shapes, finiteness and K are the caller's to check.
    """
    spec = get_family(family)
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {METHODS}")
    if mask is None:
        rows, w = torch.arange(xs.shape[-2], device=xs.device), None
    else:
        rows, w = torch.cumsum(mask.to(torch.int64), -1) - 1, mask.to(xs.dtype)  # rank among real rows
    if not spec.learned and variance is not None:
        _check_variance(variance)
    params, var = _run(
        xs, w, rows, keys, n_components, spec.name, method=method, variance=variance, reg_covar=reg_covar
    )
    if var is not None and not bool((var > 0).all()):
        _zero_variance()
    return params


def init(
    data: Any,
    n_components: int,
    family: str = "full",
    *,
    key: Any = 0,
    method: str = "kmeans",
    variance: float | None = None,
    means: Any = None,
    reg_covar: float = 1e-6,
    sample_weight: Any = None,
) -> GMMParams:
    """Initial params: responsibilities from ``method`` (module table), then the M-step.

    Args:
        data: [N, D] array-like (integers are converted to floats).
        n_components: K, at most N.
        family: one of :data:`puregmm.FAMILIES`.
        key: int or 0-d int64 tensor.
        method: ``"kmeans"`` (k-means++ seeds then Lloyd; the default, shared with
            :func:`puregmm.fit`, scikit-learn's), ``"kmeans++"`` (the seeds alone), ``"random"``
            or ``"random_from_data"``.
        variance: the fixed variance of the ``constant`` family; defaults to the data's mean
            per-dimension variance. Ignored by other families.
        means: optional initial means [K, D]; replaces the seeding (``method`` is ignored).
        reg_covar: added to the diagonal of the initial covariances.
        sample_weight: optional [N] non-negative weights (seeding ∝ ω, weighted M-step).

    Returns:
        unbatched :class:`GMMParams` of ``family`` in the data's dtype (float32 for integers).

    Raises:
        ValueError: bad data (not 2-D, empty, NaN/Inf), K > N, unknown family or method, bad
            ``means``/``variance``/weights, or the constant family on data of zero variance
            without ``variance=``.

    >>> import torch, puregmm as pg
    >>> x = torch.cat([torch.randn(50, 2), torch.randn(50, 2) + 8])
    >>> pg.init(x, 2, "diagonal", key=1, method="kmeans")
    GMMParams(family='diagonal', K=2, D=2, dtype=float32, device=cpu)
    """
    spec = get_family(family)
    x = _validate.data(data, "data")
    n, d = x.shape
    k = _validate.n_components(n_components, n)
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {METHODS}")
    reg_covar = _validate.reg_covar(reg_covar)
    w = None if sample_weight is None else _validate.sample_weight(sample_weight, n, x.dtype, x.device)
    given = None if means is None else _validate.means(means, k, d, x.dtype, x.device)
    key = _validate.key(key)
    if not spec.learned and variance is not None:
        _check_variance(variance)
    if _extent(x)[1]:  # squared distances would overflow or underflow
        return _init_standardised(x, k, spec.name, key, method, variance, given, reg_covar, w)
    rows = torch.arange(n, device=x.device)
    params, var = _run(
        x, w, rows, key, k, spec.name, method=method, given=given, variance=variance, reg_covar=reg_covar
    )
    if var is not None and not bool(var > 0):
        _zero_variance()
    return params


def _init_standardised(
    x: Tensor, k: int, family: str, key: Tensor, method: str, variance: float | None, given: Tensor | None,
    reg_covar: float, w: Tensor | None,
) -> GMMParams:  # fmt: skip
    """:func:`init` of data far from 1 in scale: on z = (x - m) / s, mapped back (init is
    affine-equivariant), so that squared distances neither overflow nor underflow."""
    from puregmm.methods import affine, standardisation, standardised_reg

    shift, s = standardisation(x, w)
    fixed = None if variance is None else float((math.sqrt(variance) / s).square().clamp(min=1e-300, max=1e300))
    p = init(
        (x - shift) / s, k, family, key=key, method=method, variance=fixed,
        means=None if given is None else (given - shift) / s, reg_covar=float(standardised_reg(reg_covar, s)),
        sample_weight=w,
    )  # fmt: skip
    return affine(p, s, shift)


def _check_variance(variance: Any) -> None:
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance < math.inf:
        raise ValueError(f"variance must be a positive number; got {variance!r}")


def _zero_variance() -> None:
    raise ValueError(
        "the constant family fixes the variance at the data's variance, which is 0 here "
        "(all points identical); pass variance=<positive float>"
    )
