"""Autograd Functions over the chunked log-density kernels of :mod:`puregmm._fused`.

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
(nested Functions in a compiled backward are not traced either). Eagerly, :func:`apply` calls
them without ``Function.apply``'s per-call signature binding, and a first-order backward of
:class:`NLL` returns its forward's statistics without building :class:`Grads`' graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers

from puregmm._fused import (
    Whitening,
    chunk_grads,
    chunks,
    concat,
    grads_loop,
    lift,
    log_joint,
    logsumexp_rows,
    workspace,
)


def apply(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` (all arguments positional). Eagerly, outside ``torch.func`` transforms
    and ``torch.compile``, this is the branch ``Function.apply`` itself takes there, without its
    per-call ``inspect.signature`` binding of default arguments (measured ~60 µs a call, as much
    as the whole chunk kernel at MDN sizes; our forwards have no defaults to bind)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*unwrap_dead_wrappers(args))  # type: ignore[misc]


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
    return concat(parts)


# --- autograd Functions ---------------------------------------------------------------------------


class LogSumExp(torch.autograd.Function):
    """lse_n = logsumexp_k ℓ_nk [N], chunk by chunk; the backward recomputes each chunk."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, center: Tensor, a: Tensor, const: Tensor, dense: bool, rows: int) -> Tensor:
        w = Whitening(a, const, center, dense)
        bufs = workspace(w, rows, x)
        if bufs is None:
            return concat([logsumexp_rows(log_joint(w, lift(w, x[s:e]))) for s, e in chunks(len(x), rows)])
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
        return -torch.dot(g, lse), da, dc, dx, lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        x, center, a, const, g, dense, rows, need_x = inputs
        _, da, dc, dx, lse = output
        ctx.mark_non_differentiable(da, dc, dx, lse)
        ctx.save_for_backward(x, center, a, const, g, da, dc, dx, lse)
        ctx.save_for_forward(x, center, a, const, g, lse)
        ctx.set_materialize_grads(False)  # no zero gradients for the outputs nothing differentiates
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
        if grad_loss is None:  # only the non-differentiable outputs were used
            return (None,) * 8
        x, center, a, const, g, *pre = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the gradient is wanted: the differentiable Function
            da, dc, dx, lse = Grads.apply(x, center, a, const, g, ctx.dense, ctx.rows, ctx.need_x, *pre)
        else:  # first order: the forward's statistics as they are
            da, dc, dx, lse = pre
        need_x, need_g = ctx.needs_input_grad[0] and ctx.need_x, ctx.needs_input_grad[4]
        s = -grad_loss
        return (s * dx if need_x else None), None, s * da, s * dc, (s * lse if need_g else None), None, None, None


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
        return ta, tc, (concat(txs) if ctx.need_x else txs[0]), concat(tls)

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
        tx = concat(txs) if ctx.needs_input_grad[0] else None
        return (tx, None, ta, tc, concat(tgs), None, None, None) + (None,) * ctx.n_pre
