"""Online (stepwise) EM: one pass over a stream, each batch seen once (Cappé & Moulines 2009).

For batch t with per-row statistics s̄_t = Stats_t / Σ_t ω at the current params,

    ŝ_t = (1 - γ_t) ŝ_{t-1} + γ_t s̄_t,   γ_t = (t + 2)^-κ,  κ ∈ (0.5, 1],   θ_t = M(ŝ_t),

with ŝ_{-1} the statistics the initial params would give (weights, zero, w_k Σ_k), so the first
step blends instead of forgetting them. Σ γ_t = ∞ and Σ γ_t² < ∞ make ŝ converge to a
stationary point of the expected log-likelihood as the stream goes on. Because Stats are
centred at the means, ŝ is re-centred exactly before each blend (X += n δ,
S += δXᵀ + Xδᵀ + nδδᵀ with δ = c_old - c_new). Rows should come in random order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from puregmm.em import Stats, sufficient_stats
from puregmm.mstep import maximise
from puregmm.params import GMMParams, covariances


class OnlineState(NamedTuple):
    """Online EM's carried state (a row of :data:`puregmm.methods.METHODS`; leaves are tensors).

    Attributes:
        params: current params.
        stats: ŝ, the running per-row statistics (``weight_sum`` = 1), about ``centres``.
        centres: [K, D] the centres of ``stats``.
        step: 0-d int64, updates taken.
        loss: the mean NLL of the last batch, taken before its update (NaN before any).
        n_resets: 0-d int64, components the M-steps re-seeded or repaired.
        key: the run's key (online EM draws nothing; kept for the loop's state).
    """

    params: GMMParams
    stats: Stats
    centres: Tensor
    step: Tensor
    loss: Tensor
    n_resets: Tensor
    key: Tensor


def online_state(params: GMMParams, key: Tensor) -> OnlineState:
    """The state before the first batch: ŝ = the statistics ``params`` would give."""
    zero = torch.zeros((), dtype=torch.int64, device=params.device)
    nan = torch.full((), float("nan"), dtype=params.dtype, device=params.device)
    return OnlineState(params, expected_stats(params), params.means.detach(), zero, nan, zero, key)


def expected_stats(params: GMMParams) -> Stats:
    """Per-row :class:`puregmm.Stats` that ``params`` themselves would give, about their means:
    n_k = w_k, X_k = 0, S_k = w_k Σ_k (diagonal / trace for the smaller families), so that
    ``m_step(expected_stats(p), p)`` gives back ``p`` (plus ``reg_covar``)."""
    k, d = params.n_components, params.dim
    w = torch.softmax(params.logits, -1)  # [K]
    xx = params.spec.weighted_second_moments(w, covariances(params))
    zero = torch.zeros((), dtype=params.dtype, device=params.device)
    return Stats(
        w,
        torch.zeros_like(params.means),
        xx,
        zero,
        torch.ones_like(zero),
        torch.full((k,), float("inf"), dtype=params.dtype, device=params.device),
        params.means.new_zeros(k, d),
    )


def recentre(stats: Stats, old: Tensor, new: Tensor) -> Stats:
    """``stats`` taken about centres ``old`` [K, D], re-expressed about ``new`` [K, D] (exact):
    with δ = old - new, X' = X + nδ and S' = S + δXᵀ + Xδᵀ + nδδᵀ (its diagonal, its trace)."""
    delta = old - new  # [K, D]
    n = stats.resp_sum.unsqueeze(-1)  # [K, 1]
    x, xx = stats.x_sum, stats.xx_sum
    if xx.dim() == 3:
        outer = delta.unsqueeze(-1) * x.unsqueeze(-2)  # [K, D, D] δXᵀ
        xx = xx + outer + outer.mT + n.unsqueeze(-1) * delta.unsqueeze(-1) * delta.unsqueeze(-2)
    elif xx.dim() == 2:
        xx = xx + 2 * delta * x + n * delta.square()
    else:
        xx = xx + 2 * (delta * x).sum(-1) + stats.resp_sum * delta.square().sum(-1)
    return stats._replace(x_sum=x + n * delta, xx_sum=xx)


def online_update(state: OnlineState, batch: Tensor, kappa: float, reg_covar: float | Tensor) -> OnlineState:
    """One stepwise-EM update on ``batch`` [n, D] (see the module docstring for the equations);
    the new state's ``loss`` is the batch's mean NLL before the update."""
    p = state.params
    s = sufficient_stats(p, batch)  # about p.means
    gamma = (state.step + 2.0) ** -kappa
    prev = recentre(state.stats, state.centres, p.means.detach())
    inv = 1.0 / s.weight_sum
    blended = Stats(
        (1 - gamma) * prev.resp_sum + gamma * inv * s.resp_sum,
        (1 - gamma) * prev.x_sum + gamma * inv * s.x_sum,
        (1 - gamma) * prev.xx_sum + gamma * inv * s.xx_sum,
        (1 - gamma) * prev.log_lik_sum + gamma * inv * s.log_lik_sum,
        torch.ones_like(s.weight_sum),
        s.worst_log_lik,
        s.worst_x,
    )
    new, n_resets = maximise(blended, p, reg_covar, return_info=True)
    loss = -s.log_lik_sum * inv
    return OnlineState(new, blended, p.means.detach(), state.step + 1, loss, state.n_resets + n_resets, state.key)
