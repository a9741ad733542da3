"""The missing blocks of the E-step's missing mode (private; :mod:`puregmm._missing_mode`): the
rows' patterns of missing entries, per pattern (or per row) the J×J precision blocks P_k,mm
factorised, and the (row, dimension) pairs of a chunk's missing entries by dimension.

Layout: block axes before the components ([B, J, J, K], [c, J, K]), so that every slice over
the block axes is a contiguous run of K and sums over J are passes over a middle axis (about
10x faster than sums over a last axis of 2 or 3 entries).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from puregmm import _masked
from puregmm.families import LOG_2PI


def spd_factors(a: Tensor) -> tuple[Tensor, Tensor]:
    """(A⁻¹ [B, J, J, K], ½ log det A [B, K]) of SPD blocks A [B, J, J, K] (the block axes
    before the components: every slice [B, ·, ·, K] is a contiguous run of K, and sums over J are
    passes over the middle axis, ~10x faster than over a last axis of 2 or 3). J ≤
    :data:`puregmm._masked.SMALL_WIDTH`: entry by entry, vectorised over [B, K]; wider: LAPACK."""
    width = a.shape[1]
    if width == 0:
        return a, a.new_zeros(a.shape[0], a.shape[3])
    if width > _masked.SMALL_WIDTH or a.shape[0] * a.shape[3] < 4 * width**3:  # few blocks: ~1 µs each
        chol = torch.linalg.cholesky(a.permute(0, 3, 1, 2))  # [B, K, J, J]
        half_log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return torch.cholesky_inverse(chol).permute(0, 2, 3, 1), half_log_det
    entries = [[a[:, i, j] for j in range(width)] for i in range(width)]  # [B, K] each
    _, half_log_det, inv = _masked.spd_entries(entries, entries[0])  # right-hand sides unused
    return torch.stack([torch.stack(row, 1) for row in inv], 1), half_log_det


class Table:
    """The missing blocks of a set of patterns (or of rows, under transforms), J entries each:
    where they sit (``idx`` [B, J, K] in the [K·D] gradient, ``flat`` [B, J·J] in a [D·D]
    block), P_k,mm⁻¹ [B, J, J, K] and the log-density's term ½ |m| log 2π - ½ log det P_k,mm
    [B, K] (one [B, J·J·K + K] block, so that a row takes both by one gather), and Σ r [B, K] of the rows
    seen (:meth:`add_rows`; r P_mm⁻¹ is placed per entry by :meth:`flush`). ``valid`` [B, J]:
    padding (rows of fewer than J missing entries) where False."""

    def __init__(self, prec_flat: Tensor, miss: Tensor, valid: Tensor | None = None) -> None:
        b, width = miss.shape
        k, d = prec_flat.shape[0], math.isqrt(prec_flat.shape[1])
        self.width, self.valid, self.miss = width, valid, miss
        self.idx = (torch.arange(k, device=miss.device) * d).view(1, 1, k) + miss.unsqueeze(2)  # [B, J, K]
        self.flat = (miss.unsqueeze(2) * d + miss.unsqueeze(1)).reshape(b, width * width)
        pmm = prec_flat.index_select(1, self.flat.reshape(-1)).view(k, b, width, width).permute(1, 2, 3, 0)
        if valid is not None:  # padding: identity block (its gradient is zero: no step there)
            self.pair = (valid.unsqueeze(2) & valid.unsqueeze(1)).unsqueeze(3)  # [B, J, J, 1]
            eye = torch.eye(width, dtype=pmm.dtype, device=pmm.device).unsqueeze(2)
            pmm = torch.where(self.pair, pmm, eye)
        inv, half_log_det = spd_factors(pmm)
        n_miss = width if valid is None else valid.sum(1, keepdim=True).to(inv.dtype)  # [B, 1]
        term = 0.5 * LOG_2PI * n_miss - half_log_det  # [B, K]
        self.packed = torch.cat([inv.reshape(b, width * width * k), term], 1)  # [B, J·J·K + K]
        self.inv = self.packed[:, : width * width * k].view(b, width, width, k)
        self.resp: Tensor | None = None  # Σ r per entry

    def pick(self, loc: Tensor | int | None) -> tuple[Tensor, Tensor]:
        """(P_mm⁻¹ [c, J, J, K], ½ |m| log 2π - ½ log det P_mm [c, K]) of entries ``loc`` [c]
        (None: all, in order; an int: that entry, [1, ...])."""
        if isinstance(loc, int):
            rows = self.packed[loc : loc + 1]
        else:
            rows = self.packed if loc is None else self.packed.index_select(0, loc)
        k, split = self.inv.shape[-1], self.width * self.width * self.inv.shape[-1]
        return rows[:, :split].view(-1, self.width, self.width, k), rows[:, split:]

    @classmethod
    def of_rows(cls, prec_flat: Tensor, observed: Tensor) -> Table:
        """Each row's own block, width D, missing entries first (branch-free: under transforms)."""
        d = observed.shape[1]
        miss = torch.argsort(observed.to(torch.int8), dim=1, stable=True)  # [c, D]
        valid = torch.arange(d, device=observed.device) < (d - observed.sum(1)).unsqueeze(1)
        return cls(prec_flat, miss, valid)

    def add_rows(self, block: Tensor, loc: Tensor | None, outer: Tensor, r: Tensor) -> Tensor:
        """``block`` [D·D, K] plus rows' r δδᵀ [c, J, J, K] at their J×J positions (eagerly in
        place), their r [c, K] kept per entry ``loc`` [c]; None: row i is entry i, and r P_mm⁻¹
        is added now (out of place, padding masked)."""
        k = outer.shape[-1]
        if loc is None:
            vals = outer + r.unsqueeze(1).unsqueeze(1) * self.inv  # [c, J, J, K]
            vals = vals if self.valid is None else torch.where(self.pair, vals, 0.0)
            return block.index_add(0, self.flat.reshape(-1), vals.reshape(-1, k))
        if self.resp is None:
            self.resp = r.new_zeros(self.inv.shape[0], self.inv.shape[-1])
        self.resp.index_add_(0, loc, r)
        return block.index_add_(0, self.flat.index_select(0, loc).reshape(-1), outer.reshape(-1, k))

    def columns(self, entry: int, pcat: Tensor) -> Tensor:
        """[D+1, J·K]: the columns of ``pcat`` [D+1, K·D] of entry ``entry``'s missing dimensions."""
        return pcat.index_select(1, self.idx[entry].reshape(-1))

    def add_run(self, block: Tensor, entry: int, outer: Tensor, r: Tensor) -> Tensor:
        """``block`` [D·D, K] plus a run's Σ r δδᵀ [J, J, K] at entry ``entry``'s positions (in
        place), its Σ r [K] kept for :meth:`flush`."""
        if self.resp is None:
            self.resp = r.new_zeros(self.inv.shape[0], self.inv.shape[-1])
        self.resp[entry] += r
        return block.index_add_(0, self.flat[entry], outer.reshape(-1, outer.shape[-1]))

    def flush(self, block: Tensor) -> Tensor:
        """``block`` [D·D, K] plus Σ r P_mm⁻¹ of each entry at its J×J positions."""
        if self.resp is None:
            return block
        vals = self.resp.unsqueeze(1).unsqueeze(1) * self.inv  # [B, J, J, K]
        return block.index_add(0, self.flat.reshape(-1), vals.reshape(-1, vals.shape[-1]))


class Group(NamedTuple):
    """Rows ``start:stop`` of a chunk, each missing ``table.width`` entries: a run of one pattern,
    ``table``'s entry ``run``, or rows whose blocks are ``table``'s entries ``loc`` (None: entry i
    is row i) and whose (row, slot) pairs, row-major over the chunk's rows past its runs, start at
    ``pair``."""

    start: int
    stop: int
    pair: int
    table: Table
    loc: Tensor | None
    run: int | None = None


class Pairs:
    """The (row, dimension) pairs of a chunk's missing entries ``missing`` [c, D], sorted by
    dimension (each dimension's pairs one contiguous span; eager: the spans are Python ints),
    with each pair's position in row-major order (the order of the groups' slots: a row's
    missing dimensions increasing), for one small GEMM per dimension."""

    def __init__(self, missing: Tensor, yl: Tensor) -> None:
        dims, rows = torch.nonzero(missing.mT).unbind(1)  # by dimension, then row
        counts = missing.sum(0).tolist()
        ends = [sum(counts[: i + 1]) for i in range(len(counts))]
        self.spans = [(i, ends[i] - counts[i], ends[i]) for i in range(len(counts)) if counts[i]]
        self.dims = torch.tensor([i for i, _, _ in self.spans], dtype=torch.int64, device=missing.device)
        slot = missing.cumsum(1) - 1  # [c, D]: a missing entry's slot in its row
        first = F.pad(slot[:, -1] + 1, (1, 0)).cumsum(0)  # [c+1]: each row's first pair, row-major
        self.position = first.index_select(0, rows) + slot[rows, dims]  # [pairs]: row-major position
        self.ys = yl.index_select(0, rows)  # [pairs, D+1]

    def gradient(self, by_dim: Tensor) -> Tensor:
        """g [pairs, K] in row-major order: (P_k (x_f - μ_k))_i of each pair (row, i)."""
        out = torch.cat([self.ys[a:b] @ by_dim[i] for i, a, b in self.spans])
        return torch.empty_like(out).index_copy_(0, self.position, out)

    def cross(self, r_step: Tensor) -> Tensor:
        """Σ over each dimension i's pairs of [x_f - g, 1] (r δ_i)ᵀ: [dims, D+1, K] (``r_step`` row-major)."""
        rs = r_step.index_select(0, self.position)
        return torch.stack([self.ys[a:b].mT @ rs[a:b] for _, a, b in self.spans])
