"""k-means for the GMM start: k-means++ seeds and Lloyd iterations, as scikit-learn's ``KMeans``.

* :func:`kmeans_plusplus`: greedy k-means++ seeds (Arthur & Vassilvitskii, 2007) with
  scikit-learn's 2 + ⌊log K⌋ local trials; the validated front door of the kernel
  :func:`_kmeans_plusplus`, which returns row indices.
* :func:`lloyd`: Lloyd iterations from given centres, scikit-learn's ``_kmeans_single_lloyd``:
  empty clusters relocated to the points farthest from their centres, stop when the labels
  repeat or the squared centre shift Σ_k ‖c'_k - c_k‖² is at most ``KMEANS_TOL`` x the data's
  mean per-dimension variance, at most ``KMEANS_MAX_ITER`` iterations. :func:`_lloyd_step` is
  one iteration (a branch-free kernel that ``vmap``\\ s over datasets); :func:`_lloyd_loop`
  runs it for B stacked datasets.
* :func:`_sq_dist`: the one squared-distance function, its evaluation chosen by the block's
  size: a broadcast difference for small blocks (one expression; exact zeros stay zero), one
  coordinate at a time for large blocks of few dimensions (no [K, N, D] temporary; exact zeros
  too), one GEMM beyond (‖x‖² + ‖c‖² - 2 c·x, clamped at 0).

All randomness comes from ``key`` through :mod:`puregmm.keys`. :mod:`puregmm.init` turns the
labels into the GMM's first M-step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from puregmm import _moments as mo
from puregmm import _validate, keys

KMEANS_MAX_ITER = 300  # scikit-learn's KMeans max_iter
KMEANS_TOL = 1e-4  # scikit-learn's KMeans tol, relative to the data's mean per-dimension variance
SMALL_DIM = 16  # up to this D, large blocks of squared distances are summed coordinate by coordinate
SMALL_BLOCK = 2**17  # up to this K·N·D, one broadcast [K, D, N] difference (1 MiB in float64)


def _trials(n_components: int, n_local_trials: int | None) -> int:
    return 2 + int(math.log(n_components)) if n_local_trials is None else n_local_trials


def _kmeans_plusplus(x: Tensor, xt: Tensor, w: Tensor | None, key: Tensor, k: int, trials: int) -> Tensor:
    """Kernel of :func:`kmeans_plusplus`: x [N, D] (and xt = xᵀ [D, N]), w [N] float64
    weights (None: all 1) -> the indices [K] of the rows chosen as centres, in order."""
    n = x.shape[0]
    f64 = torch.float64
    cum_w = torch.arange(1, n + 1, dtype=f64, device=x.device) if w is None else torch.cumsum(w, 0)  # [N]
    # every draw at once (uniform(key, i, j) for centre i, candidate j): one hash, not one per centre
    rows = torch.arange(k, device=x.device).unsqueeze(-1)
    u_rows = _on(keys.uniform(key, rows, torch.arange(trials, device=x.device)), x.device).unbind(0)  # K x [L]

    def draw(mass: Tensor | None, i: int, m: int) -> Tensor:  # m indices [m] drawn ∝ mass (None: ω)
        cum = cum_w
        if mass is not None:
            cum = torch.cumsum(mass, 0)  # [N]
            cum = torch.where(cum[-1] > 0, cum, cum_w)  # all mass on centres: ∝ ω
        u = u_rows[i] if m == trials else u_rows[i][:m]
        return torch.searchsorted(cum, u * cum[-1], right=True).clamp_max(n - 1)  # [m]

    x2 = _sq_norms(xt, trials)
    chosen = [draw(None, 0, 1)]  # [1]
    d2 = _as(_sq_dist(xt, x.index_select(0, chosen[0]))[0], f64)  # [N]
    for i in range(1, k):  # static: K is a shape
        idx = draw(d2 if w is None else w * d2, i, trials)  # [L]
        sq = _as(_sq_dist(xt, x.index_select(0, idx), x2), f64)  # [L, N]
        new_d2 = sq.clamp_max_(d2)  # min(d2, sq) in place: no fresh [L, N] block per centre
        best = (new_d2.sum(1) if w is None else new_d2 @ w).argmin(0, keepdim=True)  # [1]: lowering Σ ω d² most
        chosen.append(idx.index_select(0, best))
        d2 = new_d2.index_select(0, best)[0]
    return torch.cat(chosen)  # [K]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a call when it is already (per-call machinery at small sizes)."""
    return t if t.dtype == dtype else t.to(dtype)


def _on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, without a call when it is already there."""
    return t if t.device == device else t.to(device)


def kmeans_plusplus(
    x: Any, n_components: int, key: Any = 0, sample_weight: Any = None, n_local_trials: int | None = None
) -> Tensor:
    """k-means++ centres [K, D] (Arthur & Vassilvitskii, 2007), greedy as scikit-learn's.

    The first centre is a point drawn ∝ ω. Each next one: draw ``n_local_trials`` candidates
    (default 2 + ⌊log K⌋, scikit-learn's; 1 is the plain algorithm) with probability
    ∝ ω·(squared distance to the nearest centre so far) and keep the one that lowers the
    weighted potential Σ ω·d² most. Draw j of centre i uses ``uniform(key, i, j)``. Data whose
    squares would overflow or underflow are scaled by a power of two first (exact; the
    draws are scale-free). Centre x first where it sits far from the origin: distances of
    centred points lose less to rounding.

    Args:
        x: data [N, D] (array-like; integers become floats).
        n_components: K, at most N.
        key: int or 0-d int64 tensor.
        sample_weight: optional [N] non-negative weights, not all zero.
        n_local_trials: candidates per centre, a positive int; None: 2 + ⌊log K⌋.

    Returns:
        K rows of ``x`` [K, D], in the order chosen.

    Raises:
        TypeError, ValueError: naming the bad argument. Under ``torch.func`` transforms and
            ``torch.compile`` only types and shapes are checked (values are not read).

    >>> import torch, puregmm as pg
    >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> sorted(round(v) for v in pg.kmeans_plusplus(x, 2, key=0)[:, 0].tolist())  # one per cluster
    [0, 5]
    """
    eager = not isinstance(x, Tensor) or _validate.eager(x)
    x = _validate.data(x, "x") if eager else _validate.as_float_tensor(x, "x")
    n = x.shape[0]
    k = _validate.n_components(n_components, n)
    trials = _trials(k, None if n_local_trials is None else _validate.positive_int(n_local_trials, "n_local_trials"))
    if sample_weight is None:
        w = None
    elif eager:
        w = _validate.sample_weight(sample_weight, n, torch.float64, x.device)
    else:
        w = _validate.as_float_tensor(sample_weight, "sample_weight", torch.float64)
    xs = x
    if eager:
        big, beyond = _extent(x)
        if beyond:
            xs = x * 2.0 ** -math.frexp(big)[1]  # exact: a power of two
    idx = _kmeans_plusplus(xs, xs.mT.contiguous(), w, _validate.key(key), k, trials)
    return x.index_select(0, idx)


def _extent(x: Tensor) -> tuple[float, bool]:
    """max|x| and whether it lies beyond the range where squared distances of x are safe
    (above √(max float)/16 they overflow, below √tiny·16 they underflow); reads x (eager)."""
    finfo = torch.finfo(x.dtype)
    big = float(x.abs().amax())
    return big, big > finfo.max**0.5 / 16 or 0 < big < finfo.tiny**0.5 * 16


def _mode(k: int, xt: Tensor) -> str:
    """How :func:`_sq_dist` evaluates k centres against xt [D, N]: by the block's size."""
    d, n = xt.shape[-2:]
    if k * n * d <= SMALL_BLOCK:
        return "broadcast"
    return "coordinates" if d <= SMALL_DIM else "gemm"


def _sq_dist(xt: Tensor, centres: Tensor, x2: Tensor | None = None) -> Tensor:
    """Squared distances [K, N] of centres [K, D] to the points xt [D, N] (coordinates
    major), evaluated by the block's size (:func:`_mode`): small blocks (K·N·D ≤
    ``SMALL_BLOCK``) as one broadcast [K, D, N] difference, squared and summed over D; larger
    ones of D ≤ ``SMALL_DIM`` one contiguous [K, N] pass per coordinate (no [K, N, D]
    temporary); both keep exact zeros exact. Else ‖x‖² + ‖c‖² - 2 c·x as one GEMM on xt,
    clamped at 0 (rounding ~eps·‖x‖², small as the points are centred; ``cdist`` on the
    transposed view copied all the points on every call: 0.24 s per call at N = 1e6,
    D = 32). ``x2``: the points' squared norms [N] when the caller has them (:func:`_sq_norms`)."""
    mode = _mode(centres.shape[0], xt)
    if mode == "broadcast":
        # [D, N] - [K, D, 1] -> [K, D, N] -> [K, N]; squared in place: a second ~1 MB block costs page faults
        return (xt - centres.unsqueeze(-1)).pow_(2).sum(1)
    if mode == "gemm":
        x2 = _norms(xt) if x2 is None else x2
        out = torch.addmm(x2, centres, xt, alpha=-2.0)  # [K, N]
        return out.add_((centres * centres).sum(1, keepdim=True)).clamp_min_(0.0)
    diff = xt[0] - centres[:, :1]  # [K, N]
    out = diff * diff
    for j in range(1, xt.shape[0]):
        diff = xt[j] - centres[:, j : j + 1]
        out = out.addcmul(diff, diff)
    return out


def _norms(xt: Tensor) -> Tensor:
    """‖x_n‖² [..., N] of points xt [..., D, N]."""
    return torch.einsum("...dn,...dn->...n", xt, xt)


def _sq_norms(xt: Tensor, k: int) -> Tensor | None:
    """:func:`_norms` of xt [..., D, N] where :func:`_sq_dist` of k centres uses them (its GEMM),
    else None: computed once by callers that measure several sets of centres against the same points."""
    return _norms(xt) if _mode(k, xt) == "gemm" else None


def _nearest(xt: Tensor, centres: Tensor, x2: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Labels [N] of the nearest centre (the first on ties) and the squared distances [N]."""
    d2, labels = _sq_dist(xt, centres, x2).min(0)
    return labels, d2


def _one_hot(labels: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """[K, N] one-hot columns (``F.one_hot`` checks values, which ``vmap`` forbids)."""
    return (labels == torch.arange(k, device=labels.device).unsqueeze(-1)).to(dtype)


def _relocate(labels: Tensor, d2: Tensor, w: Tensor | None, empty: Tensor) -> Tensor:
    """Labels [N] after scikit-learn's relocation of the empty clusters ``empty`` [K] bool
    (``_relocate_empty_clusters_dense``): the e-th empty cluster (by index) takes the row e-th
    farthest from its centre (``d2`` [N]; weight > 0 and distance > 0 only), which leaves its
    old cluster. Branch-free (vmaps)."""
    k = empty.shape[0]
    far_d2 = d2 if w is None else torch.where(w > 0, d2, -1.0)
    far_d2, far = torch.topk(far_d2, k)  # [K] the K farthest rows, descending
    targets = torch.argsort((~empty).to(torch.int64), stable=True)  # [K] the empty clusters first
    moved = (torch.arange(k, device=labels.device) < empty.sum()) & (far_d2 > 0)  # [K]
    return labels.scatter(0, far, torch.where(moved, targets, labels.index_select(0, far)))


def _lloyd_step(
    xt: Tensor, w: Tensor | None, centres: Tensor, x2: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One Lloyd iteration on xt [D, N], scikit-learn's: (labels [N] of the nearest of
    ``centres``, the new centres [K, D], the squared shift Σ_k ‖c'_k - c_k‖² (0-d)). ``x2``:
    :func:`_sq_norms` of xt, computed once per run.

    Empty clusters are relocated first (:func:`_relocate`); each cluster's new centre is then
    the weighted mean of its rows, and a cluster still empty keeps its centre. Branch-free
    (``vmap`` it over datasets); plain eager tensors skip the relocation's and the empty
    clusters' work when no cluster is empty (the usual case; the result is the same)."""
    k = centres.shape[0]
    labels, d2 = _nearest(xt, centres, x2)
    r = _one_hot(labels, k, xt.dtype)  # [K, N]
    if w is not None:
        r = r * w
    counts = r.sum(-1, keepdim=True)  # [K, 1]
    if mo.plain(xt, w, centres) and bool(counts.all()):  # eager, no cluster empty: the means
        new = (r @ xt.mT) / counts  # [K, D]
    else:
        r = _one_hot(_relocate(labels, d2, w, counts[:, 0] == 0), k, xt.dtype)
        if w is not None:
            r = r * w
        counts = r.sum(-1, keepdim=True)
        new = torch.where(counts > 0, (r @ xt.mT) / counts.clamp_min(torch.finfo(xt.dtype).tiny), centres)
    return labels, new, (new - centres).square().sum()


def lloyd(
    x: Tensor,
    centres: Tensor,
    sample_weight: Tensor | None = None,
    max_iter: int = KMEANS_MAX_ITER,
    tol: float = KMEANS_TOL,
) -> Tensor:
    """Lloyd's k-means iterations on x [N, D] from ``centres`` [K, D], as scikit-learn's
    ``KMeans`` (:func:`_lloyd_step`; empty clusters relocated to the farthest points). Stops
    when the labels repeat, when the squared centre shift summed over clusters is at most
    ``tol`` times the data's mean per-dimension variance, or after ``max_iter`` iterations."""
    wn = torch.ones_like(x[:, 0]) if sample_weight is None else sample_weight  # [N]
    offset = (wn.unsqueeze(-1) * x).sum(0) / wn.sum()  # [D]: distances on centred data
    xc = x - offset
    limit = (tol * _data_variance(xc, sample_weight)).reshape(1)
    w = None if sample_weight is None else sample_weight.unsqueeze(0)
    run = _lloyd_loop(xc.mT.contiguous().unsqueeze(0), w, max_iter)
    return run((centres - offset).unsqueeze(0), limit)[0] + offset


def _lloyd_loop(xt: Tensor, w: Tensor | None, max_iter: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Batched Lloyd: xt [B, D, N], w [B, N] | None -> ((centres [B, K, D], limit [B]) -> final
    centres [B, K, D]).

    Dataset b stops, as scikit-learn's ``_kmeans_single_lloyd``, once its labels repeat (its
    centres are then a fixed point) or its squared centre shift Σ_k ‖c'_k - c_k‖² is at most
    ``limit[b]``, keeping the new centres; each pass advances only the datasets still moving.
    One dataset runs the step itself, without ``vmap`` and the bookkeeping of the batch."""
    b = xt.shape[0]
    if b == 1:
        w0 = None if w is None else w[0]
        return lambda centres, limit: _lloyd_one(xt[0], w0, centres[0], limit[0], max_iter).unsqueeze(0)

    def run(centres: Tensor, limit: Tensor) -> Tensor:
        x2 = _sq_norms(xt, centres.shape[1])  # [B, N] | None
        step = torch.func.vmap(_lloyd_step, in_dims=(0, None if w is None else 0, 0, None if x2 is None else 0))
        labels, centres, shift = step(xt, w, centres, x2)  # iteration 1: no labels to compare yet
        active = torch.nonzero(shift > limit).flatten()  # [A]
        for _ in range(max_iter - 1):
            if active.numel() == 0:
                break
            if active.numel() == b:
                new_labels, new_centres, shift = step(xt, w, centres, x2)
            else:
                wa = None if w is None else w.index_select(0, active)
                x2a = None if x2 is None else x2.index_select(0, active)
                new_labels, new_centres, shift = step(
                    xt.index_select(0, active), wa, centres.index_select(0, active), x2a
                )
            moving = (new_labels != labels.index_select(0, active)).any(-1) & (shift > limit.index_select(0, active))
            labels.index_copy_(0, active, new_labels)  # ours: fresh from the first step
            centres.index_copy_(0, active, new_centres)
            active = active[moving]
        return centres

    return run


def _lloyd_one(xt: Tensor, w: Tensor | None, centres: Tensor, limit: Tensor, max_iter: int) -> Tensor:
    """:func:`_lloyd_loop`'s rule for one dataset xt [D, N]: the final centres [K, D]."""
    bound = float(limit)
    x2 = _sq_norms(xt, centres.shape[0])
    labels, centres, shift = _lloyd_step(xt, w, centres, x2)
    for _ in range(max_iter - 1):
        if float(shift) <= bound:
            break
        new_labels, centres, shift = _lloyd_step(xt, w, centres, x2)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centres


def _data_variance(xc: Tensor, w: Tensor | None) -> Tensor:
    """Kernel: the (weighted) mean per-dimension variance of centred data (0-d)."""
    if w is None:
        return xc.square().sum(0).mean() / xc.shape[0]
    return (w.unsqueeze(-1) * xc.square()).sum(0).mean() / w.sum()
