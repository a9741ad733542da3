"""Input checks for the public entry points: the one place they live (the checks of params and
the dtype rule are in :mod:`puregmm._validate_params`, re-exported here).

Kernels (``log_prob``, ``loss``, ``step``, ``em_step``) call only the shape checks, which read
static shapes and so work under ``vmap`` and ``torch.compile(fullgraph=True)``. Value checks
(NaN/Inf, positivity) run eagerly in the fitting and inference entry points and ``from_moments``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from puregmm.families import Family
    from puregmm.params import GMMParams

from puregmm._validate_params import (  # re-exported: entry points call _validate.<check>
    HALF_DTYPES,
    compute_dtype,
    eager,
    init_state_args,
    kernel_reg_covar,
    logits,
    m_step_args,
    params,
    params_structure,
    positive,
    reg_covar,
    same_dtype,
    stats,
    unbatched,
)

__all__ = [
    "HALF_DTYPES", "compute_dtype", "eager", "init_state_args", "kernel_reg_covar", "logits", "m_step_args",
    "params", "params_structure", "positive", "reg_covar", "same_dtype", "stats", "unbatched",
]  # fmt: skip


def as_float_tensor(x: Any, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` as a floating tensor; integer and bool data become the default float dtype."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, (np.ndarray, list, tuple, float, int)) or hasattr(x, "__array__"):
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be numeric array-like; got {type(x).__name__}") from err
    else:
        raise TypeError(f"{name} must be a tensor or array-like; got {type(x).__name__}")
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must hold real numbers; got dtype {t.dtype}")
    if dtype is not None:
        return t.to(dtype)
    compute_dtype(t.dtype, name)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def data(x: Any, name: str = "x", dtype: torch.dtype | None = None) -> Tensor:
    """Checked 2-D, non-empty, finite float data [N, D]."""
    t = as_float_tensor(x, name, dtype)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D]; got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {tuple(t.shape)}")
    finite(t, name)
    return t


def finite(t: Tensor, name: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        rows = torch.nonzero(bad.reshape(t.shape[0], -1).any(-1)).flatten()[:5].tolist() if t.dim() else []
        where = f" (first bad rows: {rows})" if rows else ""
        raise ValueError(f"{name} contains NaN or Inf{where}; drop or impute those values first")


def n_components(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"n_components must be an int; got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"n_components must be >= 1; got {k}")
    if k > n:
        raise ValueError(f"n_components={k} is more than the number of samples N={n} (rows of the data)")
    return int(k)


def data_shape(params: GMMParams, x: Tensor, name: str = "x") -> None:
    """Static check of kernels and entry points: ``params`` well formed (:func:`params_structure`)
    and ``x`` a tensor [N, D] or [*params.batch_shape, N, D] with N >= 1, the params' D, dtype
    (no casting: one rule for every entry point) and device. Reads shapes and dtypes only, so it
    works under ``vmap``/``grad`` and ``torch.compile(fullgraph=True)``."""
    params_structure(params)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be [N, D] (2-D); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point; got {x.dtype} (convert with {name}.to(params.dtype))")
    same_dtype(x, params.dtype, name)
    if x.shape[-1] != params.dim:
        raise ValueError(
            f"{name} has dimension D={x.shape[-1]} but the params have D={params.dim}; "
            f"got {name} of shape {tuple(x.shape)}"
        )
    if x.shape[-2] == 0:
        raise ValueError(f"{name} must hold at least one row [N >= 1, D]; got shape {tuple(x.shape)}")
    if x.dim() > 2 and tuple(x.shape[:-2]) != params.batch_shape:
        raise ValueError(
            f"{name} has batch dims {tuple(x.shape[:-2])} but the params have batch dims {params.batch_shape}; "
            f"pass {name} as [N, D] (shared) or [*batch, N, D]"
        )
    if x.device != params.device:
        raise ValueError(f"{name} is on {x.device} but the params on {params.device}; move one with .to(device)")


def sample_weight(w: Any, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Checked non-negative finite weights [N], not all zero."""
    t = as_float_tensor(w, "sample_weight").to(dtype=dtype, device=device)
    if t.shape != (n,):
        raise ValueError(f"sample_weight must have shape ({n},) to match x; got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("sample_weight contains NaN or Inf")
    if bool((t < 0).any()):
        raise ValueError("sample_weight must be non-negative; got negative entries")
    if not bool((t > 0).any()):
        raise ValueError("sample_weight is all zero; at least one sample needs positive weight")
    return t


def key(k: Any) -> Tensor:
    """A key as a 0-d int64 tensor."""
    if isinstance(k, Tensor):
        if k.dtype != torch.int64 or k.dim() != 0:
            raise TypeError(f"key must be an int or a 0-d int64 tensor; got {k.dtype} of shape {tuple(k.shape)}")
        return k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"key must be an int or a 0-d int64 tensor; got {type(k).__name__}")
    if not -(2**63) <= int(k) < 2**63:
        raise ValueError(f"key must be an int in [-2**63, 2**63) (it is held as int64); got {int(k)}")
    return torch.tensor(int(k), dtype=torch.int64)


def rounding_eps(k: int, dtype: torch.dtype) -> float:
    """What rounding may leave on a covariance computed in ``dtype``, relative to its size.

    A mixture's second moments are sums of K rank-one terms (each term and the sum rounded:
    (K + 1) eps); a difference of two of them and a division add 2 eps. Twice that, for margin.
    """
    return 2 * (k + 4) * torch.finfo(dtype).eps


def moments(
    weights: Any, means: Any, covariances: Any, rounding: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Checked weights [K], means [K, D], covariances [K, D, D] with a common float dtype.

    The tolerances follow ``rounding`` (default: the inputs' dtype; a caller that checks float32
    values in float64 passes float32): weights sum to 1 within max(1e-6, :func:`rounding_eps`);
    Σ_k is symmetric within rounding_eps × (max|Σ_k| + max|μ|²), the size of the second moments
    E[xxᵀ] − μμᵀ it is usually the difference of (scikit-learn's tied estimator computes it so).
    """
    mu = as_float_tensor(means, "means")
    dtype = mu.dtype
    w = as_float_tensor(weights, "weights", dtype).to(mu.device)
    cov = as_float_tensor(covariances, "covariances", dtype).to(mu.device)
    if mu.dim() != 2 or 0 in mu.shape:
        raise ValueError(f"means must be [K, D] with K, D >= 1; got shape {tuple(mu.shape)}")
    k, d = mu.shape
    if w.shape != (k,):
        raise ValueError(f"weights must be [K]=({k},) to match means; got {tuple(w.shape)}")
    if cov.shape != (k, d, d):
        raise ValueError(f"covariances must be [K, D, D]=({k}, {d}, {d}); got {tuple(cov.shape)}")
    for name, t in (("weights", w), ("means", mu), ("covariances", cov)):
        finite(t.reshape(len(t), -1), name)
    if bool((w <= 0).any()):
        raise ValueError(f"weights must be positive; got {w.tolist()}")
    rel = rounding_eps(k, dtype if rounding is None else rounding)
    if abs(float(w.sum()) - 1.0) > max(1e-6, rel):
        raise ValueError(f"weights must sum to 1 (within {max(1e-6, rel):.2g}); they sum to {float(w.sum())!r}")
    size = cov.abs().amax(dim=(-2, -1)) + mu.square().amax()  # [K]
    asym = (cov - cov.mT).abs().amax(dim=(-2, -1))  # [K]
    if bool((asym > rel * size).any()):
        i = int(torch.argmax(asym / size))
        raise ValueError(
            f"covariances must be symmetric; component {i} has |Σ - Σᵀ| up to {float(asym[i]):.3g}, more than "
            f"rounding leaves ({rel:.2g} × (max|Σ_k| + max|μ|²) = {float(rel * size[i]):.3g}); "
            "pass (Σ + Σᵀ)/2 if the asymmetry is known to be harmless"
        )
    _, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        bad = torch.nonzero(info).flatten().tolist()
        raise ValueError(f"covariances must be positive definite; components {bad} are not")
    return w, mu, cov


def covariance_structure(cov: Tensor, spec: Family, rounding: torch.dtype | None = None) -> None:
    """The covariances [K, D, D] have the family's structure within :func:`rounding_eps` × max|Σ|
    (eps of ``rounding``, default ``cov``'s dtype)."""
    rel = rounding_eps(cov.shape[0], cov.dtype if rounding is None else rounding)
    what = spec.structure_violation(cov, rel * cov.abs().amax())
    if what is not None:
        raise ValueError(f"family {spec.name!r} needs {what}")


def means(m: Any, k: int, d: int, dtype: torch.dtype, device: torch.device, name: str = "means") -> Tensor:
    """Checked finite initial means [K, D] in the data's dtype and device."""
    t = as_float_tensor(m, name).to(dtype=dtype, device=device)
    if t.shape != (k, d):
        raise ValueError(f"{name} must be [K, D]=({k}, {d}) to match n_components and the data; got {tuple(t.shape)}")
    finite(t, name)
    return t


def positive_int(v: Any, name: str) -> int:
    """A positive ``int`` (bool refused): ``TypeError`` for another type, ``ValueError`` below 1."""
    return _int_from(v, name, 1, "positive")


def non_negative(v: Any, name: str) -> float:
    """A finite non-negative number."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 <= v < float("inf"):
        raise ValueError(f"{name} must be a finite non-negative number; got {v!r}")
    return float(v)


def non_negative_int(v: Any, name: str) -> int:
    """A non-negative ``int`` (bool refused): ``TypeError`` for another type, ``ValueError`` below 0."""
    return _int_from(v, name, 0, "non-negative")


def _int_from(v: Any, name: str, least: int, kind: str) -> int:
    """An ``int`` in [least, 2**63) (bool refused), named ``kind`` in the messages."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be a {kind} int; got {type(v).__name__} {v!r}")
    if not least <= v < 2**63:
        raise ValueError(f"{name} must be a {kind} int (below 2**63); got {v!r}")
    return int(v)


def cosine_decay_args(init_value: Any, decay_steps: Any, alpha: Any, warmup: Any) -> tuple[float, int, float, int]:
    """:func:`puregmm.cosine_decay`'s settings, checked when the schedule is made (not per step):
    a finite non-negative peak and final fraction, a positive number of decay steps and a
    non-negative number of warm-up steps."""
    return (
        non_negative(init_value, "init_value"),
        positive_int(decay_steps, "decay_steps"),
        non_negative(alpha, "alpha"),
        non_negative_int(warmup, "warmup_steps"),
    )


# --- keys, masks, dtypes and devices of settings, paths ---------------------------------------------


def batch_keys(k: Any, b: int, name: str = "keys") -> Tensor:
    """[B] int64 keys, one per dataset (an int64 tensor, or a sequence of ints)."""
    if isinstance(k, Tensor):
        t = k
    elif isinstance(k, (list, tuple, np.ndarray)):
        try:
            t = torch.as_tensor(np.asarray(k))
        except (TypeError, ValueError, OverflowError) as err:
            raise TypeError(f"{name} must be {b} ints (an int64 tensor of shape ({b},)); got {k!r}") from err
    else:
        raise TypeError(f"{name} must be an int64 tensor of shape ({b},); got {type(k).__name__} {k!r}")
    if t.dtype not in _INTEGER_DTYPES or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (int64); got dtype {t.dtype}")
    if tuple(t.shape) != (b,):
        raise ValueError(f"{name} must have shape ({b},), one key per dataset; got {tuple(t.shape)}")
    return t.to(torch.int64)


def mask(m: Any, b: int, n: int, device: torch.device) -> Tensor:
    """A [B, N] bool mask (True for real rows) as a tensor on ``device``."""
    if isinstance(m, Tensor):
        t = m
    elif isinstance(m, (list, tuple, np.ndarray)):
        try:
            t = torch.as_tensor(np.asarray(m))
        except (TypeError, ValueError) as err:
            raise TypeError(f"mask must be a [B, N] bool tensor; got {type(m).__name__}") from err
    else:
        raise TypeError(f"mask must be a bool tensor of shape ({b}, {n}); got {type(m).__name__} {m!r}")
    if t.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor of shape ({b}, {n}); got dtype {t.dtype}")
    if tuple(t.shape) != (b, n):
        raise ValueError(f"mask must be a bool tensor of shape ({b}, {n}) to match xs [B, N, D]; got {tuple(t.shape)}")
    return t.to(device)


def float_dtype(dtype: Any, name: str = "dtype") -> torch.dtype | None:
    """``None`` or torch.float32/float64, the dtypes puregmm computes in."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (torch.float32 or torch.float64); got {dtype!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be torch.float32 or torch.float64; got {dtype}")
    return dtype


def device(dev: Any, name: str = "device") -> torch.device | None:
    """``None`` or a device torch knows (``"cpu"``, ``"cuda:0"``, a ``torch.device``)."""
    if dev is None or isinstance(dev, torch.device):
        return dev
    if not isinstance(dev, (str, int)) or isinstance(dev, bool):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda'; got {type(dev).__name__}")
    try:
        return torch.device(dev)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name} must name a device such as 'cpu' or 'cuda:0'; got {dev!r}") from err


def batches(it: Any, name: str = "source()") -> Any:
    """What a stream's callable returned: an iterable of batches."""
    if isinstance(it, (str, bytes)) or not hasattr(it, "__iter__"):
        raise TypeError(
            f"{name} must return an iterable of [n_i, D] batches (e.g. a generator); got {type(it).__name__}"
        )
    return it


def magnitude(t: Tensor, name: str, scale: float = 1.0) -> None:
    """Rows of a streamed fit whose squares fit the dtype: |x| < 2^(exponent range / 2 - 8)
    once divided by ``scale`` (chosen from the rows the fit was initialised from)."""
    limit = 2.0 ** (math.log2(torch.finfo(t.dtype).max) / 2 - 8)
    big = float(t.abs().amax()) if t.numel() else 0.0
    if not big < limit:
        raise ValueError(
            f"{name} holds values up to {big * scale:.3g} in {t.dtype}, beyond {limit * scale:.3g}: the streamed fit "
            "was scaled for the rows it was initialised from and their squares would overflow; fit in memory "
            "(pg.fit on a tensor standardises all rows) or pass init_params fitted on data like these rows"
        )


def kernel_weight(w: Any, x: Tensor, batch: tuple[int, ...] = (), name: str = "sample_weight") -> None:
    """Static check of a kernel's weights: ``None``, or a tensor of ``x``'s dtype with one weight
    per row of x [..., N, D]: [N], or [*batch, N] per batch entry (values are not read)."""
    if w is None:
        return
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be None or a tensor [N] of x's dtype; got {type(w).__name__}")
    same_dtype(w, x.dtype, name)
    n = x.shape[-2]
    if tuple(w.shape) not in ((n,), (*batch, n)):
        raise ValueError(
            f"{name} must have shape ({n},) or {(*batch, n)}, one weight per row of x; got {tuple(w.shape)}"
        )


def one_of(v: Any, options: tuple[str, ...], name: str) -> str:
    """One of ``options`` (lower-case names), matched case-insensitively; returned lower-case."""
    if not isinstance(v, str) or v.lower() not in options:
        raise ValueError(f"{name} must be one of {options}; got {v!r}")
    return v.lower()


def flag(v: Any, name: str) -> bool:
    """A ``bool`` (NumPy bools too)."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {type(v).__name__} {v!r}")
    return bool(v)


def path(p: Any, name: str = "path") -> Any:
    """A file path: ``str`` or ``os.PathLike``."""
    if not isinstance(p, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike); got {type(p).__name__} {p!r}")
    return p
