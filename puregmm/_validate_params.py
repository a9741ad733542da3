"""Input checks of params, of the kernels' other arguments (``reg_covar``, :class:`Stats`) and the
one dtype rule (split from :mod:`puregmm._validate`, which re-exports them: entry points call
``_validate.params(...)`` and friends).

The rule for dtypes: a tensor is never cast. Half precision (float16/bfloat16) is refused, and
a tensor whose dtype differs from the params' raises a ``TypeError`` naming both; array-likes
are converted by the entry points instead. :func:`params_structure`, :func:`same_dtype` and
:func:`compute_dtype` read no values (kernels call them under ``vmap``/``torch.compile``);
:func:`params` reads the values (entry points only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from puregmm.params import GMMParams

HALF_DTYPES = (torch.float16, torch.bfloat16)

#: The params class, registered by :mod:`puregmm.params` where it is defined (so that this module,
#: which params.py uses, does not import it back).
PARAMS_TYPE: Any = None


def logits(t: Tensor, name: str = "params.logits") -> None:
    """Finite logits, except -inf for masked components; at least one live per mixture."""
    if bool((torch.isnan(t) | (t == math.inf)).any()):
        raise ValueError(f"{name} contains NaN or +Inf (only -inf is allowed: it masks a component out)")
    if bool((t == -math.inf).all(-1).any()):
        raise ValueError(f"{name}: every component is masked (-inf); at least one must be live")


def compute_dtype(dtype: torch.dtype, name: str) -> None:
    """The rule for half precision: float16/bfloat16 are refused, never silently widened (their
    eps, ~1e-3, cannot hold a covariance's Cholesky factor, and CPU kernels lack them)."""
    if dtype in HALF_DTYPES:
        raise TypeError(
            f"{name} has dtype {dtype}; puregmm computes in float32 or float64 (half precision is too coarse "
            f"for covariances): pass {name}.float()"
        )


def same_dtype(t: Tensor, dtype: torch.dtype, name: str) -> None:
    """The rule for dtype mismatches: a tensor must have the params' dtype (not half); it is
    never cast (array-likes are converted by the entry points instead)."""
    compute_dtype(t.dtype, name)
    if t.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but the params have {dtype}; puregmm never casts a tensor: "
            f"pass {name}.to(params.dtype) or params.to({name}.dtype)"
        )


def params_structure(p: Any, name: str = "params") -> None:
    """Static checks of params: a :class:`GMMParams` of a known family whose leaves are float
    tensors of one dtype (not half) on one device, with shapes logits [B..., K],
    means [B..., K, D] and the family's scale [B..., *scale_shape(K, D)], K, D >= 1. Reads no
    values (kernels call it, under ``vmap`` and ``torch.compile``)."""
    from puregmm.families import get_family

    if PARAMS_TYPE is None or not isinstance(p, PARAMS_TYPE):
        raise TypeError(
            f"{name} must be GMMParams (from pg.fit(...).params, pg.init or pg.from_moments); got {type(p).__name__}"
        )
    leaves = (("logits", p.logits), ("means", p.means), ("scale", p.scale))
    for leaf, t in leaves:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name}.{leaf} must be a floating point torch.Tensor; got {got}")
    try:
        spec = get_family(p.family)
    except ValueError as err:
        raise ValueError(f"{name}.family: {err}") from None
    means, dtype, device = p.means, p.means.dtype, p.means.device
    if p.logits.dtype != dtype or p.scale.dtype != dtype:
        dtypes = {leaf: t.dtype for leaf, t in leaves}
        raise TypeError(f"{name} leaves must share one dtype; got {dtypes} (cast with params.to(dtype))")
    compute_dtype(dtype, name)
    if p.logits.device != device or p.scale.device != device:
        raise ValueError(f"{name} leaves must be on one device; got {[str(t.device) for _, t in leaves]}")
    if means.dim() < 2 or 0 in means.shape[-2:]:
        raise ValueError(f"{name}.means must be [..., K, D] with K, D >= 1; got shape {tuple(means.shape)}")
    batch, (k, d) = tuple(means.shape[:-2]), means.shape[-2:]
    for leaf, t, shape in (("logits", p.logits, (*batch, k)), ("scale", p.scale, (*batch, *spec.scale_shape(k, d)))):
        if t.shape != shape:
            raise ValueError(
                f"{name}.{leaf} must have shape {shape} for family {p.family!r} with means of shape "
                f"{tuple(means.shape)} (batch {batch}, K={k}, D={d}); got {tuple(t.shape)}"
            )


def params(p: Any, name: str = "params") -> GMMParams:
    """:func:`params_structure`, then the values (entry points only): finite means and scale,
    logits finite or -inf (a masked component) with at least one live component per mixture."""
    params_structure(p, name)
    logits(p.logits, f"{name}.logits")
    for leaf in ("means", "scale"):
        if not bool(torch.isfinite(getattr(p, leaf)).all()):
            raise ValueError(f"{name}.{leaf} contains NaN or Inf: these params are broken (a diverged fit?)")
    return p  # type: ignore[no-any-return]


def unbatched(params: GMMParams, what: str) -> None:
    """Static: ``what`` takes one mixture; batched params go through ``torch.func.vmap``."""
    if params.batch_shape:
        raise ValueError(
            f"{what} needs unbatched params (vmap it over batched ones); got batch dims {params.batch_shape}"
        )


def eager(t: Tensor) -> bool:
    """Whether ``t`` is a plain tensor outside ``torch.compile`` and ``torch.func`` transforms,
    where a value check may read it."""
    return not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(t)


# --- the kernels' other arguments: static checks (shapes, dtypes, Python types) -------------------


def reg_covar(v: Any) -> float:
    """A finite, non-negative ``reg_covar``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"reg_covar must be a non-negative float; got {type(v).__name__}")
    if not 0 <= float(v) < float("inf"):
        raise ValueError(f"reg_covar must be a finite non-negative float (e.g. 1e-6); got {v!r}")
    return float(v)


def kernel_reg_covar(v: Any) -> float | Tensor:
    """A kernel's ``reg_covar``: a float (:func:`reg_covar`), or a 0-d float tensor as it is (a
    fit's standardised value; its value is not read, so it works under ``vmap``/``compile``)."""
    if not isinstance(v, Tensor):
        return reg_covar(v)
    if v.dim() != 0 or not v.is_floating_point():
        raise TypeError(
            f"reg_covar must be a non-negative float (or a 0-d float tensor); got a {v.dtype} tensor of "
            f"shape {tuple(v.shape)}"
        )
    return v


def positive(v: Any, name: str) -> float:
    """A finite positive number (an int or a float; bool refused)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a positive float; got {type(v).__name__} {v!r}")
    if not 0 < float(v) < math.inf:
        raise ValueError(f"{name} must be a finite positive float; got {v!r}")
    return float(v)


def stats(s: Any, params: GMMParams, name: str = "stats") -> None:
    """Static: ``s`` is the :class:`Stats` of unbatched ``params`` (K components, D dims, the
    family's ``xx_sum``), every field a tensor of the params' dtype on their device."""
    from puregmm.stats import Stats  # a leaf module (imports nothing of puregmm): no cycle

    if not isinstance(s, Stats):
        raise TypeError(f"{name} must be puregmm.Stats (from pg.sufficient_stats); got {type(s).__name__}")
    (k, d), dtype, device = params.means.shape[-2:], params.means.dtype, params.means.device
    shapes = ((k,), (k, d), params.spec.stats_shape(k, d), (), (), (k,), (k, d))  # Stats' fields, in order
    for field, t, shape in zip(s._fields, s, shapes):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype != dtype:
            same_dtype(t, dtype, f"{name}.{field}")  # raises, by the one dtype rule
        if t.shape != shape:
            raise ValueError(
                f"{name}.{field} must have shape {shape} for params of family {params.family!r} with K={k}, D={d} "
                f"(the stats of the same params); got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{name}.{field} is on {t.device} but the params on {device}")


def m_step_args(s: Any, p: Any, reg: Any) -> float | Tensor:
    """Static checks of :func:`puregmm.m_step`'s arguments (it runs in every EM step, under
    ``vmap`` and ``torch.compile``: shapes, dtypes and types only); returns ``reg_covar``."""
    params_structure(p)
    unbatched(p, "m_step")
    stats(s, p)
    return kernel_reg_covar(reg)


def init_state_args(p: Any, min_variance: Any) -> float:
    """Checks of :func:`puregmm.init_state` (eager, once per fit): the params' structure and
    values (:func:`params`), and a finite positive ``min_variance`` (returned as a float)."""
    params(p)
    return positive(min_variance, "min_variance")
