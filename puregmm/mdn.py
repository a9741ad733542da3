"""Mixture density networks: a network's unconstrained output vector -> mixture params.

A mixture density network (Bishop, 1994; PRML §5.6) predicts, for each input, the params of a
Gaussian mixture over the target. Here the network outputs ``raw [..., P]`` with
``P = param_size(K, D, family)`` and :func:`from_flat` turns it into :class:`GMMParams` with
batch dims ``...``, ready for :func:`puregmm.log_prob`:

>>> import torch, puregmm as pg
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(),
...                           torch.nn.Linear(16, pg.param_size(3, 1, "diagonal")))
>>> x, y = torch.rand(8, 1), torch.rand(8, 1)                 # inputs [B, 1], targets [B, D]
>>> params = pg.from_flat(net(x), 3, 1, "diagonal")           # batch [B]
>>> nll = -pg.log_prob(params, y[:, None, :]).mean()          # y as [B, 1, D] -> [B, 1]
>>> nll.shape
torch.Size([])

Design decisions:

* Every real ``raw`` is valid: weights are a softmax, covariances are positive definite and
  every variance is at least ``min_variance`` *by construction* (up to rounding), so no
  gradient step can produce a singular component and training needs no reset.
* Layout of ``raw`` along its last axis: ``[logits (K) | means (K·D) | scale (S)]`` with
  ``S`` per family below; ``a`` denotes the network's scale outputs.

  =========  ===========  ==========================================================
  family     S            covariance
  =========  ===========  ==========================================================
  diagonal   K·D          σ²_kd = floor + exp(a_kd)
  isotropic  K            σ²_k = floor + exp(a_k), times I
  shared     1            σ² = floor + exp(a), times I, for every component
  constant   0            ``variance`` times I (given, not predicted)
  full       K·D(D+1)/2   Σ_k = (U_k U_kᵀ)⁻¹, U_k = M_k / √(1 + floor ‖M_k‖²_F)
  tied       D(D+1)/2     as full, one U for all components
  =========  ===========  ==========================================================

  For full/tied, ``M`` is upper triangular with diagonal ``exp(-a_ii / 2)`` (the first D
  entries of a component's block) and off-diagonal entries ``a_ij`` (the next D(D-1)/2, in
  ``torch.triu_indices(D, D, 1)`` order). ``M`` is the precision factor of the unfloored
  covariance. The rescaling keeps ‖U‖²_F < 1/floor, and λ_max(UUᵀ) ≤ ‖U‖²_F, so every
  eigenvalue of Σ is above ``floor``. This is the same bound :func:`puregmm.step` uses to
  detect collapse. The rescaling is a bijection onto {U : ‖U‖²_F < 1/floor}, which is slightly
  conservative: an isotropic Σ = sI needs s > D·floor. In D = 1 every learned family gives
  σ² = floor + exp(a).
* Means are ``raw`` as is. ``from_flat`` checks shapes only (no values), so it runs under
  ``vmap``, ``grad`` and ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from puregmm import _validate
from puregmm.families import get_family
from puregmm.params import GMMParams

DEFAULT_MIN_VARIANCE = 1e-6


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    if value >= 2**63:
        raise ValueError(f"{name} must be below 2**63; got {value}")
    return value


def param_size(n_components: int, dim: int, family: str = "full") -> int:
    """P, the length of the unconstrained vector :func:`from_flat` takes.

    P = K (logits) + K·D (means) + S (scale; see the module table).

    Args:
        n_components: K, a positive int.
        dim: D, a positive int.
        family: one of :data:`puregmm.FAMILIES`.

    Returns:
        P, an int.

    >>> param_size(3, 2, "full"), param_size(3, 2, "diagonal"), param_size(3, 2, "constant")
    (18, 15, 9)

    Raises:
        TypeError/ValueError: ``n_components`` or ``dim`` not a positive int, unknown family.
    """
    k = _check_int(n_components, "n_components")
    d = _check_int(dim, "dim")
    return k + k * d + get_family(family).n_scale_parameters(k, d)  # one output per free parameter


def from_flat(
    raw: Tensor,
    n_components: int,
    dim: int,
    family: str = "full",
    *,
    min_variance: float = DEFAULT_MIN_VARIANCE,
    variance: float | Tensor | None = None,
) -> GMMParams:
    """Mixture params with batch dims ``...`` from unconstrained ``raw [..., P]``.

    Args:
        raw: [..., P] real tensor, P = :func:`param_size` (K, D, family); any values.
        n_components: K.
        dim: D, the dimension of the modelled variable.
        family: one of :data:`puregmm.FAMILIES`.
        min_variance: the variance floor (> 0): every covariance eigenvalue is above it.
        variance: the fixed variance of the ``constant`` family (a float or a tensor
            broadcastable to ``raw.shape[:-1]``); required for it, not allowed otherwise.

    Returns:
        :class:`GMMParams` with ``batch_shape == raw.shape[:-1]``.

    Raises:
        TypeError: ``raw`` is not a floating tensor.
        ValueError: ``raw.shape[-1] != P``, a bad ``min_variance``, unknown family, or
            ``variance`` missing for ``constant`` / given for another family.

    Not checked: finiteness of ``raw`` (a NaN entry gives NaN params).

    >>> import torch, puregmm as pg
    >>> raw = torch.randn(8, pg.param_size(3, 2, "full"))  # e.g. a network's output for 8 inputs
    >>> p = pg.from_flat(raw, 3, 2, "full")
    >>> p.batch_shape, pg.covariances(p).shape
    ((8,), torch.Size([8, 3, 2, 2]))
    """
    spec = get_family(family)
    k, d = _check_int(n_components, "n_components"), _check_int(dim, "dim")
    if not isinstance(raw, Tensor) or not raw.is_floating_point():
        got = raw.dtype if isinstance(raw, Tensor) else type(raw).__name__
        raise TypeError(f"raw must be a floating torch.Tensor [..., P]; got {got}")
    _validate.compute_dtype(raw.dtype, "raw")
    p = param_size(k, d, family)
    if raw.dim() < 1 or raw.shape[-1] != p:
        raise ValueError(
            f"raw must have last dimension P = param_size({k}, {d}, {family!r}) = {p}; got shape {tuple(raw.shape)}"
        )
    if isinstance(min_variance, bool) or not isinstance(min_variance, (int, float)) or not min_variance > 0:
        raise ValueError(f"min_variance must be a positive float; got {min_variance!r}")

    logits = raw[..., :k]  # [..., K]
    means = raw[..., k : k + k * d].unflatten(-1, (k, d))  # [..., K, D]
    scale = spec.raw_from_head(raw[..., k + k * d :], k, d, math.log(min_variance), variance)  # from [..., S]
    return GMMParams(logits, means, scale, family)
