"""The pure gradient-descent step, with the singularity reset (Bishop PRML p. 433).

``step(state, batch) -> state``: one optimiser update on the mean negative log-likelihood of
``batch``, then a branch-free check that resets collapsed components. A component collapses
when its mean sits on a data point and its variance shrinks towards zero: the likelihood
goes to infinity, the parameters to Inf/NaN. After each update, a component is *bad* when any
of its parameters is non-finite or its smallest variance fell below ``min_variance`` (which also
covers a non-finite log-density normaliser). A bad component gets its mean set to a point of the
batch drawn with ``(key, step, k)``, its covariance set to the batch's per-dimension spread,
its weight to the mean of the good weights, and its optimiser moments zeroed. The original
GMMPytorch behaviour (reset every component when any is bad) is ``reset="all"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, keys
from puregmm.density import log_prob
from puregmm.density import loss as nll
from puregmm.optim import Optimizer, apply_updates
from puregmm.params import GMMParams

RESETS = ("component", "all")


@dataclass(frozen=True)
class TrainState:
    """Everything one gradient-descent step needs; a pytree (tensors are leaves).

    Attributes:
        params: current mixture params.
        opt_state: the optimiser's state (pytree).
        step: 0-d int64, steps taken.
        key: 0-d int64, the run's key; randomness is drawn from ``(key, step)``.
        n_resets: 0-d int64, components reset so far.
        loss: 0-d, the batch loss at the params *before* the last step (NaN before any).
        optimizer, min_variance, reset: static settings chosen at :func:`init_state`.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(200, 2)
    >>> state = pg.init_state(pg.init(x, 2, "diagonal"), pg.adam(0.05), key=0)
    >>> state.step, state.loss, state.n_resets
    (tensor(0), tensor(nan), tensor(0))
    """

    params: GMMParams
    opt_state: Any
    step: Tensor
    key: Tensor
    n_resets: Tensor
    loss: Tensor
    optimizer: Optimizer
    min_variance: float = 1e-6
    reset: str = "component"


_LEAVES = ("params", "opt_state", "step", "key", "n_resets", "loss")
_STATIC = ("optimizer", "min_variance", "reset")


def _flatten(s: TrainState) -> tuple[list[Any], tuple[Any, ...]]:
    return [getattr(s, f) for f in _LEAVES], tuple(getattr(s, f) for f in _STATIC)


def _unflatten(leaves: Any, context: tuple[Any, ...]) -> TrainState:
    return TrainState(*leaves, *context)


def _flatten_with_keys(s: TrainState) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    return [(pytree.GetAttrKey(f), getattr(s, f)) for f in _LEAVES], tuple(getattr(s, f) for f in _STATIC)


pytree.register_pytree_node(
    TrainState, _flatten, _unflatten, serialized_type_name="puregmm.TrainState", flatten_with_keys_fn=_flatten_with_keys
)


@functools.cache
def default_optimizer() -> Optimizer:
    """Adam at 0.05 decaying (cosine) to 5e-4 over 2000 steps, then flat.

    Suits standardised data (what :func:`puregmm.fit` feeds ``step``); the schedule depends on
    the step count only. One shared instance, so states built separately stack into one pytree.
    """
    from puregmm.optim import adam, cosine_decay

    return adam(cosine_decay(0.05, 2000, alpha=0.01))


def init_state(
    params: GMMParams,
    optimizer: Optimizer | None = None,
    *,
    key: Any = 0,
    min_variance: float = 1e-6,
    reset: str = "component",
) -> TrainState:
    """A fresh :class:`TrainState` for ``params``.

    Args:
        params: initial params (checked finite).
        optimizer: an :class:`Optimizer`; ``None`` gives :func:`default_optimizer`.
        key: int or 0-d int64 tensor; the source of all randomness in ``step``.
        min_variance: the variance floor (data units) below which a component is reset.
        reset: ``"component"`` resets only bad components; ``"all"`` resets every component
            when any is bad (the original GMMPytorch behaviour).

    Returns:
        a :class:`TrainState` at step 0 with the optimiser's fresh state and ``loss=NaN``.

    Raises:
        TypeError: ``params`` not :class:`GMMParams` or ``optimizer`` not an :class:`Optimizer`.
        ValueError: an unknown ``reset``, ``min_variance`` not positive, or non-finite params.

    >>> import torch, puregmm as pg
    >>> state = pg.init_state(pg.init(torch.randn(100, 2), 3, "full"), key=1)
    >>> state.step, state.key
    (tensor(0), tensor(1))
    """
    if not isinstance(params, GMMParams):
        raise TypeError(f"params must be GMMParams; got {type(params).__name__}")
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}; got {reset!r}")
    if not min_variance > 0:
        raise ValueError(f"min_variance must be positive; got {min_variance!r}")
    _validate.logits(params.logits)
    for name in ("means", "scale"):
        _validate.finite(getattr(params, name).reshape(1, -1), f"params.{name}")
    optimizer = default_optimizer() if optimizer is None else optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a puregmm Optimizer (e.g. pg.adam()); got {type(optimizer).__name__}")
    zero = torch.zeros((), dtype=torch.int64)
    nan = torch.full((), float("nan"), dtype=params.dtype, device=params.device)
    return TrainState(
        params, optimizer.init(params), zero, _validate.key(key), zero, nan, optimizer, float(min_variance), reset
    )


def step(
    state: TrainState, batch: Tensor, sample_weight: Tensor | None = None, *, reduce: Any = None, observed: Any = None
) -> TrainState:
    """One pure gradient step on the mean NLL of ``batch`` [N, D], then the singularity reset.

    Never mutates its inputs, uses no global RNG, returns identical output for identical input.
    Works under ``torch.func.vmap`` and ``torch.compile``.

    ``reduce`` (optional, static) makes ``batch`` one rank's shard of a data-parallel step: an
    object with ``sum(tree)`` (all-reduce SUM of every leaf), ``gather(tree)`` (all-gather, a
    leading [W] axis in rank order) and ``rank``, e.g. :class:`puregmm.distributed.Collective`.
    The gradient is then Σ_ranks ∇(-Σ_n ω_n log p(x_n)) / Σ_ranks Σ_n ω_n, the gradient of the
    mean NLL of the union of the shards (not a mean of per-rank means), and the reset draws
    its points from that union identically on every rank (:func:`reset_collapsed`). Eager
    only (collectives do not run under ``vmap``/``torch.compile``).

    Args:
        state: the current :class:`TrainState`.
        batch: data [N, D] (checked against the params' D).
        sample_weight: optional [N] non-negative weights (not checked).
        reduce: optional collective (above).
        observed: optional bool mask of ``batch``'s shape (True = observed): the step follows the
            gradient of the observed-data likelihood (:func:`puregmm.loss` with ``observed``); the
            other entries are ignored whatever they hold. Not with ``reduce``.

    Returns:
        the next :class:`TrainState`: ``step + 1``, ``loss`` the batch loss at ``state.params``.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(200, 2)
    >>> state = pg.init_state(pg.init(x, 2, "diagonal"), pg.adam(0.05))
    >>> a, b = pg.step(state, x), pg.step(state, x)  # same input, same output
    >>> a.step, torch.equal(a.params.means, b.params.means), bool(a.loss == pg.loss(state.params, x))
    (tensor(1), True, True)
    """
    _validate.data_shape(state.params, batch, "batch")
    if observed is not None:
        if reduce is not None:
            raise ValueError("step: observed= (missing entries) does not combine with reduce=")
        grads, value = torch.func.grad_and_value(nll)(state.params, batch, sample_weight, observed)
        mask = getattr(observed, "observed", observed)  # a mask, or a plan of one (puregmm._masked.Plan)
        batch = torch.where(mask, batch, torch.nan)  # the reset draws complete rows only
    elif reduce is None:
        grads, value = torch.func.grad_and_value(nll)(state.params, batch, sample_weight)
    else:
        grads, value = _global_grad(state.params, batch, sample_weight, reduce)
    updates, opt_state = state.optimizer.update(grads, state.opt_state, state.params)
    params = apply_updates(state.params, updates)
    params, opt_state, n_bad = reset_collapsed(
        params, opt_state, batch, state.key, state.step, state.min_variance, state.reset, sample_weight, reduce=reduce
    )
    return dataclasses.replace(
        state, params=params, opt_state=opt_state, step=state.step + 1, n_resets=state.n_resets + n_bad, loss=value
    )


def _global_grad(params: GMMParams, batch: Tensor, sample_weight: Tensor | None, reduce: Any) -> tuple[Any, Tensor]:
    """(∇ mean NLL, mean NLL) over the union of every rank's ``batch``: per-rank sums of the
    weighted NLL and its gradient, all-reduced, divided by the all-reduced weight sum."""

    def total(p: GMMParams) -> Tensor:
        lp = log_prob(p, batch)  # [N]
        return -(lp if sample_weight is None else lp * sample_weight).sum()

    grads, value = torch.func.grad_and_value(total)(params)
    count = batch.new_tensor(float(batch.shape[0])) if sample_weight is None else sample_weight.sum()
    grads, value, count = reduce.sum((grads, value, count))
    return pytree.tree_map(lambda g: g / count, grads), value / count


def _shared_draw(reduce: Any, x: Tensor, valid: Tensor, u: Tensor, min_variance: float) -> tuple[Tensor, Tensor]:
    """The reset's spread [D] and K drawn rows [K, D] over the union of every rank's valid rows
    (``x`` zeroed where invalid), identical on every rank and equal to the single-process draw
    on the shards concatenated in rank order.

    Each rank proposes, for every component, its row at the global target index (cumulative
    counts over ranks come from an all-gather); a second all-gather of the candidates lets the
    owning rank's proposal win.
    """
    k = u.shape[0]
    w = valid.to(x.dtype).unsqueeze(-1)  # [N, 1]
    cum = torch.cumsum(valid.to(torch.int64), 0)  # [N]
    counts, sums = reduce.gather((cum[-1], (x * w).sum(0)))  # [W], [W, D]
    count = counts.sum().to(x.dtype).clamp_min(1.0)
    centre = sums.sum(0) / count
    target = (u * counts.sum().to(u.dtype)).floor().to(torch.int64) + 1  # [K], 1-based global index
    ends = torch.cumsum(counts, 0)  # [W]
    offset = ends[reduce.rank] - counts[reduce.rank]
    local = torch.searchsorted(cum, target - offset).clamp_max(x.shape[0] - 1)  # [K]
    owner = (ends.unsqueeze(0) < target.unsqueeze(1)).sum(-1).clamp_max(counts.shape[0] - 1)  # [K]
    sq, cand = reduce.gather((((x - centre) * w).square().sum(0), x.index_select(0, local)))  # [W, D], [W, K, D]
    var = (sq.sum(0) / count).clamp_min(min_variance)
    return var, cand[owner, torch.arange(k, device=x.device)]


def bad_components(params: GMMParams, min_variance: float) -> tuple[Tensor, Tensor]:
    """Per-component flags [K] (non-finite or below the floor) and a 0-d flag for ``scale``
    when it is shared by all components."""
    spec, k = params.spec, params.n_components
    log_floor = torch.log(torch.tensor(min_variance, dtype=params.dtype, device=params.device))

    def scale_bad(raw: Tensor) -> Tensor:
        finite = torch.isfinite(raw).all()
        safe = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))
        return ~finite | (spec.log_min_variance(safe) < log_floor)

    active = params.logits != -math.inf  # a logit of -inf masks its component out: never bad
    bad = ~torch.isfinite(params.logits) | ~torch.isfinite(params.means).all(-1)
    if spec.per_component:
        return (bad | torch.func.vmap(scale_bad)(params.scale)) & active, torch.zeros((), dtype=torch.bool)
    shared_bad = scale_bad(params.scale) if spec.learned else torch.zeros((), dtype=torch.bool)
    return (bad | shared_bad.expand(k)) & active, shared_bad


def reset_collapsed(
    params: GMMParams,
    opt_state: Any,
    batch: Tensor,
    key: Tensor,
    step_count: Tensor,
    min_variance: float,
    mode: str = "component",
    sample_weight: Tensor | None = None,
    *,
    reduce: Any = None,
) -> tuple[GMMParams, Any, Tensor]:
    """Reset bad components of ``params`` (and their optimiser moments) branch-free.

    New means are rows of ``batch`` that are finite and have positive ``sample_weight``. With
    ``reduce`` (see :func:`step`) they and the spread come from the union of every rank's
    ``batch``, identically on all ranks.

    Returns the new params, the new optimiser state and the number of components reset.
    """
    spec, k = params.spec, params.n_components
    active = params.logits != -math.inf  # masked components (logit -inf) are left alone
    bad, shared_bad = bad_components(params, min_variance)
    if mode == "all":
        bad = bad.any().expand(k) & active
        shared_bad = shared_bad | bad.any() if not spec.per_component and spec.learned else shared_bad
    finite_rows = torch.isfinite(batch).all(-1, keepdim=True)
    x = torch.where(finite_rows, batch, torch.zeros_like(batch))  # NaN rows cannot poison the reset
    valid = finite_rows.squeeze(-1) if sample_weight is None else finite_rows.squeeze(-1) & (sample_weight > 0)
    u = keys.uniform(key, step_count, torch.arange(k, device=x.device))  # [K]
    if reduce is not None:  # the same draw over the union of all ranks' rows
        var, new_means = _shared_draw(reduce, x, valid, u, min_variance)
    else:
        w = valid.to(x.dtype).unsqueeze(-1)
        count = w.sum().clamp_min(1.0)
        centre = (x * w).sum(0) / count
        var = (((x - centre) * w).square().sum(0) / count).clamp_min(min_variance)  # [D]
        # a uniformly drawn valid row (finite, positive weight) per component: inverse CDF of a 0/1 mass
        cum = torch.cumsum(valid.to(torch.int64), 0)  # [N]
        target = (u * cum[-1].to(u.dtype)).floor().to(torch.int64) + 1
        picks = torch.searchsorted(cum, target).clamp_max(x.shape[0] - 1)  # [K]
        new_means = torch.index_select(x, 0, picks)  # [K, D]
    fresh = spec.raw_from_variances(var, k)

    good = ~bad
    log_w = torch.log_softmax(torch.where(good, params.logits, torch.zeros_like(params.logits)), -1)
    live_good = good & active  # the mean weight is over the live good components
    n_good = live_good.sum().clamp_min(1)
    mean_good = torch.where(live_good, log_w, torch.zeros_like(log_w)).sum() / n_good
    kept = torch.where(good, params.logits, torch.zeros_like(params.logits))
    new_logits = torch.where(bad, mean_good.expand(k), kept)

    def mask_for(leaf: str) -> Tensor:
        if leaf == "scale" and not spec.per_component:
            return shared_bad
        return bad

    def fix(name: str, value: Tensor, replacement: Tensor) -> Tensor:
        m = mask_for(name)
        m = m.reshape(m.shape + (1,) * (value.dim() - m.dim()))
        return torch.where(m, replacement, value)

    new = GMMParams(
        logits=new_logits,
        means=fix("means", params.means, new_means),
        scale=fix("scale", params.scale, fresh),
        family=params.family,
    )

    def zero_moments(p: GMMParams) -> GMMParams:
        z = {n: fix(n, getattr(p, n), torch.zeros_like(getattr(p, n))) for n in ("logits", "means", "scale")}
        return GMMParams(family=p.family, **z)

    opt_state = pytree.tree_map(
        lambda t: zero_moments(t) if isinstance(t, GMMParams) else t,
        opt_state,
        is_leaf=lambda t: isinstance(t, GMMParams),
    )
    return new, opt_state, bad.sum()
