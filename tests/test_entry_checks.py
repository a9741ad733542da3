"""Issue 14, items 6-16: every entry point names a bad input (argument, what was expected, what
came in) or returns a finite, documented result; data of any range fit as well as data near 1.

One rule for dtypes (README, Design): a tensor is never cast. float16/bfloat16 data or params,
and params and x of different dtypes, raise a ``TypeError`` naming the dtypes; array-likes
(lists, NumPy) are converted to the params' dtype.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

import puregmm as pg
from puregmm import stream
from tests.strategies import random_params

EPS64 = torch.finfo(torch.float64).eps
D = 2


def _blobs(seed: int = 0, n: int = 120) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    return torch.cat([torch.randn(n // 3, D, generator=g, dtype=torch.float64) + c for c in centres])


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def p64() -> pg.GMMParams:
    return random_params("full", 2, D, seed=1)


# --- item 6: data beyond √(max float), and of any range ------------------------------------------

POWERS = [2.0**-1000, 2.0**-520, 2.0**520, 2.0**1000]  # ≈ 1e-301, 3e-157, 3e156, 1e301: beyond √max and √tiny


@pytest.mark.parametrize("family", ["full", "diagonal", "constant"])
@pytest.mark.parametrize("a", POWERS)
def test_gd_fit_is_equivariant_under_powers_of_two(family: str, a: float) -> None:
    # standardising 2^k·x gives bitwise the z of x (every operation scales exactly), and the
    # start's means map exactly; only the log-diagonal of the start's scale, mapped into z units
    # by -log s, rounds: δ ≈ eps·|log a| absolute, a relative change δ of the precision factor.
    # Adam's update m/√v is scale-free, so each of the T steps carries at most that relative
    # change on: T·δ, and the map back rounds once more. (reg_covar is absolute, scikit-learn's:
    # 0, so that nothing but the data sets the scale.)
    x, steps = _blobs(1), 30
    ref = _quiet(pg.fit, x, 3, family, method="gd", max_steps=steps, tol=0.0, key=0, reg_covar=0.0)
    got = _quiet(pg.fit, x * a, 3, family, method="gd", max_steps=steps, tol=0.0, key=0, reg_covar=0.0)
    delta = 4 * EPS64 * (abs(math.log(a)) + 1)
    rtol = (steps + 1) * delta
    scale = float(ref.params.means.abs().max())
    torch.testing.assert_close(got.params.means / a, ref.params.means, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(pg.weights(got.params), pg.weights(ref.params), rtol=rtol, atol=rtol)
    # densities scale by a^-D: the loss shifts by D log a, within the params' change times the
    # loss's sensitivity to relative changes of U (D per row) and the rounding of D log a
    torch.testing.assert_close(got.loss, ref.loss + D * math.log(a), rtol=0, atol=D * (rtol + delta))


@pytest.mark.parametrize("a", [1e-300, 1e-160, 1e160, 1e300])
def test_fit_batched_beyond_sqrt_max(a: float) -> None:
    # a batch of datasets mapped by x -> a·x + b: each equals the batch of x mapped, within the
    # rounding bound of tests/test_fit_contract.py (a few eps relative over the EM steps)
    x0, x1 = _blobs(2), _blobs(12)
    b = torch.tensor([3.0, -1.0], dtype=torch.float64) * a
    ref = _quiet(pg.fit_batched, torch.stack([x0, x1]), 3, "full", reg_covar=0.0)
    got = _quiet(pg.fit_batched, torch.stack([x0, x1]) * a + b, 3, "full", reg_covar=0.0)
    tol = 1e4 * EPS64
    assert torch.isfinite(got.loss).all() and torch.isfinite(got.params.scale).all()
    torch.testing.assert_close(got.params.means / a, (ref.params.means * a + b) / a, rtol=tol, atol=10 * tol)
    torch.testing.assert_close(got.loss, ref.loss + D * math.log(a), rtol=tol, atol=10 * tol)


@pytest.mark.parametrize("a", [1e-300, 1e300])
def test_select_beyond_sqrt_max_ranks_as_near_one(a: float) -> None:
    # BIC = -2 Σ log p + p log N: every log-density shifts by -D log a, so every BIC by 2 N D log a
    x = _blobs(3)
    ref = _quiet(pg.select, x, [1, 2, 3], "diagonal", progress=False, reg_covar=0.0)
    got = _quiet(pg.select, x * a, [1, 2, 3], "diagonal", progress=False, reg_covar=0.0)
    shift = 2 * x.shape[0] * D * math.log(a)
    assert [r.K for r in got.table] == [1, 2, 3] and got.table.best().K == ref.table.best().K == 3
    for g, r in zip(got.table, ref.table, strict=True):
        assert math.isclose(g.bic, r.bic + shift, rel_tol=0, abs_tol=1e4 * EPS64 * abs(shift))


@pytest.mark.parametrize("method", ["em", "online_em"])
@pytest.mark.parametrize("a", [1e-300, 1e-160, 1e160, 1e300])
def test_stream_is_affine_equivariant_beyond_sqrt_max(method: str, a: float) -> None:
    # the stream initialises on its standardised sample and runs on chunks divided by a power of
    # two; the start and the chunks differ from the fit of x by the rounding of the maps (a few
    # eps), carried by the EM steps (well-separated blobs): the bound of test_fit_contract.py
    x = _blobs(4, n=300)
    b = torch.tensor([2.0, 7.0], dtype=torch.float64) * a
    ref = _quiet(stream.fit_stream, x.numpy(), 3, "full", method=method, chunk_size=100, reg_covar=0.0)
    got = _quiet(stream.fit_stream, (x * a + b).numpy(), 3, "full", method=method, chunk_size=100, reg_covar=0.0)
    tol = 1e4 * EPS64
    assert torch.isfinite(got.params.scale).all() and torch.isfinite(got.loss)
    torch.testing.assert_close(got.params.means / a, (ref.params.means * a + b) / a, rtol=tol, atol=10 * tol)
    torch.testing.assert_close(got.loss, ref.loss + D * math.log(a), rtol=tol, atol=10 * tol)


def test_stream_row_beyond_its_initialisation_range_is_named() -> None:
    x = _blobs(5, n=300)
    x[250] = 1e200  # not in the 100-row initialisation sample
    with pytest.raises(ValueError, match=r"source rows 200\.\. holds values up to 1e\+200"):
        stream.fit_stream(x.numpy(), 3, "full", chunk_size=100, key=0)


def test_fit_em_gd_and_init_params_beyond_sqrt_max_stay_finite() -> None:
    x = _blobs(6) * 1e200
    for method in ("em", "gd"):
        r = _quiet(pg.fit, x, 3, "full", method=method, max_steps=40)
        assert all(torch.isfinite(t).all() for t in (r.params.means, r.params.scale, r.loss)), method
        p = _quiet(pg.fit, x, 3, "full", method=method, max_steps=5, init_params=r.params).params
        assert torch.isfinite(p.scale).all(), method


# --- item 8: broken params are refused, never predicted or sampled from ---------------------------


@pytest.mark.parametrize("leaf", ["means", "scale"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_predict_refuses_non_finite_params(p64: pg.GMMParams, leaf: str, value: float) -> None:
    bad = getattr(p64, leaf).clone()
    bad.view(-1)[0] = value
    broken = pg.GMMParams(**{**_leaves(p64), leaf: bad}, family=p64.family)
    x = torch.zeros(3, D, dtype=torch.float64)
    for fn in (pg.predict, pg.predict_proba, pg.score_samples, pg.score, pg.bic, pg.aic):
        with pytest.raises(ValueError, match=rf"params\.{leaf} contains NaN or Inf"):
            fn(broken, x)
    with pytest.raises(ValueError, match=rf"params\.{leaf} contains NaN or Inf"):
        pg.sample(broken, 3, key=0)


@pytest.mark.parametrize(
    "logits, what",
    [
        ([math.nan, 0.0], "NaN or \\+Inf"),
        ([math.inf, 0.0], "NaN or \\+Inf"),
        ([-math.inf, -math.inf], "every component"),
    ],
)
def test_sample_refuses_bad_logits(p64: pg.GMMParams, logits: list[float], what: str) -> None:
    broken = pg.GMMParams(torch.tensor(logits, dtype=torch.float64), p64.means, p64.scale, p64.family)
    with pytest.raises(ValueError, match=rf"params\.logits.*{what}"):
        pg.sample(broken, 5, key=0)
    with pytest.raises(ValueError, match=rf"params\.logits.*{what}"):
        pg.predict(broken, torch.zeros(2, D, dtype=torch.float64))


def _leaves(p: pg.GMMParams) -> dict:
    return {"logits": p.logits, "means": p.means, "scale": p.scale}


# --- item 9: one shape rule for every inference function ------------------------------------------

INFERENCE = [pg.score_samples, pg.score, pg.predict, pg.predict_proba, pg.bic, pg.aic, pg.log_prob, pg.loss]


@pytest.mark.parametrize("fn", INFERENCE, ids=lambda f: f.__name__)
def test_batched_x_needs_batched_params(p64: pg.GMMParams, fn) -> None:
    x = torch.zeros(3, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x has batch dims \(3,\) but the params have batch dims \(\)"):
        fn(p64, x)
    stacked = pg.GMMParams(*(t.expand(3, *t.shape) for t in _leaves(p64).values()), family=p64.family)
    out = fn(stacked, x)  # the same x with matching batch dims is fine: one result per batch entry
    assert out.shape[0] == 3 and not torch.isnan(out.double()).any()


# --- item 10: empty x ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [*INFERENCE, pg.em_step, pg.impute], ids=lambda f: f.__name__)
def test_empty_x_is_named(p64: pg.GMMParams, fn) -> None:
    with pytest.raises(ValueError, match=r"x must hold at least one row \[N >= 1, D\]; got shape \(0, 2\)"):
        fn(p64, torch.zeros(0, D, dtype=torch.float64))


# --- items 7 and 11: half precision is refused, naming the dtype -------------------------------------

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", pg.FAMILIES)
def test_fit_and_init_refuse_half_data(dtype: torch.dtype, family: str) -> None:
    x = _blobs(7).to(dtype)
    msg = rf"has dtype {dtype}; puregmm computes in float32 or float64"
    for method in ("em", "gd"):  # the constant family in float16 gave NaN params (item 7)
        with pytest.raises(TypeError, match=rf"data {msg}"):
            pg.fit(x, 2, family, method=method, max_steps=3)
    with pytest.raises(TypeError, match=rf"data {msg}"):
        pg.init(x, 2, family)
    with pytest.raises(TypeError, match=rf"xs {msg}"):
        pg.fit_batched(x[None], 2, family, max_steps=3)
    with pytest.raises(TypeError, match=rf"x {msg}"):
        pg.select(x, [1, 2], family, progress=False)
    with pytest.raises(TypeError, match=rf"{msg}"):
        stream.fit_stream(x.numpy() if dtype == torch.float16 else x, 2, family)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ["full", "tied"])
def test_from_moments_sample_and_mdn_refuse_half(dtype: torch.dtype, family: str, p64: pg.GMMParams) -> None:
    with pytest.raises(TypeError, match=rf"means has dtype {dtype}"):
        pg.from_moments(torch.ones(2, dtype=dtype) / 2, torch.zeros(2, D, dtype=dtype), torch.eye(D).expand(2, D, D))
    half = p64.to(dtype)
    with pytest.raises(TypeError, match=rf"params has dtype {dtype}"):
        pg.sample(half, 3, key=0)
    with pytest.raises(TypeError, match=rf"params has dtype {dtype}"):
        pg.score_samples(half, torch.zeros(2, D, dtype=dtype))
    with pytest.raises(TypeError, match=rf"raw has dtype {dtype}"):
        pg.from_flat(torch.zeros(4, pg.param_size(2, D, family), dtype=dtype), 2, D, family)
    with pytest.raises(TypeError, match=rf"x has dtype {dtype}"):
        pg.score_samples(p64, torch.zeros(2, D, dtype=dtype))


# --- item 12: params and x of different dtypes ---------------------------------------------------


@pytest.mark.parametrize("fn", [*INFERENCE, pg.em_step, pg.impute], ids=lambda f: f.__name__)
def test_dtype_mismatch_names_both_dtypes(p64: pg.GMMParams, fn) -> None:
    x32 = torch.zeros(3, D, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"x has dtype torch.float32 but the params have torch.float64"):
        fn(p64, x32)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the params have torch.float32"):
        fn(p64.to(torch.float32), x32.double())


def test_array_likes_are_converted_to_the_params_dtype(p64: pg.GMMParams) -> None:
    x = np.zeros((3, D), dtype=np.float32)
    ref = pg.score_samples(p64, torch.zeros(3, D, dtype=torch.float64))
    assert torch.equal(pg.score_samples(p64, x), ref) and torch.equal(pg.score_samples(p64, x.tolist()), ref)


def test_init_params_of_another_dtype_or_shape_are_named(p64: pg.GMMParams) -> None:
    x = _blobs(8)
    with pytest.raises(TypeError, match=r"init_params have dtype torch.float32 but the data torch.float64"):
        pg.fit(x, 2, init_params=p64.to(torch.float32))
    stacked = pg.GMMParams(*(t.expand(2, *t.shape) for t in _leaves(p64.to(torch.float32)).values()), "full")
    with pytest.raises(TypeError, match=r"xs has dtype torch.float64 but the params have torch.float32"):
        pg.fit_batched(torch.stack([x, x]), 2, init_params=stacked)
    wrong = pg.GMMParams(p64.logits, p64.means, p64.scale[:, :1], "full")
    with pytest.raises(ValueError, match=r"init_params\.scale must have shape \(2, 2, 2\).*got \(2, 1, 2\)"):
        pg.fit(x, 2, init_params=wrong)


# --- item 13: params that are not params ---------------------------------------------------------


@pytest.mark.parametrize("fn", [*INFERENCE, pg.sample, pg.n_parameters, pg.covariances, pg.weights, pg.marginal])
def test_not_params_is_named(fn) -> None:
    args = {pg.sample: (3,), pg.n_parameters: (), pg.covariances: (), pg.weights: (), pg.marginal: ([0],)}
    extra = args.get(fn, (torch.zeros(3, D),))
    with pytest.raises(TypeError, match=r"params must be GMMParams.*got NoneType"):
        fn(None, *extra, **({"key": 0} if fn is pg.sample else {}))


@pytest.mark.parametrize("leaf, shape", [("scale", (2, 2)), ("logits", (3,)), ("scale", (2, 2, 3))])
def test_misshapen_params_name_the_leaf(p64: pg.GMMParams, leaf: str, shape: tuple[int, ...]) -> None:
    broken = pg.GMMParams(**{**_leaves(p64), leaf: torch.zeros(shape, dtype=torch.float64)}, family="full")
    pattern = rf"params\.{leaf} must have shape .* for family 'full'.*got {re.escape(str(shape))}"
    for call in (
        lambda: pg.score_samples(broken, torch.zeros(2, D, dtype=torch.float64)),
        lambda: pg.log_prob(broken, torch.zeros(2, D, dtype=torch.float64)),
        lambda: pg.covariances(broken),
        lambda: pg.sample(broken, 2, key=0),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()


@pytest.mark.parametrize("k, d", [(0, 2), (2, 0)])
def test_from_moments_with_no_components_or_dims(k: int, d: int) -> None:
    with pytest.raises(ValueError, match=rf"means must be \[K, D\] with K, D >= 1; got shape \({k}, {d}\)"):
        pg.from_moments(torch.ones(k) / max(k, 1), torch.zeros(k, d), torch.zeros(k, d, d))


# --- item 14: keys outside int64 -----------------------------------------------------------------


@pytest.mark.parametrize("key", [2**64, 2**63, -(2**63) - 1])
def test_keys_outside_int64_are_named(p64: pg.GMMParams, key: int) -> None:
    x = _blobs(9)
    pattern = rf"key must be an int in \[-2\*\*63, 2\*\*63\).*got {key}"
    for call in (
        lambda: pg.fit(x, 2, key=key),
        lambda: pg.init(x, 2, key=key),
        lambda: pg.sample(p64, 2, key=key),
        lambda: pg.fit_batched(x[None], 2, key=key),
        lambda: pg.bootstrap(x, 2, 2, key=key),
        lambda: stream.fit_stream(x.numpy(), 2, key=key),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()
    with pytest.raises(TypeError, match="keys must"):
        pg.fit_batched(x[None], 2, keys=[key])
    assert pg.sample(p64, 2, key=2**63 - 1)[0].shape == (2, D)  # the largest int64 is a key


# --- item 15: checkpoint_every -------------------------------------------------------------------


@pytest.mark.parametrize("every, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError), ("10", TypeError)])
def test_checkpoint_every_must_be_a_positive_int(tmp_path, every, error) -> None:
    x = _blobs(10)
    ck = tmp_path / "c.safetensors"
    pattern = rf"checkpoint_every must be a positive int.*; got .*{re.escape(repr(every))}"
    for call in (
        lambda: pg.fit(x, 2, max_steps=3, checkpoint=ck, checkpoint_every=every),
        lambda: pg.fit(x, 2, max_steps=3, checkpoint_every=every),
        lambda: pg.fit_batched(x[None], 2, max_steps=3, checkpoint=ck, checkpoint_every=every),
        lambda: stream.fit_stream(x.numpy(), 2, max_steps=3, checkpoint=ck, checkpoint_every=every),
    ):
        with pytest.raises(error, match=pattern):
            call()
    assert not ck.exists()


# --- item 16: arguments of the wrong kind -----------------------------------------------------------


def test_wrong_kinds_of_arguments_are_named() -> None:
    x = _blobs(11)
    cases = [
        (lambda: pg.fit_batched(x[None], 2, keys="abc"), TypeError, r"keys must be an int64 tensor of shape \(1,\)"),
        (lambda: pg.fit_batched(x[None], 2, mask="abc"), TypeError, r"mask must be a bool tensor of shape \(1, 120\)"),
        (lambda: pg.fit_batched(x[None], 2, keys=[0.5]), TypeError, r"keys must hold integers"),
        (lambda: pg.select(x, [1], families=3, progress=False), TypeError, r"families must be a family name.*int"),
        (lambda: pg.fit(lambda: 5, 2, method="em"), TypeError, r"source\(\) must return an iterable.*got int"),
        (lambda: stream.fit_stream(x.numpy(), 2, dtype=torch.int64), TypeError, r"dtype must be torch.float32"),
        (lambda: stream.fit_stream(x.numpy(), 2, dtype="abc"), TypeError, r"dtype must be a torch.dtype.*'abc'"),
        (lambda: stream.fit_stream(x.numpy(), 2, device="bogus"), ValueError, r"device must name a device.*'bogus'"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_zero_weight_on_a_row_at_infinity_drops_it(p64: pg.GMMParams) -> None:
    # score_samples of a row at infinity is -inf (density 0); with weight 0 it is not counted
    x = torch.tensor([[0.0, 0.0], [math.inf, 0.0]], dtype=torch.float64)
    got = pg.score(p64, x, sample_weight=torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.equal(got, pg.score(p64, x[:1]))
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(first bad rows: \[1\]\)"):
        pg.predict(p64, x)  # no component is most probable at infinity


@pytest.mark.parametrize("a", [1e-300, 1e200])
def test_cli_fit_beyond_sqrt_max(tmp_path, a: float) -> None:
    # the CLI memory-maps a .npy (a streamed fit): its loss is the fit of x shifted by D log a,
    # within the EM rounding bound of tests/test_fit_contract.py
    import json
    import subprocess
    import sys

    x = _blobs(13)
    np.save(tmp_path / "x.npy", (x * a).numpy())
    cmd = [sys.executable, "-m", "puregmm", "fit", str(tmp_path / "x.npy"), "-k", "3", "--reg-covar", "0"]
    run = subprocess.run([*cmd, "--out", str(tmp_path / "run"), "--no-plot", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    ref = _quiet(stream.fit_stream, x.numpy(), 3, "full", reg_covar=0.0)
    assert math.isclose(report["loss"], float(ref.loss) + D * math.log(a), rel_tol=1e4 * EPS64, abs_tol=1e5 * EPS64)
    params = pg.load(tmp_path / "run" / "model.safetensors")
    torch.testing.assert_close(params.means / a, ref.params.means, rtol=1e4 * EPS64, atol=1e5 * EPS64)
