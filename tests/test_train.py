"""The pure training step: purity, determinism, the singularity reset, optimisers."""

import dataclasses
import math

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given

import puregmm as pg
from tests.bounds import assert_trees_equal
from tests.strategies import mixtures, random_data, random_params


def clone_tree(tree):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


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
    out = pg.step(dataclasses.replace(state, params=nan_params), x)  # the constant family's scale too
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


# --- the variance floor and the collapse rule (issue 12 item 11) ----------------------------------

FLOOR = 1e-6  # init_state's default min_variance
CAP = -0.5 * math.log(FLOOR)  # raw (-½ log variance) of a direction at the floor
ONE_DIRECTION = {"full": (0, 1, 1), "tied": (1, 1), "diagonal": (0, 1)}  # component 0 (if any), direction 1
LEARNED = [f for f in pg.FAMILIES if f != "constant"]


def plain_update(state, x):
    """The optimiser's update alone, without the floor or the reset: (params, optimiser state)."""
    grads = torch.func.grad(pg.loss)(state.params, x)
    updates, opt_state = state.optimizer.update(grads, state.opt_state, state.params)
    return pg.apply_updates(state.params, updates), opt_state


def with_scale(state, scale):
    return dataclasses.replace(state, params=dataclasses.replace(state.params, scale=scale))


@pytest.mark.parametrize("family", list(ONE_DIRECTION))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_direction_below_the_floor_is_held_not_reset(family, dtype):
    """A variance below the floor in one direction (a feature constant within a cluster) is
    clamped to the floor there; nothing is reset, everything else gets the plain update."""
    params = random_params(family, 3, 3, dtype=dtype)
    x = random_data(60, 3, dtype=dtype)
    state = pg.init_state(params, key=0)
    scale = params.scale.clone()
    scale[ONE_DIRECTION[family]] = 20.0  # variance e^-40 in that direction only
    state = with_scale(state, scale)
    out = pg.step(state, x)
    assert int(out.n_resets) == 0
    plain, plain_opt = plain_update(state, x)
    expected = plain.scale.clone()
    expected[ONE_DIRECTION[family]] = CAP  # rounded to dtype, as the clamp rounds it
    assert torch.equal(out.params.scale, expected)
    assert torch.equal(out.params.means, plain.means) and torch.equal(out.params.logits, plain.logits)
    assert_trees_equal(out.opt_state, plain_opt)  # no moment zeroed


@pytest.mark.parametrize("family", LEARNED)
def test_a_component_at_the_floor_in_every_direction_is_reset(family):
    """Below the floor in every direction (a component sitting on a point): reset. One
    component for a per-component scale; every component when the scale is shared."""
    params = random_params(family, 3, 3)
    x = random_data(60, 3)
    state = pg.init_state(params, key=0)
    scale = params.scale.clone()
    per_component = params.spec.per_component
    target = scale[1] if per_component else scale
    (target.diagonal() if target.dim() == 2 else target).fill_(20.0)
    state = with_scale(state, scale)
    out = pg.step(state, x)
    reset = [1] if per_component else [0, 1, 2]
    assert int(out.n_resets) == len(reset)
    assert all((x == m).all(-1).any() for m in out.params.means[reset])  # new means are data points
    new_scale = out.params.scale[1] if per_component else out.params.scale
    directions = new_scale.diagonal() if new_scale.dim() == 2 else new_scale
    assert (directions < CAP - 1).all()  # the batch's spread, far above the floor
    nu_scale = out.opt_state.nu.scale[1] if per_component else out.opt_state.nu.scale
    assert (out.opt_state.mu.means[reset] == 0).all() and (nu_scale == 0).all()  # moments zeroed
    if per_component:  # the others get the plain update
        plain, _ = plain_update(state, x)
        assert torch.equal(out.params.means[[0, 2]], plain.means[[0, 2]])
        assert torch.equal(out.params.scale[[0, 2]], plain.scale[[0, 2]])


def test_a_nan_constant_variance_is_reset_and_a_small_one_is_kept():
    """The constant family's fixed variance: NaN is reset to the batch's mean spread (issue 12
    item 13); a finite one, even below the floor, is never changed (it is not learned)."""
    params = random_params("constant", 3, 2)
    x = random_data(60, 2)
    state = pg.init_state(params, key=0)
    out = pg.step(with_scale(state, torch.tensor(float("nan"), dtype=torch.float64)), x)
    assert int(out.n_resets) == 3
    var = (x - x.mean(0)).square().mean(0).mean()  # the reset's spread, mean over dimensions
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(out.params.scale, -0.5 * torch.log(var), rtol=0, atol=16 * 60 * eps)
    small = torch.tensor(20.0, dtype=torch.float64)  # variance e^-40, far below the floor
    out = pg.step(with_scale(state, small), x)
    assert int(out.n_resets) == 0 and torch.equal(out.params.scale, small)


def cluster_with_a_constant_feature():
    """Two clusters 8 apart in D = 3; feature 2 is constant (0.5) within the first."""
    gen = torch.Generator().manual_seed(7)
    shift = torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64)
    a = torch.randn(150, 3, generator=gen, dtype=torch.float64) + shift
    a[:, 2] = 0.5
    b = torch.randn(150, 3, generator=gen, dtype=torch.float64) - shift
    return torch.cat([a, b]), (a, b)


def floored_ml_loss(parts, family: str) -> float:
    """Mean NLL of the hard-assignment maximum-likelihood fit with each variance at least FLOOR:
    each cluster's weight, mean and (diagonal of the) covariance, feature 2's variance raised to
    FLOOR (for full, its variance given the other features, which is the same here)."""
    n = sum(p.shape[0] for p in parts)
    total = 0.0
    for xs in parts:
        s = torch.cov(xs.T, correction=0)
        s = torch.diag(s.diagonal()) if family == "diagonal" else s
        sigma = s.clone()
        sigma[2, 2] = sigma[2, 2].clamp_min(FLOOR)
        log_n = -0.5 * (3 * math.log(2 * math.pi) + torch.logdet(sigma) + torch.trace(torch.linalg.solve(sigma, s)))
        total -= xs.shape[0] / n * (math.log(xs.shape[0] / n) + float(log_n))
    return total


@pytest.mark.parametrize("family", ["diagonal", "full"])
def test_a_feature_constant_within_a_cluster_is_held_at_the_floor(family):
    """The variance of a feature constant within one cluster stays at the floor through a fit,
    no component is reset, and the fit reaches the floored maximum likelihood."""
    x, parts = cluster_with_a_constant_feature()
    state = pg.init_state(pg.init(x, 2, family, key=0), key=0)
    for _ in range(200):
        state = pg.step(state, x)
    assert int(state.n_resets) == 0
    on_a = int(torch.argmin((state.params.means - parts[0].mean(0)).norm(dim=-1)))
    cov = pg.covariances(state.params)[on_a]
    # feature 2's variance (given the others, for full) is the floor: 1/U_22² exactly
    eps = torch.finfo(torch.float64).eps
    conditional = cov[2, 2] - cov[2, :2] @ torch.linalg.solve(cov[:2, :2], cov[:2, 2])
    torch.testing.assert_close(conditional, torch.tensor(FLOOR, dtype=torch.float64), rtol=64 * eps * 1e6, atol=0)
    # 200 steps reach the optimum to ~1e-9 (the soft assignments can only lower it, by < 1e-9)
    assert abs(float(pg.loss(state.params, x)) - floored_ml_loss(parts, family)) < 1e-6
