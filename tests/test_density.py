"""log_prob/loss against scipy, and under torch.func.grad, vmap and torch.compile."""

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import puregmm as pg
from tests import bounds
from tests.strategies import random_data, random_params


def scipy_log_prob(params: pg.GMMParams, x: torch.Tensor) -> np.ndarray:
    w = pg.weights(params).numpy()
    mu, cov = pg.means(params).numpy(), pg.covariances(params).numpy()
    per = [np.log(w[k]) + multivariate_normal(mu[k], cov[k]).logpdf(x.numpy()) for k in range(len(w))]
    return logsumexp(np.stack(per).reshape(len(w), -1), axis=0)


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("k,d", [(1, 1), (2, 3), (5, 4)])
def test_log_prob_matches_scipy(family, k, d):
    p = random_params(family, k, d, seed=k + d)
    x = random_data(64, d, seed=3)
    # tolerances: rounding bounds (tests/bounds.py), eps x condition x distance in widths
    np.testing.assert_allclose(
        pg.log_prob(p, x).numpy(), scipy_log_prob(p, x), rtol=0, atol=bounds.component_log_prob_atol(p, x)
    )
    loss_atol = 2 * bounds.log_lik_atol(p, x, n=x.shape[0])  # two routes to the mean
    torch.testing.assert_close(pg.loss(p, x), -pg.log_prob(p, x).mean(), rtol=0, atol=loss_atol)


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_grad_equals_backward(family):
    p = random_params(family, 3, 2, seed=5)
    x = random_data(50, 2, seed=6)
    g = torch.func.grad(pg.loss)(p, x)
    leaves = [t.detach().clone().requires_grad_(True) for t in pytree.tree_leaves(p)]
    pg.loss(pg.GMMParams(*leaves, family=family), x).backward()
    expected = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]  # constant: no grad
    bounds.assert_leaves_close(pytree.tree_leaves(g), expected, bounds.derivative_rtol(p, x), "gradient")
    if family == "constant":
        assert torch.all(g.scale == 0), "the constant family's variance must not be learned"


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_vmap_over_stacked_params_equals_loop(family):
    ps = [random_params(family, 3, 2, seed=s) for s in range(4)]
    stacked = pytree.tree_map(lambda *t: torch.stack(t), *ps)
    x = random_data(30, 2)
    got = torch.func.vmap(pg.loss, in_dims=(0, None))(stacked, x)
    loss_atol = max(2 * bounds.log_lik_atol(p, x, n=x.shape[0]) for p in ps)  # batched GEMMs: other orders
    torch.testing.assert_close(got, torch.stack([pg.loss(p, x) for p in ps]), rtol=0, atol=loss_atol)
    # log_prob also takes the batch dims directly
    row_atol = max(2 * bounds.log_lik_atol(p, x) for p in ps)
    torch.testing.assert_close(
        pg.log_prob(stacked, x), torch.stack([pg.log_prob(p, x) for p in ps]), rtol=0, atol=row_atol
    )


@pytest.mark.parametrize("family", ["full", "diagonal", "shared"])
def test_compiled_loss_and_grad_equal_eager(family):
    p = random_params(family, 3, 2, seed=7)
    x = random_data(40, 2)
    compiled = torch.compile(torch.func.grad_and_value(pg.loss), fullgraph=True)
    g_c, v_c = compiled(p, x)
    g_e, v_e = torch.func.grad_and_value(pg.loss)(p, x)
    # inductor's generated kernels sum and vectorise otherwise (per CPU): rounding bounds
    torch.testing.assert_close(v_c, v_e, rtol=0, atol=2 * bounds.log_lik_atol(p, x, n=x.shape[0]))
    bounds.assert_leaves_close(g_c, g_e, bounds.derivative_rtol(p, x), "gradient")


def test_nan_row_gives_nan_for_that_row_only():
    p = random_params("full", 2, 3)
    x = random_data(5, 3)
    x[2, 1] = float("nan")
    lp = pg.log_prob(p, x)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3, 4]]).all()


def test_shape_errors_are_value_errors():
    p = random_params("diagonal", 2, 3)
    with pytest.raises(ValueError, match="dimension D=2 but the params have D=3"):
        pg.log_prob(p, torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        pg.loss(p, torch.zeros(3, dtype=torch.float64))


def test_float32_follows_input_dtype():
    p = random_params("full", 2, 2).to(torch.float32)
    x = random_data(10, 2, dtype=torch.float32)
    assert pg.log_prob(p, x).dtype == torch.float32


def test_bounds_helpers_measure_what_they_say():
    """tests/bounds.py against direct computations: κ from eigvalsh, the width ratio from the
    narrowest standard deviation, γ_n, and a rounding bound that does cover a reordered sum."""
    p = random_params("full", 3, 2, seed=11)
    x = random_data(30, 2, seed=12)
    eig = torch.linalg.eigvalsh(pg.covariances(p))
    assert bounds.model_cond(p) == pytest.approx(float((eig[:, -1] / eig[:, 0]).max()), rel=1e-9)
    ratio = (torch.cdist(p.means, torch.cat([x, p.means])) / eig[:, :1].sqrt()).max()
    assert bounds.width_ratio(p, x) == pytest.approx(float(ratio), rel=1e-9)
    assert bounds.gamma(10) == pytest.approx(10 * bounds.eps(torch.float64), rel=1e-12)
    terms = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e3
    forward, backward = terms.sum(), terms.flip(0).cumsum(0)[-1]
    assert abs(float(forward - backward)) <= 2 * bounds.gamma(1000) * float(terms.abs().sum())
    with pytest.raises(ValueError, match="void"):
        bounds.gamma(2**60)
