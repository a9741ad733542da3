"""Input checks of params and the one dtype rule (split from :mod:`puregmm._validate`, which
re-exports them: entry points call ``_validate.params(...)`` and friends).

The rule for dtypes: a tensor is never cast. Half precision (float16/bfloat16) is refused, and
a tensor whose dtype differs from the params' raises a ``TypeError`` naming both; array-likes
are converted by the entry points instead. :func:`params_structure`, :func:`same_dtype` and
:func:`compute_dtype` read no values (kernels call them under ``vmap``/``torch.compile``);
:func:`params` reads the values (entry points only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

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


#: The params class, registered by :mod:`puregmm.params` where it is defined (so that this module,
#: which params.py uses, does not import it back).


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
    leaves = {"logits": p.logits, "means": p.means, "scale": p.scale}
    for leaf, t in leaves.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name}.{leaf} must be a floating point torch.Tensor; got {got}")
    try:
        spec = get_family(p.family)
    except ValueError as err:
        raise ValueError(f"{name}.family: {err}") from None
    dtypes = {leaf: t.dtype for leaf, t in leaves.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{name} leaves must share one dtype; got {dtypes} (cast with params.to(dtype))")
    compute_dtype(p.means.dtype, name)
    if len({t.device for t in leaves.values()}) > 1:
        raise ValueError(f"{name} leaves must be on one device; got {[str(t.device) for t in leaves.values()]}")
    if p.means.dim() < 2 or 0 in p.means.shape[-2:]:
        raise ValueError(f"{name}.means must be [..., K, D] with K, D >= 1; got shape {tuple(p.means.shape)}")
    batch, (k, d) = tuple(p.means.shape[:-2]), p.means.shape[-2:]
    expected = {"logits": (*batch, k), "scale": (*batch, *spec.scale_shape(k, d))}
    for leaf, shape in expected.items():
        if tuple(leaves[leaf].shape) != shape:
            raise ValueError(
                f"{name}.{leaf} must have shape {shape} for family {p.family!r} with means of shape "
                f"{tuple(p.means.shape)} (batch {batch}, K={k}, D={d}); got {tuple(leaves[leaf].shape)}"
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
