"""The GMM start: ``pg.init`` against scikit-learn's, each with its own k-means.

scikit-learn's start is ``GaussianMixture._initialize_parameters``: ``KMeans(K, n_init=1,
random_state=seed).fit(X).labels_`` as one-hot responsibilities, then one M-step
(``_estimate_gaussian_parameters`` and the precision Cholesky factors); puregmm's is
``pg.init(x, K, family, key=seed)`` (k-means++ seeds, Lloyd as ``KMeans``, the one M-step), the
start of ``pg.fit(x, K, family, key=seed)``. Data: scikit-learn's bundled data sets,
standardised (``bench_realdata.load``).

* Time (default): one user call of each on a fresh input (made outside the timer), one thread
  for both, contenders interleaved call by call (alternating which goes first), the median over
  ``--rounds`` rounds and ``--seeds`` seeds; speed-up = scikit-learn / puregmm.
* ``--starts S``: whether the two starts are equally good in distribution. Over seeds 0..S-1:
  the k-means objective (inertia per sample) of each start's partition, and the mean
  log-likelihood per sample after EM from each start (both runs scikit-learn's
  ``GaussianMixture`` EM; puregmm's start passed as ``weights_init``/``means_init``/
  ``precisions_init``, which ends where ``pg.fit`` from its own init ends:
  ``bench_realdata``'s same-init check). ``diff`` = puregmm - scikit-learn with its standard error
  (the two starts draw independent random numbers, so the seeds are not paired).

Usage::

    python benchmarks/bench_init.py                                   # time, wine and digits
    python benchmarks/bench_init.py --datasets digits --families full diagonal --ks 5 10 20 --starts 200
"""

from __future__ import annotations

import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from bench_realdata import DATASETS, SK_TYPE, load  # noqa: E402

import puregmm as pg  # noqa: E402

REG_COVAR = 1e-6


def sk_start(x: np.ndarray, k: int, family: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's start: (labels, weights, means, precision Cholesky factors)."""
    from sklearn.cluster import KMeans
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky, _estimate_gaussian_parameters

    labels = KMeans(k, n_init=1, random_state=seed).fit(x).labels_
    resp = np.zeros((x.shape[0], k))
    resp[np.arange(x.shape[0]), labels] = 1.0
    nk, means, cov = _estimate_gaussian_parameters(x, resp, REG_COVAR, SK_TYPE[family])
    return labels, nk / x.shape[0], means, _compute_precision_cholesky(cov, SK_TYPE[family])


def time_case(x: np.ndarray, k: int, family: str, seeds: list[int], rounds: int) -> tuple[float, float]:
    """Median seconds per call of (puregmm, scikit-learn)."""
    pg_t: list[float] = []
    sk_t: list[float] = []
    for seed in seeds:
        for r in range(rounds):
            calls = [
                ("pg", lambda xt, s=seed: pg.init(xt, k, family, key=s)),
                ("sk", lambda xn, s=seed: sk_start(xn, k, family, s)),
            ]
            if r % 2:
                calls.reverse()
            for name, call in calls:
                arg: Any = torch.tensor(x) if name == "pg" else x.copy()  # fresh input, outside the timer
                t0 = time.perf_counter()
                call(arg)
                (pg_t if name == "pg" else sk_t).append(time.perf_counter() - t0)
    return _common.median(pg_t), _common.median(sk_t)


def inertia(x: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective per sample of a partition (each cluster about its mean)."""
    return sum(float(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum()) for j in np.unique(labels)) / len(x)


def nearest(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The partition of a start: each row to its nearest mean (same rule for both starts)."""
    return ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)


def em_from(x: np.ndarray, k: int, family: str, weights: Any, means: Any, prec: Any) -> float:
    """Mean log-likelihood per sample after scikit-learn's EM from the given start."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(
        k, covariance_type=SK_TYPE[family], tol=1e-3, max_iter=100, reg_covar=REG_COVAR,
        weights_init=weights, means_init=means, precisions_init=prec,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(gm.fit(x).score(x))


def starts_case(x: np.ndarray, k: int, family: str, n: int) -> dict[str, list[float]]:
    """Per seed: each start's k-means objective and log-likelihood after EM."""
    out: dict[str, list[float]] = {"inertia_pg": [], "inertia_sk": [], "ll_pg": [], "ll_sk": []}
    xt = torch.tensor(x)
    for seed in range(n):
        p = pg.init(xt, k, family, key=seed)
        out["inertia_pg"].append(inertia(x, nearest(x, p.means.numpy())))
        out["ll_pg"].append(em_from(x, k, family, pg.weights(p).numpy(), p.means.numpy(), pg.to_sklearn(p).precisions_))
        _, weights, means, chol = sk_start(x, k, family, seed)
        out["inertia_sk"].append(inertia(x, nearest(x, means)))
        out["ll_sk"].append(em_from(x, k, family, weights, means, _precisions(chol, family)))
    return out


def _precisions(chol: np.ndarray, family: str) -> np.ndarray:
    if SK_TYPE[family] == "full":
        return np.einsum("kij,klj->kil", chol, chol)
    if SK_TYPE[family] == "tied":
        return chol @ chol.T
    return chol**2


def mean_se(a: list[float]) -> tuple[float, float]:
    v = np.asarray(a)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["wine", "digits"], choices=DATASETS)
    ap.add_argument("--families", nargs="+", default=["full", "diagonal"], choices=tuple(SK_TYPE))
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 5, 10, 20])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="keys / random_state (time)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per seed")
    ap.add_argument("--starts", type=int, default=0, help="compare the starts over this many seeds (no timing)")
    cfg = ap.parse_args()
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    print("# The GMM start: pg.init vs scikit-learn's k-means initialisation\n")
    print(f"command: {_common.command_line()}")
    for line in _common.describe_machine():
        print(line)
    rows = []
    for name in cfg.datasets:
        x = load(name)
        for family in cfg.families:
            for k in cfg.ks:
                if cfg.starts:
                    r = starts_case(x, k, family, cfg.starts)
                    ip, isk = mean_se(r["inertia_pg"]), mean_se(r["inertia_sk"])
                    lp, lsk = mean_se(r["ll_pg"]), mean_se(r["ll_sk"])
                    diff, se = lp[0] - lsk[0], math.hypot(lp[1], lsk[1])
                    ci = [f"{v[0]:.3f} ± {v[1]:.3f}" for v in (ip, isk)]
                    rows.append(
                        [name, family, k, cfg.starts, *ci, f"{lp[0]:.3f}", f"{lsk[0]:.3f}", f"{diff:+.3f} ± {se:.3f}"]
                    )
                else:
                    t_pg, t_sk = time_case(x, k, family, cfg.seeds, cfg.rounds)
                    rows.append([name, family, k, f"{t_pg * 1e3:.3f}", f"{t_sk * 1e3:.3f}", f"{t_sk / t_pg:.2f}x"])
                print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    if cfg.starts:
        header = ["data", "family", "K", "seeds", "inertia pg", "inertia sk", "ll pg", "ll sk", "diff ± se"]
    else:
        header = ["data", "family", "K", "pg.init ms", "sklearn ms", "speed-up"]
    print()
    print(_common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
