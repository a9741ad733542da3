"""Rows with missing entries: how rows are grouped, and the per-row marginal and conditional
(private; used by :mod:`puregmm.density` and the E-step's missing mode in :mod:`puregmm.estep`).

Row n observes the entries o (``observed[n]``) and misses m. Per component, with precision
P = U Uᵀ and whitened residual z = (x - μ) U of the row with its missing entries filled by
anything (here the centre c of the means):

    x̂_m = x_m - P_mm⁻¹ (P (x - μ))_m            E[x_m | x_o, k], the conditional mean
    (x̂ - μ)ᵀ P (x̂ - μ) = (x_o - μ_o)ᵀ Σ_oo⁻¹ (x_o - μ_o)     (x̂ minimises the quadratic form over x_m)
    log det Σ_oo = log det P_mm - log det P,   Cov[x_m | x_o, k] = P_mm⁻¹

so the marginal log-density of the observed entries is the whitened norm of the filled row
with the normaliser of |o| dimensions (Little & Rubin, *Statistical Analysis with Missing Data*,
§11.2). Only the missing block P_mm is factorised (the precision-block form): no Schur
complement of Σ, no factorisation of Σ_oo.

Grouping (:func:`plan`, eager only): the rows of a frequent pattern of missing entries are
grouped (the pattern then uses the marginal of its observed dimensions, i.e. the one density on
fewer columns, and one conditional for all its rows); the other rows are grouped by their count
of missing entries J (the per-row form above with J×J blocks). Complete rows and empty rows (nothing
observed: log p = 0) are segments of their own. Under ``torch.func`` transforms and
``torch.compile`` the plan is one branch-free segment of width J = D: the missing entries are
listed first in each row and the rest of the J×J block is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from puregmm import _fused
from puregmm._fused import Whitening
from puregmm.families import LOG_2PI, Family

#: Eagerly, rows are grouped by pattern when there are at least this many rows per pattern on
#: average (a pattern costs two small factorisations and Python overhead, about the per-row
#: form's cost for this many rows, measured at D = K = 16); else by their count of missing entries.
ROWS_PER_PATTERN = 256
#: With at most this many patterns, every pattern is grouped (whatever its count).
FEW_PATTERNS = 8
#: Bytes of one of a chunk's blocks ([K, c, D] and [K, c, J, J]) in the per-row form.
ROW_CHUNK_BYTES = 1 << 21


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of the plan's order. ``kind``: ``"complete"``, ``"empty"``,
    ``"pattern"`` (every row misses ``miss`` and observes ``seen``, int64 index tensors) or
    ``"rows"`` (each row misses at most ``width`` entries: J of the per-row form)."""

    start: int
    stop: int
    kind: str
    width: int = 0
    seen: Tensor | None = None
    miss: Tensor | None = None


@dataclass(frozen=True)
class Plan:
    """How the rows of an [N, D] ``observed`` mask are grouped (:func:`plan`).

    Attributes:
        observed: [N, D] bool, True where observed.
        order: [N] int64 permutation that groups the rows (None: the rows as they are).
        segments: the groups, in that order.
    """

    observed: Tensor
    order: Tensor | None
    segments: tuple[Segment, ...]

    @property
    def inverse(self) -> Tensor | None:
        """The permutation back to the rows' own order."""
        return None if self.order is None else torch.argsort(self.order)


def traced(*tensors: Tensor) -> bool:
    """Whether a transform (``vmap``, ``grad``) or ``torch.compile`` sees these tensors: then no
    value-dependent grouping."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return torch.compiler.is_compiling() or any(wrapped(t) for t in tensors)


def pattern_ids(missing: Tensor) -> tuple[Tensor, Tensor]:
    """(id [N] int64, masks [G, D] bool): each row's pattern of ``missing`` [N, D] as an index
    into the distinct patterns, from the rows' bit codes (52 columns per code, a float64 GEMV,
    exact) by one-dimensional ``torch.unique`` (``torch.unique(dim=0)`` is ~100x slower)."""
    n, d = missing.shape
    bits = 52
    powers = 2.0 ** torch.arange(bits, dtype=torch.float64, device=missing.device)
    ids = torch.zeros(n, dtype=torch.int64, device=missing.device)
    for i in range(0, d, bits):  # ids of the columns so far, combined with the next block's (< N² < 2⁶³)
        code = missing[:, i : i + bits].to(torch.float64) @ powers[: min(bits, d - i)]
        values, inverse = torch.unique(code.long(), return_inverse=True)  # int64 sorts ~5x faster
        ids = ids * values.numel() + inverse
    if d > bits:
        _, ids = torch.unique(ids, return_inverse=True)
    rows = torch.arange(n, device=missing.device)
    first = torch.full((int(ids.max()) + 1 if n else 0,), n, dtype=torch.int64, device=missing.device)
    first = first.scatter_reduce(0, ids, rows, "amin")  # [G]: each pattern's first row
    return ids, missing.index_select(0, first)


def plan(observed: Tensor) -> Plan:
    """The grouping of the rows of ``observed`` [N, D] (module docstring).

    Eager: complete rows first, then each frequent pattern (at least :data:`ROWS_PER_PATTERN`
    rows, or every pattern when there are at most :data:`FEW_PATTERNS`), then the other rows by
    their count of missing entries. Traced: one segment of width D, rows in their order.
    """
    n, d = observed.shape
    if traced(observed):
        return Plan(observed, None, (Segment(0, n, "rows", d),))
    which, missing = pattern_ids(~observed)  # by bit codes: torch.unique(dim=0) took ~40x longer
    patterns = ~missing
    counts = torch.bincount(which, minlength=patterns.shape[0])
    n_pat = patterns.shape[0]
    n_miss = d - observed.sum(1)  # [N]
    frequent = (counts >= ROWS_PER_PATTERN) | (n_pat <= FEW_PATTERNS)  # [P]
    complete = patterns.all(1)  # [P]
    key = torch.where(frequent[which], 1 + which, 1 + n_pat + n_miss)  # patterns, then counts
    key = torch.where(complete[which], 0, key)  # complete rows first: the rest is contiguous
    order = torch.argsort(key, stable=True)
    sizes = torch.bincount(key, minlength=1 + n_pat + d + 1).tolist()
    segments: list[Segment] = []
    start = 0
    for j, size in enumerate(sizes):
        if size == 0:
            continue
        if j == 0:
            segments.append(Segment(start, start + size, "complete"))
        elif j <= n_pat:
            pat = patterns[j - 1]
            seen, miss = torch.nonzero(pat).squeeze(1), torch.nonzero(~pat).squeeze(1)
            kind = "empty" if seen.numel() == 0 else "pattern"
            segments.append(Segment(start, start + size, kind, miss.numel(), seen, miss))
        else:
            width = j - 1 - n_pat
            segments.append(Segment(start, start + size, "empty" if width == d else "rows", width))
        start += size
    return Plan(observed, order, tuple(segments))


def as_plan(observed: Tensor | Plan, x: Tensor) -> Plan:
    """A :class:`Plan` of ``observed`` (a mask of ``x``'s shape, or a plan made for ``x``)."""
    if isinstance(observed, Plan):
        if tuple(observed.observed.shape) != tuple(x.shape):
            raise ValueError(f"observed is a plan of shape {tuple(observed.observed.shape)}; x has {tuple(x.shape)}")
        return observed
    check_mask(observed, x)
    return plan(observed)


def check_mask(observed: Tensor, x: Tensor) -> None:
    """``observed`` is a bool tensor of ``x``'s shape (static checks only)."""
    if not isinstance(observed, Tensor) or observed.dtype != torch.bool:
        got = observed.dtype if isinstance(observed, Tensor) else type(observed).__name__
        raise TypeError(f"observed must be a bool tensor of x's shape (True = observed); got {got}")
    if tuple(observed.shape) != tuple(x.shape):
        raise ValueError(f"observed must have x's shape {tuple(x.shape)}; got shape {tuple(observed.shape)}")


def row_chunk(k: int, d: int, width: int) -> int:
    """Rows per chunk of the per-row form: its [K, c, D] and [K, c, J, J] blocks near
    :data:`ROW_CHUNK_BYTES` (larger blocks leave the cache, and are page-faulted in again)."""
    per_row = 8 * k * (width * width + d + 1)
    return max(32, min(_fused.MAX_CHUNK_ROWS, ROW_CHUNK_BYTES // per_row))


class RowTerms:
    """The per-row form on one chunk (module docstring), for unbatched params.

    Per component: the gradient P (x_f - μ) = z Uᵀ and the correction (x̂ - x_f) U are GEMMs over
    the chunk; only the J×J blocks P_mm are per row (gathered from P, factorised in a vectorised
    loop over J).

    Attributes:
        log_joint: [c, K] log w_k + log N(x_o | μ_k,o, Σ_k,oo); log w_k for a row with nothing observed.
        resid: [K, c, D] x̂_k - μ_k (observed entries x_o - μ_k,o, missing ones E[x_m | x_o, k] - μ_k,m).
        chol: [K, c, J, J] lower Cholesky factors of P_k,mm (identity where padded).
        miss: [c, J] the missing dimensions (padding: any index, ``valid`` False).
        valid: [c, J] bool.
    """

    def __init__(
        self, w: Whitening, u: Tensor, means: Tensor, log_w: Tensor, x: Tensor, observed: Tensor, width: int
    ) -> None:
        c, d = x.shape
        k = u.shape[0]
        xf = torch.where(observed, x, w.center)  # missing entries at the centre (any value would do)
        z = _fused.residual(w, _fused.lift(w, xf)).permute(2, 0, 1).contiguous()  # [K, c, D]: (x_f - μ_k) U_k
        n_miss = d - observed.sum(1)  # [c]
        miss = torch.argsort(observed.to(torch.int8), dim=1, stable=True)[:, :width]  # [c, J]: missing dims first
        valid = torch.arange(width, device=x.device) < n_miss.unsqueeze(1)  # [c, J]
        exact = not traced(x, observed) and bool(valid.all())  # no padding: skip the masking
        idx = miss.expand(k, c, width)
        g = (z @ u.mT).gather(2, idx)  # [K, c, J]: (P_k (x_f - μ_k))_m
        flat = (miss.unsqueeze(2) * d + miss.unsqueeze(1)).reshape(-1)  # [c·J·J]
        pmm = (u @ u.mT).reshape(k, d * d).index_select(1, flat).reshape(k, c, width, width)  # P_k,mm
        if not exact:  # padding: zero gradient, identity block
            eye = torch.eye(width, dtype=x.dtype, device=x.device)
            g = torch.where(valid, g, 0.0)
            pmm = torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), pmm, eye)
        chol = cholesky(pmm)
        step = -chol_solve(chol, g)  # [K, c, J]: x̂_m - x_m (0 where padded)
        delta = torch.zeros_like(z).scatter(2, idx, step)  # [K, c, D]
        zf = z + delta @ u  # [K, c, D]: (x̂_k - μ_k) U_k
        half_log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # [K, c]: ½ log det P_mm
        lj = (w.const.unsqueeze(1) - 0.5 * zf.square().sum(-1) - half_log_det).mT  # [c, K]
        lj = lj + 0.5 * LOG_2PI * n_miss.unsqueeze(1).to(x.dtype)
        self.log_joint = lj if exact and width < d else torch.where((n_miss == d).unsqueeze(1), log_w, lj)
        self.resid = (xf - means.unsqueeze(1)) + delta
        self.chol, self.miss, self.valid = chol, miss, valid


#: Widths J up to this factorise by a vectorised loop over J (torch ops on [K, c] slices); wider
#: blocks by LAPACK, whose fixed cost per small matrix (about 1 µs) dominates below.
SMALL_WIDTH = 8


def cholesky(a: Tensor) -> Tensor:
    """Lower Cholesky factors of SPD [..., J, J] (J ≤ :data:`SMALL_WIDTH`: column by column,
    vectorised over the batch)."""
    width = a.shape[-1]
    if width > SMALL_WIDTH:
        return torch.linalg.cholesky(a)
    cols: list[Tensor] = []
    for j in range(width):
        v = a[..., :, j]  # [..., J]
        for col in cols:
            v = v - col * col[..., j : j + 1]
        below = torch.arange(width, device=a.device) >= j
        cols.append(torch.where(below, v / torch.sqrt(v[..., j : j + 1]), 0.0))
    return torch.stack(cols, -1)


def chol_solve(chol: Tensor, b: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ b for factors [..., J, J] and right-hand sides [..., J]."""
    width = chol.shape[-1]
    if width > SMALL_WIDTH:
        return torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
    y: list[Tensor] = []
    for i in range(width):  # L y = b
        t = b[..., i]
        for j in range(i):
            t = t - chol[..., i, j] * y[j]
        y.append(t / chol[..., i, i])
    out: list[Tensor] = [b[..., 0]] * width
    for i in reversed(range(width)):  # Lᵀ x = y
        t = y[i]
        for j in range(i + 1, width):
            t = t - chol[..., j, i] * out[j]
        out[i] = t / chol[..., i, i]
    return torch.stack(out, -1)


def chol_inverse(chol: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ [..., J, J] from factors L."""
    width = chol.shape[-1]
    if width > SMALL_WIDTH:
        return torch.cholesky_inverse(chol)
    eye = torch.eye(width, dtype=chol.dtype, device=chol.device)
    inv = chol_solve(chol.unsqueeze(-3), eye.expand((*chol.shape[:-2], width, width)))  # row i: (LLᵀ)⁻¹ e_i
    return inv


def spd_entries(a: list[list[Tensor]], b: list[Tensor]) -> tuple[list[Tensor], Tensor, list[list[Tensor]]]:
    """For SPD matrices given entry by entry (``a[i][j]``, tensors of one batch shape, J ≤
    :data:`SMALL_WIDTH`) and right-hand sides ``b[i]``: (A⁻¹ b by entries, ½ log det A, A⁻¹ by
    entries), by the Cholesky factor L entry by entry: every op is one element-wise pass over
    the batch, contiguous, no stacking of strided slices."""
    width = len(b)
    low: list[list[Tensor]] = [[b[0]] * width for _ in range(width)]  # L[i][j], j <= i
    for j in range(width):
        piv = a[j][j]
        for p in range(j):
            piv = piv - low[j][p].square()
        low[j][j] = torch.sqrt(piv)
        for i in range(j + 1, width):
            v = a[i][j]
            for p in range(j):
                v = v - low[i][p] * low[j][p]
            low[i][j] = v / low[j][j]
    half_log_det = torch.log(low[0][0])
    for j in range(1, width):
        half_log_det = half_log_det + torch.log(low[j][j])
    inv_low: list[list[Tensor]] = [[b[0]] * width for _ in range(width)]  # L⁻¹[i][j], j <= i
    for i in range(width):
        inv_low[i][i] = 1.0 / low[i][i]
        for j in range(i):
            v = low[i][j] * inv_low[j][j]
            for p in range(j + 1, i):
                v = v + low[i][p] * inv_low[p][j]
            inv_low[i][j] = -v * inv_low[i][i]
    inv = [[b[0]] * width for _ in range(width)]  # A⁻¹ = L⁻ᵀ L⁻¹
    for i in range(width):
        for j in range(i + 1):
            v = inv_low[i][i] * inv_low[i][j]
            for p in range(i + 1, width):
                v = v + inv_low[p][i] * inv_low[p][j]
            inv[i][j] = inv[j][i] = v
    sol = []
    for i in range(width):
        v = inv[i][0] * b[0]
        for j in range(1, width):
            v = v + inv[i][j] * b[j]
        sol.append(v)
    return sol, half_log_det, inv


def cond_cov_sum(r: Tensor, terms: RowTerms, d: int) -> Tensor:
    """Σ_n r_nk Cov[x_m | x_o, k] of the chunk as dense [K, D, D] (rows r [c, K]; the missing block
    P_mm⁻¹ of each row placed at its dimensions)."""
    k = terms.chol.shape[0]
    pair = terms.valid.unsqueeze(2) & terms.valid.unsqueeze(1)  # [c, J, J]
    vals = torch.where(pair, chol_inverse(terms.chol), 0.0) * r.mT.unsqueeze(-1).unsqueeze(-1)  # [K, c, J, J]
    flat = (terms.miss.unsqueeze(2) * d + terms.miss.unsqueeze(1)).reshape(1, -1).expand(k, -1)  # [K, c·J·J]
    out = torch.zeros(k, d * d, dtype=r.dtype, device=r.device)
    return out.scatter_add(1, flat, vals.reshape(k, -1)).reshape(k, d, d)


def embed(block: Tensor, dims: Tensor, d: int) -> Tensor:
    """[..., A, A] placed at rows and columns ``dims`` [A] of a zero [..., D, D] (Eᵀ B E, E the
    [A, D] selection: no in-place writes, so it runs under transforms)."""
    sel = torch.eye(d, dtype=block.dtype, device=block.device).index_select(0, dims)  # [A, D]
    return sel.mT @ block @ sel


def pattern_resid(coef: Tensor, means: Tensor, x: Tensor, seen: Tensor, miss: Tensor) -> Tensor:
    """x̂_k - μ_k [K, c, D] of rows ``x`` [c, D] that all observe ``seen`` and miss ``miss``:
    x_o - μ_k,o at the observed entries and C_k (x_o - μ_k,o) at the missing ones, with the
    regression coefficients ``coef`` [K, A, B] of :meth:`~puregmm.families.Family.conditional_scale`."""
    diff = x.index_select(1, seen) - means.index_select(1, seen).unsqueeze(1)  # [K, c, B]
    both = torch.cat([diff, diff @ coef.mT], -1)  # [K, c, B + A]: observed, then missing entries
    return both.index_select(2, torch.argsort(torch.cat([seen, miss])))


class Moments:
    """The missing mode's accumulators (:func:`puregmm.estep.missing_stats`): n_k, X_k and S_k about
    the means from the filled rows x̂_k plus Σ_n r_nk Cov[x_m | x_o, k], S_k dense [K, D, D] (one
    batched GEMM per chunk) and reduced to the family's shape at the end (the family's
    ``weighted_second_moments``: its diagonal, its trace). Out of place, so it runs under transforms."""

    def __init__(self, spec: Family, k: int, d: int, like: Tensor) -> None:
        self.spec, self.d = spec, d
        self.n_k = like.new_zeros(k)
        self.x_k = like.new_zeros(k, d)
        self.s_k = like.new_zeros(k, d, d)  # dense; reduced to the family's shape at the end

    def add(self, log_joint: Tensor, resid: Tensor, cond: Tensor | RowTerms, w: Tensor) -> Tensor:
        """Rows with joint log-densities [c, K], x̂_k - μ_k [K, c, D], the conditional covariance
        (one [K, D, D] for all rows, or the rows' :class:`RowTerms`) and weights [c]; returns log p [c]."""
        lse = torch.logsumexp(log_joint, 1)  # [c]
        r = torch.exp(log_joint - lse.unsqueeze(1)) * w.unsqueeze(1)  # [c, K]
        self.n_k = self.n_k + r.sum(0)
        wy = r.mT.unsqueeze(-1) * resid  # [K, c, D]
        self.x_k = self.x_k + wy.sum(1)
        cov = cond_cov_sum(r, cond, self.d) if isinstance(cond, RowTerms) else r.sum(0)[:, None, None] * cond
        self.s_k = self.s_k + wy.mT @ resid + cov  # [K, D, D]
        return lse

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(n_k, X_k, S_k) with S_k = Σ r (x̂ - μ)(x̂ - μ)ᵀ + Σ r Cov[x_m | x_o] in the family's shape."""
        ones = self.n_k.new_ones(self.n_k.shape)
        return self.n_k, self.x_k, self.spec.weighted_second_moments(ones, self.s_k)
