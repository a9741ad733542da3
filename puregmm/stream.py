"""Fits on data larger than memory: chunked full-batch EM and online (stepwise) EM.

A *source* is read in chunks, never whole:

=================================  ==========================================================
``np.ndarray`` / ``np.memmap``     rows ``[lo, lo + chunk_size)`` copied one chunk at a time
``str`` / ``os.PathLike``          :func:`puregmm.data.load_data` (``.npy`` is memory-mapped)
``torch.Tensor``                   chunk views (already in memory)
callable                           ``source()`` returns a fresh iterator of batches per pass
other iterable                     a list of batches is re-read; an iterator can be read once
=================================  ==========================================================

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

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, keys, loop
from puregmm.em import Stats, combine, m_step, sufficient_stats
from puregmm.families import get_family
from puregmm.init import init
from puregmm.methods import EM_MAX_STEPS, EM_TOL, EMState, FitResult, warn_if_not_converged
from puregmm.params import GMMParams, covariances

METHODS = ("em", "online_em")
CHUNK_ELEMENTS = 2**22  # default chunk: about this many values per read (16 MB in float32)
DEFAULT_KAPPA = 0.6


def default_chunk_rows(d: int) -> int:
    """Rows per read for D columns: about :data:`CHUNK_ELEMENTS` values, at least 1024 rows."""
    return max(1024, CHUNK_ELEMENTS // max(1, d))


def is_stream(data: Any) -> bool:
    """Whether :func:`puregmm.fit` should hand ``data`` to :func:`fit_stream`: a path, an
    ``np.memmap``, a callable or an iterator (lists and arrays are in-memory data)."""
    return (
        isinstance(data, (str, os.PathLike, np.memmap))
        or (callable(data) and not isinstance(data, Tensor))
        or isinstance(data, Iterator)
    )


class Source:
    """A stream of [n_i, D] float chunks; ``passes()`` starts a new pass over the data.

    Attributes:
        reusable: whether the data can be read more than once.
        n_rows: total rows when known (array sources), else ``None``.
        d: columns when known before reading, else ``None``.
    """

    def __init__(self, source: Any, chunk_size: int | None, dtype: torch.dtype | None, device: Any = None) -> None:
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._array: Any = None
        self._factory: Callable[[], Iterable[Any]] | None = None
        self._once: Iterator[Any] | None = None
        self._used = False
        self._verified = False  # an array source is checked on its first full pass only
        self.n_rows: int | None = None
        self.d: int | None = None
        if isinstance(source, (str, os.PathLike)):
            from puregmm.data import load_data

            source = load_data(source)
        if isinstance(source, (np.ndarray, Tensor)):
            if source.ndim != 2 or source.shape[0] == 0 or source.shape[1] == 0:
                raise ValueError(f"source must be 2-D [N, D] and non-empty; got shape {tuple(source.shape)}")
            self._array = source
            self.n_rows, self.d = int(source.shape[0]), int(source.shape[1])
        elif callable(source):
            self._factory, self.n_rows, self.d = source, None, None
        elif isinstance(source, Iterator):
            self._once, self.n_rows, self.d = source, None, None
        elif isinstance(source, Iterable):
            self._factory, self.n_rows, self.d = (lambda: source), None, None
        else:
            raise TypeError(
                "source must be an array [N, D], a np.memmap, a .npy path, a callable returning an iterator of "
                f"batches, or an iterable of batches; got {type(source).__name__}"
            )
        self.reusable = self._once is None
        if chunk_size is not None:
            chunk_size = _validate.positive_int(chunk_size, "chunk_size")
        self.chunk_size = chunk_size or default_chunk_rows(self.d or 1)

    def passes(self) -> Iterator[Tensor]:
        """One pass: checked chunks [n_i, D] (2-D, non-empty, finite, consistent D); an array
        source, which cannot change, is checked on its first complete pass only."""
        if self._array is not None:
            n = self.n_rows
            assert n is not None
            verified = self._verified
            for lo in range(0, n, self.chunk_size):
                part = _read(self._array, lo, min(n, lo + self.chunk_size))
                yield self._convert(part) if verified else self._check(part, lo)
            self._verified = True
            return
        if self._once is not None:
            if self._used:
                raise ValueError(
                    "this source is an iterator and was read already; pass a callable returning a fresh "
                    "iterator per pass (e.g. lambda: batches(path)) to read the data more than once"
                )
            self._used = True
            batches: Iterable[Any] = self._once
        else:
            assert self._factory is not None
            batches = self._factory()
        row = 0
        for batch in batches:
            t = self._check(batch, row)
            row += t.shape[0]
            yield t
        if row == 0:
            raise ValueError("the source yielded no rows")

    def sample(self, rows: int, key: Tensor) -> Tensor:
        """Up to ``rows`` rows for initialisation: all rows of a small array source, a uniform
        sample (sorted, distinct) of a large one; the first batch of an iterable."""
        if self._once is not None:  # peek, then put the batch back in front
            head = next(self._once, None)
            if head is None:
                raise ValueError("the source yielded no rows")
            self._once = itertools.chain([head], self._once)
            return self._check(head, 0)
        if self._array is None:
            return next(iter(self.passes()))
        n = self.n_rows
        assert n is not None
        if n <= rows:
            return self._check(_read(self._array, 0, n), 0)
        idx = np.unique(keys.index(key, 1, torch.arange(rows), n=n).numpy())
        arr = self._array
        part = arr[torch.from_numpy(idx)] if isinstance(arr, Tensor) else arr[idx]
        return self._check(part, 0)

    def _convert(self, part: Any) -> Tensor:
        """A chunk of an already verified array source as a tensor of the compute dtype."""
        t = part if isinstance(part, Tensor) else torch.from_numpy(part)
        return t.to(device=self.device, dtype=self.dtype)

    def _check(self, batch: Any, row: int) -> Tensor:
        name = f"source rows {row}.." if self._array is not None else f"batch starting at row {row}"
        t = _validate.data(batch, name)
        if self.dtype is None:
            self.dtype = t.dtype
        if self.d is None:
            self.d = t.shape[1]
        if t.shape[1] != self.d:
            raise ValueError(f"{name} has D={t.shape[1]} columns; earlier data had D={self.d}")
        return t.to(device=self.device, dtype=self.dtype)


def _read(arr: Any, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of an array source as an in-memory array (a memmap slice is copied)."""
    if isinstance(arr, Tensor):
        return arr[lo:hi]
    return np.array(arr[lo:hi])


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
        params = init(first, n_components, spec.name, key=key_t, method=init_method, means=means, reg_covar=reg_covar)
    _check_params(params, spec.name, n_components, src)
    if method == "em":
        assert steps is not None
        result = _fit_em(
            src, params, key_t, steps, tol_v, reg_covar, progress, checkpoint, checkpoint_every, resume, reduce
        )
        warn_if_not_converged(result)
        return result
    return _fit_online(src, params, steps, float(kappa), reg_covar, progress)


def _check_params(params: GMMParams, family: str, k: int, src: Source) -> None:
    if params.family != family or params.n_components != k or params.batch_shape:
        raise ValueError(f"init_params is {params!r} but the fit asks for family={family!r}, K={k} (unbatched)")
    if src.d is not None and params.dim != src.d:
        raise ValueError(f"init_params has D={params.dim} but the data has D={src.d} columns")
    for name in ("logits", "means", "scale"):
        _validate.finite(getattr(params, name).reshape(1, -1), f"init_params.{name}")


def pass_stats(src: Source, params: GMMParams, reduce: Any = None) -> Stats:
    """:class:`puregmm.Stats` of the whole source at ``params``, one chunk at a time; with
    ``reduce`` (a :class:`puregmm.distributed.Collective`), of every rank's source."""
    total: Stats | None = None
    for xb in src.passes():
        _check_dim(params, xb)
        part = sufficient_stats(params, xb)
        total = part if total is None else combine(total, part)
    assert total is not None
    return total if reduce is None else reduce(total)


def mean_nll(src: Source, params: GMMParams, reduce: Any = None) -> Tensor:
    """Mean negative log-likelihood of the whole source (one pass of the E-step's
    log-likelihood, as :func:`puregmm.fit` reports for EM); with ``reduce``, of every rank's."""
    total = torch.zeros((), dtype=params.dtype, device=params.device)
    count = torch.zeros((), dtype=params.dtype, device=params.device)
    with torch.no_grad():
        for xb in src.passes():
            _check_dim(params, xb)
            total = total - sufficient_stats(params, xb).log_lik_sum
            count = count + xb.shape[0]
    if reduce is not None:
        total, count = reduce.sum((total, count))
    return total / count


def _check_dim(params: GMMParams, xb: Tensor) -> None:
    if xb.shape[1] != params.dim:
        raise ValueError(f"the data has D={xb.shape[1]} columns but the params have D={params.dim}")


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
        new, n_resets = m_step(stats, p, reg_covar=reg_covar, return_info=True)
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


class OnlineState(NamedTuple):
    """Online EM's carried state.

    Attributes:
        params: current params.
        stats: ŝ, the running per-row statistics (``weight_sum`` = 1), about ``centres``.
        centres: [K, D] the centres of ``stats``.
        step: updates taken.
    """

    params: GMMParams
    stats: Stats
    centres: Tensor
    step: int


def expected_stats(params: GMMParams) -> Stats:
    """Per-row :class:`puregmm.Stats` that ``params`` themselves would give, about their means:
    n_k = w_k, X_k = 0, S_k = w_k Σ_k (diagonal / trace for the smaller families), so that
    ``m_step(expected_stats(p), p)`` gives back ``p`` (plus ``reg_covar``)."""
    k, d = params.n_components, params.dim
    w = torch.softmax(params.logits, -1)  # [K]
    xx = params.spec.weighted_second_moments(w, covariances(params))
    zero = torch.zeros((), dtype=params.dtype, device=params.device)
    return Stats(
        w,
        torch.zeros_like(params.means),
        xx,
        zero,
        torch.ones_like(zero),
        torch.full((k,), float("inf"), dtype=params.dtype, device=params.device),
        params.means.new_zeros(k, d),
    )


def recentre(stats: Stats, old: Tensor, new: Tensor) -> Stats:
    """``stats`` taken about centres ``old`` [K, D], re-expressed about ``new`` [K, D] (exact):
    with δ = old - new, X' = X + nδ and S' = S + δXᵀ + Xδᵀ + nδδᵀ (its diagonal, its trace)."""
    delta = old - new  # [K, D]
    n = stats.resp_sum.unsqueeze(-1)  # [K, 1]
    x, xx = stats.x_sum, stats.xx_sum
    if xx.dim() == 3:
        outer = delta.unsqueeze(-1) * x.unsqueeze(-2)  # [K, D, D] δXᵀ
        xx = xx + outer + outer.mT + n.unsqueeze(-1) * delta.unsqueeze(-1) * delta.unsqueeze(-2)
    elif xx.dim() == 2:
        xx = xx + 2 * delta * x + n * delta.square()
    else:
        xx = xx + 2 * (delta * x).sum(-1) + stats.resp_sum * delta.square().sum(-1)
    return stats._replace(x_sum=x + n * delta, xx_sum=xx)


def online_update(
    state: OnlineState, batch: Tensor, kappa: float, reg_covar: float
) -> tuple[OnlineState, Tensor, Tensor]:
    """One stepwise-EM update on ``batch`` [n, D]: (new state, batch mean NLL before the update,
    resets in the M-step). See the module docstring for the equations."""
    p = state.params
    s = sufficient_stats(p, batch)  # about p.means
    gamma = (state.step + 2) ** -kappa
    prev = recentre(state.stats, state.centres, p.means.detach())
    inv = 1.0 / s.weight_sum
    blended = Stats(
        (1 - gamma) * prev.resp_sum + gamma * inv * s.resp_sum,
        (1 - gamma) * prev.x_sum + gamma * inv * s.x_sum,
        (1 - gamma) * prev.xx_sum + gamma * inv * s.xx_sum,
        (1 - gamma) * prev.log_lik_sum + gamma * inv * s.log_lik_sum,
        torch.ones_like(s.weight_sum),
        s.worst_log_lik,
        s.worst_x,
    )
    new, n_resets = m_step(blended, p, reg_covar=reg_covar, return_info=True)
    return OnlineState(new, blended, p.means.detach(), state.step + 1), -s.log_lik_sum * inv, n_resets


def _fit_online(
    src: Source, params: GMMParams, max_steps: int | None, kappa: float, reg_covar: float, progress: bool
) -> FitResult:
    state = OnlineState(params, expected_stats(params), params.means.detach(), 0)
    history: list[Tensor] = []
    n_resets = 0
    bar = _progress(progress, max_steps)
    total, rows = 0.0, 0
    while max_steps is None or state.step < max_steps:
        seen = 0
        for xb in src.passes():
            _check_dim(params, xb)
            state, batch_loss, resets = online_update(state, xb, kappa, reg_covar)
            history.append(batch_loss)
            n_resets += int(resets)
            total, rows, seen = total + float(batch_loss) * xb.shape[0], rows + xb.shape[0], seen + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(batch_loss):.6g}")
            if max_steps is not None and state.step >= max_steps:
                break
        if max_steps is None or not src.reusable or seen == 0:
            break
    if bar is not None:
        bar.close()
    final = pytree.tree_map(torch.Tensor.detach, state.params)
    if src.reusable:
        loss = mean_nll(src, final)
    else:
        loss = torch.tensor(total / max(rows, 1), dtype=final.dtype, device=final.device)
    hist = torch.stack(history) if history else torch.zeros(0, dtype=final.dtype, device=final.device)
    return FitResult(final, loss, state.step, True, n_resets, hist.detach())


def _progress(enabled: bool, total: int | None) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fit", unit="step")
