"""Params: moments round-trip, structure validation, pytree behaviour, repr and moving."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import puregmm as pg
from tests.strategies import random_covariances, random_params

EPS64 = torch.finfo(torch.float64).eps


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("k,d", [(1, 1), (3, 2), (4, 5)])
def test_from_moments_round_trips(family, k, d):
    gen = torch.Generator().manual_seed(k * 10 + d)
    w = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    w = w / w.sum()
    mu = torch.randn(k, d, generator=gen, dtype=torch.float64)
    cov = random_covariances(family, k, d, gen, torch.float64)
    p = pg.from_moments(w, mu, cov, family=family)
    assert p.family == family
    torch.testing.assert_close(pg.weights(p), w, rtol=1e-12, atol=0)
    torch.testing.assert_close(pg.means(p), mu, rtol=0, atol=0)
    torch.testing.assert_close(pg.covariances(p), cov, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_precisions_invert_covariances(family):
    p = random_params(family, 3, 4, seed=1)
    prec = pg.precisions(p)
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    torch.testing.assert_close(prec @ pg.covariances(p), eye, rtol=0, atol=1e-10)
    u = pg.precision_cholesky(p)
    assert torch.equal(u, torch.triu(u)), "precision Cholesky factor must be upper triangular"


def test_params_are_a_pytree_with_static_family():
    p = random_params("diagonal", 2, 3)
    leaves, spec = pytree.tree_flatten(p)
    assert len(leaves) == 3 and all(isinstance(t, torch.Tensor) for t in leaves)
    back = pytree.tree_unflatten(leaves, spec)
    assert back.family == "diagonal" and torch.equal(back.means, p.means)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.means = torch.zeros(2, 3)  # type: ignore[misc]


def test_repr_and_to():
    p = random_params("full", 3, 2)
    assert repr(p) == "GMMParams(family='full', K=3, D=2, dtype=float64, device=cpu)"
    q = p.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in pytree.tree_leaves(q))
    assert q.family == "full"


@pytest.mark.parametrize(
    "weights, covs, match",
    [
        ([0.5, 0.6], None, "sum to 1"),
        ([1.2, -0.2], None, "positive"),
        ([0.5, 0.5], [[[1.0, 0.5], [0.4, 1.0]]] * 2, "symmetric"),
        ([0.5, 0.5], [[[1.0, 2.0], [2.0, 1.0]]] * 2, "positive definite"),
    ],
)
def test_from_moments_rejects_bad_moments(weights, covs, match):
    covs = torch.eye(2).expand(2, 2, 2) if covs is None else torch.tensor(covs)
    with pytest.raises(ValueError, match=match):
        pg.from_moments(torch.tensor(weights), torch.zeros(2, 2), covs)


@pytest.mark.parametrize(
    "family, cov, match",
    [
        ("diagonal", [[[1.0, 0.1], [0.1, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], "diagonal"),
        ("isotropic", [[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]], "identity"),
        ("tied", [[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]], "same covariance"),
        ("shared", [[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]], "same covariance"),
        ("constant", [[[1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.0, 3.0]]], "identity"),
    ],
)
def test_from_moments_checks_family_structure(family, cov, match):
    with pytest.raises(ValueError, match=match):
        pg.from_moments(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.tensor(cov), family=family)


def test_unknown_family_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown family 'spherical'"):
        pg.from_moments(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None], family="spherical")
    with pytest.raises(ValueError, match=r"covariances must be \[K, D, D\]"):
        pg.from_moments(torch.ones(1), torch.zeros(1, 2), torch.eye(3)[None])
    with pytest.raises(ValueError, match="NaN"):
        pg.from_moments(torch.ones(1), torch.full((1, 2), float("nan")), torch.eye(2)[None])


# --- tolerances follow the dtype (issue 12, defect 12) ----------------------------------------


def _spd(k: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Well-conditioned SPD matrices [K, D, D] rounded to ``dtype``, exactly symmetric."""
    a = torch.randn(k, d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cov = (a @ a.mT / d + 0.5 * torch.eye(d, dtype=torch.float64)).to(dtype)
    return torch.triu(cov) + torch.triu(cov, 1).mT  # the upper triangle mirrored: exactly symmetric


@pytest.mark.parametrize("family", ["full", "tied"])
def test_from_moments_accepts_a_one_ulp_asymmetry_in_float32(family):
    """float32 covariances one ulp off symmetric (what rounding leaves) are accepted, and the
    params hold their symmetric part (up to the float32 Cholesky round trip: ~D·κ·eps)."""
    k, d = 3, 4
    cov = _spd(1 if family == "tied" else k, d, torch.float32).expand(k, d, d).clone()
    cov[:, 0, 2] = torch.nextafter(cov[:, 0, 2], torch.tensor(math.inf))  # one ulp up, above the diagonal only
    assert bool((cov != cov.mT).any())
    w = torch.tensor([0.2, 0.3, 0.5])
    p = pg.from_moments(w, torch.zeros(k, d), cov, family=family)
    want = 0.5 * (cov + cov.mT).double()
    kappa = float(torch.linalg.cond(want).max())
    atol = 16 * d * kappa * torch.finfo(torch.float32).eps * float(want.abs().max())
    torch.testing.assert_close(pg.covariances(p).double(), want, rtol=0, atol=atol)


def test_symmetry_tolerance_follows_the_dtype():
    """The same relative asymmetry, 1e-6 (8 float32 ulps), is rounding in float32 and an error
    in float64; a real asymmetry (1e-3) is an error in both, with a message that says how large."""
    base = _spd(2, 3, torch.float64, seed=1)
    for rel, dtype, ok in ((1e-6, torch.float32, True), (1e-6, torch.float64, False), (1e-3, torch.float32, False)):
        cov = base.clone()
        cov[:, 1, 0] += rel * base.abs().amax((-2, -1))  # relative to each component's size
        cov = cov.to(dtype)
        args = (torch.tensor([0.5, 0.5], dtype=dtype), torch.zeros(2, 3, dtype=dtype), cov)
        if ok:
            pg.from_moments(*args)
        else:
            with pytest.raises(ValueError, match=r"covariances must be symmetric; component \d has \|Σ - Σᵀ\| up to"):
                pg.from_moments(*args)


def test_symmetry_tolerance_scales_with_the_means():
    """A covariance computed as E[xxᵀ] - μμᵀ (scikit-learn's tied estimator) carries rounding of
    the size of |μ|², not of |Σ|: with means ~100, 1e-3 relative to |Σ| is float32 rounding."""
    cov = _spd(2, 3, torch.float32, seed=2)
    cov[:, 1, 0] += 1e-3 * float(cov.abs().max())
    w = torch.tensor([0.5, 0.5])
    pg.from_moments(w, torch.full((2, 3), 100.0), cov)
    with pytest.raises(ValueError, match="symmetric"):
        pg.from_moments(w, torch.zeros(2, 3), cov)


def test_from_moments_checks_structure_at_the_dtypes_rounding():
    """Structure is checked at the dtype's rounding: 1e-6 off-diagonal passes in float32 only."""
    for dtype, ok in ((torch.float32, True), (torch.float64, False)):
        cov = torch.eye(2, dtype=dtype).repeat(2, 1, 1)
        cov[:, 0, 1] = cov[:, 1, 0] = 1e-6
        args = (torch.tensor([0.5, 0.5], dtype=dtype), torch.zeros(2, 2, dtype=dtype), cov, "diagonal")
        if ok:
            assert torch.equal(pg.covariances(pg.from_moments(*args)), torch.eye(2, dtype=dtype).expand(2, 2, 2))
        else:
            with pytest.raises(ValueError, match="family 'diagonal' needs diagonal covariances"):
                pg.from_moments(*args)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_pad_components_copies_component_zero(batch):
    """Padding appends masked components whose per-component leaves copy component 0; a scale
    shared by all components is left as it is."""
    for family in pg.FAMILIES:
        ps = [random_params(family, 2, 3, seed=s) for s in range(2)]
        p = (
            ps[0]
            if not batch
            else pg.GMMParams(*(torch.stack([getattr(q, f) for q in ps]) for f in ("logits", "means", "scale")), family)
        )
        q = pg.pad_components(p, 4)
        nb = len(batch)
        assert torch.equal(q.means.narrow(nb, 0, 2), p.means)
        assert torch.equal(q.means.narrow(nb, 2, 2), p.means.narrow(nb, 0, 1).expand(*batch, 2, 3))
        assert bool(torch.isneginf(q.logits[..., 2:]).all())
        torch.testing.assert_close(pg.covariances(q)[..., :2, :, :], pg.covariances(p), rtol=0, atol=0)
        torch.testing.assert_close(
            pg.covariances(q)[..., 2:, :, :], pg.covariances(p)[..., :1, :, :].expand(*batch, 2, 3, 3), rtol=0, atol=0
        )


def test_a_seventh_family_row_drives_the_peripheral_modules(monkeypatch):
    """A tied-diagonal family added as one row of the table works, unchanged, in the MDN head,
    the structure checks, padding, parameter counts and the torch/scikit-learn converters (each
    checked against the mixture written out by hand)."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    from puregmm import families

    monkeypatch.setitem(families._TABLE, "tied_diagonal", families.Family("tied_diagonal", 1, False, True))
    k, d = 3, 2
    assert pg.param_size(k, d, "tied_diagonal") == k + k * d + d
    raw = torch.randn(4, k + k * d + d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mdn = pg.from_flat(raw, k, d, "tied_diagonal", min_variance=1e-3)
    var = 1e-3 + torch.exp(raw[:, -d:])  # [4, D], one variance vector for every component
    rtol = 16 * EPS64 * (1 + float(var.log().abs().max()))  # through log σ² and back: eps·|log σ²|
    torch.testing.assert_close(
        pg.covariances(mdn), torch.diag_embed(var)[:, None].expand(4, k, d, d), rtol=rtol, atol=0
    )

    cov = torch.diag_embed(torch.tensor([[1.0, 2.0]] * k, dtype=torch.float64))
    unequal = torch.diag_embed(torch.tensor([[1.0, 2.0], [1.0, 3.0], [1.0, 2.0]], dtype=torch.float64))
    for c, match in ((unequal, "the same covariance"), (cov + 0.1 * (1 - torch.eye(d)), "diagonal covariances")):
        with pytest.raises(ValueError, match=f"family 'tied_diagonal' needs {match}"):
            pg.from_moments(torch.full((k,), 1 / k, dtype=torch.float64), torch.zeros(k, d), c, "tied_diagonal")

    means = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 2.0]], dtype=torch.float64)
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    sd = torch.tensor([0.5, 2.0], dtype=torch.float64)
    p = pg.pad_components(pg.GMMParams(logits, means, -torch.log(sd), "tied_diagonal"), 5)
    assert p.scale.shape == (d,) and pg.n_parameters(p) == (k - 1) + k * d + d
    x = torch.randn(20, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    comp = norm(means.numpy()[None], sd.numpy()).logpdf(x.numpy()[:, None]).sum(-1) + logits.numpy()  # [N, K]
    want = logsumexp(comp, axis=-1)
    r2 = float((((x[:, None] - means) / sd.min()) ** 2).sum(-1).max())  # squared widths to the farthest row
    atol = 16 * EPS64 * d * float(sd.max() / sd.min()) ** 2 * (d + r2)  # eps·D·κ·(D + r²)
    gm = pg.to_sklearn(p)  # the masked padding is dropped
    assert gm.covariance_type == "tied" and gm.n_components == k
    np.testing.assert_allclose(gm.covariances_, np.diag(sd.numpy() ** 2), rtol=4 * EPS64)
    np.testing.assert_allclose(gm.score_samples(x.numpy()), want, rtol=0, atol=atol)
    dist = pg.to_distribution(p)
    assert isinstance(dist.component_distribution, torch.distributions.Independent)
    np.testing.assert_allclose(dist.log_prob(x).numpy(), want, rtol=0, atol=atol)
