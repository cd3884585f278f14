"""Floating-point helpers: unit roundoff, relative errors, numeric rank, condition numbers, tolerances.

THEORY.md §1: tolerances are relative to the norm of the reference and scale with what a construction
inverted (``κ``) and amplified (``γ``): ``max(1e-10, c·u·(κ + γ))``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._guard import finite_or_raise, numeric_guard
from ._types import ArrayLike, DTypeLike
from ._validate import as_array, as_float_dtype, as_nonnegative, as_square, as_tolerance
from .errors import IllConditionedWarning, InvalidArgumentError, SingularMatrixError

__all__ = [
    "TOLERANCE_CONSTANT",
    "unit_roundoff",
    "tolerance",
    "relative_error",
    "numeric_rank",
    "condition_number",
    "check_invertible",
    "warn_if_ill_conditioned",
    "EXACT_TOLERANCE_LIMIT",
]

#: The constant ``c`` in ``max(1e-10, c·u·(κ + γ))``, fixed once for the library and its tests.
TOLERANCE_CONSTANT = 1e3

#: Relative error ``u·(κ + γ)`` above which a construction warns that it lost digits.
WARN_RELATIVE_ERROR = 1e-8

#: The largest relative tolerance under which a float64 construction may call itself ``exact``. A tolerance
#: ``c·u·(κ + γ)`` (times the amplification to the inputs the fit will be evaluated on) above 1 bounds the
#: relative error by more than 100%: it no longer says that the outputs have even their order of magnitude,
#: and the rounding it stands for, ``u·(κ + γ)`` without the constant ``c = 1e3``, exceeds 1e-3. Such a fit
#: reports ``exact=False`` even when its rank suffices. (Deep blocks of generic weights sit well below it:
#: THEORY.md §3.)
EXACT_TOLERANCE_LIMIT = 1.0


def unit_roundoff(dtype: DTypeLike = np.float64) -> float:
    """Unit roundoff ``u = eps / 2`` of a floating dtype (1.1e-16 for float64).

    Raises :class:`~lora_theory.errors.InvalidArgumentError` for a dtype that is not floating (integers have
    no roundoff of this kind).
    """
    return float(np.finfo(as_float_dtype(dtype, "dtype")).eps) / 2.0


@numeric_guard
def tolerance(
    kappa: float = 1.0,
    gamma: float = 0.0,
    dtype: DTypeLike = np.float64,
    c: float = TOLERANCE_CONSTANT,
    floor: float = 1e-10,
) -> float:
    """Relative tolerance ``max(floor, c·u·(κ + γ))`` for a construction computed in ``dtype``.

    ``kappa``, ``gamma``, ``c`` and ``floor`` must be finite and ``>= 0``, ``dtype`` floating
    (:class:`~lora_theory.errors.InvalidArgumentError` otherwise: a NaN ``κ`` gave the floor, as if nothing
    had been inverted); a tolerance that overflows float64 raises :class:`~lora_theory.errors.NumericalError`.
    """
    kappa = as_nonnegative(kappa, "kappa")
    gamma = as_nonnegative(gamma, "gamma")
    c = as_nonnegative(c, "c")
    floor = as_nonnegative(floor, "floor")
    value = max(floor, c * unit_roundoff(dtype) * (kappa + gamma))
    finite_or_raise("tolerance", tolerance=value)  # κ + γ = 2e308 overflows a Python float
    return value


@numeric_guard
def relative_error(actual: ArrayLike, reference: ArrayLike, ord: int | float | str | None = None) -> float:
    """``||actual - reference|| / ||reference||`` (Frobenius / 2-norm of the flattened arrays by default).

    When the reference is exactly zero, the absolute error is returned. ``actual`` and ``reference`` must
    be finite real arrays of one shape, ``ord`` an order :func:`numpy.linalg.norm` accepts for them
    (:class:`~lora_theory.errors.InvalidArgumentError` otherwise).
    """
    actual = as_array(actual, "actual")
    reference = as_array(reference, "reference")
    if actual.shape != reference.shape:
        raise InvalidArgumentError("reference", f"must have the shape of actual {actual.shape}, got {reference.shape}")
    if ord is None:
        num = float(np.linalg.norm((actual - reference).ravel()))
        den = float(np.linalg.norm(reference.ravel()))
    else:
        try:
            num = float(np.linalg.norm(actual - reference, ord=ord))
            den = float(np.linalg.norm(reference, ord=ord))
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError("ord", f"not a norm order for arrays of shape {actual.shape}: {exc}") from None
    return num / den if den > 0 else num


@numeric_guard
def numeric_rank(matrix: ArrayLike, tol: float | None = None, scale: float | None = None) -> int:
    """Numeric rank: the number of singular values above ``tol``.

    Default ``tol = max(m, n) · eps · scale`` with ``scale = σ_1(matrix)`` (numpy's convention) unless a
    larger ``scale`` is given, e.g. the norm of the operands a discrepancy was computed from, whose
    rounding the discrepancy inherits. A given ``tol`` must be finite and ``>= 0``
    (:class:`~lora_theory.errors.InvalidArgumentError` otherwise: a NaN counts no singular value).
    """
    tol = as_tolerance(tol, "tol")
    if scale is not None:
        scale = as_nonnegative(scale, "scale")
    matrix = as_array(matrix, "matrix", ndim=2)
    if matrix.size == 0:
        return 0
    s = svd_values(matrix)
    if tol is None:
        ref = s[0] if scale is None else max(float(s[0]), float(scale))
        tol = max(matrix.shape) * np.finfo(np.float64).eps * ref
    return int(np.sum(s > tol))


@numeric_guard
def condition_number(matrix: ArrayLike) -> float:
    """2-norm condition number ``σ_max / σ_min`` of a square matrix (``inf`` for a singular one).

    A non-square, empty or non-finite ``matrix`` raises :class:`~lora_theory.errors.InvalidArgumentError`
    (the condition number of inversion is defined for square matrices only).
    """
    s = svd_values(as_square(matrix, "matrix"))
    if s[-1] == 0:
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


def warn_if_ill_conditioned(
    kappa: float,
    gamma: float = 0.0,
    what: str = "construction",
    stacklevel: int = 4,
    amplification: float = 1.0,
    amplification_reason: str = "",
) -> None:
    """Warn with :class:`IllConditionedWarning` when ``u·(κ + γ)·amplification`` exceeds 1e-8.

    ``amplification`` (default 1) is how much larger the outputs the rounding is relative to are than the
    outputs the caller should expect to evaluate (an FNN fit on a ball of large radius: see
    :attr:`lora_theory.fnn.FNNFit.radius_amplification`); ``amplification_reason`` says what it is.
    """
    base = unit_roundoff() * (kappa + gamma)
    expected = base * amplification
    if expected > WARN_RELATIVE_ERROR:
        if amplification > 1:
            detail = (
                f"expect relative errors near u·(κ + γ)·a = {base:.2g} · {amplification:.3g} = {expected:.2g} "
                f"in float64 ({amplification_reason})"
            )
        else:
            detail = f"expect relative errors near u·(κ + γ) = {expected:.2g} in float64"
        warnings.warn(
            f"{what} is ill-conditioned: κ = {kappa:.3g}, γ = {gamma:.3g}; {detail} "
            "(the high-precision path avoids this)",
            IllConditionedWarning,
            stacklevel=stacklevel,
        )


def svd_values(matrix) -> np.ndarray:
    """Singular values of a finite matrix, descending; ``FloatingPointError`` (a
    :class:`~lora_theory.errors.NumericalError` once it leaves a public function) when LAPACK returns ``inf`` or
    ``NaN``: a matrix of finite entries whose 2-norm exceeds the float64 range (3 x 3 entries of 1e308) gave
    ``NaN`` singular values, a numeric rank of 0 and no error."""
    s = np.linalg.svd(matrix, compute_uv=False)
    if not np.all(np.isfinite(s)):
        raise FloatingPointError("overflow in the singular values: the matrix's 2-norm exceeds the float64 range")
    return s


def finite_solve(matrix, rhs, what: str = "a matrix") -> np.ndarray:
    """``np.linalg.solve(matrix, rhs)``, with ``FloatingPointError`` when the solution overflows: LAPACK returns
    ``inf`` without raising (a ``W1`` of 1e-14 against a target's 1e299 gave an infinite matched product)."""
    x = np.linalg.solve(matrix, rhs)
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"overflow in a solve with {what}: the solution exceeds the float64 range")
    return x


def check_norm_finite(matrix, what: str) -> None:
    """``FloatingPointError`` when ``||matrix||_F`` (hence every singular value) exceeds the float64 range, computed
    without squaring the entries (entries of 1e200 have a finite norm)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    top = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    with np.errstate(over="ignore"):  # the overflow is what is tested: report it by name, not as a trap
        norm = top * np.linalg.norm(matrix / top) if top > 0 else 0.0
    if not np.isfinite(norm):
        raise FloatingPointError(f"overflow: the norm of {what} exceeds the float64 range")


class _LargestConditionNumber:
    """Mixin of the fit dataclasses that record ``condition_numbers`` (name -> ``κ``) of what they solved with:
    :attr:`kappa`, the largest of them."""

    @property
    def kappa(self) -> float:
        """Largest condition number the construction inverted or solved with (1 if it solved with none)."""
        return max(self.condition_numbers.values(), default=1.0)


def verified_exact(
    rank_sufficient: bool,
    measured: float,
    tol: float,
    amplification: float = 1.0,
    what: str = "construction",
    stacklevel: int = 4,
    arithmetic: str = "float64",
) -> bool:
    """The ``exact`` a fit may report: its rank suffices *and* its arithmetic kept the claim.

    ``measured`` is the error the construction measured on its own result, relative to the same scale as
    ``tol`` (the fit's tolerance); ``amplification`` how much larger relative errors get on the inputs the
    fit will be evaluated on (see :attr:`lora_theory.FNNFit.radius_amplification`). The fit is exact when
    ``rank_sufficient``, ``measured <= tol`` (the claim checked) and ``tol · amplification <=``
    :data:`EXACT_TOLERANCE_LIMIT` (the claim says something). When the rank suffices
    but the arithmetic did not keep it, :class:`IllConditionedWarning` says which and why. ``arithmetic`` names
    it in that message: ``"float64"``, or ``"N-digit"`` for the raised-precision fits of
    :mod:`lora_theory.highprec`, whose ``tol`` is the same rule at their working precision.
    """
    if not rank_sufficient:
        return False
    claimed = tol * amplification
    if measured <= tol and claimed <= EXACT_TOLERANCE_LIMIT:
        return True
    if measured > tol:
        why = f"the measured error {measured:.3g} exceeds the tolerance {tol:.3g} the fit claims"
    else:
        why = (
            f"its tolerance {tol:.3g} (times the amplification {amplification:.3g}) exceeds "
            f"{EXACT_TOLERANCE_LIMIT:g}: the bound does not even keep the outputs' order of magnitude"
        )
    remedy = (
        "the high-precision path or the exact path avoid this"
        if arithmetic == "float64"
        else "more digits (digits=None chooses them) or the exact path avoid this"
    )
    warnings.warn(
        f"{what}: the rank suffices but the {arithmetic} result is not exact: {why}; reporting exact=False ({remedy})",
        IllConditionedWarning,
        stacklevel=stacklevel,
    )
    return False
