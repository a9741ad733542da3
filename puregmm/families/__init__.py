"""Covariance families, one table row each.

Every family stores the precision of each component through an *unconstrained* factor
``raw`` (the field ``GMMParams.scale``) so that any real value is a valid covariance:

=========  ===============  ======================================================
family     ``scale`` shape  precision of component k
=========  ===============  ======================================================
full       [K, D, D]        U_k U_kᵀ, U_k = triu(raw_k, 1) + diag(exp(diag raw_k))
tied       [D, D]           U Uᵀ (the same U for every component)
diagonal   [K, D]           diag(exp(2 raw_k))
isotropic  [K]              exp(2 raw_k) · I
shared     []               exp(2 raw) · I (one variance for all components)
constant   []               exp(2 raw) · I, fixed: never learned by ``step``/EM
=========  ===============  ======================================================

U is scikit-learn's ``precisions_cholesky_`` (upper triangular, precision = U Uᵀ), so that
``(x - μ) @ U`` whitens ``x``. ``raw`` is therefore minus the log standard deviation for the
scalar and diagonal families.
"""

from __future__ import annotations

from puregmm.families import _row
from puregmm.families._helpers import (
    LOG_2PI,
    SQUARE_MAX_D,
    Layout,
    MStepWeights,
    floored_upper_factor,
    layout,
    raw_from_cov_repaired,
    upper_factor,
)
from puregmm.families._row import Family

__all__ = [
    "FAMILIES", "LOG_2PI", "SQUARE_MAX_D", "Family", "Layout", "MStepWeights", "floored_upper_factor", "get_family",
    "layout", "raw_from_cov_repaired", "upper_factor",
]  # fmt: skip

_TABLE = {
    "full": Family("full", 2, True, True),
    "tied": Family("tied", 2, False, True),
    "diagonal": Family("diagonal", 1, True, True),
    "isotropic": Family("isotropic", 0, True, True),
    "shared": Family("shared", 0, False, True),
    "constant": Family("constant", 0, False, False),
}
#: The families' names, in the table's order: a new row is a new family.
FAMILIES = tuple(_TABLE)
_row.FIXED_VARIANCE = tuple(name for name, row in _TABLE.items() if not row.learned)


def get_family(name: object) -> Family:
    """The :class:`Family` called ``name``; ``ValueError`` listing the choices otherwise."""
    if not isinstance(name, str) or name not in _TABLE:
        raise ValueError(f"unknown family {name!r}; choose one of {FAMILIES}")
    return _TABLE[name]
