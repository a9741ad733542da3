"""Model selection: fit every (family, K) candidate and keep the best by BIC or AIC.

``select`` owns no maths: each candidate is one :func:`puregmm.fit` (its ``n_init`` restarts
already run together as one vmapped fit) scored by :func:`puregmm.bic` and
:func:`puregmm.aic`. Every candidate uses the same ``key``, so a row of the table is exactly
``fit(x, K, family, key=key, n_init=n_init, ...)``: any row can be refitted on its own.
Candidates that stop at ``max_steps`` are marked ``converged=False`` in the table and
reported in one :class:`puregmm.ConvergenceWarning` at the end, not one per fit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch

from puregmm import _validate
from puregmm.families import FAMILIES
from puregmm.fit import ConvergenceWarning, fit
from puregmm.infer import aic, bic
from puregmm.params import GMMParams

CRITERIA = ("bic", "aic")
# fit arguments that select decides itself, per candidate
_OWNED = ("family", "init_params", "checkpoint", "resume", "checkpoint_every")


class SelectionRow(NamedTuple):
    """One candidate of :func:`select` (plain Python values, JSON-ready).

    Attributes:
        family: covariance family.
        K: number of components.
        bic: :func:`puregmm.bic` of the fitted params on the data (lower is better).
        aic: :func:`puregmm.aic` likewise.
        loss: final mean negative log-likelihood (``FitResult.loss``).
        converged: whether the fit met its tolerance before ``max_steps``.
        n_steps: steps taken by the best restart.
        n_resets: components reset during the best restart.

    >>> import puregmm as pg
    >>> row = pg.SelectionRow("full", 2, 250.5, 238.0, 1.2, True, 9, 0)
    >>> row.K, row._asdict()["bic"]
    (2, 250.5)
    """

    family: str
    K: int
    bic: float
    aic: float
    loss: float
    converged: bool
    n_steps: int
    n_resets: int


class SelectionTable(list):
    """A list of :class:`SelectionRow` that prints as an aligned table, best row starred.

    Attributes:
        criterion: ``"bic"`` or ``"aic"``, the column that :meth:`best` and the star minimise.

    >>> import puregmm as pg
    >>> table = pg.SelectionTable([pg.SelectionRow("full", 1, 310.2, 300.1, 1.5, True, 3, 0),
    ...                            pg.SelectionRow("full", 2, 250.5, 238.0, 1.2, True, 9, 0)])
    >>> print(table)
      family  K        bic        aic      loss  converged  steps  resets
      full    1      310.2      300.1       1.5  yes            3       0
    * full    2      250.5        238       1.2  yes            9       0
    >>> table.best().K
    2
    """

    criterion: str = "bic"

    def __init__(self, rows: Iterable[SelectionRow] = (), criterion: str = "bic") -> None:
        super().__init__(rows)
        self.criterion = criterion

    def best(self) -> SelectionRow:
        """The row with the lowest criterion (first on ties; NaN never wins)."""
        return self[_best_index(self, self.criterion)]

    def __str__(self) -> str:
        return format_table(self, self.criterion)


class Selection(NamedTuple):
    """What :func:`select` returns: ``table, params = pg.select(x)``.

    Attributes:
        table: a :class:`SelectionTable`, one row per (family, K), in the order fitted.
        params: the fitted params of the best row.

    >>> import torch, puregmm as pg
    >>> x = torch.cat([torch.randn(100, 1) - 5, torch.randn(100, 1) + 5])
    >>> selection = pg.select(x, [1, 2], families="isotropic", progress=False)
    >>> selection.table.best().K, selection.params.n_components
    (2, 2)
    """

    table: SelectionTable
    params: GMMParams


def select(
    x: Any,
    n_components: Any = range(1, 11),
    families: Any = ("full", "diagonal"),
    criterion: str = "bic",
    n_init: int = 1,
    method: str = "em",
    key: Any = 0,
    progress: bool = True,
    **fit_kwargs: Any,
) -> Selection:
    """Fit each (family, K) candidate and return the table and the best params.

    The criterion trades fit against size: BIC = -2 log L + p log N (Schwarz 1978),
    AIC = -2 log L + 2p (Akaike 1974), with p the free parameters (:func:`puregmm.n_parameters`);
    lower is better. BIC is consistent for the number of components of a Gaussian mixture,
    AIC tends to pick more. Families loop outside, K inside; ties go to the earlier candidate.

    Args:
        x: data [N, D] (array-like; checked 2-D, non-empty, finite).
        n_components: an int or an iterable of ints, each in 1..N (sorted, duplicates dropped).
        families: a family name or names from :data:`puregmm.FAMILIES`.
        criterion: ``"bic"`` or ``"aic"``.
        n_init: restarts per candidate, run as one batched fit by :func:`puregmm.fit`.
        method: ``"em"`` (default, fast and scale-free) or ``"gd"``.
        key: int or 0-d int64 tensor; every candidate is fitted with this key.
        progress: a tqdm bar over the candidates (on stderr).
        **fit_kwargs: forwarded to :func:`puregmm.fit` (``max_steps``, ``tol``, ``reg_covar``,
            ``sample_weight``, ...); ``sample_weight`` also weights the BIC/AIC.

    Returns:
        :class:`Selection` ``(table, params)``.

    Raises:
        ValueError: bad data, an unknown criterion or family, an empty ``n_components`` or
            ``families``, a K < 1 or K > N, or anything :func:`puregmm.fit` rejects.
        TypeError: a non-int K, or a fit argument that select sets per candidate
            (``family``, ``init_params``, ``checkpoint``, ``resume``).

    Warns:
        ConvergenceWarning: once, naming the candidates that stopped at ``max_steps``.

    >>> import torch, puregmm as pg
    >>> x = torch.cat([torch.randn(150, 2) - 4, torch.randn(150, 2) + 4])
    >>> table, params = pg.select(x, range(1, 4), families="diagonal", progress=False)
    >>> params.n_components, [row.K for row in table]
    (2, [1, 2, 3])
    """
    data = _validate.data(x, "x")
    n = data.shape[0]
    criterion = _criterion(criterion)
    progress = _validate.flag(progress, "progress")
    ks = _components(n_components, n)
    fams = _families(families)
    bad = sorted(set(fit_kwargs) & set(_OWNED))
    if bad:
        raise TypeError(
            f"select sets {bad} itself for each candidate; drop them (fit one model with pg.fit to use them)"
        )
    weight = fit_kwargs.get("sample_weight")
    candidates = [(f, k) for f in fams for k in ks]
    rows: list[SelectionRow] = []
    fitted: list[GMMParams] = []
    bar = _progress(progress, len(candidates))
    try:
        for family, k in candidates:
            if bar is not None:
                bar.set_postfix_str(f"{family}, K={k}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = fit(data, k, family, method=method, n_init=n_init, key=key, **fit_kwargs)
            with torch.no_grad():
                b = float(bic(res.params, data, weight))
                a = float(aic(res.params, data, weight))
            rows.append(
                SelectionRow(family, k, b, a, float(res.loss), bool(res.converged), int(res.n_steps), int(res.n_resets))
            )
            fitted.append(res.params)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    table = SelectionTable(rows, criterion)
    best = _best_index(table, criterion)
    stalled = [f"{r.family} K={r.K}" for r in rows if not r.converged]
    if stalled:
        warnings.warn(
            f"{len(stalled)} of {len(rows)} candidates stopped at max_steps without meeting tol "
            f"({', '.join(stalled[:6])}{', ...' if len(stalled) > 6 else ''}); raise max_steps or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return Selection(table, fitted[best])


def format_table(table: Iterable[SelectionRow], criterion: str = "bic") -> str:
    """The rows as an aligned text table; ``*`` marks the lowest ``criterion``.

    Args:
        table: :class:`SelectionRow` rows (a :class:`SelectionTable` or any iterable).
        criterion: ``"bic"`` or ``"aic"``; non-finite values print as ``n/a`` and never win.

    Returns:
        the table as one string of lines (``"(no candidates)"`` for no rows).

    >>> print(format_table([SelectionRow("full", 2, 10.0, 8.0, 1.5, True, 12, 0)]))
      family  K        bic        aic      loss  converged  steps  resets
    * full    2         10          8       1.5  yes           12       0
    """
    rows = _rows(table)
    criterion = _criterion(criterion)
    if not rows:
        return "(no candidates)"
    best = _best_index(rows, criterion)
    fam_w = max(6, *(len(r.family) for r in rows))
    lines = [f"  {'family':<{fam_w}} {'K':>2} {'bic':>10} {'aic':>10} {'loss':>9}  converged  steps  resets"]
    for i, r in enumerate(rows):
        mark = "*" if i == best else " "
        lines.append(
            f"{mark} {r.family:<{fam_w}} {r.K:>2} {_num(r.bic, 10)} {_num(r.aic, 10)} {_num(r.loss, 9)}  "
            f"{'yes' if r.converged else 'no':<9} {r.n_steps:>6} {r.n_resets:>7}"
        )
    return "\n".join(lines)


def _criterion(criterion: Any) -> str:
    if not isinstance(criterion, str) or criterion.lower() not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}")
    return criterion.lower()


def _rows(table: Any) -> list[SelectionRow]:
    """``table`` as a list of :class:`SelectionRow` (any iterable of them)."""
    if isinstance(table, (str, bytes, torch.Tensor, np.ndarray)) or not isinstance(table, Iterable):
        raise TypeError(f"table must be an iterable of SelectionRow (pg.select(...).table); got {type(table).__name__}")
    rows = list(table)
    bad = [type(r).__name__ for r in rows if not isinstance(r, SelectionRow)]
    if bad:
        raise TypeError(f"table must hold SelectionRow rows (pg.select(...).table); got {bad[:3]}")
    return rows


def _num(v: float, width: int) -> str:
    return f"{v:>{width}.6g}" if math.isfinite(v) else f"{'n/a':>{width}}"


def _best_index(rows: Any, criterion: str) -> int:
    values = [getattr(r, criterion) for r in rows]
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        raise RuntimeError(
            f"every candidate has a non-finite {criterion.upper()}; check the data for duplicated points, "
            "or raise reg_covar"
        )
    return min(finite, key=lambda i: values[i])


def _components(n_components: Any, n: int) -> list[int]:
    if isinstance(n_components, (torch.Tensor, np.ndarray)):
        n_components = n_components.tolist()  # an int for a 0-d array, else a list
    if isinstance(n_components, (int, np.integer)) and not isinstance(n_components, bool):
        ks = [n_components]
    elif isinstance(n_components, Iterable) and not isinstance(n_components, str):
        ks = list(n_components)
    else:
        raise TypeError(f"n_components must be an int or an iterable of ints; got {type(n_components).__name__}")
    if not ks:
        raise ValueError(f"n_components is empty; give at least one K, e.g. range(1, 11); got {n_components!r}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"n_components must hold ints; got {k!r} ({type(k).__name__})")
        if k < 1:
            raise ValueError(f"n_components must be >= 1; got K={k}")
        if k > n:
            raise ValueError(f"n_components holds K={k}, more than the number of samples N={n}; use K <= {n}")
    return sorted({int(k) for k in ks})


def _families(families: Any) -> list[str]:
    if isinstance(families, (torch.Tensor, np.ndarray)) or not isinstance(families, (str, Iterable)):
        raise TypeError(f"families must be a family name or an iterable of them; got {type(families).__name__}")
    names = [families] if isinstance(families, str) else list(families)
    if not names:
        raise ValueError(f"families is empty; give at least one of {FAMILIES}")
    if not all(isinstance(f, str) for f in names):
        raise TypeError(f"families must hold family names (str) from {FAMILIES}; got {names!r}")
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {FAMILIES}")
    return list(dict.fromkeys(names))


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="select", unit="fit")
