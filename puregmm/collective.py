"""Collectives over a ``torch.distributed`` process group, as the ``reduce=`` hook of the kernels.

A :class:`Collective` sums pytrees of tensors (one packed ``all_reduce`` per dtype), gathers,
broadcasts, and reduces :class:`puregmm.Stats` (sums all-reduced, the ``worst_*`` pair
K-min merged in rank order). Every collective is bounded by the group's timeout and a failure
raises :class:`DistributedError` instead of hanging. Without an initialised group (or with one
rank) a Collective returns its input. :func:`shard_bounds` splits N rows over the ranks.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm.em import Stats

DEFAULT_TIMEOUT_S = 300.0  # seconds a collective may wait for the slowest rank


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank most likely raised, died or hangs.

    The process group is unusable afterwards: call ``torch.distributed.destroy_process_group()``
    before the process exits (gloo may otherwise abort at interpreter shutdown).
    """


def is_active(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def init(backend: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Collective:
    """Initialise the default process group from the environment (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), if not done yet; return its :class:`Collective`.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); ``None``: nccl when CUDA is available
            (each rank then uses GPU ``LOCAL_RANK``), else gloo.
        timeout: seconds after which a collective waiting for another rank fails with
            :class:`DistributedError` instead of hanging.

    Raises:
        ValueError: a non-positive timeout, or ``RANK``/``WORLD_SIZE`` unset (not launched
            by torchrun or a similar launcher) when no process group exists yet.
    """
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")
    if not dist.is_available():
        raise ValueError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(
                f"no process group and {', '.join(missing)} unset: launch with torchrun, e.g. "
                "`torchrun --nproc_per_node=2 -m puregmm fit data.npy -k 8 --distributed --out run/`, "
                "or call torch.distributed.init_process_group yourself"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
    return Collective()


@dataclass(frozen=True)
class Collective:
    """Collectives over a process group (``None``: the default one), on pytrees of tensors.

    A no-op on one process: ``sum`` returns its input, ``gather`` adds a [1] axis. Leaves are
    packed per dtype, so each call is one collective per dtype. Pass it as ``reduce=`` to
    :func:`puregmm.em_step` (it is callable on :class:`puregmm.Stats`) and :func:`puregmm.step`.
    """

    group: Any = None

    @property
    def active(self) -> bool:
        return is_active(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def sum(self, tree: Any) -> Any:
        """Every leaf summed over the ranks (``all_reduce(SUM)``), identical on every rank."""
        if not self.active:
            return tree
        leaves, spec = pytree.tree_flatten(tree)
        out: list[Tensor] = list(leaves)
        for idx, flat in _packs(leaves):
            self._wrap("all_reduce", functools.partial(dist.all_reduce, flat, group=self.group))
            for i, part in zip(idx, _split(flat, [leaves[i] for i in idx])):
                out[i] = part
        return pytree.tree_unflatten(out, spec)

    def gather(self, tree: Any) -> Any:
        """Every leaf stacked over the ranks in rank order: shape [W, *leaf.shape]."""
        if not self.active:
            return pytree.tree_map(lambda t: t.unsqueeze(0), tree)
        leaves, spec = pytree.tree_flatten(tree)
        out: list[Tensor] = list(leaves)
        w = self.world_size
        for idx, flat in _packs(leaves):
            parts = [torch.empty_like(flat) for _ in range(w)]
            self._wrap("all_gather", functools.partial(dist.all_gather, parts, flat, group=self.group))
            stacked = torch.stack(parts)  # [W, n]
            offset = 0
            for i in idx:
                size = leaves[i].numel()
                out[i] = stacked[:, offset : offset + size].reshape(w, *leaves[i].shape)
                offset += size
        return pytree.tree_unflatten(out, spec)

    def broadcast(self, tree: Any, src: int = 0) -> Any:
        """Rank ``src``'s leaves on every rank (same structure and shapes required)."""
        if not self.active:
            return tree
        leaves, spec = pytree.tree_flatten(tree)
        out: list[Tensor] = list(leaves)
        for idx, flat in _packs(leaves):
            self._wrap("broadcast", functools.partial(dist.broadcast, flat, src, group=self.group))
            for i, part in zip(idx, _split(flat, [leaves[i] for i in idx])):
                out[i] = part
        return pytree.tree_unflatten(out, spec)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Picklable objects of every rank, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._wrap("all_gather_object", functools.partial(dist.all_gather_object, out, obj, group=self.group))
        return out

    def __call__(self, stats: Stats) -> Stats:
        """:func:`reduce_stats`: the :class:`puregmm.Stats` of the union of every rank's rows."""
        return reduce_stats(stats, self)

    def _wrap(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as err:  # includes torch.distributed.DistBackendError
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({first}). Another rank most likely "
                "raised an error, died or is stuck: look for its traceback. The wait is bounded by the "
                "process group's timeout (pg.distributed.init(timeout=...)); destroy the broken group before exiting."
            ) from err


def _packs(leaves: list[Any]) -> list[tuple[list[int], Tensor]]:
    """Leaf indices grouped by (dtype, device), each group flattened into one new buffer."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(leaves):
        if not isinstance(t, Tensor):
            raise TypeError(f"collectives take pytrees of tensors; leaf {i} is {type(t).__name__}")
        if t.dtype == torch.bool:
            raise TypeError(f"collectives do not take bool tensors (leaf {i}); convert with .to(torch.int64)")
        groups.setdefault((t.dtype, t.device), []).append(i)
    return [(idx, torch.cat([leaves[i].detach().reshape(-1) for i in idx])) for idx in groups.values()]


def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    sizes = [t.numel() for t in like]
    return [p.reshape(t.shape) for p, t in zip(torch.split(flat, sizes), like)]


def collective(group: Any = None) -> Collective:
    """The :class:`Collective` of ``group`` (``None``: the default process group)."""
    return Collective(group)


def reduce_stats(stats: Stats, comm: Collective | None = None) -> Stats:
    """The :class:`puregmm.Stats` of the union of every rank's rows, identical on every rank.

    The five summable fields are all-reduced in one packed ``all_reduce(SUM)``; the ``worst_*``
    pair is all-gathered and K-min merged with a stable sort in rank order (what folding
    :func:`puregmm.combine` over the ranks gives). Leading batch dims (stacked params) are kept.
    """
    comm = Collective() if comm is None else comm
    if not comm.active:
        return stats
    resp, xs, xx, ll, ws = comm.sum((stats.resp_sum, stats.x_sum, stats.xx_sum, stats.log_lik_sum, stats.weight_sum))
    vals, pts = comm.gather((stats.worst_log_lik, stats.worst_x))  # [W, B..., K], [W, B..., K, D]
    k = stats.worst_log_lik.shape[-1]
    vals = vals.movedim(0, -2).flatten(-2)  # [B..., W·K], rank-major
    pts = pts.movedim(0, -3).flatten(-3, -2)  # [B..., W·K, D]
    order = torch.sort(vals, stable=True).indices[..., :k]  # [B..., K]
    worst = torch.take_along_dim(vals, order, -1)
    worst_x = torch.take_along_dim(pts, order.unsqueeze(-1), -2)
    return Stats(resp, xs, xx, ll, ws, worst, worst_x)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` in an even split of ``n`` rows (the first ``n % W``
    ranks get one row more, as ``numpy.array_split``)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)
