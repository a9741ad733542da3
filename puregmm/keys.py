"""Counter-based randomness written in torch ops.

Kernels draw random numbers from a hash of ``(key, counter, ...)`` instead of a
``torch.Generator``: the same inputs give the same numbers, on any device, under ``vmap``
(keys may be batched) and under ``torch.compile``. The hash is the "lowbias32" integer
finaliser (Wellons, 2018) applied to 32-bit words kept in int64 tensors, so every product
fits and the low 32 bits are exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix(h: Tensor) -> Tensor:
    """lowbias32: a bijection on 32-bit words with good avalanche."""
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK32
    return h ^ (h >> 16)


def hash_words(key: Any, *counters: Any) -> Tensor:
    """A 32-bit hash (int64 tensor in [0, 2³²)) of ``key`` and integer ``counters``.

    Broadcasts over the shapes of all arguments.
    """
    h = _mix(torch.as_tensor(key, dtype=torch.int64) ^ 0x9E3779B9)
    for c in counters:
        c = torch.as_tensor(c, dtype=torch.int64, device=h.device)
        h = _mix(h ^ _mix(c + 0x632BE5AB))
    return h


def uniform(key: Any, *counters: Any, dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniform numbers in [0, 1) from ``hash_words(key, *counters)`` (24 or 32 bits)."""
    h = hash_words(key, *counters)
    if dtype == torch.float64:
        return h.to(dtype) * (1.0 / 2**32)
    return (h >> 8).to(dtype) * (1.0 / 2**24)


def fold_in(key: Any, data: int) -> Tensor:
    """A new key derived from ``key`` and an integer, as ``jax.random.fold_in``."""
    return hash_words(key, data)


def index(key: Any, *counters: Any, n: int) -> Tensor:
    """Integers in [0, n) (int64), uniform up to a bias below n / 2³²."""
    return hash_words(key, *counters) % n
