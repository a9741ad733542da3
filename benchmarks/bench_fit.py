"""End to end: ``pg.fit(method="em")`` from k-means++ seeds against scikit-learn's ``fit``.

Both fit a full-covariance K-component mixture to N points drawn from a K-component mixture
(the generator of ``bench_em.py``), with the same tolerance on the change of the mean
log-likelihood (1e-3, scikit-learn's rule) and the same iteration cap (100):

* puregmm: ``pg.fit(x, K, "full", method="em", init_method="kmeans++", tol=1e-3, key=seed)``
  (greedy k-means++ seeds, hard assignment, one M-step, then EM);
* scikit-learn: ``GaussianMixture(K, covariance_type="full", tol=1e-3,
  random_state=seed).fit(x)`` with its default init (k-means, one run, then EM).

Per seed the two run back to back (puregmm first), in the same process; the table gives the
wall and CPU seconds, the iterations, the init time of each (puregmm's ``pg.init``, timed on
its own; scikit-learn's ``_initialize_parameters``, timed on its own), and the final mean
log-likelihood of each fit on the whole data (``-pg.loss`` and ``GaussianMixture.score``).
The summary compares the means over seeds: the speed ratio, and the difference of the mean
log-likelihoods (the target: puregmm >= scikit-learn - 1e-3).

Usage::

    python benchmarks/bench_fit.py                          # N=1e6, D=32, K=32, seeds 0 1 2
    python benchmarks/bench_fit.py --n 2e5 --seeds 0 1 2    # a smaller config
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_em.py

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
from bench_em import DTYPES, problem

import puregmm as pg

TOL = 1e-3
MAX_ITER = 100


def timed(fn: Any) -> tuple[Any, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_puregmm(x: torch.Tensor, k: int, seed: int, init_method: str) -> dict[str, Any]:
    _, init_s, _ = timed(lambda: pg.init(x, k, "full", key=seed, method=init_method))
    r, wall, cpu = timed(
        lambda: pg.fit(x, k, "full", method="em", init_method=init_method, tol=TOL, max_steps=MAX_ITER, key=seed)
    )
    return {"wall": wall, "cpu": cpu, "iters": r.n_steps, "init": init_s, "ll": -float(r.loss), "conv": r.converged}


def run_sklearn(xn: np.ndarray, k: int, seed: int) -> dict[str, Any]:
    from sklearn.mixture import GaussianMixture

    def make() -> Any:
        return GaussianMixture(k, covariance_type="full", tol=TOL, max_iter=MAX_ITER, random_state=seed)

    probe = make()
    probe._check_parameters(xn)
    _, init_s, _ = timed(lambda: probe._initialize_parameters(xn, np.random.RandomState(seed)))
    gm, wall, cpu = timed(lambda: make().fit(xn))
    return {
        "wall": wall,
        "cpu": cpu,
        "iters": gm.n_iter_,
        "init": init_s,
        "ll": float(gm.score(xn)),
        "conv": gm.converged_,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    ap.add_argument("--init", default="kmeans++", choices=["kmeans++", "kmeans"], help="puregmm's init_method")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and numpy's BLAS")
    ap.add_argument("--no-peer", action="store_true", help="time puregmm only")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    warnings.simplefilter("ignore")
    n, d, k = int(args.n), args.d, args.k
    dtype = DTYPES[args.dtype]

    print(f"# End to end, full covariance, N={n:.0e}, D={d}, K={k}, {args.dtype}, tol={TOL}\n")
    print("command: " + _common.command_line())
    for line in _common.describe_machine(extra=["threadpoolctl"]):
        print(line)
    print(
        f"puregmm: pg.fit(method='em', init_method={args.init!r}); scikit-learn: GaussianMixture.fit (k-means init)\n"
    )
    header = ["seed", "contender", "wall s", "cpu s", "iters", "init s", "final mean log-lik", "converged"]
    rows: list[list[str]] = []
    res: dict[str, list[dict[str, Any]]] = {"puregmm": [], "sklearn": []}
    for seed in args.seeds:
        _, x = problem(n, d, k, "full", dtype, seed=100 + seed)
        out = {"puregmm": run_puregmm(x, k, seed, args.init)}
        if not args.no_peer:
            out["sklearn"] = run_sklearn(x.numpy(), k, seed)
        for who, r in out.items():
            res[who].append(r)
            row = [str(seed), who, f"{r['wall']:.2f}", f"{r['cpu']:.2f}", str(r["iters"]), f"{r['init']:.2f}"]
            rows.append([*row, f"{r['ll']:.6f}", str(r["conv"])])
            print(_common.markdown_table(header, [rows[-1]]).splitlines()[-1], flush=True)
        del x
    print("\n" + _common.markdown_table(header, rows))
    mean = {
        who: {key: float(np.mean([r[key] for r in rs])) for key in ("wall", "cpu", "iters", "ll")}
        for who, rs in res.items()
        if rs
    }
    lines = [
        f"puregmm mean: {mean['puregmm']['wall']:.2f} s wall, {mean['puregmm']['iters']:.1f} iterations, "
        f"log-lik {mean['puregmm']['ll']:.6f}"
    ]
    if "sklearn" in mean:
        sk, pg_ = mean["sklearn"], mean["puregmm"]
        lines.append(f"sklearn mean: {sk['wall']:.2f} s wall, {sk['iters']:.1f} iterations, log-lik {sk['ll']:.6f}")
        ok = "met" if pg_["ll"] >= sk["ll"] - 1e-3 else "NOT met"
        lines.append(
            f"speed-up of the mean wall time: {sk['wall'] / pg_['wall']:.1f}x (cpu {sk['cpu'] / pg_['cpu']:.1f}x); "
            f"mean log-lik difference puregmm - sklearn: {pg_['ll'] - sk['ll']:+.2e} (>= -1e-3: {ok})"
        )
        per_iter = sk["wall"] / max(sk["iters"], 1)
        lines.append(f"sklearn per EM iteration (wall, incl. init share): {per_iter:.2f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
