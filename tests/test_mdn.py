"""Mixture density networks: ``param_size``/``from_flat`` and an MDN on Bishop's inverse sine.

Properties checked: the layout and size of ``raw``; valid mixtures (weights on the simplex,
positive-definite covariances with every eigenvalue above the floor) for any real ``raw``,
extreme values included; finite gradients; the documented batching patterns of ``log_prob``;
and that a mixture output beats a single Gaussian on a multi-valued regression problem.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import puregmm as pg
from puregmm.families import get_family
from puregmm.train import bad_components

from_flat, param_size = pg.from_flat, pg.param_size  # the public API under test

LEARNED = tuple(f for f in pg.FAMILIES if f != "constant")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids waking a pool for every op on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kw(family: str) -> dict:
    return {"variance": 0.5} if family == "constant" else {}


def _raw(shape: tuple[int, ...], scale: float, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=dtype)


# --- layout ----------------------------------------------------------------------------------


def test_param_size_table():
    # K + K·D + scale, K=3, D=2
    expected = {"full": 3 + 6 + 9, "tied": 3 + 6 + 3, "diagonal": 3 + 6 + 6, "isotropic": 3 + 6 + 3}
    expected |= {"shared": 3 + 6 + 1, "constant": 3 + 6}
    assert {f: param_size(3, 2, f) for f in pg.FAMILIES} == expected
    for family in pg.FAMILIES:
        for k, d in ((1, 1), (4, 3), (2, 5)):
            assert param_size(k, d, family) == k + k * d + get_family(family).n_scale_parameters(k, d)


def test_layout_logits_and_means_are_raw():
    """``raw = [logits | means | scale]``: weights are the softmax of the first K entries."""
    raw = _raw((5, param_size(3, 2, "full")), 1.0, 0)
    p = from_flat(raw, 3, 2, "full")
    torch.testing.assert_close(pg.weights(p), torch.softmax(raw[:, :3], -1))
    torch.testing.assert_close(pg.means(p), raw[:, 3:9].reshape(5, 3, 2))


def test_full_covariance_formula():
    """Σ = (U Uᵀ)⁻¹, U = M / √(1 + floor ‖M‖²_F), M = [[e^{-a₀/2}, a₂], [0, e^{-a₁/2}]]."""
    floor = 0.05
    a = torch.tensor([0.3, -0.7, 0.4], dtype=torch.float64)
    raw = torch.cat([torch.zeros(1 + 2, dtype=torch.float64), a])
    m = torch.tensor([[math.exp(-0.15), 0.4], [0.0, math.exp(0.35)]], dtype=torch.float64)
    u = m / math.sqrt(1 + floor * float(m.square().sum()))
    expected = torch.linalg.inv(u @ u.T)
    got = pg.covariances(from_flat(raw, 1, 2, "full", min_variance=floor))[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_one_dimension_all_families_agree():
    """In D = 1 every learned family gives σ² = floor + exp(a)."""
    floor = 1e-3
    a = torch.linspace(-12, 6, 7, dtype=torch.float64)
    want = floor + torch.exp(a)
    for family in ("full", "diagonal", "isotropic"):
        raw = torch.cat([torch.zeros(7, 2, dtype=torch.float64), a[:, None]], -1)  # K=1: logit, mean, a
        var = pg.covariances(from_flat(raw, 1, 1, family, min_variance=floor))[:, 0, 0, 0]
        torch.testing.assert_close(var, want, rtol=1e-12, atol=0)
    raw = torch.cat([torch.zeros(7, 4, dtype=torch.float64), a[:, None]], -1)  # shared, K=2
    var = pg.covariances(from_flat(raw, 2, 1, "shared", min_variance=floor))[..., 0, 0]
    torch.testing.assert_close(var, want[:, None].expand(7, 2), rtol=1e-12, atol=0)


def test_constant_family_uses_given_variance():
    raw = _raw((4, param_size(2, 3, "constant")), 1.0, 1)
    p = from_flat(raw, 2, 3, "constant", variance=0.25)
    torch.testing.assert_close(pg.covariances(p), 0.25 * torch.eye(3, dtype=torch.float64).expand(4, 2, 3, 3))


# --- validity for any raw ----------------------------------------------------------------------


@given(
    family=st.sampled_from(pg.FAMILIES),
    k=st.integers(1, 4),
    d=st.integers(1, 4),
    scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
    floor=st.sampled_from([1e-6, 1e-3, 0.1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_raw_gives_a_valid_mixture(family, k, d, scale, floor, seed):
    raw = _raw((6, param_size(k, d, family)), scale, seed)
    p = from_flat(raw, k, d, family, min_variance=floor, **_kw(family))
    assert p.batch_shape == (6,) and (p.n_components, p.dim, p.family) == (k, d, family)
    w = pg.weights(p)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(6, dtype=w.dtype))
    assert torch.isfinite(pg.covariances(p)).all()
    # smallest variance >= floor  <=>  largest precision eigenvalue <= 1/floor; checked on the
    # precision, whose largest eigenvalue float64 resolves even when the covariance's condition
    # number (up to 1e30 for raw of scale 30) hides its smallest one in rounding
    eig = torch.linalg.eigvalsh(pg.precisions(p))  # [6, K, D]
    assert (eig.amax(-1) <= (1 + 1e-9) / floor).all(), f"smallest variance {1 / eig.max():.3e} below {floor}"


@pytest.mark.parametrize("family", LEARNED)
def test_floor_matches_the_reset_check_of_step(family):
    """``pg.step``'s collapse check never flags an MDN output: the two use the same bound."""
    floor = 1e-4
    raw = _raw((50, param_size(3, 3, family)), 4.0, 2)
    p = from_flat(raw, 3, 3, family, min_variance=floor)
    flags = torch.func.vmap(lambda q: bad_components(q, floor)[0])(p)
    assert not flags.any()


@pytest.mark.parametrize("family", pg.FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_raw_gives_finite_density_and_gradients(family, dtype):
    """Outputs of ±1e3 (a diverging network) still give finite log-densities and gradients."""
    k, d = 3, 2
    raw = _raw((8, param_size(k, d, family)), 1.0, 3, dtype)
    raw = torch.where(torch.arange(raw.shape[-1]) % 2 == 0, 1e3 * raw.sign(), raw).requires_grad_(True)
    y = _raw((8, 1, d), 1.0, 4, dtype)
    lp = pg.log_prob(from_flat(raw, k, d, family, min_variance=1e-3, **_kw(family)), y)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(raw.grad).all()


def test_at_the_floor_the_variance_is_the_floor():
    raw = torch.tensor([0.0, 0.0, -200.0], dtype=torch.float64)  # K=1, D=1: logit, mean, a
    var = pg.covariances(from_flat(raw, 1, 1, "diagonal", min_variance=1e-4))
    torch.testing.assert_close(var, torch.full((1, 1, 1), 1e-4, dtype=torch.float64), rtol=1e-12, atol=0)


# --- batching patterns -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["full", "diagonal", "shared"])
def test_one_target_per_input_pattern(family):
    """params batch [B] with y [B, 1, D] gives [B, 1]; equal to a loop and to ``vmap``."""
    k, d, b = 3, 2, 7
    raw = _raw((b, param_size(k, d, family)), 1.0, 5)
    y = _raw((b, d), 1.0, 6)
    params = from_flat(raw, k, d, family)
    lp = pg.log_prob(params, y[:, None, :])
    assert lp.shape == (b, 1)
    loop = torch.stack([pg.log_prob(from_flat(raw[i], k, d, family), y[i : i + 1]) for i in range(b)])
    torch.testing.assert_close(lp, loop, rtol=1e-12, atol=1e-12)

    def one(r: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return pg.log_prob(from_flat(r, k, d, family), yi[None])[0]

    torch.testing.assert_close(torch.func.vmap(one)(raw, y), lp[:, 0], rtol=1e-12, atol=1e-12)


def test_nested_batch_dims_and_shared_targets():
    """params batch [A, B] with y [A, B, N, D] → [A, B, N]; with shared y [N, D] too."""
    raw = _raw((2, 3, param_size(2, 2, "tied")), 1.0, 7)
    params = from_flat(raw, 2, 2, "tied")
    y = _raw((2, 3, 4, 2), 1.0, 8)
    assert pg.log_prob(params, y).shape == (2, 3, 4)
    shared = pg.log_prob(params, y[0, 0])
    torch.testing.assert_close(shared[1, 2], pg.log_prob(from_flat(raw[1, 2], 2, 2, "tied"), y[0, 0]))


def test_grad_through_functional_call_equals_backward():
    """``torch.func.grad`` over a ``functional_call`` network equals ``.backward()``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, param_size(3, 2, "full")))
    net = net.double()
    x, y = _raw((10, 2), 1.0, 9), _raw((10, 2), 1.0, 10)

    def loss(weights: dict) -> torch.Tensor:
        raw = torch.func.functional_call(net, weights, (x,))
        return -pg.log_prob(from_flat(raw, 3, 2, "full"), y[:, None, :]).mean()

    weights = {n: p.detach() for n, p in net.named_parameters()}
    grads = torch.func.grad(loss)(weights)
    loss(dict(net.named_parameters())).backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)


# --- errors ------------------------------------------------------------------------------------


def test_errors():
    raw = torch.zeros(4, param_size(3, 2, "full"))
    with pytest.raises(
        ValueError, match=r"raw must have last dimension P = param_size\(3, 2, 'full'\) = 18; got shape \(4, 17\)"
    ):
        from_flat(raw[:, :17], 3, 2, "full")
    with pytest.raises(TypeError, match=r"raw must be a floating torch.Tensor \[..., P\]; got torch.int64"):
        from_flat(raw.long(), 3, 2, "full")
    with pytest.raises(TypeError, match=r"raw must be a floating torch.Tensor \[..., P\]; got list"):
        from_flat([0.0] * 18, 3, 2, "full")
    with pytest.raises(ValueError, match=r"min_variance must be a positive float; got 0"):
        from_flat(raw, 3, 2, "full", min_variance=0)
    with pytest.raises(ValueError, match=r"variance is only for family 'constant'"):
        from_flat(raw, 3, 2, "full", variance=1.0)
    with pytest.raises(ValueError, match=r"family 'constant' needs variance="):
        from_flat(torch.zeros(4, 9), 3, 2, "constant")
    with pytest.raises(ValueError, match=r"variance must be positive; got -1.0"):
        from_flat(torch.zeros(4, 9), 3, 2, "constant", variance=-1.0)
    with pytest.raises(ValueError, match=r"unknown family 'spherical'"):
        from_flat(raw, 3, 2, "spherical")
    with pytest.raises(ValueError, match=r"n_components must be >= 1; got 0"):
        param_size(0, 2, "full")
    with pytest.raises(TypeError, match=r"dim must be an int; got float"):
        param_size(3, 2.0, "full")


# --- Bishop's inverse problem --------------------------------------------------------------------

HIDDEN = 64
STEPS = 1000
BATCH = 512
FLOOR = 1e-4


def _inverse_sine(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bishop (1994), PRML §5.6: y ~ U(0, 1), x = y + 0.3 sin(2πy) + U(-0.1, 0.1); predict y from x.

    p(y | x) has one to three branches: a single Gaussian must straddle them."""
    y = torch.rand(n, 1, generator=gen)
    x = y + 0.3 * torch.sin(2 * math.pi * y) + 0.2 * torch.rand(n, 1, generator=gen) - 0.1
    return x, y


def _train_mdn(k: int, family: str = "full") -> float:
    """Train an MLP (1 → 64 → 64 → P, ReLU) for STEPS (1000) Adam steps on fresh batches; return the
    test NLL (nats per point) on 20 000 held-out points. Checks finiteness and the floor each step."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(1, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, param_size(k, 1, family)),
        )
    with torch.no_grad():  # a standard MDN start: components spread over the range of y, σ² ≈ 0.05
        out = net[-1]
        out.weight.mul_(0.1)
        out.bias.zero_()
        out.bias[k : 2 * k] = torch.linspace(0.1, 0.9, k) if k > 1 else 0.5
        out.bias[2 * k :] = math.log(0.05)

    def nll(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, pg.GMMParams]:
        params = from_flat(net(4.0 * (x - 0.5)), k, 1, family, min_variance=FLOOR)  # batch [B]
        return -pg.log_prob(params, y[:, None, :]).mean(), params  # y [B, 1, 1] -> [B, 1]

    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS, eta_min=5e-5)
    gen = torch.Generator().manual_seed(1)
    max_log_precision = -0.5 * math.log(FLOOR)  # σ² ≥ floor  ⟺  log U ≤ -½ log floor (D = 1)
    for i in range(STEPS):
        x, y = _inverse_sine(BATCH, gen)
        opt.zero_grad()
        loss, params = nll(x, y)
        loss.backward()
        assert torch.isfinite(loss), f"non-finite loss at step {i}"
        assert all(torch.isfinite(p.grad).all() for p in net.parameters()), f"non-finite gradient at step {i}"
        assert params.scale.max() <= max_log_precision + 1e-6, f"variance below the floor at step {i}"
        opt.step()
        schedule.step()
    with torch.no_grad():
        x, y = _inverse_sine(20_000, torch.Generator().manual_seed(2))
        return float(nll(x, y)[0])


def test_mdn_beats_single_gaussian_on_inverse_sine():
    """K = 5 reaches a test NLL at least 0.5 nats below K = 1 with the same hidden size and steps.

    For reference (numerical integration / per-x EM on this distribution): the best
    conditional Gaussian reaches -0.654, the best 5-component conditional mixture -1.21.
    """
    single = _train_mdn(1)
    mixture = _train_mdn(5)
    assert single < -0.55, f"the K=1 baseline is undertrained ({single:.3f}); the comparison would be unfair"
    assert mixture <= single - 0.5, f"K=5 test NLL {mixture:.3f} vs K=1 {single:.3f}: gap {single - mixture:.3f} < 0.5"
