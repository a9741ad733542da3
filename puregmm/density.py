"""Log-densities of a mixture: the one implementation every fit and inference path uses.

    log p(x) = logsumexp_k ℓ_k(x),   ℓ_k(x) = log w_k + ½ log det P_k - ½ D log 2π - ½ ‖z_k(x)‖²

with precision P_k = U_k U_kᵀ and whitened residual z_k(x) = (x - μ_k) U_k.

Design decisions:

* **Per component, vmapped.** :func:`whitening` turns each component's parameters into an
  affine map and a constant, written for one component and ``torch.func.vmap``-ed over K:
  z_k = (x - c) U_k - t_k with t_k = (μ_k - c) U_k and c the detached centre of the means.
  Shifting by c leaves the result unchanged, but float32 keeps its accuracy on data with a large
  common offset.
* **One GEMM per chunk.** The K maps sit side by side, so a chunk of rows is whitened for all
  components by one GEMM [c, D+1] @ [D+1, D·K] (the shift rides as an extra row), and the
  squared norms reduce over the middle axis of the [c, D, K] block (see :mod:`puregmm._fused`).
  Under ``vmap`` the per-component GEMM becomes a batched GEMM over K small matrices with a
  [K, c, D] layout; measured (c = 2048, D = K = 16, float32, one thread) it is 1.4x slower
  for the whitening GEMM, 3x for the gradient GEMM and 4x for the squared-norm reduction.
* **Chunked over rows, no stored activations.** Rows go in chunks sized so the [c, D, K] block
  stays in cache; only [N]-sized values leave a chunk. :func:`log_prob` and :func:`loss` use
  ``torch.autograd.Function``s whose backward recomputes a chunk at a time (or, for the loss,
  whose forward already produced the gradient statistics), so a loss+gradient needs memory
  bounded by the chunk, never N × K. Second derivatives, ``torch.func.grad``/``vmap`` and
  ``torch.compile(fullgraph=True)`` work (:mod:`puregmm._fused`).

These are kernels: they check shapes only, so they run under ``vmap``, ``grad`` and
``torch.compile(fullgraph=True)``. A row of ``x`` holding NaN gives NaN for that row (and NaN
gradients, as any mean over that row would).

**Missing entries.** With ``observed`` (a bool mask of x's shape, True = observed) a row's
log-density is the exact marginal density of its observed entries, whatever the others hold
(NaN included); a row with nothing observed has log p = 0. Eagerly, rows are grouped by their
pattern of missing entries and each pattern uses this module's density on the marginal over its
observed dimensions (the family's ``marginal_scale``); with many patterns, or under transforms,
the per-row precision-block form of :mod:`puregmm._masked`. ``observed=None`` is the code above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from puregmm import _fused, _fused_autograd, _masked, _validate
from puregmm._fused import Whitening, chunk_rows, chunks
from puregmm._masked import Plan, RowTerms, Segment
from puregmm.families import LOG_2PI
from puregmm.params import GMMParams, precision_cholesky

#: ``observed=``: a bool mask of x's shape (True = observed), or a :class:`puregmm._masked.Plan` of one
Observed = Tensor | Plan

__all__ = [
    "Observed", "Whitening", "component_log_prob", "joint_log_prob_chunk", "log_prob", "loss", "masked_rows", "nll",
    "whitening",
]  # fmt: skip


def whitening(params: GMMParams, centre: Tensor | None = None) -> Whitening:
    """The :class:`~puregmm._fused.Whitening` of unbatched ``params``, all components at once:
    the one component log-density, ℓ_k(x) = const_k - ½‖[x - c, 1] A_k‖² (the E-step's
    exponential-family form expands the same maps, :func:`puregmm._moments.natural`).

    ``centre`` c [D]: the rows' shift (default: the mean of the means). Differentiable in the
    params, except the centre and the constant family's variance, which are detached.
    """
    spec, means = params.spec, params.means
    center = means.detach().mean(0) if centre is None else centre.detach().to(means.dtype)  # [D]
    raw = spec.per_component_raw(params.scale, means.shape[0])
    if not spec.learned:
        raw = raw.detach()
    a, half_log_det = spec.affine_maps(raw, means - center)  # [D+1 | 2, D, K], [K]
    const = torch.log_softmax(params.logits, dim=-1) + half_log_det - 0.5 * means.shape[1] * LOG_2PI  # [K]
    return Whitening(a.contiguous(), const, center, spec.dense_factor)


def joint_log_prob_chunk(w: Whitening, x: Tensor) -> Tensor:
    """log w_k + log N(x_n | μ_k, Σ_k) [c, K] for one chunk of rows ``x`` [c, D] (no inner
    chunking; differentiable by plain autograd)."""
    return _fused.log_joint(w, _fused.lift(w, x))


def component_log_prob(params: GMMParams, x: Tensor, observed: Observed | None = None) -> Tensor:
    """Joint log-densities log w_k + log N(x_n | μ_k, Σ_k), shape [N, K] (unbatched params).

    Differentiable by plain autograd (it then keeps per-chunk activations); use :func:`log_prob`
    or :func:`loss` for gradients of the mixture density in memory bounded by a chunk. Without
    autograd, chunks reuse one workspace. Callers that loop over chunks themselves can call
    :func:`whitening` once and :func:`joint_log_prob_chunk` per chunk.

    Args:
        params: unbatched mixture params (``torch.func.vmap`` it for batched ones).
        x: data [N, D] (not checked here).
        observed: optional [N, D] bool mask, True = observed: N(x_n | ...) is then the marginal
            density of the row's observed entries (module docstring); log w_k for an empty row.

    Returns:
        [N, K] joint log-densities; a masked component's column is -inf.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> pg.component_log_prob(p, torch.tensor([[0.0], [5.0]]))
    tensor([[ -1.6121, -14.1121],
            [-14.1121,  -1.6121]])
    """
    _validate.data_shape(params, x)
    _validate.unbatched(params, "component_log_prob")
    if observed is not None:
        return masked_rows(params, x, _masked.as_plan(observed, x), _segment_joint)
    w = whitening(params)
    n = x.shape[0]
    rows = chunk_rows(n, params.n_components, params.dim, x.element_size())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (w.a, w.const, x))
    bufs = None if needs_grad else _fused.workspace(w, rows, x)
    if bufs is None:
        parts = [joint_log_prob_chunk(w, x[s:e]) for s, e in chunks(n, rows)]
        return at_infinity(x, torch.cat(parts) if len(parts) != 1 else parts[0])
    out = x.new_empty(n, params.n_components)
    for s, e in chunks(n, rows):  # no autograd, plain tensors: reuse one workspace
        out[s:e] = _fused.log_joint(w, _fused.lift(w, x[s:e], bufs), bufs)
    return at_infinity(x, out)


def _log_prob_one(params: GMMParams, x: Tensor) -> Tensor:
    w = whitening(params)
    rows = chunk_rows(x.shape[0], params.n_components, params.dim, x.element_size())
    return at_infinity(x, _fused_autograd.logsumexp(x, w, rows))


def at_infinity(x: Tensor, values: Tensor) -> Tensor:
    """``values`` [N, ...] with -inf for the rows of ``x`` [N, D] at infinity (an infinite entry,
    no NaN): their density is the limit 0, which the arithmetic would make NaN (inf - inf)."""
    inf_row = torch.isinf(x).any(-1) & ~torch.isnan(x).any(-1)  # [N]
    inf_row = inf_row.reshape(inf_row.shape + (1,) * (values.dim() - 1))
    return torch.where(inf_row, torch.full_like(values, -torch.inf), values)


def _loss_one(params: GMMParams, x: Tensor, sample_weight: Tensor | None, fused: bool) -> Tensor:
    """-Σ_n g_n log p(x_n) with g = 1/N or the normalised sample weights (unbatched params).

    A gradient goes through :class:`~puregmm._fused_autograd.NLL` (its forward produces the
    gradient statistics) when the rows need several chunks, or ``fused`` (:func:`loss`: eagerly,
    outside ``torch.func`` transforms, where the Function costs less than recording the chunk's
    ops); otherwise one chunk is the chunk functions under plain autograd.
    """
    w = whitening(params)
    n = x.shape[0]
    rows = chunk_rows(n, params.n_components, params.dim, x.element_size())
    fuse = (fused or n > rows) and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    tracked = fuse and (w.a.requires_grad or w.const.requires_grad or x.requires_grad)
    if n <= rows and sample_weight is None and not tracked:
        return -_fused.logsumexp_rows(joint_log_prob_chunk(w, x)).mean()
    g = x.new_full((n,), 1.0 / n) if sample_weight is None else sample_weight / sample_weight.sum()
    if tracked or (fuse and g.requires_grad):
        out = _fused_autograd.apply(_fused_autograd.NLL, x, w.center, w.a, w.const, g, w.dense, rows, x.requires_grad)
        return out[0]  # type: ignore[no-any-return]
    if n > rows:
        return -(g * _fused_autograd.logsumexp(x, w, rows)).sum()
    return -(g * _fused.logsumexp_rows(joint_log_prob_chunk(w, x))).sum()


def log_prob(params: GMMParams, x: Tensor, observed: Observed | None = None) -> Tensor:
    """log p(x_n) of the mixture, shape [..., N].

    Args:
        params: mixture params, optionally with leading batch dims ``B...``.
        x: data [N, D], or [B..., N, D] matching the params' batch dims.
        observed: optional bool mask of ``x``'s shape, True = observed: log p(x_n) is then the
            marginal density of the row's observed entries (0 for a row with nothing observed);
            the other entries are ignored, NaN included (module docstring).

    Returns:
        [B..., N] log-densities.

    Raises:
        ValueError: ``x`` is not [..., N, D] with the params' D.

    >>> import math, torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> pg.log_prob(p, torch.tensor([[0.0], [5.0]])), round(math.log(0.5) - 0.5 * math.log(2 * math.pi), 4)
    (tensor([-1.6121, -1.6121]), -1.6121)
    >>> pg.log_prob(p, torch.tensor([[0.0, 9.0]]).T, torch.tensor([[True, False]]).T)  # a missing entry: log p = 0
    tensor([-1.6121,  0.0000])
    """
    _validate.data_shape(params, x)
    if observed is not None:
        return _batched_masked(params, x, observed, lambda p, xs, ob: masked_rows(p, xs, ob, _segment_log_prob))
    return _batched(params, x, _log_prob_one)


def loss(params: GMMParams, x: Tensor, sample_weight: Tensor | None = None, observed: Observed | None = None) -> Tensor:
    """Mean negative log-likelihood, ``-log_prob(params, x).mean(-1)`` (weighted if given).

    With ``sample_weight`` [N] (non-negative, not all zero; not checked here) it is
    ``-(w · log p(x)).sum() / w.sum()``, which equals the plain loss on data with rows repeated
    by integer weights.

    Args:
        params: mixture params, optionally with leading batch dims ``B...``.
        x: data [N, D], or [B..., N, D] matching the params' batch dims.
        sample_weight: optional [N] weights (above).
        observed: optional bool mask of ``x``'s shape (True = observed): the loss is then minus
            the mean log-density of the observed entries (:func:`log_prob`), rows counted as N
            (an empty row adds 0); its gradient is that of the observed-data likelihood.

    Returns:
        0-d (or [B...]): the quantity gradient descent minimises; differentiable in ``params``.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> x = torch.tensor([[0.0], [5.0]])
    >>> pg.loss(p, x), torch.func.grad(pg.loss)(p, x).means.shape  # params are pytrees
    (tensor(1.6121), torch.Size([2, 1]))
    """
    return nll(params, x, sample_weight, observed, fused=not torch._C._are_functorch_transforms_active())


def nll(
    params: GMMParams, x: Tensor, sample_weight: Tensor | None = None, observed: Observed | None = None, *, fused: bool
) -> Tensor:
    """:func:`loss`, with the route of a one-chunk gradient chosen by the caller: ``fused``, the
    autograd Function whose forward produces the gradient statistics (what :func:`loss` takes
    eagerly), else the chunk functions under plain autograd (what it takes under ``torch.func``
    transforms, where a Function's per-call machinery costs more). The two agree to rounding;
    :func:`puregmm.train.step` takes the transforms' route at the top level too, so that its
    gradient is ``torch.func.grad(loss)``'s, bit for bit."""
    _validate.data_shape(params, x)
    _validate.kernel_weight(sample_weight, x, params.batch_shape)
    if observed is not None:
        lp = log_prob(params, x, observed)  # [B..., N]
        if sample_weight is None:
            return -lp.mean(-1)
        return -(lp * sample_weight).sum(-1) / sample_weight.sum(-1)
    if sample_weight is not None and sample_weight.dim() > 1:  # per-batch weights [B..., N]
        lp = log_prob(params, x)
        return -(lp * sample_weight).sum(-1) / sample_weight.sum(-1)
    return _batched(params, x, lambda p, xs: _loss_one(p, xs, sample_weight, fused))


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


# --- missing entries (observed=...) --------------------------------------------------------------


def marginal_params(params: GMMParams, seen: Tensor) -> GMMParams:
    """The mixture over the dimensions ``seen`` [B] (int64): the family's ``marginal_scale``."""
    scale = params.spec.marginal_scale(params.scale, seen)
    return GMMParams(params.logits, params.means.index_select(-1, seen), scale, params.family)


def row_parts(params: GMMParams) -> tuple[Whitening, Tensor, Tensor, Tensor]:
    """What :class:`puregmm._masked.RowTerms` takes from unbatched ``params``: the whitening, the
    precision factors U [K, D, D], the means and log w [K]."""
    u = precision_cholesky(params)  # [K, D, D]
    u = u if params.spec.learned else u.detach()
    return whitening(params), u, params.means, torch.log_softmax(params.logits, -1)


def row_terms(params: GMMParams, x: Tensor, observed: Tensor, width: int) -> list[RowTerms]:
    """:class:`puregmm._masked.RowTerms` of unbatched ``params`` on rows ``x`` [n, D], chunk by chunk."""
    parts = row_parts(params)
    rows = _masked.row_chunk(params.n_components, params.dim, width)
    return [RowTerms(*parts, x[s:e], observed[s:e], width) for s, e in chunks(x.shape[0], rows)]


def masked_rows(
    params: GMMParams,
    x: Tensor,
    observed: Observed,
    per_segment: Callable[[GMMParams, Tensor, Tensor, Segment], Tensor],
) -> Tensor:
    """``per_segment(params, rows, their mask, segment)`` over the segments of ``observed``'s plan
    (:func:`puregmm._masked.plan`), results back in the rows' own order (unbatched params)."""
    plan = _masked.as_plan(observed, x) if not isinstance(observed, Plan) else observed
    xs, obs = (x, plan.observed) if plan.order is None else (x[plan.order], plan.observed[plan.order])
    parts = [per_segment(params, xs[s.start : s.stop], obs[s.start : s.stop], s) for s in plan.segments]
    out = _fused.concat(parts)
    inverse = plan.inverse
    return out if inverse is None else out[inverse]


def _segment_joint(params: GMMParams, x: Tensor, observed: Tensor, seg: Segment) -> Tensor:
    """[n, K] log w_k + log N(x_o | μ_k,o, Σ_k,oo) of one segment's rows."""
    if seg.kind == "complete":
        return component_log_prob(params, x)
    if seg.kind == "empty":
        return torch.log_softmax(params.logits, -1).expand(x.shape[0], -1)
    if seg.kind == "pattern":
        assert seg.seen is not None
        return component_log_prob(marginal_params(params, seg.seen), x.index_select(1, seg.seen))
    xf = torch.where(observed, x, 0.0)
    return at_infinity(xf, _fused.concat([t.log_joint for t in row_terms(params, x, observed, seg.width)]))


def _segment_log_prob(params: GMMParams, x: Tensor, observed: Tensor, seg: Segment) -> Tensor:
    """[n] log p(x_o) of one segment's rows."""
    if seg.kind == "complete":
        return _log_prob_one(params, x)
    if seg.kind == "empty":
        return x.new_zeros(x.shape[0])
    if seg.kind == "pattern":
        assert seg.seen is not None
        return _log_prob_one(marginal_params(params, seg.seen), x.index_select(1, seg.seen))
    return torch.logsumexp(_segment_joint(params, x, observed, seg), -1)


def _batched_masked(
    params: GMMParams, x: Tensor, observed: Observed, fn: Callable[[GMMParams, Tensor, Observed], Tensor]
) -> Tensor:
    """:func:`_batched` with a mask: planned once, eagerly, when the mask is shared by the batch
    ([N, D] or a plan); a batched mask [B..., N, D] goes into the vmap (the branch-free form)."""
    if isinstance(observed, Plan) or observed.dim() == 2:
        if x.dim() != 2:
            raise ValueError(f"observed must have x's shape {tuple(x.shape)}; got {_shape(observed)}")
        plan = _masked.as_plan(observed, x)
        return _batched(params, x, lambda p, xs: fn(p, xs, plan))
    _masked.check_mask(observed, x)
    batch = params.batch_shape
    if tuple(x.shape[:-2]) != batch:
        raise ValueError(f"x has batch dims {tuple(x.shape[:-2])} but the params have batch dims {batch}")
    one = fn
    for _ in batch:
        one = torch.func.vmap(one, in_dims=(0, 0, 0))
    return one(params, x, observed)


def _shape(observed: Observed) -> tuple[int, ...]:
    return tuple((observed.observed if isinstance(observed, Plan) else observed).shape)
