"""Missing values at the entry points: ``missing="raise"`` or ``missing="marginalize"``.

The kernels take an ``observed`` mask (:func:`puregmm.log_prob`, :func:`puregmm.em_step`, ...);
this module turns NaN entries of the data given to :func:`puregmm.fit`, the inference functions
and :func:`puregmm.bic`/:func:`puregmm.aic` into that mask:

* ``"raise"`` (the default): a ``ValueError`` naming the first NaN entry;
* ``"marginalize"``: NaN entries are missing at random and integrated out (a row's density is
  the marginal density of its observed entries; a row with nothing observed has log p = 0 and
  still counts as a row, e.g. in BIC's log N). Data without NaN give exactly the complete-data
  results. ±Inf is never a missing value.

A fit with missing values (:func:`fit_missing`) is the one driver's fit with the method rows
that pass the mask: EM is the exact EM for incomplete data (its E-step's missing mode), gradient
descent follows the gradient of the observed-data likelihood. Standardisation uses each
column's observed entries; initialisation runs on the rows with their missing entries at the
column means (k-means on imputed data), then the fit uses the observed entries only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from puregmm import _masked, _validate, driver
from puregmm.density import component_log_prob
from puregmm.em import em_step, sufficient_stats
from puregmm.families import get_family
from puregmm.init import init
from puregmm.methods import (
    EMState,
    FitResult,
    Method,
    Settings,
    affine,
    get_method,
    minibatch_indices,
    standardised_reg,
)
from puregmm.params import GMMParams
from puregmm.train import TrainState, step

MISSING = ("raise", "marginalize")

__all__ = ["MISSING", "check", "fit_missing", "joint", "masked_row", "raise_on_nan", "split"]


def check(missing: Any) -> str:
    """``missing`` if it is one of :data:`MISSING`, else a ``ValueError`` listing them."""
    if not isinstance(missing, str) or missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}; got {missing!r}")
    return missing


def raise_on_nan(x: Tensor, name: str = "x") -> None:
    """``ValueError`` naming the first NaN entry of ``x`` (and the fix), if any."""
    nan = torch.isnan(x)
    if bool(nan.any()):
        first = tuple(torch.nonzero(nan)[0].tolist())
        raise ValueError(
            f"{name} holds NaN at index {first} ({int(nan.sum())} NaN entries in all); pass missing='marginalize' "
            "to integrate missing entries out, or impute them first (pg.impute)"
        )


def split(x: Any, missing: Any, name: str = "x", params: GMMParams | None = None) -> tuple[Any, Tensor | None]:
    """(``x``, observed mask or None) for an entry point's ``missing=``.

    ``"raise"``: ``x`` as given, after refusing NaN. ``"marginalize"``: a tensor with its NaN
    entries set to 0 (ignored) and the mask ``~isnan(x)``, or None when nothing is missing (the
    complete-data path, unchanged). Array-likes are converted to ``params``' dtype and device
    (``params`` checked first).
    """
    if params is not None:
        _validate.params(params)
    check(missing)
    dtype, device = (None, None) if params is None else (params.dtype, params.device)
    t = x if isinstance(x, Tensor) else _validate.as_float_tensor(x, name, dtype).to(device)
    if missing == "raise":
        raise_on_nan(t, name)
        return x, None
    observed = ~torch.isnan(t)
    if bool(observed.all()):
        return x, None
    return torch.where(observed, t, torch.zeros((), dtype=t.dtype, device=t.device)), observed


def joint(params: GMMParams, x: Tensor, observed: Tensor) -> Tensor:
    """log w_k + log N(x_o | μ_k,o, Σ_k,oo) [..., N, K] of rows ``x`` (NaN set to 0) observed where
    ``observed``, for params with any batch dims (what ``predict``/``predict_proba`` rank); the
    observed entries must be finite (a row at infinity has no most probable component)."""
    _validate.params(params)
    _validate.data_shape(params, x)
    _validate.finite(x.reshape(-1, x.shape[-1]), "x (its non-NaN entries)")
    fn: Callable[..., Tensor] = component_log_prob
    batched = x.dim() > 2
    for _ in params.batch_shape:
        fn = torch.func.vmap(fn, in_dims=(0, 0 if batched else None, 0 if batched else None))
    return fn(params, x, observed if batched else _masked.plan(observed))


# --- fitting ---------------------------------------------------------------------------------------


def fit_missing(data: Any, n_components: int, family: str, **kw: Any) -> FitResult:
    """:func:`puregmm.fit` with ``missing="marginalize"`` on in-memory ``data`` [N, D] (keyword
    arguments as :func:`puregmm.driver.fit_data`): NaN entries are integrated out. Data without
    NaN go to the ordinary fit."""
    spec = get_family(family)
    x = _validate.as_float_tensor(data, "data")
    if x.dim() != 2 or 0 in x.shape:
        raise ValueError(f"data must be a non-empty 2-D [N, D] array; got shape {tuple(x.shape)}")
    observed = ~torch.isnan(x)
    if bool(observed.all()):
        return driver.fit_data(x, n_components, spec.name, **kw)
    _validate.finite(torch.where(observed, x, 0.0), "data (its non-NaN entries)")
    empty = torch.nonzero(~observed.any(0)).flatten().tolist()
    if empty:
        raise ValueError(f"data columns {empty[:5]} have no observed entry (all NaN); drop them")
    k = _validate.n_components(n_components, x.shape[0])
    if isinstance(kw["n_init"], bool) or not isinstance(kw["n_init"], int) or kw["n_init"] < 1:
        raise ValueError(f"n_init must be a positive int; got {kw['n_init']!r}")
    w = kw["sample_weight"]
    w = None if w is None else _validate.sample_weight(w, x.shape[0], x.dtype, x.device)
    shift, s = standardisation(x, observed, w)
    filled = torch.where(observed, x, shift)  # missing entries at the column means: for the checks and the init
    cfg = driver.settings(
        kw["method"], kw["max_steps"], kw["tol"], kw["batch_size"], kw["optimizer"], kw["reg_covar"], filled, w
    )
    if kw["init_params"] is not None and not isinstance(kw["init_params"], GMMParams):
        kw["init_params"] = _validate.means(kw["init_params"], k, x.shape[1], x.dtype, x.device, "init_params")
    starts, run_keys = _starts(filled, k, spec.name, cfg, driver.unit_weights(w), shift, s, kw)
    row = masked_row(cfg.method, _masked.plan(observed))
    loop_args = {a: kw[a] for a in ("progress", "checkpoint", "checkpoint_every", "resume")}
    out = driver.run(
        x, driver.unit_weights(w), starts, run_keys, cfg, False, standardised=(shift, s), row=row, **loop_args
    )
    out = _observed_units(out, observed, w, s)
    return driver.best_of(out, stacklevel=5)


def _starts(
    filled: Tensor, k: int, family: str, cfg: Settings, w: Tensor | None, shift: Tensor, s: Tensor, kw: dict
) -> tuple[GMMParams, Tensor]:
    """Starting params (data units) of every restart, and their keys: given params, or
    :func:`puregmm.init` on the standardised rows with missing entries at the column means."""
    given = kw["init_params"]
    key = _validate.key(kw["key"])
    if isinstance(given, GMMParams):
        driver.check_init_params(given, family, k, filled)
        n_runs = 1 if get_method(cfg.method).deterministic else kw["n_init"]
        keys = driver.restart_keys(key, n_runs)
        return driver.stack([given] * n_runs), torch.stack(keys)
    n_runs = 1 if get_method(cfg.method).deterministic and given is not None else kw["n_init"]
    keys = driver.restart_keys(key, n_runs)
    z = (filled - shift) / s
    z_means = None if given is None else (given - shift) / s
    reg = float(standardised_reg(cfg.reg_covar, s))
    starts = [
        affine(
            init(z, k, family, key=rk, method=kw["init_method"], means=z_means, reg_covar=reg, sample_weight=w),
            s,
            shift,
        )
        for rk in keys
    ]
    return driver.stack(starts), torch.stack(keys)


def standardisation(x: Tensor, observed: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-column (weighted) mean m [D] of the observed entries and s (0-d), the root mean of the
    columns' variances over their observed entries (1 where no column varies)."""
    ow = observed.to(x.dtype) * (1.0 if w is None else w.unsqueeze(1))  # [N, D]
    count = ow.sum(0)  # [D], > 0: every column has an observed entry
    xz = torch.where(observed, x, 0.0)
    mean = (ow * xz).sum(0) / count
    var = (ow * (xz - mean).square()).sum(0) / count
    s = var.mean().sqrt()
    return mean, torch.where(s > torch.finfo(x.dtype).tiny, s, torch.ones_like(s))


def _observed_units(out: FitResult, observed: Tensor, w: Tensor | None, s: Tensor) -> FitResult:
    """Losses in data units: the driver adds D·log s (the standardisation's Jacobian of a complete
    row); a row's marginal density has |o_n|·log s, so the mean NLL takes the (weighted) mean |o_n|."""
    n_obs = observed.sum(1).to(s.dtype)  # [N]
    mean_obs = n_obs.mean() if w is None else (w * n_obs).sum() / w.sum()
    fix = (observed.shape[1] - mean_obs) * torch.log(s)
    return dataclasses.replace(out, loss=out.loss - fix, history=out.history - fix)


# --- the method rows with a mask ---------------------------------------------------------------


def masked_row(method: str, plan: _masked.Plan) -> Method:
    """The row of :data:`puregmm.methods.METHODS` called ``method`` with every kernel given the
    mask of the (standardised) data through its precomputed ``plan`` (mini-batches of gradient
    descent: their own rows' mask)."""
    base = get_method(method, in_memory=True)

    def em_advance(state: EMState, z: Tensor, w: Tensor | None, cfg: Settings, reduce: Any = None) -> EMState:
        _no_reduce(reduce)
        params, info = em_step(
            state.params, z, reg_covar=cfg.reg_covar, sample_weight=w, return_info=True, observed=plan
        )
        return EMState(params, state.step + 1, -info.log_likelihood, state.n_resets + info.n_resets, state.key)

    def gd_advance(state: TrainState, z: Tensor, w: Tensor | None, cfg: Settings, reduce: Any = None) -> TrainState:
        _no_reduce(reduce)
        if cfg.batch_size is not None and cfg.batch_size < z.shape[0]:
            idx = minibatch_indices(state.key, state.step, z.shape[0], cfg.batch_size)
            zb, wb = z.index_select(0, idx), None if w is None else w.index_select(0, idx)
            return step(state, zb, wb, observed=plan.observed.index_select(0, idx))
        return step(state, z, w, observed=plan)

    def final_loss(params: GMMParams, z: Tensor, w: Tensor | None, reduce: Any = None) -> Tensor:
        _no_reduce(reduce)
        stats = sufficient_stats(params, z, w, observed=plan)
        return -stats.log_lik_sum / stats.weight_sum

    advances: dict[str, Callable[..., Any]] = {"em": em_advance, "gd": gd_advance}
    if method not in advances:
        raise ValueError(f"missing='marginalize' fits with method 'em' or 'gd'; got {method!r}")
    return base._replace(advance=advances[method], final_loss=final_loss)


def _no_reduce(reduce: Any) -> None:
    if reduce is not None:
        raise ValueError("missing='marginalize' fits in-memory data in one process (no distributed fit)")
