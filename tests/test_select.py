"""pg.select: picks the true K on data from a known mixture; its table agrees with pg.bic,
pg.aic and pg.fit; bad arguments raise clear errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import puregmm as pg
from puregmm.select import SelectionRow, SelectionTable, format_table
from tests import bounds


def four_blobs(n: int = 3000) -> torch.Tensor:
    """n points [n, 2] from a known 4-component full-covariance mixture."""
    w = torch.tensor([0.3, 0.25, 0.25, 0.2], dtype=torch.float64)
    mu = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]], dtype=torch.float64)
    cov = torch.tensor(
        [[[1.0, 0.5], [0.5, 1.0]], [[1.5, 0.0], [0.0, 0.5]], [[0.6, -0.3], [-0.3, 1.2]], [[1.0, 0.0], [0.0, 1.0]]],
        dtype=torch.float64,
    )
    x, _ = pg.sample(pg.from_moments(w, mu, cov), n, key=0)
    return x


@pytest.fixture(scope="module")
def blobs() -> tuple[torch.Tensor, pg.Selection]:
    x = four_blobs()
    return x, pg.select(x, n_components=range(1, 8), families=("full", "diagonal"), progress=False)


@pytest.fixture(scope="module")
def small() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(60, 2, generator=g) - 4, torch.randn(60, 2, generator=g) + 4])


def test_picks_k4_on_a_known_four_component_mixture(blobs) -> None:
    _, sel = blobs
    table, params = sel  # a NamedTuple: unpacks as (table, params)
    assert params.n_components == 4
    assert [(r.family, r.K) for r in table] == [(f, k) for f in ("full", "diagonal") for k in range(1, 8)]
    assert table.best().K == 4 and table.best().family == params.family == "full"
    assert all(r.converged for r in table)


def test_table_matches_bic_aic_and_an_independent_fit(blobs) -> None:
    x, sel = blobs
    best = sel.table.best()
    assert best.bic == float(pg.bic(sel.params, x))
    assert best.aic == float(pg.aic(sel.params, x))
    loss_atol = 2 * bounds.log_lik_atol(sel.params, x, n=x.shape[0])  # the fit's loss and a fresh one
    assert best.loss == pytest.approx(float(pg.loss(sel.params, x)), rel=0, abs=loss_atol)
    assert best.bic == min(r.bic for r in sel.table)
    # a row is exactly pg.fit of that candidate with the same key
    again = pg.fit(x, 3, "diagonal", method="em", key=0)
    row = next(r for r in sel.table if (r.family, r.K) == ("diagonal", 3))
    assert row.bic == float(pg.bic(again.params, x)) and row.n_steps == again.n_steps


def test_aic_criterion_and_single_family_string(small) -> None:
    sel = pg.select(small, [3, 1, 2, 2], families="diagonal", criterion="AIC", n_init=2, progress=False)
    assert [r.K for r in sel.table] == [1, 2, 3]  # sorted, duplicates dropped
    assert sel.table.criterion == "aic"
    best = min(sel.table, key=lambda r: r.aic)
    assert sel.params.n_components == best.K and best.aic == float(pg.aic(sel.params, small))


def test_sample_weight_is_forwarded_and_weights_the_criterion(small) -> None:
    w = torch.ones(small.shape[0], dtype=small.dtype)
    w[:10] = 3.0
    sel = pg.select(small, 2, families="full", sample_weight=w, progress=False)
    assert sel.table[0].bic == float(pg.bic(sel.params, small, w))
    assert sel.table[0].bic != float(pg.bic(sel.params, small))


def test_str_and_format_table_mark_the_best_row(blobs) -> None:
    _, sel = blobs
    text = str(sel.table)
    lines = text.splitlines()
    assert lines[0].split() == ["family", "K", "bic", "aic", "loss", "converged", "steps", "resets"]
    assert len(lines) == 1 + len(sel.table)
    starred = [line for line in lines if line.startswith("*")]
    assert len(starred) == 1 and starred[0].split()[1:3] == ["full", "4"]
    assert text == format_table(sel.table, "bic")
    assert format_table([]) == "(no candidates)"
    nan_row = SelectionRow("full", 1, math.nan, math.nan, math.nan, False, 3, 0)
    ok_row = SelectionRow("full", 2, 5.0, 4.0, 1.0, True, 3, 0)
    assert "n/a" in format_table([nan_row, ok_row]) and SelectionTable([nan_row, ok_row]).best() is ok_row


def test_rows_are_plain_python_values(small) -> None:
    (row,) = pg.select(small, 1, families="full", progress=False).table
    assert [type(v) for v in row] == [str, int, float, float, float, bool, int, int]


def test_one_convergence_warning_for_all_stalled_candidates(small) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = pg.select(small, range(2, 4), families="full", max_steps=1, tol=0.0, progress=False)
    conv = [w for w in caught if issubclass(w.category, pg.ConvergenceWarning)]
    assert len(conv) == 1 and "2 of 2 candidates" in str(conv[0].message)
    assert not any(r.converged for r in sel.table)


def test_progress_bar_counts_candidates(small, capsys) -> None:
    pg.select(small, range(1, 3), families="diagonal", progress=True)
    err = capsys.readouterr().err
    assert "select" in err and "2/2" in err


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"criterion": "mdl"}, ValueError, "criterion must be one of"),
        ({"n_components": range(1, 1)}, ValueError, "n_components is empty"),
        ({"n_components": []}, ValueError, "n_components is empty"),
        ({"n_components": [0, 1]}, ValueError, "must be >= 1; got K=0"),
        ({"n_components": [2, 121]}, ValueError, "K=121, more than the number of samples N=120"),
        ({"n_components": 2.5}, TypeError, "must be an int or an iterable"),
        ({"n_components": [1, 2.0]}, TypeError, "must hold ints"),
        ({"families": ()}, ValueError, "families is empty"),
        ({"families": ("full", "spherical")}, ValueError, r"unknown families \['spherical'\]"),
        ({"family": "full"}, TypeError, r"select sets \['family'\] itself"),
        ({"method": "newton"}, ValueError, "unknown method"),
    ],
)
def test_errors(small, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        pg.select(small, **{"n_components": range(1, 3), "progress": False, **kwargs})


def test_bad_data() -> None:
    with pytest.raises(ValueError, match=r"x must be 2-D \[N, D\]"):
        pg.select(torch.zeros(5), progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        pg.select(torch.tensor([[0.0, 1.0], [math.nan, 0.0]]), 1, progress=False)
