"""Marginals, conditionals and moments of a mixture: Gaussian mixture regression.

A Gaussian mixture is closed under both operations (Bishop, PRML §2.3.1-2.3.2; Sung 2004,
*Gaussian mixture regression and classification*). Split x = (x_a, x_b), with b the dimensions
given. Component k's conditional keeps its family (the rules are methods of
:class:`puregmm.families.Family`, block "marginals and conditionals"):

    p(x_a | x_b) = Σ_k w'_k N(x_a | μ_k,a|b, Σ_k,a|b)
    Σ_k,a|b = (P_k,aa)⁻¹,   μ_k,a|b = μ_k,a - P_k,aa⁻¹ P_k,ab (x_b - μ_k,b)      (P_k = Σ_k⁻¹)
    log w'_k = log w_k + log N(x_b | μ_k,b, Σ_k,bb) - logsumexp_j(same for j)

The precision-block form needs only the a-rows of the precision factor U_k (P_k = U_k U_kᵀ), which
is what the params hold; the re-weighting runs through :func:`puregmm.component_log_prob` (the one
density) and a log-softmax, so it stays finite when every component is far from ``values``.

Design decisions:

* ``dims`` and the dimensions left are static Python data; ``values`` and the params may be
  traced, so :func:`marginal`, :func:`condition`, :func:`regress`, :func:`mixture_mean` and
  :func:`mixture_covariance` run under ``torch.func.vmap``/``grad``. Values are checked for NaN/Inf
  only eagerly (not under a transform or ``torch.compile``).
* One factorisation per component, not per value: the conditional covariance does not depend on
  the values, so a batch of values shares it (the result's scale leaf is an expanded view).
* :func:`impute` groups rows by their pattern of missing entries and loops over the distinct
  patterns in Python (a data-dependent loop: it is not a kernel and does not run under ``vmap``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate
from puregmm.density import component_log_prob
from puregmm.params import GMMParams, covariances, weights

__all__ = ["condition", "impute", "marginal", "mixture_covariance", "mixture_mean", "regress"]


# --- checks ------------------------------------------------------------------------------------


def _params(params: Any) -> GMMParams:
    """Checked params: the structure always, the values when eager (not under vmap/compile)."""
    _validate.params_structure(params)
    return _validate.params(params) if _validate.eager(params.means) else params


def _dims(params: GMMParams, dims: Any, *, keep_one: bool) -> list[int]:
    """``dims`` as a list of distinct ints in [0, D); with ``keep_one`` at least one dimension is left."""
    d = params.dim
    if isinstance(dims, (Tensor, np.ndarray)) and dims.ndim == 1 and not dims.dtype.is_floating_point:
        dims = dims.tolist()
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of ints (e.g. [0, 2]); got {type(dims).__name__} {dims!r}")
    out = []
    for i in dims:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"dims must hold ints; got {type(i).__name__} {i!r} in dims={list(dims)!r}")
        out.append(int(i))
    if not out:
        raise ValueError("dims must name at least one dimension; got an empty sequence")
    bad = [i for i in out if not 0 <= i < d]
    if bad:
        raise ValueError(f"dims must lie in [0, {d}) (the params have D={d}); got {out} ({bad} out of range)")
    if len(set(out)) != len(out):
        raise ValueError(f"dims must be distinct; got {out} (repeated: {sorted({i for i in out if out.count(i) > 1})})")
    if keep_one and len(out) == d:
        raise ValueError(f"dims must leave at least one of the D={d} dimensions to condition; got all of them: {out}")
    return out


def _index(dims: list[int], params: GMMParams) -> Tensor:
    return torch.tensor(dims, dtype=torch.int64, device=params.device)


def _values(params: GMMParams, values: Any, n_given: int) -> Tensor:
    """``values`` [..., n_given] in the params' dtype; NaN/Inf refused when eager."""
    if not isinstance(values, Tensor):
        values = _validate.as_float_tensor(values, "values", params.dtype).to(params.device)
    if not values.is_floating_point():
        raise TypeError(f"values must be floating point; got {values.dtype} (convert with .to(params.dtype))")
    _validate.same_dtype(values, params.dtype, "values")
    if values.dim() == 0 or values.shape[-1] != n_given:
        raise ValueError(
            f"values must have shape [..., {n_given}] (one entry per dim given); got shape {tuple(values.shape)}"
        )
    eager = _validate.eager(values)
    if eager and values.numel() and not bool(torch.isfinite(values).all()):
        first = tuple(torch.nonzero(~torch.isfinite(values))[0].tolist())
        raise ValueError(
            f"values must be finite; got {values[first].item()} at index {first} (impute NaN with pg.impute)"
        )
    return values.to(params.dtype)


# --- one mixture, rows of values ---------------------------------------------------------------


def _condition_rows(params: GMMParams, given: Tensor, rest: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """p(x_rest | x_given = values_n) of unbatched ``params`` for rows ``values`` [N, B]: log weights
    [N, K], means [N, K, A] and the scale leaf (shared by the rows)."""
    spec, k = params.spec, params.n_components
    mu_b = params.means.index_select(-1, given)  # [K, B]
    marg = GMMParams(params.logits, mu_b, spec.marginal_scale(params.scale, given), params.family)
    log_w = torch.log_softmax(component_log_prob(marg, values), dim=-1)  # [N, K]: w_k N(x_b | μ_kb, Σ_kbb), normalised
    raw, coef = spec.conditional_scale(params.scale, rest, given, k)  # coef [K, A, B]
    diff = values.unsqueeze(-2) - mu_b  # [N, K, B]
    means = params.means.index_select(-1, rest) + torch.einsum("kab,nkb->nka", coef, diff)  # [N, K, A]
    return log_w, means, raw


def _moments(w: Tensor, means: Tensor, cov: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Mean Σ_k w_k μ_k [..., D] and, given component covariances [..., K, D, D], the covariance
    Σ_k w_k (Σ_k + (μ_k - m)(μ_k - m)ᵀ) (law of total variance, about the mean: no cancellation)."""
    mean = torch.einsum("...k,...kd->...d", w, means)
    if cov is None:
        return mean, None
    dev = means - mean.unsqueeze(-2)  # [..., K, D]
    spread = torch.einsum("...k,...ki,...kj->...ij", w, dev, dev)
    return mean, torch.einsum("...k,...kij->...ij", w, cov) + spread


def _regress_rows(params: GMMParams, given: Tensor, rest: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    log_w, means, raw = _condition_rows(params, given, rest, values)
    cov = params.spec.covariances(raw, params.n_components, len(rest))  # [K, A, A], once for all rows
    mean, total = _moments(torch.exp(log_w), means, cov.expand((values.shape[0], *cov.shape)))
    assert total is not None
    return mean, total


def _over_values(params: GMMParams, values: Tensor, fn: Callable[[GMMParams, Tensor], Any]) -> tuple[Any, tuple]:
    """``fn(unbatched params, rows [N, B])`` over the broadcast of ``values``' leading dims with the
    params' batch dims (aligned from the right, as in broadcasting). Leading dims of ``values``
    beyond the params' batch dims become rows of one call, so the params are factorised once per
    mixture, not once per value. Returns ``fn``'s outputs with leaves [R, N, ...] (or [R, ...] for
    outputs without rows) and the result's batch shape, R the flattened params batch."""
    nb, m = len(params.batch_shape), values.shape[-1]
    lead = tuple(values.shape[:-1])
    extra, aligned = lead[: max(len(lead) - nb, 0)], lead[max(len(lead) - nb, 0) :]
    try:
        rb = tuple(torch.broadcast_shapes(aligned, params.batch_shape))
    except RuntimeError as err:
        raise ValueError(
            f"values' leading dims {lead} do not broadcast with the params' batch dims {params.batch_shape}"
            " (they align from the right)"
        ) from err
    nr, ne = math.prod(rb), math.prod(extra)
    flat = pytree.tree_map(lambda t: t.expand(rb + t.shape[nb:]).reshape((nr, *t.shape[nb:])), params)
    rows = values.expand((*extra, *rb, m)).reshape(ne, nr, m).transpose(0, 1)  # [R, N, B]
    if nb == 0:  # one mixture: no vmap (the density keeps its in-place workspace)
        out = pytree.tree_map(lambda t: t.unsqueeze(0), fn(pytree.tree_map(lambda t: t[0], flat), rows[0]))
    else:
        out = torch.func.vmap(fn)(flat, rows)
    return out, (extra, rb)


def _unflatten_rows(t: Tensor, shape: tuple) -> Tensor:
    """[R, N, ...] -> [extra..., rb..., ...]."""
    extra, rb = shape
    return t.transpose(0, 1).reshape((*extra, *rb, *t.shape[2:]))


# --- public --------------------------------------------------------------------------------------


def marginal(params: GMMParams, dims: Sequence[int]) -> GMMParams:
    """The mixture over the dimensions ``dims`` (in the order given), the others integrated out.

        p(x_d) = Σ_k w_k N(x_d | μ_k,d, Σ_k,dd)

    The family is kept: a diagonal, isotropic, tied, shared or constant mixture's marginal is one
    of the same kind (the weights are unchanged).

    Args:
        params: mixture params, any batch dims.
        dims: distinct ints in [0, D) (a permutation of all D is allowed: it reorders).

    Returns:
        :class:`GMMParams` with D' = len(dims), the same batch dims, K and family.

    Raises:
        TypeError: ``params`` not GMMParams, ``dims`` not a sequence of ints.
        ValueError: ``dims`` empty, out of range or repeated.

    >>> import torch, puregmm as pg
    >>> cov = torch.tensor([[[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]]])
    >>> p = pg.from_moments(torch.ones(1), torch.tensor([[1.0, 2.0, 3.0]]), cov)
    >>> m = pg.marginal(p, [2, 0])
    >>> m.means, pg.covariances(m)
    (tensor([[3., 1.]]), tensor([[[3.0000, 0.0000],
             [0.0000, 2.0000]]]))
    """
    params = _params(params)
    idx = _index(_dims(params, dims, keep_one=False), params)

    def one(p: GMMParams) -> Tensor:
        return p.spec.marginal_scale(p.scale, idx)

    for _ in params.batch_shape:
        one = torch.func.vmap(one)
    return GMMParams(params.logits, params.means.index_select(-1, idx), one(params), params.family)


def condition(params: GMMParams, dims: Sequence[int], values: Any) -> GMMParams:
    """The conditional mixture p(x_rest | x_dims = values) over the other dimensions, in increasing order.

        Σ_k,a|b = (P_k,aa)⁻¹,  μ_k,a|b = μ_k,a - P_k,aa⁻¹ P_k,ab (x_b - μ_k,b),
        w'_k ∝ w_k N(x_b | μ_k,b, Σ_k,bb)   (normalised in log space)

    with P_k = Σ_k⁻¹, a the remaining and b the given dimensions. Full → full, tied → tied, and
    diagonal/isotropic/shared/constant keep their family (their dimensions are independent within a
    component, so only the weights move). The conditional density is ``pg.log_prob`` of the result.

    ``values``' leading dims broadcast with the params' batch dims (aligned from the right) and
    become the result's batch dims: unbatched params and values [N, B] give leaves [N, K, ...].

    Args:
        params: mixture params, any batch dims.
        dims: the given dimensions, distinct ints in [0, D), fewer than D.
        values: [..., len(dims)], the values of x at ``dims`` in that order (array-likes are
            converted to the params' dtype). Checked finite when eager.

    Returns:
        :class:`GMMParams` over D - len(dims) dimensions with batch dims broadcast(values' leading
        dims, params' batch dims); the scale leaf is an expanded view (one factor per mixture).

    Raises:
        TypeError: ``params`` not GMMParams, ``dims`` not ints, ``values`` not real numbers.
        ValueError: ``dims`` empty, out of range, repeated or all D; ``values`` of the wrong trailing
            shape, not broadcastable, or not finite.

    >>> import torch, puregmm as pg
    >>> cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]]).expand(2, 2, 2)
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0, 0.0], [8.0, 8.0]]), cov)
    >>> c = pg.condition(p, [0], torch.tensor([[1.0], [7.0]]))  # two values: batch [2]
    >>> c.means  # μ_a|b = μ_a + 0.8 (x_b - μ_b)
    tensor([[[0.8000],
             [2.4000]],
    <BLANKLINE>
            [[5.6000],
             [7.2000]]])
    >>> pg.weights(c).round(decimals=4), pg.covariances(c)[0, 0]  # Σ_a|b = 1 - 0.8²
    (tensor([[1., 0.],
            [0., 1.]]), tensor([[0.3600]]))
    """
    params = _params(params)
    given = _dims(params, dims, keep_one=True)
    rest = [i for i in range(params.dim) if i not in set(given)]
    g, r = _index(given, params), _index(rest, params)
    values = _values(params, values, len(given))
    (log_w, means, raw), shape = _over_values(params, values, lambda p, v: _condition_rows(p, g, r, v))
    extra, rb = shape
    raw = raw.reshape((*rb, *raw.shape[1:])).expand((*extra, *rb, *raw.shape[1:]))
    return GMMParams(_unflatten_rows(log_w, shape), _unflatten_rows(means, shape), raw, params.family)


def mixture_mean(params: GMMParams) -> Tensor:
    """The mean of the mixture, E[x] = Σ_k w_k μ_k.

    Args:
        params: mixture params, any batch dims.

    Returns:
        [..., D].

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [4.0]]), torch.ones(2, 1, 1))
    >>> pg.mixture_mean(p)
    tensor([2.])
    """
    params = _params(params)
    mean, _ = _moments(weights(params), params.means, None)
    return mean


def mixture_covariance(params: GMMParams) -> Tensor:
    """The covariance of the mixture, by the law of total variance:

        Cov[x] = Σ_k w_k Σ_k + Σ_k w_k (μ_k - m)(μ_k - m)ᵀ,   m = Σ_k w_k μ_k

    Args:
        params: mixture params, any batch dims.

    Returns:
        [..., D, D], symmetric positive definite.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [4.0]]), torch.ones(2, 1, 1))
    >>> pg.mixture_covariance(p)  # 1 + ½·2² + ½·2²
    tensor([[5.]])
    """
    params = _params(params)
    _, cov = _moments(weights(params), params.means, covariances(params))
    assert cov is not None
    return cov


def regress(params: GMMParams, dims: Sequence[int], values: Any) -> tuple[Tensor, Tensor]:
    """Gaussian mixture regression: the mean and covariance of p(x_rest | x_dims = values).

        E[x_a | x_b] = Σ_k w'_k μ_k,a|b,
        Cov[x_a | x_b] = Σ_k w'_k (Σ_k,a|b + (μ_k,a|b - E)(μ_k,a|b - E)ᵀ)

    with the conditional components and weights of :func:`condition` (Sung 2004). Where the
    conditional is multimodal the mean can fall between modes: ``pg.log_prob(pg.condition(...), y)``
    is the density itself.

    Args:
        params: mixture params, any batch dims.
        dims: the given (input) dimensions, distinct ints in [0, D), fewer than D.
        values: [..., len(dims)] inputs (broadcast as in :func:`condition`).

    Returns:
        (mean [..., A], covariance [..., A, A]) over the A = D - len(dims) other dimensions, in
        increasing order, with the batch dims of :func:`condition`.

    Raises:
        TypeError, ValueError: as :func:`condition`.

    >>> import torch, puregmm as pg
    >>> cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]]).expand(2, 2, 2)
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0, 0.0], [8.0, 8.0]]), cov)
    >>> mean, var = pg.regress(p, [0], torch.tensor([[1.0], [4.0]]))
    >>> mean, var.squeeze(-1)  # at 4 both weigh ½: component means 3.2 and 4.8, variance 0.36 + 0.8²
    (tensor([[0.8000],
            [4.0000]]), tensor([[0.3600],
            [1.0000]]))
    """
    params = _params(params)
    given = _dims(params, dims, keep_one=True)
    rest = [i for i in range(params.dim) if i not in set(given)]
    g, r = _index(given, params), _index(rest, params)
    values = _values(params, values, len(given))
    (mean, cov), shape = _over_values(params, values, lambda p, v: _regress_rows(p, g, r, v))
    return _unflatten_rows(mean, shape), _unflatten_rows(cov, shape)


def impute(params: GMMParams, x: Any) -> Tensor:
    """``x`` with every NaN entry replaced by its conditional mean E[x_missing | x_observed].

    Each row is conditioned on its own observed entries (:func:`regress`'s mean); a row with
    every entry missing gets the mixture mean, a row without NaN is returned unchanged. Rows are
    grouped by their pattern of missing entries and each distinct pattern is one batched call, so
    the cost grows with the number of patterns, not of rows. The missing entries are assumed
    missing at random (the fit need not have seen them: a mixture fitted on complete rows works).

    Args:
        params: unbatched mixture params.
        x: data [N, D] with NaN marking missing entries (array-likes are converted to the params'
            dtype); other entries must be finite.

    Returns:
        [N, D] in the params' dtype: ``x`` with its NaN entries filled (differentiable in the
        params and the observed entries; not ``vmap``-able, the patterns are data).

    Raises:
        TypeError: ``params`` not GMMParams, ``x`` not real numbers.
        ValueError: batched params, ``x`` not [N, D] with the params' D, or ``x`` holding ±Inf.

    >>> import torch, puregmm as pg
    >>> cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]]).expand(2, 2, 2)
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0, 0.0], [8.0, 8.0]]), cov)
    >>> nan = float("nan")
    >>> pg.impute(p, torch.tensor([[1.0, nan], [nan, 7.0], [nan, nan], [1.0, 2.0]]))
    tensor([[1.0000, 0.8000],
            [7.2000, 7.0000],
            [4.0000, 4.0000],
            [1.0000, 2.0000]])
    """
    params = _params(params)
    if params.batch_shape:
        raise ValueError(f"impute needs unbatched params; got batch dims {params.batch_shape}")
    x = _validate.as_float_tensor(x, "x", params.dtype).to(params.device) if not isinstance(x, Tensor) else x
    _validate.data_shape(params, x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, {params.dim}]; got shape {tuple(x.shape)}")
    x = x.to(params.dtype)
    missing = torch.isnan(x)  # [N, D]
    if bool(torch.isinf(x).any()):
        first = tuple(torch.nonzero(torch.isinf(x))[0].tolist())
        raise ValueError(f"x must be finite or NaN (missing); got {x[first].item()} at index {first}")
    out = x.clone()
    patterns, which = torch.unique(missing, dim=0, return_inverse=True)  # [P, D], [N]
    for j, pattern in enumerate(patterns.tolist()):
        if not any(pattern):
            continue  # complete rows stay as they are
        rows = torch.nonzero(which == j).squeeze(-1)  # [n_j]
        miss = _index([i for i, m in enumerate(pattern) if m], params)
        seen = [i for i, m in enumerate(pattern) if not m]
        if seen:
            g = _index(seen, params)
            log_w, means, _ = _condition_rows(params, g, miss, x[rows].index_select(-1, g))
            fill, _ = _moments(torch.exp(log_w), means, None)  # [n_j, A]
        else:
            fill = mixture_mean(params).expand(len(rows), params.dim)
        out.index_put_((rows.unsqueeze(-1), miss), fill)  # in place on the copy: O(N·D) over all patterns
    return out
