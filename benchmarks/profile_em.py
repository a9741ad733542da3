"""Where one EM iteration spends its time: ``torch.profiler``'s op table, largest self time first.

Two cases, the profiles quoted in the performance and composition notes:

* one unbatched ``pg.em_step`` on N points of the ``bench_em.py`` problem (``--config N,D,K``);
* one vmapped step over B datasets of ``bench_batched.py`` (``--batched B,N,D,K``), what
  ``pg.fit_batched`` runs per iteration.

Usage::

    python benchmarks/profile_em.py --config 1e6,32,32 --family full --dtype float32
    python benchmarks/profile_em.py --batched 1000,500,2,3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_em.py

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
from bench_batched import datasets
from bench_em import DTYPES, problem

import puregmm as pg
from puregmm.init import init_batched
from puregmm.methods import EMState, em_advance


def unbatched(config: str, family: str, dtype: torch.dtype) -> tuple[str, object]:
    n, d, k = (int(float(v)) for v in config.split(","))
    params, x = problem(n, d, k, family, dtype)
    return f"one em_step, N={n}, D={d}, K={k}, {family}, {dtype}", lambda: pg.em_step(params, x)


def batched(config: str, dtype: torch.dtype) -> tuple[str, object]:
    b, n, d, k = (int(float(v)) for v in config.split(","))
    xs = datasets(b, n, d, k, dtype)
    start = init_batched(xs, k, "full", keys=torch.arange(b), method="kmeans")
    zeros = torch.zeros(b, dtype=torch.int64)
    state = EMState(start, zeros, torch.zeros(b, dtype=dtype), zeros, zeros)
    kernel = torch.func.vmap(em_advance, in_dims=(0, 0, None))
    return f"one vmapped em_step over B={b} datasets, N={n}, D={d}, K={k}, full, {dtype}", lambda: kernel(
        state, xs, None
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="1e6,32,32", help="N,D,K of the unbatched case")
    ap.add_argument("--family", default="full", choices=["full", "tied", "diagonal", "isotropic"])
    ap.add_argument("--batched", default=None, help="B,N,D,K: profile the batched step instead")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, default=15, help="ops listed")
    ap.add_argument("--repeats", type=int, default=5, help="calls timed, and calls profiled")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    title, fn = batched(args.batched, dtype) if args.batched else unbatched(args.config, args.family, dtype)
    fn()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            fn()
    print(f"# {title}: {_common.median(times):.3f} s (median of {args.repeats} unprofiled calls)")
    print(f"# the table sums {args.repeats} profiled calls")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    for line in _common.describe_machine():
        print(line)
    print("command:", _common.command_line())


if __name__ == "__main__":
    main()
