"""Helpers of the family rows: factor maps, the M-step's repair, the statistics' layout."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def _positive_qr(a: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of ``a`` [M, N] (M >= N) with R's diagonal made positive (rows of R and columns of
    Q flipped together, so QR is unchanged)."""
    q, r = torch.linalg.qr(a)
    sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)  # [N]
    return q * sign.unsqueeze(-2), r * sign.unsqueeze(-1)


_STRICT_UPPER: dict[tuple[int, torch.device], Tensor] = {}


def strict_upper(d: int, device: torch.device) -> Tensor:
    """The [D, D] bool mask of the strict upper triangle: built once per (D, device) on eager
    calls (3 ops every time otherwise; U is rebuilt several times per step), under
    ``torch.compile`` built in the graph."""
    if torch.compiler.is_compiling():
        return torch.ones(d, d, dtype=torch.bool, device=device).triu(1)
    key = (d, torch.device(device))
    if key not in _STRICT_UPPER:
        _STRICT_UPPER[key] = torch.ones(d, d, dtype=torch.bool, device=device).triu(1)
    return _STRICT_UPPER[key]


def _raw_of_upper(v: Tensor) -> Tensor:
    """``raw`` of an upper-triangular factor ``v`` with a positive diagonal (the inverse of
    :func:`upper_factor`)."""
    off = torch.where(strict_upper(v.shape[-1], v.device), v, torch.zeros((), dtype=v.dtype, device=v.device))
    return off + torch.diag_embed(torch.log(torch.diagonal(v, dim1=-2, dim2=-1)))


def upper_factor(raw: Tensor) -> Tensor:
    """U = triu(raw, 1) + diag(exp(diag raw)) over the last two dims.

    Written with a constant mask rather than ``torch.triu``, which is ~10x slower under ``vmap``.
    """
    diag = torch.diag_embed(torch.exp(torch.diagonal(raw, dim1=-2, dim2=-1)))
    return torch.where(strict_upper(raw.shape[-1], raw.device), raw, diag)  # the diagonal's off-diagonal is 0


# --- EM: the M-step's helpers ----------------------------------------------------------------------
class MStepWeights(NamedTuple):
    """Per-component counts and flags the M-step's covariance update needs (all [K]).

    ``empty``, ``active`` and ``pool`` are None when the M-step found every component active and
    none empty on plain eager tensors (:func:`puregmm.m_step`): the update then skips the
    branch-free selections, which would select nothing; ``eager`` says the same checks may be
    taken by value (plain eager tensors: no ``vmap``, autograd or ``torch.compile``)."""

    nk: Tensor  # n'_k = n_k + 10·eps
    empty: Tensor | None  # re-seeded this step
    active: Tensor | None  # not masked (logit > -inf)
    pool: Tensor | None  # pooling weights of the good components (sum to 1)
    eager: bool = False


def raw_from_cov_repaired(
    cov: Tensor, eps: float, floor: float, lowest: Tensor, eager: bool = False
) -> tuple[Tensor, Tensor]:
    """The matrix families' ``raw`` from covariances [..., D, D], repairing (and counting) the
    ones whose Cholesky factorisation fails and widening (by j·I, counted) the numerically
    singular ones: a Cholesky pivot L_ii² (each at least λ_min) below ``lowest`` [...] (the
    position's resolution) or below 10·D·eps₆₄ times the largest variance (what the float64
    moments resolve). ``eager`` (plain tensors): skip the repair's factorisations when none
    needs one (the branch-free form would select nothing from them)."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)  # [..., D]
    chol, info = torch.linalg.cholesky_ex(cov)
    limit = torch.maximum(lowest.to(cov.dtype), 10 * d * torch.finfo(torch.float64).eps * diag.amax(-1))
    pivot = torch.diagonal(chol, dim1=-2, dim2=-1).square().amin(-1)
    redo = (info != 0) | ~(pivot >= limit)  # NaN counts as singular
    if not (eager and not bool(redo.any())):
        chol = _repaired(cov, chol, info, redo, diag, limit, eps, floor)
    u = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False).mT  # U = L⁻ᵀ
    raw = torch.triu(u, 1) + torch.diag_embed(torch.log(torch.diagonal(u, dim1=-2, dim2=-1)))
    return raw, redo.sum()


def _repaired(
    cov: Tensor, chol: Tensor, info: Tensor, redo: Tensor, diag: Tensor, limit: Tensor, eps: float, floor: float
) -> Tensor:
    """Cholesky factors with the ``redo`` ones replaced: of cov + j·I, or of the floored diagonal."""
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    jitter = torch.where(info != 0, 10 * d * eps * diag.amax(-1).clamp_min(floor) + floor, 0.0)
    jitter = jitter + torch.where(redo, d * limit, 0.0)  # then λ_min >= D·limit
    chol2, info2 = torch.linalg.cholesky_ex(cov + jitter[..., None, None] * eye)
    chol3 = torch.diag_embed(diag.clamp_min(floor).sqrt())
    return torch.where(redo[..., None, None], torch.where((info2 != 0)[..., None, None], chol3, chol2), chol)


# --- EM: the statistics' layout (see puregmm._moments) -------------------------------------------
class Layout(NamedTuple):
    """Static column layout of T for one family and dimension (module table)."""

    ndim: int  # the family's scale_ndim: 2 full/tied, 1 diagonal, 0 scalar
    d: int
    h: int  # full/tied: side of the folded block; else 0
    width: int  # P
    square: bool = False  # full: every product [y, 1][y, 1]ᵀ, unfolded (m² columns)


#: Out of place (vmap, autograd), full family with D up to this: the unfolded square layout,
#: built by one broadcast multiplication (the folded one costs a few slices and a
#: concatenation: at D = 2, B = 1000 batched fits, 20 % of an EM step), for m² instead of
#: about m²/2 columns in the GEMMs.
SQUARE_MAX_D = 4


def layout(ndim: int, d: int, square: bool = False) -> Layout:
    if ndim == 2:
        m = d + 1
        if square:
            return Layout(2, d, 0, m * m, True)
        h = (m + 2) // 2  # ⌈(m+1)/2⌉: the tail's m - h <= h - 1 rows fit below the diagonal
        return Layout(2, d, h, h * h + h * (m - h))
    return Layout(ndim, d, 0, 2 * d + 1 if ndim == 1 else d + 2)


# --- interop, MDN heads, validation: helpers ---------------------------------------------------
def floored_upper_factor(a: Tensor, d: int, log_floor: float) -> Tensor:
    """``raw`` of the full family [..., D, D] from an MDN head's packed ``a [..., D(D+1)/2]``.

    log diag(U) = -a_ii/2 - ½ log(1 + floor ‖M‖²_F), off-diagonal U_ij = a_ij / √(1 + floor ‖M‖²_F),
    with log ‖M‖²_F computed as a logsumexp so a large or small diagonal cannot overflow
    (see :mod:`puregmm.mdn` for why every eigenvalue of Σ is then above the floor).
    """
    log_diag_m = -0.5 * a[..., :d]  # [..., D]
    off = a[..., d:]  # [..., D(D-1)/2]
    off_sq = off.square().sum(-1, keepdim=True)  # [..., 1]
    has_off = off_sq > 0  # log 0 = -inf, and a where keeps its gradient finite
    log_off_sq = torch.where(has_off, torch.log(torch.where(has_off, off_sq, torch.ones_like(off_sq))), -math.inf)
    log_norm_sq = torch.logsumexp(torch.cat([2.0 * log_diag_m, log_off_sq], -1), -1)  # log ‖M‖²_F [...]
    log_c = -0.5 * F.softplus(log_norm_sq + log_floor)  # log 1/√(1 + floor ‖M‖²)  [...]
    rows, cols = torch.triu_indices(d, d, 1, device=a.device)
    place = torch.zeros(off.shape[-1], d * d, dtype=a.dtype, device=a.device)  # one-hot [d(d-1)/2, D²]
    place[torch.arange(off.shape[-1], device=a.device), rows * d + cols] = 1.0  # a constant, built eagerly
    upper = ((off * torch.exp(log_c).unsqueeze(-1)) @ place).unflatten(-1, (d, d))  # [..., D, D]
    return upper + torch.diag_embed(log_diag_m + log_c.unsqueeze(-1))
