"""The ``puregmm`` command line: ``fit``, ``score``, ``sample`` and ``demo``.

The CLI only reads files, calls the library and writes files; all maths is in the library.
Exit codes: 0 success; 2 bad usage or bad input (one message on stderr, no traceback); 1
anything else (an unexpected error, with its traceback). Set ``PUREGMM_TRACEBACK=1`` to see
the traceback of a code-2 error too.

Features that arrive with later parts of the library switch on by themselves:
``--components auto`` once ``pg.select`` exists, ``--resume`` once ``pg.fit`` takes
``checkpoint=``/``resume=``.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import puregmm as pg
from puregmm import io as pgio
from puregmm.data import SUFFIXES, load_data
from puregmm.families import FAMILIES

PROG = "puregmm"
SCORE_CHUNK = 65536  # rows scored at a time: bounded memory on memory-mapped .npy files
PCA_ROWS = 200_000  # at most this many rows (evenly strided) feed the plot's PCA
AUTO_MAX_COMPONENTS = 10
CHECKPOINT = "checkpoint.safetensors"


class UsageError(ValueError):
    """Bad usage or bad input: exit code 2, message only."""


# --- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("PUREGMM_TRACEBACK"):
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `puregmm score ... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"{PROG} {args.command}: unexpected error (a bug? please report it with the traceback above)",
            file=sys.stderr,
        )
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its four sub-commands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=fmt,
        description="Gaussian mixture models in PyTorch: fit, score, sample, demo.",
        epilog=(
            "examples:\n"
            "  puregmm demo --out demo.png\n"
            "  puregmm fit data.csv --components 5 --family full --out run/\n"
            "  puregmm score run/model.safetensors data.csv --out scores.csv\n"
            "  puregmm sample run/model.safetensors 1000 --seed 0 --out samples.npy\n\n"
            "Run `puregmm COMMAND --help` for a command's options. "
            "Exit codes: 0 ok, 2 bad usage or input, 1 other errors."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {pg.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive_int, metavar="N", help="torch CPU threads (default: torch's)")

    p = sub.add_parser(
        "fit",
        parents=[common],
        formatter_class=fmt,
        help="fit a mixture to a data file; write model, report and picture",
        description=(
            "Fit a Gaussian mixture to DATA and write into DIR:\n"
            "  model.safetensors  the fitted params (load with pg.load)\n"
            "  report.json        family, K, loss, BIC, AIC, n_steps, converged, n_resets, seconds, versions\n"
            "  fit.png            data with 1/2/3-sigma ellipses (D > 2: first two principal\n"
            "                     components), the loss curve; with --components auto the BIC curve\n"
            f"  {CHECKPOINT}  the loop state, saved as the fit runs; --resume continues from it\n\n"
            f"DATA is {', '.join(SUFFIXES)} (.npy is memory-mapped; a CSV/TSV header row is detected;\n"
            ".parquet needs pyarrow). Rows are samples, columns are dimensions."
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
        default="gd",
        choices=("em", "gd"),
        help="gd: gradient descent (default); em: expectation-maximisation",
    )
    p.add_argument("--max-steps", type=_positive_int, metavar="N", help="step limit (default: the method's)")
    p.add_argument("--tol", type=_positive_float, metavar="T", help="convergence tolerance (default: the method's)")
    p.add_argument("--n-init", type=_positive_int, default=1, metavar="R", help="restarts, best kept (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random key (default 0); same seed, same result")
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
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--resume", action="store_true", help=f"continue the fit from DIR/{CHECKPOINT}")
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

    p = sub.add_parser(
        "score",
        parents=[common],
        formatter_class=fmt,
        help="per-row log-likelihood and most likely component",
        description=(
            "Score each row of DATA under MODEL: a CSV with columns log_prob (log p(x)) and\n"
            "component (the most likely component, 0-based). Written to --out, else to stdout."
        ),
        epilog="example:\n  puregmm score run/model.safetensors data.csv --out scores.csv",
    )
    p.add_argument("model", metavar="MODEL", help="a model file written by `puregmm fit` or pg.save")
    p.add_argument("data", metavar="DATA", help=f"data file ({', '.join(SUFFIXES)}) with the model's D columns")
    p.add_argument("--out", metavar="CSV", help="output CSV (default: stdout)")
    p.set_defaults(handler=cmd_score)

    p = sub.add_parser(
        "sample",
        parents=[common],
        formatter_class=fmt,
        help="draw N points from a model into a .npy file",
        description="Draw N points from MODEL (same seed, same points) and save them as an [N, D] .npy file.",
        epilog="example:\n  puregmm sample run/model.safetensors 1000 --seed 0 --out samples.npy",
    )
    p.add_argument("model", metavar="MODEL", help="a model file written by `puregmm fit` or pg.save")
    p.add_argument("n", metavar="N", type=_positive_int, help="number of points")
    p.add_argument("--seed", type=int, default=0, help="random key (default 0)")
    p.add_argument("--out", default="samples.npy", metavar="NPY", help="output .npy file (default samples.npy)")
    p.set_defaults(handler=cmd_sample)

    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=fmt,
        help="fit five 2-D clusters and draw the result",
        description=(
            "Generate 2-D data from five Gaussian clusters, fit a mixture by gradient descent,\n"
            "print the final loss and save a PNG of the data with 1/2/3-sigma ellipses.\n"
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
    p.add_argument("--seed", type=int, default=0, help="random seed for data and fit (default 0)")
    p.add_argument("--out", default="demo.png", metavar="PNG", help="picture to write (default demo.png)")
    p.add_argument("--save-data", metavar="PATH", help="also write the points (.csv or .npy), e.g. for `puregmm fit`")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_demo)
    return parser


# --- commands --------------------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a folder; pass a folder name")
    if getattr(args, "distributed", False):
        return _fit_distributed(args, out)
    if args.components == "auto" and not hasattr(pg, "select"):
        raise UsageError(
            "--components auto is not yet available: this puregmm has no pg.select; pass a number, e.g. --components 5"
        )
    fit_kwargs = _checkpoint_kwargs(out, args)
    x = _tensor(load_data(args.data), args.dtype)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # a checkpoint is written into it during the fit
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # each warning once
            params, fitted, table = _run_fit(x, args, fit_kwargs)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # bad input leaves nothing behind
        raise
    seconds = time.perf_counter() - start
    messages = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    for m in messages:
        print(f"{PROG} fit: warning: {m}", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    pg.save(params, out / "model.safetensors")
    report = _report(args, x, params, fitted, table, seconds, messages)
    pgio.write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    wrote = ["model.safetensors", "report.json"]
    if not args.no_plot:
        wrote += _plot(out / "fit.png", params, x, None if fitted is None else fitted.history, table)
    print(
        f"fit: family={params.family} K={params.n_components} loss={_g(report['loss'])} "
        f"BIC={_g(report['bic'])} steps={report['n_steps']} converged={report['converged']} "
        f"resets={report['n_resets']} ({seconds:.2f} s) -> {out}/{{{','.join(wrote)}}}"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    params = _load_model(args.model)
    arr = load_data(args.data)
    if arr.shape[1] != params.dim:
        raise UsageError(
            f"DATA {args.data!r} has D={arr.shape[1]} columns but the model has D={params.dim}; "
            "score data with the columns the model was fitted on"
        )
    fmt = "%.17g" if params.dtype == torch.float64 else "%.9g"
    sink = open(args.out, "w", newline="") if args.out else sys.stdout
    total, n = 0.0, arr.shape[0]
    try:
        sink.write("log_prob,component\n")
        for lo in range(0, n, SCORE_CHUNK):
            xb = _tensor(arr[lo : lo + SCORE_CHUNK], None).to(params.dtype)
            bad = ~torch.isfinite(xb).all(-1)
            if bool(bad.any()):
                rows = (torch.nonzero(bad).flatten()[:5] + lo).tolist()
                raise UsageError(f"DATA {args.data!r} holds NaN or Inf (first bad rows: {rows}); drop or impute them")
            with torch.no_grad():
                joint = pg.component_log_prob(params, xb)  # [B, K]
                lp = torch.logsumexp(joint, -1)  # [B]
                comp = joint.argmax(-1)  # [B]
            total += float(lp.to(torch.float64).sum())
            buf = io.StringIO()
            np.savetxt(buf, np.column_stack([lp.numpy(), comp.numpy()]), fmt=[fmt, "%d"], delimiter=",")
            sink.write(buf.getvalue())
    finally:
        if args.out:
            sink.close()
    if args.out:
        print(f"score: {n} rows, mean log-likelihood {total / n:.6g} -> {args.out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    params = _load_model(args.model)
    x, _ = pg.sample(params, args.n, key=args.seed)
    buf = io.BytesIO()
    np.save(buf, x.detach().cpu().numpy())
    pgio.write_atomic(args.out, buf.getvalue())
    print(f"sample: {args.n} points of D={params.dim} -> {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from puregmm.demo import run_demo

    if args.threads is None:
        torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once
        run_demo(
            args.family, args.components, args.out, seed=args.seed, progress=not args.quiet, save_data=args.save_data
        )
    for w in caught:
        print(f"{PROG} demo: warning: {w.message}", file=sys.stderr)
    return 0


# --- helpers ---------------------------------------------------------------------------------


def _number(cast: Any, low: float, strict: bool, what: str) -> Any:
    """An argparse ``type=``: ``cast(value)``, finite, above ``low`` (or at least, if not strict)."""

    def parse(value: str) -> Any:
        try:
            v = cast(value)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"expected {what}; got {value!r}")
        return v

    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_positive_float = _number(float, 0.0, True, "a positive number")
_non_negative_float = _number(float, 0.0, False, "a non-negative number")


def _components(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto'; got {value!r}") from None


def _tensor(arr: np.ndarray, dtype: str | None) -> torch.Tensor:
    """A tensor of the data (read into memory; a memory map is copied once)."""
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    t = torch.from_numpy(arr)
    if dtype is not None:
        return t.to(getattr(torch, dtype))
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _load_model(path: str) -> pg.GMMParams:
    if not Path(path).is_file():
        raise UsageError(f"MODEL {path!r} does not exist (or is not a file); pass a file written by `puregmm fit`")
    params = pgio.load(path)
    if params.batch_shape:
        raise UsageError(f"MODEL {path!r} holds a batch of {params.batch_shape} fits; save one fit per file")
    return params


def _checkpoint_kwargs(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``checkpoint=``/``resume=`` for pg.fit once it supports them; ``--resume`` errors until then."""
    accepted = inspect.signature(pg.fit).parameters
    if not {"checkpoint", "resume"} <= set(accepted):
        if args.resume or args.checkpoint_every:
            raise UsageError(
                "--resume and --checkpoint-every are not yet available: this puregmm's fit has no checkpoint support"
            )
        return {}
    if args.components == "auto":
        if args.resume:
            raise UsageError("--resume works with a number of components, not with --components auto")
        return {}
    ckpt = out / CHECKPOINT
    if args.resume and not ckpt.is_file():
        raise UsageError(f"--resume: no checkpoint at {str(ckpt)!r}; run without --resume first")
    kwargs: dict[str, Any] = {"checkpoint": str(ckpt), "resume": str(ckpt) if args.resume else None}
    if args.checkpoint_every and "checkpoint_every" in accepted:
        kwargs["checkpoint_every"] = args.checkpoint_every
    return kwargs


def _fit_distributed(args: argparse.Namespace, out: Path) -> int:
    """``fit --distributed``: every rank fits its slice of a memory-mapped ``.npy`` with
    :func:`puregmm.distributed.fit_distributed`; rank 0 writes DIR (loss, BIC, AIC and N of
    the whole data; the picture shows rank 0's slice)."""
    import torch.distributed as dist

    from puregmm import distributed as pgd

    if args.components == "auto":
        raise UsageError("--distributed needs a number of components, not --components auto")
    if Path(args.data).suffix.lower() != ".npy":
        raise UsageError(f"--distributed reads a memory-mapped .npy (each rank its slice); got {args.data!r}")
    owned = not dist.is_initialized()
    comm = pgd.init()
    try:
        arr = load_data(args.data)
        lo, hi = pgd.shard_bounds(arr.shape[0], comm.rank, comm.world_size)
        x = _tensor(arr[lo:hi], args.dtype)
        fit_kwargs = _checkpoint_kwargs(out, args)
        if comm.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            fitted = pgd.fit_distributed(
                x,
                args.components,
                args.family,
                method=args.method,
                max_steps=args.max_steps,
                tol=args.tol,
                batch_size=args.batch_size,
                n_init=args.n_init,
                reg_covar=args.reg_covar,
                key=args.seed,
                progress=not args.quiet and comm.rank == 0,
                **fit_kwargs,
            )
        seconds = time.perf_counter() - start
        if comm.rank != 0:
            return 0
        messages = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
        for m in messages:
            print(f"{PROG} fit: warning: {m}", file=sys.stderr)
        params, n = fitted.params, arr.shape[0]
        pg.save(params, out / "model.safetensors")
        report = _report(args, x, params, fitted, None, seconds, messages)
        two_nll, p = 2.0 * n * float(fitted.loss), pg.n_parameters(params)
        report.update(N=n, bic=_finite_or_none(two_nll + p * math.log(n)), aic=_finite_or_none(two_nll + 2.0 * p))
        report["world_size"] = comm.world_size
        pgio.write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
        wrote = ["model.safetensors", "report.json"]
        if not args.no_plot:
            wrote += _plot(out / "fit.png", params, x, fitted.history, None)
        print(
            f"fit: family={params.family} K={params.n_components} loss={_g(report['loss'])} "
            f"BIC={_g(report['bic'])} steps={report['n_steps']} converged={report['converged']} "
            f"resets={report['n_resets']} ranks={comm.world_size} ({seconds:.2f} s) -> {out}/{{{','.join(wrote)}}}"
        )
        return 0
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _run_fit(x: torch.Tensor, args: argparse.Namespace, fit_kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(params, FitResult or None, selection table or None)."""
    if args.components == "auto":
        return _fit_auto(x, args)
    fitted = pg.fit(
        x,
        args.components,
        args.family,
        method=args.method,
        max_steps=args.max_steps,
        tol=args.tol,
        batch_size=args.batch_size,
        n_init=args.n_init,
        reg_covar=args.reg_covar,
        key=args.seed,
        progress=not args.quiet,
        **fit_kwargs,
    )
    return fitted.params, fitted, None


def _fit_auto(x: torch.Tensor, args: argparse.Namespace) -> tuple[pg.GMMParams, Any, Any]:
    """Pick K by BIC with pg.select; returns (params, None, table)."""
    select = pg.select  # type: ignore[attr-defined]
    k_max = min(args.max_components, x.shape[0])
    optional = {  # forwarded only where pg.select accepts them
        "method": args.method,
        "max_steps": args.max_steps,
        "tol": args.tol,
        "batch_size": args.batch_size,
        "reg_covar": args.reg_covar,
    }
    accepted = inspect.signature(select).parameters
    extra = {k: v for k, v in optional.items() if k in accepted and v is not None}
    table, params = select(
        x,
        n_components=range(1, k_max + 1),
        families=(args.family,),
        criterion="bic",
        n_init=args.n_init,
        key=args.seed,
        progress=not args.quiet,
        **extra,
    )
    return params, None, table


def _selection(table: Any) -> list[dict[str, Any]]:
    """The selection table as JSON-ready rows."""
    from puregmm.plot import table_rows

    def plain(v: Any) -> Any:
        if isinstance(v, (torch.Tensor, np.generic, np.ndarray)):
            v = v.tolist()
        return _finite_or_none(v) if isinstance(v, float) else v

    out = []
    for row in table_rows(table):
        d = row._asdict() if hasattr(row, "_asdict") else dict(row) if isinstance(row, dict) else vars(row)
        out.append({str(k): plain(v) for k, v in d.items()})
    return out


def _report(
    args: argparse.Namespace,
    x: torch.Tensor,
    params: pg.GMMParams,
    fitted: Any,
    table: Any,
    seconds: float,
    messages: list[str],
) -> dict[str, Any]:
    with torch.no_grad():
        loss = float(pg.loss(params, x)) if fitted is None else float(fitted.loss)
        bic, aic = float(pg.bic(params, x)), float(pg.aic(params, x))
    report = {
        "family": params.family,
        "K": params.n_components,
        "D": params.dim,
        "N": x.shape[0],
        "dtype": str(params.dtype).removeprefix("torch."),
        "method": args.method,
        "components": args.components,
        "loss": _finite_or_none(loss),
        "bic": _finite_or_none(bic),
        "aic": _finite_or_none(aic),
        "n_steps": None if fitted is None else fitted.n_steps,
        "converged": None if fitted is None else bool(fitted.converged),
        "n_resets": None if fitted is None else fitted.n_resets,
        "seconds": round(seconds, 4),
        "seed": args.seed,
        "n_init": args.n_init,
        "data": os.fspath(args.data),
        "warnings": messages,
        "versions": _versions(),
    }
    if table is not None:
        report["selection"] = _selection(table)
        best = [r for r in report["selection"] if _row_k(r) == params.n_components]
        for key in ("n_steps", "converged", "n_resets"):
            if best and key in best[0]:
                report[key] = best[0][key]
    return report


def _row_k(row: dict[str, Any]) -> Any:
    lower = {k.lower(): v for k, v in row.items()}
    return lower.get("k", lower.get("n_components"))


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {
        "python": platform.python_version(),
        "puregmm": pg.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    for name in ("safetensors", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _plot(path: Path, params: pg.GMMParams, x: torch.Tensor, history: Any, table: Any) -> list[str]:
    try:
        from puregmm.plot import fit_figure, save_figure

        stride = max(1, math.ceil(x.shape[0] / PCA_ROWS))
        save_figure(fit_figure(params, x[::stride], history, table), path)
    except ImportError as err:
        print(f"{PROG} fit: warning: no {path.name}: {err}", file=sys.stderr)
        return []
    return [path.name]
