"""fit(method="em"): scikit-learn's loop and quality, restarts, warm starts, weights,
degenerate data, float32, resuming."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import puregmm as pg
from puregmm import keys
from tests import bounds
from tests.oracles import SK_TYPE, random_params, sk_covariances_full, sklearn_em, to_np

SK_FAMILIES = tuple(SK_TYPE)


def blobs(side: float, seed: int = 0, n: int = 240) -> torch.Tensor:
    """Three 2-D Gaussians with distinct covariances at the corners of a triangle."""
    rng = np.random.default_rng(seed)
    means = side * np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.87]])
    covs = [[[1.0, 0.5], [0.5, 1.0]], [[2.0, 0.0], [0.0, 0.5]], [[0.7, -0.3], [-0.3, 1.2]]]
    labels = rng.integers(0, 3, n)
    return torch.as_tensor(np.stack([rng.multivariate_normal(means[j], covs[j]) for j in labels]))


def fit_rtol(params: list[pg.GMMParams], x: torch.Tensor, steps: int, origin: bool = False) -> float:
    """Two EM loops of ``steps`` steps by other routes (batched kernels, a reference): the
    per-step rounding bound at the start and at the end, added over the steps."""
    return max(bounds.stats_rtol(p, x, steps=max(steps, 1), origin=origin) for p in params)


def quiet_fit(*args, **kwargs) -> pg.FitResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        return pg.fit(*args, **kwargs)


@pytest.mark.parametrize("side", [8.0, 2.5], ids=["separated", "overlapping"])
@pytest.mark.parametrize("family", SK_FAMILIES)
def test_n_init_5_reaches_sklearns_likelihood(side: float, family: str) -> None:
    from sklearn.mixture import GaussianMixture

    x = blobs(side)
    tol = 1e-3  # both stop once a step gains less than tol (nats per sample): within tol of their optimum
    result = pg.fit(x, 3, family, method="em", n_init=5, key=0, tol=tol)
    gm = GaussianMixture(3, covariance_type=SK_TYPE[family], n_init=5, random_state=0, tol=tol).fit(to_np(x))
    assert -float(result.loss) >= gm.score(to_np(x)) - tol
    assert result.converged


@pytest.mark.parametrize("family", SK_FAMILIES)
def test_loop_from_given_params_is_sklearns(family: str) -> None:
    """Same start, tol and max_steps: the same number of steps, convergence and params."""
    x = blobs(2.5, seed=1)
    p0 = random_params(family, 3, 2, seed=3, spread=2.0)
    p0 = pg.GMMParams(p0.logits, p0.means + x.mean(0), p0.scale, family)
    result = pg.fit(x, 3, family, method="em", init_params=p0)
    gm = sklearn_em(p0, x, 100)
    gm_tol = type(gm)(**{**gm.get_params(), "tol": 1e-3}).fit(to_np(x))
    assert result.n_steps == gm_tol.n_iter_ and result.converged == gm_tol.converged_
    # two float64 EM loops (scikit-learn's tied/diag/spherical M-steps take moments about 0)
    tol = fit_rtol([p0, result.params], x, result.n_steps, origin=True)
    assert tol < 1e-6  # meaningful: a wrong update moves these by far more
    n = x.shape[0]
    ll_atol = 2 * bounds.log_lik_atol(result.params, x, n=n) + tol * bounds.log_density_scale(p0, x)
    np.testing.assert_allclose(-to_np(result.history), gm_tol.lower_bounds_, rtol=0, atol=ll_atol)
    cov_want = sk_covariances_full(gm_tol, 3, 2)
    sk = pg.from_moments(
        torch.as_tensor(gm_tol.weights_), torch.as_tensor(gm_tol.means_), torch.as_tensor(np.array(cov_want))
    )
    bounds.assert_params_close(pg.GMMParams(sk.logits, result.params.means, sk.scale, "full"), sk, tol, "means")
    bounds.assert_leaves_close(to_np(pg.covariances(result.params)), cov_want, tol, "covariances", floor=0.0)
    loss_atol = 2 * bounds.log_lik_atol(result.params, x, n=n)
    torch.testing.assert_close(result.loss, pg.loss(result.params, x), rtol=0, atol=loss_atol)
    assert result.history.shape == (result.n_steps,)
    # EM: the loss never increases, up to the rounding of the two losses compared
    assert bool((result.history.diff() <= 2 * bounds.log_lik_atol(p0, x, n=n)).all())


def test_defaults_warning_and_truthful_counts() -> None:
    x = blobs(2.5, seed=2)
    with pytest.warns(pg.ConvergenceWarning, match="max_steps=2"):
        r = pg.fit(x, 3, "full", method="em", max_steps=2, tol=0.0)
    assert r.n_steps == 2 and not r.converged and r.history.shape == (2,)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pg.ConvergenceWarning)
        r = pg.fit(x, 3, "full", method="em")  # tol=1e-3, max_steps=100
    assert r.converged and 1 < r.n_steps < 100
    assert abs(float(r.history[-1] - r.history[-2])) < 1e-3 <= abs(float(r.history[-2] - r.history[-3]))


def test_n_init_keeps_the_best_restart() -> None:
    x = blobs(2.5, seed=3)
    best = pg.fit(x, 3, "diagonal", method="em", n_init=3, key=11)
    # restart 0 is the single run with the key itself; restart r >= 1 uses fold_in(key, r)
    run_keys = [torch.tensor(11)] + [keys.fold_in(torch.tensor(11), r) for r in (1, 2)]
    runs = [pg.fit(x, 3, "diagonal", method="em", key=k) for k in run_keys]
    winner = min(runs, key=lambda r: float(r.loss))
    # the batched restarts run the vmapped kernels: equal to the single fits up to rounding
    tol = fit_rtol([winner.params], x, winner.n_steps)
    ll_atol = 2 * bounds.log_lik_atol(winner.params, x, n=x.shape[0]) + tol * bounds.log_density_scale(winner.params, x)
    assert float(best.loss) == pytest.approx(float(winner.loss), rel=0, abs=ll_atol)
    # restarts that end at the same optimum may hold its components in another order
    order_best, order_winner = (torch.argsort(p.means[:, 0]) for p in (best.params, winner.params))
    width = float(pg.covariances(winner.params).diagonal(dim1=-2, dim2=-1).max().sqrt())
    means_atol = tol * width + bounds.SLACK * bounds.eps(x.dtype) * float(winner.params.means.abs().max())
    torch.testing.assert_close(
        best.params.means[order_best], winner.params.means[order_winner], rtol=0, atol=means_atol
    )


def test_init_params_means_only() -> None:
    x = blobs(8.0, seed=4)
    means = torch.tensor([[0.0, 0.0], [8.0, 0.0], [4.0, 7.0]], dtype=x.dtype)
    r = quiet_fit(x, 3, "full", method="em", init_params=means, max_steps=1)
    start = pg.init(x, 3, "full", means=means)
    torch.testing.assert_close(start.means, means, rtol=0, atol=0)  # kept as given
    expected = pg.em_step(start, x)
    bounds.assert_params_close(r.params, expected, bounds.stats_rtol(start, x), "one EM step")
    with pytest.raises(ValueError, match=r"init_params must be \[K, D\]"):
        pg.fit(x, 3, "full", method="em", init_params=means[:2])
    with pytest.raises(ValueError, match="init_params is GMMParams"):
        pg.fit(x, 3, "diagonal", method="em", init_params=start)


def test_argument_errors() -> None:
    x = blobs(8.0)
    for kwargs, match in [
        ({"reg_covar": -1.0}, "reg_covar"),
        ({"tol": -1.0}, "tol"),
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 10}, "method='gd' only"),
        ({"sample_weight": -torch.ones(240)}, "non-negative"),
        ({"sample_weight": torch.zeros(240)}, "all zero"),
        ({"sample_weight": torch.full((240,), float("nan"))}, "NaN"),
        ({"method": "lbfgs"}, "unknown method"),
    ]:
        with pytest.raises(ValueError, match=match):
            pg.fit(x, 3, **{"method": "em", **kwargs})


# --- sample weights -------------------------------------------------------------------------


def test_weighted_fit_equals_repeated_rows_em_and_gd() -> None:
    x = blobs(2.5, seed=5, n=90)
    counts = torch.arange(90) % 3
    rep = x.repeat_interleave(counts, 0)
    p0 = pg.init(rep, 3, "full", key=1)
    a = pg.fit(x, 3, "full", method="em", init_params=p0, sample_weight=counts.double())
    b = pg.fit(rep, 3, "full", method="em", init_params=p0)
    assert a.n_steps == b.n_steps
    tol = fit_rtol([p0, b.params], rep, b.n_steps)  # the same sums, grouped otherwise
    ll_atol = 2 * bounds.log_lik_atol(b.params, rep, n=rep.shape[0]) + tol * bounds.log_density_scale(p0, rep)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=ll_atol)
    bounds.assert_params_close(a.params, b.params, tol, "weighted EM")
    g1 = quiet_fit(x, 3, "full", method="gd", init_params=p0, sample_weight=counts.double(), max_steps=20)
    g2 = quiet_fit(rep, 3, "full", method="gd", init_params=p0, max_steps=20)
    gd_tol = bounds.adam_rtol(p0, rep, 20)
    assert gd_tol < 1e-4  # meaningful
    torch.testing.assert_close(g1.loss, g2.loss, rtol=0, atol=gd_tol * bounds.log_density_scale(p0, rep))
    bounds.assert_params_close(g1.params, g2.params, gd_tol, "weighted gd")


# --- degenerate data ------------------------------------------------------------------------


def _finite(r: pg.FitResult) -> bool:
    return bool(torch.isfinite(r.loss)) and all(
        bool(torch.isfinite(getattr(r.params, f)).all()) for f in ("logits", "means", "scale")
    )


@pytest.mark.parametrize("family", ["full", "tied", "diagonal", "isotropic", "shared"])
def test_identical_points_fit_finitely(family: str) -> None:
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64).expand(40, 3)
    r = quiet_fit(x, 2, family, method="em")
    assert _finite(r)
    # the mean of copies of one point: μ + Σ(x - μ)/n, rounded at the point's position
    position = bounds.SLACK * bounds.eps(x.dtype) * float(x.abs().max())
    torch.testing.assert_close(r.params.means, x[:2], rtol=0, atol=position)
    with pytest.raises(ValueError, match="constant features"):
        pg.fit(x, 2, family, method="em", reg_covar=0.0)
    with pytest.raises(ValueError, match="all points identical"):
        pg.fit(x, 2, "constant", method="em")


def test_line_constant_feature_and_wide_data() -> None:
    t = torch.linspace(-3, 3, 60, dtype=torch.float64)
    line = torch.stack([t, 2 * t + 1, -t], -1)  # rank one in 3-D
    r = quiet_fit(line, 2, "full", method="em")
    assert _finite(r) and float(torch.linalg.eigvalsh(pg.covariances(r.params)).min()) > 0
    const = torch.cat([torch.randn(50, 2, dtype=torch.float64), torch.full((50, 1), 7.0, dtype=torch.float64)], -1)
    for family in ("full", "diagonal"):
        r = quiet_fit(const, 2, family, method="em")
        assert _finite(r)
        # 0 + reg_covar, through the precision factor and back: D·κ·eps relative
        rtol = bounds.SLACK * 3 * bounds.model_cond(r.params) * bounds.eps(torch.float64)
        assert rtol < 1e-3
        want = torch.full((2,), 1e-6, dtype=torch.float64)
        torch.testing.assert_close(pg.covariances(r.params)[:, 2, 2], want, rtol=rtol, atol=0)
    with pytest.raises(ValueError, match=r"constant features \(columns \[2\]\)"):
        pg.fit(const, 2, "full", method="em", reg_covar=0.0)
    wide = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # D > N
    for family in ("diagonal", "full"):
        assert _finite(quiet_fit(wide, 2, family, method="em"))
    line_no_reg = quiet_fit(line, 2, "full", method="em", reg_covar=0.0)  # repaired, counted, finite
    assert _finite(line_no_reg) and line_no_reg.n_resets > 0


# --- float32 and resuming -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["full", "diagonal"])
def test_float32_with_offset_matches_float64(family: str) -> None:
    """15 EM steps in each dtype on the same float32 numbers (data ~1e4 from the origin): what
    differs is float32 arithmetic, bounded by eps(float32) times the condition and the claimed
    width ratio per step (bounds.low_precision_rtol), and the float32 positions' rounding."""
    x32 = (blobs(6.0, seed=6) + 1e4).float()
    x64 = x32.double()
    p32 = pg.init(x64, 3, family, key=2).to(torch.float32)
    p64 = p32.to(torch.float64)
    steps = 15
    r64 = quiet_fit(x64, 3, family, method="em", init_params=p64, tol=0.0, max_steps=steps)
    r32 = quiet_fit(x32, 3, family, method="em", init_params=p32, tol=0.0, max_steps=steps)
    assert r32.params.dtype == torch.float32
    rtol = max(bounds.low_precision_rtol(p, x64, torch.float32, steps=steps) for p in (p64, r64.params))
    assert rtol < 0.05  # meaningful: moments about the origin in float32 would be off by ~10
    centre = r64.params.means.mean(0)
    own = bounds.log_lik_atol(r64.params, x64, dtype=torch.float32, about=centre)
    assert abs(float(r32.loss) - float(r64.loss)) <= own + rtol * bounds.log_density_scale(r64.params, x64)
    c64 = pg.covariances(r64.params)
    assert float((pg.covariances(r32.params).double() - c64).abs().max()) <= rtol * float(c64.abs().max())
    width = float(c64.diagonal(dim1=-2, dim2=-1).amax().sqrt())
    position = bounds.SLACK * bounds.eps(torch.float32) * float(x64.abs().max()) * steps
    assert float((r32.params.means.double() - r64.params.means).abs().max()) <= rtol * width + position


@pytest.mark.parametrize("method, steps", [("em", 40), ("gd", 120)])
def test_resumed_run_is_bitwise_identical(tmp_path, method, steps) -> None:
    x = blobs(2.5, seed=7)
    ckpt = tmp_path / "run.ckpt"
    # key 4: the two restarts end at different optima, so "the best run" is the same after 7 and
    # after `steps` steps (with key 3 they tie to rounding and either may win)
    kw = dict(method=method, tol=0.0, n_init=2, key=4)
    whole = quiet_fit(x, 3, "full", max_steps=steps, **kw)
    stopped = quiet_fit(x, 3, "full", max_steps=7, checkpoint=ckpt, checkpoint_every=3, **kw)  # "interrupted" at 7
    rest = quiet_fit(x, 3, "full", max_steps=steps, resume=ckpt, **kw)
    assert rest.n_steps == whole.n_steps == steps and stopped.n_steps == 7
    for a, b in zip(pytree.tree_leaves(rest.params), pytree.tree_leaves(whole.params)):
        assert torch.equal(a, b)
    assert torch.equal(rest.history, whole.history) and torch.equal(rest.history[:7], stopped.history)


def test_resume_starts_from_the_file(tmp_path) -> None:
    """A checkpoint is really where the fit resumes (its params, not a fresh init's); the key is
    part of the fit's identity, so another key is refused."""
    x = blobs(2.5, seed=7)
    ckpt = tmp_path / "other.ckpt"
    other = quiet_fit(x, 3, "full", method="em", tol=0.0, max_steps=5, key=11, checkpoint=ckpt)
    resumed = quiet_fit(x, 3, "full", method="em", tol=0.0, max_steps=5, key=11, resume=ckpt)
    assert torch.equal(resumed.params.means, other.params.means) and resumed.n_steps == 5
    with pytest.raises(ValueError, match="different fit"):
        quiet_fit(x, 3, "full", method="em", tol=0.0, max_steps=5, key=0, resume=ckpt)
    with pytest.raises(ValueError, match="different fit"):
        quiet_fit(x, 2, "full", method="em", max_steps=6, resume=ckpt)


def test_gd_path_still_fits() -> None:
    x = blobs(8.0, seed=8, n=120)
    r = quiet_fit(x, 3, "diagonal", max_steps=50)
    assert _finite(r) and r.n_steps <= 50 and r.history.shape == (r.n_steps,)
    em = pg.fit(x, 3, "diagonal", method="em")
    assert float(r.loss) < float(em.loss) + 2.0  # a quality margin (nats per sample) after 50 steps, not rounding
