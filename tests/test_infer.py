"""Inference API against scikit-learn; sampling statistics; BIC/AIC with weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import puregmm as pg
from tests import bounds
from tests.oracles import SK_TYPE, mixture_data, random_params, sklearn_model, to_np

SK_FAMILIES = tuple(SK_TYPE)


@pytest.mark.parametrize("family", SK_FAMILIES)
def test_inference_equals_sklearn(family: str) -> None:
    x, _ = mixture_data(3, 3, 250, separation=2.0, seed=1)
    p = pg.fit(x, 3, family, method="em").params  # a fitted mixture
    gm = sklearn_model(p)
    xn = to_np(x)
    # scikit-learn factorises and sums its own way: each log-density within the rounding bound,
    # responsibilities move by at most half of it (2δ·r(1 - r)), the criteria by 2N times it
    row = bounds.component_log_prob_atol(p, x)
    n = x.shape[0]
    np.testing.assert_allclose(to_np(pg.score_samples(p, x)), gm.score_samples(xn), rtol=0, atol=row)
    mean_atol = row + bounds.log_lik_atol(p, x, n=n)
    np.testing.assert_allclose(float(pg.score(p, x)), gm.score(xn), rtol=0, atol=mean_atol)
    np.testing.assert_allclose(to_np(pg.predict_proba(p, x)), gm.predict_proba(xn), rtol=0, atol=row)
    labels = pg.predict(p, x)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(labels.numpy(), gm.predict(xn))
    assert pg.n_parameters(p) == gm._n_parameters()
    np.testing.assert_allclose(float(pg.bic(p, x)), gm.bic(xn), rtol=0, atol=2 * n * mean_atol)
    np.testing.assert_allclose(float(pg.aic(p, x)), gm.aic(xn), rtol=0, atol=2 * n * mean_atol)
    # precisions from the covariances (scikit-learn) or the factor (ours): D·κ·eps relative
    factor = bounds.SLACK * 3 * bounds.model_cond(p) * bounds.eps(x.dtype)
    prec = to_np(pg.precisions(p))
    bounds.assert_leaves_close(prec, _sk_full(gm.precisions_, family, 3), factor, "precisions", floor=0.0)
    chol = to_np(pg.precision_cholesky(p))
    bounds.assert_leaves_close(chol, _sk_full(gm.precisions_cholesky_, family, 3), factor, "cholesky", floor=0.0)


def _sk_full(a: np.ndarray, family: str, d: int) -> np.ndarray:
    """scikit-learn's per-type precision arrays expanded to [K, D, D]."""
    a = np.asarray(a)
    if family == "full":
        return a
    if family == "tied":
        return np.broadcast_to(a, (3, d, d))
    if family == "diagonal":
        return np.stack([np.diag(v) for v in a])
    return np.stack([v * np.eye(d) for v in a])


def test_n_parameters_every_family() -> None:
    k, d = 3, 4
    expected = {
        "full": k * d * (d + 1) // 2,
        "tied": d * (d + 1) // 2,
        "diagonal": k * d,
        "isotropic": k,
        "shared": 1,
        "constant": 0,
    }
    for family, cov in expected.items():
        assert pg.n_parameters(random_params(family, k, d)) == cov + k * d + k - 1


def test_score_bic_aic_weights_equal_repeated_rows() -> None:
    x, _ = mixture_data(2, 2, 50, seed=2)
    counts = torch.arange(50) % 3
    p = random_params("diagonal", 2, 2, seed=3)
    rep = x.repeat_interleave(counts, 0)
    w = counts.to(x.dtype)
    mean_atol = bounds.log_lik_atol(p, rep, n=rep.shape[0])  # one weighted sum, grouped otherwise
    for fn, atol in (
        (pg.score, mean_atol),
        (pg.bic, 2 * rep.shape[0] * mean_atol),
        (pg.aic, 2 * rep.shape[0] * mean_atol),
    ):
        torch.testing.assert_close(fn(p, x, sample_weight=w), fn(p, rep), rtol=0, atol=atol)
    with pytest.raises(ValueError, match="non-negative"):
        pg.score(p, x, sample_weight=-w)
    with pytest.raises(ValueError, match="all zero"):
        pg.bic(p, x, sample_weight=torch.zeros(50, dtype=x.dtype))
    with pytest.raises(ValueError, match="shape"):
        pg.aic(p, x, sample_weight=w[:3])


def test_inference_accepts_arrays_and_checks_dimension() -> None:
    p = random_params("full", 2, 3)
    xn = np.random.default_rng(0).normal(size=(10, 3))
    torch.testing.assert_close(
        pg.score_samples(p, xn), pg.log_prob(p, torch.as_tensor(xn)), rtol=0, atol=0
    )  # one function
    with pytest.raises(ValueError, match="D=2"):
        pg.predict(p, xn[:, :2])


def test_batched_params_predict_and_proba() -> None:
    x, _ = mixture_data(2, 2, 30, seed=4)
    ps = [random_params("full", 2, 2, seed=s) for s in range(3)]
    stacked = pytree.tree_map(lambda *t: torch.stack(t), *ps)
    proba, labels = pg.predict_proba(stacked, x), pg.predict(stacked, x)
    for i, p in enumerate(ps):
        # batched kernels: each log-density within 2·log_lik_atol, so each probability within that
        torch.testing.assert_close(proba[i], pg.predict_proba(p, x), rtol=0, atol=2 * bounds.log_lik_atol(p, x))
        assert torch.equal(labels[i], pg.predict(p, x))


# --- sampling -------------------------------------------------------------------------------


def test_sample_is_deterministic_in_the_key_and_shuffled() -> None:
    p = random_params("full", 3, 2, seed=5)
    x1, l1 = pg.sample(p, 500, key=7)
    x2, l2 = pg.sample(p, 500, key=7)
    x3, _ = pg.sample(p, 500, key=torch.tensor(8))
    assert torch.equal(x1, x2) and torch.equal(l1, l2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (500, 2) and x1.dtype == p.dtype and l1.dtype == torch.int64
    switches = int((l1[1:] != l1[:-1]).sum())
    assert switches > 200, "labels look grouped by component"
    with pytest.raises(ValueError, match="positive int"):
        pg.sample(p, 0, key=0)


@pytest.mark.parametrize("family", ["full", "diagonal", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sample_moments_match_params(family: str, dtype: torch.dtype) -> None:
    """200k draws: frequencies within 5σ, means and covariances within a few standard errors.
    The full covariance is strongly anisotropic and correlated, so a transposed or inverted
    factor (U instead of U⁻ᵀ, U⁻¹ᵀ…) moves entries by O(1) and fails."""
    d = 3
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    mu = torch.tensor([[0.0, 0.0, 0.0], [5.0, -3.0, 1.0], [-4.0, 2.0, 8.0]], dtype=torch.float64)
    if family == "full":
        a = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [-1.0, 0.8, 0.3]], dtype=torch.float64)
        cov = torch.stack([a @ a.mT, (a @ a.mT).flip(0, 1), torch.diag(torch.tensor([0.5, 2.0, 1.0]))])
        cov = cov.to(torch.float64)
    elif family == "diagonal":
        cov = torch.diag_embed(torch.tensor([[0.3, 2.0, 1.0], [4.0, 0.5, 1.0], [1.0, 1.0, 9.0]], dtype=torch.float64))
    else:
        cov = (2.5 * torch.eye(d, dtype=torch.float64)).expand(3, d, d)
    p = pg.from_moments(w, mu, cov, family=family).to(dtype)
    n = 200_000
    x, labels = pg.sample(p, n, key=3)
    x = x.double()
    counts = torch.bincount(labels, minlength=3).double()
    sigma = torch.sqrt(n * w * (1 - w))
    assert bool(((counts - n * w).abs() < 5 * sigma).all()), counts
    for j in range(3):
        xj = x[labels == j]
        cov_j = torch.cov(xj.mT)
        scale = torch.sqrt(torch.diagonal(cov[j]))
        se = 5 * scale / math.sqrt(len(xj))  # 5 standard errors of the mean
        assert bool(((xj.mean(0) - mu[j]).abs() < se).all()), (j, xj.mean(0), mu[j])
        # 6 standard errors of a covariance entry, and the rounding of the draws in their dtype
        rounding = bounds.SLACK * bounds.eps(dtype) * float(xj.abs().max()) ** 2
        tol = 6 * torch.outer(scale, scale) * math.sqrt(2.0 / len(xj)) + rounding
        assert bool(((cov_j - cov[j]).abs() < tol).all()), (j, cov_j, cov[j])
