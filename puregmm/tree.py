"""Small pytree helpers over ``torch.utils._pytree`` (params, optimiser states)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


def tree_map2(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` over matching leaves of trees of the same structure; names both structures on mismatch."""
    leaves, spec = pytree.tree_flatten(tree)
    others = []
    for other in rest:
        o_leaves, o_spec = pytree.tree_flatten(other)
        if o_spec != spec:
            raise ValueError(f"pytree structures differ:\n  {spec}\nvs\n  {o_spec}")
        others.append(o_leaves)
    return pytree.tree_unflatten([fn(*args) for args in zip(leaves, *others)], spec)


def zeros_like(tree: Any) -> Any:
    return tree_map(torch.zeros_like, tree)


def all_finite(tree: Any) -> Tensor:
    """0-d bool: every leaf of ``tree`` is finite."""
    flags = [torch.isfinite(t).all() for t in tree_leaves(tree) if isinstance(t, Tensor)]
    return torch.stack(flags).all()
