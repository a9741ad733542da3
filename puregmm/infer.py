"""Inference on fitted params, with scikit-learn's names and definitions.

``score_samples``/``score``/``predict_proba``/``predict`` are thin wrappers over
:func:`puregmm.component_log_prob` (the one density implementation); ``bic``/``aic`` follow
``sklearn/mixture/_gaussian_mixture.py`` (with ``sample_weight`` the sample size is Σω, as if
rows were repeated); ``sample`` draws labels then points with counter-based randomness from
:mod:`puregmm.keys`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from puregmm import _validate, keys
from puregmm import missing as _missing
from puregmm.density import component_log_prob, log_prob
from puregmm.params import GMMParams, precision_cholesky, weights


def _data(params: GMMParams, x: Any, at_infinity: bool = True) -> Tensor:
    """Checked params and ``x``: array-likes are converted to the params' dtype/device, a tensor
    must match them (:func:`puregmm._validate.data_shape`); NaN is refused, and so are rows at
    infinity unless ``at_infinity`` (their log-density is -inf: no component is most probable)."""
    _validate.params(params)
    if not isinstance(x, Tensor):
        x = _validate.as_float_tensor(x, "x", params.dtype).to(params.device)
    _validate.data_shape(params, x)
    rows = x.reshape(-1, x.shape[-1])
    _validate.finite(torch.where(torch.isinf(rows), 0.0, rows) if at_infinity else rows, "x")
    return x


def _per_batch(params: GMMParams, x: Tensor, fn: Callable[[GMMParams, Tensor], Tensor]) -> Tensor:
    """``fn`` on unbatched params, vmapped over the params' batch dims (x shared or batched)."""
    x_batched = x.dim() > 2
    for _ in params.batch_shape:
        fn = torch.func.vmap(fn, in_dims=(0, 0 if x_batched else None))
    return fn(params, x)


def _joint(params: GMMParams, x: Any) -> Tensor:
    """log w_k + log N(x_n | μ_k, Σ_k) [..., N, K] of checked rows; a row whose every component
    log-density is -inf (so far out that its squared distances overflow) has no most probable
    component, and is refused rather than given NaN responsibilities."""
    joint = _per_batch(params, _data(params, x, at_infinity=False), component_log_prob)
    lost = torch.isneginf(joint).all(-1).reshape(-1)  # [B·N]
    if bool(lost.any()):
        rows = torch.nonzero(lost).flatten()[:5].tolist()
        raise ValueError(
            f"x rows {rows} are so far from every component that their densities underflow to 0 "
            "(log-density -inf): no component is most probable there; check their scale or drop them"
        )
    return joint


def score_samples(params: GMMParams, x: Any, missing: str = "raise") -> Tensor:
    """log p(x_n) [..., N]; the same as :func:`puregmm.log_prob`.

    Args:
        params: mixture params, optionally batched [B..., ...].
        x: data [N, D] or [B..., N, D] (array-likes are converted to the params' dtype).
        missing: ``"raise"`` (default: a ValueError naming the first NaN entry) or ``"marginalize"``
            (NaN entries missing at random, integrated out: :mod:`puregmm.missing`).

    Returns:
        the log-density of each row, [N] (or [B..., N]); with ``"marginalize"`` the density of
        the row's observed entries (0 for a row with nothing observed).

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> pg.score_samples(p, [[0.0], [2.4], [5.0]])
    tensor([-1.6121, -4.0180, -1.6121])
    >>> pg.score_samples(p, [[0.0], [float("nan")]], missing="marginalize")
    tensor([-1.6121,  0.0000])
    """
    x, observed = _missing.split(x, missing, "x", params)
    return log_prob(params, _data(params, x), observed)


def _weights(params: GMMParams, x: Tensor, sample_weight: Any) -> Tensor | None:
    if sample_weight is None:
        return None
    return _validate.sample_weight(sample_weight, x.shape[-2], x.dtype, x.device)


def _log_lik_and_count(params: GMMParams, x: Any, sample_weight: Any, missing: str) -> tuple[Tensor, Tensor]:
    """Σ ω log p(x) [...] and Σ ω (or N; rows with missing entries count as rows)."""
    x, observed = _missing.split(x, missing, "x", params)
    x = _data(params, x)
    w = _weights(params, x, sample_weight)
    lp = log_prob(params, x, observed)  # [..., N]
    if w is None:
        return lp.sum(-1), torch.tensor(float(x.shape[-2]), dtype=lp.dtype)
    return torch.where(w > 0, lp * w, 0.0).sum(-1), w.sum()  # a zero weight drops a row, even one at infinity


def score(params: GMMParams, x: Any, sample_weight: Any = None, missing: str = "raise") -> Tensor:
    """Mean (weighted) log-likelihood, 0-d (or [B...] for batched params) = -loss.

    Args:
        params: mixture params.
        x: data [N, D].
        sample_weight: optional [N] non-negative weights, not all zero (checked).
        missing: ``"raise"`` (default: a ValueError naming the first NaN entry) or ``"marginalize"``
            (NaN entries missing at random, integrated out: :mod:`puregmm.missing`).

    Returns:
        Σ ω log p(x_n) / Σ ω: 0-d, or [B...] for batched params.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> pg.score(p, [[0.0], [2.4], [5.0]])
    tensor(-2.4141)
    """
    total, count = _log_lik_and_count(params, x, sample_weight, missing)
    return total / count


def predict_proba(params: GMMParams, x: Any, missing: str = "raise") -> Tensor:
    """Responsibilities p(k | x_n) [..., N, K] = softmax_k(log w_k + log N(x_n | μ_k, Σ_k)).

    Args:
        params: mixture params, optionally batched [B..., ...].
        x: data [N, D] or [B..., N, D].
        missing: ``"raise"`` (default: a ValueError naming the first NaN entry) or ``"marginalize"``
            (NaN entries missing at random, integrated out: :mod:`puregmm.missing`).

    Returns:
        [N, K] (or [B..., N, K]), each row summing to 1 (with ``"marginalize"``, given the row's
        observed entries: the weights for a row with nothing observed).

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> pg.predict_proba(p, [[0.0], [2.4]]).round(decimals=3)
    tensor([[1.0000, 0.0000],
            [0.6220, 0.3780]])
    """
    x, observed = _missing.split(x, missing, "x", params)
    if observed is not None:
        return torch.softmax(_missing.joint(params, x, observed), -1)
    return torch.softmax(_joint(params, x), -1)


def predict(params: GMMParams, x: Any, missing: str = "raise") -> Tensor:
    """Most probable component [..., N] (int64), argmax_k of :func:`predict_proba`.

    Args:
        params: mixture params, optionally batched [B..., ...].
        x: data [N, D] or [B..., N, D].
        missing: ``"raise"`` (default: a ValueError naming the first NaN entry) or ``"marginalize"``
            (NaN entries missing at random, integrated out: :mod:`puregmm.missing`).

    Returns:
        component indices [N] (or [B..., N]), int64.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> pg.predict(p, [[0.0], [2.4], [5.0]])
    tensor([0, 0, 1])
    """
    x, observed = _missing.split(x, missing, "x", params)
    if observed is not None:
        return _missing.joint(params, x, observed).argmax(-1)
    return _joint(params, x).argmax(-1)


def n_parameters(params: GMMParams) -> Any:
    """Free parameters: (K - 1) weights + K·D means + the family's covariance parameters
    (full K·D(D+1)/2, tied D(D+1)/2, diagonal K·D, isotropic K, shared 1, constant 0).

    K counts live components only (masked ones, logit -inf, see :func:`puregmm.pad_components`).

    Args:
        params: mixture params, optionally batched.

    Returns:
        an int for unbatched params; an int64 tensor of the batch shape for batched ones.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.full((3,), 1 / 3), torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2))
    >>> pg.n_parameters(p)  # 2 weights + 6 means + 3 · 3 covariance entries
    17
    """
    _validate.params_structure(params)
    d, spec = params.dim, params.spec
    live = (params.logits != -math.inf).sum(-1)  # [B...]
    counts = [spec.n_scale_parameters(k, d) + k * d + k - 1 for k in range(params.n_components + 1)]
    table = torch.tensor(counts, dtype=torch.int64, device=live.device)
    per = table[live]
    return int(per) if not params.batch_shape else per


def bic(params: GMMParams, x: Any, sample_weight: Any = None, missing: str = "raise") -> Tensor:
    """Bayesian information criterion, -2 Σ ω log p(x) + p·log(Σ ω) (lower is better).

    Without weights Σ ω = N: scikit-learn's ``bic``. (Schwarz 1978.) With
    ``missing="marginalize"``, log p is each row's observed-data density and rows count as N.

    Args:
        params: mixture params, optionally batched (p counts live components per batch entry).
        x: data [N, D] (or [B..., N, D]).
        sample_weight: optional [N] non-negative weights, not all zero (checked).
        missing: ``"raise"`` (default: a ValueError naming the first NaN entry) or ``"marginalize"``
            (NaN entries missing at random, integrated out: :mod:`puregmm.missing`).

    Returns:
        0-d, or [B...] for batched params.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> x = torch.tensor([[0.0], [2.4], [5.0]])
    >>> pg.bic(p, x), -2 * 3 * pg.score(p, x) + 5 * torch.log(torch.tensor(3.0))
    (tensor(19.9774), tensor(19.9774))
    """
    total, count = _log_lik_and_count(params, x, sample_weight, missing)
    return -2.0 * total + n_parameters(params) * torch.log(count)


def aic(params: GMMParams, x: Any, sample_weight: Any = None, missing: str = "raise") -> Tensor:
    """Akaike information criterion, -2 Σ ω log p(x) + 2p (lower is better; Akaike 1974).

    Args:
        params: mixture params, optionally batched.
        x: data [N, D] (or [B..., N, D]).
        sample_weight: optional [N] non-negative weights, not all zero (checked).
        missing: ``"raise"`` (default: a ValueError naming the first NaN entry) or ``"marginalize"``
            (NaN entries missing at random, integrated out: :mod:`puregmm.missing`).

    Returns:
        0-d, or [B...] for batched params.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> pg.aic(p, [[0.0], [2.4], [5.0]])  # p = 5 free parameters
    tensor(24.4843)
    """
    total, _ = _log_lik_and_count(params, x, sample_weight, missing)
    return -2.0 * total + 2.0 * n_parameters(params)


def sample(params: GMMParams, n: int, *, key: Any) -> tuple[Tensor, Tensor]:
    """``n`` draws from the mixture: labels z_i ~ Categorical(w), then x_i = μ_z + U_z⁻ᵀ ε_i.

    Rows come in random order (labels are i.i.d., not grouped). Labels use the inverse CDF of
    the weights at u_i = uniform(key, 0, i); ε_i [D] are standard normals by Box–Muller from
    uniform(key, 1, i, j) and uniform(key, 2, i, j) (32-bit uniforms, so |ε| ≤ 6.7).
    Same key, same output. The params must be unbatched.

    Args:
        params: unbatched mixture params.
        n: a positive int, the number of draws.
        key: int or 0-d int64 tensor.

    Returns:
        x [n, D] in the params' dtype and labels [n] int64.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0], [5.0]]), torch.ones(2, 1, 1))
    >>> x, labels = pg.sample(p, 4, key=0)
    >>> x.shape, labels.dtype
    (torch.Size([4, 1]), torch.int64)
    >>> pg.n_parameters(p)  # 1 weight + 2 means + 2 variances
    5
    """
    _validate.params(params)
    if params.batch_shape:
        raise ValueError(f"sample needs unbatched params; got batch dims {params.batch_shape}")
    n = _validate.positive_int(n, "n (the number of samples)")
    key = _validate.key(key)
    k, d, dev, dt = params.n_components, params.dim, params.device, params.dtype
    rows = torch.arange(n, device=dev)
    u = keys.uniform(key, 0, rows).to(dev)  # [n] in [0, 1)
    cdf = torch.cumsum(weights(params).detach().to(torch.float64), 0)  # [K]
    labels = torch.searchsorted(cdf / cdf[-1], u, right=True).clamp_max(k - 1)  # [n]
    cols = torch.arange(d, device=dev)
    u1 = 1.0 - keys.uniform(key, 1, rows[:, None], cols).to(dev)  # (0, 1]
    u2 = keys.uniform(key, 2, rows[:, None], cols).to(dev)
    eps = (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dt)  # [n, D]
    u_fac = precision_cholesky(params).detach()  # [K, D, D], precision = U Uᵀ
    eye = torch.eye(d, dtype=dt, device=dev).expand_as(u_fac)
    a = torch.linalg.solve_triangular(u_fac, eye, upper=True)  # U⁻¹: x - μ = ε U⁻¹ (rows)
    x = params.means.detach().index_select(0, labels)  # [n, D]
    for j in range(k):  # static loop; one [n, D] product per component, no [n, D, D] gather
        x = x + torch.where((labels == j).unsqueeze(-1), eps @ a[j], torch.zeros_like(eps))
    return x, labels
