"""Issue 12, defect 8: rows far from the data, or at infinity, score -inf or their true value,
never the clamp's log K + 3 log eps: log p is non-increasing along every ray away from the data."""

from __future__ import annotations

import math

import pytest
import torch

import puregmm as pg


def _params(family: str, dtype: torch.dtype) -> pg.GMMParams:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    return pg.fit(x, 3, family, method="em", key=0).params.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", pg.FAMILIES)
def test_log_prob_non_increasing_along_rays(family: str, dtype: torch.dtype) -> None:
    params = _params(family, dtype)
    g = torch.Generator().manual_seed(5)
    directions = torch.nn.functional.normalize(torch.randn(8, 3, generator=g, dtype=torch.float64), dim=1)
    top = math.log10(torch.finfo(dtype).max)
    t = torch.logspace(0, top, 400, dtype=torch.float64)  # 1 ... max float of the dtype
    for v in directions:
        rays = (t[:, None] * v).to(dtype)  # [T, 3], all finite
        rays = torch.cat([rays, (v * math.inf).nan_to_num(nan=0.0).to(dtype)[None]])  # and the point at infinity
        lp = pg.log_prob(params, rays)
        assert not torch.isnan(lp).any()
        assert bool((lp[1:] <= lp[:-1]).all()), lp
        assert lp[-1] == -math.inf
        # beyond sqrt(max) the squared distance is not representable: -inf, never the clamp's value
        beyond = t > 10 * torch.finfo(dtype).max ** 0.5
        assert bool((lp[:-1][beyond] == -math.inf).all())


@pytest.mark.parametrize("family", pg.FAMILIES)
def test_far_row_ranks_below_near_row(family: str) -> None:
    params = _params(family, torch.float64)
    x = torch.tensor([[1e3, 0.0, 0.0], [1e159, 0.0, 0.0], [math.inf, 0.0, 0.0]], dtype=torch.float64)
    lp = pg.log_prob(params, x)
    assert lp[0] > lp[1] and lp[1] == -math.inf and lp[2] == -math.inf
    assert pg.score_samples(params, x)[1] == -math.inf
