"""The E-step's missing mode: how a chunk of rows with missing entries becomes moments
(private; :func:`puregmm.estep.missing_stats` runs it through the E-step's one chunk loop).

Per segment of the rows' plan (:func:`puregmm._masked.plan`), the joint log-densities of the
observed entries, the filled rows x̂_k - μ_k and the conditional covariances of the missing
entries (:class:`SegmentTerms`), accumulated by :class:`puregmm._masked.Moments`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from puregmm import _masked, density
from puregmm import _moments as mo
from puregmm._masked import RowTerms, Segment
from puregmm.params import GMMParams
from puregmm.stats import total


def incomplete_stats(
    params: GMMParams,
    x: Tensor,
    observed: Tensor,
    w: Tensor | None,
    segments: list[Segment],
    chunk_size: int | None,
    chunk_pass: Callable[..., tuple[Tensor, ...]],
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
    """(n_k, X_k, S_k) and (Σ ω log p, Σ ω, the K worst log p, their rows filled) of rows that
    miss something (``segments`` relative to ``x``'s first row) by the E-step's ``chunk_pass``
    (:func:`puregmm.estep.chunk_pass`; :func:`puregmm.estep.missing_stats` makes the Stats)."""
    spec, k, (n, d) = params.spec, params.n_components, x.shape
    mdtype = mo.moment_dtype(x.dtype)
    p64 = params.to(mdtype)
    lo = segments[0].start
    segs = [Segment(s.start - lo, s.stop - lo, s.kind, s.width, s.seen, s.miss) for s in segments]
    terms = SegmentTerms(p64)
    acc = _masked.Moments(spec, k, d, p64.means)
    weight = observed.any(1).to(mdtype) * (1.0 if w is None else w.to(mdtype))  # an empty row adds nothing

    def add(chunk: Tensor, wc: Tensor | None, start: int, stop: int) -> Tensor:
        xc, oc = chunk[:, :d], chunk[:, d:] > 0.5
        scores = []
        for seg in segs:
            a, b = max(seg.start, start), min(seg.stop, stop)
            if a < b:
                lj, resid, cond = terms(seg, xc[a - start : b - start], oc[a - start : b - start])
                assert wc is not None
                scores.append(acc.add(lj, resid, cond, wc[a - start : b - start]))
        return torch.cat(scores) if len(scores) != 1 else scores[0]

    rows = chunk_size or _masked.row_chunk(k, d, max(s.width for s in segs))
    lifted = torch.cat([torch.where(observed, x, 0.0).to(mdtype), observed.to(mdtype)], 1)  # [n, 2D]
    score_sum, _, worst_ll, worst = chunk_pass(
        lifted, weight, k, rows, add, eager=not _masked.traced(x, observed, p64.logits, p64.means, p64.scale)
    )
    filled = terms.impute(worst[:, :d], worst[:, d:] > 0.5)  # the worst rows, their missing entries filled
    _, w_sum = total(x.new_zeros(n), w, x)  # every row counts, an empty one too
    return acc.result(), (score_sum, w_sum, worst_ll.to(params.dtype), filled.to(params.dtype))


class SegmentTerms:
    """Per segment of rows: (ℓ [c, K], x̂_k - μ_k [c, K, D], conditional covariance) from the one
    density: the marginal's whitening for a pattern (its conditional shared by the rows), the
    per-row form otherwise (:class:`puregmm._masked.RowTerms`)."""

    def __init__(self, params: GMMParams) -> None:
        self.params = params
        self.cache: dict[Any, Any] = {}

    def __call__(self, seg: Segment, x: Tensor, observed: Tensor) -> tuple[Tensor, Tensor, Tensor | RowTerms]:
        p, k, d = self.params, self.params.n_components, self.params.dim
        if seg.kind == "empty":  # weight 0: only shapes matter
            lj = torch.log_softmax(p.logits, -1).expand(x.shape[0], k)
            return lj, x.new_zeros(k, x.shape[0], d), x.new_zeros(k, d, d)
        if seg.kind == "pattern":
            assert seg.seen is not None and seg.miss is not None
            if id(seg) not in self.cache:
                white = density.whitening(density.marginal_params(p, seg.seen))
                raw, coef = p.spec.conditional_scale(p.scale, seg.miss, seg.seen, k)
                cov = _masked.embed(p.spec.covariances(raw, k, len(seg.miss)), seg.miss, d)
                self.cache[id(seg)] = (white, coef, cov)
            white, coef, cov = self.cache[id(seg)]
            lj = density.joint_log_prob_chunk(white, x.index_select(1, seg.seen))
            return lj, _masked.pattern_resid(coef, p.means, x, seg.seen, seg.miss), cov
        if "rows" not in self.cache:
            self.cache["rows"] = density.row_parts(p)
        w, u, means, log_w = self.cache["rows"]
        t = RowTerms(w, u, means, log_w, x, observed, seg.width)
        return t.log_joint, t.resid, t

    def impute(self, x: Tensor, observed: Tensor) -> Tensor:
        """Rows [m, D] with their missing entries replaced by E[x_m | x_o] under the mixture."""
        t = RowTerms(*density.row_parts(self.params), x, observed, x.shape[1])
        r = torch.softmax(t.log_joint, -1)  # [m, K]
        return torch.einsum("nk,knd->nd", r, t.resid + self.params.means.unsqueeze(1))
