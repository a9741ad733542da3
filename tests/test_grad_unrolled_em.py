"""Issue 12, defect 7: autodiff through k unrolled EM steps differentiates exactly the function
eager mode evaluates (against finite differences, k = 1..5, every family, random problems)."""

from __future__ import annotations

import pytest
import torch

import puregmm as pg


def _problem(family: str, seed: int) -> tuple[torch.Tensor, pg.GMMParams, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = 3
    x = torch.randn(80, d, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    p0 = pg.init(x, 3, family, key=seed)
    means0 = p0.means + 0.3 * torch.randn(3, d, generator=g, dtype=torch.float64)
    v = torch.randn(3, d, generator=g, dtype=torch.float64)
    return x, p0, means0, v / v.norm()


def _richardson(f, h: float) -> float:
    """Central difference with one Richardson step: truncation O(h⁴) instead of O(h²)."""
    d1 = (f(h) - f(-h)) / (2 * h)
    d2 = (f(h / 2) - f(-h / 2)) / h
    return float((4 * d2 - d1) / 3)


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_grad_through_unrolled_em_matches_finite_differences(family: str, seed: int) -> None:
    x, p0, means0, v = _problem(family, seed)

    def loss_after(means: torch.Tensor, k: int) -> torch.Tensor:
        p = pg.GMMParams(p0.logits, means, p0.scale, p0.family)
        for _ in range(k):
            p = pg.em_step(p, x)
        return pg.loss(p, x)

    for k in range(1, 6):
        auto = float((torch.func.grad(loss_after)(means0, k) * v).sum())
        fd = _richardson(lambda h, k=k: loss_after(means0 + h * v, k), 1e-3)
        # the finite difference's own error: rounding eps·|f|/h plus truncation (h⁴ with Richardson);
        # the loss is O(1) here, so 1e-6 relative leaves two orders of margin over both
        assert abs(auto - fd) <= 1e-6 * max(abs(fd), 1e-3), (k, auto, fd)
