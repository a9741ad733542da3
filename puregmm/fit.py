"""``fit``: validate, initialise, loop a pure kernel to convergence, report.

The loop owns no maths: gradient descent calls :func:`puregmm.step`. Gradient descent runs on
standardised data (x - mean) / s, with s the root mean per-dimension variance, so the
default learning rate suits data of any scale and location; params and losses are mapped back
exactly (the log-density shifts by D log s).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from puregmm import _validate, keys
from puregmm.density import loss as nll
from puregmm.families import get_family
from puregmm.init import init
from puregmm.params import GMMParams
from puregmm.train import init_state, step

METHODS = ("gd",)
GD_MAX_STEPS = 5000
GD_TOL = 1e-7
GD_WINDOW = 20


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
    init_params: GMMParams | None = None,
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
        method: ``"gd"`` (Adam on the mean NLL, the default).
        max_steps: step limit; ``None`` means 5000 for ``"gd"``.
        tol: ``"gd"`` stops when the loss varied less than ``tol·max(1, |loss|)`` over the
            last 20 steps; ``None`` means 1e-7.
        batch_size: mini-batch size for ``"gd"`` (``None``: full batch). Batches follow a
            permutation per epoch drawn from ``(key, epoch)``.
        n_init: restarts with keys ``fold_in(key, r)``; the lowest final loss wins.
        init_params: start from these params instead of :func:`puregmm.init`.
        sample_weight: [N] non-negative weights (not all zero).
        optimizer: a :class:`puregmm.Optimizer` for ``"gd"``; ``None``: the default Adam.
        key: int or 0-d int64 tensor; all randomness derives from it.
        progress: show a tqdm progress bar.

    Returns:
        :class:`FitResult`.

    Raises:
        ValueError: bad data (see :func:`puregmm.init`), bad weights, unknown family/method.
    """
    spec = get_family(family)
    x = _validate.data(data, "data")
    k = _validate.n_components(n_components, x.shape[0])
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be a positive int; got {n_init!r}")
    w = None if sample_weight is None else _validate.sample_weight(sample_weight, x.shape[0], x.dtype, x.device)
    if init_params is not None:
        _check_init_params(init_params, spec.name, k, x)
    key = _validate.key(key)
    best: FitResult | None = None
    for r in range(n_init):
        run_key = key if n_init == 1 else keys.fold_in(key, r)
        start = init_params if init_params is not None else init(x, k, spec.name, key=run_key)
        result = _fit_gd(x, start, w, run_key, max_steps, tol, batch_size, optimizer, progress)
        if best is None or bool(result.loss < best.loss):
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
    if params.family != family or params.n_components != k or params.dim != x.shape[1]:
        raise ValueError(
            f"init_params is {params!r} but the fit asks for family={family!r}, K={k}, D={x.shape[1]}"
        )


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
    shift = x.mean(0)
    s = float(x.sub(shift).square().mean().sqrt().clamp_min(torch.finfo(x.dtype).tiny))
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

