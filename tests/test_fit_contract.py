"""The fit's contract (issue 12 item 6, defect 9; issue 14 item 6): EM is the default, fit and
init share their start, restart 0 is the single run, and a fit is invariant to the weights'
scale and equivariant under affine maps of the data, also beyond √(max float)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import puregmm as pg

EPS64 = torch.finfo(torch.float64).eps


def _blobs(seed: int = 0, n: int = 150, d: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0] * d, [4.0] + [0.0] * (d - 1), [0.0, 4.0] + [0.0] * (d - 2)], dtype=torch.float64)
    return torch.cat([torch.randn(n // 3, d, generator=g, dtype=torch.float64) + c for c in centres])


def _quiet(*args, **kwargs) -> pg.FitResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        return pg.fit(*args, **kwargs)


def test_default_method_is_em() -> None:
    x = _blobs()
    assert torch.equal(pg.fit(x, 3, "full").params.means, pg.fit(x, 3, "full", method="em").params.means)


@pytest.mark.parametrize("family", ["full", "diagonal"])
def test_fit_starts_where_init_starts(family: str) -> None:
    x = _blobs(1)
    a = pg.fit(x, 3, family, key=7)
    b = pg.fit(x, 3, family, key=7, init_params=pg.init(x, 3, family, key=7))
    # the two differ only by the rounding of standardising the data for the init (k-means is
    # equivariant): a few eps relative, amplified by a few EM steps
    torch.testing.assert_close(a.params.means, b.params.means, rtol=1e-9, atol=1e-9)
    assert a.n_steps == b.n_steps


@pytest.mark.parametrize("seed", range(6))
def test_more_restarts_never_lower_the_fit(seed: int) -> None:
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    losses = [float(_quiet(x, 2, "full", n_init=n, key=seed).loss) for n in (1, 2, 5)]
    # restart 0 is the single run, so the best of more restarts is at least as good; one run and
    # vmapped runs sum the N = 50 rows in different orders: N·eps·|loss| of rounding
    slack = 50 * EPS64 * abs(losses[0])
    assert losses[1] <= losses[0] + slack and losses[2] <= losses[1] + slack


@pytest.mark.parametrize("scale", [1e-300, 1e-20, 1.0, 1e20, 1e300])
def test_em_invariant_to_the_weights_scale(scale: float) -> None:
    x = _blobs(2)
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    ref = pg.fit(x, 3, "diagonal", sample_weight=w, key=0)
    got = pg.fit(x, 3, "diagonal", sample_weight=w * scale, key=0)
    assert torch.isfinite(got.loss)
    # the weights are divided by their largest first: identical up to that division's rounding
    torch.testing.assert_close(got.loss, ref.loss, rtol=100 * EPS64, atol=100 * EPS64)
    torch.testing.assert_close(got.params.means, ref.params.means, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("a", [1e-300, 1e-150, 1e-5, 1e5, 1e150, 1e300])
def test_em_affine_equivariant(family: str, a: float) -> None:
    x = _blobs(3)
    b = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * a * 7  # an offset of the data's own scale
    # reg_covar is absolute (scikit-learn's): 0 here so that nothing but the data sets the scale
    ref = _quiet(x, 3, family, key=0, reg_covar=0.0)
    got = _quiet(x * a + b, 3, family, key=0, reg_covar=0.0)
    assert all(torch.isfinite(t).all() for t in (got.params.logits, got.params.means, got.params.scale))
    # standardising by a power-free scale s: the fits agree to rounding of the map (a few eps
    # relative) compounded over the EM steps on well-separated blobs (condition number ~10)
    tol = 1e4 * EPS64
    torch.testing.assert_close(got.params.means / a, (ref.params.means * a + b) / a, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(pg.weights(got.params), pg.weights(ref.params), rtol=tol, atol=tol)
    # the loss shifts by D log a exactly (densities scale by a^-D)
    torch.testing.assert_close(got.loss, ref.loss + 3 * math.log(a), rtol=tol, atol=tol * 10)


def test_one_row_beyond_sqrt_max() -> None:
    x = _blobs(4)
    x = torch.cat([x, torch.tensor([[1e200, 0.0, 0.0]], dtype=torch.float64)])
    r = _quiet(x, 3, "full", key=0)
    assert torch.isfinite(r.loss) and torch.isfinite(r.params.means).all() and torch.isfinite(r.params.scale).all()


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("a", [1e-300, 1e200, 1e300])
def test_init_affine_equivariant_beyond_sqrt_max(family: str, a: float) -> None:
    x = _blobs(5)
    ref = pg.init(x, 3, family, key=0, reg_covar=0.0)
    got = pg.init(x * a, 3, family, key=0, reg_covar=0.0)
    assert all(torch.isfinite(t).all() for t in (got.logits, got.means, got.scale))
    tol = 1e3 * EPS64  # the affine map's rounding, through one M-step on separated blobs
    torch.testing.assert_close(got.means / a, ref.means, rtol=tol, atol=tol * 10)
    # U -> U / a: the log-diagonal of the precision factor shifts by -log a
    want = pg.GMMParams(ref.logits, ref.means, ref.scale, family)
    got_back = pg.GMMParams(
        got.logits, got.means / a, got.spec.scaled_raw(got.scale, torch.tensor(1.0 / a, dtype=torch.float64)), family
    )
    torch.testing.assert_close(got_back.scale, want.scale, rtol=tol, atol=tol * 10)


def test_online_em_is_a_methods_row_run_by_the_stream_driver() -> None:
    """online_em steps through a stream's batches (one pass: one step per batch); the in-memory
    drivers, which feed every step the same data, refuse it by name."""
    from puregmm.methods import METHODS

    assert "online_em" in METHODS and METHODS["online_em"].stream
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batches = [x[i : i + 100] for i in range(0, 400, 100)]
    r = pg.fit(lambda: iter(batches), 2, "diagonal", method="online_em")
    assert r.n_steps == 4 and r.history.shape == (4,) and r.converged
    with pytest.raises(ValueError, match="online_em"):
        pg.fit_batched(torch.stack([x, x]), 2, "diagonal", method="online_em")
