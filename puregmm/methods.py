"""Fitting methods as a table: each is a row of pure functions that the one loop runs.

A :class:`Method` says how to make a run's state from params, advance it by one step on a
batch, decide convergence from the loss history, and score the final params. The drivers
(:func:`puregmm.fit`, :func:`puregmm.fit_batched`, :func:`puregmm.stream.fit_stream`,
:func:`puregmm.distributed.fit_distributed`) look a method up here by name and never branch on
it; adding one (say variational Bayes) is one more row.

Every method runs on standardised data z = (x - m) / s (m the weighted mean, s the root mean
per-dimension variance; see :func:`standardisation`), so defaults suit data of any location and
scale, and data far beyond √(max float) fit as well as data near 1: a Gaussian mixture is
affine-equivariant, and the result is mapped back exactly (:func:`affine`).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from puregmm import _validate, keys, loop
from puregmm.density import log_prob
from puregmm.density import loss as nll
from puregmm.em import em_step, sufficient_stats
from puregmm.estep import log_lik
from puregmm.online import OnlineState, online_state, online_update
from puregmm.params import GMMParams
from puregmm.train import TrainState, init_state, step

GD_MAX_STEPS = 5000
GD_TOL = 1e-7
GD_WINDOW = 20
EM_MAX_STEPS = 100  # scikit-learn's max_iter
EM_TOL = 1e-3  # scikit-learn's tol, on the change of the mean log-likelihood
ONLINE_MAX_STEPS = sys.maxsize  # online EM: one pass over its stream unless max_steps says more


class ConvergenceWarning(UserWarning):
    """A fit stopped at ``max_steps`` before meeting ``tol``.

    A warning, not an error (scikit-learn's rule): the result is still returned, with
    ``converged=False``. Its message lists the usual fixes.

    >>> import warnings, torch, puregmm as pg
    >>> x = torch.randn(200, 2, dtype=torch.float64)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     r = pg.fit(x, 3, method="em", max_steps=1, tol=0.0)
    >>> any(w.category is pg.ConvergenceWarning for w in caught), r.converged
    (True, False)
    """


@dataclass(frozen=True)
class FitResult:
    """What a fit returns; from :func:`fit_batched` every field carries a leading batch dim B.

    Attributes:
        params: the fitted params (leaves [B, ...] when batched).
        loss: final mean negative log-likelihood on the whole data (0-d, or [B]).
        n_steps: steps taken (int, or [B] int64).
        converged: whether the tolerance was met before ``max_steps`` (bool, or [B]).
        n_resets: components reset: singularities or empty components (int, or [B]).
        history: loss after each step ([n_steps], or [B, T] padded with NaN once a run stopped);
            mini-batch loss when ``batch_size`` is set.

    >>> import torch, puregmm as pg
    >>> r = pg.fit(torch.randn(100, 2), 2, "diagonal")
    >>> r.history.shape[0] == r.n_steps
    True
    """

    params: GMMParams
    loss: Tensor
    n_steps: Any
    converged: Any
    n_resets: Any
    history: Tensor


class EMState(NamedTuple):
    """The EM loop's state: everything a checkpoint needs to resume a run exactly.

    Attributes:
        params: current params.
        step: 0-d int64, EM steps taken.
        loss: 0-d, mean NLL of the E-step of the last step (NaN before any step).
        n_resets: 0-d int64, components re-seeded or repaired so far.
        key: 0-d int64, the run's key (EM itself draws nothing; init and restarts do).

    >>> import torch, puregmm as pg
    >>> s = pg.em_state(pg.init(torch.randn(50, 2), 2, "diagonal"))
    >>> int(s.step)
    0
    """

    params: GMMParams
    step: Tensor
    loss: Tensor
    n_resets: Tensor
    key: Tensor


def em_state(params: GMMParams, key: Any = 0) -> EMState:
    """A fresh :class:`EMState` at ``params``.

    Args:
        params: the starting params.
        key: int or 0-d int64 tensor, the run's key.

    Returns:
        :class:`EMState` with step 0 and a NaN loss.

    >>> import torch, puregmm as pg
    >>> pg.em_state(pg.init(torch.randn(50, 2), 2, "diagonal"), key=3).key
    tensor(3)
    """
    _validate.params_structure(params)
    zero = torch.zeros((), dtype=torch.int64)
    nan = torch.full((), float("nan"), dtype=params.dtype, device=params.device)
    return EMState(params, zero, nan, zero, _validate.key(key))


def em_advance(
    state: EMState,
    x: Tensor,
    sample_weight: Tensor | None = None,
    *,
    reg_covar: float | Tensor = 1e-6,
    reduce: Any = None,
) -> EMState:
    """One EM step on an :class:`EMState` (pure; what the fitting loop vmaps). ``reduce``: see
    :func:`puregmm.em_step` (``x`` is then this rank's shard)."""
    params, info = em_step(
        state.params, x, reg_covar=reg_covar, sample_weight=sample_weight, return_info=True, reduce=reduce
    )
    return EMState(params, state.step + 1, -info.log_likelihood, state.n_resets + info.n_resets, state.key)


def minibatch_indices(key: Tensor, step_count: Tensor, n: int, batch_size: int) -> Tensor:
    """Rows [batch_size] for step t: a permutation per epoch drawn from ``(key, epoch)``, cut into
    ``n // batch_size`` batches (the remainder of an epoch is skipped; every epoch reshuffles)."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = step_count // per_epoch, step_count % per_epoch
    perm = torch.argsort(keys.uniform(key, epoch, torch.arange(n)))
    return torch.gather(perm, 0, pos * batch_size + torch.arange(batch_size))


def gd_advance(
    state: TrainState,
    z: Tensor,
    sample_weight: Tensor | None = None,
    *,
    batch_size: int | None = None,
    reduce: Any = None,
) -> TrainState:
    """One gradient step on standardised data ``z`` (a mini-batch of it when ``batch_size``:
    rows per rank with ``reduce``, see :func:`puregmm.step`)."""
    if batch_size is not None and batch_size < z.shape[0]:
        idx = minibatch_indices(state.key, state.step, z.shape[0], batch_size)
        z = torch.index_select(z, 0, idx)
        sample_weight = None if sample_weight is None else torch.index_select(sample_weight, 0, idx)
    return step(state, z, sample_weight, reduce=reduce)


def em_nll(params: GMMParams, x: Tensor, w: Tensor | None, reduce: Any = None) -> Tensor:
    """Mean NLL by the E-step's pass (:mod:`puregmm._moments`): the computation of the EM
    history's values, equal to :func:`puregmm.loss` up to rounding. With ``reduce`` (a
    :class:`puregmm.distributed.Collective`), over every rank's rows."""
    if reduce is None:
        ll, count = log_lik(params, x, w)  # the statistics' scores without the statistics
        return -ll / count
    stats = reduce(sufficient_stats(params, x, w))
    return -stats.log_lik_sum / stats.weight_sum


def gd_nll(params: GMMParams, x: Tensor, w: Tensor | None, reduce: Any = None) -> Tensor:
    """:func:`puregmm.loss`; with ``reduce``, the mean NLL of every rank's rows (sums reduced)."""
    if reduce is None:
        return nll(params, x, w)
    with torch.no_grad():
        lp = log_prob(params, x)
        count = x.new_tensor(float(x.shape[0])) if w is None else w.sum()
        total, count = reduce.sum((-(lp if w is None else lp * w).sum(), count))
    return total / count


class Settings(NamedTuple):
    """A fit's validated settings (the method's own and the shared ones)."""

    method: str
    max_steps: int
    tol: float
    batch_size: int | None
    optimizer: Any
    reg_covar: float | Tensor  # a 0-d tensor once standardised (reg / s²)
    kappa: float = 0.6  # online EM's step-size exponent, γ_t = (t + 2)^-κ


class Method(NamedTuple):
    """One row of the methods table.

    Attributes:
        name: the ``method=`` string.
        max_steps, tol: defaults of a fit.
        make_state: (standardised params, key, settings) -> a run's state.
        advance: (state, z, w, settings, reduce=None) -> the next state (pure, vmappable
            without ``reduce``; with it, ``z`` is this rank's shard and the sums are reduced).
        converged: tol -> rule over the loss history's recent rows (each [B]) -> [B] bool.
        final_loss: (params, x, w, reduce=None) -> the reported mean NLL of the final params.
        per_run_scale: whether each run of a batch is standardised by its own spread (gradient
            descent: its floor and learning rate live in standardised units) or all by the
            largest (EM: exactly equivariant, so one scale keeps ``reg_covar`` one number).
        batches: whether it takes mini-batches and an optimiser (else each step reads all data).
        deterministic: whether a run from given params draws nothing (restarts would repeat it).
        stream: whether each step reads the next batch of a stream (a step's data come from
            the driver's source: :mod:`puregmm.stream`), not the same in-memory data.
        vmap_state: whether ``make_state`` may run under ``vmap`` over stacked runs (no value
            checks): B runs' states in one call instead of B calls and a stack.
    """

    name: str
    max_steps: int
    tol: float
    make_state: Callable[[GMMParams, Tensor, Settings], Any]
    advance: Callable[..., Any]
    converged: Callable[[float], Callable[[list[Tensor]], Tensor]]
    final_loss: Callable[..., Tensor]
    per_run_scale: bool
    batches: bool
    deterministic: bool
    stream: bool = False
    vmap_state: bool = False


def _em_state(params: GMMParams, key: Tensor, cfg: Settings) -> EMState:
    return em_state(params, key)


def _gd_state(params: GMMParams, key: Tensor, cfg: Settings) -> TrainState:
    return init_state(params, cfg.optimizer, key=key)


def _online_state(params: GMMParams, key: Tensor, cfg: Settings) -> OnlineState:
    return online_state(params, key)


METHODS: dict[str, Method] = {
    "em": Method(
        "em", EM_MAX_STEPS, EM_TOL, _em_state,
        lambda s, z, w, cfg, reduce=None: em_advance(s, z, w, reg_covar=cfg.reg_covar, reduce=reduce),
        loop.em_converged, em_nll, per_run_scale=False, batches=False, deterministic=True, vmap_state=True,
    ),
    "gd": Method(
        "gd", GD_MAX_STEPS, GD_TOL, _gd_state,
        lambda s, z, w, cfg, reduce=None: gd_advance(s, z, w, batch_size=cfg.batch_size, reduce=reduce),
        lambda tol: loop.window_converged(tol, GD_WINDOW), gd_nll, per_run_scale=True, batches=True,
        deterministic=False,
    ),
    "online_em": Method(  # one step per batch of a stream: no tolerance, it stops when the stream ends
        "online_em", ONLINE_MAX_STEPS, 0.0, _online_state,
        lambda s, z, w, cfg, reduce=None: online_update(s, z, cfg.kappa, cfg.reg_covar),
        loop.never_converged, em_nll, per_run_scale=False, batches=True, deterministic=True, stream=True,
    ),
}  # fmt: skip
METHOD_NAMES = tuple(METHODS)


def get_method(name: object, in_memory: bool = False) -> Method:
    """The :class:`Method` called ``name``; ``ValueError`` listing the choices otherwise (with
    ``in_memory``, the rows that step through in-memory data: not a stream's)."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHOD_NAMES}")
    row = METHODS[name]
    if in_memory and row.stream:
        raise ValueError(f"method={name!r} takes one step per batch of a stream; fit it with pg.fit (any data source)")
    return row


# --- standardisation ------------------------------------------------------------------------------


def standardisation(x: Tensor, w: Tensor | None, reduce: Any = None) -> tuple[Tensor, Tensor]:
    """Weighted mean m [D] and root mean per-dimension variance s (0-d) of rows ``x`` [N, D]
    (with ``reduce``, a :class:`puregmm.distributed.Collective`: of every rank's rows).

    Computed on x / max|x| first, so that data beyond √(max float) (whose squares overflow)
    get a finite spread. Data without spread (every row equal) get s = max|x|, or 1 for zeros.
    """
    tiny = torch.finfo(x.dtype).tiny
    big = x.abs().amax() if x.shape[0] else x.new_zeros(())
    ref = x[0] if x.shape[0] else x.new_zeros(x.shape[1])
    if reduce is not None:
        big, ref = reduce.gather(big).amax(), reduce.broadcast(ref, 0)
    big = torch.where(big > tiny, big, torch.ones_like(big))

    def total(t: Tensor) -> Tensor:  # Σ ω t over the rows (of every rank)
        t = t.sum(0) if w is None else (w.unsqueeze(-1) * t).sum(0)
        return t if reduce is None else reduce.sum(t)

    if reduce is None:
        count: Tensor | int = x.shape[0] if w is None else w.sum()
    else:
        count = reduce.sum(x.new_tensor(float(x.shape[0])) if w is None else w.sum())
    y = x / big
    centre = total(y) / count
    spread = (total((y - centre).square()) / count).mean().sqrt()
    s = torch.where(spread * big > tiny, spread * big, big)
    direct = ref + total(x - ref) / count  # exact for equal rows
    return torch.where(torch.isfinite(direct), direct, centre * big), s


def standardised_reg(reg_covar: float | Tensor, s: Tensor) -> Tensor:
    """``reg_covar`` in units of the standardised data, reg / s², kept finite (a reg that
    dwarfs data narrower than √tiny stays the largest float rather than inf)."""
    return (reg_covar**0.5 / s).square().clamp_max(torch.finfo(s.dtype).max)


def affine(params: GMMParams, a: Tensor, b: Tensor) -> GMMParams:
    """Params of the data mapped by x -> a·x + b (``a`` > 0 a 0-d tensor, ``b`` [D]):
    μ -> aμ + b, Σ -> a²Σ; weights unchanged."""
    return GMMParams(params.logits, params.means * a + b, params.spec.scaled_raw(params.scale, a), params.family)


def warn_if_not_converged(result: FitResult, stacklevel: int = 3) -> None:
    """The one :class:`ConvergenceWarning` of a single fit that stopped at ``max_steps``."""
    if not result.converged:
        warnings.warn(
            f"fit stopped at max_steps={result.n_steps} without meeting tol; raise max_steps or tol, "
            "or check the data for duplicated points and outliers",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )


def best_run(loss: Tensor) -> int:
    """Index of the lowest final loss (NaN ranks last)."""
    return int(torch.argmin(torch.nan_to_num(loss, nan=math.inf)))
