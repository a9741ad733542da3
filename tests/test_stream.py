"""Out-of-core fits: chunked full-batch EM equals the in-memory fit; online EM reaches the optimum."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import puregmm as pg
from puregmm import stream
from puregmm.families import FAMILIES
from tests import bounds

K = 3


def _data(n: int = 6000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [
            rng.normal(size=(n // 2, 3)),
            rng.normal(size=(n // 3, 3)) * 0.5 + 4,
            rng.normal(size=(n - n // 2 - n // 3, 3)) + np.array([0, 6, 0]),
        ]
    )
    return x[rng.permutation(n)]


def _close(a: Any, b: Any, rtol: float, atol: float) -> None:
    for i, (u, v) in enumerate(zip(pytree.tree_leaves(a), pytree.tree_leaves(b))):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=lambda m, i=i: f"leaf {i}: {m}")


def _fit_close(got: Any, ref: Any, x: torch.Tensor, start: pg.GMMParams) -> None:
    """Two EM fits of the same data by other routes (chunks, standardised or raw rows): the
    per-step rounding bound at the start and at the end, over the steps; the loss and its
    history within both losses' rounding plus that times the log-density's size."""
    steps = max(ref.n_steps, 1)
    rtol = max(bounds.stats_rtol(p, x, steps=steps) for p in (start, ref.params))
    assert rtol < 1e-6  # meaningful: a wrong step moves the params by far more
    bounds.assert_params_close(got.params, ref.params, rtol, "params")
    loss_atol = 2 * bounds.log_lik_atol(ref.params, x, n=x.shape[0]) + rtol * bounds.log_density_scale(start, x)
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=loss_atol)
    if got.history is not None and ref.history is not None:
        torch.testing.assert_close(got.history, ref.history, rtol=0, atol=loss_atol)


@pytest.fixture(scope="module")
def npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "x.npy"
    np.save(path, _data())
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_em_over_a_memmap_equals_the_in_memory_fit(npy: Path, family: str) -> None:
    mm = np.load(npy, mmap_mode="r")
    x = torch.from_numpy(np.array(mm))
    p0 = pg.init(x, K, family, key=1, method="kmeans++")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pg.ConvergenceWarning)
        ref = pg.fit(x, K, family, method="em", init_params=p0, max_steps=30, tol=1e-8)
        got = stream.fit_stream(mm, K, family, init_params=p0, max_steps=30, tol=1e-8, chunk_size=777)
    assert (got.n_steps, got.converged, got.n_resets) == (ref.n_steps, ref.converged, ref.n_resets)
    _fit_close(got, ref, x, p0)


def test_every_source_kind_gives_the_same_fit(npy: Path) -> None:
    x = np.load(npy)
    xt = torch.from_numpy(x)
    p0 = pg.init(xt, K, "full", key=2)
    chunks = [x[i : i + 1000] for i in range(0, len(x), 1000)]
    fits = {
        "path": stream.fit_stream(str(npy), K, init_params=p0, chunk_size=1000),
        "memmap": stream.fit_stream(np.load(npy, mmap_mode="r"), K, init_params=p0, chunk_size=1000),
        "tensor": stream.fit_stream(xt, K, init_params=p0, chunk_size=1000),
        "list": stream.fit_stream(chunks, K, init_params=p0),
        "callable": stream.fit_stream(lambda: iter(chunks), K, init_params=p0),
    }
    for name, r in fits.items():
        _close((r.params, r.loss), (fits["path"].params, fits["path"].loss), rtol=0.0, atol=0.0)
        assert r.n_steps == fits["path"].n_steps, name


def test_default_init_uses_all_rows_of_a_small_array_equal_to_pg_fit(npy: Path) -> None:
    x = torch.from_numpy(np.load(npy))
    ref = pg.fit(x, K, "diagonal", method="em", key=4)
    got = stream.fit_stream(npy, K, "diagonal", key=4)  # N <= chunk_size: the sample is every row
    # pg.fit runs EM on standardised data, the stream on the rows as read: the same fit up to the
    # rounding of that affine map (a few eps), carried through the EM steps
    _fit_close(got, ref, x, pg.init(x, K, "diagonal", key=4))


def test_large_array_initialises_from_a_uniform_sample(npy: Path) -> None:
    x = np.load(npy)
    src = stream.Source(x, 500, None)
    a, b = src.sample(500, torch.tensor(0)), src.sample(500, torch.tensor(0))
    torch.testing.assert_close(a, b)  # same key, same rows
    assert 400 < a.shape[0] <= 500  # distinct rows drawn with replacement
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in a.tolist())
    assert float(a[:, 1].max()) > 5 and float(a[:, 0].max()) > 3  # from all over the file, not its head only
    r = stream.fit_stream(x, K, "full", chunk_size=500)
    ref = pg.fit(torch.from_numpy(x), K, "full", method="em")
    assert abs(float(r.loss - ref.loss)) < 1e-3  # both stop once a step gains < tol = 1e-3: the same optimum


def test_reads_stay_within_the_chunk_size(npy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    from puregmm import sources

    read = sources.read_rows

    def spy(arr: Any, lo: int, hi: int) -> Any:
        sizes.append(hi - lo)
        return read(arr, lo, hi)

    monkeypatch.setattr(sources, "read_rows", spy)
    p0 = pg.init(torch.from_numpy(np.load(npy)), K, "full", key=1)
    with pytest.warns(pg.ConvergenceWarning, match="max_steps=3"):
        stream.fit_stream(np.load(npy, mmap_mode="r"), K, init_params=p0, chunk_size=1000, max_steps=3, tol=0.0)
    assert sizes and max(sizes) <= 1000
    assert len(sizes) == 4 * 6  # 3 passes + the final loss pass, 6 chunks each


def test_peak_anonymous_memory_is_bounded_by_the_chunk_not_the_data(tmp_path: Path) -> None:
    """A 128 MB float64 memmap, 2 EM passes in 16384-row chunks in a subprocess: RssAnon (which
    excludes the file's page cache) grows by far less than the data size. (It grows with the
    chunk, through sufficient_stats' [K, c, D] blocks: ~25 MB here, ~110 MB at 65536 rows, for
    1e6 rows as for 2e6.)"""
    path = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(2_000_000, 8))
    rng = np.random.default_rng(0)
    for lo in range(0, mm.shape[0], 250_000):
        mm[lo : lo + 250_000] = rng.normal(size=(250_000, 8)) + (lo // 250_000 % 2) * 3
    mm.flush()
    del mm
    script = textwrap.dedent(
        f"""
        import re, threading, time, numpy as np, torch, puregmm as pg
        from puregmm import stream
        torch.set_num_threads(1)
        def anon():
            return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        mm = np.load({str(path)!r}, mmap_mode="r")
        p0 = pg.init(torch.from_numpy(np.array(mm[:5000])), 4, "diagonal", key=0)
        stream.fit_stream(mm[:70_000], 4, "diagonal", init_params=p0, chunk_size=16384, max_steps=1)  # warm-up
        base, peak, done = anon(), [0], []
        def watch():
            while not done:
                peak[0] = max(peak[0], anon())
                time.sleep(0.002)
        t = threading.Thread(target=watch)
        t.start()
        stream.fit_stream(mm, 4, "diagonal", init_params=p0, chunk_size=16384, max_steps=2, tol=0.0)
        done.append(1)
        t.join()
        print(max(peak[0], anon()) - base)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 48 * 2**20, f"RssAnon grew by {growth / 2**20:.0f} MB for 128 MB of data"


# --- online EM -------------------------------------------------------------------------------

ONLINE_N, ONLINE_BATCH = 2_000_000, 10_000
TRUE_MEANS = np.array([[0.0, 0.0], [4.0, 1.0], [-1.0, 5.0]])
TRUE_SCALES = np.array([[1.0, 0.6], [0.5, 1.2], [0.8, 0.8]])


@pytest.fixture(scope="module")
def online_data() -> torch.Tensor:
    """2,000,000 points of a known 2-D mixture, generated chunk by chunk, as one float64 tensor
    (32 MB) that the stream reads in batches of 10,000."""
    parts = []
    for i in range(ONLINE_N // ONLINE_BATCH):
        rng = np.random.default_rng([7, i])
        labels = rng.choice(3, size=ONLINE_BATCH, p=[0.5, 0.3, 0.2])
        parts.append(TRUE_MEANS[labels] + rng.normal(size=(ONLINE_BATCH, 2)) * TRUE_SCALES[labels])
    return torch.from_numpy(np.concatenate(parts))


def test_online_em_on_two_million_points_reaches_the_full_batch_optimum(online_data: torch.Tensor) -> None:
    x = online_data
    batches = lambda: (x[i : i + ONLINE_BATCH] for i in range(0, ONLINE_N, ONLINE_BATCH))  # noqa: E731
    truth = pg.from_moments(torch.tensor([0.5, 0.3, 0.2]), torch.from_numpy(TRUE_MEANS), _diag(TRUE_SCALES), "full")
    start = time.perf_counter()
    opt = stream.fit_stream(batches, K, "full", init_params=truth.to(torch.float64), max_steps=200, tol=1e-10)
    rough = pg.from_moments(  # far from the optimum: every mean 1-2 units off, wrong weights and spreads
        torch.tensor([0.2, 0.3, 0.5]),
        torch.tensor([[1.5, -1.0], [2.5, 2.5], [0.5, 3.5]]),
        torch.eye(2).expand(3, 2, 2) * 2.0,
        "full",
    ).to(torch.float64)
    online = stream.fit_stream(batches, K, "full", method="online_em", init_params=rough)
    assert online.n_steps == ONLINE_N // ONLINE_BATCH and online.converged
    gap = float(online.loss - opt.loss)
    # below the optimum only by opt's remaining gain (< its tol per step) and both losses' rounding
    # (a row's log-density size taken on the first 20,000 rows: the same distribution)
    below = 1e-10 + 2 * bounds.log_lik_atol(opt.params, x[:20_000], n=ONLINE_N)
    assert -below < gap < 0.01, f"online EM is {gap:.4g} nats above the full-batch optimum"
    assert float(online.history[0]) - float(opt.loss) > 0.3  # it did have a long way to go
    assert time.perf_counter() - start < 120


def _diag(scales: np.ndarray) -> torch.Tensor:
    return torch.diag_embed(torch.from_numpy(scales).square()).float()


def test_online_em_reads_an_iterator_once_and_keeps_the_first_batch() -> None:
    x = torch.from_numpy(_data())
    chunks = [x[i : i + 500] for i in range(0, 6000, 500)]
    r = stream.fit_stream(iter(chunks), K, "diagonal", method="online_em")  # init from the first batch
    assert r.n_steps == 12 and r.history.shape == (12,)
    # a read-once stream has no final pass: its loss is the row-weighted mean of the batch losses
    mean_atol = bounds.SLACK * bounds.gamma(12) * float(r.history.abs().max())  # 12 equal batches, another order
    torch.testing.assert_close(r.loss, r.history.mean(), rtol=0, atol=mean_atol)
    twice = stream.fit_stream(lambda: iter(chunks), K, "diagonal", method="online_em", max_steps=30)
    assert twice.n_steps == 30  # a re-readable source cycles until max_steps
    loss_atol = 2 * bounds.log_lik_atol(twice.params, x, n=x.shape[0])  # chunked and whole, two routes
    torch.testing.assert_close(twice.loss, pg.loss(twice.params, x), rtol=0, atol=loss_atol)


# --- pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_recentre_is_exact(family: str) -> None:
    from puregmm.em import responsibility_stats

    x = torch.from_numpy(_data(600))
    resp = torch.softmax(torch.randn(600, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1)
    c1, c2 = torch.randn(K, 3, dtype=torch.float64), torch.randn(K, 3, dtype=torch.float64) + 2
    s1, s2 = responsibility_stats(x, resp, c1, family), responsibility_stats(x, resp, c2, family)
    moved = stream.recentre(s1, c1, c2)
    if family == "tied":  # only Σ_k S_k is defined (see em._tied_stats)
        moved, s2 = moved._replace(xx_sum=moved.xx_sum.sum(0)), s2._replace(xx_sum=s2.xx_sum.sum(0))
    # sums about c1 moved to c2 against sums about c2: terms of size ‖x - c‖^power, any order
    both = pg.from_moments(
        torch.full((2 * K,), 0.5 / K, dtype=x.dtype),
        torch.cat([c1, c2]),
        torch.eye(3, dtype=x.dtype).expand(2 * K, 3, 3),
    )
    for power, a, b in zip((0, 1, 2), moved[:3], s2[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=bounds.sum_atol(both, x, resp.sum(-1), power=power))


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_stats_give_back_the_params(family: str) -> None:
    p = pg.init(torch.from_numpy(_data(600)), K, family, key=0)
    # params -> moments -> params: sums over the K components of terms r² widths² in size (the
    # means' spread), a factorisation each way: the statistics' bound with the means as the rows
    rtol = bounds.stats_rtol(p, p.means)
    bounds.assert_params_close(pg.m_step(stream.expected_stats(p), p, reg_covar=0.0), p, rtol, "round trip")


def test_is_stream_tells_streams_from_in_memory_data(npy: Path) -> None:
    assert stream.is_stream(str(npy)) and stream.is_stream(npy) and stream.is_stream(np.load(npy, mmap_mode="r"))
    assert stream.is_stream(lambda: iter([])) and stream.is_stream(iter([np.zeros((2, 2))]))
    assert not any(stream.is_stream(d) for d in (np.zeros((2, 2)), torch.zeros(2, 2), [[1.0, 2.0]]))


# --- errors ----------------------------------------------------------------------------------


def test_bad_sources_and_settings_raise_clear_errors(npy: Path) -> None:
    x = _data(600)
    with pytest.raises(TypeError, match="source must be an array"):
        stream.fit_stream(42, K)
    with pytest.raises(ValueError, match="2-D"):
        stream.fit_stream(np.zeros(10), K)
    bad = x.copy()
    bad[450, 1] = np.nan
    with pytest.raises(ValueError, match=r"source rows 400\.\. contains NaN or Inf \(first bad rows: \[50\]\)"):
        stream.fit_stream(bad, K, chunk_size=100)
    with pytest.raises(ValueError, match="D=2 columns; earlier data had D=3"):
        stream.fit_stream([x[:300], x[300:, :2]], K)
    with pytest.raises(ValueError, match="iterator that can be read once"):
        stream.fit_stream(iter([x]), K, method="em")
    with pytest.raises(ValueError, match="more than the 2 rows of the first batch"):
        stream.fit_stream(iter([x[:2], x[2:]]), K, method="online_em")
    with pytest.raises(ValueError, match="yielded no rows"):
        stream.fit_stream(iter([]), K, method="online_em")
    with pytest.raises(ValueError, match=r"kappa must be in \(0.5, 1\]"):
        stream.fit_stream(x, K, method="online_em", kappa=0.5)
    with pytest.raises(ValueError, match="tol is not used"):
        stream.fit_stream(x, K, method="online_em", tol=1e-3)
    with pytest.raises(ValueError, match="unknown method"):
        stream.fit_stream(x, K, method="gd")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        stream.fit_stream(x, K, chunk_size=0)
    p = pg.init(torch.from_numpy(x), 2, "full")
    with pytest.raises(ValueError, match="init_params is"):
        stream.fit_stream(x, K, init_params=p)


def test_pg_fit_dispatches_paths_and_streams(tmp_path) -> None:
    """pg.fit hands a .npy path / memmap to fit_stream (same result as in memory) and ignores
    distributed=True without a process group."""
    gen = np.random.default_rng(0)
    x = np.concatenate([gen.normal(size=(400, 2)) - 3, gen.normal(size=(400, 2)) + 3])
    np.save(tmp_path / "x.npy", x)
    streamed = pg.fit(tmp_path / "x.npy", 2, "diagonal", method="em")
    xt = torch.as_tensor(x)
    in_memory = pg.fit(xt, 2, "diagonal", method="em")
    _fit_close(streamed, in_memory, xt, pg.init(xt, 2, "diagonal"))
    local = pg.fit(torch.as_tensor(x), 2, "diagonal", method="em", distributed=True)
    assert torch.equal(local.params.means, in_memory.params.means)
    with pytest.raises(ValueError, match="streamed fits"):
        pg.fit(tmp_path / "x.npy", 2, method="em", n_init=2)
