"""The working precision of the high-precision constructions: the digits :func:`choose_digits` asks for given ``κ``
and ``γ``, the limits on them, running a construction at its precision (and again when the ``κ``, ``γ`` found
there ask for more), and checking a result exact at that precision.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from .._guard import numeric_guard
from .._validate import as_int
from ..errors import IllConditionedWarning, InvalidArgumentError, SingularMatrixError
from ..numerics import (
    TOLERANCE_CONSTANT,
    WARN_RELATIVE_ERROR,
    verified_exact,
)
from .arithmetic import _mp

#: Digits a high-precision result should keep after the construction lost ``log10(κ) + log10(γ)``.
TARGET_DIGITS = 16


#: Extra digits on top, for the constants hidden in ``u·(κ + γ)``.
SAFETY_DIGITS = 8


#: An automatic choice is redone at higher precision only when the ``κ``, ``γ`` found at the working
#: precision ask for more than this many digits beyond it (the float64 estimates are close, and the
#: safety digits cover small differences).
RERUN_DIGITS = 2


#: The largest working precision accepted, in significant decimal digits, given or chosen. Every float64
#: ``κ`` and ``γ`` (at most 1.8e308) asks :func:`choose_digits` for at most 16 + 309 + 309 + 8 = 642 digits;
#: the cost of higher ones is measured in THEORY.md §3. Larger requests are refused with
#: :class:`~lora_theory.errors.InvalidArgumentError`.
MAX_DIGITS = 1000


@numeric_guard
def choose_digits(
    kappa: float, gamma: float = 0.0, *, target_digits: int = TARGET_DIGITS, safety: int = SAFETY_DIGITS
) -> int:
    """Decimal digits for a construction that inverts matrices of condition ``κ`` and amplifies by ``γ``.

    ``ceil(target_digits + log10(max(κ, 1)) + log10(max(γ, 1)) + safety)``: the construction loses about
    ``log10(κ + γ) <= log10 κ + log10 γ`` digits (THEORY.md §1: relative error ``u·(κ + γ)``), and
    ``target_digits`` must survive. ``κ`` or ``γ`` infinite (singular in float64) is refused, as are
    ``target_digits`` and ``safety`` that are not integers in ``0..MAX_DIGITS`` and a result above
    :data:`MAX_DIGITS` (1000 digits), all with :class:`~lora_theory.errors.InvalidArgumentError`.
    """
    for name, v in (("kappa", kappa), ("gamma", gamma)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not v >= 0:
            raise InvalidArgumentError(name, f"must be a non-negative real number, got {v!r}")
        if not math.isfinite(v):
            raise InvalidArgumentError(name, "is infinite: the matrix is singular, no precision helps")
    target_digits = as_int(target_digits, "target_digits", 0, MAX_DIGITS)
    safety = as_int(safety, "safety", 0, MAX_DIGITS)
    digits = int(
        math.ceil(target_digits + math.log10(max(float(kappa), 1.0)) + math.log10(max(float(gamma), 1.0)) + safety)
    )
    if digits > MAX_DIGITS:
        raise InvalidArgumentError(
            "kappa",
            f"κ = {float(kappa):.3g}, γ = {float(gamma):.3g} with {target_digits} digits kept and {safety} "
            f"safety need {digits} digits, beyond the cap MAX_DIGITS = {MAX_DIGITS}",
        )
    return digits


def _check_digits(digits):
    if digits is None:
        return None
    if isinstance(digits, (bool, np.bool_)) or not isinstance(digits, numbers.Integral) or digits < 16:
        raise InvalidArgumentError("digits", f"must be an integer >= 16 (or None to choose), got {digits!r}")
    if digits > MAX_DIGITS:
        raise InvalidArgumentError(
            "digits",
            f"must be at most MAX_DIGITS = {MAX_DIGITS} (the cost grows as digits^1.6 per operation), got {digits}",
        )
    return int(digits)


def _warn_if_too_few_digits(fit, what, stacklevel=3):
    """Warn when digits the caller chose keep fewer than 8 after the construction lost ``log10(κ + γ)``.

    The rule of the float64 path (:func:`lora_theory.numerics.warn_if_ill_conditioned`) at the working
    precision: warn when ``u_digits·(κ + γ) > 1e-8``, ``u_digits = eps / 2`` at ``digits`` significant
    digits. (Warning whenever :func:`choose_digits` asks for more would warn at 16 to 23 digits even for
    ``κ = 1``, its 8 safety digits included.) The message gives :func:`choose_digits` ``(κ, γ)``.
    """
    with _mp.workdps(fit.digits):
        u = float(_mp.eps) / 2
    expected = u * (fit.kappa + fit.gamma)
    if expected > WARN_RELATIVE_ERROR:
        try:
            needed = choose_digits(fit.kappa, fit.gamma)
        except InvalidArgumentError:
            needed = f"more than MAX_DIGITS = {MAX_DIGITS}"
        warnings.warn(
            f"{what} at digits={fit.digits} is ill-conditioned: κ = {fit.kappa:.3g}, γ = {fit.gamma:.3g}; expect "
            f"relative errors near u·(κ + γ) = {expected:.2g} at that precision; {needed} digits are needed "
            f"(choose_digits: {TARGET_DIGITS} kept + log10 κ + log10 γ + {SAFETY_DIGITS} safety), or pass "
            "digits=None to choose them",
            IllConditionedWarning,
            stacklevel=stacklevel,
        )


def _at_precision(build, float64_run, digits, what, least=16):
    """``build(digits, reason)`` at the caller's ``digits`` (warning when too few for its ``κ``, ``γ``), or,
    with ``digits=None``, at :func:`choose_digits` of the float64 construction ``float64_run()``'s ``κ``,
    ``γ`` (at least ``least``), built again at more when the values found at that precision ask for more
    than :data:`RERUN_DIGITS` beyond. The shared precision rule of the ``lora_*_mp`` functions."""
    if digits is not None:
        fit = build(digits, "given")
        _warn_if_too_few_digits(fit, what, stacklevel=4)
        return _verify(fit, what)
    kappa, gamma = _float64_kappa_estimate(float64_run)
    digits = max(choose_digits(kappa, gamma), least)
    fit = build(
        digits,
        f"chosen from the float64 κ ≈ {kappa:.3g}, γ ≈ {gamma:.3g}: {TARGET_DIGITS} + log10 κ + "
        f"log10 γ + {SAFETY_DIGITS} safety" + (f" (at least {least})" if least > 16 else ""),
    )
    needed = choose_digits(fit.kappa, fit.gamma)  # refuses more than MAX_DIGITS
    if needed > digits + RERUN_DIGITS:
        fit = build(needed, f"raised to {needed} for κ = {fit.kappa:.3g}, γ = {fit.gamma:.3g} found at {digits} digits")
    return _verify(fit, what)


def _working_tolerance(digits: int, kappa: float, gamma: float) -> float:
    """``max(c·u_d·(κ + γ), 1e-300)``: :func:`lora_theory.numerics.tolerance`'s rule at ``digits`` significant
    digits (``u_d`` their unit roundoff, ``c`` = :data:`~lora_theory.numerics.TOLERANCE_CONSTANT`), kept
    within the float64 range (``u_d`` underflows float64 beyond about 300 digits; a relative error below
    1e-300 is still far inside any float64 claim)."""
    with _mp.workdps(digits):
        u = _mp.eps / 2
        value = _mp.mpf(TOLERANCE_CONSTANT) * u * (_mp.mpf(kappa) + _mp.mpf(gamma))
    return max(float(value), 1e-300)


def _verify(fit, what):
    """Set ``fit.exact`` from its rank condition *and* its measured error, as the float64 fits do
    (:func:`lora_theory.numerics.verified_exact` at the working precision): ``rank_sufficient``, the
    ``measured_error`` on the fit's check inputs at most its ``tolerance``, and that tolerance (times the
    ball's ``radius_amplification`` for an FNN) at most :data:`~lora_theory.numerics.EXACT_TOLERANCE_LIMIT`."""
    exact = verified_exact(
        fit.rank_sufficient,
        fit.measured_error,
        fit.tolerance,
        getattr(fit, "radius_amplification", 1.0),
        what=what,
        stacklevel=5,
        arithmetic=f"{fit.digits}-digit",
    )
    object.__setattr__(fit, "exact", exact)
    return fit


def _float64_kappa_estimate(run):
    """``(κ, γ)`` of the float64 construction (``inf`` when float64 finds a matrix singular)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        try:
            fit = run()
        except SingularMatrixError as exc:
            # singular to float64: at least 1e16; an exactly singular matrix (κ = inf) gets the digits of
            # 1e16 and is then named by the high-precision solve itself
            kappa = exc.condition_number
            return (max(kappa, 1e16) if math.isfinite(kappa) else 1e16), 0.0
    return fit.kappa, float(getattr(fit, "gamma", 0.0))
