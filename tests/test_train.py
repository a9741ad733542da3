"""The pure training step: purity, determinism, the singularity reset, optimisers."""

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given

import puregmm as pg
from tests.strategies import mixtures, random_data, random_params


def clone_tree(tree):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def assert_trees_equal(a, b):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for i, (x, y) in enumerate(zip(la, lb)):
        assert torch.equal(x, y) or (torch.isnan(x).all() and torch.isnan(y).all()), f"leaf {i} differs"


@given(mixtures())
def test_step_is_pure_and_deterministic(case):
    params, x = case
    state = pg.init_state(params, key=3)
    before, x_before = clone_tree(state), x.clone()
    out1 = pg.step(state, x)
    out2 = pg.step(state, x)
    assert_trees_equal(state, before)  # inputs unchanged
    assert torch.equal(x, x_before)
    assert_trees_equal(out1, out2)  # same output for same input
    assert int(out1.step) == 1


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_all_nan_params_come_out_finite(family):
    params = random_params(family, 3, 2)
    x = random_data(60, 2)
    state = pg.init_state(params, key=1)
    nan_params = pytree.tree_map(lambda t: torch.full_like(t, float("nan")), params)
    if family == "constant":  # its variance is fixed at construction, never learned or reset
        nan_params = dataclasses.replace(nan_params, scale=params.scale)
    out = pg.step(dataclasses.replace(state, params=nan_params), x)
    assert all(torch.isfinite(t).all() for t in pytree.tree_leaves(out.params))
    assert int(out.n_resets) == 3
    assert all(torch.isfinite(t).all() for t in pytree.tree_leaves(out.opt_state.mu))
    # the reset means are data points of the batch
    assert all((x == m).all(-1).any() for m in out.params.means)


def test_reset_touches_only_the_bad_component():
    params = random_params("diagonal", 3, 2)
    x = random_data(60, 2)
    state = pg.step(pg.init_state(params, key=0), x)
    scale = state.params.scale.clone()
    scale[1] = 20.0  # variance e^-40: far below the floor
    bad = dataclasses.replace(state, params=dataclasses.replace(state.params, scale=scale))
    out = pg.step(bad, x)
    assert int(out.n_resets) == 1
    assert torch.all(out.opt_state.mu.means[1] == 0) and torch.all(out.opt_state.nu.scale[1] == 0)
    # components 0 and 2 get exactly the ordinary optimiser update
    grads = torch.func.grad(pg.loss)(bad.params, x)
    updates, _ = bad.optimizer.update(grads, bad.opt_state, bad.params)
    plain = pg.apply_updates(bad.params, updates)
    assert torch.equal(out.params.means[[0, 2]], plain.means[[0, 2]])
    assert torch.equal(out.params.scale[[0, 2]], plain.scale[[0, 2]])
    assert not torch.equal(out.params.means[1], plain.means[1])


def test_reset_all_resets_every_component():
    params = random_params("full", 3, 2)
    x = random_data(60, 2)
    state = pg.init_state(params, reset="all")
    means = params.means.clone()
    means[0, 0] = float("inf")
    out = pg.step(dataclasses.replace(state, params=dataclasses.replace(params, means=means)), x)
    assert int(out.n_resets) == 3


def test_reset_randomness_depends_on_key():
    params = random_params("full", 3, 2)
    x = random_data(500, 2)
    nan_params = pytree.tree_map(lambda t: torch.full_like(t, float("nan")), params)
    outs = [pg.step(dataclasses.replace(pg.init_state(params, key=k), params=nan_params), x) for k in (0, 0, 1)]
    assert torch.equal(outs[0].params.means, outs[1].params.means)
    assert not torch.equal(outs[0].params.means, outs[2].params.means)


def test_step_under_vmap_and_compile_equals_eager():
    ps = [random_params("full", 2, 2, seed=s) for s in range(3)]
    x = random_data(40, 2)
    states = [pg.init_state(p, key=s) for s, p in enumerate(ps)]
    stacked = pytree.tree_map(lambda *t: torch.stack(t), *states)
    batched = torch.func.vmap(pg.step, in_dims=(0, None))(stacked, x)
    for i, s in enumerate(states):
        one = pg.step(s, x)
        torch.testing.assert_close(batched.params.means[i], one.params.means, rtol=1e-12, atol=1e-14)
    compiled = torch.compile(pg.step, fullgraph=True)
    torch.testing.assert_close(compiled(states[0], x).params.scale, pg.step(states[0], x).params.scale)


def test_init_state_validates():
    p = random_params("full", 2, 2)
    with pytest.raises(ValueError, match="reset must be one of"):
        pg.init_state(p, reset="some")
    with pytest.raises(TypeError, match="optimizer"):
        pg.init_state(p, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        pg.init_state(dataclasses.replace(p, means=torch.full_like(p.means, float("nan"))))
    with pytest.raises(ValueError, match="dimension"):
        pg.step(pg.init_state(p), torch.zeros(5, 3, dtype=torch.float64))


@pytest.mark.parametrize("opt", [pg.adam(0.1), pg.sgd(0.1)])
def test_optimisers_reach_the_minimum_of_a_parabola(opt):
    target = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    params = {"p": torch.zeros(3, dtype=torch.float64)}
    state = opt.init(params)
    for _ in range(500):
        grads = torch.func.grad(lambda q: (q["p"] - target).square().sum())(params)
        updates, state = opt.update(grads, state, params)
        params = pg.apply_updates(params, updates)
    torch.testing.assert_close(params["p"], target, rtol=0, atol=1e-3)


def test_cosine_schedule_depends_on_step_count_only():
    sched = pg.cosine_decay(1.0, 100, alpha=0.1)
    assert float(sched(torch.tensor(0))) == 1.0
    assert abs(float(sched(torch.tensor(100))) - 0.1) < 1e-12
    assert float(sched(torch.tensor(1000))) == float(sched(torch.tensor(100)))


def test_cosine_schedule_warmup():
    sched = pg.cosine_decay(1.0, 100, warmup_steps=10)
    assert abs(float(sched(torch.tensor(0))) - 0.1) < 1e-12
    assert float(sched(torch.tensor(4))) < float(sched(torch.tensor(9))) <= 1.0
