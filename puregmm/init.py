"""Initial params from data: k-means++ seeding (Arthur & Vassilvitskii, 2007).

All randomness comes from ``key`` through :mod:`puregmm.keys`: same key, same params.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from puregmm import _validate, keys
from puregmm.families import get_family
from puregmm.params import GMMParams, from_moments

METHODS = ("kmeans++",)


def kmeans_plusplus(x: Tensor, n_components: int, key: Any = 0) -> Tensor:
    """k-means++ centres [K, D]: each new centre is a data point drawn with probability
    proportional to its squared distance to the nearest centre chosen so far."""
    key = _validate.key(key)
    n = x.shape[0]
    first = keys.index(key, 0, n=n).to(x.device)
    centres = [x[first]]
    d2 = (x - centres[0]).square().sum(-1).to(torch.float64)
    for i in range(1, n_components):
        cum = torch.cumsum(d2, 0)
        u = keys.uniform(key, i).to(x.device) * cum[-1]
        pick = torch.searchsorted(cum, u.reshape(1), right=True).clamp_max(n - 1)[0]
        centres.append(x[pick])
        d2 = torch.minimum(d2, (x - x[pick]).square().sum(-1).to(torch.float64))
    return torch.stack(centres)


def init(
    data: Any,
    n_components: int,
    family: str = "full",
    *,
    key: Any = 0,
    method: str = "kmeans++",
    variance: float | None = None,
) -> GMMParams:
    """Initial params: k-means++ means, equal weights, each component's covariance from the
    points nearest to its mean (floored at 1e-6 of the data variance).

    Args:
        data: [N, D] array-like (integers are converted to floats).
        n_components: K, at most N.
        family: one of :data:`puregmm.FAMILIES`.
        key: int or 0-d int64 tensor.
        method: ``"kmeans++"``.
        variance: the fixed variance of the ``constant`` family; defaults to the data's mean
            per-dimension variance. Ignored by other families.

    Raises:
        ValueError: bad data (not 2-D, empty, NaN/Inf), K > N, unknown family or method.
    """
    spec = get_family(family)
    x = _validate.data(data, "data")
    k = _validate.n_components(n_components, x.shape[0])
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {METHODS}")
    centres = kmeans_plusplus(x, k, key)
    labels = torch.cdist(x, centres).argmin(-1)  # [N]
    return _from_labels(x, labels, k, spec.name, variance)


def _from_labels(x: Tensor, labels: Tensor, k: int, family: str, variance: float | None) -> GMMParams:
    """Moments of a hard partition, cast to the family's structure."""
    spec = get_family(family)
    n, d = x.shape
    resp = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [N, K]
    counts = resp.sum(0)  # [K]
    centre = x.mean(0)
    xc = x - centre
    means = (resp.mT @ xc) / counts.clamp_min(1).unsqueeze(-1)  # [K, D]
    diff = xc.unsqueeze(0) - means.unsqueeze(1)  # [K, N, D]
    cov = torch.einsum("nk,kni,knj->kij", resp, diff, diff) / counts.clamp_min(1)[:, None, None]
    cov = 0.5 * (cov + cov.mT)
    data_var = xc.square().mean(0)  # [D]
    floor = 1e-6 * data_var.mean().clamp_min(torch.finfo(x.dtype).tiny)
    empty = counts < 2
    cov = torch.where(empty[:, None, None], torch.diag_embed(data_var).expand_as(cov), cov)
    cov = cov + floor * torch.eye(d, dtype=x.dtype)
    if not spec.per_component:  # tied/shared/constant: pooled covariance
        cov = ((counts[:, None, None] * cov).sum(0) / n).expand_as(cov)
    if spec.scale_ndim < 2:
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
        if spec.scale_ndim == 0:
            var = var.mean(-1, keepdim=True).expand_as(var)
        if spec.name == "constant":
            value = float(data_var.mean()) if variance is None else float(variance)
            if not value > 0:
                raise ValueError(f"variance must be positive; got {variance!r}")
            var = torch.full_like(var, value)
        cov = torch.diag_embed(var)
    weights = (counts + 1e-3) / (counts + 1e-3).sum()
    return from_moments(weights, means + centre, cov, family=spec.name)
