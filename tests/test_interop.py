"""Interop: ``torch.distributions.MixtureSameFamily`` and scikit-learn's ``GaussianMixture``.

Oracles: torch's own ``log_prob`` and scikit-learn's ``score_samples``/``predict_proba``
evaluated on the converted objects, and mixtures built or fitted by those libraries directly.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from torch.distributions import (
    Categorical,
    Independent,
    Laplace,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

import puregmm as pg
from tests.strategies import mixtures, random_data, random_params

from_distribution, from_sklearn, to_distribution, to_sklearn = (
    pg.from_distribution,
    pg.from_sklearn,
    pg.to_distribution,
    pg.to_sklearn,
)  # the public API under test

sklearn_mixture = pytest.importorskip("sklearn.mixture")

SKLEARN_TYPE = {
    "full": "full",
    "tied": "tied",
    "diagonal": "diag",
    "isotropic": "spherical",
    "shared": "spherical",
    "constant": "spherical",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids waking a pool for every op on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_same_moments(a: pg.GMMParams, b: pg.GMMParams, rtol: float = 1e-10) -> None:
    assert a.family == b.family
    for name, f in (("weights", pg.weights), ("means", pg.means), ("covariances", pg.covariances)):
        torch.testing.assert_close(f(a), f(b), rtol=rtol, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def _stack(ps: list[pg.GMMParams], shape: tuple[int, ...]) -> pg.GMMParams:
    leaves = [torch.stack([getattr(p, f) for p in ps]).unflatten(0, shape) for f in ("logits", "means", "scale")]
    return pg.GMMParams(*leaves, family=ps[0].family)


# --- torch.distributions ---------------------------------------------------------------------


@given(mixtures())
def test_to_distribution_log_prob_equals(case):
    params, x = case
    d = to_distribution(params)
    assert isinstance(d, MixtureSameFamily)
    assert d.event_shape == (params.dim,) and d.batch_shape == ()
    torch.testing.assert_close(d.log_prob(x), pg.log_prob(params, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_to_distribution_component_type_and_dtype(family):
    params = random_params(family, 3, 2, seed=1, dtype=torch.float32)
    d = to_distribution(params)
    expected = MultivariateNormal if family in ("full", "tied") else Independent
    assert isinstance(d.component_distribution, expected)
    x = random_data(20, 2, seed=2, dtype=torch.float32)
    out = d.log_prob(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pg.log_prob(params, x), rtol=1e-5, atol=1e-5)


@given(mixtures())
def test_distribution_round_trip(case):
    params, x = case
    back = from_distribution(to_distribution(params), family=params.family)
    _assert_same_moments(back, params)
    torch.testing.assert_close(pg.log_prob(back, x), pg.log_prob(params, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_round_trips_float32(family):
    """float32 params come back as float32 with the same moments (checks run in float64)."""
    params = random_params(family, 3, 3, seed=2, dtype=torch.float32)
    for back in (from_distribution(to_distribution(params), family), from_sklearn(to_sklearn(params), family)):
        back = back if back.dtype == torch.float32 else back.to(torch.float32)
        _assert_same_moments(back, params, rtol=1e-5)
    assert from_distribution(to_distribution(params), family).dtype == torch.float32


@pytest.mark.parametrize(("family", "default"), [("full", "full"), ("tied", "full"), ("isotropic", "diagonal")])
def test_from_distribution_default_family(family, default):
    params = random_params(family, 2, 3, seed=4)
    assert from_distribution(to_distribution(params)).family == default


@pytest.mark.parametrize("family", ["full", "diagonal", "shared"])
def test_to_distribution_batched(family):
    """Params with batch dims [2, 3] give ``batch_shape == (2, 3)``; torch puts samples first."""
    ps = [random_params(family, 3, 2, seed=s) for s in range(6)]
    params = _stack(ps, (2, 3))
    d = to_distribution(params)
    assert d.batch_shape == (2, 3)
    x = random_data(10, 2, seed=9)  # [N, D]
    ours = pg.log_prob(params, x)  # [2, 3, N]
    theirs = d.log_prob(x[:, None, None, :])  # [N, 2, 3]
    torch.testing.assert_close(theirs.permute(1, 2, 0), ours, rtol=1e-10, atol=1e-10)
    back = from_distribution(d, family=family)
    assert back.batch_shape == (2, 3)
    for i, p in enumerate(ps):
        one = pg.GMMParams(*(getattr(back, f).flatten(0, 1)[i] for f in ("logits", "means", "scale")), family=family)
        _assert_same_moments(one, p)


def test_from_distribution_built_by_torch():
    """A mixture written directly with torch.distributions (covariance form) reads back exactly."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    cov = a @ a.mT + 0.3 * torch.eye(2, dtype=torch.float64)
    mean = torch.randn(3, 2, generator=g, dtype=torch.float64)
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    d = MixtureSameFamily(Categorical(probs=probs), MultivariateNormal(mean, covariance_matrix=cov))
    params = from_distribution(d)
    x = random_data(30, 2, seed=3)
    torch.testing.assert_close(pg.log_prob(params, x), d.log_prob(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pg.covariances(params), cov, rtol=1e-10, atol=1e-12)


def test_from_distribution_univariate_normal():
    """Components ``Normal`` with event shape () are read as D = 1."""
    loc = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    scale = torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64)
    d = MixtureSameFamily(Categorical(logits=torch.tensor([0.1, -0.4, 0.9], dtype=torch.float64)), Normal(loc, scale))
    params = from_distribution(d)
    assert (params.n_components, params.dim, params.family) == (3, 1, "diagonal")
    y = torch.linspace(-3, 4, 25, dtype=torch.float64)
    torch.testing.assert_close(pg.log_prob(params, y[:, None]), d.log_prob(y), rtol=1e-10, atol=1e-10)


def test_from_distribution_errors():
    params = random_params("full", 2, 2, seed=0)
    with pytest.raises(TypeError, match=r"d must be a torch.distributions.MixtureSameFamily; got MultivariateNormal"):
        from_distribution(MultivariateNormal(torch.zeros(2), torch.eye(2)))
    laplace = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Independent(Laplace(torch.zeros(2, 3), 1.0), 1))
    with pytest.raises(TypeError, match=r"component_distribution must be .*; got Independent"):
        from_distribution(laplace)
    with pytest.raises(ValueError, match=r"family 'diagonal' needs diagonal covariances"):
        from_distribution(to_distribution(params), family="diagonal")
    with pytest.raises(ValueError, match=r"unknown family 'nope'"):
        from_distribution(to_distribution(params), family="nope")
    with pytest.raises(TypeError, match=r"params must be GMMParams .*; got dict"):
        to_distribution({"means": torch.zeros(2, 2)})


# --- scikit-learn ----------------------------------------------------------------------------


@given(mixtures())
def test_to_sklearn_score_samples_equal(case):
    params, x = case
    gm = to_sklearn(params)
    assert gm.covariance_type == SKLEARN_TYPE[params.family]
    xn = x.numpy()
    np.testing.assert_allclose(gm.score_samples(xn), pg.log_prob(params, x).numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gm.predict_proba(xn), pg.predict_proba(params, x).numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("family", ["full", "tied", "diagonal", "isotropic"])
def test_to_sklearn_criteria_and_sample(family):
    """Where the parameter counts agree (not shared/constant), BIC and AIC agree too."""
    params = random_params(family, 3, 2, seed=5)
    x = random_data(40, 2, seed=6)
    gm = to_sklearn(params)
    assert gm.bic(x.numpy()) == pytest.approx(float(pg.bic(params, x)), rel=1e-10)
    assert gm.aic(x.numpy()) == pytest.approx(float(pg.aic(params, x)), rel=1e-10)
    samples, labels = gm.sample(7)
    assert samples.shape == (7, 2) and labels.shape == (7,)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_from_sklearn_fitted(cov_type):
    """A mixture fitted by scikit-learn gives the same log-density in puregmm."""
    x = random_data(120, 3, seed=8).numpy()
    gm = sklearn_mixture.GaussianMixture(3, covariance_type=cov_type, random_state=0).fit(x)
    params = from_sklearn(gm)
    family = {"full": "full", "tied": "tied", "diag": "diagonal", "spherical": "isotropic"}[cov_type]
    assert params.family == family and params.dtype == torch.float64
    ours = pg.log_prob(params, torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(ours, gm.score_samples(x), rtol=1e-10, atol=1e-10)
    assert from_sklearn(gm, dtype=torch.float32).dtype == torch.float32


@given(mixtures())
def test_sklearn_round_trip(case):
    params, _ = case
    _assert_same_moments(from_sklearn(to_sklearn(params), family=params.family), params)


def test_to_sklearn_refits():
    """The returned estimator is an ordinary GaussianMixture: it can fit again."""
    x = random_data(60, 2, seed=1).numpy()
    gm = to_sklearn(random_params("full", 3, 2, seed=2)).fit(x)
    assert gm.converged_ and gm.n_iter_ >= 1


def test_from_sklearn_shared_needs_equal_variances():
    x = random_data(90, 2, seed=3).numpy()
    gm = sklearn_mixture.GaussianMixture(3, covariance_type="spherical", random_state=0).fit(x)
    assert len(set(np.round(gm.covariances_, 6))) == 3  # unequal: no faithful shared mixture
    with pytest.raises(ValueError, match=r"family 'shared' needs the same covariance for every component"):
        from_sklearn(gm, family="shared")
    with pytest.raises(ValueError, match=r"family 'isotropic' needs diagonal covariances"):
        from_sklearn(sklearn_mixture.GaussianMixture(2).fit(x), family="isotropic")


def test_sklearn_errors():
    with pytest.raises(ValueError, match=r"gm is not fitted \(missing weights_, means_, covariances_\)"):
        from_sklearn(sklearn_mixture.GaussianMixture(2))
    with pytest.raises(TypeError, match=r"gm must be a sklearn.mixture.GaussianMixture; got BayesianGaussianMixture"):
        from_sklearn(sklearn_mixture.BayesianGaussianMixture(n_components=2))
    batched = _stack([random_params("full", 2, 2, seed=s) for s in range(2)], (2,))
    with pytest.raises(ValueError, match=r"params must be unbatched for to_sklearn; got batch dims \[2\]"):
        to_sklearn(batched)


def test_sklearn_missing_gives_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.mixture", None)  # makes `import sklearn.mixture` fail
    with pytest.raises(ImportError, match=r"pip install scikit-learn"):
        to_sklearn(random_params("full", 2, 2))
    with pytest.raises(ImportError, match=r"pip install scikit-learn"):
        from_sklearn(object())


# --- float32 sources: tolerances of their dtype (issue 12, defect 12) --------------------------


def _mixture_log_prob(w: np.ndarray, mu: np.ndarray, cov: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reference log p(x) [N] in float64 from scipy (covariances [K, D, D] as given)."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    comp = [np.log(w[j]) + multivariate_normal(mu[j], cov[j]).logpdf(x) for j in range(len(w))]
    return logsumexp(np.stack(comp, -1).reshape(len(x), len(w)), axis=-1)


def _log_density_atol(mu: np.ndarray, cov: np.ndarray, x: np.ndarray) -> float:
    """16·eps·D·κ·(D + r²): the rounding of a float64 log-density whose factorisation has
    relative accuracy D·κ·eps, at r narrowest widths from a mean (the data's farthest row)."""
    lam = np.linalg.eigvalsh(cov)  # [K, D]
    kappa = float((lam[:, -1] / lam[:, 0]).max())
    r2 = float((((x[:, None, :] - mu[None]) ** 2).sum(-1) / lam[None, :, 0]).max())
    d = mu.shape[-1]
    return 16 * np.finfo(np.float64).eps * d * kappa * (d + r2)


def _float32_data(name: str) -> np.ndarray:
    if name == "iris":  # scikit-learn's bundled data: its tied float32 fit is 52 ulps off symmetric
        from sklearn.datasets import load_iris

        return load_iris().data.astype(np.float32)
    # uncentred: the tied estimate E[xxᵀ] - Σ n_k μ_k μ_kᵀ / N rounds at |μ|² = 1e4 times |Σ|
    return (random_data(300, 3, seed=11, spread=1.0) + 100.0).numpy().astype(np.float32)


@pytest.mark.parametrize("data", ["iris", "offset"])
@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_from_sklearn_float32_fits(data, cov_type):
    """scikit-learn's own float32 fits convert, checked at float32's rounding: the params give the
    density of gm's mixture (its covariances' symmetric part) to float64 accuracy."""
    x = _float32_data(data)
    gm = sklearn_mixture.GaussianMixture(3, covariance_type=cov_type, random_state=0, max_iter=30).fit(x)
    assert gm.covariances_.dtype == np.float32
    params = from_sklearn(gm)
    assert params.family == {"diag": "diagonal", "spherical": "isotropic"}.get(cov_type, cov_type)
    k, d = gm.means_.shape
    from tests.oracles import sk_covariances_full

    cov = sk_covariances_full(gm, k, d).astype(np.float64)
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    mu, x64 = gm.means_.astype(np.float64), x.astype(np.float64)
    w = gm.weights_.astype(np.float64)  # float32 weights sum to 1 within rounding; params hold w / Σw
    want = _mixture_log_prob(w / w.sum(), mu, cov, x64)
    got = pg.log_prob(params, torch.as_tensor(x64)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=_log_density_atol(mu, cov, x64))
    assert from_sklearn(gm, dtype=torch.float32).dtype == torch.float32


def test_from_distribution_float32_one_ulp_asymmetry():
    """A float32 MultivariateNormal whose covariance is one ulp off symmetric (torch accepts it)
    converts, checked at float32's rounding."""
    cov = torch.tensor([[2.0, 0.6, 0.1], [0.6, 1.5, -0.3], [0.1, -0.3, 1.0]]).expand(2, 3, 3).clone()
    cov[:, 1, 0] = torch.nextafter(cov[:, 1, 0], torch.tensor(2.0))
    mean = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 1.0]])
    d = MixtureSameFamily(Categorical(probs=torch.tensor([0.4, 0.6])), MultivariateNormal(mean, covariance_matrix=cov))
    params = from_distribution(d)
    assert params.dtype == torch.float32
    want = 0.5 * (cov + cov.mT).double()
    kappa = float(torch.linalg.cond(want).max())
    atol = 16 * 3 * kappa * torch.finfo(torch.float32).eps * float(want.abs().max())
    torch.testing.assert_close(pg.covariances(params).double(), want, rtol=0, atol=atol)
