"""The E-step's one loop over rows (:func:`chunk_pass`) and what it keeps of them besides the
moments: the totals of the rows' scores and the K lowest-scoring rows (for re-seeding empty
components), merged across chunks (:class:`Worst`) and ranked without the zero-weight padding.
Every mode of :mod:`puregmm.estep` (and of :mod:`puregmm._missing_mode`) runs through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from puregmm.stats import Stats, total

ARGMIN_MAX_K = 8  # up to this many components, the K lowest rows by K argmin passes, not a sort
#: Data of at most this many rows, in one chunk, rank their rows by one stable sort (fewer small
#: ops than :class:`Worst`'s top-K passes, and a sort of a few thousand is cheap).
SORT_MAX_ROWS = 4096
#: add(x_chunk [c, D], weights [c] | None, start, stop) -> the chunk's ranking score [c]
Add = Callable[[Tensor, "Tensor | None", int, int], Tensor]


def chunk_pass(
    x: Tensor, w: Tensor | None, k: int, rows: int, add: Add, eager: bool, lowest_rows: bool = True
) -> tuple[Tensor, ...]:
    """The one loop over the rows of ``x`` [N, D]: ``add`` per chunk of ``rows``.

    Returns (Σ ω score, Σ ω, the K lowest scores [K], their rows [K, D]); zero-weight rows are
    never among the lowest (padding). ``lowest_rows=False``: only the two sums (a score pass).
    """
    n = x.shape[0]
    if lowest_rows and eager and 0 < n <= min(rows, SORT_MAX_ROWS):  # one small eager chunk: one sort
        score = add(x, w, 0, n)
        return (*total(score, w, x), *lowest(ranked(score, w), x, k))
    score_sum: Tensor | float = 0.0
    weight_sum: Tensor | float = 0.0
    worst = Worst(k)
    for start in range(0, n, rows):  # a chunk's score is used here and then dropped: nothing of size N
        stop = min(n, start + rows)
        ws = None if w is None else w[start:stop]
        score = add(x[start:stop], ws, start, stop)
        part, count = total(score, ws, x[start:stop])
        score_sum, weight_sum = score_sum + part, weight_sum + count
        if lowest_rows:
            worst.add(ranked(score, ws), start, eager=eager)
    if not isinstance(score_sum, Tensor) or not isinstance(weight_sum, Tensor):  # no rows
        score_sum, weight_sum = total(x.new_zeros(0), w, x)
    return (score_sum, weight_sum, *worst.result(x)) if lowest_rows else (score_sum, weight_sum)


def to_stats(moments: tuple[Tensor, Tensor, Tensor], passed: tuple[Tensor, ...], dtype: torch.dtype) -> Stats:
    n_k, x_k, s_k = (t.to(dtype) for t in moments)
    score_sum, weight_sum, worst_ll, worst_x = passed
    return Stats(n_k, x_k, s_k, score_sum.to(dtype), weight_sum, worst_ll, worst_x)


class Worst:
    """The K lowest scores of the rows seen so far (stable: ties keep the earlier row), from each
    chunk's K lowest, merged once at the end (row indices only until then)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.vals: list[Tensor] = []
        self.rows: list[Tensor] = []

    def add(self, ranked: Tensor, start: int, eager: bool = False) -> None:
        """Keep the K lowest of ``ranked`` [c] (rows ``start`` + i). ``eager`` (plain tensors
        only): sort just the rows at or below the K-th lowest value instead of all c."""
        m = min(self.k, ranked.shape[0])
        order = None
        if eager:
            kth = torch.topk(ranked, m, largest=False, sorted=False).values.max()
            cand = (ranked <= kth).nonzero().squeeze(1)  # the m lowest and their ties, in row order
            if cand.numel() >= m:  # else NaN among the m lowest: the full sort below
                order = cand.index_select(0, torch.sort(ranked.index_select(0, cand), stable=True).indices[:m])
        if order is None and m <= ARGMIN_MAX_K:  # m passes of argmin (first occurrence: stable)
            # +inf marks a taken row, so +inf and NaN scores rank as the largest finite value
            big = torch.finfo(ranked.dtype).max
            left = torch.nan_to_num(ranked, nan=big, posinf=big)
            picks = []
            for j in range(m):
                pick = torch.argmin(left, 0, keepdim=True)
                picks.append(pick)
                if j + 1 < m:
                    left = left.scatter(0, pick, math.inf)
            order = torch.cat(picks)
        if order is None:
            order = torch.sort(ranked, stable=True).indices[:m]  # [m], lowest first
        self.vals.append(torch.gather(ranked, 0, order))
        self.rows.append(order + start)

    def result(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return lowest(torch.cat(self.vals), x, self.k, torch.cat(self.rows))


def lowest(scores: Tensor, x: Tensor, k: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The K lowest ``scores`` [c] (stable: ties keep the earlier entry) and their rows of ``x``
    (entry i is row ``rows[i]``, default i), padded with (+inf, a zero row) to K entries."""
    order = torch.sort(scores, stable=True).indices[:k]
    picked = order if rows is None else rows.index_select(0, order)
    worst_ll, worst_x = torch.gather(scores, 0, order).to(x.dtype), x.index_select(0, picked)
    m = worst_ll.shape[0]
    if m < k:  # fewer rows than components: pad with "no point"
        worst_ll = torch.cat([worst_ll, worst_ll.new_full((k - m,), float("inf"))])
        worst_x = torch.cat([worst_x, worst_x.new_zeros((k - m, x.shape[1]))])
    return worst_ll, worst_x


def ranked(score: Tensor, w: Tensor | None) -> Tensor:
    """Scores with zero-weight rows (padding) at +inf, so that they are never "worst"."""
    return score if w is None else torch.where(w > 0, score, torch.full_like(score, float("inf")))
