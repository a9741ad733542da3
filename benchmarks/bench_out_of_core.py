"""Out-of-core EM: a fit streamed from a memory-mapped file against the same fit in memory.

A 2e7 × 8 float32 ``.npy`` (640 MB, 16 Gaussian clusters) is written in chunks to a temporary
folder (deleted at the end). Both contenders start from the same params (:func:`puregmm.init`
on 200,000 rows of the file), run exactly 10 full-batch EM steps (``tol=0``) of the diagonal
family with K = 16, then one pass for the final loss:

* ``stream``: ``pg.stream.fit_stream(np.load(path, mmap_mode="r"), ...)``, chunks of
  ``--chunk-size`` rows (default: :func:`puregmm.stream.default_chunk_rows`);
* ``in memory``: ``pg.fit(torch.from_numpy(np.load(path)), method="em", ...)`` (reading the
  file into memory is timed separately).

Each runs once in a fresh subprocess that, after imports and a warm-up fit, records its
anonymous resident memory (``RssAnon`` in ``/proc/self/status``: the file's page cache does not
count) and polls it every millisecond during the fit; the table shows the peak above that
baseline. Throughput is N × (10 EM steps + 1 loss pass) / seconds. Caveats: the file was just
written, so it sits in the page cache (24 GB machine): this measures compute and copies, not
disk reads; the machine is shared (load average printed); one repeat by default (``--repeats``).

Usage::

    python benchmarks/bench_out_of_core.py
    python benchmarks/bench_out_of_core.py --rows 2e6 --repeats 3     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

import puregmm as pg
from puregmm import stream

D, K, FAMILY, STEPS = 8, 16, "diagonal", 10
MB = 1 << 20


def rss_anon() -> int:
    """Bytes of anonymous resident memory of this process (not file-backed pages)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) * 1024  # type: ignore[union-attr]


def write_data(path: str, n: int, seed: int = 0) -> None:
    """[n, D] float32 from 16 clusters, written 1e6 rows at a time (never all in memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(K, D)).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, size=(K, D)).astype(np.float32)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    for lo in range(0, n, 1_000_000):
        m = min(n, lo + 1_000_000) - lo
        labels = rng.integers(0, K, size=m)
        mm[lo : lo + m] = centres[labels] + rng.standard_normal((m, D), dtype=np.float32) * scales[labels]
    mm.flush()
    del mm


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One contender in this (fresh) process; returns the measurements."""
    torch.set_num_threads(job["threads"])
    p0 = pg.load(job["init"])
    mm = np.load(job["data"], mmap_mode="r")
    stream.fit_stream(mm[:100_000], K, FAMILY, init_params=p0, max_steps=1, tol=0.0)  # warm-up
    pg.fit(torch.from_numpy(np.array(mm[:100_000])), K, FAMILY, method="em", init_params=p0, max_steps=1, tol=0.0)
    base = rss_anon()
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load_s = 0.0
    t0 = time.perf_counter()
    if job["kind"] == "stream":
        r = stream.fit_stream(mm, K, FAMILY, init_params=p0, max_steps=STEPS, tol=0.0, chunk_size=job["chunk"])
    else:
        x = torch.from_numpy(np.load(job["data"]))  # the whole file in anonymous memory
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = pg.fit(x, K, FAMILY, method="em", init_params=p0, max_steps=STEPS, tol=0.0)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    peak[0] = max(peak[0], rss_anon())
    torch.save(r.params, job["out"])
    return {
        "seconds": seconds,
        "load_s": load_s,
        "peak_mb": (peak[0] - base) / MB,
        "base_mb": base / MB,
        "loss": float(r.loss),
        "n_steps": r.n_steps,
    }


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(job)], capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{job['kind']} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from importlib import metadata

    return [
        f"machine: {cpu}, {os.cpu_count()} logical cores, {mem:.0f} GB RAM, {platform.system()} {platform.release()}",
        f"load average at start: {os.getloadavg()[0]:.2f} (shared machine)",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"puregmm {metadata.version('puregmm')} (git {git_state()})",
    ]


def git_state() -> str:
    """Short commit, with "+dirty" when puregmm/ has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--", "../puregmm"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, default=2e7, help="N (default 2e7: 640 MB)")
    parser.add_argument("--chunk-size", type=int, default=None, help="stream rows per read (default: stream's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender (median reported)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    n = int(args.rows)
    chunk = args.chunk_size or stream.default_chunk_rows(D)
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(*machine(), sep="\n")
    print(f"threads: {args.threads}; N={n:,} D={D} K={K} family={FAMILY}, float32, {STEPS} EM steps + 1 loss pass")
    with tempfile.TemporaryDirectory(prefix="puregmm-ooc-") as tmp:
        data, init = os.path.join(tmp, "x.npy"), os.path.join(tmp, "init.safetensors")
        t0 = time.perf_counter()
        write_data(data, n)
        print(f"data: {os.path.getsize(data) / MB:,.0f} MB memmap written in {time.perf_counter() - t0:.1f} s to {tmp}")
        mm = np.load(data, mmap_mode="r")
        rows = np.sort(np.random.default_rng(1).choice(n, size=min(n, 200_000), replace=False))
        pg.save(pg.init(torch.from_numpy(mm[rows]), K, FAMILY, key=0, method="kmeans++"), init)
        del mm
        results: dict[str, list[dict[str, Any]]] = {"stream": [], "in memory": []}
        for r in range(args.repeats):  # interleaved, so that load changes hit both alike
            for kind in results:
                job = {
                    "kind": "stream" if kind == "stream" else "memory",
                    "data": data,
                    "init": init,
                    "chunk": chunk,
                    "threads": args.threads,
                    "out": os.path.join(tmp, f"{kind.replace(' ', '_')}_{r}.pt"),
                }
                results[kind].append(run_child(job))
        a = torch.load(os.path.join(tmp, "stream_0.pt"), weights_only=False)
        b = torch.load(os.path.join(tmp, "in_memory_0.pt"), weights_only=False)
        diff = max(
            float((u - v).abs().max()) for u, v in zip((a.logits, a.means, a.scale), (b.logits, b.means, b.scale))
        )
    print(f"temporary folder deleted: {not os.path.exists(tmp)}")
    print()
    print("| contender | chunk rows | peak RssAnon above baseline | fit seconds | points/s | read file | loss |")
    print("|---|---|---|---|---|---|---|")
    times, peaks = {}, {}
    for kind, runs in results.items():
        med = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        times[kind], peaks[kind] = med["seconds"], max(r["peak_mb"] for r in runs)
        rate = n * (STEPS + 1) / med["seconds"] / 1e6
        read = "(in the fit)" if kind == "stream" else f"{med['load_s']:.1f} s"
        rows_per_read = f"{chunk:,}" if kind == "stream" else "-"
        print(
            f"| {kind} | {rows_per_read} | {peaks[kind]:,.0f} MB | {med['seconds']:.1f} | {rate:.1f} M | {read} "
            f"| {med['loss']:.6f} |"
        )
    print()
    print(f"stream / in-memory fit time: {times['stream'] / times['in memory']:.2f}x; ", end="")
    print(f"max |param difference| after {STEPS} steps: {diff:.2e} (float32, different summation order)")
    print(f"target: stream peak RssAnon under 300 MB: {'met' if peaks['stream'] < 300 else 'NOT met'}")


if __name__ == "__main__":
    main()
