"""Hypothesis strategies and builders for random mixtures of every family."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import puregmm as pg


def random_covariances(family: str, k: int, d: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Covariances [K, D, D] of the family's structure, well conditioned."""
    if family in ("full", "tied"):
        a = torch.randn(k, d, d, generator=gen, dtype=dtype)
        cov = a @ a.mT / d + 0.5 * torch.eye(d, dtype=dtype)
        return cov if family == "full" else cov[:1].expand(k, d, d).clone()
    if family == "diagonal":
        return torch.diag_embed(0.3 + torch.rand(k, d, generator=gen, dtype=dtype))
    var = 0.3 + torch.rand(k if family == "isotropic" else 1, 1, generator=gen, dtype=dtype)
    return torch.diag_embed(var.expand(k, d)).clone()


def random_params(
    family: str, k: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64, spread: float = 3.0
) -> pg.GMMParams:
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=gen, dtype=dtype) + 0.2
    mu = spread * torch.randn(k, d, generator=gen, dtype=dtype)
    return pg.from_moments(w / w.sum(), mu, random_covariances(family, k, d, gen, dtype), family=family)


def random_data(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64, spread: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(3, d, generator=gen, dtype=dtype)
    return centres[torch.arange(n) % 3] + torch.randn(n, d, generator=gen, dtype=dtype)


@st.composite
def mixtures(draw: st.DrawFn, families: tuple[str, ...] = pg.FAMILIES, dtype: torch.dtype = torch.float64):
    """(params, x): a random mixture and random data of the same dimension."""
    family = draw(st.sampled_from(families))
    k = draw(st.integers(1, 4))
    d = draw(st.integers(1, 4))
    n = draw(st.integers(max(k, 2), 40))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_params(family, k, d, seed, dtype), random_data(n, d, seed + 1, dtype)
