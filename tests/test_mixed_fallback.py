"""The E-step's safer (whitened) mode is chosen per component by the rounding bound: with one
narrow far component among wide ones, the statistics equal the all-whitened mode's (scikit-learn's
way) to rounding, for every per-component family."""

from __future__ import annotations

import pytest
import torch

import puregmm as pg
from puregmm import _moments as mo
from puregmm import estep
from puregmm.families import Family
from tests.bounds import SLACK

EPS = torch.finfo(torch.float64).eps


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
def test_one_flagged_component_equals_the_whitened_mode(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Family, "whitening_cheaper", lambda self, n, k, d: False)  # the natural form's fallback
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 3, generator=g, dtype=torch.float64), 1e3 + 1e-7 * torch.randn(5, 3, generator=g)])
    cov = torch.stack([torch.eye(3), 2 * torch.eye(3), 1e-12 * torch.eye(3)]).double()
    means = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1e3, 1e3, 1e3]], dtype=torch.float64)
    p = pg.from_moments(torch.tensor([0.5, 0.49, 0.01], dtype=torch.float64), means, cov, family)
    flagged = mo.rounding_bound(p, mo.centre_of(p)) > mo.MAX_ROUNDING
    assert flagged.tolist() == [False, False, True]
    want = estep.whitened_stats(p, x, None, None)

    def everything_whitened(*args: object) -> None:
        raise AssertionError("the whole E-step was whitened for one flagged component")

    monkeypatch.setattr(estep, "whitened_stats", everything_whitened)
    got = pg.sufficient_stats(p, x)  # eager: only component 2 whitened
    for name in got._fields:
        a, b = getattr(got, name), getattr(want, name)
        # the two modes sum the same terms in other orders: N·eps relative to the sums' magnitude
        tol = 10 * x.shape[0] * EPS * max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= tol, name


def _natural_log_joint(p: pg.GMMParams, x: torch.Tensor) -> torch.Tensor:
    centre = mo.centre_of(p)
    lay = p.spec.moment_layout(p.dim)
    return mo.natural(p, centre, torch.float64, lay) @ mo.products(lay, x, centre, torch.float64, None).mT  # [K, N]


@pytest.mark.parametrize("family", ["full", "diagonal"])
@pytest.mark.parametrize("case", ["tiny independent variances", "ill-conditioned correlations"])
def test_rounding_bound_caps_the_natural_forms_error(family: str, case: str) -> None:
    """The natural form's log-densities of rows a component claims differ from the whitened ones
    by at most the bound (plus the whitened form's own eps·r rounding), and the bound is at most
    the old eps·tr P·(‖d‖² + tr Σ), which flagged every component of the digits' full fits."""
    g = torch.Generator().manual_seed(1)
    d, k = 12, 3
    means = 3.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    covs = []
    for _ in range(k):
        if case == "tiny independent variances":  # a few features constant within the cluster (reg only)
            a = torch.randn(d, d, generator=g, dtype=torch.float64)
            c = a @ a.mT / d + 0.1 * torch.eye(d, dtype=torch.float64)
            c[:4, :] = 0.0
            c[:, :4] = 0.0
            c[range(4), range(4)] = 1e-6
        else:  # condition number ~1e8
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            c = q @ torch.diag(torch.logspace(-8, 0, d, dtype=torch.float64)) @ q.mT
        covs.append(0.5 * (c + c.mT))
    cov = torch.stack(covs)
    if family == "diagonal":
        cov = torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    p = pg.from_moments(torch.full((k,), 1.0 / k, dtype=torch.float64), means, cov, family)
    centre = mo.centre_of(p)
    bound = mo.rounding_bound(p, centre)
    old = torch.stack([torch.trace(torch.linalg.inv(c)) for c in cov]) * (
        (means - centre).square().sum(-1) + torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    ) * EPS  # fmt: skip
    assert bool((bound <= old * (1 + 1e-6)).all())
    for j in range(k):  # rows component j claims: its own samples
        chol = torch.linalg.cholesky(cov[j])
        rows = means[j] + torch.randn(200, d, generator=g, dtype=torch.float64) @ chol.mT
        white = pg.component_log_prob(p, rows)[:, j]  # whitening: rounding ~eps·(|ℓ| + D·r), r = a few widths
        natural = _natural_log_joint(p, rows)[j]
        own = EPS * (white.abs() + d * 10.0)
        assert float(((natural - white).abs() - own).max()) <= SLACK * float(bound[j]), (case, j)
    if case == "tiny independent variances" and family == "full":
        assert bool((old > mo.MAX_ROUNDING).all()) and not bool((bound > mo.MAX_ROUNDING).any())


def _stats_and_whether_whitened(p: pg.GMMParams, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """``pg.sufficient_stats(p, x)`` and whether it went through the whitened mode."""
    calls: list[int] = []
    whitened = estep.whitened_stats

    def counted(*args: object) -> object:
        calls.append(1)
        return whitened(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(estep, "whitened_stats", counted)
    got = pg.sufficient_stats(p, x)
    monkeypatch.setattr(estep, "whitened_stats", whitened)
    return got, bool(calls)


@pytest.mark.parametrize(
    ("family", "k", "whitens"),
    [("full", 2, True), ("full", 16, False), ("diagonal", 2, True), ("isotropic", 2, True), ("diagonal", 30, False)],
)
def test_small_fits_whiten_where_it_is_cheaper(family: str, k: int, whitens: bool, monkeypatch) -> None:
    """Plain E-steps of the full family with few components per dimension (4K <= 3(D+1), N <=
    1e4) and of the diagonal ones on small data (N·K·D <= 50k) take the whitened form (cheaper
    there); its statistics equal the natural form's to rounding."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) + 4 * torch.randint(0, 2, (400, 1), generator=g)
    p = pg.init(x, k, family, key=0)
    got, whitened = _stats_and_whether_whitened(p, x, monkeypatch)
    assert whitened == whitens
    monkeypatch.setattr(Family, "whitening_cheaper", lambda self, n, k, d: False)
    want = pg.sufficient_stats(p, x)  # the natural form
    for name in got._fields:
        a, b = getattr(got, name), getattr(want, name)
        tol = 10 * x.shape[0] * EPS * max(1.0, float(b.abs().max()))  # two summation orders
        assert float((a - b).abs().max()) <= tol, name


def _mixed_case(family: str = "diagonal") -> tuple[pg.GMMParams, torch.Tensor]:
    """Two wide components near the origin and one narrow far one (only it is flagged)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 3, generator=g, dtype=torch.float64), 1e3 + 1e-7 * torch.randn(5, 3, generator=g)])
    cov = torch.stack([torch.eye(3), 2 * torch.eye(3), 1e-12 * torch.eye(3)]).double()
    means = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1e3, 1e3, 1e3]], dtype=torch.float64)
    return pg.from_moments(torch.tensor([0.5, 0.49, 0.01], dtype=torch.float64), means, cov, family), x


@pytest.mark.parametrize("form", ["natural", "mixed", "whitened", "float32"])
def test_score_pass_takes_the_statistics_form(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit's final loss (``estep.log_lik``: scores only) goes through the same form as the
    statistics (natural, one component whitened, all whitened, float32 T) and equals their
    log-likelihood to the rounding of N summed log-densities."""
    g = torch.Generator().manual_seed(3)
    if form != "whitened":  # small data: the forms the rule would not pick here
        monkeypatch.setattr(Family, "whitening_cheaper", lambda self, n, k, d: False)
    if form == "mixed":
        p, x = _mixed_case()
    else:
        dtype = torch.float32 if form == "float32" else torch.float64
        x = torch.randn(400, 3, generator=g, dtype=torch.float64) + 4 * torch.randint(0, 2, (400, 1), generator=g)
        x = (x + 10).to(dtype)  # away from the origin: float32 rows' own error exceeds the form's
        p = pg.init(x, 2, "full" if form == "whitened" else "diagonal", key=1)
    forms: list[tuple[str, torch.dtype]] = []
    real_form = estep._form

    def spy(*args: object) -> object:
        out = real_form(*args)  # type: ignore[arg-type]
        forms.append((out.kind, out.ndtype))
        return out

    monkeypatch.setattr(estep, "_form", spy)
    ll, count = estep.log_lik(p, x)
    want = {"natural": "natural", "mixed": "mixed", "whitened": "whitened", "float32": "natural"}[form]
    assert [kind for kind, _ in forms] == [want]
    if form == "float32":
        assert forms[0][1] == torch.float32  # T and the GEMM in float32 where that loses nothing
    ref = estep.whitened_stats(p, x, None, None) if form == "mixed" else pg.sufficient_stats(p, x)
    assert float(count) == x.shape[0]
    eps = torch.finfo(x.dtype).eps
    per_row = pg.log_prob(p, x).double().abs().max()
    tol = 10 * x.shape[0] * eps * max(1.0, float(per_row))  # N rows' sums in two orders and two logsumexps
    assert abs(float(ll) - float(ref.log_lik_sum)) <= tol, (float(ll), float(ref.log_lik_sum), tol)


@pytest.mark.parametrize("family", ["full", "diagonal", "isotropic"])
@pytest.mark.parametrize("group_bytes", [1, 2 * 8 * 305 * 3])  # one component per group; groups of 2, 1
def test_whitened_moments_in_groups_equal_all_at_once(family: str, group_bytes: int, monkeypatch) -> None:
    """The whitened mode's moments about the means do not depend on how components are grouped:
    each component's sums are the same N terms (a batched GEMM may add them in another order)."""
    p, x = _mixed_case(family)
    want = estep.whitened_stats(p, x, None, None)  # small data: all components in one group
    monkeypatch.setattr(estep, "ABOUT_MEANS_BYTES", group_bytes)
    got = estep.whitened_stats(p, x, None, None)
    for name in got._fields:
        a, b = getattr(got, name), getattr(want, name)
        tol = 10 * x.shape[0] * EPS * max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= tol, name


@pytest.mark.parametrize("n, k, whitens", [(400, 3, True), (20_000, 4, False)])  # N·K·D² 43k / 2.9M
def test_small_tied_fits_whiten_where_it_is_cheaper(n: int, k: int, whitens: bool, monkeypatch) -> None:
    """The tied family whitens per component on small data (N·K·D² <= TIED_WHITEN_MAX_WORK)
    and keeps the pooled form above; both give the same pooled statistics and M-step to
    rounding (the whitened form's S_k are each component's own, the pooled form's equal shares)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) + 4 * torch.randint(0, 2, (n, 1), generator=g)
    p = pg.init(x, k, "tied", key=0)
    got, whitened = _stats_and_whether_whitened(p, x, monkeypatch)
    assert whitened == whitens
    monkeypatch.setattr(Family, "whitening_cheaper", lambda self, n, k, d: False)
    want = pg.sufficient_stats(p, x)  # the pooled form
    pairs = [(getattr(got, f), getattr(want, f)) for f in ("resp_sum", "x_sum", "log_lik_sum", "weight_sum")]
    pairs.append((got.xx_sum.sum(0), want.xx_sum.sum(0)))  # the pooled scatter Σ_k S_k
    new_got, new_want = pg.m_step(got, p), pg.m_step(want, p)
    pairs += [(new_got.means, new_want.means), (new_got.scale, new_want.scale)]
    for a, b in pairs:
        tol = 10 * x.shape[0] * EPS * max(1.0, float(b.abs().max()))  # two summation orders
        assert float((a - b).abs().max()) <= tol
