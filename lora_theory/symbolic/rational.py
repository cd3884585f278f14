"""Exact rational linear algebra for the certificates: floats taken exactly as the binary fractions they are,
matrices as sympy ``DomainMatrix`` over ``QQ``, and the small helpers the constructions share.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import sympy
from sympy import QQ
from sympy.polys.matrices import DomainMatrix

from ..errors import InvalidArgumentError
from ..models import FNN


def _q(value, name):
    """One entry as an element of ``QQ``: ints, floats (exact binary value), Fractions, sympy Rationals."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(name, f"entries must be rational numbers, got the bool {value!r}")
    if isinstance(value, numbers.Integral):
        return QQ(int(value))
    if isinstance(value, Fraction):
        return QQ(value.numerator, value.denominator)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise InvalidArgumentError(name, f"contains NaN or infinite entries ({value!r})")
        f = Fraction(float(value))  # the float's exact binary value
        return QQ(f.numerator, f.denominator)
    if isinstance(value, sympy.Basic):
        if value.is_Rational:
            return QQ(int(value.p), int(value.q))
        if isinstance(value, sympy.Float):
            f = Fraction(*sympy.Rational(value).as_numer_denom())  # exact value of the binary float
            return QQ(f.numerator, f.denominator)
        raise InvalidArgumentError(name, f"entries must be rational numbers, got {value} (not rational)")
    if type(value).__name__ in ("PythonMPQ", "mpq"):
        return value
    raise InvalidArgumentError(
        name, f"entries must be rational (int, float, Fraction or sympy Rational), got {type(value).__name__}"
    )


def _dm(value, name, shape=None) -> DomainMatrix:
    """A rational matrix (sympy Matrix, numpy array, nested lists) as a ``DomainMatrix`` over ``QQ``."""
    if isinstance(value, DomainMatrix):
        rows = value.convert_to(QQ).to_list()
    elif isinstance(value, sympy.MatrixBase):
        rows = value.tolist()
    else:
        if isinstance(value, (str, bytes)):
            raise InvalidArgumentError(name, "must be a matrix, got a string")
        arr = np.asarray(value, dtype=object)
        if arr.ndim == 1 and shape is not None and len(shape) == 2 and shape[1] == 1:
            arr = arr.reshape(-1, 1)
        if arr.ndim != 2:
            raise InvalidArgumentError(name, f"must be a 2-dimensional matrix, got shape {arr.shape}")
        rows = arr.tolist()
    m = len(rows)
    n = len(rows[0]) if m else 0
    if shape is not None and (m, n) != tuple(shape):
        raise InvalidArgumentError(name, f"must have shape {tuple(shape)}, got {(m, n)}")
    data = [[_q(v, name) for v in row] for row in rows]
    return DomainMatrix(data, (m, n), QQ)


def _vec(value, name, size) -> DomainMatrix:
    """A rational vector as a ``(size, 1)`` DomainMatrix (accepts length-``size`` sequences or columns)."""
    if isinstance(value, (sympy.MatrixBase, DomainMatrix)):
        return _dm(value, name, (size, 1))
    arr = np.asarray(value, dtype=object).reshape(-1) if not isinstance(value, (str, bytes)) else None
    if arr is None or arr.shape != (size,):
        got = None if arr is None else arr.shape
        raise InvalidArgumentError(name, f"must be a vector of length {size}, got shape {got}")
    return _dm(arr.reshape(-1, 1), name, (size, 1))


def _sym(M: DomainMatrix) -> sympy.ImmutableMatrix:
    return sympy.ImmutableMatrix(M.to_Matrix())


def rational_matrix(value) -> sympy.ImmutableMatrix:
    """``value`` as an exact sympy matrix; floats become their exact binary fractions (``0.1`` is not 1/10)."""
    return _sym(_dm(value, "value"))


def _eye(n):
    return DomainMatrix.eye(n, QQ).to_dense()


def _zeros(m, n):
    return DomainMatrix.zeros((m, n), QQ).to_dense()


def _prod(matrices, n) -> DomainMatrix:
    out = _eye(n)
    for M in matrices:
        out = M * out
    return out


def _count_nonzero(M: DomainMatrix) -> int:
    return sum(1 for row in M.to_list() for v in row if v != 0)


def _square_list(values, name):
    if isinstance(values, FNN):
        values = values.weights
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, (Sequence, np.ndarray))
        or isinstance(values, sympy.MatrixBase)
    ):
        raise InvalidArgumentError(name, f"must be a sequence of matrices, got {type(values).__name__}")
    if isinstance(values, np.ndarray) and values.ndim == 2:
        raise InvalidArgumentError(name, "must be a sequence of matrices (one per layer), got one matrix")
    if len(values) == 0:
        raise InvalidArgumentError(name, "must hold at least one matrix")
    out, n = [], None
    for i, v in enumerate(values):
        M = _dm(v, f"{name}[{i}]")
        if M.shape[0] != M.shape[1] or M.shape[0] == 0:
            raise InvalidArgumentError(f"{name}[{i}]", f"must be a non-empty square matrix, got shape {M.shape}")
        if n is not None and M.shape[0] != n:
            raise InvalidArgumentError(f"{name}[{i}]", f"must be {n} x {n} like the other matrices, got {M.shape}")
        n = M.shape[0]
        out.append(M)
    return out


def _fraction_upper(x: float) -> Fraction:
    """A short rational ``>= x`` (``x`` a finite float): rounded up on a grid of 2^-20 relative spacing."""
    if x <= 0:
        return Fraction(0)
    e = math.frexp(x)[1] - 20
    step = Fraction(2) ** e
    return Fraction(math.ceil(Fraction(x) / step)) * step
