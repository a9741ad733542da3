"""The E-step's safer (whitened) mode is chosen per component by the rounding bound: with one
narrow far component among wide ones, the statistics equal the all-whitened mode's (scikit-learn's
way) to rounding, for every per-component family."""

from __future__ import annotations

import pytest
import torch

import puregmm as pg
from puregmm import _moments as mo
from puregmm import estep

EPS = torch.finfo(torch.float64).eps


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_one_flagged_component_equals_the_whitened_mode(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 3, generator=g, dtype=torch.float64), 1e3 + 1e-7 * torch.randn(5, 3, generator=g)])
    cov = torch.stack([torch.eye(3), 2 * torch.eye(3), 1e-12 * torch.eye(3)]).double()
    means = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1e3, 1e3, 1e3]], dtype=torch.float64)
    p = pg.from_moments(torch.tensor([0.5, 0.49, 0.01], dtype=torch.float64), means, cov, family)
    flagged = mo.rounding_bound(p, mo.centre_of(p)) > mo.MAX_ROUNDING
    assert flagged.tolist() == [False, False, True]
    want = estep.whitened_stats(p, x, None, None)

    def everything_whitened(*args: object) -> None:
        raise AssertionError("the whole E-step was whitened for one flagged component")

    monkeypatch.setattr(estep, "whitened_stats", everything_whitened)
    got = pg.sufficient_stats(p, x)  # eager: only component 2 whitened
    for name in got._fields:
        a, b = getattr(got, name), getattr(want, name)
        # the two modes sum the same terms in other orders: N·eps relative to the sums' magnitude
        tol = 10 * x.shape[0] * EPS * max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= tol, name
