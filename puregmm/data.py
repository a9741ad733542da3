"""Reading data files for the CLI: ``.npy`` (memory-mapped), ``.csv``/``.tsv`` and ``.parquet``.

Every reader returns a 2-D float NumPy array [N, D] (a read-only memory map for ``.npy``) and
raises ``ValueError`` naming the file and what is wrong: a missing file, an unknown suffix, a
non-numeric column (named, with the line of its first bad value), ragged rows, text that is not
UTF-8 (a binary or latin-1 file), or a missing optional dependency (``pyarrow`` for parquet).
NaN/Inf values are left to the fit's own checks, which name the bad rows.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".npy", ".csv", ".tsv", ".parquet")


def load_data(path: str | os.PathLike[str]) -> np.ndarray:
    """Data [N, D] from ``path``; the format follows the suffix (see :data:`SUFFIXES`).

    ``.npy`` files are memory-mapped (nothing is read until used); a 1-D array is one column.
    CSV/TSV files may start with a header row: it is detected as a first row with a
    non-numeric field. Integer columns are kept as integers (the fit converts them).

    Raises:
        ValueError: missing file, unknown suffix, unreadable or non-numeric content, not 2-D.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"DATA {str(p)!r} has suffix {suffix or '(none)'!r}; expected one of {SUFFIXES}")
    if not p.is_file():
        raise ValueError(f"DATA file {str(p)!r} does not exist (or is not a file)")
    if suffix == ".npy":
        arr = _read_npy(p)
    elif suffix == ".parquet":
        arr = _read_parquet(p)
    else:
        arr = _read_text(p, "\t" if suffix == ".tsv" else ",")
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"DATA {str(p)!r} must hold a 2-D array [N, D]; got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"DATA {str(p)!r} is empty (shape {arr.shape})")
    return arr


def _read_npy(p: Path) -> np.ndarray:
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"DATA {str(p)!r} is not a readable .npy file: {err}") from err
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        kind = getattr(arr, "dtype", type(arr).__name__)
        raise ValueError(f"DATA {str(p)!r} must hold real numbers; got dtype {kind} (save a float array)")
    return arr


def _read_text(p: Path, delimiter: str) -> np.ndarray:
    """A CSV/TSV file as float64 [N, D]; a file that is not UTF-8 text raises a ValueError
    naming it and the likely cause (a binary file, or another encoding such as latin-1)."""
    try:
        return _parse_text(p, delimiter)
    except UnicodeDecodeError as err:
        byte = err.object[err.start : err.start + 1].hex()
        raise ValueError(
            f"DATA {str(p)!r} is not UTF-8 text (it holds the byte 0x{byte}): is it a binary file, "
            "or text in another encoding such as latin-1? Save it as UTF-8 CSV/TSV, or as .npy"
        ) from None
    except csv.Error as err:  # e.g. a field over the csv module's size limit: a binary file
        raise ValueError(f"DATA {str(p)!r} is not a readable CSV/TSV file ({err}); is it a binary file?") from None


def _parse_text(p: Path, delimiter: str) -> np.ndarray:
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        first = next((row for row in reader if row), None)
        if first is None:
            raise ValueError(f"DATA {str(p)!r} is empty")
        header = not all(_is_number(v) for v in first)
        header_lines = reader.line_num if header else 0  # a quoted header field may span lines
    names = [v.strip() for v in first] if header else [f"column {i}" for i in range(len(first))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            arr = np.loadtxt(
                p, delimiter=delimiter, skiprows=header_lines, ndmin=2, dtype=np.float64, encoding="utf-8-sig"
            )
    except ValueError:  # quoted numbers, or a bad field: parse row by row to say which
        arr = _parse_text_slow(p, delimiter, names, header)
    if arr.shape[0] == 0:
        raise ValueError(f"DATA {str(p)!r} has a header but no data rows")
    return arr


def _parse_text_slow(p: Path, delimiter: str, names: list[str], header: bool) -> np.ndarray:
    """Parse with the csv module; a bad field raises a ValueError naming its column and line."""
    rows = []
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        skip = header  # the header is the first non-empty row
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if skip:
                skip = False
                continue
            if len(row) != len(names):
                raise ValueError(f"DATA {str(p)!r} line {line} has {len(row)} fields, expected {len(names)}")
            for i, value in enumerate(row):
                if not _is_number(value):
                    what = "an empty field" if not value.strip() else repr(value.strip())
                    raise ValueError(
                        f"DATA {str(p)!r}: column {_column(names, i, header)} is not numeric "
                        f"(line {line} holds {what}); drop, fill or encode that column"
                    )
            rows.append([float(v) for v in row])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))


def _column(names: list[str], i: int, header: bool) -> str:
    return f"{names[i]!r} (column {i + 1})" if header else f"{i + 1}"


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _read_parquet(p: Path) -> np.ndarray:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(
            f"reading {str(p)!r} needs pyarrow, which is not installed; run `pip install pyarrow` "
            "or convert the file to .npy or .csv"
        ) from err
    try:
        table: Any = pq.read_table(p)
    except Exception as err:  # pyarrow raises its own error types for bad files
        raise ValueError(f"DATA {str(p)!r} is not a readable parquet file: {err}") from err
    import pyarrow.types as pat

    for field in table.schema:
        t = field.type
        if not (pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t)):
            raise ValueError(
                f"DATA {str(p)!r}: column {field.name!r} is not numeric (type {t}); drop or encode that column"
            )
    return np.column_stack([table.column(i).to_numpy(zero_copy_only=False) for i in range(table.num_columns)])
