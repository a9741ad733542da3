"""The CLI's ``score``, ``sample``, ``impute`` and ``demo`` commands: use a model, or show one being fitted.

Each command checks its inputs and its outputs (writable, not an input) before any work, and
writes every file whole or not at all (:mod:`puregmm._files`).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import puregmm as pg
from puregmm import _files
from puregmm._cli_common import (
    PROG,
    UsageError,
    check_outputs,
    csv_bytes,
    figure_format,
    load_model,
    npy_bytes,
    tensor,
    write_figure,
)
from puregmm.data import _is_number, load_data

SCORE_CHUNK = 65536  # rows scored at a time: bounded memory on memory-mapped .npy files
SAMPLE_BUFFERS = 6  # 8-byte tensors of [N, D + 1] that pg.sample's hashes and uniforms hold at once, about


def cmd_score(args: argparse.Namespace) -> int:
    """Per-row log p(x) and most likely component, to --out (atomically) or stdout."""
    if args.out is not None:
        check_outputs({"--out": args.out}, {"MODEL": args.model, "DATA": args.data})
    params, arr = _model_and_data(args, "score")
    _check_finite(arr, params.dtype, args.data)  # before the output is opened: bad data writes nothing
    if args.out is None:
        _write_scores(arr, params, sys.stdout.write)
        return 0
    with _files.atomic_open(args.out) as f:
        total = _write_scores(arr, params, lambda text: f.write(text.encode()))
    print(f"score: {arr.shape[0]} rows, mean log-likelihood {total / arr.shape[0]:.6g} -> {args.out}")
    return 0


def _check_finite(arr: np.ndarray, dtype: torch.dtype, name: str) -> None:
    """UsageError naming the first rows that hold NaN or Inf (in the model's dtype), chunk by chunk."""
    for lo in range(0, arr.shape[0], SCORE_CHUNK):
        xb = tensor(arr[lo : lo + SCORE_CHUNK], None).to(dtype)
        bad = ~torch.isfinite(xb).all(-1)
        if bool(bad.any()):
            rows = (torch.nonzero(bad).flatten()[:5] + lo).tolist()
            raise UsageError(f"DATA {name!r} holds NaN or Inf (first bad rows: {rows}); drop or impute them")


def _write_scores(arr: np.ndarray, params: pg.GMMParams, write: Callable[[str], object]) -> float:
    """Write the CSV chunk by chunk; returns the total log-likelihood."""
    fmt = "%.17g" if params.dtype == torch.float64 else "%.9g"
    total = 0.0
    write("log_prob,component\n")
    for lo in range(0, arr.shape[0], SCORE_CHUNK):
        xb = tensor(arr[lo : lo + SCORE_CHUNK], None).to(params.dtype)
        with torch.no_grad():
            joint = pg.component_log_prob(params, xb)  # [B, K]
            lp = torch.logsumexp(joint, -1)  # [B]
            comp = joint.argmax(-1)  # [B]
        total += float(lp.to(torch.float64).sum())
        buf = io.StringIO()
        np.savetxt(buf, np.column_stack([lp.numpy(), comp.numpy()]), fmt=[fmt, "%d"], delimiter=",")
        write(buf.getvalue())
    return total


def cmd_sample(args: argparse.Namespace) -> int:
    """N points from the model into a ``.npy`` file."""
    check_outputs({"--out": args.out}, {"MODEL": args.model})
    params = load_model(args.model)
    _check_memory(args.n, params)
    x, _ = pg.sample(params, args.n, key=args.seed)
    _files.write_atomic(args.out, npy_bytes(x.detach().cpu().numpy()))
    print(f"sample: {args.n} points of D={params.dim} -> {args.out}")
    return 0


def _check_memory(n: int, params: pg.GMMParams) -> None:
    """UsageError when N points (and the sampler's few buffers of that size) exceed this machine's
    memory: asking for them would end in an allocation failure or the OOM killer."""
    need = SAMPLE_BUFFERS * n * (params.dim + 1) * 8
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound known
        return
    if need > have:
        raise UsageError(
            f"N={n} points of D={params.dim} need about {need / 2**30:.3g} GiB, more than this machine's "
            f"{have / 2**30:.3g} GiB; draw fewer points (several runs with different --seed add up)"
        )


def cmd_demo(args: argparse.Namespace) -> int:
    """Fit the demo's five clusters; write the picture (and the points) atomically."""
    from puregmm.demo import demo_data, run_demo

    figure_format(args.out)  # matplotlib present and the suffix known, before fitting
    outputs = {"--out": args.out}
    if args.save_data is not None:
        if not args.save_data.lower().endswith((".csv", ".npy")):
            raise UsageError(f"--save-data must end in .csv or .npy; got {args.save_data!r}")
        outputs["--save-data"] = args.save_data
    check_outputs(outputs, {})
    if args.threads is None:
        torch.set_num_threads(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once
        result = run_demo(args.family, args.components, None, seed=args.seed, progress=not args.quiet)
    x = demo_data(seed=args.seed)
    if args.save_data is not None:
        _files.write_atomic(args.save_data, _points_bytes(x, args.save_data))
        print(f"demo: wrote the points to {args.save_data}")
    from puregmm.plot import fit_figure

    write_figure(fit_figure(result.params, x, result.history), args.out)
    print(f"demo: wrote {args.out}")
    for w in caught:
        print(f"{PROG} demo: warning: {w.message}", file=sys.stderr)
    return 0


def _points_bytes(x: torch.Tensor, path: str) -> bytes:
    """The demo points as ``.npy``, or as ``.csv`` with a header ``x1,x2`` (as demo.write_points)."""
    arr = x.numpy()
    if path.lower().endswith(".npy"):
        return npy_bytes(arr)
    return csv_bytes(arr, ",".join(f"x{i + 1}" for i in range(arr.shape[1])), "%.9g")


def cmd_impute(args: argparse.Namespace) -> int:
    """DATA with every NaN entry replaced by E[x_missing | x_observed] under MODEL (``pg.impute``),
    written to --out in DATA's format; a file without NaN is copied unchanged."""
    src, dst = Path(args.data), Path(args.out)
    if src.suffix.lower() != dst.suffix.lower():
        raise UsageError(
            f"--out must end in DATA's suffix {src.suffix!r} (impute writes DATA's format); got {args.out!r}"
        )
    check_outputs({"--out": args.out}, {"MODEL": args.model, "DATA": args.data})
    params, arr = _model_and_data(args, "impute")
    x = tensor(arr, None).to(params.dtype)
    inf = torch.isinf(x)
    if bool(inf.any()):
        first = tuple(torch.nonzero(inf)[0].tolist())
        raise UsageError(
            f"DATA {args.data!r} holds {float(x[first]):+} at (row, column) {first}; only NaN marks a missing value"
        )
    n_missing = int(torch.isnan(x).sum())
    if n_missing == 0:
        _files.write_atomic(args.out, src.read_bytes())
        print(f"impute: no missing entries in {args.data}; copied unchanged -> {args.out}")
        return 0
    with torch.no_grad():
        filled = pg.impute(params, x).cpu().numpy()
    _files.write_atomic(args.out, _table_bytes(filled, arr, src))
    print(f"impute: filled {n_missing} missing entries in {arr.shape[0]} rows -> {args.out}")
    return 0


def _table_bytes(filled: np.ndarray, arr: np.ndarray, src: Path) -> bytes:
    """``filled`` encoded as DATA's format: .npy in DATA's float dtype, CSV/TSV with DATA's header
    line and delimiter, parquet with DATA's column names."""
    suffix = src.suffix.lower()
    if suffix == ".npy":
        return npy_bytes(filled.astype(arr.dtype if arr.dtype.kind == "f" else np.float64))
    names = _column_names(src, arr.shape[1])
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({name: filled[:, i] for i, name in enumerate(names)}), buf)
        return buf.getvalue()
    delimiter = "\t" if suffix == ".tsv" else ","
    header = _header_line(src, delimiter) or ""
    lines = (delimiter.join(map(repr, row)) for row in filled.tolist())  # shortest round-trip decimals
    return (header + "\n".join(lines) + "\n").encode()


def _header_line(src: Path, delimiter: str) -> str | None:
    """DATA's header row (a first row with a non-numeric field), re-encoded, or None."""
    with open(src, newline="", encoding="utf-8-sig") as f:
        first = next((row for row in csv.reader(f, delimiter=delimiter) if row), None)
    if first is None or all(_is_number(v) for v in first):
        return None
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerow(first)
    return buf.getvalue()


def _column_names(src: Path, d: int) -> list[str]:
    """Parquet column names of DATA (or x1..xD)."""
    try:
        import pyarrow.parquet as pq

        return list(pq.read_schema(src).names)[:d]
    except Exception:  # any reader problem: generic names
        return [f"x{i + 1}" for i in range(d)]


def _model_and_data(args: argparse.Namespace, verb: str) -> tuple[pg.GMMParams, np.ndarray]:
    """MODEL and DATA of ``args``, DATA with the model's number of columns (else a UsageError)."""
    params = load_model(args.model)
    arr = load_data(args.data)
    if arr.shape[1] != params.dim:
        raise UsageError(
            f"DATA {args.data!r} has D={arr.shape[1]} columns but the model has D={params.dim}; "
            f"{verb} data with the columns the model was fitted on"
        )
    return params, arr
