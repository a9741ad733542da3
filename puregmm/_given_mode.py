"""The E-step's *given responsibilities* mode: :class:`puregmm.Stats` of responsibilities that
are given (hard labels or soft), not computed from params — how :func:`puregmm.init` turns a
k-means partition into its first M-step. The moments come from the same per-chunk products
(:mod:`puregmm._moments`) and the same chunk loop as :func:`puregmm.sufficient_stats`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from puregmm import _moments as mo
from puregmm._chunks import chunk_pass, to_stats
from puregmm._pooled_mode import _Pooled
from puregmm.families import Family, get_family, layout
from puregmm.stats import Stats


def responsibility_stats(
    x: Tensor,
    resp: Tensor,
    centres: Tensor,
    family: str,
    sample_weight: Tensor | None = None,
    score: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> Stats:
    """:class:`puregmm.Stats` of given responsibilities ``resp`` [N, K] (hard or soft), about
    ``centres`` [K, D]; used by :func:`puregmm.init` so that initial covariances come from
    :func:`puregmm.m_step`.

    ``score`` [N] ranks points for re-seeding empty components (lowest first; default: minus
    the squared distance to the nearest centre) and fills ``log_lik_sum``. The moments come
    from the same per-chunk products as in :func:`sufficient_stats`.
    """
    spec = get_family(family)
    k, d = centres.shape
    n = x.shape[0]
    mdtype = mo.moment_dtype(x.dtype)
    if score is None:
        score = -torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist").square().amin(-1)
    centre = centres.detach().mean(0)  # [D]
    shift = centres.detach() - centre
    plain = mo.plain(x, resp, centres, sample_weight, score)
    if spec.pooled_moments:  # rows of r sum to one: Σ_k Σ_n r (y yᵀ) = Σ_n ω y yᵀ
        acc = _Pooled(k, d, centre, mdtype, x.device)

        def add_pooled(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
            y, lift = acc.lift(xc)
            acc.add(y, lift, resp[start:stop].to(mdtype), ws)
            return score[start:stop]

        rows = mo.chunk_rows(n, layout(1, d), chunk_size)  # sized as a [c, 2D+1] block
        passed = chunk_pass(x, sample_weight, k, rows, add_pooled, eager=plain)
        return to_stats(acc.about(shift), passed, x.dtype)
    return _given_stats(spec, x, resp, centre, shift, sample_weight, score, chunk_size, plain)


def _given_stats(
    spec: Family, x: Tensor, resp: Tensor, centre: Tensor, shift: Tensor, sample_weight: Tensor | None,
    score: Tensor, chunk_size: int | None, plain: bool,
) -> Stats:  # fmt: skip
    """:func:`responsibility_stats` of a per-component family: M += rᵀ T per chunk."""
    k, (n, d) = resp.shape[1], x.shape
    lay = spec.moment_layout(d, square=mo.square_layout(n, d, k, plain, chunk_size))
    mdtype = mo.moment_dtype(x.dtype)
    rows = mo.chunk_rows(n, lay, chunk_size)
    work = mo.Work(lay, rows, k, x, mdtype) if plain else None
    raw = torch.zeros(k, lay.width, dtype=mdtype, device=x.device)

    def add(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
        nonlocal raw
        r = resp[start:stop].to(mdtype)  # [c, K]
        r = r if ws is None else r * ws.unsqueeze(1)
        t = mo.products(lay, xc, centre, mdtype, work)
        raw = raw.addmm_(r.mT, t) if work is not None else raw + r.mT @ t
        return score[start:stop]

    passed = chunk_pass(x, sample_weight, k, rows, add, eager=plain)
    return to_stats(mo.about_centres(lay, raw, shift.to(mdtype)), passed, x.dtype)


def label_stats(
    x: Tensor, labels: Tensor, centres: Tensor, family: str, sample_weight: Tensor | None, score: Tensor
) -> Stats:
    """:func:`responsibility_stats` of hard assignments ``labels`` [N] (eager tensors only).

    Rows are grouped by label (one stable argsort) and each cluster's moments about its centre
    come from its own rows: O(N·D²) work in all instead of the O(N·K·D²) of a one-hot GEMM, one
    cluster's rows copied at a time. Used by :func:`puregmm.init` after k-means(++).
    """
    spec = get_family(family)
    k = centres.shape[0]
    mdtype = mo.moment_dtype(x.dtype)
    order = torch.argsort(labels, stable=True)
    sizes = torch.bincount(labels, minlength=k).tolist()
    n_k, x_k, s_k = [], [], []
    start = 0
    for j, size in enumerate(sizes):
        rows = order[start : start + size]
        start += size
        y = x.index_select(0, rows).to(mdtype) - centres[j].to(mdtype)  # [n_j, D]
        wy = y if sample_weight is None else y * sample_weight.index_select(0, rows).to(mdtype).unsqueeze(1)
        n_k.append(wy.new_tensor(float(size)) if sample_weight is None else sample_weight.index_select(0, rows).sum())
        x_k.append(wy.sum(0))
        s_k.append(spec.scatter(wy, y))
    passed = chunk_pass(x, sample_weight, k, max(1, x.shape[0]), lambda xc, ws, a, b: score, eager=True)
    return to_stats((torch.stack(n_k), torch.stack(x_k), torch.stack(s_k)), passed, x.dtype)
