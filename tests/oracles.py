"""Independent references for tests: scikit-learn's GaussianMixture and scipy densities.

Test-only: nothing in ``puregmm/`` imports this.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import puregmm as pg

SK_TYPE = {"full": "full", "tied": "tied", "diagonal": "diag", "isotropic": "spherical"}


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def sk_precisions(params: pg.GMMParams) -> np.ndarray:
    """``params``' precisions in scikit-learn's shape for its covariance type."""
    prec = to_np(pg.precisions(params))  # [K, D, D]
    kind = SK_TYPE[params.family]
    if kind == "full":
        return prec
    if kind == "tied":
        return prec[0]
    diag = np.diagonal(prec, axis1=-2, axis2=-1)  # [K, D]
    return diag if kind == "diag" else diag.mean(-1)


def sk_covariances_full(gm, k: int, d: int) -> np.ndarray:
    """scikit-learn's ``covariances_`` expanded to [K, D, D]."""
    cov = np.asarray(gm.covariances_)
    kind = gm.covariance_type
    if kind == "full":
        return cov
    if kind == "tied":
        return np.broadcast_to(cov, (k, d, d))
    if kind == "diag":
        return np.stack([np.diag(c) for c in cov])
    return np.stack([c * np.eye(d) for c in cov])


def sklearn_em(params: pg.GMMParams, x: torch.Tensor, n_steps: int, reg_covar: float = 1e-6):
    """scikit-learn's GaussianMixture after ``n_steps`` EM iterations started from ``params``."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(
        n_components=params.n_components,
        covariance_type=SK_TYPE[params.family],
        weights_init=to_np(pg.weights(params)),
        means_init=to_np(params.means),
        precisions_init=sk_precisions(params),
        reg_covar=reg_covar,
        tol=0.0,
        max_iter=n_steps,
        init_params="random_from_data",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(to_np(x))
    return gm


def sklearn_model(params: pg.GMMParams):
    """A fitted-looking GaussianMixture holding exactly ``params`` (for predict/bic/aic)."""
    from sklearn.mixture import GaussianMixture
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    kind = SK_TYPE[params.family]
    k, d = params.n_components, params.dim
    cov = to_np(pg.covariances(params))
    if kind == "tied":
        cov = cov[0]
    elif kind == "diag":
        cov = np.diagonal(cov, axis1=-2, axis2=-1).copy()
    elif kind == "spherical":
        cov = np.diagonal(cov, axis1=-2, axis2=-1).mean(-1)
    gm = GaussianMixture(n_components=k, covariance_type=kind)
    gm.weights_ = to_np(pg.weights(params))
    gm.means_ = to_np(params.means)
    gm.covariances_ = cov
    gm.precisions_cholesky_ = _compute_precision_cholesky(cov, kind)
    gm._set_parameters(gm._get_parameters())
    gm.n_features_in_ = d
    gm.converged_ = True
    return gm


def scipy_log_prob(params: pg.GMMParams, x: torch.Tensor) -> np.ndarray:
    """log p(x_n) [N] of the mixture, from scipy's multivariate normal."""
    w = to_np(pg.weights(params))
    mu = to_np(params.means)
    cov = to_np(pg.covariances(params))
    xn = to_np(x)
    comp = np.stack([np.log(w[j]) + multivariate_normal(mu[j], cov[j]).logpdf(xn) for j in range(len(w))], -1)
    return logsumexp(comp.reshape(len(xn), len(w)), axis=-1)


def mixture_data(
    k: int, d: int, n: int, *, separation: float = 6.0, seed: int = 0, dtype=torch.float64
) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` points from a random K-component mixture with random full covariances; labels."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * separation
    labels = rng.integers(0, k, size=n)
    out = np.empty((n, d))
    for j in range(k):
        a = rng.normal(size=(d, d)) * 0.5 + np.eye(d)
        idx = labels == j
        out[idx] = means[j] + rng.normal(size=(int(idx.sum()), d)) @ a.T
    return torch.as_tensor(out, dtype=dtype), labels


def random_params(family: str, k: int, d: int, *, seed: int = 0, dtype=torch.float64, spread: float = 2.0):
    """Random valid params of ``family`` (weights away from 0, covariances well conditioned)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, size=k)
    w /= w.sum()
    mu = rng.normal(size=(k, d)) * spread
    if family in ("full", "tied"):
        a = rng.normal(size=(k, d, d)) * 0.3 + np.eye(d)
        cov = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(d)
        if family == "tied":
            cov = np.broadcast_to(cov[0], (k, d, d)).copy()
    else:
        var = rng.uniform(0.5, 2.0, size=(k, d))
        if family in ("isotropic", "shared", "constant"):
            var = np.broadcast_to(var[:, :1], (k, d)).copy()
        if family in ("shared", "constant"):
            var = np.broadcast_to(var[:1], (k, d)).copy()
        cov = np.stack([np.diag(v) for v in var])
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return pg.from_moments(t(w), t(mu), t(cov), family=family)
