"""Pictures of a fit: data with 1-, 2-, 3-sigma ellipses, the loss curve, a BIC/AIC curve.

matplotlib is optional (``pip install 'puregmm[plot]'``) and imported only when a function
draws. Nothing here touches ``pyplot`` or the global backend: without ``ax=`` the functions
draw on a fresh :class:`matplotlib.figure.Figure` with an Agg canvas, so they work headless
and leave a notebook's backend alone. Pass ``ax=`` to draw into your own axes instead.

The n-sigma ellipse of a component is the contour at Mahalanobis distance n,
(x - μ)ᵀ Σ⁻¹ (x - μ) = n² (in 2-D it holds 39%, 86% and 99% of the component's mass for
n = 1, 2, 3). For D > 2 the data and the components are projected on the first two principal
components of the data (V: [D, 2]); a projected component is N(Vᵀ(μ - c), Vᵀ Σ V), its exact
marginal. For D = 1 the plot is a histogram with the weighted component densities.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from puregmm import _validate
from puregmm.density import component_log_prob
from puregmm.params import GMMParams, covariances, weights
from puregmm.select import CRITERIA


class Projection(NamedTuple):
    """Data and components in plotting coordinates (see :func:`project`)."""

    points: Tensor  # [M, 2] the (sub-sampled) data, projected
    means: Tensor  # [K, 2]
    covariances: Tensor  # [K, 2, 2]
    labels: tuple[str, str]  # axis labels


def ellipse_points(mean: Any, cov: Any, n_sigma: float = 1.0, n_points: int = 121) -> Tensor:
    """Points [n_points, 2] on the n-sigma ellipse of N(mean [2], cov [2, 2]).

    p(t) = μ + n L [cos t, sin t] with Σ = L Lᵀ, so (p - μ)ᵀ Σ⁻¹ (p - μ) = n² exactly.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if mean.shape != (2,) or cov.shape != (2, 2):
        raise ValueError(f"mean must be [2] and cov [2, 2]; got {tuple(mean.shape)} and {tuple(cov.shape)}")
    t = torch.linspace(0.0, 2.0 * math.pi, n_points, dtype=torch.float64)
    circle = torch.stack([torch.cos(t), torch.sin(t)], -1)  # [n_points, 2]
    chol = torch.linalg.cholesky(0.5 * (cov + cov.mT))
    return mean + n_sigma * circle @ chol.mT


def project(params: GMMParams, x: Any = None, max_points: int = 5000) -> Projection:
    """Data (every ⌈N/max_points⌉-th row) and components in 2-D plotting coordinates.

    D = 2: unchanged. D > 2: the first two principal components of ``x`` (of the mixture's
    own covariance when ``x`` is None), centred at the data mean.
    """
    _check_params(params)
    mu = params.means.detach().to(torch.float64)  # [K, D]
    cov = covariances(params).detach().to(torch.float64)  # [K, D, D]
    d = params.dim
    x = _points(x, d)
    _validate.positive_int(max_points, "max_points")
    pts = _subsample(x, d, max_points)  # [M, D]
    if d == 2:
        return Projection(pts, mu, cov, ("x1", "x2"))
    if d < 2:
        raise ValueError(f"project needs D >= 2; got D={d} (plot_fit draws 1-D data as a histogram)")
    if x is not None:
        centre = x.mean(0)
        big = (x - centre).abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
        total = torch.cov(((x - centre) / big).mT)  # [D, D], scaled: the axes and shares are scale-free
    else:
        w = weights(params).detach().to(torch.float64)
        centre = w @ mu
        diff = mu - centre
        total = (w[:, None, None] * (cov + diff[:, :, None] * diff[:, None, :])).sum(0)
    evals, evecs = torch.linalg.eigh(total)  # ascending
    v = evecs[:, [-1, -2]]  # [D, 2] leading principal axes
    share = (evals[[-1, -2]] / evals.sum().clamp_min(1e-300) * 100).tolist()
    labels = (f"PC1 ({share[0]:.0f}% of variance)", f"PC2 ({share[1]:.0f}% of variance)")
    return Projection((pts - centre) @ v, (mu - centre) @ v, v.mT @ cov @ v, labels)


def plot_fit(
    params: GMMParams,
    x: Any = None,
    *,
    ax: Any = None,
    sigmas: Sequence[float] = (1.0, 2.0, 3.0),
    max_points: int = 5000,
    title: str | None = None,
) -> Any:
    """Data coloured by most likely component, with each component's n-sigma ellipses.

    Args:
        params: unbatched params.
        x: data [N, D] or None (ellipses only).
        ax: matplotlib axes to draw into; None makes a new Figure (Agg canvas).
        sigmas: the Mahalanobis radii of the ellipses.
        max_points: at most this many points are drawn (every ⌈N/max_points⌉-th row).
        title: axes title; None gives one naming the family and K.

    Returns:
        The matplotlib Axes.

    Raises:
        TypeError, ValueError: params not finite unbatched :class:`GMMParams`, ``x`` not finite
            real data [N, D] of the params' D, ``max_points`` not a positive int, a ``sigmas``
            entry not a positive number.

    For D > 2 data and ellipses are projected on the first two principal components of the
    data (of the mixture's covariance without data); D = 1 draws a histogram and the
    weighted component densities.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0.0, 0.0], [4.0, 0.0]]),
    ...                     torch.eye(2).expand(2, 2, 2))
    >>> ax = pg.plot_fit(p, torch.randn(50, 2))
    >>> ax.get_title()
    'full, K=2 (1, 2, 3-sigma ellipses)'
    """
    _check_params(params)
    x = _points(x, params.dim)
    _validate.positive_int(max_points, "max_points")
    sigmas = _sigmas(sigmas)
    ax = _axes(ax)
    colors = _colors(params.n_components)
    title = f"{params.family}, K={params.n_components}" if title is None else title
    if params.dim == 1:
        _plot_1d(params, x, ax, colors, max_points)
        ax.set_title(title)
        return ax
    proj = project(params, x, max_points)
    if proj.points.shape[0]:
        labels = _labels(params, x, max_points)
        ax.scatter(proj.points[:, 0], proj.points[:, 1], s=4, c=[colors[i] for i in labels], alpha=0.35, lw=0)
    for k in range(params.n_components):
        for j, n in enumerate(sigmas):
            e = ellipse_points(proj.means[k], proj.covariances[k], n)
            ax.plot(e[:, 0], e[:, 1], color=colors[k], lw=1.6 - 0.4 * j, alpha=0.9)
        ax.plot(proj.means[k, 0], proj.means[k, 1], "x", color="black", ms=6, mew=1.5)
    ax.set_xlabel(proj.labels[0])
    ax.set_ylabel(proj.labels[1])
    ax.set_aspect("equal", adjustable="datalim")
    sig = ", ".join(f"{n:g}" for n in sigmas)
    ax.set_title(f"{title} ({sig}-sigma ellipses)")
    return ax


def plot_loss(history: Any, *, ax: Any = None, title: str = "loss (mean negative log-likelihood)") -> Any:
    """The loss per step (``FitResult.history``).

    Args:
        history: a sequence or 1-D tensor of losses, e.g. ``FitResult.history``.
        ax: matplotlib axes to draw into; None makes a new Figure (Agg canvas).
        title: axes title.

    Returns:
        The matplotlib Axes.

    >>> import puregmm as pg
    >>> ax = pg.plot_loss([3.0, 2.5, 2.4])
    >>> ax.lines[0].get_xdata().tolist()
    [1, 2, 3]
    """
    h = _validate.as_float_tensor(history, "history", torch.float64).detach()
    if h.dim() != 1:
        raise ValueError(
            f"history must be 1-D, one loss per step (FitResult.history); got shape {tuple(h.shape)} "
            "(for a batch of fits pass one row, history[i])"
        )
    ax = _axes(ax)
    ax.plot(np.arange(1, h.numel() + 1), h.numpy(), lw=1.2)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


def plot_criterion(table: Any, *, criterion: str = "bic", ax: Any = None) -> Any:
    """BIC (or AIC) against K, one line per family, the best marked; for ``pg.select``'s table.

    ``table`` may be a list of rows (dicts, NamedTuples or objects with attributes), a dict
    of columns, or a pandas DataFrame; columns are found case-insensitively: ``family``,
    ``K`` or ``n_components``, and ``criterion``.

    Args:
        table: the rows, e.g. the :class:`puregmm.SelectionTable` of :func:`puregmm.select`.
        criterion: the column to draw, ``"bic"`` or ``"aic"``.
        ax: matplotlib axes to draw into; None makes a new Figure (Agg canvas).

    Returns:
        The matplotlib Axes.

    Raises:
        ValueError: an empty table, a row without the columns, ``criterion`` not bic/aic.
        TypeError: ``table`` or a row of another kind, a K or criterion value that is not a number.

    >>> import puregmm as pg
    >>> ax = pg.plot_criterion([{"family": "full", "K": 1, "bic": 310.2}, {"family": "full", "K": 2, "bic": 250.5}])
    >>> [t.get_text() for t in ax.get_legend().get_texts()]
    ['full', 'best: full, K=2']
    """
    criterion = _validate.one_of(criterion, CRITERIA, "criterion")
    rows = table_rows(table)
    if not rows:
        raise ValueError("table is empty; pass the table of pg.select(...)")
    by_family: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        family = str(field(row, ("family",), "full"))
        k = _number(field(row, ("k", "n_components")), "K", int)
        by_family.setdefault(family, []).append((k, _number(field(row, (criterion,)), criterion, float)))
    finite = [(v, k, f) for f, pts in by_family.items() for k, v in pts if math.isfinite(v)]
    if not finite:
        raise ValueError(f"table: every {criterion} value is NaN or infinite; nothing to compare")
    best = min(finite)  # non-finite values are drawn as gaps and never win (as in format_table)
    ax = _axes(ax)
    for family, pts in by_family.items():
        pts.sort()
        ax.plot([k for k, _ in pts], [v for _, v in pts], "o-", ms=4, label=family)
    ax.plot(best[1], best[0], "*", color="black", ms=12, label=f"best: {best[2]}, K={best[1]}")
    ax.set_xlabel("K (components)")
    ax.set_ylabel(criterion.upper())
    ax.set_title(f"{criterion.upper()} by K (lower is better)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def fit_figure(
    params: GMMParams,
    x: Any = None,
    history: Any = None,
    table: Any = None,
    *,
    criterion: str = "bic",
    max_points: int = 5000,
) -> Any:
    """One Figure: :func:`plot_fit`, then :func:`plot_loss` if ``history`` and
    :func:`plot_criterion` if ``table`` are given, side by side."""
    panels = 1 + (history is not None) + (table is not None)
    fig = _new_figure((5.0 * panels, 4.6))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    plot_fit(params, x, ax=axes[0], max_points=max_points)
    i = 1
    if history is not None:
        plot_loss(history, ax=axes[i])
        i += 1
    if table is not None:
        plot_criterion(table, criterion=criterion, ax=axes[i])
    return fig


def save_figure(fig: Any, path: Any, dpi: int = 80) -> None:
    """Write ``fig`` as an image (format from the suffix, e.g. ``.png``)."""
    fig.savefig(path, dpi=dpi)


# --- internals -------------------------------------------------------------------------------


def _new_figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "puregmm's plots need matplotlib, which is not installed; "
            "run `pip install 'puregmm[plot]'` (or `pip install matplotlib`)"
        ) from err
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _axes(ax: Any) -> Any:
    return ax if ax is not None else _new_figure((5.5, 4.6)).add_subplot()


def _check_params(params: GMMParams) -> None:
    """Unbatched, well-formed, finite params (what the ellipses' Cholesky factors need)."""
    _validate.params(params)
    if params.batch_shape:
        raise ValueError(f"plots need unbatched params; got batch shape {params.batch_shape} (index one fit: p[i])")


def _points(x: Any, d: int) -> Tensor | None:
    """``x`` as finite float64 data [N, d] (any real dtype is drawn), or None."""
    if x is None:
        return None
    xt = _validate.data(x, "x", torch.float64)
    if xt.shape[1] != d:
        raise ValueError(f"x must be [N, {d}] to match the params; got shape {tuple(xt.shape)}")
    return xt


def _sigmas(sigmas: Any) -> list[float]:
    """The ellipses' radii: positive numbers."""
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Iterable):
        raise TypeError(f"sigmas must be a sequence of positive numbers such as (1, 2, 3); got {sigmas!r}")
    return [_validate.positive(n, "sigmas") for n in sigmas]


def _subsample(x: Tensor | None, d: int, max_points: int) -> Tensor:
    """Every ⌈N/max_points⌉-th row of checked data [N, d] (:func:`_points`)."""
    if x is None:
        return torch.zeros(0, d, dtype=torch.float64)
    stride = max(1, math.ceil(x.shape[0] / max_points))
    return x[::stride]


def _labels(params: GMMParams, x: Any, max_points: int) -> list[int]:
    pts = _subsample(x, params.dim, max_points).to(params.dtype)
    with torch.no_grad():
        return component_log_prob(params, pts).argmax(-1).tolist()


def _colors(k: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(k)]


def _plot_1d(params: GMMParams, x: Any, ax: Any, colors: list[Any], max_points: int) -> None:
    mu = params.means.detach().to(torch.float64)[:, 0]
    sd = covariances(params).detach().to(torch.float64)[:, 0, 0].sqrt()
    w = weights(params).detach().to(torch.float64)
    lo, hi = float((mu - 4 * sd).min()), float((mu + 4 * sd).max())
    if x is not None:
        pts = _subsample(x, 1, max_points)[:, 0]
        ax.hist(pts.numpy(), bins=60, density=True, color="0.8")
        lo, hi = min(lo, float(pts.min())), max(hi, float(pts.max()))
    grid = torch.linspace(lo, hi, 400, dtype=torch.float64)
    dens = w * torch.exp(-0.5 * ((grid[:, None] - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))  # [G, K]
    for k in range(params.n_components):
        ax.plot(grid.numpy(), dens[:, k].numpy(), color=colors[k])
    ax.plot(grid.numpy(), dens.sum(-1).numpy(), color="black", lw=1.5)
    ax.set_xlabel("x")
    ax.set_ylabel("density")


_NOT_TABLES = (str, bytes, Tensor, np.ndarray)  # iterable, but of numbers or characters, not rows
_KINDS = "rows (dicts, NamedTuples or objects with attributes), a dict of columns or a DataFrame"


def table_rows(table: Any) -> list[Any]:
    """Rows of a table given as rows, a dict of columns or a pandas DataFrame."""
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas DataFrame
        return list(table.to_dict("records"))
    if isinstance(table, Mapping):
        bad = [c for c, col in table.items() if isinstance(col, _NOT_TABLES[:2]) or not isinstance(col, Iterable)]
        if bad:
            raise TypeError(f"table: a dict of columns needs a sequence per column; column {bad[0]!r} is not one")
        cols = list(table)
        return [dict(zip(cols, vals)) for vals in zip(*(table[c] for c in cols))]
    if isinstance(table, Iterable) and not isinstance(table, _NOT_TABLES):
        return list(table)
    raise TypeError(f"table must be {_KINDS}; got {type(table).__name__}")


_MISSING = object()


def _number(v: Any, column: str, kind: type) -> Any:
    """A table cell as ``kind`` (int or float), or a ``TypeError`` naming the column."""
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"table: column {column!r} must hold numbers; got {type(v).__name__} {v!r}")
    if kind is int and not float(v).is_integer():
        raise TypeError(f"table: column {column!r} must hold whole numbers; got {v!r}")
    return kind(v)


def field(row: Any, names: tuple[str, ...], default: Any = _MISSING) -> Any:
    """The first of ``names`` (case-insensitive) in a row (dict, NamedTuple or object)."""
    if hasattr(row, "_asdict"):
        row = row._asdict()
    if isinstance(row, (*_NOT_TABLES, list, tuple, int, float)):
        raise TypeError(f"table must be {_KINDS}; got a row that is a {type(row).__name__}")
    if not isinstance(row, Mapping):
        row = {k: getattr(row, k) for k in dir(row) if not k.startswith("_")}
    lower = {str(k).lower(): v for k, v in row.items()}
    for n in names:
        if n in lower:
            return lower[n]
    if default is not _MISSING:
        return default
    raise ValueError(f"table rows need a column {names[0]!r}; got columns {sorted(lower)}")
