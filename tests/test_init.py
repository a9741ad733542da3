"""Initialisation: methods, keys, the M-step on responsibilities, means=, weights, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture._gaussian_mixture import _estimate_gaussian_parameters

import puregmm as pg
from puregmm.init import METHODS, kmeans_plusplus
from tests import bounds
from tests.bounds import SLACK, gamma
from tests.oracles import SK_TYPE, mixture_data, sk_covariances_full, to_np
from tests.test_kmeans import _centre_atol, _sklearn_kmeans


def same(a: pg.GMMParams, b: pg.GMMParams) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("logits", "means", "scale"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", pg.FAMILIES)
def test_methods_give_valid_params_and_follow_the_key(method: str, family: str) -> None:
    x, _ = mixture_data(3, 2, 90, seed=1)
    p = pg.init(x, 3, family, key=4, method=method)
    assert p.family == family and p.n_components == 3 and p.dim == 2 and p.dtype == x.dtype
    for name in ("logits", "means", "scale"):
        assert torch.isfinite(getattr(p, name)).all()
    torch.testing.assert_close(pg.weights(p).sum(), torch.tensor(1.0, dtype=x.dtype), rtol=0, atol=SLACK * gamma(3))
    assert same(p, pg.init(x, 3, family, key=torch.tensor(4), method=method))
    assert not same(p, pg.init(x, 3, family, key=5, method=method))


@pytest.mark.parametrize("family", tuple(SK_TYPE))
def test_covariances_are_sklearns_m_step_on_the_hard_partition(family: str) -> None:
    """init = scikit-learn's ``_initialize``: ``_estimate_gaussian_parameters`` on one-hot
    responsibilities of the nearest k-means++ seed."""
    x, _ = mixture_data(3, 3, 120, separation=4.0, seed=2)
    p = pg.init(x, 3, family, key=0, reg_covar=1e-4)
    seeds = kmeans_plusplus(x - x.mean(0), 3, key=0) + x.mean(0)
    labels = torch.cdist(x, seeds).argmin(-1)
    resp = np.eye(3)[labels.numpy()]
    nk, means, cov = _estimate_gaussian_parameters(to_np(x), resp, 1e-4, SK_TYPE[family])
    gm = type("GM", (), {"covariances_": cov, "covariance_type": SK_TYPE[family]})
    # one M-step each (scikit-learn's tied/diag/spherical take moments about 0): the per-step bound
    tol = bounds.stats_rtol(p, x, origin=True)
    bounds.assert_leaves_close(to_np(pg.weights(p)), nk / nk.sum(), tol, "weights")
    bounds.assert_leaves_close(to_np(p.means), means, tol, "means")
    bounds.assert_leaves_close(to_np(pg.covariances(p)), sk_covariances_full(gm, 3, 3), tol, "covariances", floor=0.0)


def test_kmeans_lloyd_lowers_the_kmeans_objective_and_finds_blobs() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = centres.repeat_interleave(50, 0) + 0.5 * torch.randn(200, 2, generator=g, dtype=torch.float64)

    def objective(means: torch.Tensor) -> float:
        return float(torch.cdist(x, means).amin(-1).square().sum())

    for key in range(3):
        pp = pg.init(x, 4, "isotropic", key=key, method="kmeans++")
        km = pg.init(x, 4, "isotropic", key=key, method="kmeans")
        # Lloyd never raises the objective; both are sums of N squared distances (rounding γ_N)
        assert objective(km.means) <= objective(pp.means) * (1 + 2 * SLACK * gamma(x.shape[0]))
    found = pg.init(x, 4, "isotropic", key=1, method="kmeans").means
    assert float(torch.cdist(found, centres).amin(0).max()) < 0.3


def test_random_resp_and_random_from_data() -> None:
    x, _ = mixture_data(2, 2, 60, seed=3)
    p = pg.init(x, 3, "full", key=1, method="random")
    # soft random responsibilities: every mean near the data mean, covariance near the data's
    assert float((p.means - x.mean(0)).norm(dim=-1).max()) < 0.5 * float(x.std(0).norm())
    q = pg.init(x, 3, "diagonal", key=1, method="random_from_data")
    assert len({tuple(m.tolist()) for m in q.means}) == 3


def test_given_means_are_kept() -> None:
    x, _ = mixture_data(2, 2, 80, separation=5.0, seed=4)
    means = x[:2].clone()
    p = pg.init(x, 2, "full", means=means.numpy())
    position = SLACK * bounds.eps(x.dtype) * float(means.abs().max())  # kept, up to a round trip at their position
    torch.testing.assert_close(p.means, means, rtol=0, atol=position)
    labels = torch.cdist(x, means).argmin(-1)
    # n_k/N through the logits (log, then softmax): a few roundings of each weight
    counts = torch.bincount(labels, minlength=2).double() / 80
    torch.testing.assert_close(pg.weights(p), counts, rtol=SLACK * bounds.eps(x.dtype), atol=0)
    with pytest.raises(ValueError, match=r"means must be \[K, D\]"):
        pg.init(x, 2, "full", means=means[:1])
    with pytest.raises(ValueError, match="NaN"):
        pg.init(x, 2, "full", means=torch.full((2, 2), float("nan")))


def test_sample_weight_zero_rows_are_never_seeds() -> None:
    x, _ = mixture_data(3, 2, 60, seed=5)
    w = torch.zeros(60, dtype=x.dtype)
    w[:20] = 1.0
    for method in ("kmeans++", "random_from_data", "kmeans"):
        for key in range(4):
            p = pg.init(x, 3, "diagonal", key=key, method=method, sample_weight=w)
            # weighted M-step: means are averages of positive-weight rows only
            lo, hi = x[:20].amin(0), x[:20].amax(0)
            slack = SLACK * bounds.eps(x.dtype) * float(x[:20].abs().max())  # a mean's rounding at its position
            assert bool(((p.means >= lo - slack) & (p.means <= hi + slack)).all()), method


def test_constant_family_variance() -> None:
    x, _ = mixture_data(2, 3, 50, seed=6)
    p = pg.init(x, 2, "constant", variance=0.7)
    # through the log standard deviation and back: a few roundings
    torch.testing.assert_close(
        pg.covariances(p)[0], 0.7 * torch.eye(3, dtype=x.dtype), rtol=SLACK * bounds.eps(x.dtype), atol=0
    )
    q = pg.init(x, 2, "constant")
    var = x.var(0, unbiased=False).mean()  # a mean of N squares of x - x̄, summed in another order
    var_rtol = SLACK * (gamma(x.shape[0]) * float((x - x.mean(0)).square().max() / var) + bounds.eps(x.dtype))
    torch.testing.assert_close(pg.covariances(q)[1, 0, 0], var, rtol=var_rtol, atol=0)
    with pytest.raises(ValueError, match="variance must be a positive"):
        pg.init(x, 2, "constant", variance=-1.0)
    with pytest.raises(ValueError, match="all points identical"):
        pg.init(torch.ones(10, 2), 2, "constant")


def test_large_offset_float32() -> None:
    """The same float32 numbers (~1e4 from the origin) in each dtype: float32 arithmetic alone,
    within eps(float32) times the condition and the claimed width ratio (bounds.low_precision_rtol)."""
    x32 = (mixture_data(2, 2, 200, separation=4.0, seed=7)[0] + 1e4).float()
    x64 = x32.double()
    p64 = pg.init(x64, 2, "full", key=3)
    p32 = pg.init(x32, 2, "full", key=3)
    c64 = pg.covariances(p64)
    rtol = bounds.low_precision_rtol(p64, x64, torch.float32)
    assert rtol < 1e-2  # meaningful: moments about the origin in float32 would be off by ~10
    assert float((pg.covariances(p32).double() - c64).abs().max() / c64.abs().max()) <= rtol


def test_errors_name_the_argument() -> None:
    x = torch.randn(20, 2)
    with pytest.raises(ValueError, match="unknown init method"):
        pg.init(x, 2, method="kmeans+++")
    with pytest.raises(ValueError, match="reg_covar"):
        pg.init(x, 2, reg_covar=-1.0)
    with pytest.raises(ValueError, match="n_components=30"):
        pg.init(x, 30)
    with pytest.raises(ValueError, match="unknown family"):
        pg.init(x, 2, "spherical")
    with pytest.raises(ValueError, match="sample_weight"):
        pg.init(x, 2, sample_weight=torch.ones(3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["full", "diagonal", "constant"])
def test_init_batched_equals_init_of_each_dataset(method: str, family: str) -> None:
    """The vmapped kernels give dataset b what ``init(xs[b][mask[b]], key=keys[b])`` gives,
    padding anywhere in the rows (draws count real rows only)."""
    from puregmm.init import init_batched

    xs = torch.stack([mixture_data(3, 2, 80, seed=s)[0] for s in range(4)])  # [4, 80, 2]
    mask = torch.ones(4, 80, dtype=torch.bool)
    mask[1, 60:] = False
    mask[2, :25] = False
    mask[3, 10:30] = False
    xs = torch.where(mask.unsqueeze(-1), xs, torch.zeros(()))
    keys = torch.tensor([3, 1, 4, 1])
    batched = init_batched(xs, 3, family, keys=keys, method=method, mask=mask)
    assert batched.batch_shape == (4,)
    for b in range(4):
        single = pg.init(xs[b][mask[b]], 3, family, key=int(keys[b]), method=method)
        for name in ("logits", "means", "scale"):
            # vmapped kernels: the M-step's per-step rounding bound
            tol = bounds.stats_rtol(single, xs[b][mask[b]])
            bounds.assert_leaves_close(getattr(batched, name)[b], getattr(single, name), tol, name)


@pytest.mark.parametrize("family", tuple(SK_TYPE))
def test_kmeans_init_is_sklearns_initialisation_from_the_same_seeds(family: str) -> None:
    """``init(method="kmeans")`` = scikit-learn's ``GaussianMixture._initialize_parameters`` given
    puregmm's k-means++ seeds: KMeans' labels as one-hot responsibilities, then the M-step."""
    x, _ = mixture_data(5, 3, 300, separation=2.0, seed=9)
    seeds = kmeans_plusplus(x - x.mean(0), 5, key=3) + x.mean(0)
    km = _sklearn_kmeans(x, seeds)
    nk, means, _ = _estimate_gaussian_parameters(to_np(x), np.eye(5)[km.labels_], 1e-6, SK_TYPE[family])
    p = pg.init(x, 5, family, key=3, method="kmeans")
    np.testing.assert_allclose(to_np(pg.weights(p)), nk / nk.sum(), rtol=SLACK * bounds.eps(x.dtype))  # counts/N
    np.testing.assert_allclose(to_np(p.means), means, rtol=0, atol=_centre_atol(x))
