"""Missing values (issue 15): EM with missing entries against the complete-data iteration, and
imputation of scikit-learn's digits against column means, KNNImputer and IterativeImputer.

Part 1, EM. One ``pg.em_step`` on (N, D, K) data (default (1e5, 16, 16), full, float64) from
the same params: complete data, and the same data with entries removed, ``observed=`` the plan
of the mask made once (as a fit does: its time is printed apart). Two patterns of missingness:

* ``mcar``: 10 % of the entries missing completely at random: about 2^D patterns are possible
  (3,887 at the default size), but most rows miss 1-3 entries, so the patterns of J missing
  entries number at most C(D, J) and rows share them; the frequent patterns (at least 256
  rows) are consecutive runs, the other rows are grouped by J;
* ``blocks``: 10 % of the entries missing as whole blocks of D/4 columns (a sensor or a
  questionnaire page missing): 5 patterns, every row in a run.

The masked step (puregmm/_missing_mode.py, _missing_blocks.py) is the complete step's GEMMs on
the rows filled at the centre plus the missing block's terms in precision-block form: each
pattern's J×J blocks P_mm factorised once per E-step, not once per row; a run of one pattern by
GEMMs of its columns; the other rows by one small GEMM per missing dimension and gathered J×J
algebra.

Times are medians of interleaved rounds (the complete and the masked step alternate, so load
changes on the shared machine hit both). ``peak MB`` is the peak resident memory above the
loaded data of one step, in a fresh subprocess; ``[N, K] MB`` is the size of one [N, K] float64
array for comparison: neither step holds anything of size N × K; the masked one holds, besides
its chunks, the rows regrouped by pattern and their mask (O(N·D), like the data), each row's
pattern id (O(N)) and the tables of the patterns' factors (at most ``TABLE_BYTES``, 8 MB).
The issue-13 protocol is one thread per contender: ``--threads 1``.

Part 2, imputation of digits (1797 8×8 images, pixels 0-16): 1500 training images, 297 test
images with 30 % of their pixels removed at random. puregmm fits a 10-component full mixture
(reg_covar=1: some pixels are always 0) and fills each test image with E[x_missing | x_observed]
(``pg.impute``); scikit-learn's imputers are fitted on the same training images. ``train``
says whether the training images are complete or also miss 30 % of their pixels (puregmm then
fits with ``missing="marginalize"``, EM for incomplete data). RMSE over the removed pixels;
seconds of fit + imputation.

Usage::

    python benchmarks/bench_missing.py                   # both parts (a few minutes here)
    python benchmarks/bench_missing.py --part em --threads 1 --repeats 7
    python benchmarks/bench_missing.py --part em --n 20000 --repeats 3
    python benchmarks/bench_missing.py --part impute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    CHILD_FLAG,
    MB,
    command_line,
    describe_machine,
    interleaved_times,
    markdown_table,
    measure_peak_here,
    median,
    peak_in_subprocess,
)

import puregmm as pg
from puregmm import _masked


def em_problem(n: int, d: int, k: int, kind: str, seed: int = 0) -> tuple[Any, ...]:
    """(params, complete x, x with NaN, mask) from a K-component mixture; ``kind`` mcar|blocks."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    x = centres[torch.arange(n) % k] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    if kind == "mcar":
        observed = torch.rand(n, d, generator=gen) >= 0.1
    else:  # 40 % of the rows miss one of 4 blocks of D/4 columns: 10 % of the entries
        block = torch.randint(0, 4, (n,), generator=gen)
        hit = torch.rand(n, generator=gen) < 0.4
        cols = torch.arange(d) * 4 // d  # [D]: the block of each column
        observed = ~(hit.unsqueeze(1) & (cols.unsqueeze(0) == block.unsqueeze(1)))
    params = pg.init(x, k, "full", key=seed)
    return params, x, torch.where(observed, x, torch.nan), observed


def em_rows(args: argparse.Namespace) -> list[list[str]]:
    return [_em_row(args, kind) for kind in args.kinds.split(",")]


def _em_row(args: argparse.Namespace, kind: str) -> list[str]:
    params, x, holes, observed = em_problem(args.n, args.d, args.k, kind)
    t0 = time.perf_counter()
    plan = _masked.plan(observed)
    plan_s = time.perf_counter() - t0
    groups: dict[str, int] = {}
    for s in plan.segments:
        groups[s.kind] = groups.get(s.kind, 0) + s.stop - s.start
    n_patterns = int(torch.unique(observed, dim=0).shape[0])
    times = interleaved_times(
        {"complete": lambda: pg.em_step(params, x), "missing": lambda: pg.em_step(params, holes, observed=plan)},
        repeats=args.repeats,
    )
    tc, tm = median(times["complete"]), median(times["missing"])
    job = {"n": args.n, "d": args.d, "k": args.k, "kind": kind}
    peak = {} if args.no_memory else peak_in_subprocess(__file__, job)
    base = {} if args.no_memory else peak_in_subprocess(__file__, {**job, "complete": True})
    grouped = ", ".join(f"{v} {k_}" for k_, v in groups.items())
    return [
        kind, f"{float(observed.logical_not().float().mean()):.1%}", str(n_patterns), grouped,
        f"{plan_s:.3f}", f"{tc:.3f}", f"{tm:.3f}", f"{tm / tc:.2f}x",
        "n/a" if "above_mb" not in base else f"{base['above_mb']:.0f}",
        "n/a" if "above_mb" not in peak else f"{peak['above_mb']:.0f}", f"{args.n * args.k * 8 / MB:.1f}",
    ]  # fmt: skip


def child(job: dict[str, Any]) -> None:
    """Peak memory of one masked EM step (run in a fresh process)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    params, x, holes, observed = em_problem(job["n"], job["d"], job["k"], job["kind"])
    if job.get("complete"):
        pg.em_step(params, x[:1000])  # warm up the code paths
        print(json.dumps(measure_peak_here(lambda: pg.em_step(params, x))))
        return
    plan = _masked.plan(observed)
    pg.em_step(params, holes[:1000], observed=observed[:1000])
    print(json.dumps(measure_peak_here(lambda: pg.em_step(params, holes, observed=plan))))


# --- part 2: imputation of digits -------------------------------------------------------------------


def impute_rows(args: argparse.Namespace) -> list[list[str]]:
    from sklearn.datasets import load_digits

    data = torch.as_tensor(load_digits().data, dtype=torch.float64)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train, test = data[perm[:1500]], data[perm[1500:]]
    rng = np.random.default_rng(0)
    gone = torch.as_tensor(rng.random(test.shape) < 0.3)
    gone_train = torch.as_tensor(rng.random(train.shape) < 0.3)
    holey = torch.where(gone, torch.nan, test)

    def rmse(guess: Any) -> float:
        return float(((torch.as_tensor(guess) - test)[gone] ** 2).mean().sqrt())

    rows = []
    for name in ("complete", "30 % missing"):
        fit_on = train if name == "complete" else torch.where(gone_train, torch.nan, train)
        for label, fn in _imputers(fit_on, holey, gone, args.em_steps).items():
            t0 = time.perf_counter()
            out = fn()
            rows.append([name, label, f"{rmse(out):.3f}", f"{time.perf_counter() - t0:.2f}"])
    return rows


def _imputers(fit_on: torch.Tensor, holey: torch.Tensor, gone: torch.Tensor, em_steps: int) -> dict[str, Any]:
    """Each contender: fit on ``fit_on`` (NaN = missing), then fill ``holey``'s NaN entries."""
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer

    arr, hol = fit_on.numpy(), holey.numpy()

    def mixture() -> Any:
        fitted = pg.fit(fit_on, 10, "full", key=0, reg_covar=1.0, missing="marginalize", max_steps=em_steps)
        return pg.impute(fitted.params, holey)

    return {
        "column means": lambda: torch.where(gone, torch.as_tensor(np.nanmean(arr, 0)).expand_as(holey), holey),
        "KNNImputer (k=5)": lambda: KNNImputer(n_neighbors=5).fit(arr).transform(hol),
        "IterativeImputer": lambda: IterativeImputer(max_iter=10, random_state=0).fit(arr).transform(hol),
        "puregmm (K=10, full)": mixture,
    }


def main() -> None:
    if CHILD_FLAG in sys.argv:
        child(json.loads(sys.argv[sys.argv.index(CHILD_FLAG) + 1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("em", "impute", "both"), default="both")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--kinds", default="mcar,blocks", help="missingness patterns: mcar, blocks")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--em-steps", type=int, default=100, help="EM step limit of the digits fits")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["BENCH_THREADS"] = str(args.threads)
    print("\n".join([command_line(), *describe_machine()]))
    if args.part in ("em", "both"):
        print(f"\n## EM iteration with missing entries, (N, D, K) = ({args.n}, {args.d}, {args.k}), full, float64\n")
        header = ["missing", "entries", "patterns", "rows by group", "plan s", "complete s", "masked s", "ratio",
                  "complete peak MB", "masked peak MB", "[N, K] MB"]  # fmt: skip
        print(markdown_table(header, em_rows(args)))
    if args.part in ("impute", "both"):
        print("\n## Imputing digits: 30 % of the test pixels removed (RMSE on them, 0-16 scale)\n")
        print(markdown_table(["train", "imputer", "RMSE", "seconds"], impute_rows(args)))


if __name__ == "__main__":
    main()
