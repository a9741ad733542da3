"""Initial params from data, as scikit-learn's ``GaussianMixture._initialize``: pick
responsibilities, then run the one M-step (:func:`puregmm.em.m_step`) on them.

Methods (``method=``):

=====================  ===================================================================
``"kmeans++"``         greedy k-means++ seeds (Arthur & Vassilvitskii, 2007), hard-assign each
                       point to its nearest seed (the default)
``"kmeans"``           k-means++ seeds, then Lloyd iterations until the labels settle
                       (at most ``KMEANS_MAX_ITER``), hard-assign
``"random"``           responsibilities uniform at random, normalised per row
``"random_from_data"`` K distinct data points drawn uniformly as seeds, hard-assign
=====================  ===================================================================

``means=`` skips the seeding: points are hard-assigned to the given means, weights and
covariances come from the M-step and the means are kept as given (scikit-learn's
``means_init``). All randomness comes from ``key`` through :mod:`puregmm.keys`: same key, same
params. Distances are computed on data centred by its mean, so a large common offset costs
no accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from puregmm import _validate, keys
from puregmm.em import m_step, responsibility_stats
from puregmm.families import get_family
from puregmm.params import GMMParams

METHODS = ("kmeans++", "kmeans", "random", "random_from_data")
KMEANS_MAX_ITER = 100


def kmeans_plusplus(
    x: Tensor, n_components: int, key: Any = 0, sample_weight: Tensor | None = None, n_local_trials: int | None = None
) -> Tensor:
    """k-means++ centres [K, D] (Arthur & Vassilvitskii, 2007), greedy as scikit-learn's.

    The first centre is a point drawn ∝ ω. Each next one: draw ``n_local_trials`` candidates
    (default 2 + ⌊log K⌋, scikit-learn's; 1 is the plain algorithm) with probability
    ∝ ω·(squared distance to the nearest centre so far) and keep the one that lowers the
    weighted potential Σ ω·d² most. Draw j of centre i uses ``uniform(key, i, j)``.
    """
    key = _validate.key(key)
    n, k = x.shape[0], n_components
    trials = 2 + int(math.log(k)) if n_local_trials is None else max(1, int(n_local_trials))
    w = torch.ones(n, dtype=torch.float64, device=x.device) if sample_weight is None else sample_weight.double()

    def draw(mass: Tensor, i: int, m: int) -> Tensor:
        cum = torch.cumsum(mass, 0)
        if not bool(cum[-1] > 0):  # every weighted point already is a centre: draw ∝ ω
            cum = torch.cumsum(w, 0)
        u = keys.uniform(key, i, torch.arange(m)).to(x.device) * cum[-1]
        return torch.searchsorted(cum, u, right=True).clamp_max(n - 1)  # [m]

    first = draw(w, 0, 1)
    centres = [x.index_select(0, first)[0]]
    d2 = (x - centres[0]).square().sum(-1).to(torch.float64)  # [N]
    for i in range(1, k):
        cand = draw(w * d2, i, trials)  # [L]
        cd2 = torch.stack([(x - x[c]).square().sum(-1) for c in cand.tolist()]).double()  # [L, N]
        new_d2 = torch.minimum(d2, cd2)  # [L, N]
        best = int((new_d2 * w).sum(-1).argmin())
        centres.append(x[cand[best]])
        d2 = new_d2[best]
    return torch.stack(centres)


def _nearest(x: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Labels [N] of the nearest centre and the squared distances [N] to it."""
    dist = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist")  # [N, K]
    d, labels = dist.min(-1)
    return labels, d.square()


def lloyd(x: Tensor, centres: Tensor, sample_weight: Tensor | None = None, max_iter: int = KMEANS_MAX_ITER) -> Tensor:
    """Lloyd's k-means iterations from ``centres`` [K, D] until the labels stop changing.
    An empty cluster keeps its centre."""
    k = centres.shape[0]
    w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if sample_weight is None else sample_weight
    labels = None
    for _ in range(max_iter):
        new_labels, _ = _nearest(x, centres)
        if labels is not None and bool((new_labels == labels).all()):
            break
        labels = new_labels
        counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add(0, labels, w)
        sums = torch.zeros_like(centres).index_add(0, labels, x * w.unsqueeze(-1))
        centres = torch.where((counts > 0).unsqueeze(-1), sums / counts.clamp_min(1e-300).unsqueeze(-1), centres)
    return centres


def init(
    data: Any,
    n_components: int,
    family: str = "full",
    *,
    key: Any = 0,
    method: str = "kmeans++",
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
        method: ``"kmeans++"`` (default), ``"kmeans"``, ``"random"`` or ``"random_from_data"``.
        variance: the fixed variance of the ``constant`` family; defaults to the data's mean
            per-dimension variance. Ignored by other families.
        means: optional initial means [K, D]; replaces the seeding (``method`` is ignored).
        reg_covar: added to the diagonal of the initial covariances.
        sample_weight: optional [N] non-negative weights (seeding ∝ ω, weighted M-step).

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

    wn = torch.ones(n, dtype=x.dtype, device=x.device) if w is None else w
    offset = (wn.unsqueeze(-1) * x).sum(0) / wn.sum()  # the data's (weighted) mean
    xc = x - offset
    if given is None and method == "random":
        resp = keys.uniform(key, 0, torch.arange(n)[:, None], torch.arange(k)).to(dtype=x.dtype, device=x.device)
        resp = resp / resp.sum(-1, keepdim=True)  # [N, K]
        centres = torch.zeros(k, d, dtype=x.dtype, device=x.device)
        score = -xc.square().sum(-1)
    else:
        if given is not None:
            centres = given - offset
        elif method == "random_from_data":
            u = keys.uniform(key, 0, torch.arange(n)).to(x.device)
            u = torch.where(wn > 0, u, torch.full_like(u, 2.0))  # zero-weight rows last
            centres = xc.index_select(0, torch.argsort(u, stable=True)[:k])
        else:
            centres = kmeans_plusplus(xc, k, key, w)
            if method == "kmeans":
                centres = lloyd(xc, centres, w)
        labels, dist2 = _nearest(xc, centres)
        resp = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [N, K]
        score = -dist2

    if spec.learned:
        scale = torch.zeros(spec.scale_shape(k, d), dtype=x.dtype, device=x.device)
    else:
        scale = -0.5 * torch.log(torch.tensor(_constant_variance(xc, wn, variance), dtype=x.dtype, device=x.device))
    start = GMMParams(torch.zeros(k, dtype=x.dtype, device=x.device), centres, scale, spec.name)
    stats = responsibility_stats(xc, resp, centres, spec.name, w, score)
    params = m_step(stats, start, reg_covar=reg_covar)
    new_means = (given - offset) if given is not None else params.means
    return GMMParams(params.logits, new_means + offset, params.scale, spec.name)


def _constant_variance(xc: Tensor, w: Tensor, variance: float | None) -> float:
    """The constant family's variance: ``variance`` or the mean per-dimension variance."""
    if variance is not None:
        if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not 0 < variance < math.inf:
            raise ValueError(f"variance must be a positive number; got {variance!r}")
        return float(variance)
    value = float((w.unsqueeze(-1) * xc.square()).sum(0).mean() / w.sum())
    if not value > 0:
        raise ValueError(
            "the constant family fixes the variance at the data's variance, which is 0 here "
            "(all points identical); pass variance=<positive float>"
        )
    return value
