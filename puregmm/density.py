"""Log-densities of a mixture: the one implementation every fit and inference path uses.

    log p(x) = logsumexp_k [ log w_k + ½ log det P_k - ½ ‖(x - μ_k) U_k‖² - ½ D log 2π ]

with precision P_k = U_k U_kᵀ. The per-component term is written for one component and
``torch.func.vmap``-ed over components. Data are shifted by the (detached) centre of the means
before whitening: the result is mathematically unchanged, but float32 keeps its accuracy on
data with a large common offset.

These are kernels: they check shapes only, so they run under ``vmap``, ``grad`` and
``torch.compile(fullgraph=True)``. A row of ``x`` holding NaN gives NaN for that row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from puregmm import _validate
from puregmm.families import LOG_2PI
from puregmm.params import GMMParams


def component_log_prob(params: GMMParams, x: Tensor) -> Tensor:
    """Joint log-densities log w_k + log N(x_n | μ_k, Σ_k), shape [N, K] (unbatched params)."""
    spec, k, d = params.spec, params.n_components, params.dim
    center = params.means.detach().mean(0)
    xc = x - center  # [N, D]
    raw = spec.per_component_raw(params.scale, k)
    if not spec.learned:
        raw = raw.detach()

    def one(mean: Tensor, raw_k: Tensor) -> Tensor:  # one component -> [N]
        z = spec.whiten(raw_k, xc - (mean - center))  # [N, D]
        return spec.half_log_det_precision(raw_k, d) - 0.5 * z.square().sum(-1)

    log_dens = torch.func.vmap(one)(params.means, raw)  # [K, N]
    log_w = torch.log_softmax(params.logits, dim=-1)  # [K]
    return (log_dens + (log_w - 0.5 * d * LOG_2PI).unsqueeze(-1)).mT  # [N, K]


def log_prob(params: GMMParams, x: Tensor) -> Tensor:
    """log p(x_n) of the mixture, shape [..., N].

    Args:
        params: mixture params, optionally with leading batch dims ``B...``.
        x: data [N, D], or [B..., N, D] matching the params' batch dims.

    Returns:
        [B..., N] log-densities.

    Raises:
        ValueError: ``x`` is not [..., N, D] with the params' D.
    """
    _validate.data_shape(params, x)
    return _batched(params, x, lambda p, xs: torch.logsumexp(component_log_prob(p, xs), dim=-1))


def loss(params: GMMParams, x: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood, ``-log_prob(params, x).mean(-1)`` (weighted if given).

    With ``sample_weight`` [N] (non-negative, not all zero; not checked here) it is
    ``-(w · log p(x)).sum() / w.sum()``, which equals the plain loss on data with rows repeated
    by integer weights.
    """
    lp = log_prob(params, x)
    if sample_weight is None:
        return -lp.mean(-1)
    return -(lp * sample_weight).sum(-1) / sample_weight.sum(-1)


def _batched(params: GMMParams, x: Tensor, fn: Callable[[GMMParams, Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` to unbatched params, vmapping over the params' leading batch dims.

    ``x`` is shared when it is [N, D], else its leading dims must equal the params' batch dims.
    """
    batch = params.batch_shape
    x_batch = tuple(x.shape[:-2])
    if x_batch and x_batch != batch:
        raise ValueError(
            f"x has batch dims {x_batch} but the params have batch dims {batch}; "
            "pass x as [N, D] (shared) or [*batch, N, D]"
        )
    for _ in batch:
        fn = torch.func.vmap(fn, in_dims=(0, 0 if x_batch else None))
    return fn(params, x)
