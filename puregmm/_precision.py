"""The precision of a plain eager E-step, decided per call from the error bound: the dtype of
T and its two GEMMs (float32 data: float32 where that loses nothing the data had, else
float64), the components whitened in float64 instead (:mod:`puregmm._moments`, "Precision"),
and the float64 accumulation of float32 GEMMs.

Accuracy argument. The natural form rounds ⟨η_k, T(x)⟩ by eps·Q_k, Q_k = |d_k|ᵀ|P_k||d_k| +
σ_kᵀ|P_k|σ_k (:func:`puregmm._moments.rounding_bound`; linear in eps), and the moments by the
same relative amount once shifted from the centre g to μ_k. A float32 row is itself known
only to eps32·|x| per coordinate, which moves ℓ_k(x) by eps32·|x - μ_k|ᵀ|P_k||x| and the
moments about μ_k alike: eps32·R_k for the rows k claims, R_k = σ_kᵀ|P_k|(|μ_k| + σ_k). So
float32 arithmetic with Q_k <= :data:`LOW_PRECISION_RATIO`·R_k loses nothing the data had,
up to that factor. Q_k/R_k ~ |μ_k|/σ_k for g near the origin: components within a few widths
of g (standardised data, overlapping clusters) and any component of data far from the origin
pass; a narrow component far from g keeps float64 (whitened when its float64 form would round
too much, with float32 for the rest, else all components in float64). Sums over rows run in float32 blocks of
:data:`SUM_ROWS` only (:func:`accumulate`), so they add ~√(256/3)·eps32 relative at most
typically, not the √N·eps32 of one float32 sum. Under ``vmap``, autograd and
``torch.compile`` the decision would be a value-dependent branch: float64 throughout there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from puregmm import _moments as mo
from puregmm._fused import Whitening
from puregmm.params import GMMParams

#: float32 data run T and the GEMMs in float32 for a component whose rounding there, eps32·Q_k,
#: is at most this many times what the float32 rows leave open, eps32·R_k (module docstring):
#: the E-step's error then stays within 1 + 4 = 5 times the data's own, all but ~2.3 of the
#: 24 bits the float32 rows determine are kept.
LOW_PRECISION_RATIO = 4.0
#: Rows summed in the low-precision dtype before the float64 accumulator (:func:`accumulate`).
SUM_ROWS = 256


def precision_plan(
    params: GMMParams, centre: Tensor, white: Whitening, dtype: torch.dtype
) -> tuple[torch.dtype, list[int]]:
    """Plain eager E-steps of data in ``dtype``: (the dtype of T and the GEMMs, the components
    to whiten in float64 instead); ``white`` is the float64 whitening about ``centre``.

    Whitened: the components whose float64 form rounds by more than
    :data:`puregmm._moments.MAX_ROUNDING`. float32 data (not the pooled mode) run in float32
    when every other live component has Q_k <= :data:`LOW_PRECISION_RATIO`·R_k; one that fails
    sends the whole E-step to float64, as whitening it alone would cost more (one component
    whitened in float64 beside float32 for the rest, 0.083 s at (1e5, 16, 16), K = 16, one
    thread, against float64 for all 0.065 s and float32 for all 0.042 s). One host
    synchronisation.
    """
    mdtype = mo.moment_dtype(dtype)
    lower = dtype != mdtype and not params.spec.pooled_moments  # float32 T and GEMMs possible
    quad, rep = mo.bound_terms(params, centre, white, with_rep=lower)
    live = params.logits.detach() > -math.inf
    coarse = live & (quad * torch.finfo(torch.float64).eps > mo.MAX_ROUNDING)
    if lower:
        assert rep is not None
        fail = live & ~coarse & (quad > LOW_PRECISION_RATIO * rep)  # float64, not whitening
        flags = (coarse.to(torch.int8) + 2 * fail.to(torch.int8)).tolist()
        whitened = [k for k, f in enumerate(flags) if f & 1]
        return (mdtype if any(f & 2 for f in flags) else dtype), whitened
    return mdtype, torch.nonzero(coarse).flatten().tolist() if bool(coarse.any()) else []


def accumulate(raw: Tensor, resp: Tensor, t: Tensor) -> None:
    """``raw`` [K, P] (float64) += ``resp`` [K, c] @ ``t`` [c, P] (a lower dtype, e.g. float32)
    with the sums over rows in blocks of :data:`SUM_ROWS` in that dtype and the blocks' sums in
    float64 (one batched GEMM): a block's sum rounds by at most γ_256 relative (Higham eq. 3.4),
    typically ~√(256/3)·eps; one float32 GEMM over a chunk of 5000 rows would be √20 times
    that, and a float32 sum over all N rows √N·eps. Plain eager tensors only (in place); one
    GEMM when ``t`` is float64."""
    if t.dtype == raw.dtype:
        raw.addmm_(resp, t)
        return
    k, c = resp.shape
    nb = c // SUM_ROWS
    if nb:
        head = nb * SUM_ROWS  # [nb, K, 256] @ [nb, 256, P]
        part = torch.bmm(resp[:, :head].reshape(k, nb, SUM_ROWS).transpose(0, 1), t[:head].reshape(nb, SUM_ROWS, -1))
        raw.add_(part.sum(0, dtype=raw.dtype))
    if nb * SUM_ROWS < c:
        raw.add_(resp[:, nb * SUM_ROWS :] @ t[nb * SUM_ROWS :])
