"""Loss + gradient at mixture-density-network batch sizes, timed as an MDN user trains.

Protocol (issue 13): one thread for every contender, each call timed as a user makes it
(params rebuilt from leaf tensors that require grad, fresh data each round, default allocator,
no warm-up beyond the first call of the process), contenders interleaved, medians of rounds.

* puregmm: ``pg.loss(GMMParams(logits, means, scale, family), x).backward()``;
* MixtureSameFamily: ``(-MixtureSameFamily(Categorical(logits=...), MultivariateNormal(loc,
  scale_tril=...) | Independent(Normal(...), 1)).log_prob(x).mean()).backward()`` with torch's
  default argument validation, its factor built from the same raw leaves (its cheapest natural
  parametrisation; the two mixtures differ, the work does not);
* ``pg.step`` against ``torch.func.grad(pg.loss)`` on the same state (the functional path).

float32, full and diagonal. ``--ops`` prints, instead of times, the ATen operations one call
dispatches (forward and backward, counted below autograd by a ``TorchDispatchMode``): at these
sizes the cost is per operation, not per row. Usage::

    python benchmarks/bench_mdn.py
    python benchmarks/bench_mdn.py --rounds 50 --configs 256,2,5
    python benchmarks/bench_mdn.py --ops
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

import puregmm as pg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common


def leaves(n: int, d: int, k: int, family: str, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    logits = torch.randn(k, generator=g).requires_grad_()
    means = torch.randn(k, d, generator=g).requires_grad_()
    shape = (k, d, d) if family == "full" else (k, d)
    scale = (0.1 * torch.randn(*shape, generator=g)).requires_grad_()
    return x, logits, means, scale


def ours(family: str) -> Callable[..., None]:
    def run(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, scale: torch.Tensor) -> None:
        pg.loss(pg.GMMParams(logits, means, scale, family), x).backward()

    return run


def peer(family: str) -> Callable[..., None]:
    def run(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, scale: torch.Tensor) -> None:
        if family == "full":  # its cheapest natural parametrisation: a Cholesky factor from the raw leaves
            tril = torch.tril(scale, -1) + torch.diag_embed(torch.exp(torch.diagonal(scale, dim1=-2, dim2=-1)))
            comp = MultivariateNormal(means, scale_tril=tril)
        else:
            comp = Independent(Normal(means, torch.exp(-scale)), 1)
        (-MixtureSameFamily(Categorical(logits=logits), comp).log_prob(x).mean()).backward()

    return run


def step_pair(x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, scale: torch.Tensor, family: str) -> tuple:
    params = pg.GMMParams(logits.detach(), means.detach(), scale.detach(), family)
    state = pg.init_state(params)
    grad = torch.func.grad(pg.loss)
    return (lambda: pg.step(state, x)), (lambda: grad(params, x))


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["256,2,5", "1024,8,8", "4096,16,10"])
    ap.add_argument("--families", nargs="+", default=["full", "diagonal"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ops", action="store_true", help="print ATen operations per call instead of times")
    ap.add_argument(
        "--clock", choices=["wall", "thread"], default="wall",
        help="wall: perf_counter (the protocol); thread: this thread's CPU time (a check on a shared machine, "
        "where other processes preempt the calls)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"$ python benchmarks/bench_mdn.py {' '.join(sys.argv[1:])}")
    if args.ops:
        return print_ops(args.configs, args.families)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {cpu}, 1 thread, float32, {args.clock} clock")
    print(f"{'N, D, K':>12} {'family':>9} {'puregmm ms':>11} {'MSF ms':>8} {'speed-up':>9} {'step ms':>8} "
          f"{'grad ms':>8} {'step/grad':>9}")  # fmt: skip
    for config in args.configs:
        n, d, k = (int(v) for v in config.split(","))
        for family in args.families:
            times: dict[str, list[float]] = {"pg": [], "msf": [], "step": [], "grad": []}
            for r in range(args.rounds + 1):  # round 0: the process's first call, not counted
                x, *rest = leaves(n, d, k, family, seed=r)
                step_fn, grad_fn = step_pair(x, *rest, family)
                mine, theirs = ours(family), peer(family)
                calls = {
                    "pg": lambda x=x, rest=rest, f=mine: f(x, *rest),
                    "msf": lambda x=x, rest=rest, f=theirs: f(x, *rest),
                    "step": step_fn,
                    "grad": grad_fn,
                }
                for name, call in calls.items():
                    t0 = clock()
                    call()
                    if r:
                        times[name].append(clock() - t0)
            m = {name: median_ms(v) for name, v in times.items()}
            print(f"{config:>12} {family:>9} {m['pg']:11.3f} {m['msf']:8.3f} {m['msf'] / m['pg']:8.2f}x "
                  f"{m['step']:8.3f} {m['grad']:8.3f} {m['step'] / m['grad']:9.2f}", flush=True)  # fmt: skip


def print_ops(configs: list[str], families: list[str]) -> None:
    print(f"{'N, D, K':>12} {'family':>9} {'puregmm ops':>11} {'MSF ops':>8} {'step ops':>9} {'grad ops':>9}")
    for config in configs:
        n, d, k = (int(v) for v in config.split(","))
        for family in families:
            x, *rest = leaves(n, d, k, family, seed=0)
            step_fn, grad_fn = step_pair(x, *rest, family)
            counts = [_common.op_count(functools.partial(f, x, *rest)) for f in (ours(family), peer(family))]
            counts += [_common.op_count(step_fn), _common.op_count(grad_fn)]
            print(f"{config:>12} {family:>9} {counts[0]:11d} {counts[1]:8d} {counts[2]:9d} {counts[3]:9d}")


if __name__ == "__main__":
    main()
