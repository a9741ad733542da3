"""Small pytree helpers over ``torch.utils._pytree`` (params, optimiser states)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


def tree_map2(fn: Callable[..., Any], tree: Any, *rest: Any, names: tuple[str, ...] = ()) -> Any:
    """``fn`` over matching leaves of trees of tensors of the same structure and leaf shapes.

    Static checks (no tensor op): a mismatch raises, naming the trees by ``names`` (default
    ``tree``, ``other1``, ...) and showing what was expected and what came in."""
    names = names or ("tree", *(f"other{i + 1}" for i in range(len(rest))))
    if len(names) != 1 + len(rest):
        raise ValueError(f"tree_map2: names must name all {1 + len(rest)} trees; got {names}")
    leaves, spec = pytree.tree_flatten(tree)
    _tensor_leaves(leaves, names[0])
    others = []
    for name, other in zip(names[1:], rest):
        o_leaves, o_spec = pytree.tree_flatten(other)
        if o_spec != spec:
            raise ValueError(f"{name} must have the pytree structure of {names[0]}:\n  {spec}\ngot\n  {o_spec}")
        _tensor_leaves(o_leaves, name)
        shapes, o_shapes = [tuple(t.shape) for t in leaves], [tuple(t.shape) for t in o_leaves]
        if o_shapes != shapes:
            raise ValueError(f"{name} must have the leaf shapes of {names[0]}, {shapes}; got {o_shapes}")
        others.append(o_leaves)
    return pytree.tree_unflatten([fn(*args) for args in zip(leaves, *others)], spec)


def _tensor_leaves(leaves: list[Any], name: str) -> None:
    bad = [type(t).__name__ for t in leaves if not isinstance(t, Tensor)]
    if bad:
        raise TypeError(f"{name} must be a pytree of tensors; got leaves of type {bad[:3]}")


def zeros_like(tree: Any) -> Any:
    return tree_map(torch.zeros_like, tree)


def all_finite(tree: Any) -> Tensor:
    """0-d bool: every leaf of ``tree`` is finite."""
    flags = [torch.isfinite(t).all() for t in tree_leaves(tree) if isinstance(t, Tensor)]
    return torch.stack(flags).all()
