"""The E-step in exponential-family form: one block of sufficient statistics per chunk, two GEMMs
(private; see :mod:`puregmm.em`).

A Gaussian is an exponential family: with rows shifted by a fixed centre g (the detached mean
of the means) and T(x) the products of the lifted row [x - g, 1] with itself,

    ℓ_nk = log w_k + log N(x_n | μ_k, Σ_k) = ⟨η_k, T(x_n)⟩,
    η_k  = the coefficients of  log w_k + ½ log det P_k - ½ D log 2π - ½ (x - g - d_k)ᵀ P_k (x - g - d_k),

d_k = μ_k - g, P_k = Σ_k⁻¹. EM needs the data only through T: per chunk of c rows,

    ℓ [K, c] = η [K, P] @ T [c, P]ᵀ           (GEMM 1: the joint log-densities)
    r [K, c] = softmax over K of ℓ             (log space; lse [c] = log p(x))
    M [K, P] += r [K, c] @ T [c, P]            (GEMM 2: Σ r, Σ r (x - g), Σ r (x - g)(x - g)ᵀ)

and the moments about each mean follow exactly from M (X_k = X_g - n d_k,
S_k = S_g - X_g d_kᵀ - d_k X_gᵀ + n d_k d_kᵀ). T by family:

=========  =================================================  ==================
family     T(x) (y = x - g)                                   P columns (D = 32)
=========  =================================================  ==================
full/tied  the distinct entries of [y, 1][y, 1]ᵀ (folded)     561
diagonal   [y², y, 1]                                          65
scalar     [‖y‖², y, 1]                                        34
=========  =================================================  ==================

The tied family does not build T at all (:func:`tied_natural`, ``em._tied_stats``): its
quadratic part is common to all components. Out of place (vmap, autograd) with D <= 4, the
full family uses the unfolded square layout (every product, m² columns) built by one
broadcast multiplication.

Folded layout (full/tied): the m = D + 1 lifted columns split into a head a (the first
h = ⌈(m+1)/2⌉) and a tail b. An h x h block holds a aᵀ on and above its diagonal and b bᵀ below it
(row i, column j < i: b_j b_(i-1)), then comes a bᵀ: every product exactly once, about m²/2
columns instead of m², in a few broadcast multiplications (no gather).

Design decisions:

* **Two GEMMs, nothing of size c x D x K.** Whitening every row for every component (the
  density's form) costs a [c, D+1] x [D+1, D·K] GEMM plus three element-wise passes over the
  [c, D, K] block; here the log-densities cost a [K, P] x [P, c] GEMM (half the flops for the
  full family, 1/16 for the diagonal one) and share T with the moments.
* **float64 for T and both GEMMs, float32 where that loses nothing.** Products of float32
  values are exact in float64, and the quadratic form and the shift from g to each mean then
  lose only ~1e-16·(‖x - g‖/σ)² (σ the smallest standard deviation): clusters far apart
  relative to their width, where a float32 sum about any common centre would lose every
  digit, keep float64 accuracy. The centre g removes any common offset first. In float32 the
  same form rounds by eps32 times the same quantity; plain eager E-steps of float32 data run
  T and both GEMMs in float32 when, for every live component, that is at most
  ``LOW_PRECISION_RATIO`` times what the float32 rows themselves leave open
  (:func:`puregmm._precision.precision_plan`), with the GEMM's sums over rows in float32 blocks
  added in float64 (:func:`puregmm._precision.accumulate`); components whitened for the
  reason below do not count (``estep._mixed_stats`` whitens them beside float32 for the rest);
  otherwise float64 throughout. Under ``vmap``, autograd and ``torch.compile`` the test would
  be a value-dependent branch: float64 throughout.
* **Precision.** That bound is the form's limit: ⟨η_k, T(x)⟩ rounds by about
  :func:`rounding_bound` = eps·(|d_k|ᵀ|P_k||d_k| + σ_kᵀ|P_k|σ_k) nats (d_k = μ_k - g, σ_k the
  standard deviations), ~eps·(distance / width)², which passes 1e-8 for a component narrower
  than ~1e-4 of its mean's distance from g (or for strongly correlated features: condition
  numbers above ~1e8). Plain eager E-steps then whiten those components' rows instead, the
  way scikit-learn does (:func:`puregmm.estep.whitened_stats`, per component in
  ``estep._mixed_stats``: rounding ~eps·distance / width, not its square). Under ``vmap``,
  autograd and ``torch.compile`` the check would be a value-dependent branch, so they keep
  this form and its bound. A width
  below what float64 resolves at all (``reg_covar=0`` with a component on one point or on a
  plane of few points) is a collapse: :func:`puregmm.m_step` widens it (see
  :data:`POSITION_RESOLUTION`) and counts a repair.
* **Chunks of a few MB, reused.** The [c, P] block and the [K, c] responsibilities stay in
  cache and, on plain eager tensors, are allocated once per call (fresh multi-MB temporaries
  are page-faulted in again on every chunk); under autograd, ``torch.func`` and
  ``torch.compile`` every op is out of place, so gradients through ``em_step`` work.
* **Equal to the density, not a copy of it.** ``tests/test_em_exact.py`` holds the
  log-densities of this form against :func:`puregmm.log_prob` and scipy (float64, 1e-10).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from puregmm import density
from puregmm._fused import Whitening
from puregmm.families import SQUARE_MAX_D, Layout, layout
from puregmm.params import GMMParams

#: Target bytes of a chunk's float64 block T: large enough that per-op and thread wake-up costs
#: are small next to the two GEMMs, small enough to stay in cache (6 MB: ~1400 rows at D = 32,
#: ~5100 at D = 16; measured best on this machine with one and two threads).
CHUNK_BYTES = 6 << 20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 16384
MAX_COMPILED_CHUNKS = 8  # under torch.compile the chunk loop is unrolled: at most this many


def _cached(build: Any) -> Any:
    """``build(d, device)`` -> an index tensor, memoised per (d, device) on eager calls (it is
    static; ~60 us to rebuild, every E-step). Under ``torch.compile`` it is traced as is."""
    memo: dict[tuple[int, torch.device], Tensor] = {}

    def index(d: int, device: torch.device) -> Tensor:
        if torch.compiler.is_compiling():
            return build(d, device)
        key = (d, torch.device(device))
        if key not in memo:
            memo[key] = build(d, device)
        return memo[key]

    index.__doc__ = build.__doc__
    return index


@_cached
def fold_index(d: int, device: torch.device) -> Tensor:
    """Full layout: [m, m] map from a pair (i, j) of lifted columns to its column of T.

    Row i < h of the folded block holds a_i a_j for j >= i and b_j b_(i-1) for j < i (b_j the
    lifted column h + j), so tail columns p <= q sit at row q - h + 1, column p - h.
    """
    m, h = d + 1, layout(2, d).h
    ar = torch.arange(m, device=device)
    p, q = torch.minimum(ar[:, None], ar[None, :]), torch.maximum(ar[:, None], ar[None, :])  # p <= q
    head = p * h + q
    tail = (q - h + 1) * h + (p - h)
    cross = h * h + p * (m - h) + (q - h)
    return torch.where(q < h, head, torch.where(p >= h, tail, cross))


def centre_of(params: GMMParams) -> Tensor:
    """The expansion centre g [D]: the mixture's mean Σ w_k μ_k (detached), where the data are,
    so that y = x - g stays small for the rows that matter (an empty component far away does
    not pull it, as it would pull the plain mean of the means)."""
    return torch.mv(params.means.detach().mT, torch.softmax(params.logits.detach(), -1))


#: Largest rounding bound (nats, :func:`rounding_bound`) at which plain eager E-steps keep the
#: exponential-family form; above it they whiten each row per component instead (em.py).
MAX_ROUNDING = 1e-8
#: A component narrower than this times the distance of its mean from the origin (~4500 float64
#: ulps of its position) has collapsed below what float64 resolves: its rows minus its mean are
#: mostly rounding. The M-step widens it to that and counts a repair (float32 params: 10·eps of
#: float32, the resolution of their means). At this width the rounding of x - μ (half an ulp
#: of |μ|) moves the variance by ~2e-4 of itself; narrower, rounding decides it (a component on
#: one point gets ~1e-37 with ``reg_covar=0``) and the likelihood is the singularity's, not the
#: data's: the repair makes the result well defined and tells the user (``n_resets``).
POSITION_RESOLUTION = 1e-12


def position_resolution(dtype: torch.dtype) -> float:
    """:data:`POSITION_RESOLUTION`, or 10·eps of ``dtype`` when that is coarser."""
    return max(POSITION_RESOLUTION, 10 * torch.finfo(dtype).eps)


def bound_terms(
    params: GMMParams, centre: Tensor, white: Whitening, with_rep: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(Q [K], R [K] or None) float64, in units of eps: Q_k = |d_k|ᵀ|P_k||d_k| + σ_kᵀ|P_k|σ_k, the
    rounding of the form (:func:`rounding_bound`), and (``with_rep``) R_k = σ_kᵀ|P_k|(|μ_k| + σ_k),
    that of the rows' own representation (:mod:`puregmm._precision`)."""
    d = params.dim
    a = white.a.detach()  # [m, D, K]: rows [U_k; -t_k] (U_k diagonal: [2, D, K])
    mu = params.means.detach().to(torch.float64)  # [K, D]
    if white.dense:
        u = a[:d].permute(2, 0, 1)  # [K, D, D], P = U Uᵀ
        delta = mu - centre.detach().to(torch.float64)  # [K, D]
        eye = torch.eye(d, dtype=u.dtype, device=u.device).expand_as(u)
        sigma = torch.linalg.solve_triangular(u, eye, upper=True).square().sum(-2).sqrt()  # Σ = U⁻ᵀ U⁻¹
        abs_p = (u @ u.mT).abs()
        left = torch.stack([delta.abs(), sigma], 1)  # [K, 2, D]
        quad = ((left @ abs_p) * left).sum((-2, -1))  # |d|ᵀ|P||d| + σᵀ|P|σ
        rep = ((sigma.unsqueeze(-2) @ abs_p).squeeze(-2) * (mu.abs() + sigma)).sum(-1) if with_rep else None
        return quad, rep
    # diagonal and scalar: ‖t_k‖² + D (t_k = (μ_k - g) U_k) and Σ_i |μ_ki| / σ_ki + D
    return a[1].square().sum(0) + d, (mu.abs() * a[0].mT).sum(-1) + d if with_rep else None


def rounding_bound(params: GMMParams, centre: Tensor, white: Whitening | None = None) -> Tensor:
    """[K] bound, in nats up to a small factor, on the rounding of ⟨η_k, T(x)⟩ for rows x that
    component k can claim (x - μ_k within a few σ per coordinate), T and the GEMMs in float64.

    The GEMM of η_k with T(x) rounds by ~eps·Σ |η_k| |T(x)|, and with y = x - g = d_k + z
    (d_k = μ_k - g, z = x - μ_k) that is ~eps·(|d_k|ᵀ|P_k||d_k| + |z|ᵀ|P_k||z|); for the rows
    the component claims |z_i| ~ σ_ki, so the bound is eps·(|d_k|ᵀ|P_k||d_k| + σ_kᵀ|P_k|σ_k)
    (σ_k the standard deviations; for the diagonal families Σ_i d_ki²/σ_ki² + D). It is at most
    eps·tr P_k·(‖d_k‖² + tr Σ_k) (Cauchy-Schwarz, |P_ij| <= √(P_ii P_jj)), often far less: a
    feature with a tiny variance that is independent of the others costs its own term only.
    The same quantity bounds the moments: T's entries round by eps relative, and the shift of
    M from g to μ_k (S_k = S_g - X_g dᵀ - d X_gᵀ + n d dᵀ) cancels terms of that size.
    Masked components get 0. ``white``: the float64 whitening about ``centre`` when the caller
    has it (:func:`natural` uses the same one).
    """
    if white is None:
        white = density.whitening(params.to(torch.float64), centre)
    bound = bound_terms(params, centre, white, with_rep=False)[0] * torch.finfo(torch.float64).eps
    return torch.where(params.logits.detach() == -math.inf, torch.zeros_like(bound), bound)


#: Plain eager calls whose rows fit one chunk use the square layout (every product, m² columns,
#: one broadcast multiplication) when N·(D+1)·K is at most this: the folded layout's per-row-block
#: passes (~5 ops per row of the folded block, ~5 us each) then cost more than the GEMMs' extra
#: flops (2·N·m²·K at a few GFLOP/s). At (178, 13, 2), one wine fit's step, 45 of 340 ops.
SQUARE_MAX_WORK = 1 << 15
#: One plain chunk whose block T has at least this many entries is built in a :class:`Work`.
WORK_MIN_ENTRIES = 1 << 14


def square_layout(n: int, d: int, k: int, plain: bool, chunk_size: int | None) -> bool:
    """Whether the full family's E-step uses the square layout: out of place with D <=
    :data:`~puregmm.families.SQUARE_MAX_D`, or plain and small (:data:`SQUARE_MAX_WORK`) in one chunk."""
    if not plain:
        return d <= SQUARE_MAX_D
    return n * (d + 1) * k <= SQUARE_MAX_WORK and chunk_size is None


def worth_a_workspace(n: int, rows: int, lay: Layout) -> bool:
    """Whether a plain E-step builds T in a :class:`Work` (Tᵀ row by row, in place): always for
    several chunks (reused), and for one chunk of at least :data:`WORK_MIN_ENTRIES` entries,
    where filling Tᵀ's contiguous rows in place avoids the out-of-place path's strided copies of
    a block that size; smaller blocks skip the workspace's few allocations."""
    return rows < n or n * lay.width >= WORK_MIN_ENTRIES


def chunk_rows(n: int, lay: Layout, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size``, or the [c, P] block near :data:`CHUNK_BYTES`."""
    if chunk_size is not None:
        size = int(chunk_size)
        if size < 1:
            raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
        return size
    rows = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (8 * lay.width)))
    if torch.compiler.is_compiling():  # the loop unrolls into the graph: cap the chunks
        rows = max(rows, -(-n // MAX_COMPILED_CHUNKS))
    return max(1, min(rows, n))


# --- T per chunk ----------------------------------------------------------------------------------


class Work:
    """Per-call workspace of the plain chunk loop (eager, nothing recorded): the lifted rows and
    T, both stored transposed (rows of the chunk along the last, contiguous axis, so that every
    product is a long vectorised pass), and ℓ / r [K, c]; allocated once, reused by every chunk."""

    def __init__(self, lay: Layout, rows: int, k: int, x: Tensor, dtype: torch.dtype) -> None:
        opts: dict[str, Any] = {"dtype": dtype, "device": x.device}
        d, h = lay.d, lay.h
        self.yt = torch.zeros(max(2 * h, d + 1), rows, **opts)  # [x - g, 1, 0...]ᵀ (square: [x - g, 1]ᵀ)
        self.yt[d] = 1.0
        self.tt = torch.empty(lay.width, rows, **opts)  # Tᵀ
        if lay.ndim != 2:
            self.tt[-1] = 1.0  # the constant column
        self.lj = torch.empty(k, rows, **opts)


def products(lay: Layout, x: Tensor, centre: Tensor, dtype: torch.dtype, work: Work | None) -> Tensor:
    """T [c, P] of rows ``x`` [c, D] about ``centre`` [D], in ``dtype`` (module docstring)."""
    c, d, h = x.shape[0], lay.d, lay.h
    if work is None:  # out of place (autograd, torch.func, compile); the same layout, Tᵀ [P, c]
        yt = (x - centre).to(dtype).mT  # [D, c]
        yl = F.pad(yt, (0, 0, 0, 1), value=1.0)  # [m, c]: [y, 1], one op (no ones + concatenation)
        if lay.ndim == 1:
            return torch.cat([yt * yt, yl], 0).mT
        if lay.ndim == 0:
            return torch.cat([(yt * yt).sum(0, keepdim=True), yl], 0).mT
        if lay.square:
            return (yl.unsqueeze(1) * yl.unsqueeze(0)).reshape(-1, c).mT
        pad = max(2 * h, d + 1) - d - 1
        yl = F.pad(yl, (0, 0, 0, pad))  # [2h, c]: [y, 1, 0...]
        parts = []  # row i of the folded block: b_j b_(i-1) for j < i, then a_i a_j for j >= i
        for i in range(h):
            if i:
                parts.append(yl[h - 1 + i].unsqueeze(0) * yl[h : h + i])
            parts.append(yl[i].unsqueeze(0) * yl[i:h])
        parts.append((yl[:h].unsqueeze(1) * yl[h : d + 1].unsqueeze(0)).reshape(-1, c))  # a bᵀ
        return torch.cat(parts, 0).mT
    tt = work.tt[:, :c]  # Tᵀ [P, c]; returned as T = ttᵀ
    xt = x.mT
    if lay.ndim == 1:
        yt = torch.sub(xt, centre.unsqueeze(1), out=tt[d : 2 * d])
        torch.mul(yt, yt, out=tt[:d])
        return tt.mT
    if lay.ndim == 0:
        yt = torch.sub(xt, centre.unsqueeze(1), out=tt[1 : d + 1])
        torch.sum(yt * yt, 0, keepdim=True, out=tt[:1])
        return tt.mT
    yt = work.yt[:, :c]  # [2h, c]
    torch.sub(xt, centre.unsqueeze(1), out=yt[:d])
    if lay.square:  # every product of [y, 1] in one pass
        yl = yt[: d + 1]
        torch.mul(yl.unsqueeze(1), yl.unsqueeze(0), out=tt.view(d + 1, d + 1, c))
        return tt.mT
    a = yt[:h]
    torch.mul(a.unsqueeze(1), a.unsqueeze(0), out=tt[: h * h].view(h, h, c))  # a aᵀ; lower part overwritten:
    for i in range(1, h):  # b bᵀ below the diagonal: row i holds b_j b_(i-1), j < i
        torch.mul(yt[h - 1 + i].unsqueeze(0), yt[h : h + i], out=tt[i * h : i * h + i])
    torch.mul(a.unsqueeze(1), yt[h : d + 1].unsqueeze(0), out=tt[h * h :].view(h, d + 1 - h, c))
    return tt.mT


# --- natural parameters ---------------------------------------------------------------------------


def natural(
    params: GMMParams, centre: Tensor, dtype: torch.dtype, lay: Layout | None = None, white: Whitening | None = None
) -> Tensor:
    """η [K, P] in ``dtype``: ⟨η_k, T(x)⟩ = log w_k + log N(x | μ_k, Σ_k) for T about ``centre``.

    Not a second derivation of the density: the expansion of the one component log-density
    (:func:`puregmm.density.whitening`), ℓ_k = const_k - ½ ‖[y, 1] A_k‖² with y = x - g, so
    η_k holds the coefficients of const_k - ½ [y, 1] A_k A_kᵀ [y, 1]ᵀ in T's layout. With
    A_k = [U_k; -t_k] (t_k = (μ_k - g) U_k) that is -½ P_k, P_k d_k and const_k - ½‖t_k‖².
    Differentiable in the params (the constant family's variance and the centre are detached).
    ``white``: that whitening (of ``params`` in ``dtype`` about ``centre``) when the caller has it.
    """
    k, d = params.n_components, params.dim
    lay = lay if lay is not None else params.spec.moment_layout(d)
    w = density.whitening(params.to(dtype), centre) if white is None else white
    if lay.ndim == 2:  # a: [m, D, K], rows [U_k; -t_k]
        m = d + 1
        quad = torch.einsum("idk,jdk->kij", w.a, w.a)  # [K, m, m] = A_k A_kᵀ
        # const_k on the constant-constant entry (placed, not multiplied: a masked const is -inf)
        coef = -0.5 * quad + torch.diag_embed(F.pad(w.const.unsqueeze(-1), (m - 1, 0)))
        if lay.square:  # T holds both products y_i y_j and y_j y_i: the symmetric coefficients as they are
            return coef.reshape(k, m * m)  # [K, m²]
        eye = torch.eye(m, dtype=dtype, device=quad.device)
        upper = torch.ones(m, m, dtype=dtype, device=quad.device).triu()
        coef = coef * (upper * (2.0 - eye))  # upper triangle, off-diagonal coefficients count twice
        return coef.reshape(k, m * m)[:, _pair_of_column(d, quad.device)]  # [K, P]
    s, neg_t = w.a[0].mT, w.a[1].mT  # [K, D]: the diagonal of U_k and -t_k
    const = (w.const - 0.5 * neg_t.square().sum(-1)).unsqueeze(-1)  # [K, 1]
    lin = -s * neg_t  # [K, D]: P_k d_k
    if lay.ndim == 1:
        return torch.cat([-0.5 * s.square(), lin, const], -1)  # [K, 2D+1]
    return torch.cat([-0.5 * s[:, :1].square(), lin, const], -1)  # [K, D+2]


def tied_natural(
    params: GMMParams, centre: Tensor, dtype: torch.dtype, white: Whitening | None = None
) -> tuple[Tensor, Tensor]:
    """Tied family: (U [D, D], η_lin [K, D+1]) with ℓ_nk = ⟨η_lin_k, [y, 1]⟩ - ½‖yᵀU‖², y = x - g.

    The quadratic part -½ yᵀPy is common to all components: it shifts every ℓ_nk of a row alike,
    so responsibilities need only the [K, D+1] GEMM, and log p(x) adds the quadratic part once
    (one [c, D] x [D, D] GEMM per chunk instead of the [K, P] one). From the same whitening as
    :func:`natural`.
    """
    w = density.whitening(params.to(dtype), centre) if white is None else white
    u, neg_t = w.a[:-1, :, 0], w.a[-1].mT  # [D, D] (one U for all), [K, D]
    const = w.const - 0.5 * neg_t.square().sum(-1)
    return u, torch.cat([-neg_t @ u.mT, const.unsqueeze(-1)], -1)  # P d = U Uᵀ d


@_cached
def _pair_of_column(d: int, device: torch.device) -> Tensor:
    """Full layout: for each column of T the flat index i·m + j (i <= j) of the pair it holds;
    columns holding no pair (padding, odd D) point at (1, 0), whose coefficient is 0."""
    m, lay = d + 1, layout(2, d)
    index = fold_index(d, device)
    flat = torch.arange(m * m, device=device).reshape(m, m)
    upper = torch.ones(m, m, dtype=torch.bool, device=device).triu()
    cols = torch.full((lay.width,), m, dtype=torch.int64, device=device)  # m = flat index of (1, 0)
    return cols.scatter(0, index[upper], flat[upper])


# --- responsibilities ----------------------------------------------------------------------------


def responsibilities(log_joint: Tensor, inplace: bool, lse_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(r [K, c], log p [c]) from joint log-densities ℓ [K, c]: with m = max_K ℓ,
    e = exp(ℓ - m), r = e / Σ_K e and log p = m + log Σ_K e (one exponential per entry, not the
    two of ``logsumexp`` followed by ``exp(ℓ - logsumexp)``).

    Exponents are clamped at 3 log eps (-108 in float64): such responsibilities are below eps³
    and the clamp keeps them, and their products with T, out of the subnormal range (10-100x
    slower arithmetic). A row with NaN stays NaN. ``inplace`` overwrites ℓ with r; ``lse_out``
    receives log p.
    """
    floor = 3.0 * math.log(torch.finfo(log_joint.dtype).eps)
    if inplace:
        top = log_joint.amax(0)  # [c]
        e = log_joint.sub_(top).clamp_(min=floor).exp_()
        total = e.sum(0)
        lse = torch.log(total, out=lse_out) if lse_out is not None else torch.log(total)
        return e.div_(total), lse.add_(top)
    # out of place (vmap, autograd): one fused softmax; log p = max ℓ - log max r (r's largest
    # entry is 1 / Σ exp(ℓ - max ℓ)); the floor applied to r keeps the same eps³ minimum
    r = torch.softmax(log_joint, 0)
    lse = log_joint.amax(0) - torch.log(r.amax(0))
    return r.clamp_min(math.exp(floor)), lse


# --- moments about the means ---------------------------------------------------------------------


def about_centres(lay: Layout, raw: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n_k, X_k, S_k) about c_k = g + ``shift`` [K, D] from M = Σ r T [K, P] about g; S_k is
    [K, D, D], [K, D] or [K] by family."""
    d = lay.d
    if lay.ndim == 2:
        full = raw if lay.square else raw[:, fold_index(d, raw.device).reshape(-1)]
        full = full.reshape(-1, d + 1, d + 1)  # [K, m, m]
        s_g, x_g, n = full[:, :d, :d], full[:, :d, d], full[:, d, d]
        outer = x_g.unsqueeze(2) * shift.unsqueeze(1)  # X_g dᵀ
        s = s_g - outer - outer.mT + n[:, None, None] * shift.unsqueeze(2) * shift.unsqueeze(1)
    elif lay.ndim == 1:
        s_g, x_g, n = raw[:, :d], raw[:, d : 2 * d], raw[:, 2 * d]
        s = torch.addcmul(torch.addcmul(s_g, shift, x_g, value=-2.0), n.unsqueeze(1), shift.square())
    else:
        s_g, x_g, n = raw[:, 0], raw[:, 1 : d + 1], raw[:, d + 1]
        s = s_g - 2 * (shift * x_g).sum(1) + n * shift.square().sum(1)
    return n, torch.addcmul(x_g, n.unsqueeze(1), shift, value=-1.0), s


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for M (and for T and the GEMMs, unless :mod:`puregmm._precision` picks float32)
    of float32 and float64 data; other dtypes keep their own."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else dtype


def plain(*tensors: Tensor | None) -> bool:
    """Whether chunk code may reuse buffers and work in place: eager, no autograd graph to
    record, no ``torch.func`` wrappers."""
    if torch.compiler.is_compiling():
        return False
    ts = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(wrapped(t) for t in ts)
