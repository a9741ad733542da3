"""Real data: ``pg.fit`` against scikit-learn's ``GaussianMixture.fit``, each from its own init.

The data sets ship with scikit-learn (nothing is downloaded), each standardised per column
(``StandardScaler``): iris (150 x 4), wine (178 x 13), breast cancer (569 x 30), digits
(1797 x 64) and digits-pca16 (the standardised digits projected on their first 16 principal
components, then standardised again). For every data set, family (full, diagonal, tied,
isotropic = scikit-learn's spherical), K and seed:

* puregmm: ``pg.fit(x, K, family, method="em", key=seed, tol=, max_steps=, reg_covar=)``;
* scikit-learn: ``GaussianMixture(K, covariance_type=..., tol=, max_iter=, reg_covar=,
  random_state=seed).fit(x)``;

each with its own default initialisation (k-means++ seeds, then Lloyd, then one M-step), timed
end to end as a user calls it. Protocol (issue 13): one thread for every contender
(``OMP_NUM_THREADS=1`` and friends set before numpy and torch load, ``torch.set_num_threads(1)``,
``threadpoolctl`` limits); fresh input arrays every call (made outside the timer); no warm-up but
the first call of the process (one untimed call of each contender on iris); contenders
interleaved call by call (alternating which goes first), ``--rounds`` rounds; a seed's time is
the median of its rounds, a case's time the mean over ``--seeds`` seeds, speed-up = scikit-learn
time / puregmm time (above 1: puregmm faster).

Likelihood: the mean log-likelihood per sample of each fitted model on the data, both computed
by scikit-learn's ``score`` (puregmm's params through ``pg.to_sklearn``), averaged over seeds;
``diff`` = puregmm - scikit-learn (above 0: puregmm better), ``se`` its standard error over the
seeds, ``worst`` its lowest single seed. Both inits are random (k-means++ draws): on the digits
a single seed's likelihood spreads by 2-4 nats per sample (whether a component lands on a pixel
that is constant among its points, where its variance drops to ``reg_covar``), so a case's
``diff`` over 3 seeds has a standard error of ~2 nats there; over 100+ seeds the two k-means
starts give the same k-means objective distribution and likelihoods within ~0.5 nats.

Same init (``--same-init``: the first seed of each case, the default; every seed; or none):
scikit-learn is also given puregmm's start ``pg.init(x, K, family, key=seed)`` as
``weights_init``, ``means_init`` and ``precisions_init`` (and ``init_params="random_from_data"``
so it runs no k-means of its own) and puregmm ``init_params=`` the same params; both must end at
the same likelihood (|difference| <= 1e-8, untimed; the issue-8 exactness).

Usage::

    python benchmarks/bench_realdata.py                  # every case (about 10 min here)
    python benchmarks/bench_realdata.py --quick          # a smoke run (well under a minute)
    python benchmarks/bench_realdata.py --datasets digits --families full diagonal --ks 5 10 20 --seeds 0 1 2
    python benchmarks/bench_realdata.py --json out.json  # also write every record
"""

from __future__ import annotations

import os
import sys

# One thread for every contender, fixed before numpy and torch create their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import puregmm as pg  # noqa: E402

DATASETS = ("iris", "wine", "breast_cancer", "digits", "digits-pca16")
FAMILIES = ("full", "diagonal", "tied", "isotropic")
SK_TYPE = {"full": "full", "diagonal": "diag", "tied": "tied", "isotropic": "spherical"}
KS = (2, 5, 10, 20)
SAME_INIT_TOL = 1e-8
QUICK = {"datasets": ["iris", "wine", "digits-pca16"], "families": ["full", "diagonal"], "ks": [2, 10]}


def load(name: str) -> np.ndarray:
    """The standardised data set [N, D] float64 (C-contiguous)."""
    from sklearn import datasets
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    loaders = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }
    base = name.split("-")[0]
    x = StandardScaler().fit_transform(loaders[base]().data.astype(np.float64))
    if name.endswith("-pca16"):
        x = StandardScaler().fit_transform(PCA(16, svd_solver="full").fit_transform(x))
    return np.ascontiguousarray(x, dtype=np.float64)


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of either library
        return fn(*args, **kwargs)


def sk_model(k: int, family: str, seed: int, cfg: argparse.Namespace, **init: Any) -> Any:
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(
        k,
        covariance_type=SK_TYPE[family],
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        reg_covar=cfg.reg_covar,
        random_state=seed,
        **init,
    )


def run_pg(x: np.ndarray, k: int, family: str, seed: int, cfg: argparse.Namespace, start: Any = None) -> Any:
    """One user call of ``pg.fit`` on a fresh tensor; (seconds, result)."""
    xt = torch.tensor(x)  # fresh tensor, made outside the timer
    t0 = time.perf_counter()
    r = quiet(
        pg.fit,
        xt,
        k,
        family,
        method="em",
        key=seed,
        tol=cfg.tol,
        max_steps=cfg.max_iter,
        reg_covar=cfg.reg_covar,
        init_params=start,
    )
    return time.perf_counter() - t0, r


def run_sk(x: np.ndarray, k: int, family: str, seed: int, cfg: argparse.Namespace, **init: Any) -> Any:
    """One user call of ``GaussianMixture.fit`` on a fresh array; (seconds, model)."""
    xn = x.copy()  # fresh array, made outside the timer
    gm = sk_model(k, family, seed, cfg, **init)
    t0 = time.perf_counter()
    quiet(gm.fit, xn)
    return time.perf_counter() - t0, gm


def pg_score(params: pg.GMMParams, x: np.ndarray) -> float:
    """Mean log-likelihood per sample of puregmm's params, by scikit-learn's ``score``."""
    return float(pg.to_sklearn(params).score(x))


def same_init(x: np.ndarray, k: int, family: str, seed: int, cfg: argparse.Namespace) -> dict[str, Any]:
    """Both contenders from ``pg.init(x, K, family, key=seed)``: final likelihoods and iterations."""
    start = pg.init(torch.tensor(x), k, family, key=seed, reg_covar=cfg.reg_covar)
    gm0 = pg.to_sklearn(start)
    prec = gm0.precisions_
    if family in ("full", "tied"):
        prec = 0.5 * (prec + np.swapaxes(prec, -1, -2))  # exactly symmetric, as scikit-learn checks
    init = {
        "init_params": "random_from_data",
        "weights_init": gm0.weights_,
        "means_init": gm0.means_,
        "precisions_init": prec,
    }
    _, r = run_pg(x, k, family, seed, cfg, start=start)
    _, gm = run_sk(x, k, family, seed, cfg, **init)
    ll_pg, ll_sk = pg_score(r.params, x), float(gm.score(x))
    return {"ll_pg": ll_pg, "ll_sk": ll_sk, "absdiff": abs(ll_pg - ll_sk), "it_pg": r.n_steps, "it_sk": gm.n_iter_}


def run_case(x: np.ndarray, k: int, family: str, cfg: argparse.Namespace) -> dict[str, Any]:
    """Timed rounds of both contenders over the seeds, interleaved call by call."""
    times: dict[str, dict[int, list[float]]] = {"pg": {s: [] for s in cfg.seeds}, "sk": {s: [] for s in cfg.seeds}}
    out: dict[str, dict[int, Any]] = {"pg": {}, "sk": {}}
    for rnd in range(cfg.rounds):
        for seed in cfg.seeds:
            order = ("pg", "sk") if (rnd + seed) % 2 == 0 else ("sk", "pg")
            for who in order:
                fn = run_pg if who == "pg" else run_sk
                sec, res = fn(x, k, family, seed, cfg)
                times[who][seed].append(sec)
                out[who].setdefault(seed, res)
    seeds = []
    for seed in cfg.seeds:
        r, gm = out["pg"][seed], out["sk"][seed]
        rec = {
            "seed": seed,
            "t_pg": _common.median(times["pg"][seed]),
            "t_sk": _common.median(times["sk"][seed]),
            "ll_pg": pg_score(r.params, x),
            "ll_sk": float(gm.score(x)),
            "it_pg": int(r.n_steps),
            "it_sk": int(gm.n_iter_),
        }
        if cfg.same_init == "all" or (cfg.same_init == "first" and seed == cfg.seeds[0]):
            rec["same_init"] = same_init(x, k, family, seed, cfg)
        seeds.append(rec)
    t_pg = float(np.mean([s["t_pg"] for s in seeds]))
    t_sk = float(np.mean([s["t_sk"] for s in seeds]))
    diffs = [s["ll_pg"] - s["ll_sk"] for s in seeds]
    case = {
        "t_pg": t_pg,
        "t_sk": t_sk,
        "speedup": t_sk / t_pg,
        "ll_pg": float(np.mean([s["ll_pg"] for s in seeds])),
        "ll_sk": float(np.mean([s["ll_sk"] for s in seeds])),
        "diff": float(np.mean(diffs)),
        "worst": float(min(diffs)),
        "se": float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan"),
        "it_pg": float(np.mean([s["it_pg"] for s in seeds])),
        "it_sk": float(np.mean([s["it_sk"] for s in seeds])),
        "seeds": seeds,
    }
    if cfg.same_init != "none":
        case["same_init_max"] = max(s["same_init"]["absdiff"] for s in seeds if "same_init" in s)
    return case


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


HEADER = ["data", "family", "K", "puregmm ms", "sklearn ms", "speed-up", "iters pg/sk"]
HEADER += ["ll puregmm", "ll sklearn", "diff", "± se", "worst seed", "same init |Δ|"]
WIDTHS = [13, 9, 3, 10, 10, 8, 11, 10, 10, 7, 6, 10, 13]


def table_line(cells: list[str]) -> str:
    """One markdown table line, columns padded to ``WIDTHS`` (rows print as they are measured)."""
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, WIDTHS, strict=True)) + " |"


def row(name: str, family: str, k: int, c: dict[str, Any]) -> list[str]:
    same = f"{c['same_init_max']:.1e}" if "same_init_max" in c else "-"
    return [
        name,
        family,
        str(k),
        f"{c['t_pg'] * 1e3:.1f}",
        f"{c['t_sk'] * 1e3:.1f}",
        f"{c['speedup']:.2f}x",
        f"{c['it_pg']:.1f}/{c['it_sk']:.1f}",
        f"{c['ll_pg']:.3f}",
        f"{c['ll_sk']:.3f}",
        f"{c['diff']:+.3f}",
        "-" if math.isnan(c["se"]) else f"{c['se']:.2f}",
        f"{c['worst']:+.3f}",
        same,
    ]


def summary(cases: list[dict[str, Any]], datasets: list[str]) -> list[str]:
    lines = []
    srows = []
    for name in [*datasets, "all"]:
        cs = [c for c in cases if name in ("all", c["data"])]
        if not cs:
            continue
        diffs = [c["diff"] for c in cs]
        srows.append(
            [
                name,
                str(len(cs)),
                f"{geomean([c['speedup'] for c in cs]):.2f}x",
                f"{min(c['speedup'] for c in cs):.2f}x",
                str(sum(c["speedup"] < 1 for c in cs)),
                f"{np.mean(diffs):+.3f}",
                f"{min(diffs):+.3f}",
                str(sum(d < -1 for d in diffs)),
            ]
        )
    lines.append(
        _common.markdown_table(
            ["data", "cases", "geomean speed-up", "lowest", "pg slower", "mean diff", "worst diff", "diff < -1"],
            srows,
        )
    )
    slow = sorted(cases, key=lambda c: c["speedup"])[:5]
    lines.append(
        "slowest cases (speed-up): "
        + ", ".join(f"{c['data']} {c['family']} K={c['k']} {c['speedup']:.2f}x" for c in slow)
    )
    if "same_init_max" in cases[0]:
        worst = max(c["same_init_max"] for c in cases)
        n_bad = sum(c["same_init_max"] > SAME_INIT_TOL for c in cases)
        lines.append(
            f"same init: largest |ll puregmm - ll sklearn| {worst:.1e} over {len(cases)} cases; "
            f"{n_bad} cases above {SAME_INIT_TOL:.0e}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=None, choices=DATASETS)
    ap.add_argument("--families", nargs="+", default=None, choices=FAMILIES)
    ap.add_argument("--ks", nargs="+", type=int, default=None, help=f"components (default {' '.join(map(str, KS))})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="keys / random_state per case")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per seed (median)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--reg-covar", type=float, default=1e-6)
    ap.add_argument(
        "--same-init",
        choices=("first", "all", "none"),
        default="first",
        help="seeds of each case that run the same-init check (default: the first)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 data sets, full/diagonal, K 2 and 10, 1 seed")
    ap.add_argument("--json", default=None, help="write every record to this file")
    cfg = ap.parse_args(argv)
    if cfg.quick:
        cfg.datasets = cfg.datasets or QUICK["datasets"]
        cfg.families = cfg.families or QUICK["families"]
        cfg.ks = cfg.ks or QUICK["ks"]
        cfg.seeds, cfg.rounds = cfg.seeds[:1], min(cfg.rounds, 2)
    datasets = cfg.datasets or list(DATASETS)
    families = cfg.families or list(FAMILIES)
    ks = cfg.ks or list(KS)

    torch.set_num_threads(1)
    import sklearn.mixture  # noqa: F401  (load its BLAS and OpenMP before limiting them)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)

    print("# Real data: pg.fit vs GaussianMixture.fit, each from its own k-means init, end to end\n")
    print("command: " + _common.command_line())
    for line in _common.describe_machine(extra=["threadpoolctl"]):
        print(line)
    print(
        f"EM: tol={cfg.tol}, max_iter={cfg.max_iter}, reg_covar={cfg.reg_covar}, n_init=1; seeds {cfg.seeds}, "
        f"{cfg.rounds} rounds; times: mean over seeds of the median of rounds; speed-up = sklearn / puregmm; "
        "ll: mean log-likelihood per sample (scikit-learn's score for both), diff = puregmm - sklearn\n",
        flush=True,
    )
    data = {name: load(name) for name in datasets}
    # the first call of the process (imports, allocator, dispatch caches): the only untimed one
    first = load("iris")
    t_pg, _ = run_pg(first, 2, "full", 0, cfg)
    t_sk, _ = run_sk(first, 2, "full", 0, cfg)
    print(f"first call of the process (not counted): puregmm {t_pg * 1e3:.0f} ms, sklearn {t_sk * 1e3:.0f} ms\n")

    t_start = time.perf_counter()
    cases = []
    for name in datasets:
        x = data[name]
        print(f"## {name}: N={x.shape[0]}, D={x.shape[1]}\n")
        print(table_line(HEADER))
        print("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|", flush=True)
        for family in families:
            for k in ks:
                if k > x.shape[0]:
                    continue
                c = run_case(x, k, family, cfg)
                c.update(data=name, family=family, k=k, n=x.shape[0], d=x.shape[1])
                cases.append(c)
                print(table_line(row(name, family, k, c)), flush=True)
        print()
    print(f"## Summary ({time.perf_counter() - t_start:.0f} s of benchmark)\n")
    for line in summary(cases, datasets):
        print(line)
    if cfg.json:
        meta = {"command": _common.command_line(), "machine": _common.describe_machine(extra=["threadpoolctl"])}
        with open(cfg.json, "w") as f:
            json.dump({"meta": meta, "config": vars(cfg), "cases": cases}, f, indent=1)
        print(f"\nrecords written to {cfg.json}")


if __name__ == "__main__":
    main()
