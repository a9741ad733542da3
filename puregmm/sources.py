"""Data sources: where the rows of a fit come from, read in chunks, never whole.

=================================  ==========================================================
``np.ndarray`` / ``np.memmap``     rows ``[lo, lo + chunk_size)`` copied one chunk at a time
``str`` / ``os.PathLike``          :func:`puregmm.data.load_data` (``.npy`` is memory-mapped)
``torch.Tensor``                   chunk views (already in memory)
callable                           ``source()`` returns a fresh iterator of batches per pass
other iterable                     a list of batches is re-read; an iterator can be read once
=================================  ==========================================================

A :class:`Source` feeds the one E-step (:func:`puregmm.sufficient_stats`) chunk by chunk:
:func:`pass_stats` sums the statistics of a pass with :func:`puregmm.combine` and, on a rank
of a distributed fit, reduces them over the ranks. What is done with the statistics (an
M-step, a stepwise blend) belongs to the method (:mod:`puregmm.stream`, :mod:`puregmm.online`).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from puregmm import _validate, keys
from puregmm.em import Stats, combine, sufficient_stats
from puregmm.params import GMMParams, precision_cholesky

CHUNK_ELEMENTS = 2**22  # default chunk: about this many values per read (16 MB in float32)


def default_chunk_rows(d: int) -> int:
    """Rows per read for D columns: about :data:`CHUNK_ELEMENTS` values, at least 1024 rows."""
    return max(1024, CHUNK_ELEMENTS // max(1, d))


def is_stream(data: Any) -> bool:
    """Whether :func:`puregmm.fit` should hand ``data`` to :func:`fit_stream`: a path, an
    ``np.memmap``, a callable or an iterator (lists and arrays are in-memory data)."""
    return (
        isinstance(data, (str, os.PathLike, np.memmap))
        or (callable(data) and not isinstance(data, Tensor))
        or isinstance(data, Iterator)
    )


class Source:
    """A stream of [n_i, D] float chunks; ``passes()`` starts a new pass over the data.

    Attributes:
        reusable: whether the data can be read more than once.
        n_rows: total rows when known (array sources), else ``None``.
        d: columns when known before reading, else ``None``.
    """

    def __init__(self, source: Any, chunk_size: int | None, dtype: torch.dtype | None, device: Any = None) -> None:
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        # a power of two the chunks are divided by, set by fit_stream (power_of_two_scale); None: not yet
        self.scale: float | None = None
        self._array: Any = None
        self._factory: Callable[[], Iterable[Any]] | None = None
        self._once: Iterator[Any] | None = None
        self._used = False
        self._verified = False  # an array source is checked on its first full pass only
        self.n_rows: int | None = None
        self.d: int | None = None
        if isinstance(source, (str, os.PathLike)):
            from puregmm.data import load_data

            source = load_data(source)
        if isinstance(source, (np.ndarray, Tensor)):
            if source.ndim != 2 or source.shape[0] == 0 or source.shape[1] == 0:
                raise ValueError(f"source must be 2-D [N, D] and non-empty; got shape {tuple(source.shape)}")
            self._array = source
            self.n_rows, self.d = int(source.shape[0]), int(source.shape[1])
        elif callable(source):
            self._factory, self.n_rows, self.d = source, None, None
        elif isinstance(source, Iterator):
            self._once, self.n_rows, self.d = source, None, None
        elif isinstance(source, Iterable):
            self._factory, self.n_rows, self.d = (lambda: source), None, None
        else:
            raise TypeError(
                "source must be an array [N, D], a np.memmap, a .npy path, a callable returning an iterator of "
                f"batches, or an iterable of batches; got {type(source).__name__}"
            )
        self.reusable = self._once is None
        if chunk_size is not None:
            chunk_size = _validate.positive_int(chunk_size, "chunk_size")
        self.chunk_size = chunk_size or default_chunk_rows(self.d or 1)

    def passes(self) -> Iterator[Tensor]:
        """One pass: checked chunks [n_i, D] (2-D, non-empty, finite, consistent D); an array
        source, which cannot change, is checked on its first complete pass only."""
        if self._array is not None:
            n = self.n_rows
            assert n is not None
            verified = self._verified
            for lo in range(0, n, self.chunk_size):
                part = read_rows(self._array, lo, min(n, lo + self.chunk_size))
                yield self._convert(part) if verified else self._check(part, lo)
            self._verified = True
            return
        if self._once is not None:
            if self._used:
                raise ValueError(
                    "this source is an iterator and was read already; pass a callable returning a fresh "
                    "iterator per pass (e.g. lambda: batches(path)) to read the data more than once"
                )
            self._used = True
            batches: Iterable[Any] = self._once
        else:
            assert self._factory is not None
            batches = _validate.batches(self._factory())
        row = 0
        for batch in batches:
            t = self._check(batch, row)
            row += t.shape[0]
            yield t
        if row == 0:
            raise ValueError("the source yielded no rows")

    def sample(self, rows: int, key: Tensor) -> Tensor:
        """Up to ``rows`` rows for initialisation: all rows of a small array source, a uniform
        sample (sorted, distinct) of a large one; the first batch of an iterable."""
        if self._once is not None:  # peek, then put the batch back in front
            head = next(self._once, None)
            if head is None:
                raise ValueError("the source yielded no rows")
            self._once = itertools.chain([head], self._once)
            return self._check(head, 0)
        if self._array is None:
            return next(iter(self.passes()))
        n = self.n_rows
        assert n is not None
        if n <= rows:
            return self._check(read_rows(self._array, 0, n), 0)
        idx = np.unique(keys.index(key, 1, torch.arange(rows), n=n).numpy())
        arr = self._array
        part = arr[torch.from_numpy(idx)] if isinstance(arr, Tensor) else arr[idx]
        return self._check(part, 0)

    def _convert(self, part: Any) -> Tensor:
        """A chunk of an already verified array source as a tensor of the compute dtype."""
        t = part if isinstance(part, Tensor) else torch.from_numpy(part)
        t = t.to(device=self.device, dtype=self.dtype)
        return t if self.scale in (None, 1.0) else t / self.scale

    def _check(self, batch: Any, row: int) -> Tensor:
        name = f"source rows {row}.." if self._array is not None else f"batch starting at row {row}"
        t = _validate.data(batch, name)
        if self.dtype is None:
            self.dtype = t.dtype
        if self.d is None:
            self.d = t.shape[1]
        if t.shape[1] != self.d:
            raise ValueError(f"{name} has D={t.shape[1]} columns; earlier data had D={self.d}")
        t = t.to(device=self.device, dtype=self.dtype)
        if self.scale is not None:  # the rows of a fit: scaled, and their squares must not overflow
            t = t if self.scale == 1.0 else t / self.scale
            _validate.magnitude(t, name, self.scale)
        return t


def power_of_two_scale(params: GMMParams) -> float:
    """1.0, or the power of two s that brings data described by ``params`` (means and widths
    1/U_jj) near 1 when they lie beyond 2^±(exponent range / 4) of the dtype: there, sums of
    squares in the E-step would overflow (|x| ≳ √max) or lose their precision to underflow.
    Dividing by s is exact, so a streamed fit is affine-equivariant (the in-memory fit
    standardises instead, :func:`puregmm.methods.standardisation`)."""
    with torch.no_grad():
        widths = 1.0 / torch.diagonal(precision_cholesky(params), dim1=-2, dim2=-1).abs()
        size = float(torch.maximum(params.means.abs().amax(), widths.amax()))
    info = torch.finfo(params.dtype)
    hi, lo = math.log2(info.max) / 4, math.log2(info.tiny) / 4
    if size == 0.0 or lo <= math.log2(size) <= hi:
        return 1.0
    return 2.0 ** round(math.log2(size))


def read_rows(arr: Any, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of an array source as an in-memory array (a memmap slice is copied)."""
    if isinstance(arr, Tensor):
        return arr[lo:hi]
    return np.array(arr[lo:hi])


def pass_stats(src: Source, params: GMMParams, reduce: Any = None) -> Stats:
    """:class:`puregmm.Stats` of the whole source at ``params``, one chunk at a time; with
    ``reduce`` (a :class:`puregmm.distributed.Collective`), of every rank's source."""
    total: Stats | None = None
    for xb in src.passes():
        check_dim(params, xb)
        part = sufficient_stats(params, xb)
        total = part if total is None else combine(total, part)
    assert total is not None
    return total if reduce is None else reduce(total)


def mean_nll(src: Source, params: GMMParams, reduce: Any = None) -> Tensor:
    """Mean negative log-likelihood of the whole source (one pass of the E-step's
    log-likelihood, as :func:`puregmm.fit` reports for EM); with ``reduce``, of every rank's."""
    total = torch.zeros((), dtype=params.dtype, device=params.device)
    count = torch.zeros((), dtype=params.dtype, device=params.device)
    with torch.no_grad():
        for xb in src.passes():
            check_dim(params, xb)
            total = total - sufficient_stats(params, xb).log_lik_sum
            count = count + xb.shape[0]
    if reduce is not None:
        total, count = reduce.sum((total, count))
    return total / count


def check_dim(params: GMMParams, xb: Tensor) -> None:
    if xb.shape[1] != params.dim:
        raise ValueError(f"the data has D={xb.shape[1]} columns but the params have D={params.dim}")
