"""Missing values (issue 15): the kernels' ``observed`` mask, incomplete-data EM, ``missing=``.

Oracles: SciPy's multivariate normal on each row's observed sub-vector; an incomplete-data EM
step written here in NumPy from the moments (covariance-block formulas, no puregmm code);
the complete-data kernels (a mask all True); a known mixture (20 % MCAR). Tolerances are error
bounds (tests/bounds.py): a row's marginal density rounds no worse than its full density at any
completion of the row (the Mahalanobis distance of x_o under Σ_oo is at most that of any
completion, and κ(Σ_oo) ≤ κ(Σ)), so the bounds are taken at the row completed by the centre.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import puregmm as pg
from puregmm import _masked
from tests import bounds
from tests.oracles import mixture_data, random_params

FAMILIES = pg.FAMILIES
F64 = torch.float64


def masked_data(n: int, d: int, frac: float, seed: int, *, empty: int = 2, full: int = 2) -> tuple:
    """x [N, D] with NaN where not observed, and the mask; ``empty`` rows observe nothing,
    ``full`` rows everything."""
    x, _ = mixture_data(3, d, n, separation=3.0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    observed = torch.rand(n, d, generator=gen) >= frac
    observed[:empty] = False
    observed[empty : empty + full] = True
    return torch.where(observed, x, torch.nan), observed


def completed(params: pg.GMMParams, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """The rows with their missing entries at the mixture's mean: where the bounds are taken."""
    return torch.where(observed, x, pg.mixture_mean(params))


def scipy_joint(params: pg.GMMParams, x: torch.Tensor, observed: torch.Tensor) -> np.ndarray:
    """log w_k + log N(x_o | μ_k,o, Σ_k,oo) [N, K] by SciPy; log w_k for an empty row."""
    w, mu, cov = (t.detach().numpy() for t in (pg.weights(params), params.means, pg.covariances(params)))
    xs, obs = x.numpy(), observed.numpy()
    out = np.tile(np.log(w), (len(xs), 1))
    for n in range(len(xs)):
        o = obs[n]
        if o.any():
            for k in range(len(w)):
                out[n, k] += multivariate_normal(mu[k, o], cov[k][np.ix_(o, o)]).logpdf(xs[n, o])
    return out


@pytest.fixture(params=["patterns", "rows"])
def grouping(request, monkeypatch):
    """Both eager groupings: every pattern grouped, or every row by its count of missing entries."""
    if request.param == "patterns":
        monkeypatch.setattr(_masked, "ROWS_PER_PATTERN", 1)
    else:
        monkeypatch.setattr(_masked, "ROWS_PER_PATTERN", 10**9)
        monkeypatch.setattr(_masked, "FEW_PATTERNS", 0)
    return request.param


# --- the masked density ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_log_density_matches_scipy_on_the_observed_entries(family, grouping):
    p = random_params(family, 3, 4, seed=1)
    x, observed = masked_data(60, 4, 0.35, seed=2)
    ref = scipy_joint(p, x, observed)
    atol = bounds.component_log_prob_atol(p, completed(p, x, observed))
    got = pg.component_log_prob(p, x, observed)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=atol)
    lp = pg.log_prob(p, x, observed)
    np.testing.assert_allclose(lp.numpy(), logsumexp(ref, axis=1) * observed.any(1).numpy(), rtol=0, atol=atol)
    assert torch.equal(lp[:2], torch.zeros(2, dtype=F64))  # nothing observed: log p = 0 exactly
    vm = torch.func.vmap(lambda xs, ob: pg.log_prob(p, xs, ob))(x[None], observed[None])[0]  # branch-free form
    np.testing.assert_allclose(vm.numpy(), lp.numpy(), rtol=0, atol=2 * atol)


def test_unobserved_entries_are_ignored_whatever_they_hold():
    p = random_params("full", 2, 3, seed=3)
    x, observed = masked_data(30, 3, 0.3, seed=4)
    a = pg.log_prob(p, x, observed)
    b = pg.log_prob(p, torch.where(observed, x, 1e300), observed)
    c = pg.log_prob(p, torch.where(observed, x, -torch.inf), observed)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_all_true_equals_no_mask(family):
    p = random_params(family, 3, 3, seed=5)
    x, _ = mixture_data(3, 3, 80, seed=6)
    ones = torch.ones_like(x, dtype=torch.bool)
    assert torch.equal(pg.log_prob(p, x, ones), pg.log_prob(p, x))
    assert torch.equal(pg.component_log_prob(p, x, ones), pg.component_log_prob(p, x))
    torch.testing.assert_close(
        pg.loss(p, x, observed=ones), pg.loss(p, x), rtol=0, atol=bounds.log_lik_atol(p, x, n=80)
    )
    for got, want in zip(pg.sufficient_stats(p, x, observed=ones), pg.sufficient_stats(p, x), strict=True):
        assert torch.equal(got, want)
    a, b = pg.em_step(p, x, observed=ones), pg.em_step(p, x)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("logits", "means", "scale"))
    state = pg.init_state(p, pg.adam(0.05))
    a, b = pg.step(state, x, observed=ones), pg.step(state, x)
    bounds.assert_leaves_close(a.params.means, b.params.means, bounds.adam_rtol(p, x, 1))


def test_masked_loss_gradient_is_the_observed_data_likelihood_gradient():
    """The gradient of the masked loss equals autograd through SciPy-free dense marginals
    (torch.distributions on each row's observed sub-vector)."""
    p = random_params("full", 2, 3, seed=7)
    x, observed = masked_data(25, 3, 0.3, seed=8)

    def reference(params: pg.GMMParams) -> torch.Tensor:
        log_w, mu, cov = torch.log_softmax(params.logits, -1), params.means, pg.covariances(params)
        total = torch.zeros((), dtype=F64)
        for n in range(x.shape[0]):
            o = torch.nonzero(observed[n]).squeeze(1)
            if o.numel():
                sub = cov[:, o][:, :, o]
                comp = torch.distributions.MultivariateNormal(mu[:, o], sub).log_prob(x[n, o])
                total = total + torch.logsumexp(log_w + comp, 0)
        return -total / x.shape[0]

    got = torch.func.grad(lambda q: pg.loss(q, x, observed=observed))(p)
    want = torch.func.grad(reference)(p)
    bounds.assert_leaves_close(got, want, bounds.derivative_rtol(p, completed(p, x, observed)))


# --- incomplete-data EM ---------------------------------------------------------------------------


def numpy_incomplete_em(params: pg.GMMParams, x: np.ndarray, obs: np.ndarray, reg: float) -> tuple:
    """One EM step for incomplete data (Little & Rubin §11.2; Ghahramani & Jordan 1994) from the
    moments: E-step by the covariance-block conditionals, M-step of the family. Returns weights,
    means, covariances [K, D, D] and the mean observed-data log-likelihood."""
    w, mu, cov = (t.numpy() for t in (pg.weights(params), params.means, pg.covariances(params)))
    n, d = x.shape
    k = len(w)
    resp, xhat, ccov = np.zeros((n, k)), np.zeros((n, k, d)), np.zeros((n, k, d, d))
    ll = 0.0
    for i in range(n):
        o, m = obs[i], ~obs[i]
        lj = np.log(w).copy()
        for j in range(k):
            xhat[i, j] = x[i]
            if o.any():
                s_oo = cov[j][np.ix_(o, o)]
                lj[j] += multivariate_normal(mu[j, o], s_oo).logpdf(x[i, o])
                gain = np.linalg.solve(s_oo, cov[j][np.ix_(o, m)]).T  # Σ_mo Σ_oo⁻¹
                xhat[i, j, m] = mu[j, m] + gain @ (x[i, o] - mu[j, o])
                ccov[i, j][np.ix_(m, m)] = cov[j][np.ix_(m, m)] - gain @ cov[j][np.ix_(o, m)]
            else:
                xhat[i, j] = mu[j]
                ccov[i, j] = cov[j]
        if o.any():
            total = logsumexp(lj)
            resp[i] = np.exp(lj - total)
            ll += total
    nk = resp.sum(0)
    new_mu = np.einsum("nk,nkd->kd", resp, xhat) / nk[:, None]
    dev = xhat - new_mu[None]
    s = np.einsum("nk,nki,nkj->kij", resp, dev, dev) + np.einsum("nk,nkij->kij", resp, ccov)
    full = s / nk[:, None, None]
    eye = np.eye(d)
    diag = np.einsum("kii->ki", full)
    new_cov = {
        "full": full + reg * eye,
        "tied": np.broadcast_to(s.sum(0) / nk.sum() + reg * eye, (k, d, d)),
        "diagonal": np.einsum("ki,ij->kij", diag + reg, eye),
        "isotropic": (diag.mean(1) + reg)[:, None, None] * eye,
        "shared": np.broadcast_to(((nk * diag.mean(1)).sum() / nk.sum() + reg) * eye, (k, d, d)),
        "constant": cov,
    }[params.family]
    return nk / nk.sum(), new_mu, new_cov, ll / n


@pytest.mark.parametrize("family", FAMILIES)
def test_one_em_step_matches_numpy_incomplete_data_em(family, grouping):
    p = random_params(family, 3, 4, seed=9, spread=1.5)
    x, observed = masked_data(80, 4, 0.3, seed=10)
    w, mu, cov, ll = numpy_incomplete_em(p, x.numpy(), observed.numpy(), 1e-6)
    rtol = bounds.stats_rtol(p, completed(p, x, observed))
    assert rtol <= 1e-8  # the 1e-8 at least
    for new in (
        pg.em_step(p, x, observed=observed, reg_covar=1e-6, return_info=True),
        torch.func.vmap(lambda xs, ob: pg.em_step(p, xs, observed=ob, reg_covar=1e-6, return_info=True))(
            x[None], observed[None]
        ),
    ):
        q, info = new
        q = q if not q.batch_shape else pytree_index(q)
        np.testing.assert_allclose(pg.weights(q).reshape(-1).numpy(), w, rtol=rtol, atol=0)
        np.testing.assert_allclose(q.means.reshape(mu.shape).numpy(), mu, rtol=0, atol=rtol * np.abs(mu).max())
        cq = pg.covariances(q).reshape(cov.shape).numpy()
        np.testing.assert_allclose(cq, cov, rtol=0, atol=rtol * np.abs(cov).max())
        np.testing.assert_allclose(
            float(info.log_likelihood.reshape(())), ll, rtol=0, atol=bounds.log_lik_atol(p, x.nan_to_num(), n=80)
        )


def pytree_index(p: pg.GMMParams) -> pg.GMMParams:
    return pg.GMMParams(p.logits[0], p.means[0], p.scale[0], p.family)


@st.composite
def incomplete_problem(draw: st.DrawFn) -> tuple:
    family = draw(st.sampled_from(FAMILIES))
    k, d = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    n = draw(st.integers(30, 70))
    seed = draw(st.integers(0, 2**16))
    frac = draw(st.floats(0.05, 0.5))
    x, observed = masked_data(n, d, frac, seed, empty=draw(st.integers(0, 2)), full=0)
    return pg.init(torch.where(observed, x, 0.0), k, family, key=seed), x, observed


@settings(max_examples=15, deadline=None)
@given(incomplete_problem())
def test_observed_data_log_likelihood_never_decreases(problem):
    """Exact incomplete-data EM (reg_covar=0) never loses observed-data likelihood (steps that
    repair a collapsed component are no EM steps and are left out); each score by pg.score with
    missing='marginalize' within its rounding bound."""
    p, x, observed = problem
    n = x.shape[0]

    def score(q: pg.GMMParams) -> tuple[float, float]:
        return float(pg.log_prob(q, x, observed).mean()), bounds.log_lik_atol(q, completed(q, x, observed), n=n)

    lls, tols, em_only = [score(p)[0]], [score(p)[1]], []
    for _ in range(30):
        p, info = pg.em_step(p, x, observed=observed, reg_covar=0.0, return_info=True)
        ll, tol = score(p)
        lls.append(ll)
        tols.append(tol)
        em_only.append(int(info.n_resets) == 0)
    diffs = np.diff(lls)[em_only]
    allowed = (np.array(tols[:-1]) + np.array(tols[1:]))[em_only]
    assert (diffs >= -allowed).all(), (p.family, diffs.min(), allowed.max())


def test_fit_with_20_percent_mcar_recovers_the_means():
    """5,000 points from a known 3-component mixture, 20 % of entries missing completely at
    random: the fitted means are within 0.1 of the truth (their standard error is ~0.03)."""
    gen = torch.Generator().manual_seed(11)
    truth = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 3.0], [0.0, 6.0, -3.0]], dtype=F64)
    labels = torch.arange(5000) % 3
    x = truth[labels] + torch.randn(5000, 3, generator=gen, dtype=F64)
    holes = torch.where(torch.rand(5000, 3, generator=gen) < 0.2, torch.nan, x)
    fitted = pg.fit(holes, 3, "full", missing="marginalize", key=0).params.means
    order = torch.cdist(truth, fitted).argmin(1)
    assert (fitted[order] - truth).abs().max() < 0.1


def test_no_missing_entries_equals_the_ordinary_fit():
    x, _ = mixture_data(3, 2, 300, seed=12)
    for method in ("em", "gd"):
        a = pg.fit(x, 3, "full", method=method, max_steps=40, key=1)
        b = pg.fit(x, 3, "full", method=method, max_steps=40, key=1, missing="marginalize")
        assert torch.equal(a.params.means, b.params.means) and torch.equal(a.loss, b.loss)


# --- the entry points -----------------------------------------------------------------------------


def test_missing_raise_names_the_first_nan_entry_and_other_values_are_refused():
    x, _ = mixture_data(2, 3, 50, seed=13)
    x[7, 2] = torch.nan
    x[9, 0] = torch.nan
    with pytest.raises(ValueError, match=r"data holds NaN at index \(7, 2\)"):
        pg.fit(x, 2)
    with pytest.raises(ValueError, match=r"missing must be one of \('raise', 'marginalize'\); got 'drop'"):
        pg.fit(x, 2, missing="drop")


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture
def holes_csv(tmp_path):
    x, _ = mixture_data(2, 3, 200, separation=5.0, seed=14)
    gen = torch.Generator().manual_seed(15)
    holes = torch.where(torch.rand(200, 3, generator=gen) < 0.2, torch.nan, x).numpy()
    path = tmp_path / "holes.csv"
    np.savetxt(path, holes, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
    return path, holes


def test_cli_fit_missing_marginalize_and_impute(tmp_path, holes_csv, capsys):
    from puregmm import cli

    path, holes = holes_csv
    assert cli.main(["fit", str(path), "-k", "2", "--out", str(tmp_path / "raise"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "data holds NaN at index" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "run"
    assert cli.main(["fit", str(path), "-k", "2", "--missing", "marginalize", "--out", str(out), "-q"]) == 0
    params = pg.load(out / "model.safetensors")
    report = __import__("json").loads((out / "report.json").read_text())
    x = torch.as_tensor(holes)
    assert report["N"] == 200
    np.testing.assert_allclose(report["bic"], float(pg.bic(params, x, missing="marginalize")), rtol=1e-12)

    filled = tmp_path / "filled.csv"
    assert cli.main(["impute", str(out / "model.safetensors"), str(path), "--out", str(filled)]) == 0
    assert filled.read_text().splitlines()[0] == "a,b,c"  # the header is kept
    got = np.loadtxt(filled, delimiter=",", skiprows=1)
    want = pg.impute(params, x).numpy()
    observed = ~np.isnan(holes)
    assert np.array_equal(got[observed], holes[observed])  # observed entries written back exactly
    np.testing.assert_allclose(got, want, rtol=0, atol=0)  # repr: shortest round-trip decimals

    npy = tmp_path / "holes.npy"
    np.save(npy, holes.astype(np.float32))
    assert cli.main(["impute", str(out / "model.safetensors"), str(npy), "--out", str(tmp_path / "f.npy")]) == 0
    arr = np.load(tmp_path / "f.npy")
    assert arr.dtype == np.float32 and not np.isnan(arr).any()


def test_cli_impute_copies_a_complete_file_and_refuses_inf(tmp_path, holes_csv, capsys):
    from puregmm import cli

    path, holes = holes_csv
    model = tmp_path / "m.safetensors"
    pg.save(random_params("diagonal", 2, 3, seed=16), model)
    clean = tmp_path / "clean.csv"
    clean.write_text("a,b,c\n1.5,2,3e-1\n4,5.25,6\n")
    assert cli.main(["impute", str(model), str(clean), "--out", str(tmp_path / "same.csv")]) == 0
    assert (tmp_path / "same.csv").read_bytes() == clean.read_bytes()
    bad = np.nan_to_num(holes[:5], nan=0.0)
    bad[2, 1] = -np.inf
    np.save(tmp_path / "inf.npy", bad)
    capsys.readouterr()
    assert cli.main(["impute", str(model), str(tmp_path / "inf.npy"), "--out", str(tmp_path / "o.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-inf at (row, column) (2, 1)" in err[0]
    assert not (tmp_path / "o.npy").exists()
    assert cli.main(["impute", str(model), str(path), "--out", str(tmp_path / "o.npy")]) == 2  # another format


def test_em_step_with_a_narrow_far_component_whitens_each_row(grouping):
    """A component 1e-3 wide at 1e5 from the others: the exponential-family form would round by
    ~eps·(1e8)² nats, so the eager E-step whitens each row per component (the same rule as the
    complete-data E-step) and still matches the NumPy incomplete-data EM."""
    mu = torch.tensor([[0.0, 0.0, 0.0], [1e5, 1e5, 1e5]], dtype=F64)
    cov = torch.stack([torch.eye(3, dtype=F64), 1e-6 * torch.eye(3, dtype=F64)])
    p = pg.from_moments(torch.tensor([0.5, 0.5], dtype=F64), mu, cov)
    gen = torch.Generator().manual_seed(17)
    x = torch.cat(
        [torch.randn(60, 3, generator=gen, dtype=F64), mu[1] + 1e-3 * torch.randn(60, 3, generator=gen, dtype=F64)]
    )
    observed = torch.rand(120, 3, generator=gen) > 0.3
    x = torch.where(observed, x, torch.nan)
    _, means, covs, _ = numpy_incomplete_em(p, x.numpy(), observed.numpy(), 1e-12)
    q = pg.em_step(p, x, observed=observed, reg_covar=1e-12)
    # per-component whitening rounds x - μ_k at eps·|μ| (1e5), i.e. eps·|μ|/σ_k relative to a
    # width σ_k; the exponential-family form would be off by eps·(|μ|/σ)² ~ 2 nats here
    eps, far = bounds.eps(F64), float(mu.abs().max())
    np.testing.assert_allclose(q.means.numpy(), means, rtol=0, atol=bounds.SLACK * eps * far)
    for k, sigma in enumerate((1.0, 1e-3)):
        rtol = bounds.SLACK * eps * far / sigma
        np.testing.assert_allclose(pg.covariances(q)[k].numpy(), covs[k], rtol=0, atol=rtol * np.abs(covs[k]).max())


def test_masked_kernels_compile_with_fullgraph():
    """Under torch.compile the mask is traced: the branch-free per-row form (width D), equal to eager."""
    p = random_params("full", 2, 3, seed=18)
    x, observed = masked_data(40, 3, 0.3, seed=19, empty=1, full=1)
    x = torch.where(observed, x, 0.0)
    log_prob = torch.compile(lambda q, xs, ob: pg.log_prob(q, xs, ob), fullgraph=True, backend="aot_eager")
    atol = bounds.component_log_prob_atol(p, completed(p, x, observed))
    torch.testing.assert_close(log_prob(p, x, observed), pg.log_prob(p, x, observed), rtol=0, atol=2 * atol)
    step = torch.compile(lambda q, xs, ob: pg.em_step(q, xs, observed=ob), fullgraph=True, backend="aot_eager")
    rtol = bounds.stats_rtol(p, completed(p, x, observed))
    bounds.assert_leaves_close(step(p, x, observed).means, pg.em_step(p, x, observed=observed).means, rtol)
