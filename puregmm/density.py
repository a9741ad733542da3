"""Log-densities of a mixture: the one implementation every fit and inference path uses.

    log p(x) = logsumexp_k ℓ_k(x),   ℓ_k(x) = log w_k + ½ log det P_k - ½ D log 2π - ½ ‖z_k(x)‖²

with precision P_k = U_k U_kᵀ and whitened residual z_k(x) = (x - μ_k) U_k.

Design decisions:

* **Centre once, whiten as one affine map.** Data are shifted by the (detached) centre c of the
  means, and z_k = (x - c) U_k - t_k with t_k = (μ_k - c) U_k. The result is mathematically
  unchanged, but float32 keeps its accuracy on data with a large common offset, and the shift
  t_k rides in the GEMM as an extra row: [x - c, 1] @ [U_k; -t_k] (full and tied families). For
  the diagonal and scalar families U_k is diagonal and z_k = (x - c) ⊙ s_k - t_k element-wise.
* **Per component, vmapped.** Each term is written for one component and ``torch.func.vmap``-ed
  over the K components; under ``vmap`` the per-component ``x @ A_k`` is one batched GEMM.
* **Chunked over rows.** Rows are processed in chunks sized so the [K, c, D] block stays in
  cache; nothing of size N × K × D is ever allocated, and only [N] values leave a chunk.
* **No stored activations.** :func:`log_prob` goes through :class:`_MixtureLogSumExp`, a
  ``torch.autograd.Function`` whose backward recomputes each chunk and forms the gradient from
  per-chunk statistics of the responsibilities r_nk (for output cotangents g_n, q_nk = g_n r_nk):

      ∂/∂const_k = Σ_n q_nk,   ∂/∂A_k = -[x_n - c, 1]ᵀ (q_nk z_nk) summed over n,
      ∂/∂x_n = -Σ_k q_nk z_nk U_kᵀ

  so the memory of a gradient evaluation grows with the chunk size, never with N × K. The
  backward is written with differentiable torch ops (no ``once_differentiable``), so second
  derivatives (gradients through unrolled ``step``s) work, and ``generate_vmap_rule`` lets
  ``torch.func.vmap`` batch it. Chain rules from the raw params (logits, means, ``scale``) to
  (A, const) are left to autograd on [K, D, D]-sized tensors.

These are kernels: they check shapes only, so they run under ``vmap``, ``grad`` and
``torch.compile(fullgraph=True)``. A row of ``x`` holding NaN gives NaN for that row (and NaN
gradients, as any mean over that row would).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from puregmm import _validate
from puregmm.families import LOG_2PI
from puregmm.params import GMMParams

#: Target size in bytes of one [K, c, D] block of whitened residuals (cache resident).
CHUNK_BYTES = 1 << 21
#: Bounds on the rows per chunk: small chunks pay per-op overhead, big ones leave the cache.
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 16384
#: Under ``torch.compile`` the chunk loop is unrolled into the graph: cap the number of chunks.
MAX_COMPILED_CHUNKS = 8


class Whitening(NamedTuple):
    """The affine maps x ↦ z_k(x) of all components, laid out for a chunk of data.

    The component axis is last, so a chunk's residuals form one [c, D, K] block: one GEMM
    produces it, and the squared norms reduce over its middle axis (vectorised over K).

    Attributes:
        a: dense (full, tied): [D+1, D, K], rows ``[U_k; -t_k]`` for component k; diagonal and
            scalar families: [2, D, K], rows ``[s_k; -t_k]`` (s_k the diagonal of U_k).
        const: [K] log w_k + ½ log det P_k - ½ D log 2π.
        center: [D] detached centre of the means; data are shifted by it first.
        dense: static, whether ``a`` holds full matrices.
    """

    a: Tensor
    const: Tensor
    center: Tensor
    dense: bool


def whitening(params: GMMParams) -> Whitening:
    """The :class:`Whitening` of unbatched ``params``, written per component and vmapped.

    Differentiable in the params, except the centre and the constant family's variance, which
    are detached.
    """
    spec, k, d = params.spec, params.n_components, params.dim
    center = params.means.detach().mean(0)  # [D]
    raw = spec.per_component_raw(params.scale, k)
    if not spec.learned:
        raw = raw.detach()
    dense = spec.scale_ndim == 2
    ones = torch.ones(1, d, dtype=params.dtype, device=params.device)

    def one(mean: Tensor, raw_k: Tensor) -> tuple[Tensor, Tensor]:  # one component
        shift = spec.whiten(raw_k, (mean - center).unsqueeze(0))  # [1, D]: t_k = (μ_k - c) U_k
        factor = spec.precision_factor(raw_k, d) if dense else spec.whiten(raw_k, ones)  # [D, D] | [1, D]
        return torch.cat([factor, -shift], 0), spec.half_log_det_precision(raw_k, d)

    a, half_log_det = torch.func.vmap(one, out_dims=(2, 0))(params.means, raw)  # [D+1 | 2, D, K], [K]
    const = torch.log_softmax(params.logits, dim=-1) + half_log_det - 0.5 * d * LOG_2PI  # [K]
    return Whitening(a.contiguous(), const, center, dense)


def chunk_rows(n: int, k: int, d: int, itemsize: int) -> int:
    """Rows per chunk: the [c, D, K] block near :data:`CHUNK_BYTES`, within the row bounds."""
    rows = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(1, k * d * itemsize)))
    if torch.compiler.is_compiling():  # the loop unrolls into the graph; keep it short
        rows = max(rows, -(-n // MAX_COMPILED_CHUNKS))
    return min(rows, max(n, 1))


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _lift(w: Whitening, x: Tensor) -> Tensor:
    """A chunk of rows in whitening coordinates: [x - c, 1] [c, D+1] (dense) or x - c [c, D]."""
    xc = x - w.center
    return F.pad(xc, (0, 1), value=1.0) if w.dense else xc


def _residual(w: Whitening, xl: Tensor) -> Tensor:
    """z[c, D, K] = (x - μ_k) U_k for lifted rows ``xl``: one GEMM [c, D+1] @ [D+1, D·K] (dense),
    or (x - c) ⊙ s_k - t_k element-wise."""
    c, (m, d, k) = xl.shape[0], w.a.shape
    if w.dense:
        return (xl @ w.a.reshape(m, d * k)).reshape(c, d, k)
    return torch.addcmul(w.a[1], xl.unsqueeze(-1), w.a[0])


def _log_joint(w: Whitening, xl: Tensor, inplace: bool = False) -> Tensor:
    """ℓ[c, K] = const_k - ½ ‖z_k‖² for lifted rows ``xl`` (``inplace`` only where no autograd
    graph is recorded: the autograd.Function forward)."""
    z = _residual(w, xl)
    sq = (z.mul_(z) if inplace else z.square()).sum(1)  # [c, K]
    return torch.add(w.const, sq, alpha=-0.5)


def joint_log_prob_chunk(w: Whitening, x: Tensor) -> Tensor:
    """log w_k + log N(x_n | μ_k, Σ_k) [c, K] for one chunk of rows ``x`` [c, D]."""
    return _log_joint(w, _lift(w, x))


class _MixtureLogSumExp(torch.autograd.Function):
    """lse_n = logsumexp_k ℓ_nk chunk by chunk; the backward recomputes each chunk (module
    docstring) and stores nothing of size N × K."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, center: Tensor, a: Tensor, const: Tensor, dense: bool, rows: int) -> Tensor:
        w = Whitening(a, const, center, dense)
        out = [torch.logsumexp(_log_joint(w, _lift(w, x[s:e]), inplace=True), 1) for s, e in _chunks(len(x), rows)]
        return torch.cat(out) if len(out) != 1 else out[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, center, a, const, dense, rows = inputs
        ctx.save_for_backward(x, center, a, const, output)
        ctx.dense, ctx.rows = dense, rows

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, center, a, const, lse, g = _outside_grad_level(*ctx.saved_tensors, g)
        w = Whitening(a, const, center, ctx.dense)
        need_x = ctx.needs_input_grad[0]
        grad_a = torch.zeros_like(a)
        grad_const = torch.zeros_like(const)
        grad_x = []
        for s, e in _chunks(len(x), ctx.rows):
            da, dc, dx = _chunk_grads(w, _lift(w, x[s:e]), g[s:e], lse[s:e], need_x)
            grad_a = grad_a + da
            grad_const = grad_const + dc
            grad_x.append(dx)
        dx_all = (torch.cat(grad_x) if len(grad_x) != 1 else grad_x[0]) if need_x else None
        return dx_all, None, grad_a, grad_const, None, None


def _outside_grad_level(*tensors: Tensor) -> list[Tensor]:
    """``tensors`` seen from below the innermost active ``torch.func`` grad level.

    ``torch.func.grad`` runs backward passes with ``create_graph=True`` so that outer
    transforms can record them; at its own level that graph is never used, yet it would keep
    every chunk's [c, D, K] intermediates alive until the gradient returns (memory growing
    with N). Computing on the unwrapped values records only at the outer levels that need it
    (second derivatives still work); the results are lifted back to the current level by
    functorch. Skipped under ``torch.compile`` (which frees intermediates itself) and where
    the private functorch API is missing.
    """
    if torch.compiler.is_compiling():
        return list(tensors)
    try:
        ft = torch._C._functorch
        level = ft.maybe_current_level()
        if level is None:
            return list(tensors)
        return [
            ft._unwrap_for_grad(t, level) if ft.is_gradtrackingtensor(t) and ft.maybe_get_level(t) == level else t
            for t in tensors
        ]
    except AttributeError:  # pragma: no cover - other torch versions
        return list(tensors)


def _chunk_grads(w: Whitening, xl: Tensor, g: Tensor, lse: Tensor, need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Cotangents of (a, const [K], x [c, D]) for one chunk, given g = ∂/∂lse [c].

    Plain differentiable torch ops, so the result can itself be differentiated.
    """
    c, (m, d, k) = xl.shape[0], w.a.shape
    z = _residual(w, xl)  # [c, D, K]
    log_joint = torch.add(w.const, z.square().sum(1), alpha=-0.5)  # [c, K]
    q = g.unsqueeze(-1) * torch.exp(log_joint - lse.unsqueeze(-1))  # [c, K]: g_n r_nk
    qz = z * q.unsqueeze(1)  # [c, D, K]
    if w.dense:
        da = -(xl.mT @ qz.reshape(c, d * k)).reshape(m, d, k)  # [D+1, c] @ [c, D·K]
        dx = -(qz.reshape(c, d * k) @ w.a[:-1].reshape(d, d * k).mT) if need_x else q.new_zeros(())  # [c, D]
    else:
        da = -torch.stack([(qz * xl.unsqueeze(-1)).sum(0), qz.sum(0)])  # [2, D, K]
        dx = -(qz * w.a[0]).sum(-1) if need_x else q.new_zeros(())  # [c, D]
    return da, q.sum(0), dx


def component_log_prob(params: GMMParams, x: Tensor) -> Tensor:
    """Joint log-densities log w_k + log N(x_n | μ_k, Σ_k), shape [N, K] (unbatched params).

    Differentiable by plain autograd (it keeps per-chunk activations); use :func:`log_prob` or
    :func:`loss` for gradients of the mixture density in memory bounded by a chunk.
    """
    w = whitening(params)
    n = x.shape[0]
    rows = chunk_rows(n, params.n_components, params.dim, x.element_size())
    out = [joint_log_prob_chunk(w, x[s:e]) for s, e in _chunks(n, rows)]
    return torch.cat(out) if len(out) != 1 else out[0]


def _log_prob_one(params: GMMParams, x: Tensor) -> Tensor:
    w = whitening(params)
    rows = chunk_rows(x.shape[0], params.n_components, params.dim, x.element_size())
    out = _MixtureLogSumExp.apply(x, w.center, w.a, w.const, w.dense, rows)
    return out  # type: ignore[no-any-return]


def log_prob(params: GMMParams, x: Tensor) -> Tensor:
    """log p(x_n) of the mixture, shape [..., N].

    Args:
        params: mixture params, optionally with leading batch dims ``B...``.
        x: data [N, D], or [B..., N, D] matching the params' batch dims.

    Returns:
        [B..., N] log-densities.

    Raises:
        ValueError: ``x`` is not [..., N, D] with the params' D.
    """
    _validate.data_shape(params, x)
    return _batched(params, x, _log_prob_one)


def loss(params: GMMParams, x: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood, ``-log_prob(params, x).mean(-1)`` (weighted if given).

    With ``sample_weight`` [N] (non-negative, not all zero; not checked here) it is
    ``-(w · log p(x)).sum() / w.sum()``, which equals the plain loss on data with rows repeated
    by integer weights.
    """
    lp = log_prob(params, x)
    if sample_weight is None:
        return -lp.mean(-1)
    return -(lp * sample_weight).sum(-1) / sample_weight.sum(-1)


def _batched(params: GMMParams, x: Tensor, fn: Callable[[GMMParams, Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to unbatched params, vmapping over the params' leading batch dims.

    ``x`` is shared when it is [N, D], else its leading dims must equal the params' batch dims.
    """
    batch = params.batch_shape
    x_batch = tuple(x.shape[:-2])
    if x_batch and x_batch != batch:
        raise ValueError(
            f"x has batch dims {x_batch} but the params have batch dims {batch}; "
            "pass x as [N, D] (shared) or [*batch, N, D]"
        )
    for _ in batch:
        fn = torch.func.vmap(fn, in_dims=(0, 0 if x_batch else None))
    return fn(params, x)
