"""The CLI's argument parser: five sub-commands, and argument types that refuse bad values.

Numbers are checked as they are parsed (argparse then exits 2 with the usage line): counts are
positive, tolerances positive and finite, ``--threads`` between 1 and this machine's CPU count
(far more threads crashed the process at exit), ``--seed`` within int64 (the key's type).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

import puregmm as pg
from puregmm._cli_common import PROG
from puregmm._cli_fit import CHECKPOINT, cmd_fit
from puregmm._cli_use import cmd_demo, cmd_impute, cmd_sample, cmd_score
from puregmm.data import SUFFIXES
from puregmm.families import FAMILIES

AUTO_MAX_COMPONENTS = 10
MAX_THREADS = os.cpu_count() or 1
INT64 = (-(2**63), 2**63 - 1)
_FMT = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its five sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_FMT,
        description="Gaussian mixture models in PyTorch: fit, score, sample, impute, demo.",
        epilog=(
            "examples:\n"
            "  puregmm demo --out demo.png\n"
            "  puregmm fit data.csv --components 5 --family full --out run/\n"
            "  puregmm score run/model.safetensors data.csv --out scores.csv\n"
            "  puregmm sample run/model.safetensors 1000 --seed 0 --out samples.npy\n"
            "  puregmm impute run/model.safetensors holes.csv --out filled.csv\n\n"
            "Run `puregmm COMMAND --help` for a command's options. "
            "Exit codes: 0 ok, 2 bad usage or input, 1 other errors (a bug)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {pg.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads", type=_threads, metavar="N", help=f"torch CPU threads, 1 to {MAX_THREADS} (default: torch's)"
    )
    _add_fit(sub, common)
    _add_score(sub, common)
    _add_sample(sub, common)
    _add_impute(sub, common)
    _add_demo(sub, common)
    return parser


def _add_fit(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "fit",
        parents=[common],
        formatter_class=_FMT,
        help="fit a mixture to a data file; write model, report and picture",
        description=(
            "Fit a Gaussian mixture to DATA and write into DIR:\n"
            "  model.safetensors  the fitted params (load with pg.load)\n"
            "  report.json        family, K, loss, BIC, AIC, n_steps, converged, n_resets, seconds, versions\n"
            "  fit.png            data with 1/2/3-sigma ellipses (D > 2: first two principal\n"
            "                     components), the loss curve; with --components auto the BIC curve\n"
            f"  {CHECKPOINT}  the loop state, saved as the fit runs; --resume continues from it\n\n"
            f"DATA is {', '.join(SUFFIXES)} (.npy is memory-mapped; a CSV/TSV header row is detected;\n"
            ".parquet needs pyarrow). Rows are samples, columns are dimensions. Each file is written\n"
            "whole or not at all; without matplotlib fit.png is skipped with a note."
        ),
        epilog="example:\n  puregmm fit data.csv --components 5 --family diagonal --method gd --out run/",
    )
    p.add_argument("data", metavar="DATA", help="data file [N rows, D columns]")
    p.add_argument(
        "--components",
        "-k",
        required=True,
        type=_components,
        metavar="K|auto",
        help="number of components K, or 'auto' to pick K by BIC (needs pg.select)",
    )
    p.add_argument("--family", default="full", choices=FAMILIES, help="covariance family (default: full)")
    p.add_argument(
        "--method",
        default="em",
        choices=("em", "gd"),
        help="em: expectation-maximisation (default, as pg.fit); gd: gradient descent",
    )
    p.add_argument("--max-steps", type=_positive_int, metavar="N", help="step limit (default: the method's)")
    p.add_argument("--tol", type=_positive_float, metavar="T", help="convergence tolerance (default: the method's)")
    p.add_argument("--n-init", type=_positive_int, default=1, metavar="R", help="restarts, best kept (default 1)")
    p.add_argument("--seed", type=_seed, default=0, help="random key (default 0); same seed, same result")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="mini-batch size for gd (default: full batch)")
    p.add_argument(
        "--reg-covar",
        type=_non_negative_float,
        default=1e-6,
        metavar="R",
        help="em: added to the covariance diagonals (default 1e-6)",
    )
    p.add_argument(
        "--max-components",
        type=_positive_int,
        default=AUTO_MAX_COMPONENTS,
        metavar="KMAX",
        help=f"with --components auto, try K = 1..KMAX (default {AUTO_MAX_COMPONENTS})",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), help="compute dtype (default: the data's float type)")
    p.add_argument(
        "--missing",
        default="raise",
        choices=("raise", "marginalize"),
        help="NaN entries: raise (default: an error naming the first) or marginalize (missing at random, "
        "integrated out: EM for incomplete data)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--resume", action="store_true", help=f"continue the fit from DIR/{CHECKPOINT} (same settings)")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="N", help="checkpoint every N steps")
    p.add_argument("--no-plot", action="store_true", help="do not write fit.png")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel fit under torchrun: each rank reads its slice of a .npy DATA, rank 0 writes DIR "
        "(e.g. torchrun --nproc_per_node=2 -m puregmm fit data.npy -k 8 --distributed --out run/)",
    )
    p.set_defaults(handler=cmd_fit)


def _add_score(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "score",
        parents=[common],
        formatter_class=_FMT,
        help="per-row log-likelihood and most likely component",
        description=(
            "Score each row of DATA under MODEL: a CSV with columns log_prob (log p(x)) and\n"
            "component (the most likely component, 0-based). Written to --out (whole, once DATA\n"
            "is checked; never over MODEL or DATA), else to stdout."
        ),
        epilog="example:\n  puregmm score run/model.safetensors data.csv --out scores.csv",
    )
    p.add_argument("model", metavar="MODEL", help="a model file written by `puregmm fit` or pg.save")
    p.add_argument("data", metavar="DATA", help=f"data file ({', '.join(SUFFIXES)}) with the model's D columns")
    p.add_argument("--out", metavar="CSV", help="output CSV (default: stdout)")
    p.set_defaults(handler=cmd_score)


def _add_sample(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sample",
        parents=[common],
        formatter_class=_FMT,
        help="draw N points from a model into a .npy file",
        description="Draw N points from MODEL (same seed, same points) and save them as an [N, D] .npy file.",
        epilog="example:\n  puregmm sample run/model.safetensors 1000 --seed 0 --out samples.npy",
    )
    p.add_argument("model", metavar="MODEL", help="a model file written by `puregmm fit` or pg.save")
    p.add_argument("n", metavar="N", type=_positive_int, help="number of points")
    p.add_argument("--seed", type=_seed, default=0, help="random key (default 0)")
    p.add_argument("--out", default="samples.npy", metavar="NPY", help="output .npy file (default samples.npy)")
    p.set_defaults(handler=cmd_sample)


def _add_impute(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "impute",
        parents=[common],
        formatter_class=_FMT,
        help="fill the NaN entries of a data file with their conditional means",
        description=(
            "Replace every NaN entry of DATA by its conditional mean given the row's observed entries\n"
            "under MODEL (pg.impute), and write the result to FILE in DATA's format (same suffix;\n"
            "a CSV/TSV keeps its header). A file without NaN is copied unchanged; ±Inf is an error.\n"
            "Written whole, once DATA is checked; never over MODEL or DATA."
        ),
        epilog="example:\n  puregmm impute run/model.safetensors holes.csv --out filled.csv",
    )
    p.add_argument("model", metavar="MODEL", help="a model file written by `puregmm fit` or pg.save")
    p.add_argument("data", metavar="DATA", help=f"data file ({', '.join(SUFFIXES)}) with NaN marking missing entries")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, in DATA's format")
    p.set_defaults(handler=cmd_impute)


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=_FMT,
        help="fit five 2-D clusters and draw the result",
        description=(
            "Generate 2-D data from five Gaussian clusters, fit a mixture by gradient descent,\n"
            "print the final loss and save a PNG of the data with 1/2/3-sigma ellipses (needs matplotlib).\n"
            "Runs on one thread unless --threads says otherwise (the problem is tiny).\n"
            "--save-data writes the points too, to try `puregmm fit` on them."
        ),
        epilog=(
            "examples:\n  puregmm demo --family diagonal --components 5 --out demo.png\n"
            "  puregmm demo --save-data points.csv && puregmm fit points.csv -k 5 --out run/"
        ),
    )
    p.add_argument("--family", default="full", choices=FAMILIES, help="covariance family (default: full)")
    p.add_argument("--components", "-k", type=_positive_int, default=5, metavar="K", help="components (default 5)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed for data and fit (default 0)")
    p.add_argument("--out", default="demo.png", metavar="PNG", help="picture to write (default demo.png)")
    p.add_argument("--save-data", metavar="PATH", help="also write the points (.csv or .npy), e.g. for `puregmm fit`")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_demo)


# --- argument types --------------------------------------------------------------------------


def _number(cast: Callable[[str], Any], low: float, high: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``cast(value)``, finite, above ``low`` (at least, if not strict), at most ``high``."""

    def parse(value: str) -> Any:
        try:
            v = cast(value)
        except ValueError:  # not a number, or an int of over 4300 digits
            v = None
        if v is None or (isinstance(v, float) and not math.isfinite(v)) or v < low or (strict and v == low) or v > high:
            raise argparse.ArgumentTypeError(f"expected {what}; got {value!r}")
        return v

    return parse


_positive_int = _number(int, 0, INT64[1], True, "a positive integer")
_positive_float = _number(float, 0.0, math.inf, True, "a positive number")
_non_negative_float = _number(float, 0.0, math.inf, False, "a non-negative number")
_threads = _number(int, 1, MAX_THREADS, False, f"a number of threads from 1 to {MAX_THREADS} (this machine's CPUs)")
_seed = _number(int, INT64[0], INT64[1], False, f"an integer from {INT64[0]} to {INT64[1]} (int64)")


def _components(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto'; got {value!r}") from None
