"""``fit`` and ``fit_batched``: validate, initialise, run a pure kernel to convergence, report.

The front doors own no maths: gradient descent advances :func:`puregmm.step`, EM advances
:func:`puregmm.em_step`, and both go through the one loop of :mod:`puregmm.loop`, which runs
B independent runs at once (a single fit is B = 1; ``n_init`` restarts and ``fit_batched``
stack along a leading axis under ``torch.func.vmap``). Gradient descent runs on standardised
data (x - mean) / s, with s the root mean per-dimension variance, so the default learning
rate suits data of any scale and location; params and losses are mapped back exactly (the
log-density shifts by D log s).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, keys, loop
from puregmm.density import loss as nll
from puregmm.em import em_step, sufficient_stats
from puregmm.families import get_family
from puregmm.init import init, init_batched
from puregmm.params import GMMParams, pad_components
from puregmm.train import TrainState, init_state, step

METHODS = ("gd", "em", "online_em")  # online_em: streams only (puregmm.stream)
GD_MAX_STEPS = 5000
GD_TOL = 1e-7
GD_WINDOW = 20
EM_MAX_STEPS = 100  # scikit-learn's max_iter
EM_TOL = 1e-3  # scikit-learn's tol, on the change of the mean log-likelihood


class ConvergenceWarning(UserWarning):
    """A fit stopped at ``max_steps`` before meeting ``tol``.

    A warning, not an error (scikit-learn's rule): the result is still returned, with
    ``converged=False``. Its message lists the usual fixes.

    >>> import warnings, torch, puregmm as pg
    >>> x = torch.randn(200, 2, dtype=torch.float64)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     r = pg.fit(x, 3, method="em", max_steps=1, tol=0.0)
    >>> any(w.category is pg.ConvergenceWarning for w in caught), r.converged
    (True, False)
    """


@dataclass(frozen=True)
class FitResult:
    """What a fit returns; from :func:`fit_batched` every field carries a leading batch dim B.

    Attributes:
        params: the fitted params (leaves [B, ...] when batched).
        loss: final mean negative log-likelihood on the whole data (0-d, or [B]).
        n_steps: steps taken (int, or [B] int64).
        converged: whether the tolerance was met before ``max_steps`` (bool, or [B]).
        n_resets: components reset: singularities or empty components (int, or [B]).
        history: loss after each step ([n_steps], or [B, T] padded with NaN once a run stopped);
            mini-batch loss when ``batch_size`` is set.

    >>> import torch, puregmm as pg
    >>> x = torch.cat([torch.randn(100, 2) - 3, torch.randn(100, 2) + 3]).double()
    >>> r = pg.fit(x, 2, method="em")
    >>> r.params, r.converged, r.history.shape[0] == r.n_steps
    (GMMParams(family='full', K=2, D=2, dtype=float64, device=cpu), True, True)
    """

    params: GMMParams
    loss: Tensor
    n_steps: Any
    converged: Any
    n_resets: Any
    history: Tensor


class EMState(NamedTuple):
    """The EM loop's state: everything a checkpoint needs to resume a run exactly.

    Attributes:
        params: current params.
        step: 0-d int64, EM steps taken.
        loss: 0-d, mean NLL of the E-step of the last step (NaN before any step).
        n_resets: 0-d int64, components re-seeded or repaired so far.
        key: 0-d int64, the run's key (EM itself draws nothing; init and restarts do).

    >>> import torch, puregmm as pg
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> state = pg.em_state(pg.init(x, 2, "full"), key=5)
    >>> state.step, state.loss, state.key
    (tensor(0), tensor(nan, dtype=torch.float64), tensor(5))
    """

    params: GMMParams
    step: Tensor
    loss: Tensor
    n_resets: Tensor
    key: Tensor


def em_state(params: GMMParams, key: Any = 0) -> EMState:
    """A fresh :class:`EMState` at ``params``.

    Args:
        params: the starting params.
        key: int or 0-d int64 tensor, stored for restarts and checkpoints.

    Returns:
        an :class:`EMState` with ``step=0``, ``n_resets=0`` and ``loss=NaN``.

    >>> import torch, puregmm as pg
    >>> pg.em_state(pg.init(torch.randn(50, 1), 2, "isotropic")).step
    tensor(0)
    """
    zero = torch.zeros((), dtype=torch.int64)
    nan = torch.full((), float("nan"), dtype=params.dtype, device=params.device)
    return EMState(params, zero, nan, zero, _validate.key(key))


def em_advance(state: EMState, x: Tensor, sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6) -> EMState:
    """One EM step on an :class:`EMState` (pure; what the fitting loop vmaps)."""
    params, info = em_step(state.params, x, reg_covar=reg_covar, sample_weight=sample_weight, return_info=True)
    return EMState(params, state.step + 1, -info.log_likelihood, state.n_resets + info.n_resets, state.key)


def minibatch_indices(key: Tensor, step_count: Tensor, n: int, batch_size: int) -> Tensor:
    """Rows [batch_size] for step t: a permutation per epoch drawn from ``(key, epoch)``, cut into
    ``n // batch_size`` batches (the remainder of an epoch is skipped; every epoch reshuffles)."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = step_count // per_epoch, step_count % per_epoch
    perm = torch.argsort(keys.uniform(key, epoch, torch.arange(n)))
    return torch.gather(perm, 0, pos * batch_size + torch.arange(batch_size))


def gd_advance(state: TrainState, z: Tensor, sample_weight: Tensor | None = None, *, batch_size: int | None = None):
    """One gradient step on standardised data ``z`` (a mini-batch of it when ``batch_size``)."""
    if batch_size is not None:
        idx = minibatch_indices(state.key, state.step, z.shape[0], batch_size)
        z = torch.index_select(z, 0, idx)
        sample_weight = None if sample_weight is None else torch.index_select(sample_weight, 0, idx)
    return step(state, z, sample_weight)


def fit(
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
    distributed: bool = False,
) -> FitResult:
    """Fit a K-component mixture to ``data`` [N, D].

    Args:
        data: [N, D] array-like; integer data is converted to floats, dtype/device follow it.
        n_components: K, at most N.
        family: one of :data:`puregmm.FAMILIES`.
        method: ``"gd"`` (Adam on the mean NLL, the default) or ``"em"``
            (expectation-maximisation, :func:`puregmm.em_step`; scikit-learn's algorithm).
        max_steps: step limit, counting steps before a resumed checkpoint; ``None`` means 5000
            for ``"gd"``, 100 for ``"em"``.
        tol: ``"gd"`` stops when the loss varied less than ``tol·max(1, |loss|)`` over the
            last 20 steps (``None``: 1e-7); ``"em"`` stops when the mean log-likelihood changed
            by less than ``tol`` in one step (``None``: 1e-3, scikit-learn's rule).
        batch_size: mini-batch size for ``"gd"`` (``None``: full batch). Batches follow a
            permutation per epoch drawn from ``(key, epoch)`` inside the step.
        n_init: restarts with keys ``fold_in(key, r)``, run together as one batched fit; the
            lowest final loss wins.
        reg_covar: added to the diagonal of every covariance by the M-step (``"em"`` and
            :func:`puregmm.init`), scikit-learn's ``reg_covar``.
        init_params: start from these params instead of :func:`puregmm.init`, or from these
            means [K, D] only (weights and covariances from the points nearest to them, as
            scikit-learn's ``means_init``).
        init_method: :func:`puregmm.init`'s ``method`` when ``init_params`` is not given; the
            default ``"kmeans"`` (k-means++ seeds, then Lloyd) is scikit-learn's default.
        sample_weight: [N] non-negative weights (not all zero); a weighted fit equals a fit on
            rows repeated by integer weights.
        optimizer: a :class:`puregmm.Optimizer` for ``"gd"``; ``None``: the default Adam.
        key: int or 0-d int64 tensor; all randomness derives from it.
        progress: show a tqdm progress bar.
        checkpoint: path; the whole loop state (every restart's params, optimiser state, step,
            key, resets, last loss, history) is saved there atomically every
            ``checkpoint_every`` steps and at the end.
        resume: path of a checkpoint of the same fit (same data shape, family, method,
            settings) to continue from; the result is bitwise identical to an uninterrupted run.
        distributed: ``data`` is this rank's shard of a data-parallel fit over the initialised
            ``torch.distributed`` group (:func:`puregmm.distributed.fit_distributed`); a no-op
            without one.

    Data larger than memory: a ``.npy`` path, an ``np.memmap``, or a callable returning an
    iterator of batches goes to :func:`puregmm.stream.fit_stream` (chunked full-batch EM,
    ``method="em"``; or one pass of stepwise EM, ``method="online_em"``).

    Returns:
        :class:`FitResult`.

    Raises:
        ValueError: bad data (see :func:`puregmm.init`), bad weights, unknown family/method,
            ``batch_size``/``optimizer`` with ``"em"``, ``reg_covar=0`` with ``"em"`` on data
            with a constant feature, or a checkpoint of a different fit.

    Warns:
        ConvergenceWarning: the best run stopped at ``max_steps`` before meeting ``tol``.

    >>> import torch, puregmm as pg
    >>> x = torch.cat([torch.randn(200, 2) - 3, torch.randn(200, 2) + 3])
    >>> r = pg.fit(x, 2, "diagonal", method="em")
    >>> r.converged, sorted(round(float(m), 0) for m in pg.means(r.params)[:, 0])
    (True, [-3.0, 3.0])
    """
    if distributed:
        from puregmm import distributed as dist

        if dist.is_active():
            return dist.fit_distributed(
                data, n_components, family, method=method, max_steps=max_steps, tol=tol, batch_size=batch_size,
                n_init=n_init, reg_covar=reg_covar, init_params=init_params, init_method=init_method,
                sample_weight=sample_weight, optimizer=optimizer, key=key, progress=progress,
                checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
            )  # fmt: skip
    from puregmm import stream

    if method == "online_em" or (method == "em" and stream.is_stream(data)):
        if sample_weight is not None or batch_size is not None or optimizer is not None or n_init != 1:
            raise ValueError("streamed fits take no sample_weight, batch_size, optimizer or n_init > 1")
        return stream.fit_stream(
            data, n_components, family, method=method, init_params=init_params, init_method=init_method,
            max_steps=max_steps, tol=tol, reg_covar=reg_covar, key=key, progress=progress,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
        )  # fmt: skip
    spec = get_family(family)
    x = _validate.data(data, "data")
    k = _validate.n_components(n_components, x.shape[0])
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int; got {n_init!r}")
    w = None if sample_weight is None else _validate.sample_weight(sample_weight, x.shape[0], x.dtype, x.device)
    cfg = _settings(method, max_steps, tol, batch_size, optimizer, reg_covar, x, w)
    init_means = None
    if isinstance(init_params, GMMParams):
        _check_init_params(init_params, spec.name, k, x)
    elif init_params is not None:
        init_means = _validate.means(init_params, k, x.shape[1], x.dtype, x.device, "init_params")
    key = _validate.key(key)
    # EM from given params is deterministic: restarts would repeat the same run.
    n_runs = 1 if method == "em" and init_params is not None else n_init
    run_keys = [key] if n_runs == 1 else [keys.fold_in(key, r) for r in range(n_runs)]
    starts = [
        init_params
        if isinstance(init_params, GMMParams)
        else init(
            x, k, spec.name, key=rk, method=init_method, means=init_means, reg_covar=cfg.reg_covar, sample_weight=w
        )
        for rk in run_keys
    ]
    out = _run(x, w, _stack(starts), torch.stack(run_keys), cfg, False, progress, checkpoint, checkpoint_every, resume)
    best = int(torch.argmin(torch.nan_to_num(out.loss, nan=math.inf)))
    n = int(out.n_steps[best])
    result = FitResult(
        _index(out.params, best),
        out.loss[best],
        n,
        bool(out.converged[best]),
        int(out.n_resets[best]),
        out.history[best, :n],
    )
    warn_if_not_converged(result)
    return result


def fit_batched(
    xs: Any,
    n_components: int | Sequence[int] | Tensor,
    family: str = "full",
    *,
    method: str = "em",
    mask: Any = None,
    key: Any = 0,
    keys: Any = None,
    max_steps: int | None = None,
    tol: float | None = None,
    batch_size: int | None = None,
    reg_covar: float = 1e-6,
    init_params: GMMParams | None = None,
    init_method: str = "kmeans",
    optimizer: Any = None,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int = 100,
    resume: Any = None,
) -> FitResult:
    """Fit B independent mixtures to B datasets ``xs`` [B, N, D] in one vectorised loop.

    The same kernels as :func:`fit` run under ``torch.func.vmap``; each dataset stops updating
    once it has converged, so dataset b's result equals ``fit(xs[b][mask[b]], ..., key=...)``
    (full-batch; mini-batches also draw padded rows). One exception: where a component gets
    narrower than ~1e-4 of its mean's distance from the data's centre (``reg_covar=0`` on
    degenerate data), a single eager fit switches its E-step to per-component whitening and a
    vmapped one cannot, so the two then agree only to ~1e-16·(distance / width)² nats
    (:mod:`puregmm._moments`, "Precision").

    The arguments not listed below (``family``, ``method``, ``max_steps``, ``tol``,
    ``batch_size``, ``reg_covar``, ``init_method``, ``optimizer``, ``progress``, ``checkpoint``,
    ``checkpoint_every``, ``resume``) are :func:`fit`'s.

    Args:
        xs: [B, N, D] data (``x.expand(B, -1, -1)`` fits one dataset B times without a copy).
        n_components: K for every dataset, or one K per dataset ([B] ints): a sweep over K in
            one batch. Dataset b then gets K_max = max K components of which the last
            K_max - K_b are masked (logit -inf: weight 0, never updated or re-seeded), and its
            result equals the K_b-component fit.
        mask: [B, N] bool, True for real rows (ragged datasets); padded rows are ignored (they
            may hold anything, NaN included). ``None``: every row is real.
        key: one key for every dataset; ``keys`` [B] gives each its own.
        init_params: params with leaves [B, ...] to start from instead of :func:`puregmm.init`.

    Returns:
        :class:`FitResult` with a leading batch dim B on every field.

    >>> import torch, puregmm as pg
    >>> xs = torch.randn(4, 100, 2) + torch.arange(4.0)[:, None, None]
    >>> r = pg.fit_batched(xs, 1, "diagonal")
    >>> r.loss.shape, r.params.means.shape
    (torch.Size([4]), torch.Size([4, 1, 2]))
    """
    spec = get_family(family)
    x = _validate.as_float_tensor(xs, "xs")
    if x.dim() != 3 or 0 in x.shape:
        raise ValueError(f"xs must be a non-empty [B, N, D] tensor; got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if mask is None:
        m = torch.ones(b, n, dtype=torch.bool, device=x.device)
    else:
        m = torch.as_tensor(mask, device=x.device)
        if m.dtype != torch.bool or tuple(m.shape) != (b, n):
            raise ValueError(f"mask must be a bool tensor of shape ({b}, {n}); got {m.dtype} {tuple(m.shape)}")
    x = torch.where(m.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    _validate.finite(x.reshape(b * n, d), "xs (real rows)")
    counts = m.sum(-1)
    ks = _components_per_dataset(n_components, counts)
    w = None if mask is None else m.to(x.dtype)
    cfg = _settings(method, max_steps, tol, batch_size, optimizer, reg_covar, x[0], None)
    if keys is None:
        run_keys = _validate.key(key).expand(b).clone()
    else:
        run_keys = torch.as_tensor(keys)
        if run_keys.dtype != torch.int64 or tuple(run_keys.shape) != (b,):
            raise ValueError(
                f"keys must be an int64 tensor of shape ({b},); got {run_keys.dtype} {tuple(run_keys.shape)}"
            )
    if init_params is not None:
        if not isinstance(init_params, GMMParams) or init_params.batch_shape != (b,):
            raise ValueError(f"init_params must be GMMParams with batch shape ({b},); got {init_params!r}")
        if init_params.n_components != max(ks):
            raise ValueError(f"init_params has K={init_params.n_components} components; the fit asks for {max(ks)}")
        _validate.logits(init_params.logits, "init_params.logits")
        starts = init_params
    else:
        real = None if mask is None else m  # vmapped init kernels: dataset i gets init(x[i][m[i]], key=run_keys[i])
        starts = _init_per_k(x, ks, spec.name, run_keys, init_method, real, cfg.reg_covar)
    out = _run(x, w, starts, run_keys, cfg, True, progress, checkpoint, checkpoint_every, resume)
    if not bool(out.converged.all()):
        warnings.warn(
            f"{int((~out.converged).sum())} of {b} fits stopped at max_steps without meeting tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return out


def _components_per_dataset(n_components: Any, counts: Tensor) -> list[int]:
    """[B] ints from one K or B of them, each in 1..(real rows of its dataset)."""
    b = counts.shape[0]
    if isinstance(n_components, Tensor):
        n_components = n_components.tolist()
    if isinstance(n_components, (list, tuple)):
        if len(n_components) != b:
            raise ValueError(f"n_components must be one int or {b} of them (one per dataset); got {len(n_components)}")
        values = list(n_components)
    else:
        values = [n_components] * b
    per = counts.tolist()
    return [_validate.n_components(kb, nb) for kb, nb in zip(values, per, strict=True)]


def _init_per_k(
    x: Tensor, ks: list[int], family: str, run_keys: Tensor, method: str, mask: Tensor | None, reg_covar: float
) -> GMMParams:
    """Batched init: one vmapped :func:`init_batched` per distinct K (so dataset b starts where
    ``init(x[b], K_b, key=keys[b])`` starts), padded to max K with masked components."""
    k_max = max(ks)
    if len(set(ks)) == 1:
        return init_batched(x, k_max, family, keys=run_keys, method=method, mask=mask, reg_covar=reg_covar)
    parts: list[tuple[Tensor, GMMParams]] = []
    for kb in sorted(set(ks)):
        idx = torch.tensor([i for i, v in enumerate(ks) if v == kb], dtype=torch.int64, device=x.device)
        sub_mask = None if mask is None else mask.index_select(0, idx)
        p = init_batched(
            x.index_select(0, idx),
            kb,
            family,
            keys=run_keys.index_select(0, idx.cpu()),
            method=method,
            mask=sub_mask,
            reg_covar=reg_covar,
        )
        parts.append((idx, pad_components(p, k_max)))
    order = torch.argsort(torch.cat([idx for idx, _ in parts]))
    return pytree.tree_map(lambda *leaves: torch.cat(leaves).index_select(0, order), *[p for _, p in parts])


def warn_if_not_converged(result: FitResult, stacklevel: int = 3) -> None:
    """The one :class:`ConvergenceWarning` of a single fit that stopped at ``max_steps``."""
    if not result.converged:
        warnings.warn(
            f"fit stopped at max_steps={result.n_steps} without meeting tol; raise max_steps or tol, "
            "or check the data for duplicated points and outliers",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )


class _Settings(NamedTuple):
    method: str
    max_steps: int
    tol: float
    batch_size: int | None
    optimizer: Any
    reg_covar: float


def _settings(
    method: str, max_steps: Any, tol: Any, batch_size: Any, optimizer: Any, reg_covar: Any, x: Tensor, w: Tensor | None
) -> _Settings:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    reg_covar = _validate.reg_covar(reg_covar)
    if method == "em":
        _check_em_args(x, w, reg_covar, batch_size, optimizer)
        steps = EM_MAX_STEPS if max_steps is None else _validate.positive_int(max_steps, "max_steps")
        return _Settings(
            method, steps, EM_TOL if tol is None else _validate.non_negative(tol, "tol"), None, None, reg_covar
        )
    steps = GD_MAX_STEPS if max_steps is None else _validate.positive_int(max_steps, "max_steps")
    if batch_size is not None:
        batch_size = _validate.positive_int(batch_size, "batch_size")
        batch_size = None if batch_size >= x.shape[0] else batch_size
    tol = GD_TOL if tol is None else _validate.non_negative(tol, "tol")
    return _Settings(method, steps, tol, batch_size, optimizer, reg_covar)


def _stack(trees: list[Any]) -> Any:
    return pytree.tree_map(lambda *t: torch.stack(t), *trees)


def _index(tree: Any, i: int) -> Any:
    return pytree.tree_map(lambda t: t[i], tree)


def _batched_kernel(fn: Callable[..., Any], n_runs: int, data_batched: bool, has_w: bool) -> Callable[..., Any]:
    """``fn(state, x, w)`` over runs stacked on dim 0: ``vmap`` for several, a plain call for one
    (no vmap overhead on the common single fit)."""
    if n_runs > 1:
        return torch.func.vmap(fn, in_dims=(0, 0 if data_batched else None, 0 if data_batched and has_w else None))

    def single(states: Any, x: Tensor, w: Tensor | None) -> Any:
        xs = x[0] if data_batched else x
        ws = w[0] if data_batched and w is not None else w
        out = fn(_index(states, 0), xs, ws)
        return pytree.tree_map(lambda t: t.unsqueeze(0), out)

    return single


def _run(
    x: Tensor,
    w: Tensor | None,
    starts: GMMParams,
    run_keys: Tensor,
    cfg: _Settings,
    data_batched: bool,
    progress: bool,
    checkpoint: Any,
    checkpoint_every: int,
    resume: Any,
) -> FitResult:
    """Run B stacked fits through :func:`puregmm.loop.run`; a batched :class:`FitResult`."""
    b = run_keys.shape[0]
    meta = {
        "method": cfg.method,
        "family": starts.family,
        "n_components": starts.n_components,
        "shape": list(x.shape),
        "dtype": str(x.dtype),
        "runs": b,
        "tol": cfg.tol,
        "batch_size": cfg.batch_size,
        "reg_covar": cfg.reg_covar,
        "keys": run_keys.tolist(),  # the key is part of the fit's identity: resuming under another key is refused
    }
    loop_args = dict(
        progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume, meta=meta
    )
    xdim = 0 if data_batched else None
    wdim = 0 if (data_batched and w is not None) else None
    if cfg.method == "em":
        states = EMState(
            starts,
            torch.zeros(b, dtype=torch.int64),
            torch.full((b,), float("nan"), dtype=x.dtype),
            torch.zeros(b, dtype=torch.int64),
            run_keys,
        )
        kernel = _batched_kernel(functools.partial(em_advance, reg_covar=cfg.reg_covar), b, data_batched, w is not None)
        out = loop.run(
            states,
            lambda s: kernel(s, x, w),
            max_steps=cfg.max_steps,
            converged=loop.em_converged(cfg.tol),
            advance_live=_on_live(kernel, x, w, data_batched),
            **loop_args,
        )
        params = out.states.params
    else:
        shift, s = torch.func.vmap(_moments, in_dims=(xdim, wdim))(x, w) if data_batched else _moments(x, w)
        shift, s = shift.expand(b, -1), s.expand(b)
        z = (x - shift[:, None, :]) / s[:, None, None] if data_batched else (x - shift[0]) / s[0]
        std = torch.func.vmap(_affine)(starts, 1.0 / s, -shift / s.unsqueeze(-1))
        states = _stack([init_state(_index(std, i), cfg.optimizer, key=run_keys[i]) for i in range(b)])
        kernel = _batched_kernel(
            functools.partial(gd_advance, batch_size=cfg.batch_size), b, data_batched, w is not None
        )
        out = loop.run(
            states,
            lambda st: kernel(st, z, w),
            max_steps=cfg.max_steps,
            converged=loop.window_converged(cfg.tol, GD_WINDOW),
            loss_offset=x.shape[-1] * torch.log(s),
            advance_live=_on_live(kernel, z, w, data_batched),
            **loop_args,
        )
        params = torch.func.vmap(_affine)(out.states.params, s, shift)
    score = _em_nll if cfg.method == "em" else nll  # EM: the E-step's log-likelihood, as in the history
    if b == 1 and not data_batched:  # one run: the unbatched kernel keeps its fast in-place path
        final = score(_index(params, 0), x, w).detach().unsqueeze(0)
    else:
        final = torch.func.vmap(score, in_dims=(0, xdim, wdim))(params, x, w).detach()
    return FitResult(
        pytree.tree_map(torch.Tensor.detach, params),
        final,
        out.n_steps,
        out.converged,
        out.states.n_resets,
        out.history.mT.contiguous(),
    )


def _em_nll(params: GMMParams, x: Tensor, w: Tensor | None) -> Tensor:
    """Mean NLL by the E-step's exponential-family pass (:mod:`puregmm._moments`): equal to
    :func:`puregmm.loss` up to rounding (~1e-16·(‖x - g‖/σ)²), faster for the matrix families
    than the whitening, and the same computation as the EM history's values."""
    stats = sufficient_stats(params, x, w)
    return -stats.log_lik_sum / stats.weight_sum


def _on_live(kernel: Callable[..., Any], x: Tensor, w: Tensor | None, data_batched: bool) -> Callable[..., Any]:
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


def _moments(x: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weighted mean [D] and root mean per-dimension variance (0-d) of ``x`` (rows act as counts)."""
    wn = torch.ones_like(x[:, 0]) if w is None else w
    wn = (wn / wn.sum()).unsqueeze(-1)
    shift = (wn * x).sum(0)
    s = (wn * (x - shift).square()).sum(0).mean().sqrt().clamp_min(torch.finfo(x.dtype).tiny)
    return shift, s


def _affine(params: GMMParams, a: Tensor, b: Tensor) -> GMMParams:
    """Params of the data mapped by x -> a·x + b (a > 0 a 0-d tensor): μ -> aμ + b, U -> U / a."""
    raw, log_a = params.scale, torch.log(a)
    if params.spec.scale_ndim == 2:
        d = raw.shape[-1]
        strict = torch.ones(d, d, dtype=torch.bool, device=raw.device).triu(1)
        diag = torch.diagonal(raw, dim1=-2, dim2=-1) - log_a
        raw = torch.where(strict, raw / a, torch.zeros((), dtype=raw.dtype)) + torch.diag_embed(diag)
    else:
        raw = raw - log_a
    return GMMParams(params.logits, params.means * a + b, raw, params.family)


def _check_init_params(params: GMMParams, family: str, k: int, x: Tensor) -> None:
    if not isinstance(params, GMMParams):
        raise TypeError(f"init_params must be GMMParams; got {type(params).__name__}")
    if params.family != family or params.n_components != k or params.dim != x.shape[1] or params.batch_shape:
        raise ValueError(
            f"init_params is {params!r} but the fit asks for family={family!r}, K={k}, D={x.shape[1]} (unbatched)"
        )
    _validate.logits(params.logits, "init_params.logits")
    for name in ("means", "scale"):
        _validate.finite(getattr(params, name).reshape(1, -1), f"init_params.{name}")


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


def _lower(a: Tensor, b: Tensor) -> bool:
    """a < b, with NaN above everything."""
    a_f, b_f = float(a), float(b)
    return (a_f < b_f) or (math.isnan(b_f) and not math.isnan(a_f))
