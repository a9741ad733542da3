"""Data-parallel fits: 2 gloo processes on loopback against the single-process fit of all data.

Each test spawns 2 ranks (``torch.multiprocessing``, ``MASTER_ADDR=127.0.0.1``, a free port);
the ranks write their results to files and the parent compares them with ``pg.fit`` on the
concatenated shards (float64, within rounding bounds: tests/bounds.py) and with each other (bitwise).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import puregmm as pg
from puregmm import distributed as pgd
from tests import bounds

WORLD = 2
SPLIT = 113  # rank 0 holds rows [0, 113), rank 1 the other 187: uneven shards
N, D, K = 300, 3, 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, 1.0, -2.0], [-3.0, 4.0, 1.0]], dtype=torch.float64)
    labels = torch.arange(N) % K
    x = centres[labels] + torch.randn(N, D, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 2.0])
    w = torch.rand(N, generator=g, dtype=torch.float64) * 2
    return x, w


def _start_params(x: torch.Tensor, family: str = "full") -> pg.GMMParams:
    """Rough params with every component away from its optimum. (A component at its optimum,
    e.g. a k-means init of a well-separated cluster, has gradients near Adam's eps = 1e-8,
    where the update amplifies rounding-level differences of the gradient sums (1e-17) a
    thousandfold: no summation order could then meet 1e-10 after 20 steps, in any library.)"""
    means = torch.tensor([[0.5, -0.4, 0.3], [4.0, 1.5, -1.0], [-2.5, 3.0, 2.0]], dtype=x.dtype)
    cov = torch.eye(D, dtype=x.dtype).expand(K, D, D) * torch.tensor([1.5, 0.8, 2.5], dtype=x.dtype)[:, None, None]
    if family == "tied":
        cov = cov[:1].expand(K, D, D)
    return pg.from_moments(torch.tensor([0.2, 0.3, 0.5], dtype=x.dtype), means, cov, family)


def _setup(rank: int, port: int, timeout: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME="lo"
    )
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    pgd.init("gloo", timeout=timeout)


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[:SPLIT] if rank == 0 else t[SPLIT:]


def _fit_worker(rank: int, port: int, out: str) -> None:
    _setup(rank, port, timeout=60)
    x, w = _data()
    xs, ws = _shard(x, rank), _shard(w, rank)
    p0 = _start_params(x)
    comm = pgd.collective()
    res: dict[str, Any] = {}
    em = pgd.fit_distributed(xs, K, "full", method="em", init_params=p0, max_steps=25, tol=1e-9)
    res["em"] = (em.params, em.loss, em.n_steps, em.history)
    emw = pgd.fit_distributed(xs, K, "diagonal", method="em", sample_weight=ws, max_steps=15, n_init=2, key=5)
    res["em_weighted_default_init"] = (emw.params, emw.loss, emw.n_steps)
    gd = pgd.fit_distributed(xs, K, "full", method="gd", init_params=p0, max_steps=20)
    res["gd"] = (gd.params, gd.loss, gd.history)
    gdw = pgd.fit_distributed(
        xs, K, "tied", method="gd", init_params=_start_params(x, "tied"), sample_weight=ws, max_steps=20
    )
    res["gd_weighted"] = (gdw.params, gdw.loss)
    # the resets draw the same rows as on the whole data: a collapsed component, an empty one
    bad = pg.GMMParams(p0.logits, p0.means, p0.scale.clone().index_fill_(0, torch.tensor([1]), 30.0), "full")
    state = pg.step(pg.init_state(bad, key=7), xs, reduce=comm)
    res["reset"] = (state.params, state.n_resets)
    far = pg.GMMParams(p0.logits, p0.means.index_fill(0, torch.tensor([2]), 60.0), p0.scale, "full")
    res["empty"] = pg.em_step(far, xs, reduce=comm, return_info=True)
    # bad input on one rank, or ranks that disagree: every rank raises, none waits
    errors = []
    bad_shard = xs.clone()
    bad_shard[5, 0] = float("nan") if rank == 1 else bad_shard[5, 0]
    for data, k in ((bad_shard, K), (xs, K + rank)):
        try:
            pgd.fit_distributed(data, k, "full", method="em", max_steps=2)
            errors.append("no error")
        except ValueError as err:
            errors.append(str(err))
    res["errors"] = errors
    # the CLI: each rank reads its slice of the memory-mapped .npy, rank 0 writes the folder
    from puregmm.cli import main

    args = "fit x.npy -k 3 --method em --max-steps 20 --distributed --no-plot -q --out cli".split()
    code = main([str(Path(out) / a) if a in ("x.npy", "cli") else a for a in args])
    res["cli_exit"] = code
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _failing_worker(rank: int, port: int, out: str, mode: str) -> None:
    """Rank 1 raises in its 3rd EM step; with ``mode="exit"`` its process then dies, with
    ``mode="stay"`` it stays alive (a caught error, a notebook), so only the timeout helps."""
    _setup(rank, port, timeout=3)
    x, _ = _data()
    if rank == 1:
        calls = []

        def broken(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure on rank 1")
            return pg.em_step(*args, **kwargs)

        from puregmm import methods

        methods.em_step = broken  # type: ignore[assignment]  # the EM row's kernel, which the driver runs
        try:
            pgd.fit_distributed(_shard(x, rank), K, "full", method="em", max_steps=50, tol=0.0)
        except RuntimeError:
            if mode == "exit":
                raise
            time.sleep(60)  # alive but gone from the collectives; the parent kills it
        return
    start = time.perf_counter()
    try:
        pgd.fit_distributed(_shard(x, rank), K, "full", method="em", max_steps=50, tol=0.0)
        outcome = "no error"
    except pgd.DistributedError as err:
        outcome = f"DistributedError: {err}"
    except Exception as err:  # anything else is a failure of the test too
        outcome = f"{type(err).__name__}: {err}"
    (Path(out) / f"{mode}.txt").write_text(f"{time.perf_counter() - start:.3f}\n{outcome}")
    dist.destroy_process_group()  # a failed group must be torn down before the process exits


def _spawn(fn: Any, *args: Any, attempts: int = 3) -> None:
    """Run ``fn`` on WORLD ranks. A free port found here can be taken by another process before
    rank 0 binds it (two xdist workers, a loaded machine): such a start is retried on a new
    port; a failure that repeats on every attempt is raised."""
    for attempt in range(attempts):
        try:
            mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)
            return
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt == attempts - 1:
                raise


def _assert_tree_close(a: Any, b: Any, what: str, **tol: float) -> None:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb), what
    for i, (u, v) in enumerate(zip(la, lb)):
        torch.testing.assert_close(u, v, msg=lambda m, i=i: f"{what}, leaf {i}: {m}", **tol)


def _assert_fit_close(got: Any, ref: Any, x: torch.Tensor, rtol: float, start: pg.GMMParams, what: str) -> None:
    """(params, loss[, history]) of the ranks against one process: sums over the shards, then
    across ranks, in another order. Params in their units within ``rtol`` (bounds.py); losses
    within both losses' rounding plus ``rtol`` times the log-density's size."""
    params, *losses = got
    ref_params, *ref_losses = ref
    assert rtol < 1e-6, f"{what}: the bound {rtol:.2g} would not be a meaningful check"
    bounds.assert_params_close(params, ref_params, rtol, what)
    loss_atol = 2 * bounds.log_lik_atol(ref_params, x, n=N) + rtol * bounds.log_density_scale(start, x)
    for u, v in zip(losses, ref_losses):
        torch.testing.assert_close(u, v, rtol=0, atol=loss_atol, msg=lambda m: f"{what}, loss: {m}")


def _em_rtol(x: torch.Tensor, steps: int, *params: pg.GMMParams) -> float:
    """The per-step rounding bound of EM at the start and at the end, over the steps."""
    return max(bounds.stats_rtol(p, x, steps=max(steps, 1)) for p in params)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    np.save(out / "x.npy", _data()[0].numpy())
    _spawn(_fit_worker, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_hold_identical_results(ranks: list[dict[str, Any]]) -> None:
    for name in set(ranks[0]) - {"errors", "cli_exit"}:
        _assert_tree_close(ranks[0][name], ranks[1][name], f"{name}: rank 0 vs rank 1", rtol=0.0, atol=0.0)


def test_em_equals_single_process_fit(ranks: list[dict[str, Any]]) -> None:
    x, w = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pg.fit(x, K, "full", method="em", init_params=_start_params(x), max_steps=25, tol=1e-9)
        refw = pg.fit(x, K, "diagonal", method="em", sample_weight=w, max_steps=15, n_init=2, key=5)
    params, loss, n_steps, history = ranks[0]["em"]
    assert n_steps == ref.n_steps
    p0 = _start_params(x)
    rtol = _em_rtol(x, ref.n_steps, p0, ref.params)
    _assert_fit_close((params, loss, history), (ref.params, ref.loss, ref.history), x, rtol, p0, "em")
    params, loss, n_steps = ranks[0]["em_weighted_default_init"]
    assert n_steps == refw.n_steps
    # both restarts reach the same optimum with permuted components, so the winner is decided by
    # rounding: compare up to the order of the components
    rtol = _em_rtol(x, refw.n_steps, refw.params)
    got, want = (_sorted(params), loss), (_sorted(refw.params), refw.loss)
    _assert_fit_close(got, want, x, rtol, refw.params, "weighted em, 2 restarts")


def _sorted(p: pg.GMMParams) -> pg.GMMParams:
    order = torch.argsort(p.means[:, 0])
    return pg.GMMParams(p.logits[order], p.means[order], p.scale[order], p.family)


def test_gradient_steps_equal_single_process_fit(ranks: list[dict[str, Any]]) -> None:
    x, w = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pg.fit(x, K, "full", method="gd", init_params=_start_params(x), max_steps=20)
        refw = pg.fit(x, K, "tied", method="gd", init_params=_start_params(x, "tied"), sample_weight=w, max_steps=20)
    params, loss, history = ranks[0]["gd"]
    assert history.shape == (20,)
    p0, p0w = _start_params(x), _start_params(x, "tied")
    rtol = bounds.adam_rtol(p0, x, 20)  # the gradient's rounding through Adam's normalisation
    _assert_fit_close((params, loss, history), (ref.params, ref.loss, ref.history), x, rtol, p0, "gd, 20 steps")
    rtol = bounds.adam_rtol(p0w, x, 20, w)
    _assert_fit_close(ranks[0]["gd_weighted"], (refw.params, refw.loss), x, rtol, p0w, "weighted gd, 20 steps")


def test_resets_pick_the_same_rows_as_one_process(ranks: list[dict[str, Any]]) -> None:
    x, _ = _data()
    p0 = _start_params(x)
    bad = pg.GMMParams(p0.logits, p0.means, p0.scale.clone().index_fill_(0, torch.tensor([1]), 30.0), "full")
    ref = pg.step(pg.init_state(bad, key=7), x)
    params, n_resets = ranks[0]["reset"]
    assert int(n_resets) == int(ref.n_resets) == 1
    bounds.assert_params_close(params, ref.params, bounds.adam_rtol(p0, x, 1), "gd reset")
    far = pg.GMMParams(p0.logits, p0.means.index_fill(0, torch.tensor([2]), 60.0), p0.scale, "full")
    ref_p, ref_info = pg.em_step(far, x, return_info=True)
    params, info = ranks[0]["empty"]
    assert int(info.n_resets) == int(ref_info.n_resets) >= 1
    got, want = (params, info.log_likelihood), (ref_p, ref_info.log_likelihood)
    _assert_fit_close(got, want, x, bounds.stats_rtol(far, x), far, "em re-seed")


def test_bad_input_on_one_rank_raises_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    (nan_0, disagree_0), (nan_1, disagree_1) = ranks[0]["errors"], ranks[1]["errors"]
    assert nan_1.startswith("data contains NaN or Inf (first bad rows: [5])")
    assert nan_0.startswith("rank 1 rejected its input: data contains NaN or Inf (first bad rows: [5])")
    assert disagree_0 == disagree_1
    assert disagree_0.startswith("ranks disagree on settings:") and "'n_components': 4" in disagree_0


def test_cli_distributed_fit_equals_the_whole_data_fit(ranks: list[dict[str, Any]], tmp_path_factory: Any) -> None:
    assert ranks[0]["cli_exit"] == ranks[1]["cli_exit"] == 0
    out = Path(str(tmp_path_factory.getbasetemp())) / "dist0" / "cli"
    x, _ = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pg.fit(x, K, "full", method="em", max_steps=20)  # default init: gathered rows = all rows
    start = pg.init(x, K, "full")
    rtol = _em_rtol(x, ref.n_steps, start, ref.params)
    bounds.assert_params_close(pg.load(out / "model.safetensors"), ref.params, rtol, "CLI --distributed model")
    report = json.loads((out / "report.json").read_text())
    assert (report["N"], report["world_size"], report["n_steps"]) == (N, WORLD, ref.n_steps)
    loss_atol = 2 * bounds.log_lik_atol(ref.params, x, n=N) + rtol * bounds.log_density_scale(start, x)
    assert report["bic"] == pytest.approx(float(pg.bic(ref.params, x)), rel=0, abs=2 * N * loss_atol)
    assert report["loss"] == pytest.approx(float(ref.loss), rel=0, abs=loss_atol)


def test_a_failing_rank_makes_the_others_raise_not_hang(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    runs = {}
    for mode in ("exit", "stay"):  # both at once: the test costs one process start-up
        port = _free_port()
        runs[mode] = [ctx.Process(target=_failing_worker, args=(r, port, str(tmp_path), mode)) for r in range(WORLD)]
        for proc in runs[mode]:
            proc.start()
    try:
        for mode, procs in runs.items():
            procs[0].join(timeout=50)
            assert procs[0].exitcode == 0, f"{mode}: rank 0 did not finish (exit code {procs[0].exitcode})"
            seconds, outcome = (tmp_path / f"{mode}.txt").read_text().split("\n", 1)
            assert outcome.startswith("DistributedError: rank 0 of 2:"), outcome
            assert "Another rank most likely raised an error, died or is stuck" in outcome
            assert float(seconds) < 30, f"{mode}: rank 0 waited {seconds} s"
    finally:
        for procs in runs.values():
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()


# --- no process group: a no-op --------------------------------------------------------------


def test_without_process_group_everything_is_a_no_op() -> None:
    assert not dist.is_initialized()
    x, w = _data()
    comm = pgd.collective()
    assert (comm.active, comm.rank, comm.world_size) == (False, 0, 1)
    stats = pg.sufficient_stats(_start_params(x), x)
    assert comm(stats) is stats
    assert comm.gather(x).shape == (1, *x.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pgd.fit_distributed(x, K, "full", method="em", max_steps=5, sample_weight=w)
        b = pg.fit(x, K, "full", method="em", max_steps=5, sample_weight=w)
    _assert_tree_close((a.params, a.loss), (b.params, b.loss), "no-op", rtol=0.0, atol=0.0)
    p = _start_params(x)
    _assert_tree_close(pg.em_step(p, x, reduce=comm), pg.em_step(p, x), "em_step reduce no-op", rtol=0.0, atol=0.0)
    s = pg.init_state(p)
    # with a reduce, the gradient is summed by the reduction's route (a rank-local sum, then the reduce)
    step_rtol = bounds.adam_rtol(p, x, 1)
    bounds.assert_params_close(pg.step(s, x, reduce=comm).params, pg.step(s, x).params, step_rtol, "step reduce no-op")


def test_shard_bounds_cover_rows_once() -> None:
    for n in (0, 1, 5, 10, 11):
        for world in (1, 2, 3, 4):
            bounds = [pgd.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
            assert sizes == [len(a) for a in np.array_split(np.arange(n), world)]


def test_init_without_launcher_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        pgd.init()
    with pytest.raises(ValueError, match="timeout must be a positive"):
        pgd.init(timeout=0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
