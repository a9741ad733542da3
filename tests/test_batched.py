"""fit_batched: B independent fits in one vmapped loop equal B single fits."""

import warnings

import pytest
import torch

import puregmm as pg


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        return fn(*args, **kwargs)


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
        single = quiet(pg.fit, xs[b][mask[b]], 3, family, method=method, key=int(keys[b]), max_steps=steps)
        assert int(batched.n_steps[b]) == single.n_steps and bool(batched.converged[b]) == single.converged
        torch.testing.assert_close(batched.params.means[b], single.params.means, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(
            pg.covariances(batched.params)[b], pg.covariances(single.params), rtol=1e-6, atol=1e-9
        )
        torch.testing.assert_close(batched.loss[b], single.loss, rtol=1e-6, atol=0)
        n = single.n_steps
        torch.testing.assert_close(batched.history[b, :n], single.history, rtol=1e-6, atol=0)
        assert torch.isnan(batched.history[b, n:]).all()


def test_batched_params_work_with_accessors_and_log_prob():
    xs = datasets(b=3)
    r = pg.fit_batched(xs, 2, "diagonal", key=1)
    assert pg.weights(r.params).shape == (3, 2) and pg.covariances(r.params).shape == (3, 2, 2, 2)
    lp = pg.log_prob(r.params, xs)
    torch.testing.assert_close(-lp.mean(-1), r.loss)


def test_n_init_keeps_the_best_restart():
    x = datasets(b=1, n=300, seed=2)[0]
    runs = [pg.fit(x, 3, "full", method="em", key=pg.keys.fold_in(0, r), init_method="random") for r in range(4)]
    best = pg.fit(x, 3, "full", method="em", n_init=4, key=0, init_method="random")
    torch.testing.assert_close(best.loss, min(r.loss for r in runs), rtol=1e-9, atol=0)


def test_bad_batched_input():
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        pg.fit_batched(torch.zeros(5, 2), 1)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        pg.fit_batched(torch.zeros(2, 5, 2), 1, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        pg.fit_batched(torch.full((2, 5, 2), float("nan")), 1)
