"""Initial params from data, as scikit-learn's ``GaussianMixture._initialize``: pick
responsibilities, then run the one M-step (:func:`puregmm.em.m_step`) on them.

Methods (``method=``):

=====================  ===================================================================
``"kmeans++"``         greedy k-means++ seeds (Arthur & Vassilvitskii, 2007), hard-assign each
                       point to its nearest seed (the default)
``"kmeans"``           k-means++ seeds, then Lloyd iterations as scikit-learn's ``KMeans``
                       (empty clusters relocated to the points farthest from their
                       centres; stop when the labels settle or the squared centre shift
                       is at most ``KMEANS_TOL`` x the mean per-dimension variance, at
                       most ``KMEANS_MAX_ITER``), hard-assign
``"random"``           responsibilities uniform at random, normalised per row
``"random_from_data"`` K distinct data points drawn uniformly as seeds, hard-assign
=====================  ===================================================================

``means=`` skips the seeding: points are hard-assigned to the given means, weights and
covariances come from the M-step and the means are kept as given (scikit-learn's
``means_init``). All randomness comes from ``key`` through :mod:`puregmm.keys`: same key, same
params. Distances are computed on data centred by its mean, so a large common offset costs
no accuracy.

Design: one implementation, three pure kernels that ``torch.func.vmap`` over datasets and
keys: :func:`_seed` (centring and seeding), :func:`_lloyd_step` (one Lloyd iteration) and
:func:`_finish` (hard or random responsibilities, then the M-step). :func:`init_batched` runs
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
from puregmm.em import label_stats, m_step, responsibility_stats
from puregmm.families import get_family
from puregmm.params import GMMParams

METHODS = ("kmeans++", "kmeans", "random", "random_from_data")
KMEANS_MAX_ITER = 300  # scikit-learn's KMeans max_iter
KMEANS_TOL = 1e-4  # scikit-learn's KMeans tol, relative to the data's mean per-dimension variance


def _trials(n_components: int, n_local_trials: int | None) -> int:
    return 2 + int(math.log(n_components)) if n_local_trials is None else max(1, int(n_local_trials))


def _kmeans_plusplus(x: Tensor, xt: Tensor, w: Tensor, key: Tensor, k: int, trials: int) -> Tensor:
    """Kernel of :func:`kmeans_plusplus`: x [N, D] (and xt = xᵀ [D, N]), w [N] float64
    weights -> centres [K, D]."""
    n = x.shape[0]
    cum_w = torch.cumsum(w, 0)  # [N]
    # every draw at once (uniform(key, i, j) for centre i, candidate j): one hash, not one per centre
    rows = torch.arange(k, device=x.device).unsqueeze(-1)
    u_all = keys.uniform(key, rows, torch.arange(max(trials, 1), device=x.device)).to(x.device)  # [K, L]

    def draw(mass: Tensor | None, i: int, m: int) -> Tensor:  # m indices [m] drawn ∝ mass (None: ω)
        cum = cum_w
        if mass is not None:
            cum = torch.cumsum(mass, 0)  # [N]
            cum = torch.where(cum[-1] > 0, cum, cum_w)  # all mass on centres: ∝ ω
        return torch.searchsorted(cum, u_all[i, :m] * cum[-1], right=True).clamp_max(n - 1)  # [m]

    x2 = _sq_norms(xt)
    centres = [x.index_select(0, draw(None, 0, 1))]  # [1, D]
    d2 = _sq_dist(xt, centres[0], x2)[0].to(torch.float64)  # [N]
    for i in range(1, k):  # static: K is a shape
        cand = x.index_select(0, draw(w * d2, i, trials))  # [L, D]
        sq = _sq_dist(xt, cand, x2).to(torch.float64)  # [L, N]
        new_d2 = sq.clamp_max_(d2)  # min(d2, sq) in place: no fresh [L, N] block per centre
        best = (new_d2 @ w).argmin().reshape(1)  # the candidate lowering Σ ω d² most
        centres.append(cand.index_select(0, best))
        d2 = new_d2.index_select(0, best)[0]
    return torch.cat(centres)  # [K, D]


def kmeans_plusplus(
    x: Tensor, n_components: int, key: Any = 0, sample_weight: Tensor | None = None, n_local_trials: int | None = None
) -> Tensor:
    """k-means++ centres [K, D] (Arthur & Vassilvitskii, 2007), greedy as scikit-learn's.

    The first centre is a point drawn ∝ ω. Each next one: draw ``n_local_trials`` candidates
    (default 2 + ⌊log K⌋, scikit-learn's; 1 is the plain algorithm) with probability
    ∝ ω·(squared distance to the nearest centre so far) and keep the one that lowers the
    weighted potential Σ ω·d² most. Draw j of centre i uses ``uniform(key, i, j)``.
    Pure and branch-free (``vmap`` it over datasets and keys); nothing is validated here.

    Args:
        x: data [N, D].
        n_components: K, at most N.
        key: int or 0-d int64 tensor.
        sample_weight: optional [N] non-negative weights.
        n_local_trials: candidates per centre; None: 2 + ⌊log K⌋.

    Returns:
        K rows of ``x`` [K, D], in the order chosen.

    >>> import torch, puregmm as pg
    >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> sorted(round(v) for v in pg.kmeans_plusplus(x, 2, key=0)[:, 0].tolist())  # one per cluster
    [0, 5]
    """
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if sample_weight is None else sample_weight
    k, trials = n_components, _trials(n_components, n_local_trials)
    return _kmeans_plusplus(x, x.mT.contiguous(), w.double(), _validate.key(key), k, trials)


SMALL_DIM = 16  # up to this D, squared distances are summed coordinate by coordinate


def _sq_dist(xt: Tensor, centres: Tensor, x2: Tensor | None = None) -> Tensor:
    """Squared distances [K, N] of centres [K, D] to the points xt [D, N] (coordinates
    major). For small D, one contiguous [K, N] pass per coordinate: no [K, N, D] temporary,
    no strided reduction; else ‖x‖² + ‖c‖² - 2 c·x as one GEMM on xt, clamped at 0 (rounding
    ~eps·‖x‖², small as the points are centred; ``cdist`` on the transposed view copied all
    the points on every call: 0.24 s per call at N = 1e6, D = 32). ``x2``: the points' squared
    norms [N] when the caller has them."""
    d = xt.shape[0]
    if d > SMALL_DIM:
        x2 = torch.einsum("dn,dn->n", xt, xt) if x2 is None else x2
        out = torch.addmm(x2, centres, xt, alpha=-2.0)  # [K, N]
        return out.add_((centres * centres).sum(1, keepdim=True)).clamp_min_(0.0)
    diff = xt[0] - centres[:, :1]  # [K, N]
    out = diff * diff
    for j in range(1, d):
        diff = xt[j] - centres[:, j : j + 1]
        out = out.addcmul(diff, diff)
    return out


def _sq_norms(xt: Tensor) -> Tensor | None:
    """‖x_n‖² [N] of points xt [D, N] where :func:`_sq_dist` uses them (D > SMALL_DIM), else None."""
    return torch.einsum("dn,dn->n", xt, xt) if xt.shape[0] > SMALL_DIM else None


def _nearest(xt: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Labels [N] of the nearest centre (the first on ties) and the squared distances [N]."""
    d2, labels = _sq_dist(xt, centres).min(0)
    return labels, d2


def _one_hot(labels: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """[K, N] one-hot columns (``F.one_hot`` checks values, which ``vmap`` forbids)."""
    return (labels == torch.arange(k, device=labels.device).unsqueeze(-1)).to(dtype)


def _relocate(labels: Tensor, d2: Tensor, w: Tensor | None, empty: Tensor) -> Tensor:
    """Labels [N] after scikit-learn's relocation of the empty clusters ``empty`` [K] bool
    (``_relocate_empty_clusters_dense``): the e-th empty cluster (by index) takes the row e-th
    farthest from its centre (``d2`` [N]; weight > 0 and distance > 0 only), which leaves its
    old cluster. Branch-free (vmaps)."""
    k = empty.shape[0]
    far_d2 = d2 if w is None else torch.where(w > 0, d2, -1.0)
    far_d2, far = torch.topk(far_d2, k)  # [K] the K farthest rows, descending
    targets = torch.argsort((~empty).to(torch.int64), stable=True)  # [K] the empty clusters first
    moved = (torch.arange(k, device=labels.device) < empty.sum()) & (far_d2 > 0)  # [K]
    return labels.scatter(0, far, torch.where(moved, targets, labels.index_select(0, far)))


def _lloyd_step(xt: Tensor, w: Tensor | None, centres: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Lloyd iteration on xt [D, N], scikit-learn's: (labels [N] of the nearest of
    ``centres``, the new centres [K, D], the squared shift Σ_k ‖c'_k - c_k‖² (0-d)).

    Empty clusters are relocated first (:func:`_relocate`); each cluster's new centre is then
    the weighted mean of its rows, and a cluster still empty keeps its centre. Branch-free
    (``vmap`` it over datasets); plain eager tensors skip the relocation's work when no
    cluster is empty (the usual case; the result is the same)."""
    k = centres.shape[0]
    labels, d2 = _nearest(xt, centres)
    r = _one_hot(labels, k, xt.dtype)  # [K, N]
    if w is not None:
        r = r * w
    counts = r.sum(-1, keepdim=True)  # [K, 1]
    empty = counts[:, 0] == 0  # [K]
    if not mo.plain(xt, w, centres) or bool(empty.any()):
        r = _one_hot(_relocate(labels, d2, w, empty), k, xt.dtype)
        if w is not None:
            r = r * w
        counts = r.sum(-1, keepdim=True)
    sums = r @ xt.mT  # [K, D]
    tiny = torch.finfo(xt.dtype).tiny
    new = torch.where(counts > 0, sums / counts.clamp_min(tiny), centres)
    return labels, new, (new - centres).square().sum()


def lloyd(
    x: Tensor,
    centres: Tensor,
    sample_weight: Tensor | None = None,
    max_iter: int = KMEANS_MAX_ITER,
    tol: float = KMEANS_TOL,
) -> Tensor:
    """Lloyd's k-means iterations on x [N, D] from ``centres`` [K, D], as scikit-learn's
    ``KMeans`` (:func:`_lloyd_step`; empty clusters relocated to the farthest points). Stops
    when the labels repeat, when the squared centre shift summed over clusters is at most
    ``tol`` times the data's mean per-dimension variance, or after ``max_iter`` iterations."""
    wn = torch.ones_like(x[:, 0]) if sample_weight is None else sample_weight  # [N]
    offset = (wn.unsqueeze(-1) * x).sum(0) / wn.sum()  # [D]: distances on centred data
    xc = x - offset
    limit = (tol * _data_variance(xc, sample_weight)).reshape(1)
    w = None if sample_weight is None else sample_weight.unsqueeze(0)
    run = _lloyd_loop(xc.mT.contiguous().unsqueeze(0), w, max_iter)
    return run((centres - offset).unsqueeze(0), limit)[0] + offset


def _lloyd_loop(xt: Tensor, w: Tensor | None, max_iter: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Batched Lloyd: xt [B, D, N], w [B, N] | None -> ((centres [B, K, D], limit [B]) -> final
    centres [B, K, D]).

    Dataset b stops, as scikit-learn's ``_kmeans_single_lloyd``, once its labels repeat (its
    centres are then a fixed point) or its squared centre shift Σ_k ‖c'_k - c_k‖² is at most
    ``limit[b]``, keeping the new centres; each pass advances only the datasets still moving."""
    b = xt.shape[0]
    step = _map(_lloyd_step, (0, 0 if w is not None else None, 0), b)
    sub = torch.func.vmap(_lloyd_step, in_dims=(0, 0 if w is not None else None, 0))

    def run(centres: Tensor, limit: Tensor) -> Tensor:
        labels, centres, shift = step(xt, w, centres)  # iteration 1: no labels to compare yet
        active = torch.nonzero(shift > limit).flatten()  # [A]
        for _ in range(max_iter - 1):
            if active.numel() == 0:
                break
            if active.numel() == b:
                new_labels, new_centres, shift = step(xt, w, centres)
            else:
                wa = None if w is None else w.index_select(0, active)
                new_labels, new_centres, shift = sub(xt.index_select(0, active), wa, centres.index_select(0, active))
            moving = (new_labels != labels.index_select(0, active)).any(-1) & (shift > limit.index_select(0, active))
            labels.index_copy_(0, active, new_labels)  # ours: fresh from the first step
            centres.index_copy_(0, active, new_centres)
            active = active[moving]
        return centres

    return run


def _seed(
    x: Tensor, w: Tensor | None, rows: Tensor, key: Tensor, given: Tensor | None, k: int, method: str, trials: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kernel: the data's (weighted) mean [D], the centred data [N, D], its transpose [D, N]
    and the seeds [K, D] (zeros for ``"random"``; ``given - mean`` for given means).
    ``rows`` [N] are the draw counters (row ranks among real rows)."""
    wn = torch.ones_like(x[:, 0]) if w is None else w  # [N]
    offset = (wn.unsqueeze(-1) * x).sum(0) / wn.sum()  # [D]
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
        centres = _kmeans_plusplus(xc, xt, wn.double(), key, k, trials)
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
    params = m_step(stats, start, reg_covar=reg_covar)
    new_means = centres if keep_means else params.means
    return GMMParams(params.logits, new_means + offset, params.scale, spec.name)


def _data_variance(xc: Tensor, w: Tensor | None) -> Tensor:
    """Kernel: the (weighted) mean per-dimension variance of centred data (0-d)."""
    wn = torch.ones_like(xc[:, 0]) if w is None else w
    return (wn.unsqueeze(-1) * xc.square()).sum(0).mean() / wn.sum()


def _map(fn: Callable[..., Any], in_dims: tuple[int | None, ...], b: int) -> Callable[..., Any]:
    """``vmap(fn, in_dims)`` for B > 1; for B = 1 a plain call on the first item (no vmap)."""
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
    constant family, the variances [B] it used."""
    b = run_keys.shape[0]
    xd = 0 if x.dim() == 3 else None
    wd = None if w is None else (0 if w.dim() == 2 else None)
    rd = 0 if rows.dim() == 2 else None
    trials = _trials(k, n_local_trials)

    def seed(xi: Tensor, wi: Tensor | None, ri: Tensor, key: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _seed(xi, wi, ri, key, given, k, method, trials)

    offset, xc, xt, centres = _map(seed, (xd, wd, rd, 0), b)(x, w, rows, run_keys)
    wb = None if w is None else (w if wd == 0 else w.expand(b, -1))
    lloyd_runs = method == "kmeans" and given is None
    constant = not get_family(family).learned
    data_var = _map(_data_variance, (0, wd), b)(xc, w) if lloyd_runs or (constant and variance is None) else None
    if lloyd_runs:
        assert data_var is not None
        centres = _lloyd_loop(xt, wb, max_iter)(centres, KMEANS_TOL * data_var)
    var = None
    if constant:
        var = data_var if variance is None else xc.new_full((b,), float(variance))

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
    finfo = torch.finfo(x.dtype)
    big = float(x.abs().amax())
    if big > finfo.max**0.5 / 16 or 0 < big < finfo.tiny**0.5 * 16:  # squares would overflow or underflow
        return _init_standardised(x, k, spec.name, key, method, variance, given, reg_covar, w)
    rows = torch.arange(n, device=x.device)
    params, var = _run(
        x, w, rows, key.reshape(1), k, spec.name, method=method, given=given, variance=variance, reg_covar=reg_covar
    )
    if var is not None and not bool(var[0] > 0):
        _zero_variance()
    return pytree.tree_map(lambda t: t[0], params)


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
