"""Floating-point helpers: unit roundoff, relative errors, numeric rank, condition numbers, tolerances.

THEORY.md §1: tolerances are relative to the norm of the reference and scale with what a construction
inverted (``κ``) and amplified (``γ``): ``max(1e-10, c·u·(κ + γ))``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._validate import as_tolerance
from .errors import IllConditionedWarning, SingularMatrixError

__all__ = [
    "TOLERANCE_CONSTANT",
    "unit_roundoff",
    "tolerance",
    "relative_error",
    "numeric_rank",
    "condition_number",
    "check_invertible",
    "warn_if_ill_conditioned",
]

#: The constant ``c`` in ``max(1e-10, c·u·(κ + γ))``, fixed once for the library and its tests.
TOLERANCE_CONSTANT = 1e3

#: Relative error ``u·(κ + γ)`` above which a construction warns that it lost digits.
WARN_RELATIVE_ERROR = 1e-8


def unit_roundoff(dtype=np.float64) -> float:
    """Unit roundoff ``u = eps / 2`` of a floating dtype (1.1e-16 for float64)."""
    return float(np.finfo(dtype).eps) / 2.0


def tolerance(kappa: float = 1.0, gamma: float = 0.0, dtype=np.float64,
              c: float = TOLERANCE_CONSTANT, floor: float = 1e-10) -> float:
    """Relative tolerance ``max(floor, c·u·(κ + γ))`` for a construction computed in ``dtype``."""
    return max(floor, c * unit_roundoff(dtype) * (float(kappa) + float(gamma)))


def relative_error(actual, reference, ord=None) -> float:
    """``||actual - reference|| / ||reference||`` (Frobenius / 2-norm of the flattened arrays by default).

    When the reference is exactly zero, the absolute error is returned.
    """
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ord is None:
        num = float(np.linalg.norm((actual - reference).ravel()))
        den = float(np.linalg.norm(reference.ravel()))
    else:
        num = float(np.linalg.norm(actual - reference, ord=ord))
        den = float(np.linalg.norm(reference, ord=ord))
    return num / den if den > 0 else num


def numeric_rank(matrix, tol: float | None = None, scale: float | None = None) -> int:
    """Numeric rank: the number of singular values above ``tol``.

    Default ``tol = max(m, n) · eps · scale`` with ``scale = σ_1(matrix)`` (numpy's convention) unless a
    larger ``scale`` is given, e.g. the norm of the operands a discrepancy was computed from, whose
    rounding the discrepancy inherits. A given ``tol`` must be finite and ``>= 0``
    (:class:`~lora_theory.errors.InvalidArgumentError` otherwise: a NaN counts no singular value).
    """
    tol = as_tolerance(tol, "tol")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.size == 0:
        return 0
    s = np.linalg.svd(matrix, compute_uv=False)
    if tol is None:
        ref = s[0] if scale is None else max(float(s[0]), float(scale))
        tol = max(matrix.shape) * np.finfo(np.float64).eps * ref
    return int(np.sum(s > tol))


def condition_number(matrix) -> float:
    """2-norm condition number ``σ_max / σ_min`` (``inf`` for a singular matrix)."""
    s = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    if s.size == 0:
        return 1.0
    if s[-1] == 0 or not np.isfinite(s).all():
        return math.inf
    return float(s[0] / s[-1])


def check_invertible(matrix, name: str, context: str = "") -> float:
    """Return ``κ(matrix)``; raise :class:`SingularMatrixError` naming ``name`` if it is singular.

    Singular means numerically rank-deficient by the criterion of :func:`numeric_rank`:
    ``σ_min <= n · eps · σ_max``, i.e. ``κ >= 1 / (n · eps)`` for an ``n x n`` matrix; a solve with it
    would return digits of rounding only. (A computed product of exact rank ``n - 1`` has ``σ_min`` of a
    few ``eps · σ_max``, not below ``eps · σ_max``: the bare threshold ``1 / eps`` let such matrices
    through.)
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    kappa = condition_number(matrix)
    n = max(matrix.shape) if matrix.ndim == 2 and matrix.size else 1
    if not math.isfinite(kappa) or kappa >= 1.0 / (n * np.finfo(np.float64).eps):
        raise SingularMatrixError(name, kappa, context)
    return kappa


def warn_if_ill_conditioned(kappa: float, gamma: float = 0.0, what: str = "construction",
                            stacklevel: int = 3, amplification: float = 1.0, amplification_reason: str = "") -> None:
    """Warn with :class:`IllConditionedWarning` when ``u·(κ + γ)·amplification`` exceeds 1e-8.

    ``amplification`` (default 1) is how much larger the outputs the rounding is relative to are than the
    outputs the caller should expect to evaluate (an FNN fit on a ball of large radius: see
    :attr:`lora_theory.fnn.FNNFit.radius_amplification`); ``amplification_reason`` says what it is.
    """
    base = unit_roundoff() * (kappa + gamma)
    expected = base * amplification
    if expected > WARN_RELATIVE_ERROR:
        if amplification > 1:
            detail = (f"expect relative errors near u·(κ + γ)·a = {base:.2g} · {amplification:.3g} = {expected:.2g} "
                      f"in float64 ({amplification_reason})")
        else:
            detail = f"expect relative errors near u·(κ + γ) = {expected:.2g} in float64"
        warnings.warn(
            f"{what} is ill-conditioned: κ = {kappa:.3g}, γ = {gamma:.3g}; {detail} "
            "(the high-precision path avoids this)",
            IllConditionedWarning, stacklevel=stacklevel)


class _LargestConditionNumber:
    """Mixin of the fit dataclasses that record ``condition_numbers`` (name -> ``κ``) of what they solved with:
    :attr:`kappa`, the largest of them."""

    @property
    def kappa(self) -> float:
        """Largest condition number the construction inverted or solved with (1 if it solved with none)."""
        return max(self.condition_numbers.values(), default=1.0)
