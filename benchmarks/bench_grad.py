"""Loss + gradient for gradient descent: puregmm against ``torch.distributions.MixtureSameFamily``.

Both contenders get the same full-covariance params and data and compute the mean negative
log-likelihood and its gradient with respect to every parameter:

* puregmm: ``torch.func.grad_and_value(pg.loss)(params, x)`` (what ``pg.step`` runs);
* MixtureSameFamily: ``Categorical(logits)`` and ``MultivariateNormal(loc, scale_tril)`` with
  leaves that require grad, ``-log_prob(x).mean()`` and ``torch.autograd.grad`` (its cheapest
  natural parametrisation; the conversion from puregmm's params is not timed).

Times are medians over interleaved rounds after one warm-up call (``OMP_WAIT_POLICY=PASSIVE``
unless set: on a shared machine spinning OpenMP workers distort both contenders). Peak memory is
the peak resident memory above the loaded data, measured in a fresh subprocess per contender
(one call, so first-call library initialisation is included). The peer is never started where
an estimate of its memory (5 x N·K·D·itemsize, refined by a probe at N = 10 000) exceeds
``--peer-mem-limit``; the estimate is printed instead.

Usage::

    python benchmarks/bench_grad.py                       # (1e5, 16, 16) and (1e6, 32, 32), float32
    python benchmarks/bench_grad.py --dtype float64 --configs 1e6,32,32 --no-peer
    python benchmarks/bench_grad.py --configs 1e5,16,16 --compile   # + torch.compile first/steady
    python benchmarks/bench_grad.py --threads 1 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

# Idle OpenMP workers sleep instead of spinning: on a shared, oversubscribed machine spinning
# workers make every parallel op wait for a descheduled thread (measured 10-50x slower runs).
# Set before torch loads; OMP_WAIT_POLICY=ACTIVE in the environment overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

import puregmm as pg

PROBE_ROWS = 10_000
#: MixtureSameFamily's peak memory in units of one [N, K, D] tensor (measured: ~20 GB at
#: N=1e6, D=K=32, float32); a guard so that the peer is never started where it cannot fit.
MSF_BYTES_PER_NKD = 5
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_config(text: str) -> tuple[int, int, int]:
    n, d, k = (int(float(v)) for v in text.split(","))
    return n, d, k


def problem(n: int, d: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[pg.GMMParams, torch.Tensor]:
    """Params of a well-separated full-covariance mixture and N points drawn from it."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    means = 3.0 * torch.randn(k, d, generator=g, dtype=f64)
    a = torch.randn(k, d, d, generator=g, dtype=f64)
    cov = a @ a.mT / d + 0.5 * torch.eye(d, dtype=f64)
    params = pg.from_moments(torch.full((k,), 1.0 / k, dtype=f64), means, cov, family="full").to(dtype)
    chol = torch.linalg.cholesky(cov)
    x = torch.empty(n, d, dtype=dtype)
    for j in range(k):  # rows j, j+K, ... come from component j
        rows = len(range(j, n, k))
        x[j::k] = (means[j] + torch.randn(rows, d, generator=g, dtype=f64) @ chol[j].mT).to(dtype)
    return params, x


def puregmm_fn(params: pg.GMMParams, x: torch.Tensor) -> Any:
    grad_and_value = torch.func.grad_and_value(pg.loss)
    return lambda: grad_and_value(params, x)


def msf_fn(params: pg.GMMParams, x: torch.Tensor) -> Any:
    from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

    logits = params.logits.detach().clone().requires_grad_(True)
    loc = params.means.detach().clone().requires_grad_(True)
    tril = torch.linalg.cholesky(pg.covariances(params)).detach().clone().requires_grad_(True)

    def run() -> tuple[Any, torch.Tensor]:
        mix = MixtureSameFamily(
            Categorical(logits=logits, validate_args=False),
            MultivariateNormal(loc, scale_tril=tril, validate_args=False),
            validate_args=False,
        )
        value = -mix.log_prob(x).mean()
        return torch.autograd.grad(value, [logits, loc, tril]), value.detach()

    return run


IMPLS = {"puregmm": puregmm_fn, "MixtureSameFamily": msf_fn}


def child(job: dict[str, Any]) -> None:
    """Subprocess entry: build the data, then measure one loss+gradient call's peak memory."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    params, x = problem(job["n"], job["d"], job["k"], DTYPES[job["dtype"]])
    fn = IMPLS[job["impl"]](params, x)
    result = _common.measure_peak_here(fn)
    result["data_mb"] = x.numel() * x.element_size() / _common.MB
    print(json.dumps(result))


def peak(job: dict[str, Any]) -> dict[str, Any]:
    return _common.peak_in_subprocess(os.path.abspath(__file__), job)


def fmt_mb(r: dict[str, Any]) -> str:
    if "above_mb" in r:
        return f"{r['above_mb']:.0f}"
    return r["note"] if "note" in r else f"failed ({r.get('error', '?')})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["1e5,16,16", "1e6,32,32"], help="N,D,K triples")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-peer", action="store_true", help="skip MixtureSameFamily")
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    ap.add_argument("--peer-mem-limit", type=float, default=4.0, help="GB; above it the peer is not run")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (first call and steady)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"command: {_common.command_line()}")
    for line in _common.describe_machine():
        print(line)
    print()

    header = [
        "N", "D", "K", "dtype", "puregmm s", "MixtureSameFamily s", "speed-up",
        "puregmm peak MB", "MSF peak MB", "data MB", "|Δloss|/|loss|",
    ]  # fmt: skip
    rows, notes = [], []
    for text in args.configs:
        n, d, k = parse_config(text)
        for dname in args.dtype:
            dtype = DTYPES[dname]
            job = {"n": n, "d": d, "k": k, "dtype": dname, "threads": args.threads}
            params, x = problem(n, d, k, dtype)
            fns = {"puregmm": puregmm_fn(params, x)}
            peer_note, peer_mem = "", {}
            run_peer = not args.no_peer
            guess_gb = MSF_BYTES_PER_NKD * n * k * d * x.element_size() / 2**30
            if run_peer and (args.no_memory or guess_gb > 4 * args.peer_mem_limit):  # never start a huge peer
                if guess_gb > args.peer_mem_limit:
                    run_peer = False
                    peer_note = f"not run: needs ~{guess_gb:.0f} GB"
                    peer_mem = {"note": f"~{guess_gb * 1024:.0f} (estimated: {MSF_BYTES_PER_NKD} x N·K·D·itemsize)"}
            if run_peer and not args.no_memory:
                probe = peak({**job, "n": min(n, PROBE_ROWS), "impl": "MixtureSameFamily"})
                if "above_mb" in probe:
                    est_gb = probe["above_mb"] * n / min(n, PROBE_ROWS) / 1024
                    if est_gb > args.peer_mem_limit:
                        run_peer = False
                        peer_note = f"not run: needs ~{est_gb:.1f} GB"
                        peer_mem = {"note": f"~{est_gb * 1024:.0f} (extrapolated from N={PROBE_ROWS})"}
            if run_peer:
                fns["MixtureSameFamily"] = msf_fn(params, x)
            times = _common.interleaved_times(fns, args.repeats)
            t_ours = _common.median(times["puregmm"])
            mem = {} if args.no_memory else peak({**job, "impl": "puregmm"})
            if run_peer:
                t_peer = _common.median(times["MixtureSameFamily"])
                mem_peer = {} if args.no_memory else peak({**job, "impl": "MixtureSameFamily"})
                v_ours = fns["puregmm"]()[1]
                v_peer = fns["MixtureSameFamily"]()[1]
                dloss = f"{float((v_ours - v_peer).abs() / v_peer.abs()):.1e}"
                peer_cols = [f"{t_peer:.3f}", f"{t_peer / t_ours:.1f}x", fmt_mb(mem_peer) if mem_peer else "-"]
            else:
                dloss = "-"
                peer_cols = [peer_note or "not run", "-", fmt_mb(peer_mem) if peer_mem else "-"]
            data_mb = x.numel() * x.element_size() / _common.MB
            rows.append(
                [f"{n:.0e}", d, k, dname, f"{t_ours:.3f}", peer_cols[0], peer_cols[1],
                 fmt_mb(mem) if mem else "-", peer_cols[2], f"{data_mb:.0f}", dloss]
            )  # fmt: skip
            if args.compile:
                torch._dynamo.reset()
                compiled = torch.compile(torch.func.grad_and_value(pg.loss), fullgraph=True)
                t0 = time.perf_counter()
                compiled(params, x)
                first = time.perf_counter() - t0
                call = {"c": lambda f=compiled, p=params, x=x: f(p, x)}
                steady = _common.interleaved_times(call, args.repeats, warmup=0)["c"]
                notes.append(
                    f"torch.compile(grad_and_value(pg.loss), fullgraph=True) at N={n:.0e}, D={d}, K={k}, {dname}: "
                    f"first call {first:.1f} s, then {_common.median(steady):.3f} s per call "
                    f"(eager {t_ours:.3f} s)"
                )
            print(" ".join(str(c) for c in rows[-1]), file=sys.stderr)
    print(_common.markdown_table(header, rows))
    print()
    print(
        "seconds: median of",
        args.repeats,
        "interleaved rounds of loss + gradient w.r.t. all params; "
        "peak MB: peak RSS above the loaded data in a fresh subprocess (one call, first call included).",
    )
    for note in notes:
        print(note)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == _common.CHILD_FLAG:
        child(json.loads(sys.argv[2]))
    else:
        main()
