"""The E-step's pooled mode (tied family): no per-component second moments, by the one chunk
loop (:func:`puregmm._chunks.chunk_pass`); :mod:`puregmm.estep` chooses it, and the given mode
(:mod:`puregmm._given_mode`) shares its accumulators."""

from __future__ import annotations

import torch
from torch import Tensor

from puregmm import _moments as mo
from puregmm._chunks import chunk_pass, to_stats
from puregmm._fused import Whitening
from puregmm.families import layout
from puregmm.params import GMMParams
from puregmm.stats import Stats


def pooled_stats(
    params: GMMParams, x: Tensor, sample_weight: Tensor | None, chunk_size: int | None, centre: Tensor, plain: bool,
    white: Whitening | None = None,
) -> Stats:  # fmt: skip
    """The pooled mode (tied family): no per-component second moments.

    The tied M-step needs only Σ_k S_k = Σ_k Σ_n ω r_nk (x_n - c_k)(x_n - c_k)ᵀ, and as
    Σ_k r_nk = 1 its part about g is the pooled Σ_n ω y yᵀ. So per chunk: the linear
    log-densities [K, c] (a [K, D+1] GEMM; the common quadratic part is added to log p only,
    :func:`puregmm._moments.tied_natural`), the moments r [y, 1] [K, D+1] and the pooled
    scatter yᵀ ω y [D, D]: O(c·(K + D)·D) instead of the full family's O(c·K·D²).
    ``xx_sum[k]`` holds S_g / K (an equal share of the pooled scatter about the centre g)
    shifted to c_k, so that Σ_k xx_sum[k] = Σ_k S_k exactly and every consumer that sums,
    combines or re-centres statistics per component stays exact for the sum.
    """
    k, (n, d) = params.n_components, x.shape
    mdtype = mo.moment_dtype(x.dtype)
    u, eta = mo.tied_natural(params, centre, mdtype, white)  # [D, D], [K, D+1]
    acc = _Pooled(k, d, centre, mdtype, x.device)

    def add(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
        y, lift = acc.lift(xc)
        resp, lse = mo.responsibilities(eta @ lift.mT, inplace=plain)  # [K, c], [c]
        acc.add(y, lift, resp.mT, ws)
        return lse - 0.5 * (y @ u).square().sum(1)

    rows = mo.chunk_rows(n, layout(1, d), chunk_size)  # sized as a [c, 2D+1] block
    passed = chunk_pass(x, sample_weight, k, rows, add, eager=plain)
    return to_stats(acc.about(params.means.detach() - centre), passed, params.dtype)


class _Pooled:
    """Accumulators of the pooled mode: Σ ω r [y, 1] [K, D+1] and Σ ω y yᵀ [D, D] about g."""

    def __init__(self, k: int, d: int, centre: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self.centre, self.dtype = centre, dtype
        self.lin = torch.zeros(k, d + 1, dtype=dtype, device=device)
        self.scatter = torch.zeros(d, d, dtype=dtype, device=device)

    def lift(self, xc: Tensor) -> tuple[Tensor, Tensor]:
        y = (xc - self.centre).to(self.dtype)  # [c, D]
        return y, torch.cat([y, y.new_ones(y.shape[0], 1)], 1)  # [c, D+1]

    def add(self, y: Tensor, lift: Tensor, r: Tensor, ws: Tensor | None) -> None:
        """Rows y [c, D] with responsibilities r [c, K] (rows of r sum to one)."""
        wd = None if ws is None else ws.to(self.dtype).unsqueeze(1)
        self.lin = self.lin + (r if wd is None else r * wd).mT @ lift
        self.scatter = self.scatter + (y if wd is None else y * wd).mT @ y

    def about(self, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(n_k, X_k, S_k) about c_k = g + ``shift`` [K, D]; S_k takes the equal share S_g / K."""
        k, d = self.lin.shape[0], self.lin.shape[1] - 1
        shift = shift.to(self.dtype)
        x_g, n = self.lin[:, :d], self.lin[:, d]
        outer = x_g.unsqueeze(2) * shift.unsqueeze(1)  # X_g dᵀ
        s = self.scatter / k - outer - outer.mT + n[:, None, None] * shift.unsqueeze(2) * shift.unsqueeze(1)
        return n, x_g - n.unsqueeze(1) * shift, s
