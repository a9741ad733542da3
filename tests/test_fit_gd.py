"""Gradient-descent fits: exact maximum likelihood, robustness, validation, determinism."""

import math

import numpy as np
import pytest
import torch

import puregmm as pg


def gaussian_ml_loss(x: torch.Tensor, family: str) -> float:
    """The exact one-Gaussian maximum-likelihood mean NLL of ``x`` for a covariance family."""
    n, d = x.shape
    xc = x - x.mean(0)
    if family == "full":
        logdet = torch.logdet(xc.T @ xc / n)
    elif family == "diagonal":
        logdet = torch.log(xc.square().mean(0)).sum()
    else:
        logdet = d * torch.log(xc.square().mean())
    return float(0.5 * (d * math.log(2 * math.pi) + logdet + d))


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_component_reaches_exact_maximum_likelihood(family, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, generator=gen, dtype=torch.float64)
    x = x @ torch.tensor([[2.0, 0.0, 0.0], [0.8, 0.5, 0.0], [0.0, 0.3, 4.0]], dtype=torch.float64) + 50.0
    # start away from the optimum (the k-means init of one component would already be exact):
    # mean one standard deviation off, variances three times too large
    var = x.var(0)
    cov = torch.diag(var if family != "isotropic" else var.mean().expand(3)) * 3
    start = pg.from_moments(torch.ones(1), (x.mean(0) + x.std(0))[None], cov[None], family=family).to(dtype)
    result = pg.fit(x.to(dtype), 1, family, method="gd", init_params=start)
    assert result.converged and result.n_steps > 50
    assert abs(float(result.loss) - gaussian_ml_loss(x, family)) < 2e-3
    assert result.params.dtype == dtype and result.history.shape == (result.n_steps,)


def test_fit_on_duplicated_points_survives():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(300, 2, generator=gen), torch.full((200, 2), 0.5)])
    result = pg.fit(x, 4, "full", method="gd", max_steps=1500)
    assert math.isfinite(float(result.loss))
    assert all(torch.isfinite(t).all() for t in (pg.weights(result.params), pg.covariances(result.params)))


def test_fit_is_deterministic_and_key_dependent():
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(100, 2, generator=gen) + 4, torch.randn(100, 2, generator=gen) - 4])
    a = pg.fit(x, 3, "diagonal", method="gd", max_steps=200, key=5)
    b = pg.fit(x, 3, "diagonal", method="gd", max_steps=200, key=5)
    c = pg.fit(x, 3, "diagonal", method="gd", max_steps=200, key=6)
    assert torch.equal(a.params.means, b.params.means) and torch.equal(a.history, b.history)
    assert not torch.equal(a.params.means, c.params.means)


def test_minibatch_fit_and_integer_data():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(400, 2, generator=gen) * 10).round().to(torch.int64)
    result = pg.fit(x, 2, "full", method="gd", batch_size=64, max_steps=300, key=1)
    assert result.params.dtype == torch.get_default_dtype()
    assert result.n_steps == 300 and math.isfinite(float(result.loss))


def test_max_steps_without_convergence_warns():
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(4))
    with pytest.warns(pg.ConvergenceWarning):
        r = pg.fit(x, 2, method="gd", max_steps=10)
    assert not r.converged and r.n_steps == 10


@pytest.mark.parametrize(
    "data, k, family, match",
    [
        (np.zeros((5,)), 1, "full", "2-D"),
        (np.zeros((0, 2)), 1, "full", "non-empty"),
        (np.array([[0.0, 1.0], [np.nan, 2.0]]), 1, "full", "NaN"),
        (np.array([[0.0, 1.0], [np.inf, 2.0]]), 1, "full", "NaN or Inf"),
        (np.zeros((3, 2)), 4, "full", "more than the number of samples"),
        (np.zeros((3, 2)), 1, "spherical", "unknown family"),
    ],
)
def test_bad_input_is_a_value_error(data, k, family, match):
    with pytest.raises(ValueError, match=match):
        pg.fit(data, k, family)
    if family in pg.FAMILIES:
        with pytest.raises(ValueError, match=match):
            pg.init(data, k, family)


def test_constant_family_keeps_its_variance():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    start = pg.init(x, 2, "constant", variance=2.0)
    result = pg.fit(x, 2, "constant", method="gd", init_params=start, max_steps=200)
    torch.testing.assert_close(pg.covariances(result.params), 2.0 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
