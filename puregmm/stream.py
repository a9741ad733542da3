"""Fits on data larger than memory: chunked full-batch EM and online (stepwise) EM.

A *source* (:mod:`puregmm.sources`: an array, a memory map or ``.npy`` path, a tensor, a
callable returning batches, an iterable) is read in chunks, never whole.

Batches are [n_i, D] array-likes. Design decisions:

* **Full-batch EM** (``method="em"``): each pass sums :class:`puregmm.Stats` over the chunks
  with :func:`puregmm.combine`, then applies :func:`puregmm.m_step` once. Stats are taken
  about the params' means, so chunk order and size change only the rounding: the result equals
  ``pg.fit(x, method="em")`` on the data in memory, and memory is bounded by the chunk size
  (one copied chunk plus :func:`puregmm.sufficient_stats`' own [K, c, D] block), never by N.
  The loop is :func:`puregmm.loop.run`, so checkpoint/resume work as for in-memory fits.
* **Online EM** (``method="online_em"``, Cappé & Moulines 2009, stepwise EM): for batch t with
  per-row statistics s̄_t = Stats_t / Σ_t ω at the current params,

      ŝ_t = (1 - γ_t) ŝ_{t-1} + γ_t s̄_t,   γ_t = (t + 2)^-κ,  κ ∈ (0.5, 1],   θ_t = M(ŝ_t),

  with ŝ_{-1} the statistics the initial params would give (weights, zero, w_k Σ_k), so the
  first step blends instead of forgetting them. Σ γ_t = ∞ and Σ γ_t² < ∞ make ŝ converge to a
  stationary point of the expected log-likelihood as the stream goes on. Because Stats are
  centred at the means, ŝ is re-centred exactly before each blend (X += n δ,
  S += δXᵀ + Xδᵀ + nδδᵀ with δ = c_old - c_new). One pass over the stream by default: each
  batch is seen once. Rows should come in random order.

Initialisation: ``init_params`` (GMMParams) are used as given. Otherwise an array source
(array, memmap, path, tensor) has random access and :func:`puregmm.init` runs on a uniform
sample of ``chunk_size`` rows (all rows when N ≤ chunk_size, which then equals ``pg.init`` on
the whole data); a batch iterable has none and is initialised from its *first batch*, which
needs at least K rows (its first batch is also the first online-EM step). ``init_params`` as
means [K, D] take weights and covariances from that sample or first batch.

Not supported here: sample weights, gradient descent (use ``pg.fit`` with ``batch_size``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, loop
from puregmm.families import get_family
from puregmm.init import init
from puregmm.methods import (
    EM_MAX_STEPS,
    EM_TOL,
    EMState,
    FitResult,
    Settings,
    affine,
    get_method,
    standardisation,
    standardised_reg,
    warn_if_not_converged,
)
from puregmm.mstep import maximise
from puregmm.online import OnlineState, expected_stats, online_update, recentre
from puregmm.params import GMMParams
from puregmm.sources import (
    CHUNK_ELEMENTS,
    Source,
    check_dim,
    default_chunk_rows,
    is_stream,
    mean_nll,
    pass_stats,
    power_of_two_scale,
    read_rows,
)

__all__ = [
    "CHUNK_ELEMENTS", "DEFAULT_KAPPA", "METHODS", "OnlineState", "Source", "default_chunk_rows", "expected_stats",
    "fit_stream", "is_stream", "mean_nll", "online_update", "pass_stats", "read_rows", "recentre",
]  # fmt: skip
METHODS = ("em", "online_em")
DEFAULT_KAPPA = 0.6


def fit_stream(
    source: Any,
    n_components: int,
    family: str = "full",
    *,
    method: str = "em",
    init_params: GMMParams | Any | None = None,
    init_method: str = "kmeans",
    max_steps: int | None = None,
    tol: float | None = None,
    reg_covar: float = 1e-6,
    chunk_size: int | None = None,
    kappa: float = DEFAULT_KAPPA,
    dtype: torch.dtype | None = None,
    device: Any = None,
    key: Any = 0,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int = 100,
    resume: Any = None,
    reduce: Any = None,
) -> FitResult:
    """Fit a K-component mixture to data read in chunks (see the module docstring).

    Args:
        source: array/memmap [N, D], ``.npy`` path, tensor, callable returning an iterator of
            batches, or an iterable of batches.
        n_components: K.
        family: one of :data:`puregmm.FAMILIES`.
        method: ``"em"`` (full-batch EM, one pass per step) or ``"online_em"`` (stepwise EM,
            one step per chunk/batch).
        init_params: GMMParams to start from, or means [K, D]; ``None``: :func:`puregmm.init`
            on a sample (array sources) or the first batch (iterables).
        init_method: :func:`puregmm.init`'s method when ``init_params`` is not GMMParams.
        max_steps: ``"em"``: passes (``None``: 100); ``"online_em"``: updates (``None``: one pass
            over the source; more cycle through a re-readable source).
        tol: ``"em"``: stop when the mean log-likelihood changed by less than ``tol`` in one
            step (``None``: 1e-3). Not used by ``"online_em"`` (must be ``None``).
        reg_covar: added to the diagonal of every covariance by the M-step.
        chunk_size: rows per read of an array source (``None``: :func:`default_chunk_rows`);
            also the size of the initialisation sample. Batches of an iterable are used as given.
        kappa: online-EM step-size exponent, γ_t = (t + 2)^-κ, in (0.5, 1].
        dtype: compute dtype; ``None``: that of ``init_params``, else the data's float type.
        device: where chunks are moved to compute (e.g. ``"cuda"``: data larger than GPU memory
            streams through it); ``None``: that of ``init_params``, else the CPU.
        key: int or 0-d int64 tensor (initialisation sample and method).
        progress: a tqdm progress bar.
        checkpoint: as :func:`puregmm.fit` (``"em"`` only).
        checkpoint_every: as :func:`puregmm.fit`.
        resume: as :func:`puregmm.fit` (``"em"`` only).
        reduce: a :class:`puregmm.distributed.Collective` when ``source`` is this rank's part
            of the data (``"em"`` with GMMParams ``init_params`` only; see
            :func:`puregmm.distributed.fit_distributed`): each pass's statistics are reduced.

    Returns:
        :class:`puregmm.FitResult`. ``loss`` is the mean NLL of the whole data at the final
        params (one more pass), except for ``"online_em"`` on a read-once iterator, where it
        is the mean of the batch losses, each taken before its update (a pessimistic
        estimate). ``history`` holds the loss of each step (the batch loss for online EM).
        Online EM has no tolerance: ``converged`` is True.

    Raises:
        ValueError / TypeError: bad source or batch (not 2-D, empty, NaN/Inf, changing D),
            bad settings, a read-once iterator with ``"em"``, a first batch with fewer than K rows.

    Warns:
        ConvergenceWarning: ``"em"`` stopped at ``max_steps`` before meeting ``tol``.

    >>> import numpy as np, puregmm as pg
    >>> x = np.concatenate([np.random.randn(500, 2), np.random.randn(500, 2) + 6])
    >>> r = pg.stream.fit_stream(x, 2, "diagonal", chunk_size=128)
    >>> r.converged
    True
    """
    spec = get_family(family)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be a positive int; got {n_components!r}")
    reg_covar = _validate.reg_covar(reg_covar)
    key_t = _validate.key(key)
    dtype, device = _validate.float_dtype(dtype), _validate.device(device)
    if isinstance(init_params, GMMParams):
        dtype = init_params.dtype if dtype is None else dtype
        device = init_params.device if device is None else device
    src = Source(source, chunk_size, dtype, device)
    steps: int | None
    if method == "em":
        if not src.reusable:
            raise ValueError(
                "method='em' reads the data once per step, but this source is an iterator that can be read once; "
                "pass a callable returning a fresh iterator per pass, or use method='online_em'"
            )
        steps = EM_MAX_STEPS if max_steps is None else _validate.positive_int(max_steps, "max_steps")
        tol_v = EM_TOL if tol is None else _validate.non_negative(tol, "tol")
    else:
        if tol is not None:
            raise ValueError("tol is not used by method='online_em' (it runs max_steps updates or one pass)")
        if checkpoint is not None or resume is not None:
            raise ValueError("checkpoint/resume apply to method='em'; online EM reads its stream once")
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0.5 < kappa <= 1:
            raise ValueError(f"kappa must be in (0.5, 1] (step size (t+2)^-kappa); got {kappa!r}")
        steps = None if max_steps is None else _validate.positive_int(max_steps, "max_steps")
    if reduce is not None and (method != "em" or not isinstance(init_params, GMMParams)):
        raise ValueError("reduce= needs method='em' and GMMParams init_params (identical on every rank)")
    first: Tensor | None = None
    if isinstance(init_params, GMMParams):
        params = init_params
    else:
        first = src.sample(src.chunk_size, key_t)
        means = None
        if init_params is not None:
            means = _validate.means(init_params, n_components, first.shape[1], first.dtype, first.device, "init_params")
        if first.shape[0] < n_components:
            raise ValueError(
                f"n_components={n_components} is more than the {first.shape[0]} rows of the first batch, which "
                "initialises the stream; pass larger batches or init_params"
            )
        shift, s = standardisation(first, None)  # init on standardised rows, as pg.fit: data of any range
        z_means = None if means is None else (means - shift) / s
        reg = float(standardised_reg(reg_covar, s))
        z = (first - shift) / s
        params = affine(
            init(z, n_components, spec.name, key=key_t, method=init_method, means=z_means, reg_covar=reg), s, shift
        )
    _check_params(params, spec.name, n_components, src)
    src.scale = power_of_two_scale(params)  # chunks are divided by it: beyond √max, squares stay finite
    if src.scale != 1.0:
        params, reg_covar = _scaled(params, 1 / src.scale), (math.sqrt(reg_covar) / src.scale) ** 2
    if method == "em":
        assert steps is not None
        result = _fit_em(
            src, params, key_t, steps, tol_v, reg_covar, progress, checkpoint, checkpoint_every, resume, reduce
        )
        result = _unscaled(result, src.scale)
        warn_if_not_converged(result)
        return result
    return _unscaled(_fit_online(src, params, key_t, steps, float(kappa), reg_covar, progress), src.scale)


def _batches(src: Source, max_steps: int | None) -> Iterator[Tensor]:
    """The source's batches: one pass, or passes over a re-readable source until ``max_steps``."""
    while True:
        seen = 0
        for xb in src.passes():
            seen += 1
            yield xb
        if max_steps is None or not src.reusable or seen == 0:
            return


def _fit_online(
    src: Source, params: GMMParams, key: Tensor, max_steps: int | None, kappa: float, reg_covar: float, progress: bool
) -> FitResult:
    """Online EM, the ``online_em`` row of :data:`puregmm.methods.METHODS`, through
    :func:`puregmm.loop.run` (B = 1): each step reads the next batch; the loop stops at
    ``max_steps`` or when the stream ends (one pass by default)."""
    row = get_method("online_em")
    cfg = Settings("online_em", max_steps or row.max_steps, row.tol, None, None, reg_covar, kappa)
    batches = _batches(src, max_steps)
    seen = [0.0, 0]  # Σ batch loss·rows, rows: the loss of a stream read once

    def advance(states: Any) -> Any:
        xb = next(batches, None)
        if xb is None:
            return None
        check_dim(params, xb)
        new = row.advance(pytree.tree_map(lambda t: t[0], states), xb, None, cfg)
        seen[0], seen[1] = seen[0] + float(new.loss) * xb.shape[0], seen[1] + xb.shape[0]
        return pytree.tree_map(lambda t: t.unsqueeze(0), new)

    states = pytree.tree_map(lambda t: t.unsqueeze(0), row.make_state(params, key.to(params.device), cfg))
    out = loop.run(states, advance, max_steps=cfg.max_steps, converged=row.converged(cfg.tol), progress=progress)
    final = pytree.tree_map(lambda t: t[0].detach(), out.states.params)
    if src.reusable:
        loss = mean_nll(src, final)
    else:
        loss = torch.tensor(seen[0] / max(seen[1], 1), dtype=final.dtype, device=final.device)
    n = int(out.n_steps[0])
    return FitResult(final, loss, n, True, int(out.states.n_resets[0]), out.history[:n, 0])


def _scaled(params: GMMParams, a: float) -> GMMParams:
    """Params of the data times ``a`` (a power of two)."""
    return affine(
        params, torch.tensor(a, dtype=params.dtype, device=params.device), torch.zeros((), dtype=params.dtype)
    )


def _unscaled(result: FitResult, scale: float) -> FitResult:
    """A fit of the rows divided by ``scale`` in data units: params times ``scale``, losses + D log scale."""
    if scale == 1.0:
        return result
    offset = result.params.dim * math.log(scale)
    return dataclasses.replace(
        result, params=_scaled(result.params, scale), loss=result.loss + offset, history=result.history + offset
    )


def _check_params(params: GMMParams, family: str, k: int, src: Source) -> None:
    _validate.params(params, "init_params")
    if params.family != family or params.n_components != k or params.batch_shape:
        raise ValueError(f"init_params is {params!r} but the fit asks for family={family!r}, K={k} (unbatched)")
    if src.d is not None and params.dim != src.d:
        raise ValueError(f"init_params has D={params.dim} but the data has D={src.d} columns")
    for name in ("logits", "means", "scale"):
        _validate.finite(getattr(params, name).reshape(1, -1), f"init_params.{name}")


def _fit_em(
    src: Source,
    params: GMMParams,
    key: Tensor,
    max_steps: int,
    tol: float,
    reg_covar: float,
    progress: bool,
    checkpoint: Any,
    checkpoint_every: int,
    resume: Any,
    reduce: Any = None,
) -> FitResult:
    """Full-batch EM, one pass per step, through :func:`puregmm.loop.run` (B = 1); with
    ``reduce``, each pass's statistics are reduced over the ranks (every rank streams its own
    source: a data-parallel fit larger than every rank's memory)."""
    states = EMState(
        pytree.tree_map(lambda t: t.unsqueeze(0), params),
        torch.zeros(1, dtype=torch.int64, device=params.device),
        torch.full((1,), float("nan"), dtype=params.dtype, device=params.device),
        torch.zeros(1, dtype=torch.int64, device=params.device),
        key.reshape(1).to(params.device),
    )

    def advance(s: EMState) -> EMState:
        p = pytree.tree_map(lambda t: t[0], s.params)
        stats = pass_stats(src, p, reduce)
        new, n_resets = maximise(stats, p, reg_covar, return_info=True)
        ll = stats.log_lik_sum / stats.weight_sum
        return EMState(
            pytree.tree_map(lambda t: t.unsqueeze(0), new), s.step + 1, -ll.reshape(1), s.n_resets + n_resets, s.key
        )

    meta = {
        "method": "em",
        "stream": True,
        "family": params.family,
        "n_components": params.n_components,
        "shape": [src.n_rows, params.dim],
        "dtype": str(params.dtype),
        "runs": 1,
        "tol": tol,
        "reg_covar": reg_covar,
        "keys": [int(key)],  # the key is part of the fit's identity
    }
    out = loop.run(
        states,
        advance,
        max_steps=max_steps,
        converged=loop.em_converged(tol),
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        meta=meta,
    )
    final = pytree.tree_map(lambda t: t[0].detach(), out.states.params)
    n = int(out.n_steps[0])
    return FitResult(
        final,
        mean_nll(src, final, reduce),
        n,
        bool(out.converged[0]),
        int(out.states.n_resets[0]),
        out.history[:n, 0],
    )
