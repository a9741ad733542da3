"""Issue 14, more entry checks: the static checks of ``m_step`` and ``init_state`` (in
``puregmm._validate_params``), ``apply_updates``' pytree check and the plots' arguments. Each
bad argument raises a ``ValueError``/``TypeError`` naming it, what was expected and what came in.

``m_step``'s check runs in every EM step, so it must accept everything the EM drivers pass
it (batched params under ``vmap``, a 0-d tensor ``reg_covar``, ``reduce``, missing entries,
``torch.compile``): the fixture below puts it in front of every caller's ``m_step``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import puregmm as pg
from puregmm import _validate, mstep, stream
from puregmm.tree import tree_map2
from tests.bounds import SLACK, gamma
from tests.strategies import random_params

F64 = torch.float64


def _x(n: int = 60, d: int = 2, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    x[: n // 2] += 4.0
    return x.to(dtype)


# --- m_step: the check accepts what the EM drivers pass, and names what is wrong ------------------


@pytest.fixture
def checked_m_step(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every internal M-step (``mstep.maximise``, which em_step, streams and online EM call after
    checking their own arguments) would pass ``_validate.m_step_args``, the public m_step's check."""
    calls: list[int] = []
    maximise = mstep.maximise

    def checked(stats: Any, params: Any, reg_covar: Any, return_info: bool = False) -> Any:
        reg = _validate.m_step_args(stats, params, reg_covar)
        calls.append(1)
        return maximise(stats, params, reg, return_info)

    for module in ("em", "online", "stream"):  # the modules that call the M-step
        monkeypatch.setattr(importlib.import_module(f"puregmm.{module}"), "maximise", checked)
    monkeypatch.setattr(mstep, "maximise", checked)  # the public m_step (init's) through it
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("family", pg.FAMILIES)
def test_m_step_check_accepts_every_em_path(checked_m_step: list[int], family: str, dtype: torch.dtype) -> None:
    x = _x(dtype=dtype)
    p = pg.init(x, 3, family)  # init's own M-step
    batched = pytree.tree_map(lambda t: torch.stack([t, t]), p)
    seen = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.2
    pg.em_step(p, x)
    pg.em_step(p, x, reg_covar=torch.tensor(1e-6, dtype=dtype))  # a fit's standardised reg_covar
    pg.em_step(batched, x)  # m_step under vmap
    pg.em_step(batched, torch.stack([x, x]), reduce=lambda s: s)  # the reduce path
    pg.em_step(p, torch.where(seen, x, torch.nan), observed=seen)  # missing entries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        pg.fit(x, 3, family, max_steps=3)
        pg.fit_batched(torch.stack([x, x]), 3, family, max_steps=3)
    assert len(checked_m_step) >= 8


def test_m_step_check_accepts_streams_and_online_em(checked_m_step: list[int]) -> None:
    x = _x(200).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        stream.fit_stream(x, 2, dtype=F64, max_steps=2, chunk_size=50)
        pg.fit(torch.as_tensor(x), 2, method="online_em", max_steps=2)
    assert len(checked_m_step) >= 3


def test_m_step_check_compiles_without_graph_breaks() -> None:
    x = _x()
    p = pg.init(x, 2, "full")

    def step(p: pg.GMMParams, x: torch.Tensor) -> pg.GMMParams:
        s = pg.sufficient_stats(p, x)
        return mstep.m_step(s, p, reg_covar=_validate.m_step_args(s, p, 1e-6))

    got = torch.compile(step, fullgraph=True)(p, x)  # fullgraph: a graph break would raise
    want = pg.em_step(p, x)
    # other summation orders: a mean moves by at most γ_N · max|x - c| (Higham eq. 3.4)
    tol = SLACK * gamma(x.shape[0]) * float((x[:, None] - p.means).abs().max())
    torch.testing.assert_close(got.means, want.means, rtol=0, atol=tol)


X_SUM = "stats.x_sum must have shape (2, 2) for params of family 'full' with K=2, D=2 (the stats of the same params)"


def _stats_and_params() -> tuple[pg.Stats, pg.GMMParams]:
    p = random_params("full", 2, 2, seed=0)
    return pg.sufficient_stats(p, _x()), p


def test_m_step_args_returns_reg_covar() -> None:
    s, p = _stats_and_params()
    assert _validate.m_step_args(s, p, 1e-6) == 1e-6 and isinstance(_validate.m_step_args(s, p, 0), float)
    reg = torch.tensor(1e-3, dtype=F64)
    assert _validate.m_step_args(s, p, reg) is reg


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            lambda s, p: (None, p, 1e-6),
            TypeError,
            "stats must be puregmm.Stats (from pg.sufficient_stats); got NoneType",
        ),
        (lambda s, p: (p, p, 1e-6), TypeError, "stats must be puregmm.Stats (from pg.sufficient_stats); got GMMParams"),
        (lambda s, p: (s, None, 1e-6), TypeError, "params must be GMMParams"),
        (
            lambda s, p: (s, p.to(torch.float32), 1e-6),
            TypeError,
            "stats.resp_sum has dtype torch.float64 but the params have torch.float32",
        ),
        (lambda s, p: (s._replace(x_sum=s.x_sum[:, :1]), p, 1e-6), ValueError, X_SUM),
        (
            lambda s, p: (s._replace(xx_sum=s.xx_sum[..., 0]), p, 1e-6),
            ValueError,
            "stats.xx_sum must have shape (2, 2, 2)",
        ),
        (
            lambda s, p: (s._replace(weight_sum=1.0), p, 1e-6),
            TypeError,
            "stats.weight_sum must be a torch.Tensor; got float",
        ),
        (
            lambda s, p: (s, pytree.tree_map(lambda t: torch.stack([t, t]), p), 1e-6),
            ValueError,
            "m_step needs unbatched params (vmap it over batched ones); got batch dims (2,)",
        ),
        (
            lambda s, p: (s, dataclasses.replace(p, scale=p.scale[..., 0]), 1e-6),
            ValueError,
            "params.scale must have shape (2, 2, 2)",
        ),
        (lambda s, p: (s, p, None), TypeError, "reg_covar must be a non-negative float; got NoneType"),
        (lambda s, p: (s, p, -1.0), ValueError, "reg_covar must be a finite non-negative float (e.g. 1e-6); got -1.0"),
        (
            lambda s, p: (s, p, math.nan),
            ValueError,
            "reg_covar must be a finite non-negative float (e.g. 1e-6); got nan",
        ),
        (
            lambda s, p: (s, p, torch.zeros(3, dtype=F64)),
            TypeError,
            "(or a 0-d float tensor); got a torch.float64 tensor of shape (3,)",
        ),
        (lambda s, p: (s, p, torch.tensor(1)), TypeError, "got a torch.int64 tensor of shape ()"),
    ],
)
def test_m_step_args_name_the_argument(change: Any, error: type, message: str) -> None:
    args = change(*_stats_and_params())
    with pytest.raises(error, match=re.escape(message)):
        _validate.m_step_args(*args)


# --- init_state -----------------------------------------------------------------------------------


def test_init_state_args_accepts_what_init_state_takes() -> None:
    p = random_params("diagonal", 3, 2, seed=2)
    assert _validate.init_state_args(p, 1e-6) == 1e-6
    assert _validate.init_state_args(p, np.float32(0.5)) == 0.5 and _validate.init_state_args(p, 2) == 2.0
    batched = pytree.tree_map(lambda t: torch.stack([t, t]), p)
    assert _validate.init_state_args(batched, 1e-6) == 1e-6
    masked = dataclasses.replace(p, logits=torch.tensor([0.0, -math.inf, 0.0], dtype=F64))
    assert _validate.init_state_args(masked, 1e-6) == 1e-6  # a masked component (-inf) is allowed


@pytest.mark.parametrize(
    ("params", "min_variance", "error", "message"),
    [
        ("p", 0.0, ValueError, "min_variance must be a finite positive float; got 0.0"),
        ("p", -1, ValueError, "min_variance must be a finite positive float; got -1"),
        ("p", math.inf, ValueError, "min_variance must be a finite positive float; got inf"),
        ("p", math.nan, ValueError, "min_variance must be a finite positive float; got nan"),
        ("p", True, TypeError, "min_variance must be a positive float; got bool True"),
        ("p", "1e-6", TypeError, "min_variance must be a positive float; got str '1e-6'"),
        ("p", torch.ones(3), TypeError, "min_variance must be a positive float; got Tensor"),
        (
            None,
            1e-6,
            TypeError,
            "params must be GMMParams (from pg.fit(...).params, pg.init or pg.from_moments); got NoneType",
        ),
        ("bad scale", 1e-6, ValueError, "params.scale must have shape (3, 2) for family 'diagonal'"),
        ("nan means", 1e-6, ValueError, "params.means contains NaN or Inf"),
        ("half", 1e-6, TypeError, "params has dtype torch.float16"),
    ],
)
def test_init_state_args_name_the_argument(params: Any, min_variance: Any, error: type, message: str) -> None:
    p = random_params("diagonal", 3, 2, seed=2)
    bad = {
        "p": p,
        None: None,
        "bad scale": dataclasses.replace(p, scale=p.scale[:, :1]),
        "nan means": dataclasses.replace(p, means=torch.full_like(p.means, math.nan)),
        "half": p.to(torch.float16),
    }[params]
    with pytest.raises(error, match=re.escape(message)):
        _validate.init_state_args(bad, min_variance)


# --- the shared scalar checks -----------------------------------------------------------------------


def test_positive_and_one_of() -> None:
    assert _validate.positive(np.float64(2.5), "v") == 2.5
    assert _validate.one_of("BIC", ("bic", "aic"), "criterion") == "bic"
    with pytest.raises(ValueError, match=re.escape("criterion must be one of ('bic', 'aic'); got 'loss'")):
        _validate.one_of("loss", ("bic", "aic"), "criterion")
    with pytest.raises(ValueError, match=re.escape("criterion must be one of ('bic', 'aic'); got None")):
        _validate.one_of(None, ("bic", "aic"), "criterion")


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((None, 10, 0.0, 0), ValueError, "init_value must be a finite non-negative number; got None"),
        ((math.inf, 10, 0.0, 0), ValueError, "init_value must be a finite non-negative number; got inf"),
        ((0.1, 0, 0.0, 0), ValueError, "decay_steps must be a positive int (below 2**63); got 0"),
        ((0.1, 10.0, 0.0, 0), TypeError, "decay_steps must be a positive int; got float 10.0"),
        ((0.1, 10, None, 0), ValueError, "alpha must be a finite non-negative number; got None"),
        ((0.1, 10, -0.5, 0), ValueError, "alpha must be a finite non-negative number; got -0.5"),
        ((0.1, 10, 0.0, -1), ValueError, "warmup_steps must be a non-negative int (below 2**63); got -1"),
        ((0.1, 10, 0.0, 2.5), TypeError, "warmup_steps must be a non-negative int; got float 2.5"),
    ],
)
def test_cosine_decay_args_name_the_argument(args: tuple[Any, ...], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        _validate.cosine_decay_args(*args)


def test_cosine_decay_args_accepts_the_documented_settings() -> None:
    assert _validate.cosine_decay_args(0.1, 100, 0.01, 0) == (0.1, 100, 0.01, 0)
    assert _validate.cosine_decay_args(1, np.int64(100), 0, 10) == (1.0, 100, 0.0, 10)


# --- pytrees of the same structure and leaf shapes (apply_updates, the optimisers) ---------------


def test_tree_map2_names_both_trees() -> None:
    p = random_params("full", 2, 2, seed=0)
    names = ("params", "updates")
    with pytest.raises(ValueError, match=r"(?s)updates must have the pytree structure of params:.*GMMParams.*got"):
        tree_map2(torch.add, p, {"means": p.means}, names=names)
    shapes = "updates must have the leaf shapes of params, [(2,), (2, 2), (2, 2, 2)]; got [(2,), (2, 2), (2, 2)]"
    with pytest.raises(ValueError, match=re.escape(shapes)):
        tree_map2(torch.add, p, dataclasses.replace(p, scale=p.scale[..., 0]), names=names)  # would broadcast
    with pytest.raises(TypeError, match=re.escape("params must be a pytree of tensors; got leaves of type ['float']")):
        tree_map2(torch.add, {"a": 1.0}, {"a": torch.ones(())}, names=names)
    with pytest.raises(TypeError, match=re.escape("updates must be a pytree of tensors; got leaves of type ['str']")):
        tree_map2(torch.add, {"a": torch.ones(())}, {"a": "x"}, names=names)
    with pytest.raises(ValueError, match=re.escape("other1 must have the pytree structure of tree")):
        tree_map2(torch.add, {"a": torch.ones(())}, [torch.ones(())])  # default names
    got = tree_map2(torch.add, {"a": torch.ones(2)}, {"a": torch.ones(2)})
    torch.testing.assert_close(got["a"], torch.full((2,), 2.0))


def test_apply_updates_names_params_and_updates() -> None:
    p = random_params("full", 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"(?s)updates must have the pytree structure of params:.*GMMParams.*got"):
        pg.apply_updates(p, None)
    with pytest.raises(ValueError, match=re.escape("updates must have the leaf shapes of params")):
        pg.apply_updates(p, pytree.tree_map(lambda t: torch.stack([t, t]), p))  # would broadcast to a batch
    with pytest.raises(ValueError, match=r"(?s)updates must have the pytree structure of params:.*full.*bogus"):
        pg.apply_updates(p, dataclasses.replace(p, family="bogus"))
    want = p.means + p.means.float().double()  # updates are cast to the params' dtype, then added
    assert torch.equal(pg.apply_updates(p, p.to(torch.float32)).means, want)


# --- plots --------------------------------------------------------------------------------------


@pytest.fixture
def no_figures() -> Any:
    pytest.importorskip("matplotlib")
    yield


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_points": 0}, ValueError, "max_points must be a positive int (below 2**63); got 0"),
        ({"max_points": 2.5}, TypeError, "max_points must be a positive int; got float 2.5"),
        ({"sigmas": (1.0, -2.0)}, ValueError, "sigmas must be a finite positive float; got -2.0"),
        ({"sigmas": 3}, TypeError, "sigmas must be a sequence of positive numbers such as (1, 2, 3); got 3"),
        (
            {"x": torch.full((4, 2), math.nan, dtype=F64)},
            ValueError,
            "x contains NaN or Inf (first bad rows: [0, 1, 2, 3])",
        ),
        ({"x": torch.zeros(0, 2, dtype=F64)}, ValueError, "x must be non-empty; got shape (0, 2)"),
        (
            {"x": torch.zeros(4, 2, dtype=torch.complex128)},
            TypeError,
            "x must hold real numbers; got dtype torch.complex128",
        ),
        ({"params": "inf scale"}, ValueError, "params.scale contains NaN or Inf"),
        ({"params": "bad shape"}, ValueError, "params.scale must have shape (2, 2, 2)"),
    ],
)
def test_plot_fit_names_the_argument(no_figures: Any, kwargs: dict[str, Any], error: type, message: str) -> None:
    p = random_params("full", 2, 2, seed=0)
    params = {
        "inf scale": dataclasses.replace(p, scale=torch.full_like(p.scale, math.inf)),
        "bad shape": dataclasses.replace(p, scale=p.scale[..., 0]),
    }
    call = {"params": p, "x": _x(8), **kwargs}
    call["params"] = params.get(call["params"], call["params"]) if isinstance(call["params"], str) else call["params"]
    with pytest.raises(error, match=re.escape(message)):
        pg.plot_fit(**call)


def test_plot_fit_draws_any_real_dtype_and_far_data(no_figures: Any) -> None:
    p = random_params("full", 2, 4, seed=0)
    for x in (_x(40, 4).half(), _x(40, 4).bfloat16(), _x(40, 4).long(), _x(40, 4).numpy()):
        assert len(pg.plot_fit(p, x).collections[0].get_offsets()) == 40
    # the principal plane of far data (beyond sqrt(max float64)) is found as that of the data near 1
    near, far = pg.plot.project(p, _x(40, 4)), pg.plot.project(p, _x(40, 4) * 1e200)
    assert near.labels == far.labels
    torch.testing.assert_close(far.points / 1e200, near.points, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("history", "error", "message"),
    [
        (None, TypeError, "history must be a tensor or array-like; got NoneType"),
        ("abc", TypeError, "history must be a tensor or array-like; got str"),
        ({"a": 1}, TypeError, "history must be a tensor or array-like; got dict"),
        (torch.ones(3, 4), ValueError, "history must be 1-D, one loss per step (FitResult.history); got shape (3, 4)"),
        (2.5, ValueError, "history must be 1-D, one loss per step (FitResult.history); got shape ()"),
        (torch.ones(3, dtype=torch.complex64), TypeError, "history must hold real numbers; got dtype torch.complex64"),
    ],
)
def test_plot_loss_names_history(no_figures: Any, history: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        pg.plot_loss(history)


def test_plot_loss_draws_any_real_history(no_figures: Any) -> None:
    half, nan = torch.tensor([3.0, 2.0], dtype=torch.float16), torch.tensor([1.0, math.nan])
    for h in ([3.0, 2.0], half, np.array([3, 2]), nan):
        assert pg.plot_loss(h).lines[0].get_xdata().tolist() == [1, 2]


KINDS = "table must be rows (dicts, NamedTuples or objects with attributes), a dict of columns or a DataFrame"
ROWS = [{"family": "full", "K": 1, "bic": 10.0}, {"family": "full", "K": 2, "bic": 8.0}]


@pytest.mark.parametrize(
    ("table", "criterion", "error", "message"),
    [
        (ROWS, "loss", ValueError, "criterion must be one of ('bic', 'aic'); got 'loss'"),
        (ROWS, None, ValueError, "criterion must be one of ('bic', 'aic'); got None"),
        (torch.zeros(3, 2), "bic", TypeError, KINDS + "; got Tensor"),
        ("abc", "bic", TypeError, "table must be rows"),
        (5, "bic", TypeError, KINDS + "; got int"),
        ({"a": 1}, "bic", TypeError, "table: a dict of columns needs a sequence per column; column 'a' is not one"),
        ([[1.0]], "bic", TypeError, "got a row that is a list"),
        ([torch.zeros(2)], "bic", TypeError, "got a row that is a Tensor"),
        ([{"K": 1}], "bic", ValueError, "table rows need a column 'bic'; got columns ['k']"),
        ([{"K": "two", "bic": 1.0}], "bic", TypeError, "table: column 'K' must hold numbers; got str 'two'"),
        ([{"K": 1.5, "bic": 1.0}], "bic", TypeError, "table: column 'K' must hold whole numbers; got 1.5"),
        ([{"K": 1, "bic": None}], "bic", TypeError, "table: column 'bic' must hold numbers; got NoneType None"),
        (
            [{"K": 1, "bic": math.nan}],
            "bic",
            ValueError,
            "table: every bic value is NaN or infinite; nothing to compare",
        ),
        ([], "bic", ValueError, "table is empty"),
    ],
)
def test_plot_criterion_names_the_argument(
    no_figures: Any, table: Any, criterion: Any, error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        pg.plot_criterion(table, criterion=criterion)


def test_plot_criterion_skips_non_finite_values(no_figures: Any) -> None:
    rows = [*ROWS, {"family": "full", "K": 3, "bic": math.nan}, {"family": "full", "K": 4, "BIC": -math.inf}]
    ax = pg.plot_criterion(rows, criterion="BIC")
    assert "best: full, K=2" in [t.get_text() for t in ax.get_legend().get_texts()]
    ax = pg.plot_criterion({"K": torch.tensor([1, 2]), "bic": np.array([3.0, 1.0])})
    assert "best: full, K=2" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_sufficient_stats_names_batched_params() -> None:
    """Batched params with shared data: a ValueError naming the batch dims (vmap is the way)."""
    x = _x()
    p = pg.init(x, 2, "full")
    batched = pytree.tree_map(lambda t: torch.stack([t, t]), p)
    with pytest.raises(ValueError, match=r"sufficient_stats needs unbatched params.*batch dims \(2,\)"):
        pg.sufficient_stats(batched, x)
    assert torch.func.vmap(pg.sufficient_stats, in_dims=(0, None))(batched, x).resp_sum.shape == (2, 2)
