"""Whether a float64 fit needs the high-precision path, and how many digits (:func:`suggest_precision`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._guard import numeric_guard
from ..errors import InvalidArgumentError
from ..numerics import (
    WARN_RELATIVE_ERROR,
    unit_roundoff,
)
from ..tfn import TFNFit
from .fnn import HighPrecisionFNNFit
from .precision import choose_digits
from .tfn import HighPrecisionTFNFit


@dataclass(frozen=True)
class PrecisionAdvice:
    """Whether a float64 construction kept its digits, and the precision that would.

    Attributes
    ----------
    kappa, gamma : float
        From the fit (``γ = 0`` for linear fits).
    expected_error : float
        ``u·(κ + γ)·a`` in float64: the relative error to expect (``a``: the radius amplification of an FNN
        fit on a ball, :attr:`lora_theory.fnn.FNNFit.radius_amplification`; 1 otherwise).
    float64_sufficient : bool
        ``expected_error <= 1e-8`` (the threshold of :class:`~lora_theory.errors.IllConditionedWarning`).
    digits : int
        :func:`choose_digits` ``(κ, γ)`` (plus ``ceil(log10 a)``): what :func:`lora_linear_mp` /
        :func:`lora_fnn_mp` should use.
    message : str
    """

    kappa: float
    gamma: float
    expected_error: float
    float64_sufficient: bool
    digits: int
    message: str

    def __str__(self) -> str:
        return self.message


@numeric_guard
def suggest_precision(fit: object) -> PrecisionAdvice:
    """Advice for a float64 fit (:class:`~lora_theory.LinearFit`, :class:`~lora_theory.fnn.FNNFit`, ...).

    Reads ``fit.kappa`` and ``fit.gamma`` (0 when absent) and, for an FNN fit on a ball, its
    ``radius_amplification`` ``a`` (:attr:`lora_theory.fnn.FNNFit.radius_amplification`, 1 when absent): the
    expected relative error is ``u·(κ + γ)·a``, the value :class:`~lora_theory.errors.IllConditionedWarning`
    is raised on, and the digits :func:`choose_digits` ``(κ, γ)`` plus ``ceil(log10 a)``. When float64 is
    not enough the message names the high-precision path (:func:`lora_linear_mp`, :func:`lora_fnn_mp` or,
    for a :class:`~lora_theory.tfn.TFNFit`, :func:`lora_tfn_mp`, with the exact certificate
    :func:`lora_theory.symbolic.certify_tfn` beside it) and the digits it needs.
    """
    if not hasattr(fit, "kappa"):
        raise InvalidArgumentError("fit", f"must be a fit with a condition number (kappa), got {type(fit).__name__}")
    kappa = float(fit.kappa)
    gamma = float(getattr(fit, "gamma", 0.0) or 0.0)
    amplification = max(float(getattr(fit, "radius_amplification", 1.0) or 1.0), 1.0)
    expected = unit_roundoff() * (kappa + gamma) * amplification
    ok = expected <= WARN_RELATIVE_ERROR
    digits = choose_digits(kappa, gamma) + int(math.ceil(math.log10(amplification)))

    if isinstance(fit, (TFNFit, HighPrecisionTFNFit)):
        fn = "lora_tfn_mp"
    elif hasattr(fit, "domain") or hasattr(fit, "block_fits") or isinstance(fit, HighPrecisionFNNFit):
        fn = "lora_fnn_mp"
    else:
        fn = "lora_linear_mp"
    if isinstance(fit, TFNFit) and not ok:
        msg = (
            f"float64 loses about {math.log10(max(kappa, 1)):.1f} of its 16 digits (κ = {kappa:.3g}, expected "
            f"relative error {expected:.2g}): use the high-precision path, "
            f"lora_theory.highprec.lora_tfn_mp(..., digits={digits}), evaluated at that precision with its "
            "predict(); for a rational (or float64, taken exactly) instance, "
            "lora_theory.symbolic.certify_tfn certifies the construction exactly, with no rounding"
        )
        return PrecisionAdvice(kappa, gamma, expected, ok, digits, msg)
    if ok:
        amp = f", radius amplification a = {amplification:.3g}" if amplification > 1 else ""
        msg = (
            f"float64 suffices: κ = {kappa:.3g}, γ = {gamma:.3g}{amp}, expected relative error "
            f"u·(κ + γ){'·a' if amp else ''} = {expected:.2g}"
        )
    else:
        msg = (
            f"float64 loses about {math.log10(max((kappa + gamma) * amplification, 1)):.1f} of its 16 digits "
            f"(κ = {kappa:.3g}, "
            f"γ = {gamma:.3g}, expected relative error {expected:.2g}): use the high-precision path, "
            f"lora_theory.highprec.{fn}(..., digits={digits})"
        )
    return PrecisionAdvice(kappa, gamma, expected, ok, digits, msg)
