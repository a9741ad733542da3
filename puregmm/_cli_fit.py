"""The CLI's ``fit`` command: read DATA, fit, write model, report, picture (and a checkpoint).

The output folder and every file in it are checked before the data is read (a folder that
cannot be created, a file in the way, an output that is the data), and each file is written
atomically to its resolved target (:mod:`puregmm._files`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import puregmm as pg
from puregmm import _files
from puregmm._cli_common import PROG, UsageError, check_outputs, tensor, write_figure
from puregmm._cli_report import finite_or_none, report_dict
from puregmm.data import load_data

MODEL, REPORT, PICTURE = "model.safetensors", "report.json", "fit.png"
CHECKPOINT = "checkpoint.safetensors"
PCA_ROWS = 200_000  # at most this many rows (evenly strided) feed the plot's PCA


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit DATA and write DIR/{model.safetensors, report.json, fit.png}."""
    out = Path(args.out)
    _check_folder(out, args)
    if args.distributed:
        return _fit_distributed(args, out)
    if args.components == "auto" and args.missing == "marginalize":
        raise UsageError("--missing marginalize needs a number of components, not --components auto")
    if args.components == "auto" and not hasattr(pg, "select"):
        raise UsageError(
            "--components auto is not yet available: this puregmm has no pg.select; pass a number, e.g. --components 5"
        )
    fit_kwargs = _checkpoint_kwargs(out, args)
    x = tensor(load_data(args.data), args.dtype)
    created = _missing_folders(out)
    out.mkdir(parents=True, exist_ok=True)  # a checkpoint is written into it during the fit
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # each warning once
            params, fitted, table = _run_fit(x, args, fit_kwargs)
    except BaseException:
        for folder in created:  # bad input leaves nothing behind: the folders made here, if still empty
            if not any(folder.iterdir()):
                folder.rmdir()
        raise
    seconds = time.perf_counter() - start
    messages = _print_warnings(caught)
    report = report_dict(args, x, params, fitted, table, seconds, messages)
    if bool(torch.isnan(x).any()):  # --missing marginalize: the picture shows the rows imputed
        x = pg.impute(params, x)
    wrote = _write_results(out, args, params, report, x, None if fitted is None else fitted.history, table)
    _print_summary(report, params, seconds, out, wrote)
    return 0


def _check_folder(out: Path, args: argparse.Namespace) -> None:
    """DIR is a writable folder (or can be created) and none of its outputs is DATA or in the way."""
    real = Path(os.path.realpath(out))
    if real.exists():
        if not real.is_dir():
            raise UsageError(f"--out {str(out)!r} exists and is not a folder; pass a folder name")
        if not os.access(real, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {str(out)!r}: no permission to write files in this folder")
        names = [MODEL, REPORT, CHECKPOINT] + ([] if args.no_plot else [PICTURE])
        check_outputs({f"--out {name}": out / name for name in names}, {"DATA": args.data})
        return
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} cannot be created: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {str(out)!r} cannot be created: no permission to write in {str(parent)!r}")


def _missing_folders(out: Path) -> list[Path]:
    """The folders ``out.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    while not out.exists() and out != out.parent:
        missing.append(out)
        out = out.parent
    return missing


def _print_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    messages = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    for m in messages:
        print(f"{PROG} fit: warning: {m}", file=sys.stderr)
    return messages


def _write_results(
    out: Path,
    args: argparse.Namespace,
    params: pg.GMMParams,
    report: dict[str, Any],
    x: torch.Tensor,
    history: Any,
    table: Any,
) -> list[str]:
    """Model, report and (unless --no-plot) picture, each atomically; the names written."""
    pg.save(params, out / MODEL)
    _files.write_atomic(out / REPORT, (json.dumps(report, indent=2) + "\n").encode())
    wrote = [MODEL, REPORT]
    if not args.no_plot:
        wrote += _plot(out / PICTURE, params, x, history, table)
    return wrote


def _print_summary(report: dict[str, Any], params: pg.GMMParams, seconds: float, out: Path, wrote: list[str]) -> None:
    ranks = f" ranks={report['world_size']}" if "world_size" in report else ""
    print(
        f"fit: family={params.family} K={params.n_components} loss={_g(report['loss'])} "
        f"BIC={_g(report['bic'])} steps={report['n_steps']} converged={report['converged']} "
        f"resets={report['n_resets']}{ranks} ({seconds:.2f} s) -> {out}/{{{','.join(wrote)}}}"
    )


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def _plot(path: Path, params: pg.GMMParams, x: torch.Tensor, history: Any, table: Any) -> list[str]:
    """Draw the fit into ``path``; without matplotlib, one warning line and nothing written."""
    try:
        from puregmm.plot import fit_figure

        stride = max(1, math.ceil(x.shape[0] / PCA_ROWS))
        fig = fit_figure(params, x[::stride], history, table)
    except ImportError as err:
        print(f"{PROG} fit: warning: no {path.name}: {err}", file=sys.stderr)
        return []
    write_figure(fig, path)
    return [path.name]


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


def _fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of pg.fit (and fit_distributed) that the command line sets."""
    return {
        "method": args.method,
        "max_steps": args.max_steps,
        "tol": args.tol,
        "batch_size": args.batch_size,
        "n_init": args.n_init,
        "reg_covar": args.reg_covar,
        "key": args.seed,
    }


def _run_fit(x: torch.Tensor, args: argparse.Namespace, fit_kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(params, FitResult or None, selection table or None)."""
    if args.components == "auto":
        return _fit_auto(x, args)
    fitted = pg.fit(
        x, args.components, args.family, progress=not args.quiet, missing=args.missing, **_fit_options(args),
        **fit_kwargs,
    )  # fmt: skip
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


def _fit_distributed(args: argparse.Namespace, out: Path) -> int:
    """``fit --distributed``: every rank fits its slice of a memory-mapped ``.npy`` with
    :func:`puregmm.distributed.fit_distributed`; rank 0 writes DIR (loss, BIC, AIC and N of
    the whole data; the picture shows rank 0's slice)."""
    import torch.distributed as dist

    from puregmm import distributed as pgd

    if args.components == "auto":
        raise UsageError("--distributed needs a number of components, not --components auto")
    if args.missing == "marginalize":
        raise UsageError("--missing marginalize fits in one process; drop --distributed")
    if Path(args.data).suffix.lower() != ".npy":
        raise UsageError(f"--distributed reads a memory-mapped .npy (each rank its slice); got {args.data!r}")
    owned = not dist.is_initialized()
    comm = pgd.init()
    try:
        arr = load_data(args.data)
        lo, hi = pgd.shard_bounds(arr.shape[0], comm.rank, comm.world_size)
        x = tensor(arr[lo:hi], args.dtype)
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
                progress=not args.quiet and comm.rank == 0,
                **_fit_options(args),
                **fit_kwargs,
            )
        seconds = time.perf_counter() - start
        if comm.rank != 0:
            return 0
        messages = _print_warnings(caught)
        params, n = fitted.params, arr.shape[0]
        report = report_dict(args, x, params, fitted, None, seconds, messages)
        two_nll, p = 2.0 * n * float(fitted.loss), pg.n_parameters(params)
        report.update(N=n, bic=finite_or_none(two_nll + p * math.log(n)), aic=finite_or_none(two_nll + 2.0 * p))
        report["world_size"] = comm.world_size
        wrote = _write_results(out, args, params, report, x, fitted.history, None)
        _print_summary(report, params, seconds, out, wrote)
        return 0
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
