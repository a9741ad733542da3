"""fit_batched: B independent fits in one vmapped loop equal B single fits."""

import warnings

import numpy as np
import pytest
import torch

import puregmm as pg
from tests import bounds


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        return fn(*args, **kwargs)


def run_rtol(single, x, k, family, method, key):
    """The batched (vmapped) and single fits differ by rounding: the per-step bound at the start
    (fit's default init) and at the end over the steps; Adam's bound for gradient descent."""
    start = pg.init(x, k, family, key=key)
    steps = max(single.n_steps, 1)
    if method == "gd":
        return bounds.adam_rtol(start, x, steps)
    return max(bounds.stats_rtol(p, x, steps=steps) for p in (start, single.params))


def assert_fit_close(params_b, loss_b, single, x, rtol):
    """Means in widths, covariances relative to their largest entry, weights absolutely, the
    loss within both losses' rounding plus rtol times the log-density's size."""
    want = single.params
    k = want.n_components
    width = float(pg.covariances(want).diagonal(dim1=-2, dim2=-1).max().sqrt())
    position = bounds.SLACK * bounds.eps(x.dtype) * float(want.means.abs().max())
    torch.testing.assert_close(params_b.means[:k], want.means, rtol=0, atol=rtol * width + position)
    cov_want = pg.covariances(want)
    bounds.assert_leaves_close(pg.covariances(params_b)[:k], cov_want, rtol, "covariances", floor=0.0)
    bounds.assert_leaves_close(pg.weights(params_b)[:k], pg.weights(want), rtol, "weights")
    loss_atol = 2 * bounds.log_lik_atol(want, x, n=x.shape[0]) + rtol * bounds.log_density_scale(want, x)
    torch.testing.assert_close(loss_b, single.loss, rtol=0, atol=loss_atol)
    return loss_atol


def datasets(b=4, n=120, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(b, 3, d, generator=gen, dtype=torch.float64)
    labels = torch.arange(n) % 3
    return centres[:, labels] + torch.randn(b, n, d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("method, family", [("em", "full"), ("em", "diagonal"), ("gd", "isotropic")])
def test_each_result_equals_the_single_fit(method, family):
    xs = datasets()
    mask = torch.ones(xs.shape[:2], dtype=torch.bool)
    mask[1, 100:] = False  # ragged: dataset 1 has 100 rows
    mask[3, :30] = False
    xs[1, 100:] = float("nan")  # padding may hold anything
    steps = 60 if method == "gd" else 100
    keys = torch.tensor([3, 1, 4, 1])
    batched = quiet(pg.fit_batched, xs, 3, family, method=method, mask=mask, keys=keys, max_steps=steps)
    assert batched.loss.shape == (4,) and batched.params.means.shape == (4, 3, 2)
    for b in range(4):
        x = xs[b][mask[b]]
        single = quiet(pg.fit, x, 3, family, method=method, key=int(keys[b]), max_steps=steps)
        assert int(batched.n_steps[b]) == single.n_steps and bool(batched.converged[b]) == single.converged
        rtol = run_rtol(single, x, 3, family, method, int(keys[b]))
        assert rtol < (1e-3 if method == "gd" else 1e-6)  # meaningful: far below what a wrong step moves
        params_b = pg.GMMParams(
            *(t[b] for t in (batched.params.logits, batched.params.means, batched.params.scale)), family
        )
        loss_atol = assert_fit_close(params_b, batched.loss[b], single, x, rtol)
        n = single.n_steps
        torch.testing.assert_close(batched.history[b, :n], single.history, rtol=0, atol=loss_atol)
        assert torch.isnan(batched.history[b, n:]).all()


def test_batched_params_work_with_accessors_and_log_prob():
    xs = datasets(b=3)
    r = pg.fit_batched(xs, 2, "diagonal", key=1)
    assert pg.weights(r.params).shape == (3, 2) and pg.covariances(r.params).shape == (3, 2, 2, 2)
    lp = pg.log_prob(r.params, xs)
    torch.testing.assert_close(-lp.mean(-1), r.loss)


def test_n_init_keeps_the_best_restart():
    x = datasets(b=1, n=300, seed=2)[0]
    # restart 0 is the single run with the key itself; restart r >= 1 uses fold_in(key, r)
    run_keys = [0] + [pg.keys.fold_in(0, r) for r in range(1, 4)]
    runs = [pg.fit(x, 3, "full", method="em", key=k, init_method="random") for k in run_keys]
    best = pg.fit(x, 3, "full", method="em", n_init=4, key=0, init_method="random")
    winner = min(runs, key=lambda r: float(r.loss))
    rtol = bounds.stats_rtol(winner.params, x, steps=winner.n_steps)  # vmapped restarts vs single runs
    loss_atol = 2 * bounds.log_lik_atol(winner.params, x, n=x.shape[0]) + rtol * bounds.log_density_scale(
        winner.params, x
    )
    torch.testing.assert_close(best.loss, winner.loss, rtol=0, atol=loss_atol)


def test_bad_batched_input():
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        pg.fit_batched(torch.zeros(5, 2), 1)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        pg.fit_batched(torch.zeros(2, 5, 2), 1, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        pg.fit_batched(torch.full((2, 5, 2), float("nan")), 1)


@pytest.mark.parametrize(
    "method, family",
    [("em", "full"), ("em", "tied"), ("em", "diagonal"), ("em", "isotropic"), ("em", "shared"), ("gd", "full")],
)
def test_sweep_over_k_in_one_batch_equals_each_fit(method, family):
    """One K per dataset: masked padding components give exactly the K-component fit."""
    x = datasets(b=1, n=150, seed=5)[0]
    ks = [1, 2, 3, 4]
    steps = 40 if method == "gd" else 100
    keys = torch.tensor([7, 7, 7, 7])
    sweep = quiet(pg.fit_batched, x.expand(4, -1, -1), ks, family, method=method, keys=keys, max_steps=steps)
    assert sweep.params.means.shape == (4, 4, 2)
    w = pg.weights(sweep.params)
    for b, kb in enumerate(ks):
        assert bool((w[b, kb:] == 0).all()) and bool(torch.isinf(sweep.params.logits[b, kb:]).all())
        single = quiet(pg.fit, x, kb, family, method=method, key=7, max_steps=steps)
        assert int(sweep.n_steps[b]) == single.n_steps
        rtol = run_rtol(single, x, kb, family, method, 7)
        assert rtol < (1e-3 if method == "gd" else 1e-6)  # meaningful: far below what a wrong step moves
        params_b = pg.GMMParams(*(t[b] for t in (sweep.params.logits, sweep.params.means, sweep.params.scale)), family)
        assert_fit_close(params_b, sweep.loss[b], single, x, rtol)
    assert pg.n_parameters(sweep.params).tolist() == [pg.n_parameters(pg.init(x, kb, family)) for kb in ks]
    if method == "gd":  # masked components keep their placeholder: the same after 1 step and after all
        first = quiet(pg.fit_batched, x.expand(4, -1, -1), ks, family, method=method, keys=keys, max_steps=1)
        for b, kb in enumerate(ks):
            torch.testing.assert_close(sweep.params.means[b, kb:], first.params.means[b, kb:], rtol=0, atol=0)
    bics = pg.bic(sweep.params, x)
    assert bics.shape == (4,)
    assert int(torch.argmin(bics)) + 1 == 3  # the data has three clusters


def test_pad_components_leaves_the_density_unchanged():
    x = datasets(b=1, n=50, seed=6)[0]
    p = pg.init(x, 2, "full", key=0)
    padded = pg.pad_components(p, 5)
    torch.testing.assert_close(pg.log_prob(padded, x), pg.log_prob(p, x), rtol=0, atol=2 * bounds.log_lik_atol(p, x))
    step = pg.em_step(p, x)
    width = float(pg.covariances(step).diagonal(dim1=-2, dim2=-1).max().sqrt())
    means_atol = bounds.stats_rtol(p, x) * width + bounds.SLACK * bounds.eps(x.dtype) * float(step.means.abs().max())
    torch.testing.assert_close(pg.em_step(padded, x).means[:2], step.means, rtol=0, atol=means_atol)
    assert pg.n_parameters(padded) == pg.n_parameters(p)
    with pytest.raises(ValueError, match="n_components"):
        pg.pad_components(p, 1)


def test_k_per_dataset_is_checked():
    xs = datasets(b=2, n=20)
    with pytest.raises(ValueError, match="one per dataset"):
        pg.fit_batched(xs, [1, 2, 3])
    with pytest.raises(ValueError, match="more than the number of samples"):
        pg.fit_batched(xs, [1, 21])
    with pytest.raises(TypeError, match="must be an int"):
        pg.fit_batched(xs, [1, 2.5])


def test_init_params_must_have_the_largest_k():
    xs = datasets(b=2, n=20)
    start = pg.pad_components(pg.init(xs[0], 2, "full"), 3)
    stacked = pg.GMMParams(
        *(t.unsqueeze(0).expand(2, *t.shape) for t in (start.logits, start.means, start.scale)), "full"
    )
    with pytest.raises(ValueError, match="K=3 components; the fit asks for 2"):
        pg.fit_batched(xs, [1, 2], "full", init_params=stacked)


def test_masked_components_survive_save_load_and_distribution_round_trips(tmp_path):
    x = datasets(b=1, n=80, seed=8)[0]
    p = pg.pad_components(pg.fit(x, 2, "full", method="em", key=0).params, 4)
    path = tmp_path / "masked.safetensors"
    pg.save(p, path)
    back = pg.load(path)
    torch.testing.assert_close(back.logits, p.logits, rtol=0, atol=0)  # the file holds the exact numbers
    d = pg.to_distribution(p)
    again = pg.from_distribution(d)
    assert bool(torch.isinf(again.logits[2:]).all())
    # through torch.distributions' covariance factor and back: D·κ·eps on the params
    torch.testing.assert_close(pg.log_prob(again, x), pg.log_prob(p, x), rtol=0, atol=2 * bounds.log_lik_atol(p, x))
    assert pg.sample(p, 50, key=1)[1].max() < 2  # never a masked component
    gm = pg.to_sklearn(p)  # masked components left out
    assert gm.weights_.shape == (2,)
    sk_atol = bounds.component_log_prob_atol(p, x)  # scikit-learn's own factorisation and sums
    np.testing.assert_allclose(gm.score_samples(x.numpy()), pg.log_prob(p, x).numpy(), rtol=0, atol=sk_atol)


@pytest.mark.parametrize("method", ["em", "gd"])
def test_runs_in_groups_equal_one_vmap(method, monkeypatch):
    """Runs go through the vmapped kernel in groups (blocks below glibc's mmap threshold); runs
    are independent under vmap, so groups give the fits of one vmap over all, to rounding."""
    from puregmm import driver
    from puregmm.methods import FitResult

    xs = datasets(b=7, n=60, seed=3)
    kw = dict(method=method, max_steps=40 if method == "gd" else 100, key=2)
    whole = quiet(pg.fit_batched, xs, 3, "full", **kw)
    monkeypatch.setattr(driver, "GROUP_BYTES", 3 * 60 * 9 * 8)  # groups of 3 runs: 3 + 3 + 1
    grouped = quiet(pg.fit_batched, xs, 3, "full", **kw)
    for b in range(7):
        leaves = (whole.params.logits[b], whole.params.means[b], whole.params.scale[b])
        one = FitResult(pg.GMMParams(*leaves, "full"), whole.loss[b], int(whole.n_steps[b]), True, 0, whole.history[b])
        assert int(grouped.n_steps[b]) == one.n_steps
        rtol = run_rtol(one, xs[b], 3, "full", method, 2)  # every run's key is 2
        params_b = pg.GMMParams(
            *(t[b] for t in (grouped.params.logits, grouped.params.means, grouped.params.scale)), "full"
        )
        assert_fit_close(params_b, grouped.loss[b], one, xs[b], rtol)
