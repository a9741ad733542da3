"""What the CLI's commands share: the usage error, reading data and models, encoding outputs.

Every output is encoded to bytes here and written with :func:`puregmm._files.write_atomic`
(or streamed through :func:`puregmm._files.atomic_open`), so a file is written whole or not at
all, to the resolved target, after the inputs have been checked.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import puregmm as pg
from puregmm import _files
from puregmm import io as pgio

PROG = "puregmm"
FIGURE_DPI = 80  # as puregmm.plot.save_figure


class UsageError(ValueError):
    """Bad usage or bad input: exit code 2, message only."""


def check_outputs(outputs: Mapping[str, Any], inputs: Mapping[str, Any]) -> None:
    """Before any work: each output can be written (a regular file or a new path in an existing
    folder) and is neither an input nor another output (a model, a data file)."""
    for path in outputs.values():
        _files.resolve_output(path)
    _files.check_distinct(outputs, inputs)


def tensor(arr: np.ndarray, dtype: str | None) -> torch.Tensor:
    """A tensor of the data (read into memory; a memory map is copied once)."""
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    t = torch.from_numpy(arr)
    if dtype is not None:
        return t.to(getattr(torch, dtype))
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def load_model(path: str) -> pg.GMMParams:
    """Unbatched params from a model file, or a UsageError naming MODEL."""
    if not Path(path).is_file():
        raise UsageError(f"MODEL {path!r} does not exist (or is not a file); pass a file written by `puregmm fit`")
    params = pgio.load(path)
    if params.batch_shape:
        raise UsageError(f"MODEL {path!r} holds a batch of {params.batch_shape} fits; save one fit per file")
    return params


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as the bytes of a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def csv_bytes(arr: np.ndarray, header: str, fmt: Any) -> bytes:
    """``arr`` as a CSV with a header line (``fmt`` as for :func:`numpy.savetxt`)."""
    buf = io.StringIO()
    np.savetxt(buf, arr, fmt=fmt, delimiter=",", header=header, comments="")
    return buf.getvalue().encode()


def figure_format(path: str | os.PathLike[str]) -> str:
    """The image format of ``path`` (its suffix); UsageError without matplotlib or for an
    unknown format, so that it is found before any work."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UsageError(
            "drawing a picture needs matplotlib, which is not installed; run `pip install 'puregmm[plot]'` "
            "(or `pip install matplotlib`)"
        ) from None
    fmt = Path(path).suffix.lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise UsageError(f"cannot draw {os.fspath(path)!r}: the suffix must be one of {sorted(supported)}")
    return fmt


def write_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Render ``fig`` in the format of ``path``'s suffix and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format=figure_format(path), dpi=FIGURE_DPI)
    _files.write_atomic(path, buf.getvalue())
