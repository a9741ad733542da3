"""The pure gradient-descent step, with the variance floor and the singularity reset (Bishop PRML p. 433).

``step(state, batch) -> state``: one optimiser update on the mean negative log-likelihood of
``batch``, then two branch-free repairs. A component collapses when its mean sits on a data
point and its variance shrinks towards zero: the likelihood goes to infinity, the parameters
to Inf/NaN. So, after each update:

1. every direction's variance is held at or above ``min_variance`` (a clamp of the raw scale;
   for full/tied the Cholesky-direction variances Var(x_i | x_<i), whose product is det Σ), which
   bounds every density. A variance at the floor in some directions (a feature constant within
   a cluster) is a legitimate fit, not a collapse, and stays there;
2. a component is *bad* when any of its parameters is non-finite or its covariance is at the
   floor in *every* direction (it sits on a point). A bad component gets its mean set to a
   point of the batch drawn with ``(key, step, k)``, its covariance set to the batch's
   per-dimension spread, its weight to the mean of the good weights, and its optimiser moments
   zeroed. When the batch's own spread is at the floor in every direction (every valid row
   at one point) a finite component there is the fit and is not reset. The original
   GMMPytorch behaviour (reset every component when any is bad) is ``reset="all"``.

The per-family maths (what a direction is, which components a shared scale belongs to) is in
:class:`puregmm.families.Family`.
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
from puregmm.density import nll as density_nll
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
    """Adam at 0.05 decaying (cosine) to 5e-4 over 2000 steps, then flat, on whitened means
    (:func:`whitened_means`).

    Suits standardised data (what :func:`puregmm.fit` feeds ``step``); the schedule depends on
    the step count only. One shared instance, so states built separately stack into one pytree.
    """
    from puregmm.optim import adam, cosine_decay

    return whitened_means(adam(cosine_decay(0.05, 2000, alpha=0.01)))


def whitened_means(inner: Optimizer) -> Optimizer:
    """``inner`` stepping each component's mean in its whitened coordinates ν = μU (U the
    precision factor, :meth:`~puregmm.families.Family.whiten`): the mean's gradient goes in as
    g U⁻ᵀ (the gradient with respect to ν), its update comes out as Δν U⁻¹.

    Adam's first steps move every coordinate by about the learning rate whatever its gradient;
    in whitened units that is a fraction of a standard deviation in every direction, so a
    variance held at the floor (a feature constant within a cluster) keeps its mean, where a
    raw Adam step of 0.05 would throw it 50 floor standard deviations off. Params must be
    :class:`GMMParams`; logits and scale pass through unchanged.
    """

    def update(grads: GMMParams, state: Any, params: GMMParams) -> tuple[GMMParams, Any]:
        spec = params.spec
        whitened = dataclasses.replace(grads, means=spec.unwhiten(params.scale, grads.means, transpose=True))
        updates, state = inner.update(whitened, state, params)
        return dataclasses.replace(updates, means=spec.unwhiten(params.scale, updates.means)), state

    return Optimizer(inner.init, update)


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
        min_variance: the variance floor (data units): every direction's variance is held at or
            above it; a component at it in every direction is reset.
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
    min_variance = _validate.init_state_args(params, min_variance)
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}; got {reset!r}")
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
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a puregmm.TrainState (from pg.init_state); got {type(state).__name__}")
    _validate.data_shape(state.params, batch, "batch")
    if observed is not None and reduce is not None:
        raise ValueError("step: observed= (missing entries) does not combine with reduce=")
    # one gradient path: the mean NLL's (the fused loss), on one process or on this rank's rows
    grads, value = _grad_and_value(state.params, batch, sample_weight, observed)
    if observed is not None:
        mask = getattr(observed, "observed", observed)  # a mask, or a plan of one (puregmm._masked.Plan)
        batch = torch.where(mask, batch, torch.nan)  # the reset draws complete rows only
    if reduce is not None:
        grads, value = _global_mean(grads, value, batch, sample_weight, reduce)
    updates, opt_state = state.optimizer.update(grads, state.opt_state, state.params)
    params = apply_updates(state.params, updates)
    params, opt_state, n_bad = reset_collapsed(
        params, opt_state, batch, state.key, state.step, state.min_variance, state.reset, sample_weight, reduce=reduce
    )
    return dataclasses.replace(
        state, params=params, opt_state=opt_state, step=state.step + 1, n_resets=state.n_resets + n_bad, loss=value
    )


#: The mean NLL by the route ``torch.func.grad(puregmm.loss)`` takes (:func:`puregmm.density.nll`).
_nll = functools.partial(density_nll, fused=False)


def _top_level(*tensors: Tensor | None) -> bool:
    """Whether this call runs outside every transform: eager, no ``torch.func`` transform active,
    and no input in an outer autograd graph (nothing to differentiate through)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not any(t is not None and t.requires_grad for t in tensors)


def _grad_and_value(params: GMMParams, batch: Tensor, sample_weight: Tensor | None, observed: Any) -> tuple:
    """(∇ mean NLL, mean NLL) at ``params`` by ``torch.func.grad_and_value``, or at the top level
    by ``torch.autograd.grad`` on leaf copies of the params: the same backward formulas, so the
    same numbers, without functorch's wrapping of every op (twice the cost at MDN sizes)."""
    leaves = (params.logits, params.means, params.scale)
    if not _top_level(*leaves, batch, sample_weight):
        return torch.func.grad_and_value(_nll)(params, batch, sample_weight, observed)
    logits, means, scale = (t.detach().requires_grad_() for t in leaves)
    with torch.enable_grad():
        value = _nll(GMMParams(logits, means, scale, params.family), batch, sample_weight, observed)
    g = torch.autograd.grad(value, (logits, means, scale), allow_unused=True, materialize_grads=True)
    return GMMParams(g[0], g[1], g[2], params.family), value.detach()


def _global_mean(grads: Any, value: Tensor, batch: Tensor, sample_weight: Tensor | None, reduce: Any) -> tuple:
    """(∇ mean NLL, mean NLL) over the union of every rank's ``batch`` from this rank's mean and
    its gradient: each scaled to this rank's sum by its weight, all-reduced, divided by the
    all-reduced weight sum (the gradient of the global mean, not a mean of per-rank means)."""
    count = batch.new_tensor(float(batch.shape[0])) if sample_weight is None else sample_weight.sum()
    grads, value, total = reduce.sum((pytree.tree_map(lambda g: g * count, grads), value * count, count))
    return pytree.tree_map(lambda g: g / total, grads), value / total


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


def bad_components(
    params: GMMParams, min_variance: float, floor_is_the_fit: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Flags of components to reset [K], and the scale leaf's own flags ([K], or 0-d when shared).

    A live component is bad when its logit or mean is non-finite, or its scale entry is
    :meth:`~puregmm.families.Family.collapsed`: non-finite, or at the variance floor in *every*
    direction (the component sits on a point). A variance at the floor in some directions only
    is held there by :func:`floor_scale`, not reset. Masked components (logit -inf) are never bad.
    ``floor_is_the_fit`` (0-d): the data themselves have no spread above the floor, so a finite
    component at the floor everywhere is not reset (a reset would land there again).
    """
    spec, k = params.spec, params.n_components
    own = spec.collapsed(params.scale, math.log(min_variance))
    if floor_is_the_fit is not None:  # a zero floor (log 0 = -inf) flags the non-finite only
        own = own & (~floor_is_the_fit | spec.collapsed(params.scale, -math.inf))
    active = params.logits != -math.inf
    bad = ~torch.isfinite(params.logits) | ~torch.isfinite(params.means).all(-1) | spec.per_component_flags(own, k)
    return bad & active, own


def floor_scale(params: GMMParams, min_variance: float) -> GMMParams:
    """``params`` with every direction's variance held at or above ``min_variance``
    (:meth:`~puregmm.families.Family.floor_scale`; a projection, branch-free)."""
    return dataclasses.replace(params, scale=params.spec.floor_scale(params.scale, math.log(min_variance)))


def _spread(x: Tensor, valid: Tensor, min_variance: float) -> Tensor:
    """The reset's covariance: the per-dimension variance [D] of the valid rows (floored)."""
    w = valid.to(x.dtype).unsqueeze(-1)
    count = w.sum().clamp_min(1.0)
    centre = (x * w).sum(0) / count
    return (((x - centre) * w).square().sum(0) / count).clamp_min(min_variance)  # [D]


def _fresh_draw(x: Tensor, valid: Tensor, u: Tensor) -> Tensor:
    """One uniformly drawn valid row per component [K, D] (inverse CDF of a 0/1 mass over the rows)."""
    cum = torch.cumsum(valid.to(torch.int64), 0)  # [N]
    target = (u * cum[-1].to(u.dtype)).floor().to(torch.int64) + 1
    picks = torch.searchsorted(cum, target).clamp_max(x.shape[0] - 1)  # [K]
    return torch.index_select(x, 0, picks)


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
    """Hold the scale at the variance floor, then reset bad components (:func:`bad_components`)
    of ``params`` and their optimiser moments, branch-free.

    New means are rows of ``batch`` that are finite and have positive ``sample_weight``; the
    new covariance is the batch's per-dimension spread. With ``reduce`` (see :func:`step`) they
    come from the union of every rank's ``batch``, identically on all ranks. Eagerly (outside
    transforms, no ``reduce``) a step with no component flagged returns after the flags: the
    branch-free form would return the same values.

    Returns the new params, the new optimiser state and the number of components reset.
    """
    spec, k = params.spec, params.n_components
    params = floor_scale(params, min_variance)
    if reduce is None and _top_level():  # eagerly, skip the rest when nothing can be reset:
        bad, own = bad_components(params, min_variance)  # the flags before the data's spread clears any
        if not bool(bad.any() | own.any()):  # (every where below would return its input)
            return params, opt_state, bad.sum()
    active = params.logits != -math.inf  # masked components (logit -inf) are left alone
    finite_rows = torch.isfinite(batch).all(-1, keepdim=True)
    x = torch.where(finite_rows, batch, torch.zeros_like(batch))  # NaN rows cannot poison the reset
    valid = finite_rows.squeeze(-1) if sample_weight is None else finite_rows.squeeze(-1) & (sample_weight > 0)
    ks = torch.arange(k, device=x.device)  # component k's uniform comes from (key, step, k)
    if reduce is not None:  # the same draw over the union of all ranks' rows
        var, new_means = _shared_draw(reduce, x, valid, keys.uniform(key, step_count, ks), min_variance)
    else:
        var = _spread(x, valid, min_variance)
    bad, own = bad_components(params, min_variance, floor_is_the_fit=(var <= min_variance).all())
    if mode == "all":
        bad = bad.any().expand(k) & active
    if reduce is None:
        new_means = _fresh_draw(x, valid, keys.uniform(key, step_count, ks))

    good = ~bad
    log_w = torch.log_softmax(torch.where(good, params.logits, torch.zeros_like(params.logits)), -1)
    live_good = good & active  # the mean weight is over the live good components
    n_good = live_good.sum().clamp_min(1)
    mean_good = torch.where(live_good, log_w, torch.zeros_like(log_w)).sum() / n_good
    kept = torch.where(good, params.logits, torch.zeros_like(params.logits))
    masks = {"logits": bad, "means": bad, "scale": spec.scale_reset(bad, active, own)}

    def fix(name: str, value: Tensor, replacement: Tensor) -> Tensor:
        m = masks[name]
        m = m.reshape(m.shape + (1,) * (value.dim() - m.dim()))
        return torch.where(m, replacement, value)

    new = GMMParams(
        logits=torch.where(bad, mean_good.expand(k), kept),
        means=fix("means", params.means, new_means),
        scale=fix("scale", params.scale, spec.raw_from_variances(var, k)),
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
