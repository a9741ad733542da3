"""Bootstrap replicates of a fit, all fitted at once by :func:`puregmm.fit_batched`.

Replicate b has its own key k_b = ``fold_in(key, b)``. Its resample draws row n as
``index(k_b, -1, n, n=N)`` (counter -1, apart from the non-negative counters the fit itself
uses with k_b), and it is fitted with ``key=k_b``; so replicate b equals
``fit(x[idx[b]], ..., key=k_b)`` with ``idx, keys = resample(N, B, key)``, whatever B is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from puregmm import _validate, keys
from puregmm.fit import FitResult, fit_batched

_RESAMPLE_COUNTER = -1
_RESERVED = ("keys", "key", "mask", "init_params", "sample_weight")


def resample(n: int, n_replicates: int, key: Any = 0) -> tuple[Tensor, Tensor]:
    """Row indices [B, N] (drawn with replacement, uniform) and keys [B] of B bootstrap replicates.

    >>> idx, ks = resample(5, 3, key=0)
    >>> idx.shape, ks.shape, bool((idx >= 0).all() and (idx < 5).all())
    (torch.Size([3, 5]), torch.Size([3]), True)
    """
    rep_keys = keys.hash_words(_validate.key(key), torch.arange(n_replicates))  # [B]: fold_in(key, b)
    idx = keys.index(rep_keys.unsqueeze(-1), _RESAMPLE_COUNTER, torch.arange(n), n=n)  # [B, N]
    return idx, rep_keys


def bootstrap(
    x: Any,
    n_replicates: int,
    n_components: int,
    family: str = "full",
    *,
    method: str = "em",
    key: Any = 0,
    **fit_kwargs: Any,
) -> FitResult:
    """Fit ``n_replicates`` (B) bootstrap resamples of ``x`` [N, D] in one batched fit.

    Args:
        x: [N, D] data.
        n_replicates: B, the number of replicates.
        n_components: K.
        family: one of :data:`puregmm.FAMILIES`.
        method: ``"em"`` (default) or ``"gd"``.
        key: int or 0-d int64 tensor; replicate b uses ``fold_in(key, b)`` (module docstring).
        **fit_kwargs: passed to :func:`puregmm.fit_batched` (``max_steps``, ``tol``,
            ``reg_covar``, ``init_method``, ...), except ``keys``, ``mask``, ``init_params``.

    Returns:
        the batched :class:`puregmm.FitResult` of :func:`puregmm.fit_batched`: params leaves
        [B, ...], ``loss`` [B] (each on its own resample), ``n_steps``/``converged`` [B].
        Percentiles of any function of ``result.params`` over the leading axis give bootstrap
        intervals; components are not matched across replicates (label switching is yours).

    Raises:
        ValueError: bad data, B < 1, K > N, or a reserved keyword in ``fit_kwargs``.

    >>> import torch, puregmm as pg
    >>> x = torch.randn(200, 2, dtype=torch.float64)
    >>> r = pg.bootstrap(x, 50, 1, "diagonal", key=3)
    >>> pg.means(r.params).shape, bool(pg.means(r.params).std(0).max() < 0.2)
    (torch.Size([50, 1, 2]), True)
    """
    data = _validate.data(x, "x")
    b = _validate.positive_int(n_replicates, "n_replicates")
    bad = sorted(set(fit_kwargs) & set(_RESERVED))
    if bad:
        raise ValueError(f"bootstrap sets {bad} itself (one key and one resample per replicate); drop them")
    idx, rep_keys = resample(data.shape[0], b, key)
    xs = data[idx.to(data.device)]  # [B, N, D]
    return fit_batched(xs, n_components, family, method=method, keys=rep_keys, **fit_kwargs)
