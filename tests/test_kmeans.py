"""k-means (:mod:`puregmm.kmeans`): k-means++ seeds and their input checks, the squared
distances in each evaluation mode, and Lloyd against scikit-learn's ``KMeans``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from puregmm import kmeans
from puregmm.kmeans import _lloyd_step, _sq_dist, kmeans_plusplus, lloyd
from tests.bounds import SLACK, gamma
from tests.oracles import mixture_data, to_np

# --- kmeans_plusplus: checks at the public entry (issue 14) ----------------------------------------

X = torch.randn(24, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

BAD_ARGS = [
    ("x", torch.zeros(5, dtype=torch.float64), ValueError, "2-D"),
    ("x", torch.zeros(0, 2, dtype=torch.float64), ValueError, "non-empty"),
    ("x", torch.full((5, 2), math.nan, dtype=torch.float64), ValueError, "NaN"),
    ("x", torch.full((5, 2), math.inf, dtype=torch.float64), ValueError, "NaN or Inf"),
    ("x", X.half(), TypeError, "float16"),
    ("x", X.to(torch.complex128), TypeError, "real numbers"),
    ("x", "abc", TypeError, "array-like"),
    ("x", None, TypeError, "array-like"),
    ("n_components", 0, ValueError, ">= 1"),
    ("n_components", 25, ValueError, "N=24"),
    ("n_components", 2.5, TypeError, "int"),
    ("n_components", True, TypeError, "int"),
    ("n_components", None, TypeError, "int"),
    ("key", "abc", TypeError, "int"),
    ("key", 2**64, ValueError, "int64"),
    ("sample_weight", torch.ones(3, dtype=torch.float64), ValueError, "shape"),
    ("sample_weight", -torch.ones(24, dtype=torch.float64), ValueError, "non-negative"),
    ("sample_weight", torch.zeros(24, dtype=torch.float64), ValueError, "all zero"),
    ("sample_weight", torch.full((24,), math.nan, dtype=torch.float64), ValueError, "NaN"),
    ("sample_weight", "abc", TypeError, "array-like"),
    ("n_local_trials", 0, ValueError, "positive"),
    ("n_local_trials", 2.5, TypeError, "positive int"),
    ("n_local_trials", True, TypeError, "positive int"),
]


@pytest.mark.parametrize(
    ("arg", "bad", "error", "words"), BAD_ARGS, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(BAD_ARGS)]
)
def test_kmeans_plusplus_names_a_bad_argument(arg: str, bad: Any, error: type[Exception], words: str) -> None:
    kwargs: dict[str, Any] = {"x": X, "n_components": 3, "key": 0, arg: bad}
    with pytest.raises(error) as info:
        kmeans_plusplus(**kwargs)
    message = str(info.value)
    assert arg in message and words in message, message


def test_kmeans_plusplus_takes_array_likes_and_returns_rows() -> None:
    got = kmeans_plusplus(X.numpy(), np.int64(3), key=np.int64(2), sample_weight=np.ones(24), n_local_trials=1)
    assert torch.equal(got, kmeans_plusplus(X, 3, key=2, n_local_trials=1))
    assert bool((torch.cdist(got, X).amin(-1) == 0).all())  # rows of x
    assert kmeans_plusplus(X.long(), 3).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("power", [600, -600])
def test_kmeans_plusplus_is_scale_free_beyond_the_squares_range(power: int) -> None:
    """Data scaled by 2^±600 (squares beyond float64's range: they would overflow to inf or
    underflow to 0) give the scaled seeds of the unscaled data, exactly: the draws are scale-free
    and a power of two scales every operation exactly."""
    x, _ = mixture_data(4, 3, 200, seed=3)
    sq = (x * 2.0**power).square()
    assert bool(torch.isinf(sq).any()) if power > 0 else bool((sq == 0).all())  # beyond the range
    for key in range(3):
        want = kmeans_plusplus(x, 4, key=key) * 2.0**power
        assert torch.equal(kmeans_plusplus(x * 2.0**power, 4, key=key), want)


def test_kmeans_plusplus_vmaps_over_keys() -> None:
    """Under ``vmap`` only types and shapes are checked: the batched seeds are each key's."""
    keys = torch.arange(3)
    batched = torch.func.vmap(lambda k: kmeans_plusplus(X, 3, key=k))(keys)
    for b in range(3):
        assert torch.equal(batched[b], kmeans_plusplus(X, 3, key=b))


# --- squared distances: one function, its evaluation chosen by the block's size --------------------


@pytest.mark.parametrize(
    ("k", "n", "d", "mode"),
    [(2, 178, 13, "broadcast"), (32, 10**6, 2, "coordinates"), (32, 10**6, 32, "gemm"), (20, 1797, 64, "gemm")],
)
def test_the_mode_follows_the_block_size(k: int, n: int, d: int, mode: str) -> None:
    assert kmeans._mode(k, torch.zeros(()).expand(d, n)) == mode


@pytest.mark.parametrize("d", [2, 13, 40])
def test_every_mode_gives_the_same_distances_and_exact_zeros(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each mode against the float64 difference summed in exact order: the direct modes within
    D roundings of each square sum (γ_D·d²), the GEMM within γ_{D+2}·(‖x‖² + ‖c‖²); the direct
    modes give exactly 0 at the centres' own rows."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(300, d, generator=g, dtype=torch.float64)
    centres = torch.cat([x[:3], torch.randn(2, d, generator=g, dtype=torch.float64)])
    xt = x.mT.contiguous()
    exact = ((x.unsqueeze(0) - centres.unsqueeze(1)).square()).sum(-1)  # [K, N] reference
    norms = x.square().sum(-1) + centres.square().sum(-1, keepdim=True)  # [K, N]
    modes = {
        "broadcast": (10**9, 16),
        "coordinates": (0, 10**9),
        "gemm": (0, 0),
    }
    for mode, (block, dim) in modes.items():
        monkeypatch.setattr(kmeans, "SMALL_BLOCK", block)
        monkeypatch.setattr(kmeans, "SMALL_DIM", dim)
        assert kmeans._mode(5, xt) == mode
        got = _sq_dist(xt, centres)
        if mode == "gemm":
            assert bool(((got - exact).abs() <= SLACK * gamma(d + 2) * norms).all()), mode
        else:
            assert bool(((got - exact).abs() <= SLACK * gamma(d) * exact).all()), mode
            assert bool((got[torch.arange(3), torch.arange(3)] == 0).all()), mode


# --- Lloyd: scikit-learn's KMeans (empty clusters relocated, tol stop) ------------------------------


def _sklearn_kmeans(x: torch.Tensor, seeds: torch.Tensor, tol: float = 1e-4) -> Any:
    """The independent reference: scikit-learn's ``KMeans`` (Lloyd) from the same seeds."""
    from sklearn.cluster import KMeans

    return KMeans(seeds.shape[0], init=to_np(seeds), n_init=1, tol=tol, max_iter=300).fit(to_np(x))


def _centre_atol(x: torch.Tensor) -> float:
    """Two roundings of a cluster mean of at most N rows: 2·γ_N·max|x - x̄| (Higham 3.4), slack."""
    return SLACK * 2 * gamma(x.shape[0]) * float((x - x.mean(0)).abs().max())


def _blobs(n_per: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four tight, well-separated blobs (sd 0.5, 10 apart) and their centres."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return centres.repeat_interleave(n_per, 0) + 0.5 * torch.randn(
        4 * n_per, 2, generator=g, dtype=torch.float64
    ), centres


def _far_seeds() -> torch.Tensor:
    """Two seeds inside blobs 0 and 1 and two far from every point: both far clusters start empty."""
    return torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0], [-100.0, 50.0]], dtype=torch.float64)


def _lloyd_keeping_empty(x: np.ndarray, c: np.ndarray, iters: int = 300) -> np.ndarray:
    """Plain Lloyd in numpy that keeps an empty cluster's centre (puregmm's former rule)."""
    for _ in range(iters):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
    return c


def _objective(x: torch.Tensor, centres: torch.Tensor) -> float:
    return float(torch.cdist(x, centres).amin(-1).square().sum())


@pytest.mark.parametrize("case", ["tol_stop", "empty_clusters", "digits"])
def test_lloyd_is_sklearns_kmeans_from_the_same_seeds(case: str) -> None:
    """Same seeds, same centres as scikit-learn's KMeans: the stopping rule (tol·mean variance,
    labels repeating, 300 iterations) and the relocation of empty clusters included."""
    if case == "tol_stop":  # overlapping clusters: KMeans stops on the centre shift, 4 iterations early
        x, _ = mixture_data(4, 2, 400, separation=1.0, seed=1)
        seeds = kmeans_plusplus(x, 4, key=1)
    elif case == "empty_clusters":
        x, _ = _blobs()
        seeds = _far_seeds()
    else:
        from sklearn.datasets import load_digits

        raw = torch.as_tensor(load_digits().data[:600], dtype=torch.float64)
        x = (raw - raw.mean(0)) / raw.std(0).clamp_min(1e-12)
        seeds = kmeans_plusplus(x, 10, key=2)
    ours = lloyd(x, seeds)
    np.testing.assert_allclose(to_np(ours), _sklearn_kmeans(x, seeds).cluster_centers_, rtol=0, atol=_centre_atol(x))
    if case == "tol_stop":  # the rule matters here: running on until the labels settle lands elsewhere
        strict = _sklearn_kmeans(x, seeds, tol=0.0).cluster_centers_
        assert np.abs(to_np(ours) - strict).max() > 1e3 * _centre_atol(x)


def test_empty_cluster_is_relocated_and_finds_every_blob() -> None:
    """Three seeds in three blobs and one far from all points: its cluster is empty on the first
    pass. Relocated to the point farthest from its centre (in the fourth blob), all four blobs
    are found; keeping its centre (the former rule) leaves two blobs to one centre, with a
    k-means objective over ten times larger."""
    x, centres = _blobs()
    seeds = torch.cat([centres[:3], torch.tensor([[100.0, 100.0]], dtype=torch.float64)])
    ours = lloyd(x, seeds)
    assert float(torch.cdist(centres, ours).amin(-1).max()) < 0.3  # every blob has a centre near it
    kept = torch.as_tensor(_lloyd_keeping_empty(to_np(x), to_np(seeds)))
    assert float(torch.cdist(centres, kept).amin(-1).max()) > 3.0
    assert _objective(x, ours) * 10 < _objective(x, kept)  # ~ 200·2·0.5² against 100·5²


def test_relocation_skips_zero_weight_rows_and_vmaps() -> None:
    """Rows of weight 0 (padding, masked rows) are never the relocated points: the result is that
    of the data without them, though they lie farthest; the vmapped step equals each dataset's."""
    x, _ = _blobs()
    pad = torch.tensor([[1e3, 1e3], [-1e3, 1e3]], dtype=torch.float64)
    xw = torch.cat([pad[:1], x, pad[1:]])
    w = torch.ones(xw.shape[0], dtype=torch.float64)
    w[0] = w[-1] = 0.0
    torch.testing.assert_close(
        lloyd(xw, _far_seeds(), sample_weight=w), lloyd(x, _far_seeds()), rtol=0, atol=_centre_atol(x)
    )
    # one Lloyd step, batched (branch-free) against each dataset's eager step (which skips the
    # relocation when no cluster is empty): dataset 0 relocates two empty clusters, dataset 1 none
    xs = torch.stack([xw, xw.flip(0) + 1.0]).mT.contiguous()  # [B, D, N]
    ws = torch.stack([w, w.flip(0)])
    seeds = torch.stack([_far_seeds(), torch.tensor([[1.0, 1.0], [11.0, 1.0], [1.0, 11.0], [11.0, 11.0]])])
    labels, new, shift = torch.func.vmap(_lloyd_step)(xs, ws, seeds)
    for b in range(2):
        lb, nb, sb = _lloyd_step(xs[b], ws[b], seeds[b])
        assert torch.equal(labels[b], lb)
        torch.testing.assert_close(new[b], nb, rtol=0, atol=_centre_atol(xs[b].mT))
        torch.testing.assert_close(shift[b], sb, rtol=1e-12, atol=0)
        torch.testing.assert_close(sb, (nb - seeds[b]).square().sum(), rtol=1e-12, atol=0)
    moved = new[0, 2:]  # the two far clusters now sit on data points of weight 1
    assert bool((torch.cdist(moved, xw[w > 0]).amin(-1) == 0).all())


@pytest.mark.parametrize("block", ["broadcast", "gemm"])
def test_batched_lloyd_is_each_datasets_lloyd(block: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched loop (vmapped step, in the GEMM mode with the squared norms computed once per
    run; datasets dropping out as they converge) ends where each dataset's own loop ends:
    dataset 0 relocates two empty clusters, the others start near their blobs; same labels on
    well-separated blobs, so the centres agree to a mean's rounding."""
    if block == "gemm":
        monkeypatch.setattr(kmeans, "SMALL_BLOCK", 0)
        monkeypatch.setattr(kmeans, "SMALL_DIM", 0)
    xs = torch.stack([_blobs(seed=s)[0] * (1 + s) for s in range(3)])  # [B, N, 2], different spreads
    near = [x[torch.tensor([0, 50, 100, 150])] + 1.0 for x in xs[1:]]  # one seed near each blob
    seeds = torch.stack([_far_seeds(), *near])  # [B, K, 2]
    assert kmeans._mode(4, xs[0].mT) == block
    mean = xs.mean(1, keepdim=True)
    limit = kmeans.KMEANS_TOL * torch.stack([kmeans._data_variance(x, None) for x in xs - mean])
    run = kmeans._lloyd_loop((xs - mean).mT.contiguous(), None, kmeans.KMEANS_MAX_ITER)
    batched = run(seeds - mean, limit) + mean
    for b in range(3):
        torch.testing.assert_close(batched[b], lloyd(xs[b], seeds[b]), rtol=0, atol=_centre_atol(xs[b]))
