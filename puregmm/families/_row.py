"""The :class:`Family` row: every per-family function, as a method (see :mod:`puregmm.families`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from puregmm.families._helpers import (  # noqa: F401  (the rows' maths)
    LOG_2PI,
    SQUARE_MAX_D,
    Layout,
    MStepWeights,
    _positive_qr,
    _raw_of_upper,
    floored_upper_factor,
    layout,
    raw_from_cov_repaired,
    strict_upper,
    upper_factor,
)

#: Above this many rows the E-step keeps the natural form whatever the shapes (its chunks stay in
#: cache; whitening passes over all rows once per component): see Family.whitening_cheaper.
WHITEN_MAX_ROWS = 10_000
#: The tied family's E-step whitens per component while N·K·D² is at most this (Family.whitening_cheaper).
TIED_WHITEN_MAX_WORK = 650_000
#: Diagonal and scalar families whiten per component while N·K·D is at most this.
PRODUCT_WHITEN_MAX_WORK = 50_000

#: Names of the rows whose variance is fixed (filled in by :mod:`puregmm.families` from its table).
FIXED_VARIANCE: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """Static description of one covariance family (see the module table)."""

    name: str
    scale_ndim: int  # dims of ``raw`` for one component: 2 matrix, 1 vector, 0 scalar
    per_component: bool  # does ``raw`` carry a leading component axis?
    learned: bool  # is ``raw`` updated by gradient descent and EM?

    def scale_shape(self, k: int, d: int) -> tuple[int, ...]:
        own = {2: (d, d), 1: (d,), 0: ()}[self.scale_ndim]
        return ((k,) if self.per_component else ()) + own

    def per_component_raw(self, raw: Tensor, k: int) -> Tensor:
        """``raw`` with a leading component axis of length ``k`` (a view, no copy)."""
        if self.per_component:
            return raw
        return raw.unsqueeze(0).expand((k, *tuple(raw.shape)))

    # --- one component: used under ``vmap`` over components -----------------------------
    def precision_factor(self, raw: Tensor, d: int) -> Tensor:
        """U of one component as a dense [D, D] upper-triangular matrix."""
        if self.scale_ndim == 2:
            return upper_factor(raw)
        if self.scale_ndim == 1:
            return torch.diag_embed(torch.exp(raw))
        return torch.exp(raw) * torch.eye(d, dtype=raw.dtype, device=raw.device)

    def whiten(self, raw: Tensor, diff: Tensor) -> Tensor:
        """(x - μ) @ U for rows ``diff`` [N, D] of one component."""
        if self.scale_ndim == 2:
            return diff @ self.precision_factor(raw, diff.shape[-1])
        return diff * torch.exp(raw)

    def half_log_det_precision(self, raw: Tensor, d: int) -> Tensor:
        """½ log det(precision) = Σ log diag(U) for one component."""
        if self.scale_ndim == 2:
            return torch.diagonal(raw).sum()
        return raw.sum() if self.scale_ndim == 1 else raw * d

    def log_min_variance(self, raw: Tensor) -> Tensor:
        """A lower bound on log of the smallest variance of one component.

        Exact for the diagonal and scalar families; for full/tied it uses
        λ_max(UUᵀ) ≤ trace(UUᵀ) = ‖U‖²_F, so it can flag a component whose smallest
        variance is up to D times the floor.
        """
        if self.scale_ndim == 2:
            u = self.precision_factor(raw, raw.shape[-1])
            return -torch.log(u.square().sum())
        return -2.0 * (raw.max() if self.scale_ndim == 1 else raw)

    # --- moments <-> raw (whole parameter, all components) --------------------------------
    def raw_from_covariances(self, cov: Tensor) -> Tensor:
        """``raw`` from covariances [K, D, D] already of this family's structure."""
        if self.scale_ndim == 2:
            c = cov if self.per_component else cov[0]
            chol = torch.linalg.cholesky(c)
            eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device).expand_as(c)
            u = torch.linalg.solve_triangular(chol, eye, upper=False).mT
            return torch.triu(u, 1) + torch.diag_embed(torch.log(torch.diagonal(u, dim1=-2, dim2=-1)))
        var = torch.diagonal(cov, dim1=-2, dim2=-1)  # [K, D]
        if self.scale_ndim == 1:
            return -0.5 * torch.log(var)
        var = var.mean(-1)  # [K]
        return -0.5 * torch.log(var if self.per_component else var[0])

    def raw_from_variances(self, var: Tensor, k: int) -> Tensor:
        """``raw`` of axis-aligned covariances diag(var) [D] for every component (no factorisation).

        The scalar families use the mean of ``var``.
        """
        log_u = -0.5 * torch.log(var if self.scale_ndim else var.mean())
        raw = torch.diag_embed(log_u) if self.scale_ndim == 2 else log_u
        return raw.expand((k, *tuple(raw.shape))) if self.per_component else raw

    def covariances(self, raw: Tensor, k: int, d: int) -> Tensor:
        """Covariances [K, D, D] from ``raw``."""
        raw_k = self.per_component_raw(raw, k)
        if self.scale_ndim == 2:
            u = upper_factor(raw_k)
            eye = torch.eye(d, dtype=raw.dtype, device=raw.device).expand_as(u)
            u_inv = torch.linalg.solve_triangular(u, eye, upper=True)
            return u_inv.mT @ u_inv  # (U Uᵀ)⁻¹ = U⁻ᵀ U⁻¹
        var = torch.exp(-2.0 * raw_k)
        if self.scale_ndim == 0:
            var = var.unsqueeze(-1).expand(k, d)
        return torch.diag_embed(var)

    def n_scale_parameters(self, k: int, d: int) -> int:
        """Free covariance parameters (0 for the constant family)."""
        if not self.learned:
            return 0
        per = {2: d * (d + 1) // 2, 1: d, 0: 1}[self.scale_ndim]
        return per * (k if self.per_component else 1)

    # --- affine maps (fit's standardisation) ------------------------------------------------
    def scaled_raw(self, raw: Tensor, a: Tensor) -> Tensor:
        """``raw`` of the covariances a²Σ (data mapped by x -> a·x + b, ``a`` > 0 a 0-d tensor):
        U -> U / a, i.e. the log-diagonal shifts by -log a and the strict upper part divides by a."""
        log_a = torch.log(a)
        if self.scale_ndim != 2:
            return raw - log_a
        d = raw.shape[-1]
        strict = strict_upper(d, raw.device)
        diag = torch.diagonal(raw, dim1=-2, dim2=-1) - log_a
        return torch.where(strict, raw / a, torch.zeros((), dtype=raw.dtype)) + torch.diag_embed(diag)

    # --- EM: statistics and the M-step's covariance (estep.py, mstep.py) -------------------
    def affine_maps(self, raw_k: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """Every component's whitening map at once (no ``vmap``): (a, ½ log det P_k [K]) with
        a = [U_k; -t_k] [D+1, D, K] (dense factors) or [s_k; -t_k] [2, D, K] (s_k the diagonal of
        U_k), t_k = δ_k U_k for ``delta`` δ [K, D] (the means minus the centre), from the
        per-component ``raw_k`` [K, ...]."""
        k, d = delta.shape
        if self.scale_ndim == 2:
            diag = torch.diagonal(raw_k, dim1=-2, dim2=-1)  # [K, D], log diag U
            ut = upper_factor(raw_k).permute(1, 2, 0)  # [D, D, K]
            shift = (delta.mT.unsqueeze(1) * ut).sum(0)  # [D, K]: t_k = δ_k U_k
            return torch.cat([ut, shift.neg().unsqueeze(0)]), diag.sum(-1)  # [D+1, D, K]
        log_s = raw_k if self.scale_ndim == 1 else raw_k.unsqueeze(-1).expand(k, d)  # [K, D]
        s = torch.exp(log_s)
        return torch.stack([s, -delta * s]).permute(0, 2, 1), log_s.sum(-1)  # [2, D, K]

    @property
    def dense_factor(self) -> bool:
        """Whether U is a full upper-triangular matrix (else diagonal: whitening is a product)."""
        return self.scale_ndim == 2

    def whitening_cheaper(self, n: int, k: int, d: int) -> bool:
        """Whether a plain E-step of ``n`` rows costs less by whitening each row per component
        (K BLAS-3 products [n, D] x [D, D], scikit-learn's form) than by the natural form's
        products T (~D²/2 columns per row, built element by element): dense per-component
        factors, n <= :data:`WHITEN_MAX_ROWS` and 4K <= 3(D + 1). ``benchmarks/profile_small.py``
        prints both forms' times (wine K=2 0.49 vs 0.88 ms natural, digits K=10 17.7 vs 25.9 ms);
        the natural form wins as K approaches D and at large N (one GEMM for all components).
        Tied: the pooled form's ~80 small operations cost more than the K products while
        N·K·D² <= :data:`TIED_WHITEN_MAX_WORK` (``profile_small.py --families tied``: iris and
        wine, K = 2-20, 0.77-1.01 ms natural vs 0.46-0.77 whitened; breast cancer K = 5,
        1.18 vs 1.32). Diagonal and scalar factors (whitening is a product): while N·K·D <=
        :data:`PRODUCT_WHITEN_MAX_WORK` (``--families diagonal isotropic``: iris and wine 0.53-0.61
        vs 0.38-0.56 ms, breast cancer K = 2 0.69 vs 0.63, K = 5 0.71 vs 0.74)."""
        if not self.dense_factor:
            return n * k * d <= PRODUCT_WHITEN_MAX_WORK
        if not self.per_component:
            return n * k * d * d <= TIED_WHITEN_MAX_WORK
        return n <= WHITEN_MAX_ROWS and 4 * k <= 3 * (d + 1)

    @property
    def pooled_moments(self) -> bool:
        """Whether the M-step needs only the second moments pooled over components (tied), so
        the E-step can skip per-component ones."""
        return self.scale_ndim == 2 and not self.per_component

    def moment_layout(self, d: int, square: bool = False) -> Layout:
        """The column layout of the products T(x) whose sums EM needs (:mod:`puregmm._moments`)."""
        return layout(self.scale_ndim, d, square)

    def stats_shape(self, k: int, d: int) -> tuple[int, ...]:
        """Shape of ``Stats.xx_sum``: [K, D, D] (matrix families), [K, D] (diagonal), [K]."""
        return (k,) + {2: (d, d), 1: (d,), 0: ()}[self.scale_ndim]

    def weighted_second_moments(self, w: Tensor, cov: Tensor) -> Tensor:
        """w_k Σ_k [K, D, D], its diagonal [K, D] or its trace [K]: the ``Stats.xx_sum`` that
        weights ``w`` [K] and covariances ``cov`` [K, D, D] would give about the means."""
        if self.scale_ndim == 2:
            return w[:, None, None] * cov
        diag = torch.diagonal(cov, dim1=-2, dim2=-1)
        return w[:, None] * diag if self.scale_ndim == 1 else w * diag.sum(-1)

    def scatter(self, wy: Tensor, y: Tensor) -> Tensor:
        """Σ_n wy_n y_nᵀ [..., D, D], its diagonal [..., D] or its trace [...] (what ``Stats.xx_sum``
        holds) for rows [..., n, D] (leading axes: components or groups, kept)."""
        if self.scale_ndim == 2:
            return wy.mT @ y
        return (wy * y).sum(-2) if self.scale_ndim == 1 else (wy * y).sum((-2, -1))

    def m_step_scale(self, xx_sum: Tensor, w: MStepWeights, shift: Tensor, least: Tensor, reg_covar: Any,
                     old: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The M-step's new ``raw`` and the count of repaired components (0-d int64).

        Σ_k = S_k / n'_k - d_k d_kᵀ + reg·I from the moments S_k (``xx_sum``) about the old means
        and the mean steps d_k (``shift`` [K, D]), reduced to the family's structure (tied:
        Σ_k n'_k Σ_k / Σ n'; diagonal/isotropic: the diagonal / its mean; shared: the pooled
        isotropic variance); an empty component gets the pooled covariance of the good ones; a
        variance below ``least`` [K, D] (what the position resolves) is raised to it and counted;
        masked components keep ``old``. The constant family keeps ``old``.
        """
        k, d = shift.shape
        finfo = torch.finfo(shift.dtype)
        nk, empty, active, pool = w.nk, w.empty, w.active, w.pool  # None: every component regular
        if not self.learned:
            return old, torch.zeros((), dtype=torch.int64, device=old.device)
        if self.scale_ndim == 2:
            cov = xx_sum / nk[:, None, None] - shift.unsqueeze(-1) * shift.unsqueeze(-2)  # [K, D, D]
            if not self.per_component:  # tied: Σ_k n'_k Σ_k / Σ n'
                cov = (nk[:, None, None] * cov).sum(0) / nk.sum()
            elif empty is not None and pool is not None:
                cov = torch.where(empty[:, None, None], (pool[:, None, None] * cov).sum(0).expand_as(cov), cov)
            eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
            cov = 0.5 * (cov + cov.mT) + reg_covar * eye
            if self.per_component and active is not None:  # masked: a placeholder that factorises
                cov = torch.where(active[:, None, None], cov, eye)
            lowest = least.amax(-1) if self.per_component else least.amax()
            raw, n_fixed = raw_from_cov_repaired(cov, finfo.eps, finfo.tiny**0.5, lowest, w.eager)
            if self.per_component and active is not None:  # masked: the old scale back
                raw = torch.where(active[:, None, None], raw, old)
            return raw, n_fixed
        if self.scale_ndim == 1:
            var = (xx_sum / nk.unsqueeze(-1) - shift.square()).clamp_min(0.0)  # [K, D]
            if empty is not None and pool is not None:
                var = torch.where(empty.unsqueeze(-1), (pool.unsqueeze(-1) * var).sum(0).expand_as(var), var)
            lim = least
        else:
            var = ((xx_sum / nk - shift.square().sum(-1)) / d).clamp_min(0.0)  # [K]
            if not self.per_component:  # shared: one variance pooled over components
                var = (nk * var).sum() / nk.sum()
            elif empty is not None and pool is not None:
                var = torch.where(empty, (pool * var).sum().expand_as(var), var)
            lim = least.amax(-1) if self.per_component else least.amax()
        var = var + reg_covar
        lim = lim.clamp_min(finfo.tiny**0.5)
        small = var < lim
        if not self.per_component:
            return -0.5 * torch.log(torch.where(small, lim, var)), small.reshape(1, -1).any(-1).sum()
        per = None if active is None else active.reshape((k,) + (1,) * (var.dim() - 1))
        small = small if per is None else small & per
        raw = -0.5 * torch.log(torch.where(small, lim, var))
        return (raw if per is None else torch.where(per, raw, old)), small.reshape(k, -1).any(-1).sum()

    # --- interop, MDN heads, validation ----------------------------------------------------
    @property
    def sklearn_covariance_type(self) -> str:
        """scikit-learn's ``covariance_type`` that holds this family without loss.

        shared/constant are spherical with equal variances; a scale shared by all components
        that is a matrix or a vector fits in scikit-learn's one tied matrix.
        """
        if not self.per_component and self.scale_ndim > 0:
            return "tied"
        return {2: "full", 1: "diag", 0: "spherical"}[self.scale_ndim]

    def torch_component(self, means: Tensor, u: Tensor) -> Distribution:
        """The components as a ``torch.distributions`` object with batch shape [..., K].

        ``MultivariateNormal`` for a matrix scale; ``Independent(Normal, 1)`` for axis-aligned
        ones (cheaper, and it keeps the structure). ``u`` [..., K, D, D]: precision = U Uᵀ.
        """
        if self.scale_ndim == 2:
            eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device).expand_as(u)
            scale_tril = torch.linalg.solve_triangular(u, eye, upper=True).mT  # U⁻ᵀ: Σ = U⁻ᵀU⁻¹
            return MultivariateNormal(means, scale_tril=scale_tril)
        std = 1.0 / torch.diagonal(u, dim1=-2, dim2=-1)  # [..., K, D], U = diag(1/σ)
        return Independent(Normal(means, std), 1)

    def structure_violation(self, cov: Tensor, tol: Tensor | float) -> str | None:
        """What covariances [K, D, D] lack of this family's structure beyond ``tol``, or None.

        Used by :func:`puregmm.from_moments`, which needs the structure to hold before it reads
        only the parts this family stores (the diagonal, the mean variance, component 0).
        """

        def far(a: Tensor, b: Tensor) -> bool:
            return bool(((a - b).abs() > tol).any())

        diag = torch.diagonal(cov, dim1=-2, dim2=-1)  # [K, D]
        if self.scale_ndim < 2 and far(cov, torch.diag_embed(diag)):
            return "diagonal covariances; got off-diagonal entries"
        if self.scale_ndim == 0 and far(diag, diag.mean(-1, keepdim=True)):
            return "multiples of the identity; got unequal variances"
        if not self.per_component and far(cov, cov[:1]):
            return "the same covariance for every component"
        return None

    def select_components(self, raw: Tensor, index: Tensor, axis: int) -> Tensor:
        """``raw`` of the components ``index`` [M] (repeats allowed), ``axis`` the component
        axis; a ``raw`` shared by all components is returned as is."""
        return raw.index_select(axis, index) if self.per_component else raw

    def raw_from_head(self, a: Tensor, k: int, d: int, log_floor: float, variance: float | Tensor | None) -> Tensor:
        """``raw`` [..., *scale_shape] from a mixture density network's scale outputs ``a`` [..., S].

        S = :meth:`n_scale_parameters`; every real ``a`` gives covariance eigenvalues above
        exp(``log_floor``) (the formulas are in :mod:`puregmm.mdn`). A family with a fixed scale
        takes no outputs and needs ``variance`` (a float, or a tensor broadcastable to ``...``).
        """
        batch = a.shape[:-1]
        if not self.learned:
            return self._fixed_raw(variance, batch, a)
        if variance is not None:
            fixed = " or ".join(repr(name) for name in FIXED_VARIANCE)
            raise ValueError(f"variance is only for family {fixed}; got variance={variance!r} with {self.name!r}")
        if self.scale_ndim == 2:
            n_blocks = k if self.per_component else 1
            u = floored_upper_factor(a.unflatten(-1, (n_blocks, -1)), d, log_floor)  # [..., n, D, D]
            return u if self.per_component else u.squeeze(-3)
        log_var = torch.logaddexp(torch.full_like(a, log_floor), a)  # log(floor + exp(a))
        return (-0.5 * log_var).reshape(batch + self.scale_shape(k, d))  # raw = -½ log σ²

    def _fixed_raw(self, variance: float | Tensor | None, batch: torch.Size, like: Tensor) -> Tensor:
        """``raw`` [...] of a fixed variance given by the caller (the constant family's head)."""
        if variance is None:
            raise ValueError(f"family {self.name!r} needs variance= (its fixed variance); got None")
        if not isinstance(variance, Tensor) and not variance > 0:
            raise ValueError(f"variance must be positive; got {variance!r}")
        var = torch.as_tensor(variance, dtype=like.dtype, device=like.device)  # a tensor is not checked
        return torch.broadcast_to(-0.5 * torch.log(var), batch)

    # --- gradient descent: floor and collapse (train.py) ---
    # A *direction's variance* is 1/U_ii² (raw_ii = -½ log of it): the variance itself for the
    # diagonal and scalar families; for full/tied the Cholesky-direction variance Var(x_i | x_<i),
    # whose product is det Σ, so a floor on each bounds every density by (2π·floor)^(-D/2).
    def floor_scale(self, raw: Tensor, log_floor: float) -> Tensor:
        """The scale leaf ``raw`` with every direction's variance held at or above exp(``log_floor``).

        Branch-free: a clamp of raw's (log-)diagonal at -½ ``log_floor``; NaN stays NaN (it is
        still reset). A fixed scale (the constant family) is returned unchanged.
        """
        if not self.learned:
            return raw
        capped = raw.clamp_max(-0.5 * log_floor)
        if self.scale_ndim != 2:
            return capped
        eye = torch.eye(raw.shape[-1], dtype=torch.bool, device=raw.device)
        return torch.where(eye, capped, raw)

    def collapsed(self, raw: Tensor, log_floor: float) -> Tensor:
        """Flags per entry of the scale leaf ([K], or 0-d when shared): non-finite, or (a learned
        scale) at the floor in every direction, i.e. a component sitting on a point.

        Meant after :meth:`floor_scale`: a variance at the floor in some directions only (a
        feature constant within a cluster) is held there, not flagged.
        """
        lead = raw.shape[: raw.dim() - self.scale_ndim]
        finite = torch.isfinite(raw).reshape((*lead, -1)).all(-1)
        if not self.learned:
            return ~finite
        dirs = torch.diagonal(raw, dim1=-2, dim2=-1) if self.scale_ndim == 2 else raw.reshape((*lead, -1))
        return ~finite | (dirs >= -0.5 * log_floor).all(-1)

    def per_component_flags(self, flags: Tensor, k: int) -> Tensor:
        """Flags [K] from flags per entry of the scale leaf: a shared entry belongs to every component."""
        return flags if self.per_component else flags.expand(k)

    def scale_reset(self, reset: Tensor, live: Tensor, own: Tensor) -> Tensor:
        """Which entries of the scale leaf a reset replaces ([K], or 0-d when shared).

        A per-component scale follows its component's ``reset`` [K]. A shared scale is replaced
        when its own flag ``own`` (:meth:`collapsed`) is set or, if learned, when every ``live``
        component is reset (nothing of the old fit is left to share it).
        """
        if self.per_component:
            return reset
        if not self.learned:
            return own
        return own | (reset.any() & (reset | ~live).all())

    def unwhiten(self, raw: Tensor, v: Tensor, transpose: bool = False) -> Tensor:
        """Rows ``v`` [K, D] times U⁻¹ per component (``transpose``: times U⁻ᵀ); ``raw`` the whole leaf.

        Undoes :meth:`whiten`: gradient descent steps the means in whitened units
        (:func:`puregmm.train.whitened_means`), where a direction of variance σ² moves by σ per unit.
        """
        if self.scale_ndim != 2:
            sd = torch.exp(-raw)  # [K, D], [K] or []
            return v * (sd.unsqueeze(-1) if self.scale_ndim == 0 else sd)
        u = upper_factor(raw).expand(v.shape[:-1] + (v.shape[-1],) * 2)  # [K, D, D]
        a = u.mT if transpose else u
        return torch.linalg.solve_triangular(a, v.unsqueeze(-2), upper=not transpose, left=False).squeeze(-2)

    # --- marginals and conditionals (puregmm.conditioning) ---
    # Every family is closed under both: an axis-aligned family's dimensions are independent within a
    # component, so it keeps its entries of ``raw``; a matrix scale is re-factored by a QR (accuracy
    # eps·κ(U), not eps·κ(U)² as a Cholesky of a formed block would give). ``raw`` is the whole leaf
    # (any leading dims: linalg batches them); ``dims``, ``rest``, ``given``: int64 index tensors.
    def marginal_scale(self, raw: Tensor, dims: Tensor) -> Tensor:
        """The scale leaf of the marginal over ``dims`` (in that order): Σ_dd's factor for a matrix
        scale (Σ = LLᵀ with L = U⁻ᵀ, Σ_dd = L_d L_dᵀ = RᵀR by the QR of L_dᵀ, so U' = R⁻¹), the
        entries ``dims`` of a vector scale, a scalar scale as is."""
        if self.scale_ndim == 2:
            u = upper_factor(raw)
            eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
            lower = torch.linalg.solve_triangular(u, eye, upper=True).mT  # L = U⁻ᵀ, Σ = L Lᵀ
            _, r = _positive_qr(lower.index_select(-2, dims).mT)  # L_dᵀ = QR: Σ_dd = RᵀR
            return _raw_of_upper(torch.linalg.solve_triangular(r, eye[: len(dims), : len(dims)], upper=True))
        return raw.index_select(-1, dims) if self.scale_ndim == 1 else raw

    def conditional_scale(self, raw: Tensor, rest: Tensor, given: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(scale leaf of p(x_rest | x_given), regression coefficients [K, A, B]) with A = len(rest),
        B = len(given): Σ_a|b = P_aa⁻¹ and μ_a|b = μ_a + C_k (x_b - μ_b), C_k = -P_aa⁻¹ P_ab (0 for
        an axis-aligned scale). With P = UUᵀ, P_aa = U_a U_aᵀ (U_a: rows ``rest``); the QR of
        U_aᵀ J = QR (J reverses the columns) gives P_aa = V Vᵀ with V = J Rᵀ J upper, and
        C = -J R⁻¹ Qᵀ U_bᵀ."""
        if self.scale_ndim != 2:  # independent dimensions: the means do not move
            coef = raw.new_zeros((k, len(rest), len(given)))
            return (raw.index_select(-1, rest) if self.scale_ndim == 1 else raw), coef
        u = upper_factor(raw)
        q, r = _positive_qr(u.index_select(-2, rest).mT.flip(-1))  # U_aᵀ J = QR
        coef = -torch.linalg.solve_triangular(r, q.mT @ u.index_select(-2, given).mT, upper=True).flip(-2)
        return _raw_of_upper(r.mT.flip(-2, -1)), self.per_component_raw(coef, k)
