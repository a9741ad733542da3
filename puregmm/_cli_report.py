"""``report.json`` of ``puregmm fit``: what was fitted, how well, how long, with which versions."""

from __future__ import annotations

import argparse
import math
import os
import platform
from typing import Any

import numpy as np
import torch

import puregmm as pg


def report_dict(
    args: argparse.Namespace,
    x: torch.Tensor,
    params: pg.GMMParams,
    fitted: Any,
    table: Any,
    seconds: float,
    messages: list[str],
) -> dict[str, Any]:
    """The JSON-ready report; non-finite numbers become ``null``."""
    with torch.no_grad():
        loss = float(pg.loss(params, x)) if fitted is None else float(fitted.loss)
        missing = getattr(args, "missing", "raise")  # --missing marginalize: observed-data likelihoods, N rows
        bic, aic = float(pg.bic(params, x, missing=missing)), float(pg.aic(params, x, missing=missing))
    report = {
        "family": params.family,
        "K": params.n_components,
        "D": params.dim,
        "N": x.shape[0],
        "dtype": str(params.dtype).removeprefix("torch."),
        "method": args.method,
        "components": args.components,
        "loss": finite_or_none(loss),
        "bic": finite_or_none(bic),
        "aic": finite_or_none(aic),
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


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _selection(table: Any) -> list[dict[str, Any]]:
    """The selection table as JSON-ready rows."""
    from puregmm.plot import table_rows

    def plain(v: Any) -> Any:
        if isinstance(v, (torch.Tensor, np.generic, np.ndarray)):
            v = v.tolist()
        return finite_or_none(v) if isinstance(v, float) else v

    out = []
    for row in table_rows(table):
        d = row._asdict() if hasattr(row, "_asdict") else dict(row) if isinstance(row, dict) else vars(row)
        out.append({str(k): plain(v) for k, v in d.items()})
    return out


def _row_k(row: dict[str, Any]) -> Any:
    lower = {k.lower(): v for k, v in row.items()}
    return lower.get("k", lower.get("n_components"))


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
