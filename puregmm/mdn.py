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

import torch
import torch.nn.functional as F
from torch import Tensor

from puregmm.families import get_family
from puregmm.params import GMMParams

DEFAULT_MIN_VARIANCE = 1e-6


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


def _scale_size(n_components: int, dim: int, family: str) -> int:
    spec = get_family(family)
    if not spec.learned:
        return 0
    per = {2: dim * (dim + 1) // 2, 1: dim, 0: 1}[spec.scale_ndim]
    return per * (n_components if spec.per_component else 1)


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
    return k + k * d + _scale_size(k, d, family)


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
    p = param_size(k, d, family)
    if raw.dim() < 1 or raw.shape[-1] != p:
        raise ValueError(
            f"raw must have last dimension P = param_size({k}, {d}, {family!r}) = {p}; got shape {tuple(raw.shape)}"
        )
    if isinstance(min_variance, bool) or not isinstance(min_variance, (int, float)) or not min_variance > 0:
        raise ValueError(f"min_variance must be a positive float; got {min_variance!r}")
    if spec.learned and variance is not None:
        raise ValueError(f"variance is only for family 'constant'; got variance={variance!r} with {family!r}")

    batch = raw.shape[:-1]
    logits = raw[..., :k]  # [..., K]
    means = raw[..., k : k + k * d].unflatten(-1, (k, d))  # [..., K, D]
    a = raw[..., k + k * d :]  # [..., S]
    log_floor = math.log(min_variance)
    if spec.scale_ndim == 2:
        n_blocks = k if spec.per_component else 1
        scale = _floored_precision_factor(a.unflatten(-1, (n_blocks, -1)), d, log_floor)  # [..., n, D, D]
        scale = scale if spec.per_component else scale.squeeze(-3)
    elif spec.learned:
        log_var = torch.logaddexp(torch.full_like(a, log_floor), a)  # log(floor + exp(a))
        shape = {1: (k, d), 0: (k,) if spec.per_component else ()}[spec.scale_ndim]
        scale = (-0.5 * log_var).reshape(batch + shape)  # raw = -½ log σ²
    elif variance is None:
        raise ValueError("family 'constant' needs variance= (its fixed variance); got None")
    else:
        if not isinstance(variance, Tensor) and not variance > 0:
            raise ValueError(f"variance must be positive; got {variance!r}")
        var = torch.as_tensor(variance, dtype=raw.dtype, device=raw.device)  # a tensor is not checked
        scale = torch.broadcast_to(-0.5 * torch.log(var), batch)
    return GMMParams(logits, means, scale, family)


def _floored_precision_factor(a: Tensor, d: int, log_floor: float) -> Tensor:
    """``raw`` of the full family [..., D, D] from packed ``a [..., D(D+1)/2]`` (module table).

    log diag(U) = -a_ii/2 - ½ log(1 + floor ‖M‖²_F), off-diagonal U_ij = a_ij / √(1 + floor ‖M‖²_F),
    with log ‖M‖²_F computed as a logsumexp so a large or small diagonal cannot overflow.
    """
    log_diag_m = -0.5 * a[..., :d]  # [..., D]
    off = a[..., d:]  # [..., D(D-1)/2]
    off_sq = off.square().sum(-1, keepdim=True)  # [..., 1]
    has_off = off_sq > 0  # log 0 = -inf, and a where keeps its gradient finite
    log_off_sq = torch.where(has_off, torch.log(torch.where(has_off, off_sq, torch.ones_like(off_sq))), -math.inf)
    log_norm_sq = torch.logsumexp(torch.cat([2.0 * log_diag_m, log_off_sq], -1), -1)  # log ‖M‖²_F [...]
    log_c = -0.5 * F.softplus(log_norm_sq + log_floor)  # log 1/√(1 + floor ‖M‖²)  [...]
    rows, cols = torch.triu_indices(d, d, 1, device=a.device)
    place = torch.zeros(off.shape[-1], d * d, dtype=a.dtype, device=a.device)  # one-hot [d(d-1)/2, D²]
    place[torch.arange(off.shape[-1], device=a.device), rows * d + cols] = 1.0  # a constant, built eagerly
    upper = ((off * torch.exp(log_c).unsqueeze(-1)) @ place).unflatten(-1, (d, d))  # [..., D, D]
    return upper + torch.diag_embed(log_diag_m + log_c.unsqueeze(-1))
