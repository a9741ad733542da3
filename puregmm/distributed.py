"""Data-parallel fits on ``torch.distributed``: every rank holds a shard, all hold the same params.

The kernels stay the single-process ones; a :class:`Collective` passed as their ``reduce=``
hook makes the sums global:

* **EM** (:func:`puregmm.em_step` ``reduce=``): each rank computes the :class:`puregmm.Stats`
  of its shard about the shared means, the summable fields are all-reduced (one packed
  ``all_reduce(SUM)``) and the ``worst_*`` pair is all-gathered and K-min merged in rank
  order, so the M-step, and its re-seeding of empty components, is the same on every rank and
  equals the M-step on the shards concatenated in rank order (up to summation order).
* **Gradient descent** (:func:`puregmm.step` ``reduce=``): the gradient of the *summed*
  weighted NLL is all-reduced and divided by the all-reduced weight sum,
  ∇ = Σ_r ∇(-Σ_{n∈r} ω_n log p(x_n)) / Σ_r Σ_{n∈r} ω_n, the gradient of the global mean (not
  a mean of per-rank means). The singularity reset draws its rows from the union of the shards:
  each rank proposes its row at the shared key's global index, an all-gather picks the owner's.

Failures: the process group's timeout (:func:`init`, default :data:`DEFAULT_TIMEOUT_S`) bounds
every collective, and a failed or timed-out collective raises :class:`DistributedError` naming
this rank and saying that another rank probably failed, instead of hanging. Input errors are
agreed on first (one all-gather) so that every rank raises, none waits.

Without an initialised process group (or with one rank) everything here is a no-op:
:func:`fit_distributed` is :func:`puregmm.fit` and a :class:`Collective` returns its input.
Not checked: that the ranks pass identical ``init_params`` (rank 0's are broadcast) and that
their shards are disjoint.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_TIMEOUT_S", "INIT_ROWS", "Collective", "DistributedError", "collective", "fit_distributed", "init",
    "is_active", "reduce_stats", "shard_bounds",
]  # fmt: skip

import math
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, driver, keys, stream
from puregmm.collective import (
    DEFAULT_TIMEOUT_S,
    Collective,
    DistributedError,
    collective,
    init,
    is_active,
    reduce_stats,
    shard_bounds,
)
from puregmm.families import get_family
from puregmm.init import init as init_params_from
from puregmm.methods import (
    EM_MAX_STEPS,
    EM_TOL,
    GD_MAX_STEPS,
    GD_TOL,
    FitResult,
    Settings,
    affine,
    get_method,
    standardisation,
    standardised_reg,
)
from puregmm.params import GMMParams

INIT_ROWS = 100_000  # rows gathered from all ranks to initialise on (all of them when N is smaller)
METHODS = ("gd", "em")


def fit_distributed(
    data: Any,
    n_components: int,
    family: str = "full",
    *,
    method: str = "gd",
    max_steps: int | None = None,
    tol: float | None = None,
    batch_size: int | None = None,
    n_init: int = 1,
    reg_covar: float = 1e-6,
    init_params: GMMParams | Any | None = None,
    init_method: str = "kmeans",
    sample_weight: Any = None,
    optimizer: Any = None,
    key: Any = 0,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int = 100,
    resume: Any = None,
    group: Any = None,
    chunk_size: int | None = None,
) -> FitResult:
    """:func:`puregmm.fit` on data split over the ranks of ``group``: ``data`` is this rank's shard.

    Call it on every rank with the same arguments (except ``data``/``sample_weight``). Every
    rank returns the same :class:`puregmm.FitResult`, which equals ``pg.fit`` of the shards
    concatenated in rank order (to rounding) when ``init_params`` are GMMParams. Shards may
    differ in size; each must be non-empty. Without an initialised process group (or with one
    rank) this *is* :func:`puregmm.fit`.

    Differences from :func:`puregmm.fit`: without GMMParams ``init_params``, every rank runs
    :func:`puregmm.init` on the same sample of at most ``max(INIT_ROWS, 20·K)`` rows gathered
    from the ranks in proportion to their sizes (all rows when N is smaller, which equals
    ``pg.init`` on the whole data) and rank 0's result is broadcast; ``batch_size`` is rows per
    rank per step; restarts of gradient descent run one after another; rank 0 alone writes
    ``checkpoint``. It runs the one driver (:func:`puregmm.driver.run`) with the collective as
    its ``reduce``: the same standardisation (global weighted mean and spread), kernels and loop.

    Data larger than memory: a ``.npy`` path, a memory map (e.g. a slice
    ``np.load(path, mmap_mode="r")[lo:hi]`` of :func:`shard_bounds`) or a stream as ``data``:
    each rank streams its part in chunks of ``chunk_size`` rows and every EM pass's statistics
    are all-reduced, so a rank's memory is bounded by the chunk, not its shard (EM only).

    Raises:
        ValueError / TypeError: as :func:`puregmm.fit`, raised on *every* rank when any rank's
            input is bad (the message names the rank), or when ranks disagree on D, dtype or
            the settings.
        DistributedError: a collective failed or timed out (another rank died or hangs).
    """
    comm = collective(group)
    if comm.active and stream.is_stream(data):
        return _fit_streamed(
            data, n_components, family, comm, method=method, max_steps=max_steps, tol=tol, reg_covar=reg_covar,
            init_params=init_params, init_method=init_method, key=key, progress=progress, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, resume=resume, other=(batch_size, n_init, sample_weight, optimizer),
            chunk_size=chunk_size,
        )  # fmt: skip
    if not comm.active:
        return driver.fit_data(
            data, n_components, family, method=method, max_steps=max_steps, tol=tol, batch_size=batch_size,
            n_init=n_init, reg_covar=reg_covar, init_params=init_params, init_method=init_method,
            sample_weight=sample_weight, optimizer=optimizer, key=key, progress=progress,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
        )  # fmt: skip
    settings: dict[str, Any] = {}
    error: Exception | None = None
    x = w = None
    try:
        spec = get_family(family)
        x = _validate.data(data, "data")
        w = None if sample_weight is None else _validate.sample_weight(sample_weight, x.shape[0], x.dtype, x.device)
        settings = _settings(method, n_components, n_init, max_steps, tol, batch_size, optimizer, reg_covar, key)
        settings["family"] = spec.name
        settings["init_params"] = type(init_params).__name__  # every rank must take the same branch
    except (ValueError, TypeError) as err:
        error = err
    info = {
        "error": None if error is None else (type(error).__name__, str(error)),
        "n": 0 if x is None else x.shape[0],
        "d": None if x is None else x.shape[1],
        "dtype": None if x is None else str(x.dtype),
        "settings": settings,
    }
    infos = comm.gather_objects(info)
    _agree(infos, comm.rank, error)
    assert x is not None
    cfg = settings
    k, n_total = cfg["n_components"], sum(i["n"] for i in infos)
    _validate.n_components(k, n_total)
    if method == "em" and cfg["reg_covar"] == 0.0:
        _check_constant_features(x, w, comm)
    key_t = _validate.key(key)
    row = get_method(method, in_memory=True)
    n_runs = 1 if row.deterministic and init_params is not None else cfg["n_init"]
    run_keys = driver.restart_keys(key_t, n_runs)
    w = None if w is None else w / comm.gather(w.amax()).amax()  # divided by the largest, as pg.fit does
    shift, s = standardisation(x, w, comm)
    reg = cfg["reg_covar"]
    starts = _initial_params(x, w, comm, spec.name, k, n_total, init_params, init_method, reg, run_keys, (shift, s))
    settings_nt = Settings(method, cfg["max_steps"], cfg["tol"], cfg["batch_size"], optimizer, reg)
    out = driver.run(
        x, w, starts, torch.stack(run_keys), settings_nt, False, standardised=(shift, s), reduce=comm,
        meta={"world_size": comm.world_size}, progress=progress and comm.rank == 0,
        checkpoint=checkpoint if comm.rank == 0 else None, checkpoint_every=checkpoint_every, resume=resume,
    )  # fmt: skip
    return driver.best_of(out, stacklevel=4)


def _fit_streamed(
    data: Any, n_components: int, family: str, comm: Collective, *, method: str, max_steps: Any, tol: Any,
    reg_covar: Any, init_params: Any, init_method: str, key: Any, progress: bool, checkpoint: Any,
    checkpoint_every: int, resume: Any, other: tuple[Any, ...], chunk_size: int | None,
) -> FitResult:  # fmt: skip
    """:func:`fit_distributed` of a rank's part of data larger than memory (a ``.npy`` path, a
    memory map, a stream): every rank streams its own part in chunks and each EM pass's
    statistics are all-reduced, so a rank holds one chunk at a time, never its whole shard.
    The start: :func:`puregmm.init` on a sample of at most ``max(INIT_ROWS, 20·K)`` rows of
    every rank (all rows when they are fewer: then it equals ``pg.init`` on the whole data)."""
    if method != "em" or any(v not in (None, 1) for v in other):
        raise ValueError(
            "a streamed distributed fit runs method='em' without batch_size, n_init > 1, sample_weight or optimizer"
        )
    spec = get_family(family)
    k = _validate.positive_int(n_components, "n_components")
    key_t = _validate.key(key)
    if not isinstance(init_params, GMMParams):
        src = stream.Source(data, chunk_size, None)
        sample = src.sample(max(INIT_ROWS, 20 * k), key_t)
        n_sample = int(comm.sum(torch.tensor(sample.shape[0], dtype=torch.int64)))
        scaled = standardisation(sample, None, comm)
        reg = _validate.reg_covar(reg_covar)
        starts = _initial_params(
            sample, None, comm, spec.name, k, n_sample, init_params, init_method, reg, [key_t], scaled
        )
        init_params = pytree.tree_map(lambda t: t[0], starts)
    return stream.fit_stream(
        data, k, spec.name, method="em", init_params=init_params, max_steps=max_steps, tol=tol, reg_covar=reg_covar,
        key=key_t, progress=progress and comm.rank == 0, checkpoint=checkpoint if comm.rank == 0 else None,
        checkpoint_every=checkpoint_every, resume=resume, reduce=comm, chunk_size=chunk_size,
    )  # fmt: skip


def _settings(
    method: Any, k: Any, n_init: Any, max_steps: Any, tol: Any, batch_size: Any, optimizer: Any, reg: Any, key: Any
) -> dict[str, Any]:
    """Checked settings as a JSON-able dict (compared across ranks)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"n_components must be a positive int; got {k!r}")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int; got {n_init!r}")
    reg = _validate.reg_covar(reg)
    if method == "em":
        if batch_size is not None or optimizer is not None:
            raise ValueError("batch_size and optimizer apply to method='gd' only; EM uses the whole data each step")
        steps = EM_MAX_STEPS if max_steps is None else _validate.positive_int(max_steps, "max_steps")
        tol_v = EM_TOL if tol is None else _validate.non_negative(tol, "tol")
    else:
        steps = GD_MAX_STEPS if max_steps is None else _validate.positive_int(max_steps, "max_steps")
        tol_v = GD_TOL if tol is None else _validate.non_negative(tol, "tol")
        if batch_size is not None:
            batch_size = _validate.positive_int(batch_size, "batch_size")
    return {
        "method": method,
        "n_components": k,
        "n_init": n_init,
        "max_steps": steps,
        "tol": tol_v,
        "batch_size": batch_size,
        "reg_covar": reg,
        "key": int(_validate.key(key)),
        "optimizer": None if optimizer is None else type(optimizer).__name__,
    }


def _agree(infos: list[dict[str, Any]], rank: int, error: Exception | None) -> None:
    """Raise on every rank when any rank's input was bad or the ranks disagree."""
    bad = [(r, i["error"]) for r, i in enumerate(infos) if i["error"] is not None]
    if bad:
        if error is not None:
            raise error
        r, (kind, msg) = bad[0]
        cls = TypeError if kind == "TypeError" else ValueError
        raise cls(f"rank {r} rejected its input: {msg}")
    for field in ("d", "dtype", "settings"):
        values = [i[field] for i in infos]
        if any(v != values[0] for v in values):
            raise ValueError(
                f"ranks disagree on {field}: {values}; every rank must pass data with the same number of "
                "columns and dtype, and the same settings"
            )


def _check_constant_features(x: Tensor, w: Tensor | None, comm: Collective) -> None:
    """reg_covar=0 with EM: refuse columns constant over the (positively weighted) global data."""
    rows = x if w is None else x[w > 0]
    big = torch.finfo(x.dtype).max
    lo = rows.amin(0) if rows.shape[0] else torch.full_like(x[0], big)
    hi = rows.amax(0) if rows.shape[0] else torch.full_like(x[0], -big)
    los, his = comm.gather((lo, hi))
    constant = torch.nonzero(his.amax(0) <= los.amin(0)).flatten().tolist()
    if constant:
        raise ValueError(
            f"reg_covar=0 with constant features (columns {constant[:5]}): every covariance would be "
            "singular; use reg_covar > 0 (e.g. 1e-6) or drop those columns"
        )


def _initial_params(
    x: Tensor,
    w: Tensor | None,
    comm: Collective,
    family: str,
    k: int,
    n_total: int,
    init_params: Any,
    init_method: str,
    reg_covar: float,
    run_keys: list[Tensor],
    standardised: tuple[Tensor, Tensor],
) -> GMMParams:
    """Stacked start params [R, ...], identical on every rank (rank 0's, broadcast). The init
    runs on the gathered sample standardised by the global (shift, scale), as :func:`puregmm.fit`
    runs it on its standardised data, so that with every row in the sample the two agree."""
    if isinstance(init_params, GMMParams):
        p = init_params
        if p.family != family or p.n_components != k or p.dim != x.shape[1] or p.batch_shape:
            raise ValueError(
                f"init_params is {p!r} but the fit asks for family={family!r}, K={k}, D={x.shape[1]} (unbatched)"
            )
        for name in ("logits", "means", "scale"):
            _validate.finite(getattr(p, name).reshape(1, -1), f"init_params.{name}")
        starts = [p] * len(run_keys)
    else:
        means = None
        if init_params is not None:
            means = _validate.means(init_params, k, x.shape[1], x.dtype, x.device, "init_params")
        xs, ws = _gather_sample(x, w, comm, n_total, max(INIT_ROWS, 20 * k), run_keys[0])
        shift, s = standardisation(xs, ws) if n_total > xs.shape[0] else standardised
        zs, reg = (xs - shift) / s, float(standardised_reg(reg_covar, s))
        z_means = None if means is None else (means - shift) / s

        def start(rk: Tensor) -> GMMParams:
            p = init_params_from(
                zs, k, family, key=rk, method=init_method, means=z_means, reg_covar=reg, sample_weight=ws
            )
            return affine(p, s, shift)

        starts = [start(rk) for rk in run_keys]
    stacked = pytree.tree_map(lambda *t: torch.stack(t), *starts)
    return comm.broadcast(stacked, 0)  # type: ignore[no-any-return]


def _gather_sample(
    x: Tensor, w: Tensor | None, comm: Collective, n_total: int, target: int, key: Tensor
) -> tuple[Tensor, Tensor | None]:
    """The same sample (rows and weights) on every rank: all rows if ``n_total <= target``, else
    about ``target·n_r/N`` rows of each rank drawn without replacement, in rank and row order."""
    n = x.shape[0]
    if n_total <= target:
        idx = torch.arange(n, device=x.device)
    else:
        m = min(n, max(1, math.ceil(target * n / n_total)))
        u = keys.uniform(keys.fold_in(key, comm.rank), torch.arange(n)).to(x.device)
        idx = torch.argsort(u)[:m].sort().values
    m = idx.shape[0]
    m_max = int(comm.gather(torch.tensor(m, dtype=torch.int64, device=x.device)).max())
    pad = m_max - m
    xs = torch.cat([x.index_select(0, idx), x.new_zeros(pad, x.shape[1])])
    ws = torch.ones(m, dtype=x.dtype, device=x.device) if w is None else w.index_select(0, idx)
    ws = torch.cat([ws, ws.new_zeros(pad)])
    counts, xg, wg = comm.gather((torch.tensor(m, dtype=torch.int64, device=x.device), xs, ws))
    rows = torch.cat([xg[r, : int(c)] for r, c in enumerate(counts.tolist())])
    weights = torch.cat([wg[r, : int(c)] for r, c in enumerate(counts.tolist())])
    return rows, None if w is None else weights
