"""The E-step's missing mode: how a chunk of rows with missing entries becomes moments
(private; :func:`puregmm.estep.missing_stats` runs it through the E-step's one chunk loop).

Rows that miss something go through :class:`NaturalRows`, the natural mode's two GEMMs on the
rows filled at the centre plus the terms of the missing block (the exponential-family expansion
of the same density). The missing block's factors (P_mm⁻¹, ½ log det P_mm per component) depend
only on the row's pattern of missing entries, so eager E-steps make them once per pattern
(:class:`Patterns`: rows share few patterns, and with a few missing entries even MCAR rows do:
1e5 rows at 10 % MCAR, D = 16, have ~4,000 patterns and most rows miss 1-3 entries); a run of
consecutive rows of one pattern (the plan's frequent patterns) goes through GEMMs of its
columns, the other rows gather their pattern's factors, grouped by their count J of missing
entries. Under transforms and ``torch.compile``
each row factorises its own block (width D, padded: :class:`Table` of the rows). Where the
exponential-family form would round by more than :data:`puregmm._moments.MAX_ROUNDING` nats
(plain eager E-steps only, the complete-data rule), each segment of the rows' plan
(:func:`puregmm._masked.plan`) is whitened instead: a frequent pattern by the one density on its
marginal and one conditional for its rows, other rows by the per-row precision-block form
(:class:`SegmentTerms`, accumulated by :class:`puregmm._masked.Moments`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from puregmm import _masked, density
from puregmm import _moments as mo
from puregmm._masked import RowTerms, Segment, pattern_ids
from puregmm._missing_blocks import Group, Pairs, Table
from puregmm.params import GMMParams, precision_cholesky
from puregmm.stats import total

#: Bytes of the tables of pattern factors (P_mm⁻¹ [patterns, J, J, K], ½ log det and Σ r) kept
#: for the whole E-step, all counts J together; a count whose table would pass it gets a table
#: of each chunk's own patterns instead, so memory stays bounded by the chunk.
TABLE_BYTES = 8 << 20


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
    k, (n, d) = params.n_components, x.shape
    mdtype = mo.moment_dtype(x.dtype)
    p64 = params.to(mdtype)
    eager = not _masked.traced(x, observed, p64.logits, p64.means, p64.scale)
    centre = mo.centre_of(p64)
    safe = eager and bool((mo.rounding_bound(p64, centre) > mo.MAX_ROUNDING).any())  # whiten each row instead
    weight = observed.any(1).to(mdtype) * (1.0 if w is None else w.to(mdtype))  # an empty row adds nothing
    if owned and x.dtype == mdtype and mo.plain(x):
        marked = x.masked_fill_(~observed, torch.nan)  # the caller's own regrouped copy: no second one
    else:
        marked = torch.where(observed, x, torch.nan).to(mdtype)  # [n, D]: the worst rows keep their mask
    if safe:
        lo = segments[0].start
        segs = [Segment(s.start - lo, s.stop - lo, s.kind, s.width, s.seen, s.miss) for s in segments]
        acc = _masked.Moments(params.spec, k, d, p64.means)
        add, rows = (
            _whitened(p64, observed, segs, acc),
            chunk_size or _masked.row_chunk(k, d, max(s.width for s in segs)),
        )
    else:
        natural = NaturalRows(p64, centre)
        rows = natural.chunk_rows(n, marked, chunk_size, eager)
        patterns = Patterns(natural, observed) if eager else None

        def add(chunk: Tensor, wc: Tensor | None, start: int, stop: int) -> Tensor:
            assert wc is not None
            if patterns is not None:
                return patterns.add(chunk, observed[start:stop], wc, start, stop)
            table = Table.of_rows(natural.prec_flat, observed[start:stop])  # traced: each row its own block, width D
            groups = [Group(0, stop - start, 0, table, None)]
            return natural.add(chunk, observed[start:stop], wc, groups, by_dim=False)

    score_sum, _, worst_ll, worst = chunk_pass(marked, weight, k, rows, add, eager=eager)
    filled = impute_rows(p64, worst, ~torch.isnan(worst))  # the worst rows, their missing entries filled
    _, w_sum = total(x.new_zeros(n), w, x)  # every row counts, an empty one too
    if safe:
        moments = acc.result()
    else:
        if patterns is not None:
            patterns.flush()
        moments = natural.result()
    return moments, (score_sum, w_sum, worst_ll.to(params.dtype), filled.to(params.dtype))


def _whitened(p: GMMParams, observed: Tensor, segs: list[Segment], acc: _masked.Moments) -> Callable[..., Tensor]:
    """The chunk function of the whitened path: each segment's rows by :class:`SegmentTerms`."""
    terms = SegmentTerms(p)

    def add(xc: Tensor, wc: Tensor | None, start: int, stop: int) -> Tensor:
        oc = observed[start:stop]
        scores = []
        for seg in segs:
            a, b = max(seg.start, start), min(seg.stop, stop)
            if a < b:
                rows = slice(a - start, b - start)
                assert wc is not None
                lj, resid, cond = terms(seg, xc[rows], oc[rows])
                scores.append(acc.add(lj, resid, cond, wc[rows]))
                if b == seg.stop:  # the segment's last rows: its pattern's factors are not needed again
                    terms.cache.pop(id(seg), None)
        return torch.cat(scores) if len(scores) != 1 else scores[0]

    return add


def impute_rows(params: GMMParams, x: Tensor, observed: Tensor) -> Tensor:
    """Rows [m, D] with their missing entries replaced by E[x_m | x_o] under the mixture."""
    t = RowTerms(*density.row_parts(params), x, observed, x.shape[1])
    r = torch.softmax(t.log_joint, -1)  # [m, K]
    return torch.einsum("nk,knd->nd", r, t.resid + params.means.unsqueeze(1))


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


# --- the natural form -------------------------------------------------------------------------------


class Patterns:
    """The eager missing mode's rows by pattern (module docstring): the patterns of the rows'
    missing entries (:func:`pattern_ids`, once per E-step), per count J one :class:`Table` of its
    patterns (made when first needed; a count whose table would bring the kept ones past
    :data:`TABLE_BYTES` gets a table of each chunk's own patterns), and each chunk's rows sorted
    by J into :class:`Group` s."""

    def __init__(self, rows: NaturalRows, observed: Tensor) -> None:
        self.rows = rows
        self.ids, self.masks = pattern_ids(~observed)  # [n], [G, D]
        self.count = self.masks.sum(1)  # [G]: J of each pattern
        self.local = torch.zeros_like(self.count)  # [G]: a pattern's entry in its count's table
        self.tables: dict[int, Table | None] = {}
        self.kept = 0  # bytes of the kept tables

    def table(self, width: int, ids: Tensor) -> tuple[Table, Tensor, bool]:
        """(table, each row's entry, whether the table is the chunk's own) for rows of patterns ``ids``."""
        if width not in self.tables:
            members = torch.nonzero(self.count == width).squeeze(1)
            size = 8 * members.numel() * self.rows.k * (width * width + 2)
            keep = self.kept + size <= TABLE_BYTES
            if keep:
                self.local[members] = torch.arange(members.numel(), device=members.device)
                self.kept += size
            self.tables[width] = self._table(members, width) if keep else None
        kept = self.tables[width]
        if kept is not None:
            return kept, self.local.index_select(0, ids), False
        members, loc = torch.unique(ids, return_inverse=True)
        return self._table(members, width), loc, True

    def _table(self, members: Tensor, width: int) -> Table:
        miss = torch.nonzero(self.masks.index_select(0, members))[:, 1].view(members.numel(), width)  # increasing
        return Table(self.rows.prec_flat, miss)

    def add(self, x: Tensor, observed: Tensor, w: Tensor, start: int, stop: int) -> Tensor:
        """log p(x_o) [c] of a chunk of rows ``start:stop``: its runs of one pattern (at least
        :data:`puregmm._masked.ROWS_PER_PATTERN` consecutive rows: the plan's frequent patterns)
        first, one :class:`Group` each, then the other rows sorted by their count J of missing
        entries (rows with nothing observed last, log p = 0), one :class:`Group` per J (or
        several, each's [c, J, J, K] blocks near :data:`puregmm._masked.ROW_CHUNK_BYTES`)."""
        c, d = x.shape
        ids = self.ids[start:stop]
        widths = self.count.index_select(0, ids)  # [c]
        runs = self._runs(ids, d)
        key = widths + len(runs)  # the other rows after the runs, by J
        for i, (a, b, _, _) in enumerate(runs):
            key[a:b] = i
        order = None if bool((key[1:] >= key[:-1]).all()) else torch.argsort(key, stable=True)
        if order is not None:
            x, observed, w, ids = (t.index_select(0, order) for t in (x, observed, w, ids))
        sizes = torch.bincount(widths, minlength=d + 1).tolist()
        groups, own, first = [], [], 0
        for a, b, pattern, width in runs:
            table, loc, mine = self.table(width, ids.new_full((1,), pattern))
            groups.append(Group(first, first + b - a, 0, table, None, int(loc)))
            own += [table] if mine else []
            first, sizes[width] = first + b - a, sizes[width] - (b - a)
        runs_end, pair = first, 0
        for width, size in enumerate(sizes[:d]):
            step = max(1, _masked.ROW_CHUNK_BYTES // (8 * self.rows.k * max(1, width * width)))
            for a in range(first, first + size, step):
                b = min(first + size, a + step)
                table, loc, mine = self.table(width, ids[a:b])
                groups.append(Group(a, b, pair + (a - first) * width, table, loc))
                own += [table] if mine else []
            first, pair = first + size, pair + size * width
        used = c - sizes[d]
        lse = x.new_zeros(0) if not used else self.rows.add(x[:used], observed[:used], w[:used], groups, runs_end)
        lse = F.pad(lse, (0, c - used))
        for table in own:
            self.rows.block = table.flush(self.rows.block)
        return lse if order is None else torch.empty_like(lse).index_copy_(0, order, lse)

    def _runs(self, ids: Tensor, d: int) -> list[tuple[int, int, int, int]]:
        """(start, stop, pattern, J) of the runs of at least :data:`puregmm._masked.ROWS_PER_PATTERN`
        consecutive rows of one pattern with something observed in ``ids`` [c]."""
        starts = F.pad(torch.nonzero(ids[1:] != ids[:-1]).squeeze(1) + 1, (1, 0))  # [runs]
        lengths = torch.diff(F.pad(starts, (0, 1), value=ids.numel()))
        long = torch.nonzero(lengths >= _masked.ROWS_PER_PATTERN).squeeze(1)
        if long.numel() == 0:
            return []
        a, n = starts.index_select(0, long), lengths.index_select(0, long)
        pattern = ids.index_select(0, a)
        found = zip(a.tolist(), n.tolist(), pattern.tolist(), self.count.index_select(0, pattern).tolist(), strict=True)
        return [(s, s + m, p, j) for s, m, p, j in found if j < d]

    def flush(self) -> None:
        """Place the kept tables' sums into the rows' dense block."""
        for table in self.tables.values():
            if table is not None:
                self.rows.block = table.flush(self.rows.block)


class NaturalRows:
    """The per-row form in exponential-family form (the E-step's natural mode, :mod:`puregmm._moments`,
    on the rows filled at the centre g): for rows x_f = x with the missing entries at g,

        ℓ_k(x_o) = ⟨η_k, T(x_f)⟩ - ½ gᵀδ + ½|m| log 2π - ½ log det P_mm,   δ = -P_mm⁻¹ g_m,
        g = P_k (x_f - μ_k),  x̂_k = x_f + δ (at the missing entries),

    and the moments of x̂_k are those of x_f (M += r T, the natural mode's GEMM) plus the terms
    of δ: Σ r δ and Σ r (x_f - g) δᵀ and its transpose, and Σ r (δ δᵀ + P_mm⁻¹) on the J×J
    blocks (:class:`Table`). T, ℓ's GEMM, the responsibilities and M's GEMM are one pass per
    chunk, as in the complete-data E-step; the J×J algebra is per :class:`Group` of rows with J
    missing entries. A run of one pattern takes g_m and δ from one GEMM (δ = [x_f - g, 1] V with
    V = -W P_mm⁻¹, W the pattern's columns) and Σ r δδᵀ = Vᵀ Σ [x_f - g, 1] (r δ)ᵀ from its
    cross GEMM: no per-row J×J work. For the other rows, g_m and the cross sums
    Σ [x_f - g, 1] (r δ)ᵀ are eagerly (``by_dim``) one small GEMM per dimension i over the
    chunk's (row, slot) pairs missing i ([pairs, D+1] x [D+1, K]: J·K columns per row, not the
    K·D of a full gradient); branch-free (under
    transforms), one [c, D+1] x [D+1, K·D] GEMM of the full gradient and one over δ spread into
    [c, K·D]. It rounds as the natural mode does (eps·(distance/width)²); plain eager E-steps
    past :data:`puregmm._moments.MAX_ROUNDING` use :class:`puregmm._masked.RowTerms`.
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
        grad = torch.cat([prec.permute(1, 0, 2), -bias.unsqueeze(0)])  # [D+1, K, D]: [y, 1] -> P_k (y - d_k)
        self.pcat = grad.reshape(d + 1, k * d)  # [D+1, K·D]
        self.by_dim = grad.permute(2, 0, 1).contiguous()  # [D, D+1, K]: dimension i's columns
        self.work: mo.Work | None = None  # plain eager: T's and ℓ's buffers, reused by every chunk
        self.raw = params.means.new_zeros(k, self.lay.width)  # Σ r T
        self.cross = params.means.new_zeros(d, d + 1, k)  # [i, :, k]: Σ [x_f - g, 1] r δ_i; row D: Σ r δ
        self.block = params.means.new_zeros(d * d, k)  # Σ r (δ δᵀ + P_mm⁻¹), dense

    def chunk_rows(self, n: int, x: Tensor, chunk_size: int | None, eager: bool) -> int:
        """Rows per chunk: ``chunk_size``, or eagerly T's [c, P] block near the complete-data
        E-step's :data:`puregmm._moments.CHUNK_BYTES`, branch-free the [c, K·D] blocks near
        :data:`puregmm._masked.ROW_CHUNK_BYTES`. With plain eager rows ``x``, T's buffers of
        that many rows are made here."""
        if eager:
            rows = mo.chunk_rows(n, self.lay, chunk_size)
        else:
            rows = chunk_size or max(64, min(n, _masked.ROW_CHUNK_BYTES // (8 * self.k * self.d)))
        if mo.plain(x, self.eta, self.pcat):
            self.work = mo.Work(self.lay, rows, self.k, x, self.eta.dtype)
        return rows

    def add(
        self, x: Tensor, observed: Tensor, w: Tensor, groups: list[Group], runs_end: int = 0, by_dim: bool = True
    ) -> Tensor:
        """Rows [c, D] (``groups`` cover them in order, the runs of one pattern before ``runs_end``),
        weights [c]; returns log p(x_o) [c]."""
        c, k = x.shape[0], self.k
        y = torch.where(observed, x - self.centre, 0.0)  # x_f - g
        t = mo.products(self.lay, y + self.centre, self.centre, y.dtype, self.work)  # [c, P]
        yl = F.pad(y, (0, 1), value=1.0)  # [c, D+1]
        pairs = Pairs(~observed[runs_end:], yl[runs_end:]) if by_dim and runs_end < c else None
        grad = yl @ self.pcat if not by_dim else pairs.gradient(self.by_dim) if pairs is not None else None
        steps: list[Tensor] = []
        fixes: list[Tensor] = []
        maps: list[Tensor] = []  # the runs' V
        for grp in groups:
            table, rows = grp.table, grp.stop - grp.start
            if grp.run is not None:  # one pattern: g and δ by one GEMM (δ = [x_f - g, 1] V, V = -W P_mm⁻¹)
                cols, maps = self._run_maps(table, grp.run, maps)
                both = yl[grp.start : grp.stop] @ cols  # [c_j, 2·J·K]
                g, step = both.view(rows, 2, table.width, k).unbind(1)
                fixes.append((g * step).sum(1).mul_(-0.5).add_(table.pick(grp.run)[1]))
                steps.append(step)
                continue
            assert grad is not None
            if pairs is not None:
                g = grad[grp.pair : grp.pair + rows * table.width].view(rows, table.width, k)  # [c_j, J, K]
            else:  # every component's full gradient, its missing entries gathered; padding zero
                g = grad[grp.start : grp.stop].gather(1, table.idx.view(rows, -1)).view(rows, table.width, k)
                g = g if table.valid is None else torch.where(table.valid.unsqueeze(2), g, 0.0)
            inv, term = table.pick(grp.loc)  # [c_j, J, J, K], [c_j, K]
            step = (inv * g.unsqueeze(1)).sum(2).neg_()  # [c_j, J, K]: δ = -P_mm⁻¹ g
            fixes.append((g * step).sum(1).mul_(-0.5).add_(term))  # [c_j, K]: ½ gᵀP_mm⁻¹g + ½|m| log 2π - ½ log det
            steps.append(step)
        fix = fixes[0] if len(fixes) == 1 else torch.cat(fixes)
        if self.work is not None:  # in place, in the workspace
            lj = torch.mm(self.eta, t.mT, out=self.work.lj[:, :c]).add_(fix.mT)  # [K, c]
            r, lse = mo.responsibilities(lj, inplace=True)
            self.raw.addmm_(r.mul_(w), t)
        else:
            r, lse = mo.responsibilities(self.eta @ t.mT + fix.mT, inplace=False)
            r = r * w
            self.raw = self.raw + r @ t
        r_steps = []
        for grp, step in zip(groups, steps, strict=True):
            table, rg = grp.table, r[:, grp.start : grp.stop].mT  # [c_j, K]
            r_step = step * rg.unsqueeze(1)  # [c_j, J, K]
            if grp.run is None:
                r_steps.append(r_step)
                self.block = table.add_rows(self.block, grp.loc, r_step.unsqueeze(2) * step.unsqueeze(1), rg)
                continue
            part = (yl[grp.start : grp.stop].mT @ r_step.reshape(r_step.shape[0], -1)).view(-1, table.width, k)
            self.cross = self.cross.index_add(0, table.miss[grp.run], part.transpose(0, 1))  # Σ [x_f - g, 1] (r δ)ᵀ
            outer = torch.einsum("dik,djk->ijk", maps.pop(0), part)  # Σ r δδᵀ = Vᵀ Σ [x_f - g, 1] (r δ)ᵀ
            self.block = table.add_run(self.block, grp.run, 0.5 * (outer + outer.transpose(0, 1)), rg.sum(0))
        if r_steps:
            self._add_cross(yl[runs_end:], r_steps, pairs, groups)
        return lse

    def _run_maps(self, table: Table, entry: int, maps: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """([D+1, 2·J·K]: the columns W of ``entry``'s missing dimensions (g = [x_f - g, 1] W) and
        V = -W P_mm⁻¹ (δ = [x_f - g, 1] V), and ``maps`` with V [D+1, J, K] appended."""
        w = table.columns(entry, self.pcat).view(self.d + 1, table.width, self.k)  # [D+1, J, K]
        v = -torch.einsum("djk,ijk->dik", w, table.pick(entry)[0][0])  # P_mm⁻¹ symmetric
        return torch.stack([w, v], 1).view(self.d + 1, -1), [*maps, v]

    def _add_cross(self, yl: Tensor, r_steps: list[Tensor], pairs: Pairs | None, groups: list[Group]) -> None:
        """Σ [x_f - g, 1] (r δ)ᵀ of the chunk into ``cross`` [D, D+1, K]."""
        k, d = self.k, self.d
        if pairs is not None:
            flat = torch.cat([s.reshape(-1, k) for s in r_steps]) if len(r_steps) != 1 else r_steps[0].reshape(-1, k)
            self.cross = self.cross.index_add(0, pairs.dims, pairs.cross(flat))
            return
        (grp,) = groups  # branch-free: one group of width D, δ spread over [c, K·D], one GEMM
        idx = grp.table.idx.view(yl.shape[0], -1)
        spread = torch.zeros(yl.shape[0], k * d, dtype=yl.dtype, device=yl.device).scatter(
            1, idx, r_steps[0].view(yl.shape[0], -1)
        )
        self.cross = self.cross + (yl.mT @ spread).view(d + 1, k, d).permute(2, 0, 1)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(n_k, X_k, S_k) about the means, S_k in the family's shape (blocks flushed)."""
        k, d = self.k, self.d
        n, x_k, s_k = mo.about_centres(self.lay, self.raw, self.shift)
        dx = self.cross[:, d].mT  # [K, D]: Σ r δ
        cross = self.cross[:, :d].permute(2, 1, 0) - self.shift.unsqueeze(2) * dx.unsqueeze(1)  # [K, D, D]
        dense = cross + cross.mT + self.block.view(d, d, k).permute(2, 0, 1)  # [K, D, D]
        return n, x_k + dx, s_k + self.spec.weighted_second_moments(torch.ones_like(n), dense)
