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

from puregmm.tree import tree_map, tree_map2, zeros_like

Schedule = Callable[[Tensor], Any]
LearningRate = Union[float, Schedule]


class Optimizer(NamedTuple):
    """A pair of pure functions; see the module docstring."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]


class AdamState(NamedTuple):
    count: Tensor  # type: ignore[assignment]  # 0-d int64, steps taken (shadows tuple.count)
    mu: Any  # first moments, same pytree as params
    nu: Any  # second moments


class SgdState(NamedTuple):
    count: Tensor  # type: ignore[assignment]  # shadows tuple.count


def _rate(learning_rate: LearningRate, count: Tensor) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


def adam(learning_rate: LearningRate = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam (Kingma & Ba, 2015).

        m ← b1 m + (1 - b1) g;   v ← b2 v + (1 - b2) g²
        update = -lr · m̂ / (√v̂ + eps),  m̂ = m / (1 - b1ᵗ),  v̂ = v / (1 - b2ᵗ)

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
        mu = tree_map2(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)  # first moment
        nu = tree_map2(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)  # second moment
        t = count.to(torch.float64)
        c1, c2 = 1 - torch.pow(b1, t), 1 - torch.pow(b2, t)  # bias corrections
        lr = _rate(learning_rate, state.count)

        def one(m: Tensor, v: Tensor) -> Tensor:
            return -lr * (m / c1.to(m.dtype)) / (torch.sqrt(v / c2.to(v.dtype)) + eps)

        return tree_map2(one, mu, nu), AdamState(count, mu, nu)

    return Optimizer(init, update)


def sgd(learning_rate: LearningRate = 1e-2) -> Optimizer:
    """Plain gradient descent: update = -lr · g."""

    def init(params: Any) -> SgdState:
        return SgdState(torch.zeros((), dtype=torch.int64))

    def update(grads: Any, state: SgdState, params: Any = None) -> tuple[Any, SgdState]:
        lr = _rate(learning_rate, state.count)
        return tree_map(lambda g: -lr * g, grads), SgdState(state.count + 1)

    return Optimizer(init, update)


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf (a new pytree; inputs are unchanged)."""
    return tree_map2(lambda p, u: p + u.to(p.dtype), params, updates)


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0, warmup_steps: int = 0) -> Schedule:
    """lr(t) = init · min(1, (t+1)/W) · (α + (1-α)·½(1 + cos(π·min(t, T)/T))).

    A linear warm-up over ``warmup_steps`` W (so a good initialisation is not kicked away by
    Adam's first, full-size steps), then a cosine decay over ``decay_steps`` T, then flat.
    """

    def schedule(count: Tensor) -> Tensor:
        c = count.to(torch.float64)
        t = torch.clamp(c, max=decay_steps) / decay_steps
        warm = torch.clamp((c + 1) / max(warmup_steps, 1), max=1.0)
        return init_value * warm * (alpha + (1 - alpha) * 0.5 * (1 + torch.cos(math.pi * t)))

    return schedule
