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

Grouping (:func:`plan`, eager only): rows are sorted by their pattern of missing entries when
patterns are few (each pattern then uses the marginal of its observed dimensions, i.e. the one
density on fewer columns, and one conditional for all its rows), else by their count of missing
entries J (the per-row form above with J×J blocks). Complete rows and empty rows (nothing
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
#: Bytes of one chunk's per-row blocks ([K, c, J, J] and [c, K, D]) in the per-row form.
ROW_CHUNK_BYTES = 1 << 22


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


def plan(observed: Tensor) -> Plan:
    """The grouping of the rows of ``observed`` [N, D] (module docstring).

    Eager: sorted by pattern (few patterns) or by count of missing entries. Traced: one
    segment of width D, rows in their order.
    """
    n, d = observed.shape
    if traced(observed):
        return Plan(observed, None, (Segment(0, n, "rows", d),))
    patterns, which, counts = torch.unique(observed, dim=0, return_inverse=True, return_counts=True)
    segments: list[Segment] = []
    if patterns.shape[0] * ROWS_PER_PATTERN <= n or patterns.shape[0] <= 2:
        order = torch.argsort(which, stable=True)
        start = 0
        for pat, size in zip(patterns.tolist(), counts.tolist(), strict=True):
            seen = [i for i, o in enumerate(pat) if o]
            miss = [i for i, o in enumerate(pat) if not o]
            kind = "complete" if not miss else "empty" if not seen else "pattern"
            idx = observed.new_tensor(seen, dtype=torch.int64), observed.new_tensor(miss, dtype=torch.int64)
            segments.append(Segment(start, start + size, kind, len(miss), *idx))
            start += size
        return Plan(observed, order, tuple(segments))
    n_miss = d - observed.sum(1)  # [N]
    order = torch.argsort(n_miss, stable=True)
    sizes = torch.bincount(n_miss, minlength=d + 1).tolist()
    start = 0
    for j, size in enumerate(sizes):
        if size:
            kind = "complete" if j == 0 else "empty" if j == d else "rows"
            segments.append(Segment(start, start + size, kind, j))
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
    """Rows per chunk of the per-row form: its [K, c, J, J] and [c, K, D] blocks near
    :data:`ROW_CHUNK_BYTES`."""
    per_row = 8 * k * (width * width + 4 * d + 4)
    return max(32, min(_fused.MAX_CHUNK_ROWS, ROW_CHUNK_BYTES // per_row))


class RowTerms:
    """The per-row form on one chunk (module docstring), for unbatched params.

    Attributes:
        log_joint: [c, K] log w_k + log N(x_o | μ_k,o, Σ_k,oo); log w_k for a row with nothing observed.
        resid: [c, K, D] x̂_k - μ_k (observed entries x_o - μ_k,o, missing ones E[x_m | x_o, k] - μ_k,m).
        chol: [K, c, J, J] Cholesky factors of P_k,mm (identity where padded).
        miss: [c, J] the missing dimensions (padding: any index, ``valid`` False).
        valid: [c, J] bool.
    """

    def __init__(
        self, w: Whitening, u: Tensor, means: Tensor, log_w: Tensor, x: Tensor, observed: Tensor, width: int
    ) -> None:
        c, d = x.shape
        k = u.shape[0]
        xf = torch.where(observed, x, w.center)  # missing entries at the centre (any value would do)
        z = _fused.residual(w, _fused.lift(w, xf))  # [c, D, K]: (x_f - μ_k) U_k
        n_miss = d - observed.sum(1)  # [c]
        miss = torch.argsort(observed.to(torch.int8), dim=1, stable=True)[:, :width]  # [c, J]: missing dims first
        valid = torch.arange(width, device=x.device) < n_miss.unsqueeze(1)  # [c, J]
        pd = torch.einsum("nik,kji->knj", z, u)  # [K, c, D]: P_k (x_f - μ_k), as rows z Uᵀ
        g = torch.where(valid, pd.gather(2, miss.expand(k, c, width)), 0.0)  # [K, c, J]
        prec = u @ u.mT  # [K, D, D]
        pmm = prec[:, miss.unsqueeze(2), miss.unsqueeze(1)]  # [K, c, J, J]
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(width, dtype=x.dtype, device=x.device)
        chol = torch.linalg.cholesky(torch.where(pair, pmm, eye))  # [K, c, J, J]
        step = -torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)  # [K, c, J]: x̂_m - x_m
        delta = torch.zeros(k, c, d, dtype=x.dtype, device=x.device).scatter(2, miss.expand(k, c, width), step)
        zf = z + (delta @ u).permute(1, 2, 0)  # [c, D, K]: (x̂_k - μ_k) U_k
        half_log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1).mT  # [c, K]: ½ log det P_mm
        lj = w.const - 0.5 * zf.square().sum(1) - half_log_det + 0.5 * LOG_2PI * n_miss.unsqueeze(1).to(x.dtype)
        self.log_joint = torch.where((n_miss == d).unsqueeze(1), log_w, lj)
        self.resid = (xf.unsqueeze(1) - means) + delta.transpose(0, 1)  # [c, K, D]
        self.chol, self.miss, self.valid = chol, miss, valid


def cond_cov_sum(r: Tensor, terms: RowTerms, d: int) -> Tensor:
    """Σ_n r_nk Cov[x_m | x_o, k] of the chunk as dense [K, D, D] (rows r [c, K]; the missing block
    P_mm⁻¹ of each row placed at its dimensions)."""
    k = terms.chol.shape[0]
    inv = torch.cholesky_inverse(terms.chol)  # [K, c, J, J]
    pair = terms.valid.unsqueeze(2) & terms.valid.unsqueeze(1)  # [c, J, J]
    vals = torch.where(pair, inv, 0.0) * r.mT.unsqueeze(-1).unsqueeze(-1)  # [K, c, J, J]
    flat = (terms.miss.unsqueeze(2) * d + terms.miss.unsqueeze(1)).reshape(1, -1).expand(k, -1)  # [K, c·J·J]
    out = torch.zeros(k, d * d, dtype=r.dtype, device=r.device)
    return out.scatter_add(1, flat, vals.reshape(k, -1)).reshape(k, d, d)


def embed(block: Tensor, dims: Tensor, d: int) -> Tensor:
    """[..., A, A] placed at rows and columns ``dims`` [A] of a zero [..., D, D] (Eᵀ B E, E the
    [A, D] selection: no in-place writes, so it runs under transforms)."""
    sel = torch.eye(d, dtype=block.dtype, device=block.device).index_select(0, dims)  # [A, D]
    return sel.mT @ block @ sel


def pattern_resid(coef: Tensor, means: Tensor, x: Tensor, seen: Tensor, miss: Tensor) -> Tensor:
    """x̂_k - μ_k [c, K, D] of rows ``x`` [c, D] that all observe ``seen`` and miss ``miss``:
    x_o - μ_k,o at the observed entries and C_k (x_o - μ_k,o) at the missing ones, with the
    regression coefficients ``coef`` [K, A, B] of :meth:`~puregmm.families.Family.conditional_scale`."""
    d = x.shape[1]
    diff = x.index_select(1, seen).unsqueeze(1) - means.index_select(1, seen)  # [c, K, B]
    fill = torch.einsum("kab,nkb->nka", coef, diff)  # [c, K, A]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return diff @ eye.index_select(0, seen) + fill @ eye.index_select(0, miss)


class Moments:
    """The missing mode's accumulators (:func:`puregmm.estep.missing_stats`): n_k, X_k and S_k about
    the means from the filled rows x̂_k, plus Σ_n r_nk Cov[x_m | x_o, k] as dense [K, D, D], reduced
    to the family's S_k at the end. Out of place, so it runs under transforms."""

    def __init__(self, spec: Family, k: int, d: int, like: Tensor) -> None:
        self.spec, self.d = spec, d
        self.n_k = like.new_zeros(k)
        self.x_k = like.new_zeros(k, d)
        self.s_k = like.new_zeros(spec.stats_shape(k, d))
        self.cond = like.new_zeros(k, d, d)

    def add(self, log_joint: Tensor, resid: Tensor, cond: Tensor | RowTerms, w: Tensor) -> Tensor:
        """Rows with joint log-densities [c, K], x̂_k - μ_k [c, K, D], the conditional covariance
        (one [K, D, D] for all rows, or the rows' :class:`RowTerms`) and weights [c]; returns log p [c]."""
        lse = torch.logsumexp(log_joint, 1)  # [c]
        r = torch.exp(log_joint - lse.unsqueeze(1)) * w.unsqueeze(1)  # [c, K]
        self.n_k = self.n_k + r.sum(0)
        self.x_k = self.x_k + torch.einsum("nk,nkd->kd", r, resid)
        scatter = torch.func.vmap(self.spec.scatter, in_dims=(1, 1))  # per component
        self.s_k = self.s_k + scatter(r.unsqueeze(-1) * resid, resid)
        if isinstance(cond, RowTerms):
            self.cond = self.cond + cond_cov_sum(r, cond, self.d)
        else:
            self.cond = self.cond + r.sum(0)[:, None, None] * cond
        return lse

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(n_k, X_k, S_k) with S_k = Σ r (x̂ - μ)(x̂ - μ)ᵀ + Σ r Cov[x_m | x_o] in the family's shape."""
        ones = self.n_k.new_ones(self.n_k.shape)
        return self.n_k, self.x_k, self.s_k + self.spec.weighted_second_moments(ones, self.cond)
