"""Initialisation: methods, keys, the M-step on responsibilities, means=, weights, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture._gaussian_mixture import _estimate_gaussian_parameters

import puregmm as pg
from puregmm.init import METHODS, kmeans_plusplus
from tests.oracles import SK_TYPE, mixture_data, sk_covariances_full, to_np


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
    torch.testing.assert_close(pg.weights(p).sum(), torch.tensor(1.0, dtype=x.dtype))
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
    np.testing.assert_allclose(to_np(pg.weights(p)), nk / nk.sum(), rtol=1e-10)
    np.testing.assert_allclose(to_np(p.means), means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(pg.covariances(p)), sk_covariances_full(gm, 3, 3), rtol=1e-8, atol=1e-12)


def test_kmeans_lloyd_lowers_the_kmeans_objective_and_finds_blobs() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = centres.repeat_interleave(50, 0) + 0.5 * torch.randn(200, 2, generator=g, dtype=torch.float64)

    def objective(means: torch.Tensor) -> float:
        return float(torch.cdist(x, means).amin(-1).square().sum())

    for key in range(3):
        pp = pg.init(x, 4, "isotropic", key=key, method="kmeans++")
        km = pg.init(x, 4, "isotropic", key=key, method="kmeans")
        assert objective(km.means) <= objective(pp.means) + 1e-9
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
    torch.testing.assert_close(p.means, means, rtol=0, atol=1e-12)
    labels = torch.cdist(x, means).argmin(-1)
    torch.testing.assert_close(pg.weights(p), torch.bincount(labels, minlength=2).double() / 80, rtol=1e-10, atol=0)
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
            assert bool(((p.means >= lo - 1e-9) & (p.means <= hi + 1e-9)).all()), method


def test_constant_family_variance() -> None:
    x, _ = mixture_data(2, 3, 50, seed=6)
    p = pg.init(x, 2, "constant", variance=0.7)
    torch.testing.assert_close(pg.covariances(p)[0], 0.7 * torch.eye(3, dtype=x.dtype))
    q = pg.init(x, 2, "constant")
    torch.testing.assert_close(pg.covariances(q)[1, 0, 0], x.var(0, unbiased=False).mean())
    with pytest.raises(ValueError, match="variance must be a positive"):
        pg.init(x, 2, "constant", variance=-1.0)
    with pytest.raises(ValueError, match="all points identical"):
        pg.init(torch.ones(10, 2), 2, "constant")


def test_large_offset_float32() -> None:
    x64, _ = mixture_data(2, 2, 200, separation=4.0, seed=7)
    x64 = x64 + 1e4
    p64 = pg.init(x64, 2, "full", key=3)
    p32 = pg.init(x64.float(), 2, "full", key=3)
    c64 = pg.covariances(p64)
    assert float((pg.covariances(p32).double() - c64).abs().max() / c64.abs().max()) < 1e-4


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
            torch.testing.assert_close(getattr(batched, name)[b], getattr(single, name), rtol=1e-9, atol=1e-12)
