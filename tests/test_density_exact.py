"""The chunked density and its hand-written gradient against independent references.

References (test-only): scipy's ``multivariate_normal`` and a naive per-component loop written
here from the covariances (Cholesky of Σ_k, triangular solve), differentiated by plain autograd.
float64 agrees within rounding bounds (tests/bounds.py: eps x condition x distance in widths x
terms, so on any CPU); the float32 loss agrees with float64 within 1e-5·max(1, |loss|) (the
requirement), also on data with a large common offset. Small chunk sizes force many chunks and a ragged last
chunk, so every test below also exercises the chunk loop of the forward and the backward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from torch import Tensor

import puregmm as pg
from puregmm import _fused
from tests import bounds
from tests.strategies import mixtures, random_data, random_params


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of 7 rows: many chunks and a ragged last one on every data set below."""
    monkeypatch.setattr(_fused, "MIN_CHUNK_ROWS", 7)
    monkeypatch.setattr(_fused, "MAX_CHUNK_ROWS", 7)


# --- independent references -------------------------------------------------------------------


def naive_component_log_prob(params: pg.GMMParams, x: Tensor) -> Tensor:
    """log w_k + log N(x | μ_k, Σ_k) [N, K], one component at a time, from Σ_k = L_k L_kᵀ."""
    w, mu, cov = pg.weights(params), params.means, pg.covariances(params)
    d = x.shape[-1]
    cols = []
    for k in range(params.n_components):
        chol = torch.linalg.cholesky(cov[k])
        sol = torch.linalg.solve_triangular(chol, (x - mu[k]).mT, upper=False)  # [D, N]
        maha = sol.square().sum(0)
        log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
        cols.append(torch.log(w[k]) - 0.5 * (d * math.log(2 * math.pi) + log_det + maha))
    return torch.stack(cols, -1)


def naive_loss(params: pg.GMMParams, x: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    if params.family == "constant":  # its variance is fixed: no gradient flows into it
        params = pg.GMMParams(params.logits, params.means, params.scale.detach(), params.family)
    lp = torch.logsumexp(naive_component_log_prob(params, x), -1)
    return -lp.mean() if sample_weight is None else -(lp * sample_weight).sum() / sample_weight.sum()


def scipy_log_prob(params: pg.GMMParams, x: Tensor) -> np.ndarray:
    w = pg.weights(params).detach().numpy()
    mu, cov = params.means.detach().numpy(), pg.covariances(params).detach().numpy()
    per = [np.log(w[k]) + multivariate_normal(mu[k], cov[k]).logpdf(x.numpy()) for k in range(len(w))]
    return logsumexp(np.stack(per).reshape(len(w), -1), axis=0)


def assert_trees_close(got, expected, rtol, what="gradient"):
    """Leaf by leaf, relative to the leaf's largest entry (entries near 0 get the same scale)."""
    names = ("logits", "means", "scale")
    for name, a, b in zip(names, pytree.tree_leaves(got), pytree.tree_leaves(expected)):
        scale = b.abs().max().clamp_min(1e-300)
        err = float(((a - b).abs() / scale).max())
        assert err <= rtol, f"{what} of {name}: max error {err:.3g} relative to max |{name}| (rtol {rtol:g})"


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("k,d", [(1, 1), (3, 2), (4, 5)])
def test_log_prob_matches_scipy_and_naive_loop(family, k, d):
    p = random_params(family, k, d, seed=10 * k + d)
    x = random_data(45, d, seed=1)
    got = pg.log_prob(p, x)
    atol = bounds.component_log_prob_atol(p, x)
    np.testing.assert_allclose(got.numpy(), scipy_log_prob(p, x), rtol=0, atol=atol)
    torch.testing.assert_close(got, torch.logsumexp(naive_component_log_prob(p, x), -1), rtol=0, atol=atol)
    torch.testing.assert_close(pg.component_log_prob(p, x), naive_component_log_prob(p, x), rtol=0, atol=atol)


@settings(max_examples=25)
@given(mixtures())
def test_random_mixtures_match_the_naive_loop(case):
    params, x = case
    atol = bounds.component_log_prob_atol(params, x)
    torch.testing.assert_close(
        pg.log_prob(params, x), torch.logsumexp(naive_component_log_prob(params, x), -1), rtol=0, atol=atol
    )


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic", "tied"])
def test_float32_loss_within_1e_5_of_float64_with_large_offset(family):
    """Data and means around 1e4 in every coordinate; both dtypes see the same (f32) numbers."""
    k, d = 16, 16
    p64 = random_params(family, k, d, seed=3, spread=2.0)
    p64 = pg.GMMParams(p64.logits, p64.means + 1e4, p64.scale, family)
    x64 = random_data(300, d, seed=4, spread=2.0) + 1e4
    p32, x32 = p64.to(torch.float32), x64.to(torch.float32)
    p64, x64 = p32.to(torch.float64), x32.to(torch.float64)  # exactly the float32 values
    reference = naive_loss(p64, x64)
    torch.testing.assert_close(pg.loss(p64, x64), reference, rtol=0, atol=2 * bounds.log_lik_atol(p64, x64, n=300))
    tol = 1e-5 * max(1.0, abs(float(reference)))  # the requirement (issue 4 target 6), not a rounding bound
    err = abs(float(pg.loss(p32, x32)) - float(reference))
    assert err <= tol, f"float32 loss off by {err:.3g} (allowed {tol:.3g})"


def test_nan_row_gives_nan_for_that_row_only():
    p = random_params("full", 3, 4)
    x = random_data(30, 4)
    x[11, 2] = float("nan")
    lp = pg.log_prob(p, x)
    assert torch.isnan(lp[11])
    assert torch.isfinite(lp[torch.arange(30) != 11]).all()


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_gradient_matches_autograd_through_naive_loop(family):
    p = random_params(family, 4, 3, seed=5)
    x = random_data(40, 3, seed=6)
    got = torch.func.grad(pg.loss)(p, x)
    expected = torch.func.grad(naive_loss)(p, x)
    rtol = bounds.derivative_rtol(p, x)
    assert_trees_close(got, expected, rtol)
    if family == "constant":
        assert torch.all(got.scale == 0), "the constant family's variance must not be learned"
    # the same through .backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in pytree.tree_leaves(p)]
    pg.loss(pg.GMMParams(*leaves, family=family), x).backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    assert_trees_close(pg.GMMParams(*grads, family=family), expected, rtol)


@pytest.mark.parametrize("family", ["full", "diagonal", "shared"])
def test_weighted_loss_and_data_gradient_match_naive(family):
    p = random_params(family, 3, 2, seed=8)
    x = random_data(33, 2, seed=9)
    sw = torch.rand(33, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rtol = bounds.derivative_rtol(p, x)
    assert_trees_close(torch.func.grad(pg.loss)(p, x, sw), torch.func.grad(naive_loss)(p, x, sw), rtol)
    gx = torch.func.grad(pg.loss, argnums=1)(p, x, sw)
    gx_naive = torch.func.grad(naive_loss, argnums=1)(p, x, sw)
    bounds.assert_leaves_close(gx, gx_naive, rtol, "data gradient", floor=0.0)


def log_prob_loss(params: pg.GMMParams, x: Tensor) -> Tensor:
    """The loss through ``log_prob`` (the per-row Function) instead of ``loss``."""
    return -pg.log_prob(params, x).mean()


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
@pytest.mark.parametrize("ours", [pg.loss, log_prob_loss], ids=["loss", "log_prob"])
def test_second_derivatives_match_naive(family, ours):
    """d/dθ of ‖∇loss‖² and of the loss after two unrolled SGD steps (double backward)."""
    p = random_params(family, 3, 2, seed=11)
    x = random_data(30, 2, seed=12)

    def grad_norm(loss_fn):
        def f(params):
            return sum(g.square().sum() for g in pytree.tree_leaves(torch.func.grad(loss_fn)(params, x)))

        return torch.func.grad(f)(p)

    rtol = bounds.derivative_rtol(p, x, order=2)
    assert_trees_close(grad_norm(ours), grad_norm(naive_loss), rtol=rtol, what="d‖∇L‖²")

    def unrolled(loss_fn):
        def f(params):
            for _ in range(2):
                g = torch.func.grad(loss_fn)(params, x)
                params = pytree.tree_map(lambda a, b: a - 0.1 * b, params, g)
            return loss_fn(params, x)

        return torch.func.grad(f)(p)

    assert_trees_close(unrolled(ours), unrolled(naive_loss), rtol=rtol, what="d(unrolled loss)")
    # plain autograd double backward agrees too
    leaves = [t.detach().clone().requires_grad_(True) for t in pytree.tree_leaves(p)]
    q = pg.GMMParams(*leaves, family=family)
    gs = torch.autograd.grad(ours(q, x), leaves, create_graph=True)
    hs = torch.autograd.grad(sum(g.square().sum() for g in gs), leaves)
    assert_trees_close(pg.GMMParams(*hs, family=family), grad_norm(naive_loss), rtol=rtol, what="autograd d‖∇L‖²")


def test_vmap_over_stacked_params_of_loss_and_grad_equals_loop():
    ps = [random_params("full", 3, 2, seed=s) for s in range(3)]
    stacked = pytree.tree_map(lambda *t: torch.stack(t), *ps)
    x = random_data(25, 2)
    got = torch.func.vmap(torch.func.grad_and_value(pg.loss), in_dims=(0, None))(stacked, x)
    for i, p in enumerate(ps):
        g, v = torch.func.grad_and_value(naive_loss)(p, x)
        torch.testing.assert_close(got[1][i], v, rtol=0, atol=2 * bounds.log_lik_atol(p, x, n=x.shape[0]))
        assert_trees_close(pytree.tree_map(lambda t, i=i: t[i], got[0]), g, bounds.derivative_rtol(p, x))


def test_batched_data_with_batched_params():
    ps = [random_params("diagonal", 2, 3, seed=s) for s in range(2)]
    stacked = pytree.tree_map(lambda *t: torch.stack(t), *ps)
    xs = torch.stack([random_data(20, 3, seed=s) for s in range(2)])
    got = pg.log_prob(stacked, xs)
    for i, p in enumerate(ps):
        want = torch.logsumexp(naive_component_log_prob(p, xs[i]), -1)
        torch.testing.assert_close(got[i], want, rtol=0, atol=bounds.component_log_prob_atol(p, xs[i]))


def test_compiled_loss_and_grad_equal_eager_over_many_chunks():
    p = random_params("full", 3, 2, seed=13)
    x = random_data(60, 2, seed=14)  # > MAX_COMPILED_CHUNKS chunks of 7 rows
    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad_and_value(pg.loss), fullgraph=True)
    g_c, v_c = compiled(p, x)
    g_e, v_e = torch.func.grad_and_value(pg.loss)(p, x)
    # inductor's generated kernels sum and vectorise otherwise (per CPU): rounding bounds
    torch.testing.assert_close(v_c, v_e, rtol=0, atol=2 * bounds.log_lik_atol(p, x, n=x.shape[0]))
    assert_trees_close(g_c, g_e, rtol=bounds.derivative_rtol(p, x))


def test_backward_keeps_nothing_of_size_n_times_k():
    """The autograd graph of the loss saves the data, [K, ...] params and [N] values only."""
    k, d, n = 5, 3, 200
    p = random_params("full", k, d)
    leaves = [t.detach().clone().requires_grad_(True) for t in pytree.tree_leaves(p)]
    x = random_data(n, d)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pg.loss(pg.GMMParams(*leaves, family="full"), x)
    big = [s for s in saved if math.prod(s) >= n * k and s != (n, d)]
    assert not big, f"tensors of size >= N*K saved for backward: {big}"
    loss.backward()


@pytest.mark.parametrize("family", ["full", "diagonal"])
def test_forward_mode_and_hessian_match_naive(family):
    """torch.func.jvp of log_prob and torch.func.hessian (jacfwd of jacrev) of the loss."""
    p = random_params(family, 3, 2, seed=15)
    x = random_data(20, 2, seed=16)
    leaves, spec = pytree.tree_flatten(p)
    tangents = tuple(torch.randn_like(t) for t in leaves)

    def on_leaves(fn):
        return lambda *ls: fn(pytree.tree_unflatten(list(ls), spec), x)

    def naive_log_prob(params, x):
        return torch.logsumexp(naive_component_log_prob(params, x), -1)

    got = torch.func.jvp(on_leaves(pg.log_prob), tuple(leaves), tangents)[1]
    expected = torch.func.jvp(on_leaves(naive_log_prob), tuple(leaves), tangents)[1]
    bounds.assert_leaves_close(got, expected, bounds.derivative_rtol(p, x), "jvp")
    h = torch.func.hessian(on_leaves(pg.loss), argnums=(0, 1, 2))(*leaves)
    h_naive = torch.func.hessian(on_leaves(naive_loss), argnums=(0, 1, 2))(*leaves)
    bounds.assert_leaves_close(h, h_naive, bounds.derivative_rtol(p, x, order=2), "hessian")
