"""Functional optimisers over pytrees: an ``Optimizer(init, update)`` pair, as optax.

``init(params) -> state``; ``update(grads, state, params) -> (updates, state)``; then
``apply_updates(params, updates)``. Everything is pure: no in-place writes, so it runs under
``vmap`` and ``torch.compile``. A learning rate is a float or a function of the step count
(never of a total number of steps, so a run stopped at step k equals one interrupted there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from puregmm import _validate
from puregmm.tree import tree_map, tree_map2, zeros_like

Schedule = Callable[[Tensor], Any]
LearningRate = Union[float, Schedule]


class Optimizer(NamedTuple):
    """A pair of pure functions; see the module docstring.

    Attributes:
        init: ``init(params) -> state``, the optimiser's state for a params pytree.
        update: ``update(grads, state, params) -> (updates, state)``; add the updates with
            :func:`apply_updates`.

    >>> import torch, puregmm as pg
    >>> opt = pg.sgd(0.5)
    >>> p = torch.tensor([2.0])
    >>> u, s = opt.update(2 * p, opt.init(p), p)  # gradient of p²
    >>> pg.apply_updates(p, u), s.count
    (tensor([0.]), tensor(1))
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]


class AdamState(NamedTuple):
    """The state of :func:`adam`: a pytree, so it vmaps and checkpoints with the params.

    Attributes:
        count: 0-d int64, updates taken (the learning-rate schedule's argument).
        mu: first moments (mean of the gradients), the params' pytree.
        nu: second moments (mean of the squared gradients), the params' pytree.

    >>> import torch, puregmm as pg
    >>> pg.adam().init({"w": torch.zeros(2)})
    AdamState(count=tensor(0), mu={'w': tensor([0., 0.])}, nu={'w': tensor([0., 0.])})
    """

    count: Tensor  # type: ignore[assignment]  # 0-d int64, steps taken (shadows tuple.count)
    mu: Any  # first moments, same pytree as params
    nu: Any  # second moments


class SgdState(NamedTuple):
    """The state of :func:`sgd`.

    Attributes:
        count: 0-d int64, updates taken (the learning-rate schedule's argument).

    >>> import torch, puregmm as pg
    >>> pg.sgd().init(torch.zeros(2))
    SgdState(count=tensor(0))
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count


def _rate(learning_rate: LearningRate, count: Tensor) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def adam(learning_rate: LearningRate = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam (Kingma & Ba, 2015).

        m ← b1 m + (1 - b1) g;   v ← b2 v + (1 - b2) g²
        update = -lr · m̂ / (√v̂ + eps),  m̂ = m / (1 - b1ᵗ),  v̂ = v / (1 - b2ᵗ)

    Args:
        learning_rate: a float, or a schedule ``count -> lr`` such as :func:`cosine_decay`.
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to √v̂ (not checked).

    Returns:
        an :class:`Optimizer` whose state is an :class:`AdamState`.

    >>> import torch, puregmm as pg
    >>> opt = pg.adam(0.1)
    >>> p = torch.tensor([1.0]); s = opt.init(p)
    >>> u, s = opt.update(2 * p, s, p)        # gradient of p²
    >>> pg.apply_updates(p, u)
    tensor([0.9000])
    """

    def init(params: Any) -> AdamState:
        return AdamState(torch.zeros((), dtype=torch.int64), zeros_like(params), zeros_like(params))

    def update(grads: Any, state: AdamState, params: Any = None) -> tuple[Any, AdamState]:
        count = state.count + 1
        mu = tree_map2(lambda m, g: torch.lerp(m, g, 1 - b1), state.mu, grads)  # first moment: b1 m + (1-b1) g
        nu = tree_map2(lambda v, g: torch.lerp(v, g * g, 1 - b2), state.nu, grads)  # second moment
        t = count.to(torch.float64)
        c1, c2 = 1 - torch.pow(b1, t), 1 - torch.pow(b2, t)  # bias corrections (0-d, cast by promotion)
        size = -_rate(learning_rate, state.count) / c1  # -lr / (1 - b1ᵗ), once for every leaf

        def one(m: Tensor, v: Tensor) -> Tensor:
            return m / (torch.sqrt(v / c2) + eps) * size

        return tree_map2(one, mu, nu), AdamState(count, mu, nu)

    return Optimizer(init, update)


def sgd(learning_rate: LearningRate = 1e-2) -> Optimizer:
    """Plain gradient descent: update = -lr · g.

    Args:
        learning_rate: a float, or a schedule ``count -> lr`` such as :func:`cosine_decay`.

    Returns:
        an :class:`Optimizer` whose state is an :class:`SgdState`.

    >>> import torch, puregmm as pg
    >>> opt = pg.sgd(0.1)
    >>> p = torch.tensor([1.0])
    >>> u, _ = opt.update(2 * p, opt.init(p), p)  # gradient of p²
    >>> pg.apply_updates(p, u)
    tensor([0.8000])
    """

    def init(params: Any) -> SgdState:
        return SgdState(torch.zeros((), dtype=torch.int64))

    def update(grads: Any, state: SgdState, params: Any = None) -> tuple[Any, SgdState]:
        lr = _rate(learning_rate, state.count)
        return tree_map(lambda g: -lr * g, grads), SgdState(state.count + 1)

    return Optimizer(init, update)


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf (a new pytree; inputs are unchanged).

    Args:
        params: a pytree of tensors (e.g. :class:`puregmm.GMMParams`).
        updates: the same pytree, e.g. from ``Optimizer.update``; cast to each param's dtype.

    Returns:
        the updated pytree.

    >>> import torch, puregmm as pg
    >>> pg.apply_updates({"a": torch.ones(2)}, {"a": torch.tensor([0.5, -1.0])})
    {'a': tensor([1.5000, 0.0000])}
    """
    return tree_map2(lambda p, u: p + u.to(p.dtype), params, updates, names=("params", "updates"))


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0, warmup_steps: int = 0) -> Schedule:
    """lr(t) = init · min(1, (t+1)/W) · (α + (1-α)·½(1 + cos(π·min(t, T)/T))).

    A linear warm-up over ``warmup_steps`` W (so a good initialisation is not kicked away by
    Adam's first, full-size steps), then a cosine decay over ``decay_steps`` T, then flat.

    Args:
        init_value: the peak learning rate.
        decay_steps: T > 0, steps from the peak to ``alpha · init_value``.
        alpha: the final fraction of ``init_value``.
        warmup_steps: W, steps of the linear warm-up (0: none).

    Returns:
        a schedule: 0-d int64 step count -> 0-d float64 learning rate.

    >>> import torch, puregmm as pg
    >>> lr = pg.cosine_decay(0.1, 100, alpha=0.01)
    >>> [round(float(lr(torch.tensor(t))), 4) for t in (0, 50, 100, 1000)]
    [0.1, 0.0505, 0.001, 0.001]
    """
    init_value, decay_steps, alpha, warmup_steps = _validate.cosine_decay_args(
        init_value, decay_steps, alpha, warmup_steps
    )

    def schedule(count: Tensor) -> Tensor:
        c = count.to(torch.float64)
        floor, half = init_value * alpha, init_value * (1 - alpha) * 0.5  # lr = floor + half (1 + cos πt)
        lr = floor + half * (1 + torch.cos(torch.clamp(c, max=decay_steps) * (math.pi / decay_steps)))
        if warmup_steps <= 1:  # a warm-up over at most one step is none: min(1, (t+1)/1) = 1 for t >= 0
            return lr
        return lr * torch.clamp((c + 1) / warmup_steps, max=1.0)

    return schedule
