"""Params: moments round-trip, structure validation, pytree behaviour, repr and moving."""

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

import puregmm as pg
from tests.strategies import random_covariances, random_params


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
