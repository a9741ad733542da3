"""One EM iteration (``pg.em_step``) of two commits of puregmm, measured in the same run.

Each measurement is a fresh subprocess that imports puregmm from one source tree (the working
tree, or ``git worktree`` of ``--old``), builds the same data and params, and times
``em_step`` ``--calls`` times (median) plus the peak resident memory above the loaded data of
one call. The two trees alternate, ``--rounds`` times, and the medians of the rounds are
compared: a refactor must keep every figure within 10 % (issue 12, "not allowed to regress").
Memory is the peak resident set (VmHWM, reset after loading the data and a warm-up call) above
the resident set before the timed calls.

Usage::

    python benchmarks/compare_commits.py --old 296dc2e
    python benchmarks/compare_commits.py --old HEAD~3 --configs 1e5,16,16 --dtypes float64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch, puregmm as pg
n, d, k = (int(float(v)) for v in sys.argv[2].split(","))
dtype = getattr(torch, sys.argv[3])
family, calls = sys.argv[4], int(sys.argv[5])
g = torch.Generator().manual_seed(0)
x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + torch.randn(k, d, generator=g, dtype=torch.float64)[
    torch.arange(n) % k]).to(dtype)
params = pg.init(x[:20000], k, family, key=0, method="kmeans++")
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
pg.em_step(params, x[:1000])  # warm-up of lazy initialisations, then reset the peak (VmHWM) to now
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
times = []
for _ in range(calls):
    t0 = time.perf_counter()
    pg.em_step(params, x)
    times.append(time.perf_counter() - t0)
peak = status("VmHWM:")
print(json.dumps({"file": pg.__file__, "seconds": sorted(times)[len(times) // 2], "peak_mb": (peak - base) / 1024}))
"""


def measure(tree: Path, config: str, dtype: str, family: str, calls: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), config, dtype, family, str(calls)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(tree)), (result["file"], tree)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision to compare the working tree against")
    ap.add_argument("--configs", nargs="+", default=["1e5,16,16", "1e6,32,32"])
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--family", default="full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    print(f"$ python benchmarks/compare_commits.py {' '.join(sys.argv[1:])}")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(old), args.old], check=True)
        try:
            print(f"{'N, D, K':>12} {'dtype':>8} {'old s':>8} {'new s':>8} {'new/old':>8} {'old MB':>7} {'new MB':>7}")
            for config in args.configs:
                for dtype in args.dtypes:
                    rows: dict[str, list[dict]] = {"old": [], "new": []}
                    for _ in range(args.rounds):
                        for name, tree in (("old", old), ("new", repo)):
                            rows[name].append(measure(tree, config, dtype, args.family, args.calls, args.threads))
                    t = {k: statistics.median(r["seconds"] for r in v) for k, v in rows.items()}
                    m = {k: statistics.median(r["peak_mb"] for r in v) for k, v in rows.items()}
                    print(
                        f"{config:>12} {dtype:>8} {t['old']:8.3f} {t['new']:8.3f} {t['new'] / t['old']:8.2f} "
                        f"{m['old']:7.0f} {m['new']:7.0f}",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()
