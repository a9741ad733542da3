"""Helpers shared by the benchmarks: machine and versions, timing, peak memory in a subprocess.

Timing: contenders run interleaved (one call of each per round) so that load changes on a
shared machine hit all of them alike; the table reports the median over rounds.

Peak memory: a fresh ``python`` process builds the data, returns freed heap to the OS
(``malloc_trim``), reads its resident set size (``VmRSS``), resets the high-water mark
(``/proc/self/clear_refs``), runs the work once and reports ``VmHWM - VmRSS``: the peak resident
memory above what the process held once the data was loaded (Linux only).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import torch

MB = 1 << 20


# --- machine and versions -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        status = ["git", "-C", here, "status", "--porcelain", "--", "../puregmm"]
        dirty = subprocess.run(status, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def describe_machine(extra: Sequence[str] = ()) -> list[str]:
    """Lines naming the hardware, threads, load and library versions."""
    mem = total_memory_gb()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    libs = ["torch", "numpy", "scipy", "scikit-learn", *extra]
    return [
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores"
        + (f", {mem:.0f} GB RAM" if mem else "")
        + f", {platform.system()} {platform.release()}",
        f"threads: torch.get_num_threads() = {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        + (f"; load average at start {load[0]:.2f} (shared machine)" if load else ""),
        "versions: python "
        + platform.python_version()
        + ", "
        + ", ".join(f"{d} {version(d)}" for d in libs)
        + f", puregmm {version('puregmm')} (git {git_commit()})",
    ]


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


# --- timing ---------------------------------------------------------------------------------------


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, run round-robin ``repeats`` times after ``warmup``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --- peak memory in a fresh subprocess ------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_here(work: Callable[[], Any]) -> dict[str, float]:
    """Run ``work`` once in this process; MB of peak RSS above the RSS just before it.

    Call it in a fresh process right after loading the data.
    """
    _trim_heap()
    baseline = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    work()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {
        "baseline_mb": baseline / 1024,
        "peak_mb": peak / 1024,
        "above_mb": (peak - baseline) / 1024,
        "seconds": seconds,
    }


CHILD_FLAG = "--_child"


def peak_in_subprocess(script: str, job: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run ``python script --_child '<json job>'`` and parse the JSON it prints last.

    Returns ``{"error": ...}`` when the child fails (e.g. killed for memory).
    """
    cmd = [sys.executable, script, CHILD_FLAG, json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"error": f"exit code {proc.returncode}: {tail[0][:200]}"}
    return dict(json.loads(lines[-1]))


# --- tables ---------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    fmt = "| " + " | ".join("{:<" + str(w) + "}" for w in widths) + " |"
    out = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(out)


# --- ATen operations per call ---------------------------------------------------------------------


def op_count(call: Callable[[], Any]) -> int:
    """ATen operations ``call()`` dispatches (a ``TorchDispatchMode`` count; the operations of a
    composite one are not counted twice), after one uncounted call (first-call initialisation,
    caches): the load-independent measure of a small call's fixed cost."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.n += 1
            return func(*args, **(kwargs or {}))

    call()
    with Count() as mode:
        call()
    return mode.n
