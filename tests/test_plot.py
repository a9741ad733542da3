"""Plots: exact ellipse geometry, the PCA projection, panels drawn, no pyplot, clear ImportError."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import puregmm as pg
from puregmm import plot
from tests.strategies import random_params

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n_sigma", [1.0, 2.0, 3.0])
def test_ellipse_points_lie_at_mahalanobis_distance_n(n_sigma: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randn(2, 2, generator=gen, dtype=torch.float64)
        cov = a @ a.T + 0.1 * torch.eye(2, dtype=torch.float64)
        mean = torch.randn(2, generator=gen, dtype=torch.float64)
        pts = plot.ellipse_points(mean, cov, n_sigma)
        diff = pts - mean
        maha = torch.einsum("ni,ij,nj->n", diff, torch.linalg.inv(cov), diff)
        torch.testing.assert_close(maha, torch.full_like(maha, n_sigma**2), rtol=1e-12, atol=1e-12)
        # The curve goes all the way round: its extent along x is n·σ_x on each side.
        torch.testing.assert_close(pts[:, 0].max() - mean[0], n_sigma * cov[0, 0].sqrt(), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match=r"mean must be \[2\] and cov \[2, 2\]"):
        plot.ellipse_points(torch.zeros(3), torch.eye(3))


def test_projection_2d_is_the_identity() -> None:
    p = random_params("full", 3, 2)
    x = torch.randn(50, 2, dtype=torch.float64)
    proj = plot.project(p, x)
    assert torch.equal(proj.points, x) and torch.equal(proj.means, p.means)
    torch.testing.assert_close(proj.covariances, pg.covariances(p))


def test_projection_d_gt_2_is_the_exact_marginal_on_the_principal_plane() -> None:
    gen = torch.Generator().manual_seed(1)
    scales = torch.tensor([5.0, 3.0, 0.5, 0.2], dtype=torch.float64)
    x = torch.randn(4000, 4, generator=gen, dtype=torch.float64) * scales + torch.tensor([1.0, -2.0, 3.0, 0.0])
    p = random_params("full", 3, 4, seed=2)
    proj = plot.project(p, x, max_points=10_000)
    # The plane is spanned by the two high-variance axes (up to sign).
    v = torch.linalg.lstsq(x - x.mean(0), proj.points).solution  # [D, 2], recovers V from the map
    torch.testing.assert_close(v.abs(), torch.eye(4, 2, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)
    # Projected components are N(Vᵀ(μ - c), Vᵀ Σ V).
    torch.testing.assert_close(proj.means, (p.means - x.mean(0)) @ v, atol=1e-10, rtol=0)
    torch.testing.assert_close(proj.covariances, v.T @ pg.covariances(p) @ v, atol=1e-10, rtol=0)
    assert proj.labels[0].startswith("PC1")
    # Without data the plane comes from the mixture's own covariance.
    assert plot.project(p).points.shape == (0, 2)


def count_lines(ax) -> int:
    return len(ax.lines)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_plot_fit_draws_three_ellipses_per_component(tmp_path: Path, d: int) -> None:
    k = 3
    p = random_params("diagonal", k, d, seed=3)
    x = torch.randn(300, d, dtype=torch.float64) * 3
    ax = plot.plot_fit(p, x, max_points=100)
    if d == 1:
        assert count_lines(ax) == k + 1  # component densities and the mixture
    else:
        assert count_lines(ax) == k * 3 + k  # 3 ellipses and a centre marker per component
        assert len(ax.collections[0].get_offsets()) == 100  # sub-sampled points
    ax.figure.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_fit_checks_inputs() -> None:
    p = random_params("full", 2, 2)
    with pytest.raises(ValueError, match=r"x must be \[N, 2\]"):
        plot.plot_fit(p, torch.zeros(4, 3))
    stacked = torch.utils._pytree.tree_map(lambda a, b: torch.stack([a, b]), p, p)
    with pytest.raises(ValueError, match="unbatched"):
        plot.plot_fit(stacked)
    with pytest.raises(TypeError, match="GMMParams"):
        plot.plot_fit("model.safetensors")


def test_loss_and_criterion_plots() -> None:
    ax = plot.plot_loss(torch.linspace(3.0, 1.0, 50))
    assert len(ax.lines[0].get_xdata()) == 50
    Row = collections.namedtuple("Row", "family K BIC AIC")
    rows = [
        Row(f, k, 100.0 - 10 * k + (k - 3) ** 2 * 12 + (f == "full"), 0.0)
        for f in ("full", "diagonal")
        for k in (1, 2, 3, 4)
    ]
    for table in (
        rows,
        [r._asdict() for r in rows],
        {c: [getattr(r, c) for r in rows] for c in Row._fields},
    ):
        ax = plot.plot_criterion(table)
        assert len(ax.lines) == 3  # two families and the best marker
        assert "best: diagonal, K=3" in [t.get_text() for t in ax.get_legend().get_texts()]
    with pytest.raises(ValueError, match="column 'aic'"):
        plot.plot_criterion([{"K": 1, "BIC": 2.0}], criterion="aic")
    with pytest.raises(ValueError, match="empty"):
        plot.plot_criterion([])


def test_fit_figure_panels() -> None:
    p = random_params("full", 2, 2)
    x = torch.randn(40, 2, dtype=torch.float64)
    assert len(plot.fit_figure(p, x).axes) == 1
    assert len(plot.fit_figure(p, x, history=torch.ones(5)).axes) == 2
    table = [{"family": "full", "K": k, "BIC": float(k)} for k in (1, 2)]
    assert len(plot.fit_figure(p, x, history=torch.ones(5), table=table).axes) == 3


def test_missing_matplotlib_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'puregmm\[plot\]'"):
        plot.plot_fit(random_params("full", 2, 2))


def test_matplotlib_is_lazy_and_pyplot_never_imported(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, torch, puregmm as pg
        assert "matplotlib" not in sys.modules, "import puregmm imported matplotlib"
        from puregmm import plot
        p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.tensor([[0., 0.], [3., 3.]]), torch.eye(2).expand(2, 2, 2))
        plot.save_figure(plot.fit_figure(p, torch.randn(20, 2), torch.ones(3)), {str(tmp_path / "a.png")!r})
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
