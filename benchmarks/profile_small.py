"""What a small fit costs: ATen operations per call, and the E-step's two forms, on real data.

At everyday sizes an EM step costs a fixed number of small tensor operations (a few µs each
plus Python), not flops; their count is the load-independent measure of the engine's fixed cost.
For scikit-learn's bundled data sets (standardised), each family and K, this prints:

* the top-level ATen operations one ``pg.em_step``, one ``pg.init`` and one ``pg.fit`` (EM,
  scikit-learn's tol/max_iter) dispatch (a ``TorchDispatchMode`` count; nested operations of
  composite ones are not counted twice);
* one ``pg.sufficient_stats`` in the natural (exponential-family) form against the whitened form
  (per component, scikit-learn's), interleaved medians in ms, one thread: what
  ``Family.whitening_cheaper`` decides between;
* the op floor (second table): one ``pg.em_step`` against one scikit-learn EM iteration
  (``_e_step`` + ``_m_step`` of ``pg.to_sklearn`` of the same params), interleaved medians in
  µs, and ``em_step``'s operations times the median cost of one trivial ATen operation (a
  3-element add, measured in the same run): what an ``em_step`` would cost if everything but
  its operations' dispatch were free. ``sklearn / floor`` is the most any trimming of Python
  around the same operations could reach.

Usage::

    python benchmarks/profile_small.py                                   # wine, full and diagonal, K 2 and 10
    python benchmarks/profile_small.py --datasets wine breast_cancer digits --families full --ks 2 10 20
    PYTHONPATH=/path/to/an/older/tree python benchmarks/profile_small.py   # the same counts there
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from unittest import mock

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import puregmm as pg  # noqa: E402
from puregmm import estep  # noqa: E402
from puregmm.families import Family  # noqa: E402

DATASETS = ("iris", "wine", "breast_cancer", "digits")


def load(name: str) -> torch.Tensor:
    import sklearn.datasets
    from sklearn.preprocessing import StandardScaler

    data = getattr(sklearn.datasets, f"load_{name}")().data
    return torch.tensor(StandardScaler().fit_transform(data))


def case(name: str, x: torch.Tensor, family: str, k: int, repeats: int) -> list[str]:
    """One table row: op counts and the two E-step forms' times."""
    p = pg.init(x, k, family, key=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_ops = _common.op_count(lambda: pg.fit(x, k, family, method="em", key=0, tol=1e-3, max_steps=100))
    has_rule = hasattr(Family, "whitening_cheaper")  # (older commits, run with PYTHONPATH, lack it)
    chosen = has_rule and p.spec.whitening_cheaper(x.shape[0], k, x.shape[1])

    def natural_form() -> object:  # the rule switched off for this call
        if not has_rule:
            return pg.sufficient_stats(p, x)
        with mock.patch.object(Family, "whitening_cheaper", lambda self, n, kk, d: False):
            return pg.sufficient_stats(p, x)

    forms = {"natural": natural_form, "whitened": lambda: estep.whitened_stats(p, x, None, None)}
    times = _common.interleaved_times(forms, repeats)
    return [
        name, f"{tuple(x.shape)}", family, str(k), str(_common.op_count(lambda: pg.em_step(p, x))),
        str(_common.op_count(lambda: pg.init(x, k, family, key=0))), str(fit_ops),
        f"{_common.median(times['natural']) * 1e3:.2f}", f"{_common.median(times['whitened']) * 1e3:.2f}",
        "whitened" if chosen else "natural",
    ]  # fmt: skip


def trivial_op_us(repeats: int = 20000) -> float:
    """Median µs of one dispatch of a trivial ATen operation (a 3-element add), in blocks."""
    a = torch.ones(3, dtype=torch.float64)
    blocks = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(repeats // 9):
            torch.add(a, a)
        blocks.append((time.perf_counter() - t0) / (repeats // 9) * 1e6)
    return _common.median(blocks)


def floor_row(name: str, x: torch.Tensor, family: str, k: int, repeats: int, op_us: float) -> list[str]:
    """One row of the op-floor table: em_step and scikit-learn's iteration from the same params."""
    p = pg.init(x, k, family, key=0)
    gm, xn = pg.to_sklearn(p), x.numpy()

    def sk_iteration() -> None:  # what GaussianMixture.fit runs per iteration
        _, log_resp = gm._e_step(xn)
        gm._m_step(xn, log_resp)

    times = _common.interleaved_times({"pg": lambda: pg.em_step(p, x), "sk": sk_iteration}, repeats)
    n_ops = _common.op_count(lambda: pg.em_step(p, x))
    pg_us, sk_us = (_common.median(times[c]) * 1e6 for c in ("pg", "sk"))
    floor = n_ops * op_us
    return [name, family, str(k), str(n_ops), f"{pg_us:.0f}", f"{sk_us:.0f}", f"{floor:.0f}", f"{sk_us / pg_us:.2f}x",
            f"{sk_us / floor:.2f}x"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["wine"], choices=DATASETS)
    ap.add_argument("--families", nargs="+", default=["full", "diagonal"])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 10])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [
        case(name, x, family, k, args.repeats)
        for name in args.datasets
        for x in [load(name)]
        for family in args.families
        for k in args.ks
    ]
    header = ["data", "N x D", "family", "K", "em_step ops", "init ops", "fit ops", "natural ms", "whitened ms"]
    print(_common.markdown_table([*header, "chosen"], rows))
    op_us = trivial_op_us()
    floors = [
        floor_row(name, x, family, k, args.repeats, op_us)
        for name in args.datasets
        for x in [load(name)]
        for family in args.families
        for k in args.ks
    ]
    print(f"\none trivial ATen operation (a 3-element add): {op_us:.2f} us")
    header = ["data", "family", "K", "em_step ops", "em_step us", "sklearn iteration us", "op floor us"]
    print(_common.markdown_table([*header, "sklearn / em_step", "sklearn / floor"], floors))
    for line in _common.describe_machine():
        print(line)
    print("command:", _common.command_line())


if __name__ == "__main__":
    main()
