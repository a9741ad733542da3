"""Mixture parameters: a frozen dataclass registered as a pytree.

The three tensor leaves are unconstrained (mixture logits, means, the family's precision
factor ``scale``, see :mod:`puregmm.families`); ``family`` is static pytree metadata, so
``torch.func.grad``/``vmap`` and ``torch.compile`` see three tensors and a constant string.
Leaves may carry leading batch dimensions (stacked params for ``vmap`` or batched fits).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate, _validate_params
from puregmm.families import Family, get_family


@dataclass(frozen=True)
class GMMParams:
    """Parameters of a Gaussian mixture with K components in D dimensions.

    Attributes:
        logits: [..., K] unnormalised log weights (weights = softmax(logits)).
        means: [..., K, D] component means.
        scale: the family's unconstrained precision factor (shape in :mod:`puregmm.families`).
        family: one of :data:`puregmm.FAMILIES`; static, not a tensor leaf.

    Build them with :func:`puregmm.from_moments`, :func:`puregmm.init` or a fit; the
    constructor checks nothing.

    >>> import torch, puregmm as pg
    >>> p = pg.GMMParams(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), "diagonal")
    >>> p, p.n_components, p.dim, pg.weights(p)
    (GMMParams(family='diagonal', K=2, D=3, dtype=float32, device=cpu), 2, 3, tensor([0.5000, 0.5000]))
    """

    logits: Tensor
    means: Tensor
    scale: Tensor
    family: str = "full"

    @property
    def spec(self) -> Family:
        return get_family(self.family)

    @property
    def n_components(self) -> int:
        return self.means.shape[-2]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.logits.shape[:-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, *args: Any, **kwargs: Any) -> GMMParams:
        """Move/cast every leaf, as ``Tensor.to`` does (device, dtype or both); ``self`` when a
        dtype is all that is asked and every leaf has it (kernels ask on every call)."""
        if not kwargs and len(args) == 1 and isinstance(args[0], torch.dtype):
            if all(t.dtype == args[0] for t in (self.logits, self.means, self.scale)):
                return self
        return pytree.tree_map(lambda t: t.to(*args, **kwargs), self)

    def __repr__(self) -> str:
        batch = f", batch={list(self.batch_shape)}" if self.batch_shape else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"GMMParams(family={self.family!r}, K={self.n_components}, D={self.dim}{batch}, "
            f"dtype={dtype}, device={self.device})"
        )


def _flatten(p: GMMParams) -> tuple[list[Tensor], str]:
    return [p.logits, p.means, p.scale], p.family


def _unflatten(leaves: Any, family: str) -> GMMParams:
    logits, means, scale = leaves
    return GMMParams(logits, means, scale, family)


def _flatten_with_keys(p: GMMParams) -> tuple[list[tuple[Any, Tensor]], str]:
    names = ("logits", "means", "scale")
    return [(pytree.GetAttrKey(n), getattr(p, n)) for n in names], p.family


_validate_params.PARAMS_TYPE = GMMParams  # the entry checks recognise params by this class
pytree.register_pytree_node(
    GMMParams,
    _flatten,
    _unflatten,
    serialized_type_name="puregmm.GMMParams",
    flatten_with_keys_fn=_flatten_with_keys,
)


def replace(params: GMMParams, **changes: Any) -> GMMParams:
    """A copy of ``params`` with some fields replaced (``dataclasses.replace``)."""
    return dataclasses.replace(params, **changes)


# --- moments ---------------------------------------------------------------------------------


def from_moments(weights: Any, means: Any, covariances: Any, family: str = "full") -> GMMParams:
    """Params from mixture weights [K], means [K, D] and covariances [K, D, D].

    The covariances must already have the family's structure (diagonal for ``diagonal``,
    equal across components for ``tied``/``shared``/``constant``, multiples of the identity
    for ``isotropic``/``shared``/``constant``), and be symmetric, within what rounding in
    their dtype leaves (a few dozen eps of their size; :func:`puregmm._validate.rounding_eps`).
    The symmetric part (Σ + Σᵀ)/2 is used.

    Args:
        weights: [K] positive mixture weights summing to 1.
        means: [K, D] component means.
        covariances: [K, D, D] symmetric positive definite component covariances.
        family: one of :data:`puregmm.FAMILIES`.

    Returns:
        unbatched :class:`GMMParams` in the dtype of the inputs.

    Raises:
        ValueError: weights not positive or not summing to 1 (within 1e-6, or rounding), covariances not
            symmetric positive definite or not of the family's structure, or shapes that
            disagree.

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.zeros(2, 3),
    ...                     torch.eye(3).expand(2, 3, 3), family="isotropic")
    >>> p
    GMMParams(family='isotropic', K=2, D=3, dtype=float32, device=cpu)
    """
    return moments_to_params(weights, means, covariances, family)


def moments_to_params(
    weights: Any, means: Any, covariances: Any, family: str, rounding: torch.dtype | None = None
) -> GMMParams:
    """:func:`from_moments` with tolerances from the eps of ``rounding`` (default: the inputs'
    dtype), for converters that check values of a coarser dtype in float64."""
    spec = get_family(family)
    w, mu, cov = _validate.moments(weights, means, covariances, rounding)
    cov = 0.5 * (cov + cov.mT)  # Cholesky would read one triangle; the mean of both is the better estimate
    _validate.covariance_structure(cov, spec, rounding)
    return GMMParams(torch.log(w), mu, spec.raw_from_covariances(cov), family)


def pad_components(params: GMMParams, n_components: int) -> GMMParams:
    """``params`` (any batch dims) grown to ``n_components`` >= K by *masked* components.

    A masked component has logit -inf, so weight 0: it adds nothing to any density, EM and
    gradient descent leave it as it is, and the padded mixture fits exactly as the K-component
    one does. Its mean and scale are copies of component 0's (placeholders that keep every
    leaf finite). This is how mixtures with different K share one batch
    (:func:`puregmm.fit_batched` with one K per dataset).

    Args:
        params: mixture params with K components, any batch dims.
        n_components: the new number of components, an int >= K.

    Returns:
        params with ``n_components`` components (``params`` itself when it equals K).

    Raises:
        ValueError: ``n_components`` not an int >= K.

    >>> import torch, puregmm as pg
    >>> p = pg.pad_components(pg.from_moments(torch.ones(2) / 2, torch.zeros(2, 1), torch.ones(2, 1, 1)), 3)
    >>> pg.weights(p)
    tensor([0.5000, 0.5000, 0.0000])
    """
    _validate.params_structure(params)
    k = params.n_components
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not k <= n_components < 2**63:
        raise ValueError(f"n_components must be an int >= K={k}; got {n_components!r}")
    extra = n_components - k
    if extra == 0:
        return params

    nb = len(params.batch_shape)
    logits = torch.cat([params.logits, params.logits.new_full((*params.batch_shape, extra), -math.inf)], -1)
    index = torch.cat([torch.arange(k), torch.zeros(extra, dtype=torch.int64)]).to(params.means.device)  # [K']
    means = params.means.index_select(nb, index)  # masked components copy component 0
    scale = params.spec.select_components(params.scale, index, nb)  # likewise, where scale is per component
    return GMMParams(logits, means, scale, params.family)


def weights(params: GMMParams) -> Tensor:
    """Mixture weights [..., K] (softmax of the logits).

    Args:
        params: mixture params, any batch dims.

    Returns:
        [..., K], summing to 1 over K (masked components: 0).

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.25, 0.75]), torch.zeros(2, 1), torch.ones(2, 1, 1))
    >>> pg.weights(p)
    tensor([0.2500, 0.7500])
    """
    _validate.params_structure(params)
    return torch.softmax(params.logits, dim=-1)


def means(params: GMMParams) -> Tensor:
    """Component means [..., K, D].

    Args:
        params: mixture params, any batch dims.

    Returns:
        ``params.means`` [..., K, D] (the same tensor, not a copy).

    >>> import torch, puregmm as pg
    >>> p = pg.from_moments(torch.tensor([0.25, 0.75]), torch.tensor([[0.0], [3.0]]), torch.ones(2, 1, 1))
    >>> pg.means(p)
    tensor([[0.],
            [3.]])
    """
    _validate.params_structure(params)
    return params.means


def covariances(params: GMMParams) -> Tensor:
    """Component covariances [..., K, D, D], expanded to full matrices for every family.

    Args:
        params: mixture params, any batch dims.

    Returns:
        Σ_k [..., K, D, D] (the shared matrix repeated K times for tied/shared/constant).

    >>> import torch, puregmm as pg
    >>> cov = torch.diag_embed(torch.tensor([[4.0, 1.0], [1.0, 0.25]]))  # [2, 2, 2]
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), cov, "diagonal")
    >>> pg.covariances(p)[0]
    tensor([[4., 0.],
            [0., 1.]])
    """
    return _per_batch(params, lambda p: p.spec.covariances(p.scale, p.n_components, p.dim))


def precision_cholesky(params: GMMParams) -> Tensor:
    """Upper factors U [..., K, D, D] with precision = U Uᵀ (scikit-learn's
    ``precisions_cholesky_``, expanded to full matrices for every family).

    Args:
        params: mixture params, any batch dims.

    Returns:
        upper-triangular U_k [..., K, D, D] with a positive diagonal.

    >>> import torch, puregmm as pg
    >>> cov = torch.diag_embed(torch.tensor([[4.0, 1.0], [1.0, 0.25]]))  # [2, 2, 2]
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), cov, "diagonal")
    >>> pg.precision_cholesky(p)[0]  # Σ⁻¹ = U Uᵀ = diag(1/4, 1)
    tensor([[0.5000, 0.0000],
            [0.0000, 1.0000]])
    """

    def one(p: GMMParams) -> Tensor:
        raw = p.spec.per_component_raw(p.scale, p.n_components)
        return torch.func.vmap(lambda r: p.spec.precision_factor(r, p.dim))(raw)

    return _per_batch(params, one)


def precisions(params: GMMParams) -> Tensor:
    """Precision matrices [..., K, D, D] = U Uᵀ.

    Args:
        params: mixture params, any batch dims.

    Returns:
        Σ_k⁻¹ [..., K, D, D].

    >>> import torch, puregmm as pg
    >>> cov = torch.diag_embed(torch.tensor([[4.0, 1.0], [1.0, 0.25]]))  # [2, 2, 2]
    >>> p = pg.from_moments(torch.tensor([0.5, 0.5]), torch.zeros(2, 2), cov, "diagonal")
    >>> pg.precisions(p)[1]
    tensor([[1., 0.],
            [0., 4.]])
    """
    u = precision_cholesky(params)
    return u @ u.mT


def _per_batch(params: GMMParams, fn: Any) -> Tensor:
    """Apply ``fn`` to unbatched params, vmapping over any leading batch dimensions."""
    _validate.params_structure(params)
    for _ in params.batch_shape:
        fn = torch.func.vmap(fn)
    return fn(params)
