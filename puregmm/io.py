"""Saving and loading params (and any pytree of tensors) as safetensors files.

Design decisions:

* **No pickle.** Files are `safetensors <https://github.com/huggingface/safetensors>`_: a JSON
  header and raw tensor bytes, so loading never runs code.
* **Self-describing.** The header's string metadata holds the library name, a ``kind``
  (``"params"`` for :func:`save`; a checkpoint writer picks its own), a format version, the
  tensors' names, shapes and dtypes, and for params the family, K, D and dtype.
* **Validated.** A SHA-256 checksum over the metadata and every tensor's name, dtype, shape and
  bytes is stored too, so a truncated, tampered (flipped bytes anywhere) or foreign file raises a
  ``ValueError`` that says what is wrong, never a ``SafetensorError`` or a silently wrong model.
* **Atomic.** Writes go to a temporary file in the target's folder, are flushed and fsynced, then
  renamed over the target with :func:`os.replace`: a process killed mid-save leaves the previous
  file intact (and at worst a stray ``.<name>.*.tmp`` file beside it). A symlink is followed (the
  link is kept), and a folder, device or FIFO is refused (:mod:`puregmm._files`).
* **Symmetric.** :func:`save` runs the checks :func:`load` runs, so it never writes a file that
  ``load`` rejects.

Two layers: :func:`save_tree`/:func:`load_tree` write and read any pytree whose leaves are
tensors (a ``TrainState``, a fit history, an EM loop state...) with caller metadata;
:func:`save`/:func:`load` are the params-specific wrappers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate
from puregmm._files import write_atomic
from puregmm.families import FAMILIES, Family, get_family
from puregmm.params import GMMParams

PathLike = Union[str, "os.PathLike[str]"]

LIBRARY = "puregmm"
FORMAT_VERSION = 1
PARAMS_KIND = "params"
_PARAM_LEAVES = ("logits", "means", "scale")


def _usable(name: str, leaf: Tensor) -> Tensor:
    """Finite entries, and logits of -inf (masked components, :func:`puregmm.pad_components`)."""
    ok = torch.isfinite(leaf)
    return ok | (leaf == -math.inf) if name == "logits" else ok


# Keys of the metadata that the writer owns; callers of save_tree may not set them.
RESERVED = ("library", "kind", "format_version", "puregmm_version", "torch_version", "tensors", "checksum")


class TreeFile(NamedTuple):
    """What :func:`load_tree` returns: the tree (or a name -> tensor dict) and the caller's metadata."""

    tree: Any
    metadata: dict[str, str]


# --- public API ------------------------------------------------------------------------------


def save(params: GMMParams, path: PathLike) -> None:
    """Save ``params`` to ``path`` (a safetensors file; atomic: the old file survives a crash).

    The metadata holds the family, K, D, dtype, batch shape and the format version; a checksum
    guards the contents. Tensors are written from the CPU; :func:`load` gives them back exactly.
    ``save`` runs the checks :func:`load` runs, so it never writes a file that ``load`` rejects.
    A symlink at ``path`` is followed (its target is replaced, the link kept).

    Args:
        params: the params to save (any batch dims).
        path: target file (``str`` or ``os.PathLike``); its folder must exist.

    Raises:
        TypeError: ``params`` is not :class:`puregmm.GMMParams`, a leaf is not a tensor or not
            floating point.
        ValueError: ``params`` holds NaN or Inf, has an unknown family, leaves of different
            dtypes or shapes that disagree with its family, K and D; ``path`` is a device, FIFO
            or socket (nothing is written).
        FileNotFoundError, NotADirectoryError, IsADirectoryError: ``path`` cannot be a file.

    >>> import tempfile, os, torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.3, 0.7]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> pg.save(p, path); pg.load(path)
    GMMParams(family='full', K=2, D=2, dtype=float32, device=cpu)
    """
    meta = _params_meta(params)
    _check_params(_leaves(params), meta, f"params (nothing saved to {os.fspath(_validate.path(path))!r})")
    save_tree(params, path, meta, kind=PARAMS_KIND)


def load(path: PathLike, *, device: Any = None) -> GMMParams:
    """Load params written by :func:`save`.

    Args:
        path: the file.
        device: where to put the tensors (default CPU).

    Returns:
        the saved :class:`puregmm.GMMParams`, bit for bit.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated or corrupted, was modified after writing, is not a
            puregmm params file (another library's tensors, a checkpoint), comes from a newer
            format version, or holds shapes/dtypes that disagree with its family, K and D.

    >>> import tempfile, os, torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.3, 0.7]), torch.zeros(2, 1), torch.ones(2, 1, 1), "diagonal")
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> pg.save(p, path)
    >>> q = pg.load(path)
    >>> q.family, all(torch.equal(getattr(p, f), getattr(q, f)) for f in ("logits", "means", "scale"))
    ('diagonal', True)
    """
    tensors, meta = _read(_validate.path(path), PARAMS_KIND)
    spec = _check_params(tensors, meta, f"{os.fspath(path)!r}")
    params = GMMParams(tensors["logits"], tensors["means"], tensors["scale"], spec.name)
    return params if device is None else params.to(device)


def save_tree(tree: Any, path: PathLike, metadata: dict[str, str] | None = None, *, kind: str = "tree") -> None:
    """Atomically save a pytree of tensors with string ``metadata`` (the layer under :func:`save`).

    Leaves are named by their pytree path (``params.means``, ``opt_state.mu.scale``, ...), so a
    reader can rebuild the tree from a template (:func:`load_tree` with ``like=``).

    Args:
        tree: a pytree whose leaves are all tensors (registered dataclasses, NamedTuples,
            dicts, lists...). Static pytree context (e.g. a params' family) is not stored:
            put what the reader needs into ``metadata``.
        path: target file; its folder must exist.
        metadata: extra ``str -> str`` entries; the keys in :data:`RESERVED` are the writer's.
        kind: what the file holds (e.g. ``"params"``, ``"checkpoint"``); readers check it.

    Raises:
        TypeError: a leaf is not a tensor, or metadata is not ``str -> str``.
        ValueError: metadata uses a reserved key.

    >>> import tempfile, os, torch, puregmm as pg
    >>> path = os.path.join(tempfile.mkdtemp(), "tree.safetensors")
    >>> pg.save_tree({"w": torch.ones(2), "b": torch.zeros(())}, path, {"note": "run 3"})
    >>> pg.load_tree(path).metadata["note"]
    'run 3'
    """
    _validate.path(path)
    tensors = _flatten(tree)
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; got {key!r}: {type(value).__name__} (use json.dumps)")
        if key in RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved by puregmm.io; choose another name")
    meta.update(
        library=LIBRARY,
        kind=str(kind),
        format_version=str(FORMAT_VERSION),
        puregmm_version=_version(),
        torch_version=torch.__version__,
        tensors=json.dumps({n: [_dtype_name(t.dtype), list(t.shape)] for n, t in tensors.items()}, sort_keys=True),
    )
    meta["checksum"] = _checksum(tensors, meta)
    from safetensors.torch import save as to_bytes

    write_atomic(path, to_bytes(tensors, metadata=meta))


def load_tree(path: PathLike, like: Any = None, *, kind: str = "tree") -> TreeFile:
    """Read a file written by :func:`save_tree`, checking library, kind, version and checksum.

    Args:
        path: the file.
        like: a template pytree of the same structure (e.g. a fresh ``TrainState``); the tensors
            are checked against its names, shapes and dtypes and put into its structure. ``None``
            returns a ``{name: tensor}`` dict instead.
        kind: the ``kind`` the file must have been written with.

    Returns:
        :class:`TreeFile` ``(tree, metadata)``; ``metadata`` holds the caller's entries and the
        writer's (:data:`RESERVED`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated, corrupted, modified, foreign, other kind, newer version, or not
            matching ``like``.

    >>> import tempfile, os, torch, puregmm as pg
    >>> path = os.path.join(tempfile.mkdtemp(), "tree.safetensors")
    >>> pg.save_tree({"w": torch.ones(2), "b": torch.zeros(())}, path)
    >>> pg.load_tree(path, like={"w": torch.zeros(2), "b": torch.zeros(())}).tree
    {'w': tensor([1., 1.]), 'b': tensor(0.)}
    """
    tensors, meta = _read(_validate.path(path), kind)
    if like is None:
        return TreeFile(tensors, meta)
    return TreeFile(_unflatten_like(tensors, like, repr(os.fspath(path))), meta)


# --- internals -------------------------------------------------------------------------------

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _leaves(params: GMMParams) -> dict[str, Tensor]:
    return {name: getattr(params, name) for name in _PARAM_LEAVES}


def _params_meta(params: Any) -> dict[str, str]:
    """The params metadata of a file, after checking what it is computed from."""
    if not isinstance(params, GMMParams):
        raise TypeError(f"params must be GMMParams (e.g. from pg.fit(...).params); got {type(params).__name__}")
    for name, leaf in _leaves(params).items():
        if not isinstance(leaf, Tensor):
            raise TypeError(f"params.{name} must be a torch.Tensor; got {type(leaf).__name__}")
    if params.means.dim() < 2 or params.logits.dim() < 1:
        raise ValueError(
            f"params.means must be [..., K, D] and params.logits [..., K]; got shapes "
            f"{tuple(params.means.shape)} and {tuple(params.logits.shape)}"
        )
    if params.family not in FAMILIES:
        raise ValueError(f"params.family is {params.family!r}, not a family; choose one of {FAMILIES}")
    if _dtype_name(params.dtype) not in _FLOATS:
        raise TypeError(f"params must be floating point ({', '.join(_FLOATS)}); params.means is {params.dtype}")
    return {
        "family": params.family,
        "n_components": str(params.n_components),
        "dim": str(params.dim),
        "dtype": _dtype_name(params.dtype),
        "batch_shape": json.dumps(list(params.batch_shape)),
    }


def _check_params(tensors: dict[str, Tensor], meta: dict[str, str], where: str) -> Family:
    """What a params file must hold: run by :func:`save` before writing and :func:`load` after
    reading, so that ``save`` never writes a file that ``load`` rejects."""
    try:
        spec = get_family(meta.get("family"))
        k, d = int(meta["n_components"]), int(meta["dim"])
        batch = tuple(int(b) for b in json.loads(meta["batch_shape"]))
        if meta["dtype"] not in _FLOATS:
            raise ValueError(f"dtype {meta['dtype']!r} is not one of {_FLOATS}")
        dtype = _DTYPES[meta["dtype"]]
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{where} has bad params metadata ({err}); it was not written by pg.save") from err
    expected = {
        "logits": (dtype, (*batch, k)),
        "means": (dtype, (*batch, k, d)),
        "scale": (dtype, (*batch, *spec.scale_shape(k, d))),
    }
    _check_tensors(tensors, expected, where)
    for name in _PARAM_LEAVES:
        if not bool(_usable(name, tensors[name]).all()):
            raise ValueError(f"{where}: params.{name} holds NaN or Inf; refusing a broken model")
    return spec


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _version() -> str:
    from puregmm import __version__

    return __version__


def _leaf_name(key_path: Any) -> str:
    """``params.means``, ``opt_state.mu.scale``, ``history.0``: a leaf's pytree path, dotted."""
    parts = []
    for k in key_path:
        part = getattr(k, "name", getattr(k, "key", getattr(k, "idx", None)))
        parts.append(str(part if part is not None else k))
    return ".".join(parts) or "leaf"


def _flatten(tree: Any) -> dict[str, Tensor]:
    """``{path name: contiguous CPU copy}`` for every leaf of ``tree``."""
    leaves, _ = pytree.tree_flatten_with_path(tree)
    out: dict[str, Tensor] = {}
    for key_path, leaf in leaves:
        name = _leaf_name(key_path)
        if name in out:
            raise ValueError(f"two leaves are both named {name!r}; rename a key (dots in dict keys clash)")
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"tree: every leaf must be a torch.Tensor; leaf {name!r} is {type(leaf).__name__} (wrap it)"
            )
        if _dtype_name(leaf.dtype) not in _DTYPES:
            raise TypeError(f"tree: leaf {name!r} has dtype {leaf.dtype}; supported: {sorted(_DTYPES)}")
        out[name] = leaf.detach().to("cpu", copy=True).contiguous()  # a copy: no shared storage
    return out


def _checksum(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, _dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _header_metadata(blob: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    return header.get("__metadata__") or {}


def _read(path: PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a checked puregmm file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as from_bytes

    where = repr(os.fspath(path))
    blob = Path(path).read_bytes()
    try:
        tensors = from_bytes(blob)
        meta = _header_metadata(blob)
    except (SafetensorError, ValueError, UnicodeDecodeError, struct.error) as err:
        raise ValueError(
            f"{where} is not a readable safetensors file (truncated or corrupted?): {err}; re-create it with pg.save"
        ) from err
    if meta.get("library") != LIBRARY:
        raise ValueError(
            f"{where} is a safetensors file but not a puregmm one (no library='puregmm' in its metadata; "
            f"it holds tensors {sorted(tensors)[:6]}); load puregmm models written by pg.save"
        )
    version = meta.get("format_version", "")
    if not version.isdigit():
        raise ValueError(f"{where} has a bad format_version {version!r}; the file was modified or corrupted")
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{where} uses puregmm file format {version}, newer than this puregmm reads ({FORMAT_VERSION}); "
            "upgrade puregmm"
        )
    if meta.get("checksum") != _checksum(tensors, meta):
        raise ValueError(f"{where} fails its checksum: the file was modified or corrupted after it was written")
    if meta.get("kind") != kind:
        raise ValueError(f"{where} holds a puregmm {meta.get('kind')!r} file, not {kind!r}; use the matching loader")
    return tensors, meta


def _unflatten_like(tensors: dict[str, Tensor], like: Any, where: str) -> Any:
    """Put ``tensors`` into the structure of ``like``, checking names, shapes and dtypes."""
    _check_tensors(tensors, _flatten_shapes(like), where)
    leaves, spec = pytree.tree_flatten_with_path(like)
    values = [tensors[_leaf_name(p)] for p, _ in leaves]
    return pytree.tree_unflatten(values, spec)


def _check_tensors(
    tensors: dict[str, Tensor], expected: dict[str, tuple[torch.dtype, tuple[int, ...]]], where: str
) -> None:
    """The file's tensors have exactly the expected names, dtypes and shapes."""
    if set(tensors) != set(expected):
        raise ValueError(
            f"{where} holds tensors {sorted(tensors)}, expected {sorted(expected)}; "
            "it was written for a different structure"
        )
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"{where}: tensor {name!r} is {_dtype_name(t.dtype)} {tuple(t.shape)}, "
                f"expected {_dtype_name(dtype)} {shape}"
            )


def _flatten_shapes(tree: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    leaves, _ = pytree.tree_flatten_with_path(tree)
    out = {}
    for key_path, leaf in leaves:
        name = _leaf_name(key_path)
        if not isinstance(leaf, Tensor):
            raise TypeError(f"like must have tensor leaves; leaf {name!r} is {type(leaf).__name__}")
        out[name] = (leaf.dtype, tuple(leaf.shape))
    return out
