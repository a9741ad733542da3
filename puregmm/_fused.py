"""Chunked kernels of the mixture log-density and its gradient (private; see :mod:`puregmm.density`).

Every component's log-density is an affine map followed by a squared norm:

    ℓ_nk = const_k - ½ ‖z_nk‖²,   z_nk = [x_n - c, 1] A_k   (dense: A_k = [U_k; -t_k])
                                  z_nk = (x_n - c) ⊙ s_k - t_k   (diagonal and scalar families)

A chunk of c rows is one [c, D, K] block of residuals: one GEMM [c, D+1] @ [D+1, D·K] makes
it, the squared norms reduce over its middle axis (vectorised over K), and it stays in cache.

The gradient of Σ_n g_n lse_n (lse_n = logsumexp_k ℓ_nk) comes from the same block, with
responsibilities r_nk = exp(ℓ_nk - lse_n) and q_nk = g_n r_nk:

    ∂/∂const_k = Σ_n q_nk,   ∂/∂A_k = -Σ_n [x_n - c, 1]ᵀ (q_nk z_nk)   (one GEMM [D+1, c] @ [c, D·K]),
    ∂/∂x_n = -Σ_k q_nk z_nk U_kᵀ

The autograd Functions over these chunk kernels are in :mod:`puregmm._fused_autograd`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Target size in bytes of one [c, D, K] block: larger blocks leave the cache, and on this
#: machine temporaries above ~2 MB are returned to the OS and page-faulted in again.
CHUNK_BYTES = 1 << 21
#: Bounds on the rows per chunk: small chunks pay per-op overhead.
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 16384
#: Under ``torch.compile`` the chunk loop is unrolled into the graph: cap the number of chunks.
MAX_COMPILED_CHUNKS = 8


class Whitening(NamedTuple):
    """The affine maps x ↦ z_k(x) of all components, component axis last.

    Attributes:
        a: dense (full, tied): [D+1, D, K], rows ``[U_k; -t_k]`` of component k; diagonal and
            scalar families: [2, D, K], rows ``[s_k; -t_k]`` (s_k the diagonal of U_k).
        const: [K] log w_k + ½ log det P_k - ½ D log 2π.
        center: [D] detached centre c of the means; rows are shifted by it first.
        dense: static, whether ``a`` holds full matrices.
    """

    a: Tensor
    const: Tensor
    center: Tensor
    dense: bool


# --- chunking -------------------------------------------------------------------------------------


def chunk_rows(n: int, k: int, d: int, itemsize: int) -> int:
    """Rows per chunk: the [c, D, K] block near :data:`CHUNK_BYTES`, within the row bounds."""
    rows = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(1, k * d * itemsize)))
    if torch.compiler.is_compiling():  # the loop unrolls into the graph; keep it short
        rows = max(rows, -(-n // MAX_COMPILED_CHUNKS))
    return min(rows, max(n, 1))


def chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def concat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if len(parts) != 1 else parts[0]


# --- workspace -----------------------------------------------------------------------------------


class Buffers:
    """Per-call workspace of the chunk loop: the lifted rows, z and z² blocks and ℓ, allocated
    once and reused by every chunk.

    Fresh multi-MB temporaries per chunk are returned to the OS by glibc when freed and
    page-faulted back in by the next chunk (measured: half the time of a loss+gradient).
    Used only in a Function's forward on plain tensors, where nothing is recorded; under
    ``vmap`` (batched tensors) and ``torch.compile`` the chunk functions allocate instead.
    """

    def __init__(self, w: Whitening, rows: int, x: Tensor) -> None:
        m, d, k = w.a.shape
        self.xl = x.new_empty(rows, m if w.dense else d)
        if w.dense:
            self.xl[:, d] = 1.0
        self.z = x.new_empty(rows, d, k)
        self.zz = x.new_empty(rows, d, k)
        self.lj = x.new_empty(rows, k)


def workspace(w: Whitening, rows: int, *tensors: Tensor) -> Buffers | None:
    """:class:`Buffers` where in-place chunk code is safe (plain eager tensors), else None."""
    if torch.compiler.is_compiling():
        return None
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(wrapped(t) for t in (w.a, w.const, w.center, *tensors)):
        return None
    return Buffers(w, rows, tensors[0])


def _part(buf: Tensor | None, c: int) -> Tensor | None:
    return None if buf is None else buf[:c]


# --- one chunk ------------------------------------------------------------------------------------


def lift(w: Whitening, x: Tensor, bufs: Buffers | None = None) -> Tensor:
    """Rows [c, D] in whitening coordinates: [x - c, 1] [c, D+1] (dense) or x - c [c, D]."""
    if bufs is None:
        xc = x - w.center
        return F.pad(xc, (0, 1), value=1.0) if w.dense else xc
    xl = bufs.xl[: x.shape[0]]
    torch.sub(x, w.center, out=xl[:, : x.shape[1]])
    return xl


def residual(w: Whitening, xl: Tensor, bufs: Buffers | None = None) -> Tensor:
    """z [c, D, K] for lifted rows: one GEMM (dense) or (x - c) ⊙ s_k - t_k."""
    c, (m, d, k) = xl.shape[0], w.a.shape
    out = _part(None if bufs is None else bufs.z, c)
    if w.dense:
        flat = None if out is None else out.view(c, d * k)
        return torch.mm(xl, w.a.reshape(m, d * k), out=flat).view(c, d, k)  # type: ignore[call-overload]
    s, neg_t = w.a.unbind(0)  # [D, K] each
    return torch.addcmul(neg_t, xl.unsqueeze(-1), s, out=out)  # type: ignore[call-overload]


def _log_joint_from(w: Whitening, z: Tensor, bufs: Buffers | None, keep_z: bool) -> Tensor:
    """ℓ [c, K] = const_k - ½ ‖z_k‖² (in the workspace when given, keeping z if asked)."""
    if bufs is None:
        return torch.add(w.const, (z * z).sum(1), alpha=-0.5)
    c = z.shape[0]
    zz = torch.mul(z, z, out=bufs.zz[:c]) if keep_z else z.mul_(z)
    lj = torch.sum(zz, 1, out=bufs.lj[:c])
    return lj.mul_(-0.5).add_(w.const)


def log_joint(w: Whitening, xl: Tensor, bufs: Buffers | None = None) -> Tensor:
    """ℓ [c, K] for lifted rows (overwrites the workspace when given)."""
    return _log_joint_from(w, residual(w, xl, bufs), bufs, keep_z=False)


def _row_max(lj: Tensor) -> tuple[Tensor, Tensor]:
    """(shift, offset) [c, 1] for a stable logsumexp: the row maxima m, 0 where not finite (all
    -inf, NaN rows) for the shift inside the exponential; the offset added back is m itself:
    the shift where m is finite, -inf where every ℓ of the row is -inf (a row at infinity, or so
    far that its squared distance overflows), so that its log-density is -inf, not
    log K + 3 log eps; where m is +inf or NaN the sum is +inf or NaN already, and adding m keeps it."""
    m = (lj.detach() if lj.requires_grad else lj).amax(1, keepdim=True)  # its gradient cancels exactly
    return torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0), m


def _shifted_exp(lj: Tensor, top: Tensor, inplace: bool) -> Tensor:
    """exp(ℓ - max ℓ), with the exponent clamped at -3 log(1/eps) (-48 in float32, -108 in
    float64): terms that small are below eps² of the largest, and the clamp keeps the results,
    and their products with row weights and residuals, out of the subnormal range, where x86
    arithmetic runs 10-100x slower."""
    floor = 3.0 * math.log(torch.finfo(lj.dtype).eps)
    if inplace:
        return lj.sub_(top).clamp_(min=floor).exp_()
    return torch.exp(torch.clamp(lj - top, min=floor))


def logsumexp_rows(lj: Tensor, inplace: bool = False, out: Tensor | None = None) -> Tensor:
    """logsumexp over K of ℓ [c, K] -> [c]; NaN rows stay NaN (``inplace`` overwrites ℓ)."""
    m, offset = _row_max(lj)
    total = _shifted_exp(lj, m, inplace).sum(1)
    return torch.add(torch.log(total), offset.squeeze(1), out=out)  # type: ignore[call-overload]


class Sums(NamedTuple):
    """Accumulators of a chunk loop in a Function's forward: ∂/∂a and ∂/∂const summed in place,
    ∂/∂x [N, D] (or None) and lse [N] written by rows."""

    da: Tensor
    dc: Tensor
    dx: Tensor | None
    lse: Tensor


def chunk_grads(
    w: Whitening, xl: Tensor, g: Tensor, need_x: bool, bufs: Buffers | None = None, into: Sums | None = None,
    rows: slice = slice(None),
) -> tuple[Tensor, ...]:  # fmt: skip
    """Gradient of Σ_n g_n lse_n over one chunk: (∂/∂a, ∂/∂const [K], ∂/∂x [c, D] or a 0-d
    placeholder, lse [c]).

    Without ``bufs``: plain out-of-place torch ops, so the result can itself be differentiated.
    With ``bufs`` and ``into`` (a Function's forward): the same ops in the workspace, results
    added into ``into`` (rows ``rows`` of its [N] parts); nothing is allocated beyond [c, 1]
    vectors, so the heap does not churn over thousands of chunks. Returns ``()`` then.
    """
    c, (m, d, k) = xl.shape[0], w.a.shape
    inplace = bufs is not None and into is not None
    z = residual(w, xl, bufs)  # [c, D, K]
    lj = _log_joint_from(w, z, bufs, keep_z=True)  # [c, K]
    top, offset = _row_max(lj)
    e = _shifted_exp(lj, top, inplace)  # [c, K]
    total = e.sum(1, keepdim=True)  # [c, 1]
    scale = g.unsqueeze(-1) / total
    if not inplace:
        lse = (torch.log(total) + offset).squeeze(1)  # [c]
        q = e * scale  # [c, K]: g_n r_nk
        qz = z * -q.unsqueeze(1)  # [c, D, K]: -q_nk z_nk
        if w.dense:
            da = (xl.mT @ qz.reshape(c, d * k)).reshape(m, d, k)  # [D+1, c] @ [c, D·K]
            dx = qz.reshape(c, d * k) @ w.a[:-1].reshape(d, d * k).mT if need_x else q.new_zeros(())
        else:
            da = torch.stack([(qz * xl.unsqueeze(-1)).sum(0), qz.sum(0)])  # [2, D, K]
            dx = (qz * w.a[0]).sum(-1) if need_x else q.new_zeros(())
        return da, q.sum(0), dx, lse
    assert into is not None
    torch.add(torch.log(total), offset, out=into.lse[rows].unsqueeze(1))
    q = e.mul_(scale)
    into.dc.add_(q.sum(0))
    qz = z.mul_(q.unsqueeze(1))  # [c, D, K]: +q_nk z_nk; the signs go into alpha=-1 below
    if w.dense:
        flat = qz.view(c, d * k)
        into.da.view(m, d * k).addmm_(xl.mT, flat, alpha=-1.0)
        if into.dx is not None:
            torch.mm(flat, w.a[:-1].reshape(d, d * k).mT, out=into.dx[rows]).neg_()
    else:
        if into.dx is not None:
            torch.sum(qz * w.a[0], -1, out=into.dx[rows]).neg_()
        into.da[1].sub_(qz.sum(0))
        into.da[0].sub_(qz.mul_(xl.unsqueeze(-1)).sum(0))
    return ()


def grads_loop(w: Whitening, x: Tensor, g: Tensor, rows: int, need_x: bool, inplace: bool) -> tuple[Tensor, ...]:
    """:func:`chunk_grads` summed over all chunks: (da, dconst, dx [N, D] | 0-d, lse [N]).

    ``inplace`` (a Function's forward) uses a workspace where the tensors allow it.
    """
    n = x.shape[0]
    if n <= rows:  # one chunk: the out-of-place chunk function, no workspace or accumulators
        return chunk_grads(w, lift(w, x), g, need_x)
    bufs = workspace(w, rows, x, g) if inplace else None
    if bufs is not None:
        into = Sums(torch.zeros_like(w.a), torch.zeros_like(w.const), x.new_empty(n, x.shape[1]) if need_x else None,
                    x.new_empty(n))  # fmt: skip
        for s, e in chunks(n, rows):
            chunk_grads(w, lift(w, x[s:e], bufs), g[s:e], need_x, bufs, into, slice(s, e))
        return into.da, into.dc, (into.dx if into.dx is not None else x.new_zeros(())), into.lse
    da = torch.zeros_like(w.a)
    dc = torch.zeros_like(w.const)
    dxs, lses = [], []
    for s, e in chunks(n, rows):
        a_c, c_c, x_c, l_c = chunk_grads(w, lift(w, x[s:e]), g[s:e], need_x)
        da, dc = da + a_c, dc + c_c
        dxs.append(x_c)
        lses.append(l_c)
    return da, dc, (concat(dxs) if need_x else dxs[0]), concat(lses)
