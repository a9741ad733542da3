"""Many independent fits at once: ``pg.fit_batched`` against Python loops of single fits.

B datasets of N points in D dimensions (default 1000 x 500 x 2), each drawn from its own random
K = 3 component full-covariance mixture, are fitted by EM to ``tol`` 1e-3 (scikit-learn's rule
on the change of the mean log-likelihood, at most 100 iterations, ``reg_covar`` 1e-6):

* ``fit_batched``: ``pg.fit_batched(xs, K, "full", method="em", keys=arange(B))``, one
  vectorised computation: the vmapped init kernels (k-means++ then Lloyd), then vmapped
  ``em_step`` with converged datasets frozen. Its time includes the initialisation.
* ``fit_batched, same init``: the same from the common start (``init_params=``): EM only,
  like the scikit-learn loop with the same init below (the like-for-like EM comparison).
* ``pg.fit loop``: ``pg.fit(xs[b], K, "full", method="em", key=b)`` for each b; every result
  equals the batched one (the table reports the largest difference of the final loss).
* ``sklearn loop, same init``: ``GaussianMixture`` started from puregmm's initial weights, means
  and precisions (``weights_init``/``means_init``/``precisions_init``, with
  ``init_params="random_from_data"`` so that it runs no k-means of its own); the init is
  given to it for free (not timed). Its EM iterations are the same as ours.
* ``sklearn loop, own init``: ``GaussianMixture`` with its default k-means initialisation
  (``random_state=b``).

Protocol (issue 13): every call gets fresh input arrays (copies made outside the timer), the
default allocator, no warm-up but a small first call of each code path. Timing on a shared
machine: the loops run in ``--blocks`` blocks of B / blocks datasets,
interleaved round-robin with one whole ``fit_batched`` call per round, so load changes hit all
contenders alike; each loop's time is the median block time times the number of blocks, and
``fit_batched``'s the median of its calls. Mean log-likelihood is per point, averaged over
datasets (higher is better). Every contender runs with the same number of threads
(``--threads``, default 1: on two cores shared with other jobs, two threads make small ops
wait for a descheduled thread).

Usage::

    python benchmarks/bench_batched.py                    # B=1000, N=500, D=2, K=3, float64
    python benchmarks/bench_batched.py --b 200 --blocks 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import puregmm as pg
from puregmm.init import init_batched
from puregmm.methods import EMState, em_advance

FAMILY = "full"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def datasets(b: int, n: int, d: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[B, N, D]: dataset b holds N points of its own random K-component mixture (means 3·N(0, I),
    covariances A Aᵀ/D + 0.3 I, weights Dirichlet(2))."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    means = 3.0 * torch.randn(b, k, d, generator=g, dtype=f64)
    a = torch.randn(b, k, d, d, generator=g, dtype=f64)
    chol = torch.linalg.cholesky(a @ a.mT / d + 0.3 * torch.eye(d, dtype=f64))
    weights = -torch.log(torch.rand(b, k, 2, generator=g, dtype=f64)).sum(-1)  # Gamma(2), ∝ Dirichlet(2)
    labels = torch.multinomial(weights, n, replacement=True, generator=g)  # [B, N]
    z = torch.randn(b, n, d, generator=g, dtype=f64)
    idx = labels[..., None].expand(b, n, d)
    mu = torch.gather(means, 1, idx)
    pts = mu + (chol[torch.arange(b)[:, None], labels] @ z.unsqueeze(-1)).squeeze(-1)
    return pts.to(dtype)


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def run_batched(
    xs: torch.Tensor, k: int, keys: torch.Tensor, tol: float, start: pg.GMMParams | None = None
) -> pg.FitResult:
    return quiet(pg.fit_batched, xs, k, FAMILY, method="em", tol=tol, keys=keys, init_params=start)


def run_pg_loop(xs: torch.Tensor, k: int, keys: torch.Tensor, tol: float, idx: range) -> list[tuple[float, int]]:
    out = []
    for i in idx:
        r = quiet(pg.fit, xs[i], k, FAMILY, method="em", tol=tol, key=int(keys[i]))
        out.append((-float(r.loss), r.n_steps))
    return out


def run_sklearn(xs: np.ndarray, k: int, tol: float, idx: range, start: dict[str, np.ndarray] | None) -> list:
    from sklearn.mixture import GaussianMixture

    out = []
    for i in idx:
        if start is None:
            gm = GaussianMixture(k, covariance_type="full", tol=tol, reg_covar=1e-6, random_state=i)
        else:
            gm = GaussianMixture(
                k,
                covariance_type="full",
                tol=tol,
                reg_covar=1e-6,
                init_params="random_from_data",
                weights_init=start["weights"][i],
                means_init=start["means"][i],
                precisions_init=start["precisions"][i],
                random_state=0,
            )
        quiet(gm.fit, xs[i])
        out.append((float(gm.score(xs[i])), int(gm.n_iter_)))
    return out


def step_time(xs: torch.Tensor, params: pg.GMMParams, repeats: int) -> float:
    """Median seconds of one vmapped ``em_advance`` over all B datasets (the loop's per-step cost)."""
    b = xs.shape[0]
    zeros = torch.zeros(b, dtype=torch.int64)
    state = EMState(params, zeros, torch.zeros(b, dtype=xs.dtype), zeros, zeros)
    kernel = torch.func.vmap(em_advance, in_dims=(0, 0, None))
    kernel(state, xs, None)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel(state, xs, None)
        times.append(time.perf_counter() - t0)
    return _common.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--b", type=int, default=1000, help="number of datasets B")
    ap.add_argument("--n", type=int, default=500, help="points per dataset N")
    ap.add_argument("--d", type=int, default=2, help="dimension D")
    ap.add_argument("--k", type=int, default=3, help="components K")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    ap.add_argument("--blocks", type=int, default=5, help="loop blocks = rounds = fit_batched repeats")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-pg-loop", action="store_true", help="skip the loop of single pg.fit calls")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import sklearn.mixture  # noqa: F401  (load its BLAS and OpenMP before limiting them)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    b, n, d, k, tol = args.b, args.n, args.d, args.k, args.tol
    xs = datasets(b, n, d, k, DTYPES[args.dtype])
    xs_np = xs.double().numpy()
    keys = torch.arange(b, dtype=torch.int64)

    # the common start for sklearn (= what fit_batched and pg.fit start from)
    t0 = time.perf_counter()
    start_params = init_batched(xs, k, FAMILY, keys=keys, method="kmeans")
    init_seconds = time.perf_counter() - t0
    start = {
        "weights": pg.weights(start_params).double().numpy(),
        "means": start_params.means.double().numpy(),
        "precisions": pg.precisions(start_params).double().numpy(),
    }

    # warm-up: every code path once, small
    run_batched(xs[:4], k, keys[:4], tol)
    run_pg_loop(xs, k, keys, tol, range(2))
    run_sklearn(xs_np, k, tol, range(2), start)
    run_sklearn(xs_np, k, tol, range(2), None)

    blocks = [range(i * b // args.blocks, (i + 1) * b // args.blocks) for i in range(args.blocks)]
    names = [
        "fit_batched",
        "fit_batched, same init",
        "pg.fit loop",
        "sklearn loop, same init",
        "sklearn loop, own init",
    ]
    if args.no_pg_loop:
        names.remove("pg.fit loop")
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[Any]] = {name: [] for name in names}
    batched = same = None
    for blk in blocks:
        for name in names:
            fresh, fresh_np = xs.clone(), xs_np.copy()  # fresh inputs every call, made outside the timer
            t0 = time.perf_counter()
            if name == "fit_batched":
                batched = run_batched(fresh, k, keys, tol)
            elif name == "fit_batched, same init":
                same = run_batched(fresh, k, keys, tol, start_params)
            elif name == "pg.fit loop":
                results[name] += run_pg_loop(fresh, k, keys, tol, blk)
            elif name == "sklearn loop, same init":
                results[name] += run_sklearn(fresh_np, k, tol, blk, start)
            else:
                results[name] += run_sklearn(fresh_np, k, tol, blk, None)
            times[name].append(time.perf_counter() - t0)
            del fresh, fresh_np
    assert batched is not None and same is not None
    results["fit_batched"] = list(zip((-batched.loss).tolist(), batched.n_steps.tolist(), strict=True))
    results["fit_batched, same init"] = list(zip((-same.loss).tolist(), same.n_steps.tolist(), strict=True))
    whole = ("fit_batched", "fit_batched, same init")
    seconds = {name: _common.median(ts) * (1 if name in whole else args.blocks) for name, ts in times.items()}
    per_step = step_time(xs, start_params, repeats=5)

    ref, ref_own = seconds["sklearn loop, same init"], seconds["sklearn loop, own init"]
    rows = []
    for name in names:
        ll = np.array([r[0] for r in results[name]])
        iters = np.array([r[1] for r in results[name]])
        init = "no (given)" if "same init" in name else "yes"
        rows.append(
            [
                name,
                init,
                f"{seconds[name]:.2f}",
                f"{ref / seconds[name]:.1f}x",
                f"{ref_own / seconds[name]:.1f}x",
                f"{ll.mean():.6f}",
                f"{iters.mean():.2f}",
            ]
        )
    header = [
        "contender",
        "init timed",
        "seconds (median)",
        "vs sklearn same init",
        "vs sklearn own init",
        "mean log-lik",
        "mean iters",
    ]
    ll_b = np.array([r[0] for r in results["fit_batched, same init"]])
    ll_sk = np.array([r[0] for r in results["sklearn loop, same init"]])
    print(f"B={b} datasets of N={n}, D={d}, K={k}, family={FAMILY}, EM tol={tol}, dtype={args.dtype}")
    print(_common.markdown_table(header, rows))
    print(
        f"breakdown of fit_batched: init_batched {init_seconds:.3f} s (one call); "
        f"one vmapped em_step over all B {per_step * 1e3:.1f} ms (median of 5); "
        f"max steps {int(batched.n_steps.max())}"
    )
    print(
        f"fit_batched (same init) vs sklearn (same init), per dataset: log-lik >= sklearn's - 1e-9 on "
        f"{int((ll_b >= ll_sk - 1e-9).sum())}/{b}; max |difference| {np.abs(ll_b - ll_sk).max():.2e}"
    )
    if "pg.fit loop" in results:
        ll_pg = np.array([r[0] for r in results["pg.fit loop"]])
        print(f"fit_batched vs pg.fit loop: max |difference of mean log-lik| {np.abs(ll_b - ll_pg).max():.2e}")
    print(
        f"loops: median block of {b // args.blocks} fits x {args.blocks}; fit_batched: median of {args.blocks} "
        "calls, interleaved with the blocks"
    )
    for line in _common.describe_machine():
        print(line)
    print("command:", _common.command_line())


if __name__ == "__main__":
    main()
