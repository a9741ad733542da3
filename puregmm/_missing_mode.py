"""The E-step's missing mode: how a chunk of rows with missing entries becomes moments
(private; :func:`puregmm.estep.missing_stats` runs it through the E-step's one chunk loop).

Rows that miss something go through :class:`NaturalRows`, the natural mode's two GEMMs on the
rows filled at the centre plus the terms of the missing block (the exponential-family expansion
of the same density). Where that form would round by more than
:data:`puregmm._moments.MAX_ROUNDING` nats (plain eager E-steps only, the complete-data rule),
each segment of the rows' plan (:func:`puregmm._masked.plan`) is whitened instead: a frequent
pattern by the one density on its marginal and one conditional for its rows, other rows by the
per-row precision-block form (:class:`SegmentTerms`, accumulated by
:class:`puregmm._masked.Moments`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from puregmm import _masked, density
from puregmm import _moments as mo
from puregmm._masked import RowTerms, Segment
from puregmm.families import LOG_2PI
from puregmm.params import GMMParams, precision_cholesky
from puregmm.stats import total


def incomplete_stats(
    params: GMMParams,
    x: Tensor,
    observed: Tensor,
    w: Tensor | None,
    segments: list[Segment],
    chunk_size: int | None,
    chunk_pass: Callable[..., tuple[Tensor, ...]],
    owned: bool = False,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
    """(n_k, X_k, S_k) and (Σ ω log p, Σ ω, the K worst log p, their rows filled) of rows that
    miss something (``segments`` relative to ``x``'s first row) by the E-step's ``chunk_pass``
    (:func:`puregmm.estep.chunk_pass`; :func:`puregmm.estep.missing_stats` makes the Stats).
    ``owned``: ``x`` is a view of the caller's own copy, whose missing entries may be overwritten."""
    spec, k, (n, d) = params.spec, params.n_components, x.shape
    mdtype = mo.moment_dtype(x.dtype)
    p64 = params.to(mdtype)
    lo = segments[0].start
    segs = [Segment(s.start - lo, s.stop - lo, s.kind, s.width, s.seen, s.miss) for s in segments]
    terms = SegmentTerms(p64)
    acc = _masked.Moments(spec, k, d, p64.means)
    eager = not _masked.traced(x, observed, p64.logits, p64.means, p64.scale)
    centre = mo.centre_of(p64)
    safe = eager and bool((mo.rounding_bound(p64, centre) > mo.MAX_ROUNDING).any())  # whiten each row instead
    natural = None if safe else NaturalRows(p64, centre)
    weight = observed.any(1).to(mdtype) * (1.0 if w is None else w.to(mdtype))  # an empty row adds nothing

    def add(chunk: Tensor, wc: Tensor | None, start: int, stop: int) -> Tensor:
        xc, oc = chunk, observed[start:stop]
        scores = []
        for seg in segs:
            a, b = max(seg.start, start), min(seg.stop, stop)
            if a < b:
                rows, piece = slice(a - start, b - start), (xc[a - start : b - start], oc[a - start : b - start])
                assert wc is not None
                if natural is not None and seg.kind == "rows":
                    scores.append(natural.add(*piece, seg.width, wc[rows]))
                    continue
                lj, resid, cond = terms(seg, *piece)
                scores.append(acc.add(lj, resid, cond, wc[rows]))
                if b == seg.stop:  # the segment's last rows: its pattern's factors are not needed again
                    terms.cache.pop(id(seg), None)
        return torch.cat(scores) if len(scores) != 1 else scores[0]

    widest = max(s.width for s in segs)
    if owned and x.dtype == mdtype and mo.plain(x):
        marked = x.masked_fill_(~observed, torch.nan)  # the caller's own regrouped copy: no second one
    else:
        marked = torch.where(observed, x, torch.nan).to(mdtype)  # [n, D]: the worst rows keep their mask
    rows = natural.chunk_rows(n, marked, chunk_size) if natural else chunk_size or _masked.row_chunk(k, d, widest)
    score_sum, _, worst_ll, worst = chunk_pass(marked, weight, k, rows, add, eager=eager)
    filled = terms.impute(worst, ~torch.isnan(worst))  # the worst rows, their missing entries filled
    _, w_sum = total(x.new_zeros(n), w, x)  # every row counts, an empty one too
    moments = acc.result()
    if natural is not None:
        moments = tuple(a + b for a, b in zip(moments, natural.result(), strict=True))  # type: ignore[assignment]
    return moments, (score_sum, w_sum, worst_ll.to(params.dtype), filled.to(params.dtype))


class SegmentTerms:
    """Per segment of rows: (ℓ [c, K], x̂_k - μ_k [c, K, D], conditional covariance) from the one
    density: the marginal's whitening for a pattern (its conditional shared by the rows), the
    per-row form otherwise (:class:`puregmm._masked.RowTerms`)."""

    def __init__(self, params: GMMParams) -> None:
        self.params = params
        self.cache: dict[Any, Any] = {}

    def __call__(self, seg: Segment, x: Tensor, observed: Tensor) -> tuple[Tensor, Tensor, Tensor | RowTerms]:
        p, k, d = self.params, self.params.n_components, self.params.dim
        if seg.kind == "empty":  # weight 0: only shapes matter
            lj = torch.log_softmax(p.logits, -1).expand(x.shape[0], k)
            return lj, x.new_zeros(k, x.shape[0], d), x.new_zeros(k, d, d)
        if seg.kind == "pattern":
            assert seg.seen is not None and seg.miss is not None
            if id(seg) not in self.cache:
                white = density.whitening(density.marginal_params(p, seg.seen))
                raw, coef = p.spec.conditional_scale(p.scale, seg.miss, seg.seen, k)
                cov = _masked.embed(p.spec.covariances(raw, k, len(seg.miss)), seg.miss, d)
                self.cache[id(seg)] = (white, coef, cov)
            white, coef, cov = self.cache[id(seg)]
            lj = density.joint_log_prob_chunk(white, x.index_select(1, seg.seen))
            return lj, _masked.pattern_resid(coef, p.means, x, seg.seen, seg.miss), cov
        if "rows" not in self.cache:
            self.cache["rows"] = density.row_parts(p)
        w, u, means, log_w = self.cache["rows"]
        t = RowTerms(w, u, means, log_w, x, observed, seg.width)
        return t.log_joint, t.resid, t

    def impute(self, x: Tensor, observed: Tensor) -> Tensor:
        """Rows [m, D] with their missing entries replaced by E[x_m | x_o] under the mixture."""
        t = RowTerms(*density.row_parts(self.params), x, observed, x.shape[1])
        r = torch.softmax(t.log_joint, -1)  # [m, K]
        return torch.einsum("nk,knd->nd", r, t.resid + self.params.means.unsqueeze(1))


class NaturalRows:
    """The per-row form in exponential-family form (the E-step's natural mode, :mod:`puregmm._moments`,
    on the rows filled at the centre g): for rows x_f = x with the missing entries at g,

        ℓ_k(x_o) = ⟨η_k, T(x_f)⟩ - ½ gᵀδ + ½|m| log 2π - ½ log det P_mm,   δ = -P_mm⁻¹ g_m,
        g = P_k (x_f - μ_k) (one [c, D] x [D, K·D] GEMM),  x̂_k = x_f + δ (at the missing entries),

    and the moments of x̂_k are those of x_f (M += r T, the natural mode's GEMM) plus the terms
    of δ: Σ r (x_f - μ_k) δᵀ (one [D, c] x [c, K·D] GEMM) and its transpose, and Σ r (δ δᵀ +
    P_mm⁻¹) on the J×J blocks. About twice the complete-data E-step's GEMMs and no [K, c, D]
    passes beyond one scatter. It rounds as the natural mode does (eps·(distance/width)²); plain
    eager E-steps past :data:`puregmm._moments.MAX_ROUNDING` use :class:`puregmm._masked.RowTerms`.
    """

    def __init__(self, params: GMMParams, centre: Tensor) -> None:
        spec, k, d = params.spec, params.n_components, params.dim
        self.spec, self.k, self.d, self.centre = spec, k, d, centre
        self.lay = spec.moment_layout(d)
        self.eta = mo.natural(params, centre, params.dtype, self.lay)  # [K, P]
        u = precision_cholesky(params)
        prec = u @ u.mT  # [K, D, D]
        self.prec_flat = prec.reshape(k, d * d)
        self.shift = params.means - centre  # [K, D]
        bias = torch.einsum("kd,kde->ke", self.shift, prec)  # [K, D]: (μ_k - g) P_k
        pcat = prec.permute(1, 0, 2).reshape(d, k * d)  # [D, K·D]: y @ pcat = (y P_k)_k
        self.pcat = torch.cat([pcat, -bias.reshape(1, k * d)])  # [D+1, K·D]: [y, 1] @ pcat = P_k (y - d_k)
        self.work: mo.Work | None = None  # plain eager: T and the spread of δ in buffers reused by every chunk
        self.spread: Tensor | None = None
        self.raw = params.means.new_zeros(k, self.lay.width)  # Σ r T
        self.dx = params.means.new_zeros(k, d)  # Σ r δ
        self.cross = params.means.new_zeros(d, k * d)  # Σ (x_f - g) (r δ)ᵀ
        self.block = params.means.new_zeros(k, d * d)  # Σ r (δ δᵀ + P_mm⁻¹), dense

    def chunk_rows(self, n: int, x: Tensor, chunk_size: int | None) -> int:
        """Rows per chunk (``chunk_size``, or the [c, K·D] blocks near
        :data:`puregmm._masked.ROW_CHUNK_BYTES`); with plain eager rows ``x``, the buffers of that
        many rows are made here."""
        rows = chunk_size or max(64, min(n, _masked.ROW_CHUNK_BYTES // (8 * self.k * self.d)))
        if x is not None and mo.plain(x, self.eta, self.pcat):
            self.work = mo.Work(self.lay, rows, self.k, x, self.eta.dtype)
            self.spread = x.new_zeros(rows, self.k * self.d, dtype=self.eta.dtype)
        return rows

    def add(self, x: Tensor, observed: Tensor, width: int, w: Tensor) -> Tensor:
        """Rows [c, D] missing at most ``width`` entries, weights [c]; returns log p(x_o) [c]."""
        c, k, d = x.shape[0], self.k, self.d
        y = torch.where(observed, x - self.centre, 0.0)  # x_f - g
        t = mo.products(self.lay, y + self.centre, self.centre, y.dtype, self.work)  # [c, P]
        n_miss = d - observed.sum(1)
        miss = torch.argsort(observed.to(torch.int8), dim=1, stable=True)[:, :width]  # [c, J]
        valid = torch.arange(width, device=x.device) < n_miss.unsqueeze(1)  # [c, J]
        padded = _masked.traced(x, observed) or not bool(valid.all())  # eager segments miss exactly J
        grad = F.pad(y, (0, 1), value=1.0) @ self.pcat  # [c, K·D]: P_k (x_f - μ_k), the shift folded in
        idx = (torch.arange(k, device=x.device) * d).view(1, k, 1) + miss.unsqueeze(1)  # [c, K, J]
        g = grad.gather(1, idx.view(c, -1)).view(c, k, width)
        flat = (miss.unsqueeze(2) * d + miss.unsqueeze(1)).reshape(-1)  # [c·J·J]
        pair = (valid.unsqueeze(2) & valid.unsqueeze(1)).unsqueeze(1)  # [c, 1, J, J]
        pmm = self.prec_flat.index_select(1, flat).view(k, c, width, width).transpose(0, 1)
        if padded:  # padding: zero gradient, identity block
            g = torch.where(valid.unsqueeze(1), g, 0.0)
            pmm = torch.where(pair, pmm, torch.eye(width, dtype=x.dtype, device=x.device))
        entries = [[pmm[:, :, i, j] for j in range(width)] for i in range(width)]  # [c, K] each
        if width <= _masked.SMALL_WIDTH:
            gs = [g[:, :, i] for i in range(width)]
            sol, half_log_det, inv = _masked.spd_entries(entries, gs)
            step = -torch.stack(sol, -1)  # [c, K, J]: δ
            cov = torch.stack([torch.stack(row, -1) for row in inv], -2)  # [c, K, J, J]: P_mm⁻¹
            quad = gs[0] * sol[0]  # gᵀ P_mm⁻¹ g [c, K] (sums over J by entries: no reduction over a tiny axis)
            for i in range(1, width):
                quad = quad + gs[i] * sol[i]
        else:
            chol = torch.linalg.cholesky(pmm)
            step = -torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
            half_log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            cov = torch.cholesky_inverse(chol)
            quad = -(g * step).sum(-1)
        lj = (self.eta @ t.mT).mT + 0.5 * quad - half_log_det  # [c, K] (Tᵀ is the contiguous one)
        lj = lj + 0.5 * LOG_2PI * n_miss.unsqueeze(1).to(x.dtype)
        lse = torch.logsumexp(lj, 1)
        r = torch.exp(lj - lse.unsqueeze(1)) * w.unsqueeze(1)  # [c, K]
        self.raw = self.raw + r.mT @ t
        r_step = step * r.unsqueeze(-1)  # [c, K, J]
        if self.spread is None:
            spread = torch.zeros(c, k * d, dtype=x.dtype, device=x.device).scatter(
                1, idx.view(c, -1), r_step.view(c, -1)
            )
        else:  # the buffer holds zeros: write the entries, use them, zero them again
            spread = self.spread[:c].scatter_(1, idx.view(c, -1), r_step.view(c, -1))
        self.dx = self.dx + spread.sum(0).view(k, d)
        self.cross = self.cross + y.mT @ spread
        if self.spread is not None:
            spread.scatter_(1, idx.view(c, -1), 0.0)
        inner = r_step.unsqueeze(-1) * step.unsqueeze(-2) + cov * r[..., None, None]  # [c, K, J, J]
        vals = (torch.where(pair, inner, 0.0) if padded else inner).transpose(0, 1).reshape(k, -1)  # [K, c·J·J]
        self.block = self.block.scatter_add(1, flat.unsqueeze(0).expand(k, -1), vals)
        return lse

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(n_k, X_k, S_k) about the means, S_k in the family's shape."""
        k, d = self.k, self.d
        n, x_k, s_k = mo.about_centres(self.lay, self.raw, self.shift)
        cross = self.cross.view(d, k, d).transpose(0, 1) - self.shift.unsqueeze(2) * self.dx.unsqueeze(1)
        dense = cross + cross.mT + self.block.view(k, d, d)  # [K, D, D]
        return n, x_k + self.dx, s_k + self.spec.weighted_second_moments(torch.ones_like(n), dense)
