"""Exceptions and warnings raised by :mod:`lora_theory`.

Every error about what the caller passed is a :class:`ValueError` subclass that names the offending
argument, so that ``except ValueError`` keeps working and messages say what to fix.

The documented exceptions of the public functions, and the only ones they raise on any input (checked by
tests/test_fuzz.py for every public name but the rank advice of ``advisor.py``), are the three subclasses of
:class:`LoraTheoryError`, each with a one-line message:

* :class:`InvalidArgumentError`: wrong type, shape or value, NaN or inf, a size or precision beyond a cap;
* :class:`SingularMatrixError`: a matrix a construction must invert is singular (its ``κ`` attached);
* :class:`NumericalError`: finite input whose float64 computation overflowed or did not converge.

:class:`IllConditionedWarning` is a warning, not an error: the result is returned, with what it lost.
"""

from __future__ import annotations

import math

__all__ = [
    "LoraTheoryError",
    "InvalidArgumentError",
    "SingularMatrixError",
    "NumericalError",
    "IllConditionedWarning",
]


class LoraTheoryError(Exception):
    """Base class of every exception raised on purpose by this package."""


class InvalidArgumentError(LoraTheoryError, ValueError):
    """An argument has the wrong shape, type, value or is not finite.

    Attributes
    ----------
    argument : str
        Name of the offending argument as the caller spelt it (``"rank"``, ``"frozen[2]"``...).
    """

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        # one line: the repr of an offending array spans several
        super().__init__(" ".join(f"{argument}: {message}".split()))


class SingularMatrixError(LoraTheoryError, ValueError):
    """A matrix that a construction must invert is singular (to working precision).

    The theorems of Zeng & Lee (2024) assume these matrices are invertible; the construction cannot
    proceed without them, so it refuses rather than return a wrong adapter.

    Attributes
    ----------
    matrix : str
        Which matrix, in the paper's notation (for example ``"P_2 = (W_1 + Δ_1)"``).
    condition_number : float
        Its 2-norm condition number ``κ`` (``inf`` when exactly singular).
    context : str
        Why the construction must invert it (empty when not given).
    """

    def __init__(self, matrix: str, condition_number: float, context: str = "") -> None:
        self.matrix = matrix
        self.condition_number = float(condition_number)
        self.context = context
        kappa = "inf" if not math.isfinite(self.condition_number) else f"{self.condition_number:.3g}"
        where = f" ({context})" if context else ""
        super().__init__(f"{matrix} must be invertible but is singular to working precision, κ = {kappa}{where}")


class NumericalError(LoraTheoryError, ArithmeticError):
    """float64 arithmetic failed inside a computation: an overflow, an invalid operation (``inf - inf``,
    ``0 · inf``) or an SVD or solve that did not converge.

    Inputs are finite when this is raised (non-finite input is refused as :class:`InvalidArgumentError`);
    their scale is too large for float64 (weights near 1e150 multiply to 1e300 and beyond), or what they
    give is too ill-conditioned for LAPACK. The constructions refuse rather than return ``inf`` or ``NaN``
    entries. Rescale the input, or use the exact or high-precision paths (:mod:`lora_theory.symbolic`,
    :mod:`lora_theory.highprec`).

    Attributes
    ----------
    operation : str
        The public function that was running (``"lora_fnn"``...).
    detail : str
        numpy's or LAPACK's own message (``"overflow encountered in matmul"``...).
    """

    def __init__(self, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = " ".join(str(detail).split())
        super().__init__(
            f"{operation}: float64 arithmetic failed ({self.detail}); the input's scale is beyond what "
            "float64 can carry through this computation"
        )


class IllConditionedWarning(UserWarning):
    """A construction inverted or amplified enough to lose significant digits.

    The message carries ``κ`` (largest condition number inverted) and ``γ`` (bias amplification for FNNs),
    and the expected relative error ``u·(κ + γ)``.
    """
