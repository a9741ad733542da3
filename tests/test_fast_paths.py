"""The top-level fast paths give the numbers of the general ones, bit for bit (issue 13).

At the top level (eager, no ``torch.func`` transform, no outer graph) the loss's autograd
Function skips ``Function.apply``'s signature binding and, for a first-order backward, hands
back its forward's gradient statistics; ``step`` takes its gradient with ``torch.autograd.grad``
instead of ``torch.func.grad_and_value`` and skips the reset's ``where``s when nothing is
reset. Each is the same arithmetic with less machinery around it, so the results must be
equal, not close.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import puregmm as pg
from puregmm import _fused, _fused_autograd, train
from tests import bounds
from tests.strategies import random_data, random_params


def leaves_of(p: pg.GMMParams) -> list[torch.Tensor]:
    return [p.logits, p.means, p.scale]


@pytest.fixture(params=["one chunk", "chunks"])
def chunked(request, monkeypatch):
    """One chunk (the plain autograd path) or chunks of 7 rows (the autograd Functions)."""
    if request.param == "chunks":
        monkeypatch.setattr(_fused, "MIN_CHUNK_ROWS", 7)
        monkeypatch.setattr(_fused, "MAX_CHUNK_ROWS", 7)
    return request.param


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_loss_backward_equals_torch_func_grad(family, chunked):
    """``loss(...).backward()`` = ``torch.func.grad(loss)``: bit for bit over chunks (the same
    Function, applied fast, first-order backward); within the two routes' rounding bound on one
    chunk, where eager mode takes the Function and the transform plain autograd."""
    p, x = random_params(family, 3, 2, seed=1), random_data(40, 2, seed=2)
    expected = torch.func.grad(pg.loss)(p, x)
    own = [t.detach().clone().requires_grad_() for t in leaves_of(p)]
    pg.loss(pg.GMMParams(*own, family=family), x).backward()
    got = pg.GMMParams(*[torch.zeros_like(t) if t.grad is None else t.grad for t in own], family=family)
    if chunked == "chunks":
        bounds.assert_trees_equal(got, expected)
    else:
        rtol = bounds.derivative_rtol(p, x)
        bounds.assert_leaves_close(leaves_of(got), leaves_of(expected), rtol, "eager against torch.func gradient")


def test_fast_apply_equals_function_apply_with_second_derivatives():
    """The fast ``apply`` records the same graph as ``Function.apply``: the gradient of a
    gradient (create_graph, through :class:`Grads`) is the same too."""
    w = pg.density.whitening(random_params("full", 3, 2, seed=3))
    x, n = random_data(30, 2, seed=4), 30
    g = x.new_full((n,), 1.0 / n)
    results = []
    for call in (lambda *a: _fused_autograd.NLL.apply(*a), lambda *a: _fused_autograd.apply(_fused_autograd.NLL, *a)):
        a = w.a.detach().clone().requires_grad_()
        out = call(x, w.center, a, w.const.detach(), g, w.dense, 7, False)[0]
        (da,) = torch.autograd.grad(out, a, create_graph=True)
        (dda,) = torch.autograd.grad(da.square().sum(), a)
        results.append((out, da, dda))
    bounds.assert_trees_equal(results[0], results[1])


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_step_gradient_equals_grad_and_value(family, chunked):
    p, x = random_params(family, 3, 2, seed=5), random_data(40, 2, seed=6)
    w = torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for weight in (None, w):
        got = train._grad_and_value(p, x, weight, None)
        bounds.assert_trees_equal(got, torch.func.grad_and_value(pg.loss)(p, x, weight))


def test_step_inside_an_outer_graph_takes_the_transform_path():
    """Params that require grad (a user differentiating through ``step`` with autograd) keep their
    graph through the gradient: the derivative of the stepped means is torch.func's, I - lr·H."""
    p, x = random_params("diagonal", 2, 2, seed=8), random_data(30, 2, seed=9)
    state = pg.init_state(p, pg.sgd(0.1))

    def stepped(means):
        return pg.step(dataclasses.replace(state, params=dataclasses.replace(p, means=means)), x).params.means.sum()

    expected = torch.func.grad(stepped)(p.means)
    means = p.means.clone().requires_grad_()
    (got,) = torch.autograd.grad(stepped(means), means)
    assert not torch.allclose(expected, torch.ones_like(expected))  # the Hessian term is there
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("broken", [False, True])
def test_reset_skip_equals_the_branch_free_reset(family, broken, monkeypatch):
    """Eagerly, a step with nothing to reset skips the reset's ``where``s: the same state as
    the branch-free form (forced here by reporting a transform), with and without a reset."""
    p, x = random_params(family, 3, 2, seed=10), random_data(50, 2, seed=11)
    state = pg.step(pg.init_state(p, key=2), x)
    if broken:
        means = state.params.means.clone()
        means[1, 0] = float("nan")
        state = dataclasses.replace(state, params=dataclasses.replace(state.params, means=means))
    fast = pg.step(state, x)
    monkeypatch.setattr(train, "_top_level", lambda *t: False)
    slow = pg.step(state, x)
    bounds.assert_trees_equal(fast, slow)
    assert (int(fast.n_resets) > 0) == broken
