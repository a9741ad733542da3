"""bootstrap: deterministic, replicate b is the single fit of its resample, spread = standard error."""

from __future__ import annotations

import pytest
import torch

import puregmm as pg
from puregmm.bootstrap import resample
from tests import bounds


def _data(n: int = 150, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [5.0, 1.0]], dtype=torch.float64)
    return centres[torch.arange(n) % 2] + torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_deterministic_and_key_dependent() -> None:
    x = _data()
    a = pg.bootstrap(x, 6, 2, "diagonal", key=7)
    b = pg.bootstrap(x, 6, 2, "diagonal", key=torch.tensor(7))
    c = pg.bootstrap(x, 6, 2, "diagonal", key=8)
    for name in ("logits", "means", "scale"):
        assert torch.equal(getattr(a.params, name), getattr(b.params, name)), name
    assert not torch.equal(a.params.means, c.params.means)
    assert a.loss.shape == (6,) and a.params.means.shape == (6, 2, 2)


def test_resample_is_uniform_with_replacement_and_prefix_stable() -> None:
    idx, ks = resample(400, 50, key=1)
    assert idx.shape == (50, 400) and ks.shape == (50,) and ks.dtype == torch.int64
    assert bool((idx >= 0).all() and (idx < 400).all())
    counts = torch.bincount(idx.flatten(), minlength=400).double()  # 50 draws per row on average
    assert float(counts.mean()) == 50.0 and float(counts.std()) < 12.0  # integers: exact; Poisson-like: sd ≈ 7
    # each replicate has its own key: the first replicates do not depend on B
    idx3, ks3 = resample(400, 3, key=1)
    assert torch.equal(idx3, idx[:3]) and torch.equal(ks3, ks[:3])
    assert len(set(ks.tolist())) == 50


@pytest.mark.parametrize("family", ["full", "isotropic"])
def test_replicate_equals_the_single_fit_of_its_resample(family: str) -> None:
    x = _data()
    r = pg.bootstrap(x, 5, 2, family, key=3, max_steps=200)
    idx, ks = resample(x.shape[0], 5, key=3)
    for b in range(5):
        xb = x[idx[b]]
        single = pg.fit(xb, 2, family, method="em", key=ks[b], max_steps=200)
        assert int(r.n_steps[b]) == single.n_steps
        # vmapped replicates vs one fit: the per-step rounding bound (start and end), over the steps
        start = pg.init(xb, 2, family, key=ks[b])
        rtol = max(bounds.stats_rtol(p, xb, steps=max(single.n_steps, 1)) for p in (start, single.params))
        assert rtol < 1e-6  # meaningful
        params_b = pg.GMMParams(*(t[b] for t in (r.params.logits, r.params.means, r.params.scale)), family)
        bounds.assert_params_close(params_b, single.params, rtol, f"replicate {b}")
        cov_want = pg.covariances(single.params)
        bounds.assert_leaves_close(pg.covariances(r.params)[b], cov_want, rtol, "covariances", floor=0.0)
        loss_atol = 2 * bounds.log_lik_atol(single.params, xb, n=xb.shape[0])
        loss_atol += rtol * bounds.log_density_scale(single.params, xb)
        torch.testing.assert_close(r.loss[b], single.loss, rtol=0, atol=loss_atol)


def test_spread_of_the_means_is_the_standard_error_of_the_mean() -> None:
    """One component: the fitted mean is the sample mean, so the bootstrap means spread by
    s / √N per coordinate (s the plug-in standard deviation); with B = 400 replicates the
    spread is known to about 1/√(2B) ≈ 3.5% relative, so 15% is over 4 standard errors."""
    g = torch.Generator().manual_seed(5)
    n = 300
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0], dtype=torch.float64)
    r = pg.bootstrap(x, 400, 1, "diagonal", key=11)
    boot_means = pg.means(r.params)[:, 0, :]  # [B, D]
    torch.testing.assert_close(boot_means.mean(0), x.mean(0), rtol=0, atol=0.1 * float(x.std()) / n**0.5 * 3)
    se = x.std(0, unbiased=False) / n**0.5
    ratio = boot_means.std(0) / se
    assert bool(((ratio > 0.85) & (ratio < 1.15)).all()), ratio
    # and each replicate's mean is exactly its resample's mean
    idx, _ = resample(n, 400, key=11)
    direct = x[idx].mean(1)
    # μ + Σ(x - μ)/n against Σx/n: n terms of size |x| in another order, and the position
    atol = bounds.SLACK * (bounds.gamma(n) + bounds.eps(x.dtype)) * float(x.abs().max())
    torch.testing.assert_close(boot_means, direct, rtol=0, atol=atol)


def test_bad_arguments() -> None:
    x = _data()
    with pytest.raises(ValueError, match="n_replicates must be a positive int"):
        pg.bootstrap(x, 0, 2)
    with pytest.raises(ValueError, match="bootstrap sets \\['keys'\\] itself"):
        pg.bootstrap(x, 3, 2, keys=torch.arange(3))
    with pytest.raises(ValueError, match=r"2-D \[N, D\]"):
        pg.bootstrap(x[:, 0], 3, 1)
