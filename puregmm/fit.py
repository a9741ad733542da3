"""``fit``: validate, initialise, loop a pure kernel to convergence, report.

The loop owns no maths: gradient descent calls :func:`puregmm.step`, EM calls
:func:`puregmm.em_step`. The EM loop carries an :class:`EMState` (params, step, last loss,
resets, key) and its stopping rule reads only that state, so a run resumed from a saved state
equals an uninterrupted one. Gradient descent runs on
standardised data (x - mean) / s, with s the root mean per-dimension variance, so the
default learning rate suits data of any scale and location; params and losses are mapped back
exactly (the log-density shifts by D log s).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from puregmm import _validate, keys
from puregmm.density import loss as nll
from puregmm.em import em_step
from puregmm.families import get_family
from puregmm.init import init
from puregmm.params import GMMParams
from puregmm.train import init_state, step

METHODS = ("gd", "em")
GD_MAX_STEPS = 5000
GD_TOL = 1e-7
GD_WINDOW = 20
EM_MAX_STEPS = 100  # scikit-learn's max_iter
EM_TOL = 1e-3  # scikit-learn's tol, on the change of the mean log-likelihood


class ConvergenceWarning(UserWarning):
    """A fit stopped at ``max_steps`` before meeting ``tol``."""


@dataclass(frozen=True)
class FitResult:
    """What a fit returns.

    Attributes:
        params: the fitted params.
        loss: 0-d tensor, final mean negative log-likelihood on the whole data.
        n_steps: steps taken.
        converged: whether the tolerance was met before ``max_steps``.
        n_resets: components reset (singularities or empty components).
        history: [n_steps] loss before each step (mini-batch loss when ``batch_size`` is set).
    """

    params: GMMParams
    loss: Tensor
    n_steps: int
    converged: bool
    n_resets: int
    history: Tensor


class EMState(NamedTuple):
    """The EM loop's state: everything a checkpoint needs to resume a run exactly.

    Attributes:
        params: current params.
        step: 0-d int64, EM steps taken.
        loss: 0-d, mean NLL of the E-step of the last step (NaN before any step).
        n_resets: 0-d int64, components re-seeded or repaired so far.
        key: 0-d int64, the run's key (EM itself draws nothing; init and restarts do).
    """

    params: GMMParams
    step: Tensor
    loss: Tensor
    n_resets: Tensor
    key: Tensor


def em_state(params: GMMParams, key: Any = 0) -> EMState:
    """A fresh :class:`EMState` at ``params``."""
    zero = torch.zeros((), dtype=torch.int64)
    nan = torch.full((), float("nan"), dtype=params.dtype, device=params.device)
    return EMState(params, zero, nan, zero, _validate.key(key))


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
) -> FitResult:
    """Fit a K-component mixture to ``data`` [N, D].

    Args:
        data: [N, D] array-like; integer data is converted to floats, dtype/device follow it.
        n_components: K, at most N.
        family: one of :data:`puregmm.FAMILIES`.
        method: ``"gd"`` (Adam on the mean NLL, the default) or ``"em"``
            (expectation-maximisation, :func:`puregmm.em_step`; scikit-learn's algorithm).
        max_steps: step limit; ``None`` means 5000 for ``"gd"``, 100 for ``"em"``.
        tol: ``"gd"`` stops when the loss varied less than ``tol·max(1, |loss|)`` over the
            last 20 steps (``None``: 1e-7); ``"em"`` stops when the mean log-likelihood changed
            by less than ``tol`` in one step (``None``: 1e-3, scikit-learn's rule).
        batch_size: mini-batch size for ``"gd"`` (``None``: full batch). Batches follow a
            permutation per epoch drawn from ``(key, epoch)``.
        n_init: restarts with keys ``fold_in(key, r)``; the lowest final loss wins.
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

    Returns:
        :class:`FitResult`.

    Raises:
        ValueError: bad data (see :func:`puregmm.init`), bad weights, unknown family/method,
            ``batch_size``/``optimizer`` with ``"em"``, or ``reg_covar=0`` with ``"em"`` on data
            with a constant feature (its covariance would be singular).

    Warns:
        ConvergenceWarning: the best run stopped at ``max_steps`` before meeting ``tol``.

    >>> import torch, puregmm as pg
    >>> x = torch.cat([torch.randn(100, 2), torch.randn(100, 2) + 6])
    >>> em = pg.fit(x, 2, "full", method="em", n_init=3)
    >>> em.converged, em.n_steps < 100
    (True, True)
    """
    spec = get_family(family)
    x = _validate.data(data, "data")
    k = _validate.n_components(n_components, x.shape[0])
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int; got {n_init!r}")
    w = None if sample_weight is None else _validate.sample_weight(sample_weight, x.shape[0], x.dtype, x.device)
    reg_covar = _validate.reg_covar(reg_covar)
    init_means = None
    if isinstance(init_params, GMMParams):
        _check_init_params(init_params, spec.name, k, x)
    elif init_params is not None:
        init_means = _validate.means(init_params, k, x.shape[1], x.dtype, x.device, "init_params")
    if method == "em":
        _check_em_args(x, w, reg_covar, batch_size, optimizer)
        max_steps = EM_MAX_STEPS if max_steps is None else _validate.positive_int(max_steps, "max_steps")
        tol = EM_TOL if tol is None else _validate.non_negative(tol, "tol")
    key = _validate.key(key)
    best: FitResult | None = None
    # EM from given params is deterministic: restarts would repeat the same run.
    n_runs = 1 if method == "em" and init_params is not None else n_init
    for r in range(n_runs):
        run_key = key if n_init == 1 else keys.fold_in(key, r)
        if isinstance(init_params, GMMParams):
            start = init_params
        else:
            start = init(
                x, k, spec.name, key=run_key, method=init_method, means=init_means, reg_covar=reg_covar, sample_weight=w
            )
        if method == "em":
            assert max_steps is not None and tol is not None
            result = _fit_em(x, em_state(start, run_key), w, max_steps, tol, reg_covar, progress)
        else:
            result = _fit_gd(x, start, w, run_key, max_steps, tol, batch_size, optimizer, progress)
        if best is None or _lower(result.loss, best.loss):
            best = result
    assert best is not None
    if not best.converged:
        warnings.warn(
            f"fit stopped at max_steps={best.n_steps} without meeting tol; raise max_steps or tol, "
            "or check the data for duplicated points and outliers",
            ConvergenceWarning,
            stacklevel=2,
        )
    return best


def _check_init_params(params: GMMParams, family: str, k: int, x: Tensor) -> None:
    if not isinstance(params, GMMParams):
        raise TypeError(f"init_params must be GMMParams; got {type(params).__name__}")
    if params.family != family or params.n_components != k or params.dim != x.shape[1] or params.batch_shape:
        raise ValueError(
            f"init_params is {params!r} but the fit asks for family={family!r}, K={k}, D={x.shape[1]} (unbatched)"
        )
    for name in ("logits", "means", "scale"):
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


def _fit_em(
    x: Tensor, state: EMState, w: Tensor | None, max_steps: int, tol: float, reg_covar: float, progress: bool
) -> FitResult:
    """Run :func:`puregmm.em_step` from ``state`` until the mean log-likelihood changes by less
    than ``tol`` in one step (scikit-learn's rule; never at the first step) or ``max_steps``."""
    history: list[Tensor] = []
    converged = False
    bar = _progress(progress, max_steps)
    while int(state.step) < max_steps:
        params, info = em_step(state.params, x, reg_covar=reg_covar, sample_weight=w, return_info=True)
        prev = -float(state.loss)  # NaN before the first step: no convergence there
        state = EMState(params, state.step + 1, -info.log_likelihood, state.n_resets + info.n_resets, state.key)
        history.append(state.loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(state.loss):.6g}")
        if abs(float(info.log_likelihood) - prev) < tol:
            converged = True
            break
    if bar is not None:
        bar.close()
    hist = torch.stack(history) if history else x.new_zeros(0)
    final = nll(state.params, x, w).detach()
    return FitResult(state.params, final, int(state.step), converged, int(state.n_resets), hist.detach())


def _affine(params: GMMParams, a: float, b: Tensor) -> GMMParams:
    """Params of the data mapped by x -> a·x + b (a > 0): μ -> aμ + b, U -> U / a."""
    raw = params.scale
    if params.spec.scale_ndim == 2:
        diag = torch.diagonal(raw, dim1=-2, dim2=-1) - math.log(a)
        raw = torch.triu(raw, 1) / a + torch.diag_embed(diag)
    else:
        raw = raw - math.log(a)
    return GMMParams(params.logits, params.means * a + b, raw, params.family)


def _fit_gd(
    x: Tensor,
    start: GMMParams,
    w: Tensor | None,
    key: Tensor,
    max_steps: int | None,
    tol: float | None,
    batch_size: int | None,
    optimizer: Any,
    progress: bool,
) -> FitResult:
    max_steps = GD_MAX_STEPS if max_steps is None else int(max_steps)
    tol = GD_TOL if tol is None else float(tol)
    n, d = x.shape
    wn = torch.ones_like(x[:, 0]) if w is None else w  # weighted moments: rows act as counts
    wn = wn / wn.sum()
    shift = (wn.unsqueeze(-1) * x).sum(0)
    s = float((wn.unsqueeze(-1) * x.sub(shift).square()).sum(0).mean().sqrt().clamp_min(torch.finfo(x.dtype).tiny))
    z = (x - shift) / s
    log_jac = d * math.log(s)
    state = init_state(_affine(start, 1.0 / s, -shift / s), optimizer, key=key)
    if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size):
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    batches = _Batches(n, batch_size, key, x.device) if batch_size and batch_size < n else None
    history: list[Tensor] = []
    converged = False
    bar = _progress(progress, max_steps)
    for t in range(max_steps):
        if batches is None:
            state = step(state, z, w)
        else:
            idx = batches.indices(t)
            state = step(state, z[idx], None if w is None else w[idx])
        history.append(state.loss)
        if bar is not None and t % 25 == 0:
            bar.update(25 if t else 1)
            bar.set_postfix(loss=f"{float(state.loss) + log_jac:.6g}")
        if len(history) > GD_WINDOW and t % 5 == 0:
            recent = torch.stack(history[-GD_WINDOW - 1 :])
            spread = float(recent.max() - recent.min())
            if math.isfinite(spread) and spread <= tol * max(1.0, abs(float(recent[-1]) + log_jac)):
                converged = True
                break
    if bar is not None:
        bar.close()
    params = _affine(state.params, s, shift)
    hist = torch.stack(history) + log_jac if history else x.new_zeros(0)
    return FitResult(params, nll(params, x, w).detach(), len(history), converged, int(state.n_resets), hist.detach())


class _Batches:
    """Mini-batch indices for step t: a permutation per epoch drawn from (key, epoch)."""

    def __init__(self, n: int, batch_size: int, key: Tensor, device: torch.device) -> None:
        self.n, self.size, self.key, self.device = n, batch_size, key, device
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def indices(self, t: int) -> Tensor:
        epoch, pos = divmod(t, self.per_epoch)
        if epoch != self._epoch:
            u = keys.uniform(self.key, epoch, torch.arange(self.n))
            self._epoch, self._perm = epoch, torch.argsort(u).to(self.device)
        return self._perm[pos * self.size : (pos + 1) * self.size]


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fit", unit="step")
