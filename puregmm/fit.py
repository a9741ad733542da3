"""``fit`` and ``fit_batched``: the front doors. They validate, pick the data source and hand
over to the one driver (:mod:`puregmm.driver`); they own no maths and no loop.

In-memory data run :func:`puregmm.driver.fit_in_memory`; a ``.npy`` path, a memory map or a
stream of batches runs :func:`puregmm.stream.fit_stream`; a rank's shard under an initialised
``torch.distributed`` group runs :func:`puregmm.distributed.fit_distributed`. Every method is a
row of :data:`puregmm.methods.METHODS`, run on standardised data and mapped back exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, driver, stream
from puregmm import distributed as dist
from puregmm import missing as _missing
from puregmm.families import get_family
from puregmm.init import init_batched
from puregmm.methods import (
    EM_MAX_STEPS,
    EM_TOL,
    GD_MAX_STEPS,
    GD_TOL,
    GD_WINDOW,
    ConvergenceWarning,
    EMState,
    FitResult,
    em_advance,
    em_state,
    gd_advance,
    get_method,
    minibatch_indices,
    standardisation,
    standardised_reg,
    warn_if_not_converged,
)
from puregmm.params import GMMParams, pad_components

__all__ = [
    "EM_MAX_STEPS", "EM_TOL", "GD_MAX_STEPS", "GD_TOL", "GD_WINDOW", "ConvergenceWarning", "EMState", "FitResult",
    "em_advance", "em_state", "fit", "fit_batched", "gd_advance", "minibatch_indices", "warn_if_not_converged",
]  # fmt: skip
METHODS = ("em", "gd", "online_em")  # online_em: streams only (puregmm.stream)


def fit(
    data: Any,
    n_components: int,
    family: str = "full",
    *,
    method: str = "em",
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
    missing: str = "raise",
) -> FitResult:
    """Fit a K-component mixture to ``data`` [N, D].

    Args:
        data: [N, D] array-like; integer data is converted to floats, dtype/device follow it.
        n_components: K, at most N.
        family: one of :data:`puregmm.FAMILIES`.
        method: ``"em"`` (expectation-maximisation, :func:`puregmm.em_step`; scikit-learn's
            algorithm, the default) or ``"gd"`` (Adam on the mean NLL; what a mixture inside a
            larger model trained by gradients uses).
        max_steps: step limit, counting steps before a resumed checkpoint; ``None`` means 5000
            for ``"gd"``, 100 for ``"em"``.
        tol: ``"gd"`` stops when the loss varied less than ``tol·max(1, |loss|)`` over the
            last 20 steps (``None``: 1e-7); ``"em"`` stops when the mean log-likelihood changed
            by less than ``tol`` in one step (``None``: 1e-3, scikit-learn's rule).
        batch_size: mini-batch size for ``"gd"`` (``None``: full batch). Batches follow a
            permutation per epoch drawn from ``(key, epoch)`` inside the step.
        n_init: restarts, run together as one batched fit; restart 0 uses ``key`` itself and
            restart r ≥ 1 ``fold_in(key, r)``, so raising ``n_init`` never lowers the fit; the
            lowest final loss wins.
        reg_covar: added to the diagonal of every covariance by the M-step (``"em"`` and
            :func:`puregmm.init`), scikit-learn's ``reg_covar``.
        init_params: start from these params instead of :func:`puregmm.init`, or from these
            means [K, D] only (weights and covariances from the points nearest to them, as
            scikit-learn's ``means_init``).
        init_method: :func:`puregmm.init`'s ``method`` when ``init_params`` is not given; the
            default ``"kmeans"`` (k-means++ seeds, then Lloyd) is scikit-learn's default.
        sample_weight: [N] non-negative weights (not all zero); a weighted fit equals a fit on
            rows repeated by integer weights, and does not depend on the weights' scale.
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
        missing: ``"raise"`` (a ValueError naming the first NaN entry) or ``"marginalize"``: NaN
            entries are missing at random and integrated out (:mod:`puregmm.missing`: EM is the
            exact EM for incomplete data, ``"gd"`` follows the observed-data likelihood's
            gradient; in-memory data, one process). Data without NaN fit as with ``"raise"``.

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
    >>> holes = torch.where(torch.rand(400, 2) < 0.2, torch.nan, x)  # 20 % of the entries missing
    >>> sorted(round(float(m), 0) for m in pg.fit(holes, 2, "diagonal", missing="marginalize").params.means[:, 0])
    [-3.0, 3.0]
    """
    in_memory = not stream.is_stream(data) and not (distributed and dist.is_active())
    options: dict[str, Any] = dict(
        method=method, max_steps=max_steps, tol=tol, batch_size=batch_size, n_init=n_init, reg_covar=reg_covar,
        init_params=init_params, init_method=init_method, sample_weight=sample_weight, optimizer=optimizer, key=key,
        progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
    )  # fmt: skip
    if _missing.check(missing) == "marginalize":
        if not in_memory:
            raise ValueError("missing='marginalize' fits in-memory data in one process; got a stream or a shard")
        return _missing.fit_missing(data, n_components, family, **options)
    if in_memory:
        _missing.split(data, "raise", "data")  # a ValueError naming the first NaN entry
    if distributed and dist.is_active():
        return dist.fit_distributed(data, n_components, family, **options)
    if method == "online_em" or (method == "em" and stream.is_stream(data)):  # a data source, not a method branch
        if sample_weight is not None or batch_size is not None or optimizer is not None or n_init != 1:
            raise ValueError("streamed fits take no sample_weight, batch_size, optimizer or n_init > 1")
        for unused in ("sample_weight", "batch_size", "optimizer", "n_init"):
            del options[unused]
        return stream.fit_stream(data, n_components, family, **options)
    return driver.fit_data(data, n_components, family, **options)


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
        m = _validate.mask(mask, b, n, x.device)
    x = torch.where(m.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    _validate.finite(x.reshape(b * n, d), "xs (real rows)")
    counts = m.sum(-1)
    ks = _components_per_dataset(n_components, counts)
    w = None if mask is None else m.to(x.dtype)
    cfg = driver.settings(method, max_steps, tol, batch_size, optimizer, reg_covar, x[0], None)
    if keys is None:
        run_keys = _validate.key(key).expand(b).clone()
    else:
        run_keys = _validate.batch_keys(keys, b)
    shift, s = torch.func.vmap(standardisation)(x, m.to(x.dtype))  # [B, D], [B]
    if not get_method(method).per_run_scale:
        s = s.amax().expand(b)
    if init_params is not None:
        _validate.params(init_params, "init_params")
        if init_params.batch_shape != (b,) or init_params.family != spec.name or init_params.dim != d:
            raise ValueError(
                f"init_params must be {spec.name!r} GMMParams with batch shape ({b},) and D={d}; got {init_params!r}"
            )
        _validate.data_shape(init_params, x, "xs")
        if init_params.n_components != max(ks):
            raise ValueError(f"init_params has K={init_params.n_components} components; the fit asks for {max(ks)}")
        starts = init_params
    else:
        real = None if mask is None else m  # vmapped init kernels: dataset i gets init(x[i][m[i]], key=run_keys[i])
        z = torch.where(m.unsqueeze(-1), (x - shift.unsqueeze(1)) / s[:, None, None], 0.0)
        reg = standardised_reg(cfg.reg_covar, s)  # [B]: one per dataset
        starts = _init_per_k(z, ks, spec.name, run_keys, init_method, real, reg)  # standardised units
    out = driver.run(
        x, w, starts, run_keys, cfg, True, standardised=(shift, s), progress=progress, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, resume=resume, starts_standardised=init_params is None,
    )  # fmt: skip
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
    x: Tensor, ks: list[int], family: str, run_keys: Tensor, method: str, mask: Tensor | None, reg_covar: float | Tensor
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
