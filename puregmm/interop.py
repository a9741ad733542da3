"""Conversions to and from ``torch.distributions`` and scikit-learn's ``GaussianMixture``.

Each pair is exact up to rounding: the converted object gives the same log-density.

* :func:`to_distribution` returns ``MixtureSameFamily(Categorical, MultivariateNormal)`` for
  full/tied params and ``MixtureSameFamily(Categorical, Independent(Normal, 1))`` for the
  diagonal and scalar families (cheaper, and it keeps the axis-aligned structure). Batched
  params become a distribution with ``batch_shape == params.batch_shape``.
* :func:`to_sklearn` maps full → ``"full"``, tied → ``"tied"``, diagonal → ``"diag"`` and
  isotropic/shared/constant → ``"spherical"``. For shared/constant the spherical variances are
  all equal, so nothing is lost, and ``from_sklearn(gm, family="shared")`` reads them back
  (with a check). Each family names its type (``Family.sklearn_covariance_type``); this
  module holds only scikit-learn's layouts, so a new family needs no change here.
* Values from a float32 source (a float32 fit or distribution) are checked with float32's
  rounding tolerances and converted in float64.
* scikit-learn is optional: it is imported inside the functions that need it.

What is not kept: the learned/fixed distinction (``constant`` comes back as whatever
``family=`` says), and scikit-learn's fit settings and history (``n_iter_`` is 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from puregmm import _validate
from puregmm.families import FAMILIES, get_family
from puregmm.params import GMMParams, covariances, moments_to_params, precision_cholesky, weights

# scikit-learn's layouts by its covariance_type (a family names its own: Family.sklearn_covariance_type).
# covariances_, precisions_ and precisions_cholesky_ share one layout: [K, D, D] -> it, and back.
_SKLEARN_PACK: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "full": lambda m: m,  # [K, D, D]
    "tied": lambda m: m[0],  # [D, D]
    "diag": lambda m: np.diagonal(m, 0, -2, -1).copy(),  # [K, D]
    "spherical": lambda m: m[:, 0, 0].copy(),  # [K]
}
_SKLEARN_UNPACK: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "full": lambda c, k, d: c,
    "tied": lambda c, k, d: c.expand(k, d, d),
    "diag": lambda c, k, d: torch.diag_embed(c),
    "spherical": lambda c, k, d: c[:, None, None] * torch.eye(d, dtype=c.dtype),
}


def _default_family(cov_type: str) -> str:
    """The first family (in :data:`FAMILIES` order) that scikit-learn's ``cov_type`` maps to."""
    return next(f for f in FAMILIES if get_family(f).sklearn_covariance_type == cov_type)


def _coarsest(*arrays: Any) -> torch.dtype:
    """The floating dtype of largest eps among ``arrays`` (what their values were rounded to)."""
    dtypes = [torch.from_numpy(np.empty(0, np.asarray(a).dtype)).dtype for a in arrays]
    floats = [t for t in dtypes if t.is_floating_point] or [torch.float64]
    return max(floats, key=lambda t: torch.finfo(t).eps)


def _check_params(params: Any) -> GMMParams:
    return _validate.params(params)


# --- torch.distributions ---------------------------------------------------------------------


def to_distribution(params: GMMParams) -> MixtureSameFamily:
    """The mixture as a ``torch.distributions.MixtureSameFamily`` with the same ``log_prob``.

    Args:
        params: mixture params, optionally batched (leaves ``[B..., ...]``).

    Returns:
        ``d`` with ``d.batch_shape == B...`` and ``d.event_shape == (D,)``:
        ``d.log_prob(x)`` equals ``pg.log_prob(params, x)`` for ``x [N, D]`` (or ``[N, B..., D]``,
        torch's sample-first layout, against ``pg.log_prob``'s ``[B..., N, D]``).

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.3, 0.7]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    >>> d = pg.to_distribution(p); x = torch.randn(4, 2)
    >>> torch.allclose(d.log_prob(x), pg.log_prob(p, x))
    True
    """
    params = _check_params(params)
    mix = Categorical(logits=params.logits)  # [B..., K]
    u = precision_cholesky(params)  # [B..., K, D, D], precision = U Uᵀ
    return MixtureSameFamily(mix, params.spec.torch_component(params.means, u))


def _with_masked(w: Tensor, mean: Tensor, cov: Tensor, family: str, rounding: torch.dtype) -> GMMParams:
    """:func:`puregmm.from_moments` (tolerances of ``rounding``), a zero weight giving a masked
    component (logit -inf)."""
    zero = w == 0
    if bool(zero.all()):
        raise ValueError("every mixture weight is zero")
    live = torch.where(zero, torch.ones_like(w), w)
    p = moments_to_params(live / live.sum(), mean, cov, family, rounding)
    return GMMParams(torch.where(zero, torch.full_like(w, -math.inf), torch.log(w)), p.means, p.scale, p.family)


def from_distribution(d: Any, family: str | None = None) -> GMMParams:
    """Params from a ``MixtureSameFamily`` of Gaussians (the inverse of :func:`to_distribution`).

    Args:
        d: ``MixtureSameFamily`` whose components are ``MultivariateNormal``,
            ``Independent(Normal, 1)`` or a univariate ``Normal`` (read as D = 1).
        family: the family to build; ``None`` means ``"full"`` for ``MultivariateNormal`` and
            ``"diagonal"`` otherwise. The covariances must have its structure (checked as in
            :func:`puregmm.from_moments`).

    Returns:
        :class:`GMMParams` with ``batch_shape == d.batch_shape``.

    Raises:
        TypeError: ``d`` is not a mixture of Gaussians of these kinds.
        ValueError: the covariances lack the structure of ``family``. A component of weight
            0 becomes a masked one (logit -inf, :func:`puregmm.pad_components`).

    >>> import torch, puregmm as pg
    >>> from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
    >>> d = MixtureSameFamily(Categorical(torch.tensor([0.3, 0.7])),
    ...                       Independent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 1))
    >>> p = pg.from_distribution(d)
    >>> p, pg.weights(p)
    (GMMParams(family='diagonal', K=2, D=3, dtype=float32, device=cpu), tensor([0.3000, 0.7000]))
    """
    if not isinstance(d, MixtureSameFamily):
        raise TypeError(f"d must be a torch.distributions.MixtureSameFamily; got {type(d).__name__}")
    comp = d.component_distribution
    if isinstance(comp, MultivariateNormal):
        mean, cov, default = comp.mean, comp.covariance_matrix, "full"
    elif isinstance(comp, Independent) and isinstance(comp.base_dist, Normal) and comp.reinterpreted_batch_ndims == 1:
        mean, cov, default = comp.mean, torch.diag_embed(comp.variance), "diagonal"
    elif isinstance(comp, Normal):
        mean, cov, default = comp.mean.unsqueeze(-1), comp.variance[..., None, None], "diagonal"
    else:
        raise TypeError(
            "d.component_distribution must be MultivariateNormal, Independent(Normal, 1) or Normal; "
            f"got {type(comp).__name__}"
        )
    family = default if family is None else family
    get_family(family)
    dtype = mean.dtype  # build in float64 with the tolerances of the source dtype, then cast
    _validate.compute_dtype(dtype, "d.mean")
    mean, cov = mean.to(torch.float64), cov.to(torch.float64)
    w = torch.softmax(d.mixture_distribution.logits.to(torch.float64), -1)  # [B..., K]
    batch = tuple(d.batch_shape)
    mean = mean.expand(batch + mean.shape[-2:])
    cov = cov.expand(batch + cov.shape[-3:])
    k, dim = mean.shape[-2:]
    rows = zip(w.reshape(-1, k), mean.reshape(-1, k, dim), cov.reshape(-1, k, dim, dim))
    flat = [_with_masked(wi, mi, ci, family, dtype) for wi, mi, ci in rows]
    if not batch:
        return flat[0].to(dtype)
    return pytree.tree_map(lambda *leaves: torch.stack(leaves).unflatten(0, batch).to(dtype), *flat)


# --- scikit-learn ----------------------------------------------------------------------------


def _gaussian_mixture_class() -> Any:
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as err:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError(
            "puregmm's scikit-learn interop needs scikit-learn, which is not installed; "
            "install it with `pip install scikit-learn`"
        ) from err
    return GaussianMixture


def to_sklearn(params: GMMParams) -> Any:
    """A fitted-looking ``sklearn.mixture.GaussianMixture`` with the same ``score_samples``.

    Sets ``weights_``, ``means_``, ``covariances_``, ``precisions_cholesky_``, ``precisions_``
    (float64, in scikit-learn's layout for the mapped ``covariance_type``; see the module
    docstring), ``n_features_in_``, ``converged_=True``, ``n_iter_=0`` and ``lower_bound_=nan``,
    so ``score_samples``, ``predict``, ``predict_proba``, ``sample``, ``bic`` and ``aic`` work.

    Masked components (logit -inf, :func:`puregmm.pad_components`) are left out: scikit-learn has
    no such notion and would take the log of their zero weight.

    Args:
        params: unbatched mixture params.

    Returns:
        a ``GaussianMixture`` with K' = the number of live components.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``params`` has batch dims (convert one mixture at a time).

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2),
    ...                     family="shared")
    >>> pg.to_sklearn(p).covariance_type
    'spherical'
    """
    GaussianMixture = _gaussian_mixture_class()
    params = _check_params(params)
    if params.batch_shape:
        raise ValueError(
            f"params must be unbatched for to_sklearn; got batch dims {list(params.batch_shape)} "
            "(convert each mixture separately)"
        )
    live = params.logits != -math.inf
    if not bool(live.all()):  # drop masked components (a tied/shared scale is not per component)
        idx = torch.nonzero(live).flatten()
        scale = params.spec.select_components(params.scale, idx, 0)
        params = GMMParams(params.logits.index_select(0, idx), params.means.index_select(0, idx), scale, params.family)
    k, d = params.n_components, params.dim

    def np64(t: Tensor) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=torch.float64).numpy().copy()

    cov = np64(covariances(params))  # [K, D, D]
    u = np64(precision_cholesky(params))  # [K, D, D]
    cov_type = params.spec.sklearn_covariance_type
    pack = _SKLEARN_PACK[cov_type]

    gm = GaussianMixture(n_components=k, covariance_type=cov_type)
    gm.weights_ = np64(weights(params))
    gm.means_ = np64(params.means)
    gm.covariances_ = pack(cov)
    gm.precisions_cholesky_ = pack(u)
    gm.precisions_ = pack(u @ np.swapaxes(u, -1, -2))
    gm.n_features_in_ = d
    gm.converged_ = True
    gm.n_iter_ = 0
    gm.lower_bound_ = float("nan")
    gm.lower_bounds_ = []
    return gm


def from_sklearn(gm: Any, family: str | None = None, *, dtype: torch.dtype = torch.float64) -> GMMParams:
    """Params from a fitted ``sklearn.mixture.GaussianMixture`` (same ``score_samples``).

    Args:
        gm: a fitted ``GaussianMixture`` of any ``covariance_type``.
        family: the family to build; ``None`` maps full → full, tied → tied,
            diag → diagonal, spherical → isotropic. ``"shared"``/``"constant"`` need equal
            spherical variances.
        dtype: floating dtype of the returned leaves (default float64, scikit-learn's).

    Returns:
        unbatched :class:`GMMParams` with ``gm``'s weights, means and covariances.

    Raises:
        ImportError: scikit-learn is not installed.
        TypeError: ``gm`` is not a ``GaussianMixture``.
        ValueError: ``gm`` is not fitted, or its covariances lack the structure of ``family``.

    >>> import numpy as np, puregmm as pg
    >>> from sklearn.mixture import GaussianMixture
    >>> x = np.random.default_rng(0).normal(size=(200, 2)) + np.repeat([[0.0, 0.0], [5.0, 5.0]], 100, axis=0)
    >>> gm = GaussianMixture(2, covariance_type="diag", random_state=0).fit(x)
    >>> p = pg.from_sklearn(gm)
    >>> p, np.allclose(pg.score_samples(p, x).numpy(), gm.score_samples(x))
    (GMMParams(family='diagonal', K=2, D=2, dtype=float64, device=cpu), True)
    """
    GaussianMixture = _gaussian_mixture_class()
    if not isinstance(gm, GaussianMixture):
        raise TypeError(f"gm must be a sklearn.mixture.GaussianMixture; got {type(gm).__name__}")
    missing = [a for a in ("weights_", "means_", "covariances_") if not hasattr(gm, a)]
    if missing:
        raise ValueError(f"gm is not fitted (missing {', '.join(missing)}); call gm.fit(X) first")
    cov_type = gm.covariance_type
    if cov_type not in _SKLEARN_UNPACK:
        raise ValueError(f"gm.covariance_type must be one of {tuple(_SKLEARN_UNPACK)}; got {cov_type!r}")
    family = _default_family(cov_type) if family is None else family
    get_family(family)
    dtype = _validate.float_dtype(dtype) or torch.float64

    f64 = torch.float64  # build in float64 with the tolerances of gm's own dtype (float32 fits), then cast
    rounding = _coarsest(gm.means_, gm.covariances_)
    mu = torch.as_tensor(np.asarray(gm.means_), dtype=f64)  # [K, D]
    k, d = mu.shape
    cov = _SKLEARN_UNPACK[cov_type](torch.as_tensor(np.asarray(gm.covariances_), dtype=f64), k, d)  # [K, D, D]
    w = torch.as_tensor(np.asarray(gm.weights_), dtype=f64)
    return moments_to_params(w, mu, cov, family, rounding).to(dtype)
