"""float64 failures as named errors: the public functions run with numpy's overflow and invalid-value
warnings raised, and an overflow, a NaN made inside, or an SVD or solve that did not converge leaves them as
:class:`~lora_theory.errors.NumericalError` naming the function, never as an ``inf``/``NaN`` result or a raw
``FloatingPointError``/``LinAlgError``."""

from __future__ import annotations

import functools
import threading

import numpy as np

from .errors import NumericalError

_depth = threading.local()


def numeric_guard(fn):
    """Run ``fn`` under ``np.errstate(over="raise", invalid="raise")``; numpy's and LAPACK's failures leave it as
    :class:`NumericalError` naming the outermost guarded function, the one the caller called. Underflow (to
    zero or a subnormal) and division by zero (guarded where it matters) keep numpy's defaults. Python's own
    float ``OverflowError`` is named too; Python float sums and products that overflow to ``inf`` raise nothing,
    so functions that compute with Python floats check their results (:func:`finite_or_raise`).

    The modules apply it after the definition (``f = numeric_guard(f)``), not as a decorator: mutmut, the
    mutation tester of docs/mutation.md, leaves decorated functions unmutated, and these are the constructions.
    """
    name = fn.__name__

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        depth = getattr(_depth, "value", 0)
        _depth.value = depth + 1
        try:
            with np.errstate(over="raise", invalid="raise"):
                return fn(*args, **kwargs)
        except FloatingPointError as exc:
            if depth:
                raise
            raise NumericalError(name, str(exc)) from None
        except np.linalg.LinAlgError as exc:
            if depth:
                raise
            raise NumericalError(name, f"LinAlgError: {exc}") from None
        except OverflowError as exc:  # Python float arithmetic (x ** 2)
            if depth:
                raise
            raise NumericalError(name, f"OverflowError: {exc}") from None
        finally:
            _depth.value = depth

    return guarded


def finite_or_raise(operation: str, **values) -> None:
    """Raise :class:`NumericalError` naming the first of ``values`` (name -> float or array) that is not finite."""
    for what, value in values.items():
        if not np.all(np.isfinite(np.asarray(value, dtype=float))):
            raise NumericalError(operation, f"{what} is not finite in float64 ({value!r})")
