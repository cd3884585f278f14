"""Matrices and arrays of high-precision numbers: mpmath matrices from and to float64, products, an LU factorisation
reused for every solve, and numpy object arrays of ``gmpy2.mpfr`` (or ``mpmath.mpf``) for fast evaluation at the
working precision.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np

from ..errors import SingularMatrixError
from ..numerics import (
    condition_number,
)

_mp = mpmath.mp


def _mpm(arr) -> mpmath.matrix:
    """A float64 array as an mpmath matrix (exact: every float64 is representable)."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    return _mp.matrix(arr.tolist())


def _np(M) -> np.ndarray:
    """An mpmath matrix rounded to float64."""
    return np.array([[float(M[i, j]) for j in range(M.cols)] for i in range(M.rows)], dtype=np.float64)


def _eye(n):
    return _mp.eye(n)


def _float_product(mats, n):
    out = np.eye(n)
    for M in mats:
        out = M @ out
    return out


def _prod(mats, n):
    out = _eye(n)
    for M in mats:
        out = M * out
    return out


def _fro(M):
    return _mp.sqrt(_mp.fsum(M[i, j] ** 2 for i in range(M.rows) for j in range(M.cols)))


class _LU:
    """An LU factorisation at working precision (+10 bits, as ``mpmath.lu_solve``), reused for every solve.

    ``kappa`` is the 2-norm condition number: from the float64 rounding of ``A`` while that is below
    1e12 (then accurate to 4 digits or better), else the 1-norm ``||A||_1 ||A^{-1}||_1`` at working
    precision. Construction raises :class:`SingularMatrixError` naming ``name`` when ``A`` is singular at
    the working precision (a pivot below ``||A||_1·eps``, or ``κ·eps >= 1``).
    """

    def __init__(self, A, name, context):
        self.n = A.rows
        with _mp.extraprec(10):
            try:
                self.LU, self.p = _mp.LU_decomp(A, use_cache=False)
            except ZeroDivisionError:
                raise SingularMatrixError(name, math.inf, context + f"; at {_mp.dps} digits") from None
            kappa = condition_number(_np(A))
            if not kappa < 1e12:
                kappa = _mp.mnorm(A, 1) * _mp.mnorm(self.solve(_eye(self.n)), 1)
        if kappa * _mp.eps >= 1:
            raise SingularMatrixError(name, float(kappa), context + f"; at {_mp.dps} digits")
        self.kappa = float(kappa)

    def solve(self, B):
        """``A^{-1} B`` for ``B`` of shape ``(n, k)``."""
        X = _mp.zeros(self.n, B.cols)
        with _mp.extraprec(10):
            for j in range(B.cols):
                x = _mp.U_solve(self.LU, _mp.L_solve(self.LU, B[:, j], self.p))
                for i in range(self.n):
                    X[i, j] = x[i]
        return X


def _cols(M, start, stop):
    return M[:, start:stop] if stop > start else _mp.zeros(M.rows, 0)


def _object_arrays(digits):
    """``(from_float, from_mpf, exp, context)`` for object arrays of high-precision numbers at ``digits``.

    ``gmpy2.mpfr`` when gmpy2 is installed (about 10 times faster in numpy's object loops), else
    ``mpmath.mpf``; both at the working precision of ``digits`` decimal digits plus 10 bits, and both exact
    on float64 and on mpmath numbers of that precision.
    """
    with _mp.workdps(digits):
        bits = _mp.prec + 10
    try:
        import gmpy2
    except ImportError:
        ctx = _mp.workprec(bits)
        return (
            np.vectorize(_mp.mpf, otypes=[object]),
            np.vectorize(lambda x: x, otypes=[object]),
            np.vectorize(_mp.exp, otypes=[object]),
            ctx,
        )
    ctx = gmpy2.context(precision=bits)  # round to nearest, whatever the caller's context says

    def from_mpf(x):
        if not _mp.isfinite(x):
            raise ArithmeticError(f"a high-precision parameter is not finite: {x}")
        sign, man, exp, _ = x._mpf_
        v = gmpy2.mul_2exp(gmpy2.mpfr(int(man)), int(exp))
        return -v if sign else v

    return (
        np.vectorize(gmpy2.mpfr, otypes=[object]),
        np.vectorize(from_mpf, otypes=[object]),
        np.vectorize(gmpy2.exp, otypes=[object]),
        ctx,
    )


def _nested_objects(v, vector: bool = False):
    """Nested lists of mpmath matrices as nested lists of their entries (mpf): a matrix as rows, or, with
    ``vector``, a ``(D, 1)`` column as a flat list."""
    if isinstance(v, list):
        return [_nested_objects(x, vector) for x in v]
    if vector:
        return [v[i, 0] for i in range(v.rows)]
    return [[v[i, j] for j in range(v.cols)] for i in range(v.rows)]


def _nested_np(v, vector: bool = False):
    """As :func:`_nested_objects`, rounded to float64 arrays."""
    if isinstance(v, list):
        return [_nested_np(x, vector) for x in v]
    return _np(v)[:, 0] if vector else _np(v)
