"""One EM iteration: puregmm against scikit-learn (and gmmx where installed), from the same params.

Every contender starts from the same params (the generating mixture, projected onto the
family) on the same data and runs exactly one EM iteration (E-step + M-step):

* puregmm: ``pg.em_step(params, x)``;
* scikit-learn: ``GaussianMixture._e_step`` + ``_m_step`` on a model whose ``weights_``,
  ``means_``, ``covariances_`` and ``precisions_cholesky_`` are set to the same params in the
  data's dtype (reset before every call, so each call is the same iteration; ``fit`` would
  run k-means first, see /work/shared/FACTS.md);
* gmmx (optional, full and diagonal, float32 only; never a dependency): ``EMFitter(tol=0,
  max_iter=1).fit`` from the same params; skipped with a note when not installed.

Times are medians over interleaved rounds (one call of each contender per round, after one
warm-up round, each call after a pause that lets the other library's spinning worker threads go
idle), so load changes on a shared machine hit all contenders alike; CPU seconds of the
process are printed next to them. ``bound`` is the time of 4·N·K·D² flops (the two
[N, D] x [D, K·D]-sized GEMMs of a full-covariance iteration) at the GEMM peak of this
machine with two threads (100 GFLOP/s float64, 196 GFLOP/s float32; FACTS.md), and ``of
bound`` is bound / puregmm time (puregmm's E-step runs two GEMMs on the distinct products of
the lifted rows, about half those flops for the full family, so it can pass 100%; float32 data
run them in float32 where the error bound allows it, else in float64: puregmm/_precision.py).
``agree`` is the largest difference of the new means against scikit-learn's, relative to the
spread of the means. Peak memory is the peak resident memory above the loaded data of one
call, measured in a fresh subprocess.

``--fresh`` follows issue 13's protocol: every contender gets fresh copies of the data and
params before each timed call (made outside the timer), so no call reuses memory an earlier call
of the same contender left in the allocator's or the cache's hands.

Usage::

    python benchmarks/bench_em.py                        # the issue-4 table (about 10 min here)
    python benchmarks/bench_em.py --configs 1e5,16,16 --families full --dtype float32
    python benchmarks/bench_em.py --threads 1 --no-memory   # one thread for every contender
    python benchmarks/bench_em.py --configs 1e5,16,16 --dtype float32 --threads 1 --no-memory --fresh
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

# Idle OpenMP workers sleep instead of spinning: on a shared, oversubscribed machine spinning
# workers make every parallel op wait for a descheduled thread. Set before torch loads;
# OMP_WAIT_POLICY in the environment overrides it, and --omp-default leaves the library's
# default (spin briefly, then sleep), which scales better on an idle machine.
if "--omp-default" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import puregmm as pg

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PEAK_FLOPS = {torch.float64: 100e9, torch.float32: 196e9}  # GEMM peak, 2 threads (FACTS.md)
SK_TYPE = {"full": "full", "tied": "tied", "diagonal": "diag", "isotropic": "spherical"}
DEFAULT_RUNS = [
    ("1e5,16,16", "full"),
    ("1e6,32,32", "full"),
    ("1e6,32,32", "tied"),
    ("1e6,32,32", "diagonal"),
    ("1e6,32,32", "isotropic"),
]


def parse_config(text: str) -> tuple[int, int, int]:
    n, d, k = (int(float(v)) for v in text.split(","))
    return n, d, k


def problem(
    n: int, d: int, k: int, family: str, dtype: torch.dtype, seed: int = 0
) -> tuple[pg.GMMParams, torch.Tensor]:
    """N points from a K-component full-covariance mixture, and its params projected onto
    ``family`` (the starting point of every contender)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    means = 3.0 * torch.randn(k, d, generator=g, dtype=f64)
    a = torch.randn(k, d, d, generator=g, dtype=f64)
    cov = a @ a.mT / d + 0.5 * torch.eye(d, dtype=f64)
    chol = torch.linalg.cholesky(cov)
    x = torch.empty(n, d, dtype=dtype)
    for j in range(k):  # rows j, j+K, ... come from component j
        rows = len(range(j, n, k))
        x[j::k] = (means[j] + torch.randn(rows, d, generator=g, dtype=f64) @ chol[j].mT).to(dtype)
    if family == "tied":
        cov = cov.mean(0).expand(k, d, d)
    elif family == "diagonal":
        cov = torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    elif family == "isotropic":
        cov = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(d, dtype=f64)
    params = pg.from_moments(torch.full((k,), 1.0 / k, dtype=f64), means, cov, family=family)
    return params.to(dtype), x


def puregmm_fn(params: pg.GMMParams, x: torch.Tensor) -> Callable[[], Any]:
    return lambda: pg.em_step(params, x)


def sklearn_model(params: pg.GMMParams, dtype: torch.dtype) -> Any:
    """A GaussianMixture holding ``params`` in the data's dtype, ready for _e_step/_m_step."""
    from sklearn.mixture import GaussianMixture

    kind = SK_TYPE[params.family]
    k, d = params.n_components, params.dim
    npd = np.float64 if dtype == torch.float64 else np.float32
    cov = pg.covariances(params).double().numpy()
    chol = pg.precision_cholesky(params).double().numpy()  # [K, D, D] upper, precision = U U^T
    if kind == "tied":
        cov, chol = cov[0], chol[0]
    elif kind == "diag":
        cov, chol = np.diagonal(cov, axis1=1, axis2=2), np.diagonal(chol, axis1=1, axis2=2)
    elif kind == "spherical":
        cov, chol = np.diagonal(cov, axis1=1, axis2=2).mean(1), np.diagonal(chol, axis1=1, axis2=2).mean(1)
    gm = GaussianMixture(n_components=k, covariance_type=kind, reg_covar=1e-6)
    state = {
        "weights_": pg.weights(params).double().numpy().astype(npd),
        "means_": params.means.double().numpy().astype(npd),
        "covariances_": np.asarray(cov, dtype=npd),
        "precisions_cholesky_": np.asarray(chol, dtype=npd),
    }
    gm.n_features_in_ = d
    return gm, state


def sklearn_fn(params: pg.GMMParams, x: torch.Tensor) -> Callable[[], Any]:
    gm, state = sklearn_model(params, x.dtype)
    xn = x.numpy()

    def run() -> Any:
        for name, value in state.items():  # the same starting params every call
            setattr(gm, name, value)
        _, log_resp = gm._e_step(xn)
        gm._m_step(xn, log_resp)
        return gm

    return run


def gmmx_fn(params: pg.GMMParams, x: torch.Tensor) -> Callable[[], Any] | str:
    """gmmx's one EM iteration, or a string saying why it is not run."""
    if x.dtype != torch.float32 or params.family not in ("full", "diagonal"):
        return "n/a"
    try:
        import jax
        from gmmx import EMFitter, GaussianMixtureModelJax
    except ImportError:
        return "not installed"
    kind = "full" if params.family == "full" else "diag"
    cov = pg.covariances(params).numpy()
    if kind == "diag":
        cov = np.diagonal(cov, axis1=1, axis2=2)
    gmm = GaussianMixtureModelJax.from_squeezed(
        means=params.means.numpy(), covariances=cov, weights=pg.weights(params).numpy(), covariance_type=kind
    )
    xj = jax.numpy.asarray(x.numpy())
    fitter = EMFitter(tol=0.0, max_iter=1)
    return lambda: jax.block_until_ready(fitter.fit(x=xj, gmm=gmm))


def timed_rounds(
    makers: dict[str, Callable[[], Callable[[], Any]]], repeats: int, pause: float = 0.0, fresh: bool = False
) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call, contenders interleaved, after one warm-up round.

    ``makers`` build each contender's call; with ``fresh`` a new one (on fresh copies of the
    inputs) before every timed call, outside the timer. ``pause`` seconds of sleep before each
    call let the worker threads of the previous contender's library (OpenMP for torch, OpenBLAS
    for numpy; both spin for a while after a parallel region) go idle, so that they do not steal
    the cores of the next one.
    """
    fns = {name: make() for name, make in makers.items()}
    for fn in fns.values():
        fn()
    out: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, make in makers.items():
            fn = make() if fresh else fns[name]
            time.sleep(pause)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


def agreement(params: pg.GMMParams, x: torch.Tensor) -> float:
    """max |μ_puregmm - μ_sklearn| / spread of the means after one iteration."""
    ours = pg.em_step(params, x).means.double().numpy()
    theirs = sklearn_fn(params, x)().means_
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-300))


# --- peak memory in a fresh subprocess ------------------------------------------------------------


def child(job: dict[str, Any]) -> None:
    n, d, k = job["n"], job["d"], job["k"]
    dtype = DTYPES[job["dtype"]]
    torch.set_num_threads(job["threads"])
    params, x = problem(n, d, k, job["family"], dtype)
    fn = sklearn_fn(params, x) if job["who"] == "sklearn" else puregmm_fn(params, x)
    print(json.dumps(_common.measure_peak_here(fn)))


def fmt_mb(r: dict[str, Any]) -> str:
    return r["error"] if "error" in r else f"{r['above_mb']:.0f} MB"


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=None, help="N,D,K triples (default: the issue's runs)")
    ap.add_argument("--families", nargs="+", default=None, choices=sorted(SK_TYPE), help="with --configs")
    ap.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and numpy's BLAS (default: theirs)")
    ap.add_argument("--no-peer", action="store_true", help="time puregmm only")
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    ap.add_argument("--memory-config", default="1e6,32,32", help="N,D,K of the memory run (full, float64)")
    ap.add_argument("--omp-default", action="store_true", help="keep OpenMP's default wait policy (see above)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds of sleep before each timed call")
    ap.add_argument("--fresh", action="store_true", help="fresh copies of the inputs before each timed call")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    if args.configs is None:
        runs = [(parse_config(c), f) for c, f in DEFAULT_RUNS]
    else:
        runs = [(parse_config(c), f) for c in args.configs for f in (args.families or ["full"])]
    warnings.simplefilter("ignore")  # scikit-learn's convergence warnings from single iterations

    print("# One EM iteration from the same params: puregmm vs scikit-learn (vs gmmx if installed)\n")
    print("command: " + _common.command_line())
    for line in _common.describe_machine(extra=["threadpoolctl", "gmmx", "jax"]):
        print(line)
    print(
        "times: median seconds over interleaved rounds; cpu = process CPU seconds; "
        "bound = 4·N·K·D² flops at 100 (float64) / 196 (float32) GFLOP/s\n",
        flush=True,
    )
    header = ["N, D, K", "family", "dtype", "puregmm", "cpu", "sklearn", "cpu", "vs sklearn", "gmmx", "vs gmmx"]
    header += ["bound", "of bound", "agree"]
    rows = []
    for (n, d, k), family in runs:
        for dname in args.dtype:
            dtype = DTYPES[dname]
            params, x = problem(n, d, k, family, dtype)

            def copies(p: pg.GMMParams = params, x: torch.Tensor = x) -> tuple[pg.GMMParams, torch.Tensor]:
                if not args.fresh:
                    return p, x
                return pg.GMMParams(p.logits.clone(), p.means.clone(), p.scale.clone(), p.family), x.clone()

            makers: dict[str, Callable[[], Callable[[], Any]]] = {"puregmm": lambda: puregmm_fn(*copies())}
            if not args.no_peer:
                makers["sklearn"] = lambda: sklearn_fn(*copies())
                g = gmmx_fn(params, x)
                if not isinstance(g, str):
                    makers["gmmx"] = lambda: gmmx_fn(*copies())  # type: ignore[return-value]
                gmmx_note = g if isinstance(g, str) else ""
            t = timed_rounds(makers, args.repeats, args.pause, args.fresh)
            med = {name: _common.median(v["wall"]) for name, v in t.items()}
            cpu = {name: _common.median(v["cpu"]) for name, v in t.items()}
            bound = 4 * n * k * d * d / PEAK_FLOPS[dtype]
            ours = med["puregmm"]
            row = [f"{n:.0e}, {d}, {k}", family, dname, f"{ours:.3f}", f"{cpu['puregmm']:.2f}"]
            if args.no_peer:
                row += ["-", "-", "-", "-", "-"]
            else:
                row += [f"{med['sklearn']:.3f}", f"{cpu['sklearn']:.2f}", f"{med['sklearn'] / ours:.1f}x"]
                row += [f"{med['gmmx']:.3f}", f"{med['gmmx'] / ours:.1f}x"] if "gmmx" in med else [gmmx_note, "-"]
            row += [f"{bound:.3f}", f"{bound / ours:.0%}"]
            row.append("-" if args.no_peer else f"{agreement(params, x):.0e}")
            rows.append(row)
            print(_common.markdown_table(header, [row]).splitlines()[-1], flush=True)
            del params, x, makers
    print("\n" + _common.markdown_table(header, rows))

    if not args.no_memory:
        n, d, k = parse_config(args.memory_config)
        threads = torch.get_num_threads()
        print(f"\nPeak resident memory above the loaded data, one full float64 iteration at N={n:.0e}, D={d}, K={k}")
        data_mb = n * d * 8 / _common.MB
        mrows = []
        for who in ["puregmm"] + ([] if args.no_peer else ["sklearn"]):
            job = {"who": who, "n": n, "d": d, "k": k, "dtype": "float64", "family": "full", "threads": threads}
            r = _common.peak_in_subprocess(os.path.abspath(__file__), job)
            mrows.append([who, f"{data_mb:.0f} MB", fmt_mb(r), f"{r.get('seconds', float('nan')):.2f}"])
        print(_common.markdown_table(["contender", "data", "peak above data", "seconds"], mrows))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == _common.CHILD_FLAG:
        child(json.loads(sys.argv[2]))
    else:
        main()
