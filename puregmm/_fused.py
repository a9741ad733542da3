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

Three ``torch.autograd.Function``s keep memory bounded by a chunk:

* :class:`LogSumExp`: lse [N]; its backward recomputes each chunk (no [N, K] state).
* :class:`NLL`: -Σ_n g_n lse_n for known row weights g (the loss); its forward produces the
  gradient statistics in the same pass over the data, so a loss+gradient costs two GEMMs per
  chunk instead of three.
* :class:`Grads`: the gradient itself, as a differentiable function of the inputs. Both
  backwards return it, so second derivatives (gradients through unrolled ``step``s) work: its
  own backward is a chunked VJP of :func:`chunk_grads`.

All three set ``generate_vmap_rule``, so ``torch.func.vmap`` batches them, and define a
chunked ``jvp``, so forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``) works. Under
``torch.compile`` the loss goes through :class:`LogSumExp` (no ``jvp``: Dynamo does not trace
Functions that define one), whose backward is then written inline with differentiable ops
(nested Functions in a compiled backward are not traced either).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

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


def _cat(parts: list[Tensor]) -> Tensor:
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
    return torch.addcmul(w.a[1], xl.unsqueeze(-1), w.a[0], out=out)  # type: ignore[call-overload]


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
    """(shift, offset) [c, 1] for a stable logsumexp: the row maxima, 0 where not finite (all
    -inf, NaN rows) for the shift inside the exponential; the offset added back is -inf where
    every ℓ of the row is -inf (a row at infinity, or so far that its squared distance
    overflows), so that its log-density is -inf, not log K + 3 log eps."""
    m = lj.detach().amax(1, keepdim=True)  # its gradient cancels exactly
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return shift, torch.where(m == -math.inf, m, shift)


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
    return da, dc, (_cat(dxs) if need_x else dxs[0]), _cat(lses)


def _chunk_lse(center: Tensor, dense: bool) -> Any:
    def lse(a: Tensor, const: Tensor, x: Tensor) -> Tensor:
        w = Whitening(a, const, center, dense)
        return logsumexp_rows(log_joint(w, lift(w, x)))

    return lse


def _chunk_grad_fn(center: Tensor, dense: bool, need_x: bool) -> Any:
    def grads(a: Tensor, const: Tensor, x: Tensor, g: Tensor) -> tuple[Tensor, ...]:
        w = Whitening(a, const, center, dense)
        return chunk_grads(w, lift(w, x), g, need_x)

    return grads


def _tangent(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


def _lse_jvp(x: Tensor, center: Tensor, a: Tensor, const: Tensor, dense: bool, rows: int, *tangents: Any) -> Tensor:
    """Forward-mode tangent of lse [N] for tangents (x_t, a_t, const_t), chunk by chunk."""
    xt, at, ct = tangents
    at, ct = _tangent(at, a), _tangent(ct, const)
    fn = _chunk_lse(center, dense)
    parts = [
        torch.func.jvp(fn, (a, const, x[s:e]), (at, ct, _tangent(None if xt is None else xt[s:e], x[s:e])))[1]
        for s, e in chunks(len(x), rows)
    ]
    return _cat(parts)


# --- autograd Functions ---------------------------------------------------------------------------


class LogSumExp(torch.autograd.Function):
    """lse_n = logsumexp_k ℓ_nk [N], chunk by chunk; the backward recomputes each chunk."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, center: Tensor, a: Tensor, const: Tensor, dense: bool, rows: int) -> Tensor:
        w = Whitening(a, const, center, dense)
        bufs = workspace(w, rows, x)
        if bufs is None:
            return _cat([logsumexp_rows(log_joint(w, lift(w, x[s:e]))) for s, e in chunks(len(x), rows)])
        out = x.new_empty(x.shape[0])
        for s, e in chunks(len(x), rows):
            logsumexp_rows(log_joint(w, lift(w, x[s:e], bufs), bufs), inplace=True, out=out[s:e])
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, center, a, const, dense, rows = inputs
        ctx.save_for_backward(x, center, a, const)
        ctx.dense, ctx.rows = dense, rows

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, center, a, const = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        if torch.compiler.is_compiling():
            da, dc, dx, _ = grads_loop(Whitening(a, const, center, ctx.dense), x, g, ctx.rows, need_x, inplace=False)
        else:
            da, dc, dx, _ = Grads.apply(x, center, a, const, g, ctx.dense, ctx.rows, need_x)
        return (dx if need_x else None), None, da, dc, None, None


class LogSumExpJvp(LogSumExp):
    """:class:`LogSumExp` with forward-mode AD (``torch.func.jvp``/``jacfwd``/``hessian``): a
    chunked JVP. Eager only: Dynamo does not trace Functions that define ``jvp``."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        LogSumExp.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    def jvp(ctx: Any, xt: Tensor | None, _ct: Any, at: Tensor | None, constt: Tensor | None, *_: Any) -> Tensor:
        x, center, a, const = ctx.saved_tensors
        return _lse_jvp(x, center, a, const, ctx.dense, ctx.rows, xt, at, constt)


def logsumexp(x: Tensor, w: Whitening, rows: int) -> Tensor:
    """lse [N] of rows ``x`` through :class:`LogSumExp` (with forward mode unless compiling)."""
    fn = LogSumExp if torch.compiler.is_compiling() else LogSumExpJvp
    return fn.apply(x, w.center, w.a, w.const, w.dense, rows)  # type: ignore[no-any-return]


class NLL(torch.autograd.Function):
    """-Σ_n g_n lse_n for row weights g [N]; the forward also returns (non-differentiable) the
    gradient statistics, which the backward hands to :class:`Grads` instead of recomputing."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, center: Tensor, a: Tensor, const: Tensor, g: Tensor, dense: bool, rows: int, need_x: bool
    ) -> tuple[Tensor, ...]:
        da, dc, dx, lse = grads_loop(Whitening(a, const, center, dense), x, g, rows, need_x, inplace=True)
        return -(g * lse).sum(), da, dc, dx, lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, center, a, const, g, dense, rows, need_x = inputs
        _, da, dc, dx, lse = output
        ctx.mark_non_differentiable(da, dc, dx, lse)
        ctx.save_for_backward(x, center, a, const, g, da, dc, dx, lse)
        ctx.save_for_forward(x, center, a, const, g, lse)
        ctx.dense, ctx.rows, ctx.need_x = dense, rows, need_x

    @staticmethod
    def jvp(ctx: Any, xt: Tensor | None, _ct: Any, at: Tensor | None, constt: Tensor | None, gt: Tensor | None,
            *_: Any) -> tuple[Tensor | None, ...]:  # fmt: skip
        x, center, a, const, g, lse = ctx.saved_tensors[:5] + ctx.saved_tensors[-1:]
        lse_t = _lse_jvp(x, center, a, const, ctx.dense, ctx.rows, xt, at, constt)
        loss_t = -(g * lse_t).sum() - (0.0 if gt is None else (gt * lse).sum())
        return loss_t, None, None, None, None

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, center, a, const, g, *pre = ctx.saved_tensors
        da, dc, dx, lse = Grads.apply(x, center, a, const, g, ctx.dense, ctx.rows, ctx.need_x, *pre)
        need_x = ctx.needs_input_grad[0] and ctx.need_x
        s = -grad_loss
        return (s * dx if need_x else None), None, s * da, s * dc, s * lse, None, None, None


class Grads(torch.autograd.Function):
    """(∂/∂a, ∂/∂const, ∂/∂x, lse) of Σ_n g_n lse_n as a function of (x, a, const, g).

    The forward computes them chunk by chunk, or passes through values the caller already has
    (``pre``); the backward, needed only for second derivatives, is a chunked VJP of
    :func:`chunk_grads`, so its memory is bounded by a chunk too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, center: Tensor, a: Tensor, const: Tensor, g: Tensor, dense: bool, rows: int, need_x: bool,
        *pre: Tensor,
    ) -> tuple[Tensor, ...]:  # fmt: skip
        if pre:
            return tuple(t.clone() for t in pre)
        return grads_loop(Whitening(a, const, center, dense), x, g, rows, need_x, inplace=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, center, a, const, g, dense, rows, need_x, *_ = inputs
        ctx.save_for_backward(x, center, a, const, g)
        ctx.save_for_forward(x, center, a, const, g)
        ctx.dense, ctx.rows, ctx.need_x, ctx.n_pre = dense, rows, need_x, len(inputs) - 8

    @staticmethod
    def jvp(ctx: Any, xt: Tensor | None, _ct: Any, at: Tensor | None, constt: Tensor | None, gt: Tensor | None,
            *_: Any) -> tuple[Tensor, ...]:  # fmt: skip
        x, center, a, const, g = ctx.saved_tensors
        fn = _chunk_grad_fn(center, ctx.dense, ctx.need_x)
        at, constt = _tangent(at, a), _tangent(constt, const)
        ta, tc = torch.zeros_like(a), torch.zeros_like(const)
        txs, tls = [], []
        for s, e in chunks(len(x), ctx.rows):
            x_t = _tangent(None if xt is None else xt[s:e], x[s:e])
            g_t = _tangent(None if gt is None else gt[s:e], g[s:e])
            primals = (a, const, x[s:e], g[s:e].contiguous())  # g may be an expanded 1/N
            da, dc, dx, dl = torch.func.jvp(fn, primals, (at, constt, x_t, g_t))[1]
            ta, tc = ta + da, tc + dc
            txs.append(dx)
            tls.append(dl)
        return ta, tc, (_cat(txs) if ctx.need_x else txs[0]), _cat(tls)

    @staticmethod
    def backward(ctx: Any, ga: Tensor, gc: Tensor, gx: Tensor, glse: Tensor) -> tuple[Tensor | None, ...]:
        x, center, a, const, g = ctx.saved_tensors
        need_x = ctx.need_x
        one = _chunk_grad_fn(center, ctx.dense, need_x)

        ta, tc = torch.zeros_like(a), torch.zeros_like(const)
        txs, tgs = [], []
        for s, e in chunks(len(x), ctx.rows):
            vjp = torch.func.vjp(one, a, const, x[s:e], g[s:e])[1]
            da, dc, dx, dg = vjp((ga, gc, gx[s:e] if need_x else gx, glse[s:e]))
            ta, tc = ta + da, tc + dc
            txs.append(dx)
            tgs.append(dg)
        tx = _cat(txs) if ctx.needs_input_grad[0] else None
        return (tx, None, ta, tc, _cat(tgs), None, None, None) + (None,) * ctx.n_pre
