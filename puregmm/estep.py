"""The E-step: a mixture's sufficient statistics on data, by one chunk loop.

:func:`puregmm._chunks.chunk_pass` is the only loop over rows: it slices chunks (and their weights), hands each
to a *mode*'s ``add`` (which accumulates that mode's moments and returns the chunk's ranking
score, log p(x) or a given score), keeps the K lowest-scoring rows for re-seeding, and
totals the scores. The modes differ only in how a chunk becomes moments:

=================  ========================================================================
mode               per chunk
=================  ========================================================================
natural (default)  T(x) [c, P] once; ℓ = η Tᵀ (GEMM 1), r = softmax, M += r T (GEMM 2);
                   exponential-family form, :mod:`puregmm._moments`; float32 data in
                   float32 where that loses nothing the data had (:mod:`puregmm._precision`)
pooled (tied)      ℓ from the linear part only (the quadratic part is common to all
                   components), r [y, 1] and the pooled scatter Σ ω y yᵀ
whitened (safe)    ℓ by whitening each row per component (:mod:`puregmm.density`), moments
                   about each mean directly; plain eager tensors whose natural form would
                   round by more than 1e-8 nats (a numerically safer mode of the same pass),
                   all components or only those (the rest natural, ``_mixed_stats``); and
                   small data, where its few products cost less than the natural form's
                   operations (``Family.whitening_cheaper``, per family)
given r            responsibilities given (init; :mod:`puregmm._given_mode`): M += r T, or r [y, 1]
                   and the pooled scatter
missing            ``observed=`` given: per pattern (or per row) the marginal density of the
                   observed entries, the conditional mean x̂_k of the missing ones and their
                   conditional covariance; n_k, X_k, S_k of x̂_k plus that covariance (exact
                   EM for incomplete data); complete rows by the modes above
=================  ========================================================================

:func:`puregmm._given_mode.label_stats` (hard labels, eager) groups rows by label instead of
looping over chunks. :func:`log_lik` is the scores alone, in the same form (a fit's final loss).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from puregmm import _masked, _precision, _validate, density
from puregmm import _moments as mo
from puregmm._chunks import chunk_pass, to_stats
from puregmm._fused import Whitening
from puregmm._masked import Plan, Segment
from puregmm._missing_mode import incomplete_stats
from puregmm._pooled_mode import pooled_stats
from puregmm.families import Family, get_family
from puregmm.params import GMMParams
from puregmm.stats import Stats, combine

#: The whitened mode's moments about the means take components in groups whose [G, c, D] float64
#: blocks stay within this: cache-sized, as blocks of several MB were slower than one component at
#: a time on the digits (``profile_small.py --datasets digits --families full`` prints the form's time).
ABOUT_MEANS_BYTES = 1 << 20


def default_chunk_size(n: int, k: int, d: int, family: str = "full") -> int:
    """Rows per E-step chunk from static shapes: the chunk's block of sufficient statistics
    T [chunk, P], at 8 bytes an entry, near :data:`puregmm._moments.CHUNK_BYTES` (a few MB).

    Args:
        n: rows; k: components; d: dimensions; family: the covariance family.

    Returns:
        rows per chunk, between 1 and ``n``.

    >>> from puregmm.estep import default_chunk_size
    >>> default_chunk_size(10, 3, 2)
    10
    """
    return mo.chunk_rows(n, get_family(family).moment_layout(d), None)


def sufficient_stats(
    params: GMMParams,
    x: Tensor,
    sample_weight: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    observed: Tensor | Plan | None = None,
) -> Stats:
    """E-step statistics of unbatched ``params`` on ``x`` [N, D] (see :class:`puregmm.Stats`).

    Rows go through :func:`chunk_pass` in chunks of ``chunk_size`` (default from static shapes,
    :func:`default_chunk_size`), in exponential-family form (:mod:`puregmm._moments`): per
    chunk, the block T of the rows' products about the centre of the means, the joint
    log-densities ℓ = η Tᵀ [K, c] (one GEMM with the natural parameters η of ``params``),
    responsibilities in log space, and the moments r T (one GEMM), shifted exactly to each
    component's mean at the end. Only the [c, P] and [K, c] blocks and an [N] vector of
    log-densities exist at a time, reused chunk after chunk when nothing is being
    differentiated. ``sample_weight`` [N] (non-negative, not checked here) weights rows as
    counts. Use ``torch.func.vmap`` for stacked params/data. On plain eager tensors, when that
    form would round by more than 1e-8 nats (:func:`puregmm._moments.rounding_bound`), the
    statistics come from whitening each row per component instead (exact; slower). T and the
    GEMMs are float64, or float32 for float32 data on plain eager tensors where the error bound
    says that loses nothing the float32 rows had (:mod:`puregmm._precision`); the sums over
    rows are float64 either way.

    Args:
        params: unbatched mixture params.
        x: data [N, D].
        sample_weight: optional [N] non-negative weights (not checked).
        chunk_size: rows per chunk; None: from static shapes.
        observed: optional [N, D] bool mask, True = observed: the statistics of the exact E-step
            for incomplete data (:func:`missing_stats`; the other entries are ignored).

    Returns:
        :class:`puregmm.Stats` about ``params``' means, in ``params``' dtype.

    Raises:
        ValueError: ``x`` not [N, D] with the params' D, or ``sample_weight`` not [N].

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> s = pg.sufficient_stats(pg.init(x, 3, "diagonal"), x, chunk_size=32)
    >>> s.resp_sum.shape, s.weight_sum
    (torch.Size([3]), tensor(100., dtype=torch.float64))
    """
    _validate.data_shape(params, x)  # static: the params' structure, x [N, D] of their dtype
    _validate.unbatched(params, "sufficient_stats")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D] with D={params.dim} (unbatched params); got shape {tuple(x.shape)}")
    return statistics(params, x, sample_weight, chunk_size, observed)


def statistics(
    params: GMMParams, x: Tensor, sample_weight: Tensor | None = None, chunk_size: int | None = None,
    observed: Tensor | Plan | None = None,
) -> Stats:  # fmt: skip
    """:func:`sufficient_stats` once ``params`` and ``x`` [N, D] passed its static checks (em_step
    checks them once for a whole batch); the weights' shape is checked here."""
    _validate.kernel_weight(sample_weight, x)
    if observed is not None:
        return missing_stats(params, x, observed, sample_weight, chunk_size)
    form = _form(params, x, sample_weight)
    if form.kind == "whitened":
        return whitened_stats(params, x, sample_weight, chunk_size)
    assert form.centre is not None and form.white is not None
    if form.kind == "mixed":
        return _mixed_stats(params, x, sample_weight, chunk_size, form.centre, form.flagged, form.ndtype, form.white)
    if params.spec.pooled_moments:
        return pooled_stats(params, x, sample_weight, chunk_size, form.centre, form.plain, form.white)
    return _natural_stats(params, x, sample_weight, chunk_size, form.centre, form.plain, form.white, form.ndtype)


class _Form(NamedTuple):
    """How an E-step computes: ``kind`` natural, mixed (``flagged`` components whitened) or
    whitened; the centre g, the whitening about it and the dtype of T and the GEMMs."""

    kind: str
    plain: bool
    centre: Tensor | None = None
    white: Whitening | None = None
    ndtype: torch.dtype = torch.float64
    flagged: tuple[int, ...] = ()


def _form(params: GMMParams, x: Tensor, sample_weight: Tensor | None) -> _Form:
    """The E-step's form for these params and rows (the statistics and the score pass share it):
    plain eager tensors take the whitened form where it is cheaper or where the natural form
    would round too much for every component (or any, tied), float32 where it loses nothing
    (:mod:`puregmm._precision`); under transforms, the natural form in float64."""
    plain = mo.plain(params.logits, params.means, params.scale, x, sample_weight)
    if plain and params.spec.whitening_cheaper(x.shape[0], params.n_components, params.dim):
        return _Form("whitened", plain)  # the exact form, and the cheaper one here
    centre = mo.centre_of(params)  # [D], g
    white = density.whitening(params.to(mo.moment_dtype(x.dtype)), centre)  # η's maps (and the bounds')
    if not plain:
        return _Form("natural", plain, centre, white, mo.moment_dtype(x.dtype))
    ndtype, flagged = _precision.precision_plan(params, centre, white, x.dtype)
    if len(flagged) == params.n_components or (flagged and params.spec.pooled_moments):
        return _Form("whitened", plain)
    return _Form("mixed" if flagged else "natural", plain, centre, white, ndtype, tuple(flagged))


def log_lik(params: GMMParams, x: Tensor, sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(Σ ω log p(x), Σ ω) by the E-step's own form (:func:`_form`), without its moments or worst
    rows: a fit's final loss. Per chunk, ℓ = η Tᵀ (the first GEMM; flagged components' rows
    whitened) or the whitened ℓ, and a logsumexp; the tied family goes through
    :func:`sufficient_stats` (its pooled form has no per-component ℓ)."""
    if params.spec.pooled_moments:
        stats = sufficient_stats(params, x, sample_weight)
        return stats.log_lik_sum, stats.weight_sum
    form = _form(params, x, sample_weight)
    k, (n, d) = params.n_components, x.shape
    if form.kind == "whitened":
        white = density.whitening(params.to(mo.moment_dtype(x.dtype)))

        def whitened(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
            return torch.logsumexp(density.joint_log_prob_chunk(white, xc.to(white.a.dtype)), 1)

        rows = default_chunk_size(n, k, d, params.family)
        ll, count = chunk_pass(x, sample_weight, k, rows, whitened, False, lowest_rows=False)
        return ll.to(params.dtype), count
    assert form.centre is not None and form.white is not None
    centre, mdtype, flagged = form.centre, mo.moment_dtype(x.dtype), form.flagged
    lay = params.spec.moment_layout(d, square=mo.square_layout(n, d, k, form.plain, None))
    eta = mo.natural(params, centre, mdtype, lay, form.white).to(form.ndtype)  # [K, P]
    subs = [_one_component(form.white, j) for j in flagged]

    def score(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
        lj = (eta @ mo.products(lay, xc, centre, form.ndtype, None).mT).to(mdtype)  # [K, c]
        x64 = xc.to(mdtype) if flagged else xc  # once per chunk, only when a component needs it
        for sub, j in zip(subs, flagged, strict=True):
            lj[j] = density.joint_log_prob_chunk(sub, x64)[:, 0]
        return torch.logsumexp(lj, 0)

    ll, count = chunk_pass(x, sample_weight, k, mo.chunk_rows(n, lay, None), score, False, lowest_rows=False)
    return ll.to(params.dtype), count


def _one_component(white: Whitening, j: int) -> Whitening:
    """Component ``j``'s whitening alone (a [c, D] block per chunk, not a [c, D, F] one)."""
    return white._replace(a=white.a[..., j : j + 1].contiguous(), const=white.const[j : j + 1])


def _natural_stats(
    params: GMMParams, x: Tensor, sample_weight: Tensor | None, chunk_size: int | None, centre: Tensor, plain: bool,
    white: Whitening, ndtype: torch.dtype,
) -> Stats:  # fmt: skip
    """The natural mode: T once per chunk serves ℓ = η Tᵀ and the moments r T; T, ℓ and the
    GEMMs in ``ndtype`` (the data's float32 when :func:`puregmm._precision.precision_plan` allows
    it), M = Σ r T in float64 (:func:`puregmm._precision.accumulate`)."""
    k, (n, d) = params.n_components, x.shape
    lay = params.spec.moment_layout(d, square=mo.square_layout(n, d, k, plain, chunk_size))
    mdtype = mo.moment_dtype(x.dtype)
    low = ndtype != mdtype  # float32 T: sums over rows in blocks, added in float64
    eta = mo.natural(params, centre, mdtype, lay, white).to(ndtype)  # [K, P]
    rows = mo.chunk_rows(n, lay, chunk_size)
    if low and chunk_size is None and rows > _precision.SUM_ROWS:
        rows -= rows % _precision.SUM_ROWS  # whole blocks
    work = mo.Work(lay, rows, k, x, ndtype) if plain and mo.worth_a_workspace(n, rows, lay) else None
    raw = torch.zeros(k, lay.width, dtype=mdtype, device=x.device) if work is not None or low else None  # Σ r T
    lse_buf = x.new_empty(rows, dtype=ndtype) if work is not None else None  # one chunk's log p, reused

    def add(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
        nonlocal raw
        t = mo.products(lay, xc, centre, ndtype, work)  # [c, P]
        if work is None:  # out of place (one chunk, autograd, torch.func, compile)
            resp, lse = mo.responsibilities(eta @ t.mT, inplace=False)  # [K, c], [c]
            resp = resp if ws is None else resp * ws
            if low:  # plain, one chunk of float32: in place, in float64
                assert raw is not None
                _precision.accumulate(raw, resp, t)
                return lse
            part = resp @ t
            raw = part if raw is None else raw + part
            return lse
        assert lse_buf is not None and raw is not None  # in place, in the workspace
        lj = torch.mm(eta, t.mT, out=work.lj[:, : stop - start])  # [K, c]
        resp, lse = mo.responsibilities(lj, inplace=True, lse_out=lse_buf[: stop - start])
        if ws is not None:
            resp.mul_(ws)
        _precision.accumulate(raw, resp, t)
        return lse

    passed = chunk_pass(x, sample_weight, k, rows, add, eager=plain)
    shift = (params.means.detach() - centre).to(mdtype)
    if raw is None:  # no rows
        raw = torch.zeros(k, lay.width, dtype=mdtype, device=x.device)
    return to_stats(mo.about_centres(lay, raw, shift), passed, params.dtype)


def whitened_stats(params: GMMParams, x: Tensor, sample_weight: Tensor | None, chunk_size: int | None) -> Stats:
    """The whitened mode, as scikit-learn computes the statistics, for plain eager tensors on
    small data (``Family.whitening_cheaper``) or whose exponential-family form would round too
    much (:func:`puregmm._moments.rounding_bound`: a
    component narrower than ~1e-4 of its mean's distance from the centre, e.g. collapsing onto
    a few points with ``reg_covar=0``): float64 log-densities by whitening each row per
    component (:func:`puregmm.density.joint_log_prob_chunk`; rounding ~eps·‖x - μ_k‖/σ instead
    of its square) and moments about each mean directly (:func:`_add_about_means`)."""
    spec, k, (n, d) = params.spec, params.n_components, x.shape
    mdtype = mo.moment_dtype(x.dtype)
    p64 = params.to(mdtype)
    white = density.whitening(p64)
    means = p64.means
    acc = tuple(torch.zeros(sh, dtype=mdtype, device=x.device) for sh in ((k,), (k, d), spec.stats_shape(k, d)))

    def add(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
        xc = xc.to(mdtype)
        lj = density.joint_log_prob_chunk(white, xc)  # [c, K]
        lse = torch.logsumexp(lj, 1)
        r = torch.exp(lj - lse.unsqueeze(1))
        if ws is not None:
            r = r * ws.to(mdtype).unsqueeze(1)
        _add_about_means(spec, acc, xc, r, means)
        return lse

    rows = chunk_size if chunk_size is not None else default_chunk_size(n, k, d, params.family)
    passed = chunk_pass(x, sample_weight, k, int(rows), add, eager=True)
    return to_stats((acc[0], acc[1], acc[2]), passed, params.dtype)


def _add_about_means(spec: Family, acc: tuple[Tensor, ...], x: Tensor, r: Tensor, means: Tensor) -> None:
    """``acc`` (n_k [F], X_k [F, D], S_k) += the moments of rows ``x`` [c, D] with
    responsibilities ``r`` [c, F] about ``means`` [F, D], summed directly (no expansion about a
    centre): y = x - μ_k for a group of components at once, each group's [G, c, D] block within
    :data:`ABOUT_MEANS_BYTES` (all components at once for small data, one at a time for large)."""
    c, d = x.shape
    acc[0].add_(r.sum(0))
    group = max(1, ABOUT_MEANS_BYTES // (8 * max(1, c * d)))
    for j in range(0, means.shape[0], group):
        y = x - means[j : j + group].unsqueeze(1)  # [G, c, D]
        ry = r[:, j : j + group].mT.unsqueeze(-1) * y
        acc[1][j : j + group].add_(ry.sum(1))  # in place through the view (no write-back copy)
        acc[2][j : j + group].add_(spec.scatter(ry, y))


def _mixed_stats(
    params: GMMParams, x: Tensor, sample_weight: Tensor | None, chunk_size: int | None, centre: Tensor,
    flagged: tuple[int, ...], ndtype: torch.dtype, white: Whitening,
) -> Stats:  # fmt: skip
    """The natural mode (T and its GEMMs in ``ndtype``) for every component but ``flagged``
    (plain eager tensors), whose log-densities come from whitening in float64
    (:func:`puregmm.density.joint_log_prob_chunk`, one component at a time: a [c, D] block each,
    not a [c, D, F] one with a short last axis) and whose moments are summed about their
    means directly, as :func:`whitened_stats` does for all: the fallback costs only the
    components that need it. ``white``: the float64 whitening about ``centre``."""
    spec, k, (n, d) = params.spec, params.n_components, x.shape
    lay = spec.moment_layout(d)
    mdtype = mo.moment_dtype(x.dtype)
    eta = mo.natural(params, centre, mdtype, lay, white).to(ndtype)  # [K, P]
    idx = torch.tensor(flagged, device=x.device)
    subs = [_one_component(white, j) for j in flagged]
    means = params.means.to(mdtype).index_select(0, idx)
    raw = torch.zeros(k, lay.width, dtype=mdtype, device=x.device)  # Σ r T
    f = len(flagged)
    direct = tuple(torch.zeros(sh, dtype=mdtype, device=x.device) for sh in ((f,), (f, d), spec.stats_shape(f, d)))

    rows = mo.chunk_rows(n, lay, chunk_size)
    work = mo.Work(lay, rows, k, x, ndtype) if mo.worth_a_workspace(n, rows, lay) else None

    def add(xc: Tensor, ws: Tensor | None, start: int, stop: int) -> Tensor:
        t = mo.products(lay, xc, centre, ndtype, work)  # [c, P]
        x64 = xc.to(mdtype)
        lj = (eta @ t.mT).to(mdtype)  # [K, c], a new tensor
        for i, j in enumerate(flagged):
            lj[j] = density.joint_log_prob_chunk(subs[i], x64)[:, 0]
        resp, lse = mo.responsibilities(lj, inplace=False)
        resp = resp if ws is None else resp * ws.to(mdtype)
        _precision.accumulate(raw, resp.to(ndtype), t)
        _add_about_means(spec, direct, x64, resp.index_select(0, idx).mT, means)
        return lse

    passed = chunk_pass(x, sample_weight, k, rows, add, eager=True)
    moments = mo.about_centres(lay, raw, (params.means.detach() - centre).to(mdtype))
    n_k, x_k, s_k = (m.index_copy(0, idx, dm) for m, dm in zip(moments, direct))
    return to_stats((n_k, x_k, s_k), passed, params.dtype)


# --- the missing mode ----------------------------------------------------------------------------


def missing_stats(
    params: GMMParams, x: Tensor, observed: Tensor | Plan, sample_weight: Tensor | None, chunk_size: int | None
) -> Stats:
    """The missing mode: the E-step of EM for incomplete data (Ghahramani & Jordan 1994; Little &
    Rubin ch. 11) on rows ``x`` [N, D] observed where ``observed`` (a mask or its plan).

    With r_nk ∝ w_k N(x_o | μ_k,o, Σ_k,oo), x̂_nk = E[x | x_o, k] and C_nk = Cov[x_m | x_o, k]
    (:mod:`puregmm._masked`): n_k = Σ ω r, X_k = Σ ω r (x̂ - μ_k), S_k = Σ ω r ((x̂ - μ_k)(x̂ - μ_k)ᵀ
    + C), so the M-step maximises the expected complete-data likelihood and the observed-data
    likelihood never decreases. Complete rows go through :func:`sufficient_stats`; a row with
    nothing observed counts in ``weight_sum`` only (log p = 0). ``worst_x`` are the worst rows
    filled with their conditional means. Float64 moments, in chunks of rows.
    """
    plan = observed if isinstance(observed, Plan) else _masked.as_plan(observed, x)
    order = plan.order  # regrouped rows are a copy of our own (the missing mode may overwrite its NaN marks)
    xs, obs = (x, plan.observed) if order is None else (x.index_select(0, order), plan.observed[order])
    ws = sample_weight if sample_weight is None or order is None else sample_weight[order]
    parts = [sufficient_stats(params, xs[s.start : s.stop], _rows(ws, s), chunk_size=chunk_size)
             for s in plan.segments if s.kind == "complete"]  # fmt: skip
    rest = [s for s in plan.segments if s.kind != "complete"]
    if rest:  # the complete rows come first or last: the rest is contiguous
        seg = Segment(rest[0].start, rest[-1].stop, "")
        args = (xs[seg.start : seg.stop], obs[seg.start : seg.stop], _rows(ws, seg), rest, chunk_size, chunk_pass)
        moments, passed = incomplete_stats(params, *args, owned=order is not None)
        parts.append(to_stats(moments, passed, params.dtype))
    out = parts[0]
    for more in parts[1:]:
        out = combine(out, more)
    return out


def _rows(w: Tensor | None, seg: Segment) -> Tensor | None:
    return None if w is None else w[seg.start : seg.stop]
