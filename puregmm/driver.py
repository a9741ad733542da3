"""The one driver of in-memory fits: standardise, initialise, run a method's rows through the
one loop (:mod:`puregmm.loop`), map back, report.

B runs go through together: a single fit is B = 1, ``n_init`` restarts and
:func:`puregmm.fit_batched` stack their runs along a leading axis under ``torch.func.vmap``.
The method is a row of :data:`puregmm.methods.METHODS`; nothing here branches on which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, keys, loop
from puregmm.families import get_family
from puregmm.init import init
from puregmm.methods import (
    FitResult,
    Method,
    Settings,
    affine,
    best_run,
    get_method,
    standardisation,
    standardised_reg,
    warn_if_not_converged,
)
from puregmm.params import GMMParams


def settings(
    method: str, max_steps: Any, tol: Any, batch_size: Any, optimizer: Any, reg_covar: Any, x: Tensor, w: Tensor | None
) -> Settings:
    """Validated :class:`~puregmm.methods.Settings` of a fit on ``x`` (one dataset [N, D])."""
    row = get_method(method, in_memory=True)
    reg_covar = _validate.reg_covar(reg_covar)
    steps = row.max_steps if max_steps is None else _validate.positive_int(max_steps, "max_steps")
    tol = row.tol if tol is None else _validate.non_negative(tol, "tol")
    if not row.batches:  # a whole-data method (EM): no mini-batches, no optimiser
        _check_em_args(x, w, reg_covar, batch_size, optimizer)
    elif batch_size is not None:
        batch_size = _validate.positive_int(batch_size, "batch_size")
        batch_size = None if batch_size >= x.shape[0] else batch_size
    return Settings(method, steps, tol, batch_size, optimizer, reg_covar)


def unit_weights(w: Tensor | None) -> Tensor | None:
    """Sample weights divided by their largest: a fit is invariant to the weights' scale
    (1e-300 … 1e300), and sums of N weights can neither overflow nor underflow."""
    return None if w is None else w / w.amax(-1, keepdim=True)


def fit_data(
    data: Any,
    n_components: int,
    family: str,
    *,
    method: str,
    max_steps: Any,
    tol: Any,
    batch_size: Any,
    n_init: Any,
    reg_covar: Any,
    init_params: Any,
    init_method: str,
    sample_weight: Any,
    optimizer: Any,
    key: Any,
    **loop_args: Any,
) -> FitResult:
    """:func:`puregmm.fit` of in-memory ``data`` (arguments as there): validate, then
    :func:`fit_in_memory`. The single-process path of every front door."""
    spec = get_family(family)
    x = _validate.data(data, "data")
    k = _validate.n_components(n_components, x.shape[0])
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int; got {n_init!r}")
    w = None if sample_weight is None else _validate.sample_weight(sample_weight, x.shape[0], x.dtype, x.device)
    cfg = settings(method, max_steps, tol, batch_size, optimizer, reg_covar, x, w)
    return fit_in_memory(
        x, k, spec.name, cfg=cfg, w=unit_weights(w), n_init=n_init, init_params=init_params,
        init_method=init_method, key=_validate.key(key), **loop_args,
    )  # fmt: skip


def fit_in_memory(
    x: Tensor,
    k: int,
    family: str,
    *,
    cfg: Settings,
    w: Tensor | None,
    n_init: int,
    init_params: Any,
    init_method: str,
    key: Tensor,
    **loop_args: Any,
) -> FitResult:
    """:func:`puregmm.fit` on validated in-memory data ``x`` [N, D]: the best of ``n_init`` runs.

    Restart r starts from ``init(x, key=fold_in(key, r))`` for r ≥ 1 and restart 0 from ``key``
    itself, so raising ``n_init`` never lowers the fit. Initialisation runs on the standardised
    data (:func:`puregmm.methods.standardisation`), where ``init`` is equivariant, so given the
    same key ``fit`` starts where ``init(x, ...)`` does.
    """
    spec = get_family(family)
    init_means = None
    if isinstance(init_params, GMMParams):
        check_init_params(init_params, spec.name, k, x)
    elif init_params is not None:
        init_means = _validate.means(init_params, k, x.shape[1], x.dtype, x.device, "init_params")
    # a deterministic method (EM) from given params: restarts would repeat the same run
    n_runs = 1 if get_method(cfg.method).deterministic and init_params is not None else n_init
    run_keys = restart_keys(key, n_runs)
    shift, s = standardisation(x, w)
    z = (x - shift) / s
    z_means = None if init_means is None else (init_means - shift) / s
    reg = standardised_reg(cfg.reg_covar, s)
    given = isinstance(init_params, GMMParams)
    starts = [  # given: in data units; else the init's, on the standardised data, where the fit runs
        init_params
        if given
        else init(z, k, spec.name, key=rk, method=init_method, means=z_means, reg_covar=float(reg), sample_weight=w)
        for rk in run_keys
    ]
    out = run(
        x, w, stack(starts), torch.stack(run_keys), cfg, False, standardised=(shift, s), starts_standardised=not given,
        **loop_args,
    )  # fmt: skip
    return best_of(out)


def best_of(out: FitResult, stacklevel: int = 6) -> FitResult:
    """The run of batched ``out`` with the lowest final loss, as a single :class:`FitResult`;
    warns when it stopped before meeting ``tol``."""
    best = best_run(out.loss)
    n = int(out.n_steps[best])
    result = FitResult(
        index(out.params, best), out.loss[best], n, bool(out.converged[best]), int(out.n_resets[best]),
        out.history[best, :n],
    )  # fmt: skip
    warn_if_not_converged(result, stacklevel=stacklevel)
    return result


def restart_keys(key: Tensor, n_runs: int) -> list[Tensor]:
    """Keys of ``n_runs`` restarts: the key itself, then ``fold_in(key, r)`` for r ≥ 1."""
    return [key] + [keys.fold_in(key, r) for r in range(1, n_runs)]


def run(
    x: Tensor,
    w: Tensor | None,
    starts: GMMParams,
    run_keys: Tensor,
    cfg: Settings,
    data_batched: bool,
    *,
    standardised: tuple[Tensor, Tensor] | None = None,
    reduce: Any = None,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int = 100,
    resume: Any = None,
    row: Method | None = None,
    starts_standardised: bool = False,
) -> FitResult:
    """Run B stacked fits of ``cfg.method`` from ``starts`` (data units) through
    :func:`puregmm.loop.run` on standardised data; a batched :class:`FitResult` in data units.

    ``standardised``: the (shift, scale) already used for ``starts``' init; computed otherwise.
    ``starts_standardised``: ``starts`` are in those standardised units already (one scale for
    every run), not data units: no round trip through data units.
    ``reduce``: a :class:`puregmm.distributed.Collective` when ``x`` is this rank's shard: the
    standardisation, every step's statistics or gradients and the final loss are reduced over
    the ranks (runs then advance one after another: collectives do not vmap). ``meta``: more
    fields of the fit's identity for a checkpoint. ``row``: the method's row to run instead of
    the table's (e.g. :func:`puregmm.missing.masked_row`, the same kernels given a mask).
    """
    row = get_method(cfg.method) if row is None else row
    b = run_keys.shape[0]
    xdim = 0 if data_batched else None
    wdim = 0 if (data_batched and w is not None) else None
    if standardised is not None:  # [D] and 0-d, or [B, D] and [B]
        shift, s = standardised[0].expand(b, -1), standardised[1].expand(b)
    elif data_batched:
        shift, s = torch.func.vmap(standardisation, in_dims=(0, wdim))(x, w)
    else:
        shift, s = (t.expand(b, *t.shape) for t in standardisation(x, w, reduce))
    if not row.per_run_scale:  # one scale for the batch: reg_covar stays one number
        s = s.amax().expand(b)
    z = (x - shift[:, None, :]) / s[:, None, None] if data_batched else (x - shift[0]) / s[0]
    std_cfg = cfg._replace(reg_covar=standardised_reg(cfg.reg_covar, s[0]))  # EM: one scale for all runs
    std = starts if starts_standardised else per_run(affine, b)(starts, 1.0 / s, -shift / s.unsqueeze(-1))
    if row.vmap_state and b > 1:  # the runs' states in one call
        states = torch.func.vmap(lambda p, k: row.make_state(p, k, std_cfg))(std, run_keys)
    else:
        states = stack([row.make_state(p, k, std_cfg) for p, k in zip(unstack(std), run_keys.unbind(0), strict=True)])
    if reduce is None:
        kernel = batched_kernel(lambda st, zs, ws: row.advance(st, zs, ws, std_cfg), b, data_batched, w is not None)
    else:  # the runs one after another, each step's sums reduced over the ranks

        def kernel(st: Any, zs: Tensor, ws: Tensor | None) -> Any:
            return stack([row.advance(index(st, i), zs, ws, std_cfg, reduce) for i in range(b)])

    meta = {**(meta or {}),
        "method": cfg.method, "family": starts.family, "n_components": starts.n_components,
        "shape": list(x.shape), "dtype": str(x.dtype), "runs": b, "tol": cfg.tol,
        "batch_size": cfg.batch_size, "reg_covar": cfg.reg_covar,
        "keys": run_keys.tolist(),  # the key is part of the fit's identity: resuming under another key is refused
    }  # fmt: skip
    out = loop.run(
        states,
        lambda st: kernel(st, z, w),
        max_steps=cfg.max_steps,
        converged=row.converged(cfg.tol),
        loss_offset=x.shape[-1] * torch.log(s),
        advance_live=None if reduce is not None else on_live(kernel, z, w, data_batched),
        progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, meta=meta,
    )  # fmt: skip
    params = per_run(affine, b)(out.states.params, s, shift)
    z_params = out.states.params
    if reduce is not None or (b == 1 and not data_batched):  # unbatched kernels (fast in-place path)
        final = torch.stack([row.final_loss(index(z_params, i), z, w, reduce).detach() for i in range(b)])
    else:
        score = in_groups(torch.func.vmap(row.final_loss, in_dims=(0, xdim, wdim)), data_batched)
        final = score(z_params, z, w).detach()
    return FitResult(
        pytree.tree_map(torch.Tensor.detach, params),
        final + x.shape[-1] * torch.log(s),
        out.n_steps,
        out.converged,
        out.states.n_resets,
        out.history.mT.contiguous(),
    )


def stack(trees: list[Any]) -> Any:
    return pytree.tree_map(lambda *t: torch.stack(t), *trees)


def index(tree: Any, i: int) -> Any:
    return pytree.tree_map(lambda t: t[i], tree)


def unstack(tree: Any) -> list[Any]:
    """The runs of a tree stacked on dim 0 (``[index(tree, i) for i]``, each leaf split once)."""
    leaves, spec = pytree.tree_flatten(tree)
    return [pytree.tree_unflatten(list(run), spec) for run in zip(*(leaf.unbind(0) for leaf in leaves), strict=True)]


def per_run(fn: Callable[..., Any], n_runs: int) -> Callable[..., Any]:
    """``fn`` over arguments stacked on dim 0: ``vmap`` for several runs, a plain call on run 0
    for one (vmap's per-call overhead is most of a small fit's set-up)."""
    if n_runs > 1:
        return torch.func.vmap(fn)
    return lambda *args: pytree.tree_map(lambda t: t.unsqueeze(0), fn(*index(args, 0)))


def batched_kernel(fn: Callable[..., Any], n_runs: int, data_batched: bool, has_w: bool) -> Callable[..., Any]:
    """``fn(state, x, w)`` over runs stacked on dim 0: ``vmap`` for several, a plain call for one
    (no vmap overhead on the common single fit)."""
    if n_runs > 1:
        vmapped = torch.func.vmap(fn, in_dims=(0, 0 if data_batched else None, 0 if data_batched and has_w else None))
        return in_groups(vmapped, data_batched)

    last: dict[str, Any] = {}  # the previous call's output, stacked and not: the loop hands it back

    def single(states: Any, x: Tensor, w: Tensor | None) -> Any:
        xs = x[0] if data_batched else x
        ws = w[0] if data_batched and w is not None else w
        run = last["run"] if last.get("stacked") is states else index(states, 0)
        out = fn(run, xs, ws)
        leaves, spec = pytree.tree_flatten(out)  # flatten + unflatten: cheaper than tree_map, every step
        last["stacked"], last["run"] = pytree.tree_unflatten([t.unsqueeze(0) for t in leaves], spec), out
        return last["stacked"]

    return single


#: Stacked runs go through a vmapped kernel in groups whose largest per-step block stays below
#: this (sized as a run's [N, (D+1)²] float64 products, the most any family's E-step builds):
#: blocks above glibc's largest mmap threshold (32 MB) are fresh pages on every step, and their
#: page faults cost more than the memory passes (B = 1000, N = 500, D = 2: 36 MB, 9,000 faults).
GROUP_BYTES = 16 << 20


def in_groups(vmapped: Callable[..., Any], data_batched: bool) -> Callable[..., Any]:
    """``vmapped(states, x, w)`` on groups of at most :data:`GROUP_BYTES` worth of runs, concatenated
    (runs are independent under ``vmap``: the same result)."""

    def grouped(states: Any, x: Tensor, w: Tensor | None) -> Any:
        b = pytree.tree_leaves(states)[0].shape[0]
        n, d = x.shape[-2:]
        per_run = max(1, n * (d + 1) ** 2 * 8)
        groups = -(-b * per_run // GROUP_BYTES)
        if groups <= 1:
            return vmapped(states, x, w)
        size = -(-b // groups)
        outs = []
        for start in range(0, b, size):
            part = pytree.tree_map(lambda t, s=start: t[s : s + size], states)
            xs = x[start : start + size] if data_batched else x
            ws = w[start : start + size] if data_batched and w is not None else w
            outs.append(vmapped(part, xs, ws))
        return pytree.tree_map(lambda *t: torch.cat(t), *outs)

    return grouped


def on_live(kernel: Callable[..., Any], x: Tensor, w: Tensor | None, data_batched: bool) -> Callable[..., Any]:
    """``advance_live`` for :func:`puregmm.loop.run`: the kernel on the live runs' rows of the
    data only, so runs that have stopped cost nothing (selected once per live set: it only shrinks)."""
    if not data_batched:
        return lambda states, live: kernel(states, x, w)
    cache: dict[str, Any] = {}

    def advance(states: Any, live: Tensor) -> Any:
        if cache.get("n") != live.numel():
            cache.update(n=live.numel(), x=x.index_select(0, live), w=None if w is None else w.index_select(0, live))
        return kernel(states, cache["x"], cache["w"])

    return advance


def check_init_params(params: GMMParams, family: str, k: int, x: Tensor) -> None:
    """``init_params`` given as GMMParams match the fit (family, K, D, unbatched) and are finite."""
    _validate.params(params, "init_params")
    if params.family != family or params.n_components != k or params.dim != x.shape[1] or params.batch_shape:
        raise ValueError(
            f"init_params is {params!r} but the fit asks for family={family!r}, K={k}, D={x.shape[1]} (unbatched)"
        )
    if params.dtype != x.dtype:
        raise TypeError(f"init_params have dtype {params.dtype} but the data {x.dtype}; cast one with .to(dtype)")


def _check_em_args(x: Tensor, w: Tensor | None, reg_covar: float, batch_size: Any, optimizer: Any) -> None:
    if batch_size is not None or optimizer is not None:
        raise ValueError("batch_size and optimizer apply to method='gd' only; EM uses the whole data each step")
    if reg_covar == 0.0:
        rows = x if w is None else x[w > 0]
        constant = torch.nonzero((rows == rows[:1]).all(0)).flatten().tolist()
        if constant:
            raise ValueError(
                f"reg_covar=0 with constant features (columns {constant[:5]}): every covariance would be "
                "singular; use reg_covar > 0 (e.g. 1e-6) or drop those columns"
            )
