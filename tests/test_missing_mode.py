"""The E-step's missing mode at work (issue 15's speed target): rows grouped by their pattern of
missing entries, the J×J precision blocks factorised once per pattern (entry by entry, or by
LAPACK for wide or few blocks), one small GEMM per missing dimension, chunks split into groups.

Oracles: the NumPy incomplete-data EM of tests/test_missing.py (covariance-block formulas, no
puregmm code), the branch-free path (under ``vmap``: each row factorises its own padded block),
``torch.unique(dim=0)`` and ``torch.linalg``. Tolerances are the error bounds of tests/bounds.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import puregmm as pg
from puregmm import _masked, _missing_mode
from puregmm._masked import pattern_ids
from puregmm._missing_blocks import spd_factors
from tests import bounds
from tests.oracles import random_params
from tests.test_missing import completed, numpy_incomplete_em

F64, F32 = torch.float64, torch.float32


def many_missing(p: pg.GMMParams, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows drawn from ``p`` missing from 0 to D entries: 45 % MCAR, two rows that observe
    nothing, two complete ones, rows that observe one or two entries only (J = D - 1, D - 2:
    LAPACK blocks for D > 9) and 40 rows sharing one pattern."""
    d = p.dim
    x, _ = pg.sample(p.to(F64), n, key=seed)
    gen = torch.Generator().manual_seed(seed)
    observed = torch.rand(n, d, generator=gen) >= 0.45
    observed[:2], observed[2:4] = False, True
    for i in range(6, 16):  # one or two observed entries
        observed[i] = False
        observed[i, torch.randint(0, d, (1 + i % 2,), generator=gen)] = True
    observed[16:56] = observed[16]  # a frequent pattern
    return torch.where(observed, x, torch.nan), observed


def _step(p: pg.GMMParams, x: torch.Tensor, observed: torch.Tensor, vmapped: bool) -> tuple:
    def one(q: pg.GMMParams, xs: torch.Tensor, ob: torch.Tensor) -> tuple:
        return pg.em_step(q, xs, observed=ob, reg_covar=1e-6, chunk_size=48, return_info=True)

    if not vmapped:
        return one(p, x, observed)
    q, info = torch.func.vmap(one, in_dims=(None, 0, 0))(p, x[None], observed[None])
    return pg.GMMParams(q.logits[0], q.means[0], q.scale[0], q.family), info.log_likelihood[0]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("route", ["tables kept", "tables per chunk", "split groups", "runs", "branch-free"])
def test_em_step_with_up_to_all_entries_missing_matches_numpy(dtype, route, monkeypatch):
    if route == "runs":  # the plan groups patterns of 8 rows or more; the chunks take them as runs
        monkeypatch.setattr(_masked, "ROWS_PER_PATTERN", 8)
    if route == "tables per chunk":
        monkeypatch.setattr(_missing_mode, "TABLE_BYTES", 0)
    if route == "split groups":  # a chunk's rows of J missing entries in pieces of a few rows
        monkeypatch.setattr(_masked, "ROW_CHUNK_BYTES", 8 * 3 * 40)
    d = 11
    p = random_params("full", 3, d, seed=21, spread=1.5).to(dtype)
    x, observed = many_missing(p, 240, seed=22)
    assert int((~observed).sum(1).max()) == d and int((~observed).sum(1).min()) == 0
    assert int(((~observed).sum(1) > 8).sum()) >= 10  # blocks wider than the entry-by-entry form
    w, mu, cov, ll = numpy_incomplete_em(p.to(F64), x.numpy(), observed.numpy(), 1e-6)
    q, info = _step(p, x.to(dtype), observed, vmapped=route == "branch-free")
    rtol = bounds.stats_rtol(p, completed(p, x.to(dtype), observed))
    np.testing.assert_allclose(pg.weights(q).double().numpy(), w, rtol=rtol, atol=0)
    np.testing.assert_allclose(q.means.double().numpy(), mu, rtol=0, atol=rtol * np.abs(mu).max())
    np.testing.assert_allclose(pg.covariances(q).double().numpy(), cov, rtol=0, atol=rtol * np.abs(cov).max())
    got = float(info.log_likelihood if not isinstance(info, torch.Tensor) else info)
    atol = bounds.log_lik_atol(p, completed(p, x.to(dtype), observed), n=x.shape[0])
    np.testing.assert_allclose(got, ll, rtol=0, atol=atol)


@pytest.mark.parametrize("family", ["diagonal", "tied"])
def test_grouped_and_branch_free_steps_agree_on_other_families(family):
    """The per-pattern blocks of a diagonal precision are diagonal, a tied one's shared: both
    routes give the same step (to the bound of two summation orders)."""
    d = 7
    p = random_params(family, 3, d, seed=23)
    x, observed = many_missing(p, 160, seed=24)
    a, _ = _step(p, x, observed, vmapped=False)
    b, _ = _step(p, x, observed, vmapped=True)
    bounds.assert_params_close(a, b, bounds.stats_rtol(p, completed(p, x, observed)))


@pytest.mark.parametrize("d", [3, 16, 52, 53, 110])
def test_pattern_ids_match_unique_rows(d):
    """Bit codes of 52 columns each (two codes past 52): the same patterns as torch.unique(dim=0)."""
    gen = torch.Generator().manual_seed(d)
    missing = torch.rand(400, d, generator=gen) < (0.3 if d < 20 else 0.02)
    missing[::5] = missing[7]
    missing[3, -1] = ~missing[7, -1]  # differs from row 7 in the last column only
    missing[4] = missing[7]
    ids, masks = pattern_ids(missing)
    assert torch.equal(masks[ids], missing)
    assert masks.shape[0] == torch.unique(missing, dim=0).shape[0]
    assert ids[3] != ids[7] and ids[4] == ids[7]


@pytest.mark.parametrize("width, blocks", [(1, 40), (3, 40), (4, 1), (8, 2), (10, 5)])
def test_spd_factors_match_linalg(width, blocks):
    """Inverse and half log-determinant of SPD blocks [B, J, J, K], entry by entry (many small
    blocks) or by LAPACK (wide or few), against torch.linalg to γ_J·κ."""
    gen = torch.Generator().manual_seed(width)
    m = torch.randn(blocks, 4, width, width + 2, generator=gen, dtype=F64)
    a = m @ m.mT + 0.1 * torch.eye(width, dtype=F64)  # [B, K, J, J]
    inv, half_log_det = spd_factors(a.permute(0, 2, 3, 1).contiguous())
    want = torch.linalg.inv(a)
    kappa = max(bounds.cond(b) for b in a.reshape(-1, width, width))
    tol = bounds.SLACK * bounds.gamma(width) * kappa
    torch.testing.assert_close(inv.permute(0, 3, 1, 2), want, rtol=0, atol=tol * float(want.abs().max()))
    torch.testing.assert_close(half_log_det, 0.5 * torch.logdet(a), rtol=0, atol=tol)


@pytest.mark.parametrize("rows_per_pattern", [256, 1])
def test_autograd_through_the_grouped_step_equals_the_branch_free_gradient(rows_per_pattern, monkeypatch):
    """Eager autograd through the grouped E-step (per-pattern tables, in-place sums, runs when
    every pattern is grouped) gives the gradient that torch.func.grad takes through the
    branch-free one."""
    monkeypatch.setattr(_masked, "ROWS_PER_PATTERN", rows_per_pattern)
    p = random_params("full", 3, 6, seed=25)
    x, observed = many_missing(p, 150, seed=26)

    def loss(means: torch.Tensor) -> torch.Tensor:
        q = pg.GMMParams(p.logits, means, p.scale, p.family)
        return pg.em_step(q, x, observed=observed, reg_covar=1e-6).means.square().sum()

    leaf = p.means.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(loss(leaf), leaf)
    traced = torch.func.grad(loss)(p.means)
    bounds.assert_leaves_close(eager, traced, bounds.derivative_rtol(p, completed(p, x, observed)))


@pytest.mark.parametrize("d, chunk_size", [(1, 4), (4, 3), (4, None)])
def test_chunks_of_rows_that_observe_nothing_match_numpy(d, chunk_size):
    """Chunks where every row misses everything (log p = 0, no statistics), D = 1 (a row misses
    all or nothing), small chunks: the NumPy incomplete-data EM step."""
    p = random_params("full", 3, d, seed=27)
    x, _ = pg.sample(p, 60, key=28)
    observed = torch.rand(60, d, generator=torch.Generator().manual_seed(29)) > 0.4
    observed[10:40] = False
    observed[2] = True
    holes = torch.where(observed, x, torch.nan)
    w, mu, cov, ll = numpy_incomplete_em(p, holes.numpy(), observed.numpy(), 1e-6)
    q, info = pg.em_step(p, holes, observed=observed, reg_covar=1e-6, chunk_size=chunk_size, return_info=True)
    rtol = bounds.stats_rtol(p, completed(p, holes, observed))
    np.testing.assert_allclose(pg.weights(q).numpy(), w, rtol=rtol, atol=0)
    np.testing.assert_allclose(q.means.numpy(), mu, rtol=0, atol=rtol * np.abs(mu).max())
    np.testing.assert_allclose(pg.covariances(q).numpy(), cov, rtol=0, atol=rtol * np.abs(cov).max())
    atol = bounds.log_lik_atol(p, completed(p, holes, observed), n=60)
    np.testing.assert_allclose(float(info.log_likelihood), ll, rtol=0, atol=atol)
