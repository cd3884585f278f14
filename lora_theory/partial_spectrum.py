"""Certified partial spectra: the number of singular values above a threshold without the full SVD.

The rank advisor needs, per layer, ``#{i : σ_i(ΔW) > τ}`` for the noise floor ``τ`` (THEORY.md §5), and the
leading singular values a person reads. Only the singular values above ``τ`` matter for that count. This
module computes the leading ones by randomised subspace iteration (a block Krylov method) in float64 and
*proves* the count, or says that it could not (THEORY.md §5.5, the project's own derivation, not a result of
Zeng & Lee 2024).

With ``Q̂`` (``m x b``) the computed, nearly orthonormal basis of the block, ``Ĉ = fl(Q̂ᵀA)`` (``b x n``), its
computed singular values ``σ̂_i`` and the residual ``R = A - Q̂Ĉ``:

* lower bounds (interlacing, with ``‖Q̂‖_2 <= sqrt(1 + δ_Q)``): ``σ_i(A) >= (σ̂_i - e_svd - e_C) / sqrt(1 + δ_Q)``;
* upper bounds (Weyl on ``AᵀA = ĈᵀĈ + RᵀR + E``): ``σ_i(A)² <= (σ̂_i + e_svd)² + ‖R‖_2² + ‖E‖_2``, with
  ``σ̂_i = 0`` for ``i > b``;
* ``‖R‖_2`` bounded by ``‖R‖_F`` (computed from ``R`` itself, not as the difference ``‖A‖_F² - ‖Ĉ‖_F²``,
  which cancels), else by ``‖RᵀR‖_F^{1/2}`` (the Schatten-4 norm), else, sharper, by a Cholesky test: if floating-point
  Cholesky of ``μI - fl(RᵀR)`` runs to completion then ``λ_max(RᵀR) <= μ`` plus the factorisation's backward error
  (Higham, *Accuracy and Stability of Numerical Algorithms*, Theorem 10.3).

Every floating-point step is charged with its standard error bound (``γ_k = k·u / (1 - k·u)``, ``u = 2^-53``):
the products ``Q̂ᵀA`` and ``RᵀR``, the forming of ``R``, the orthonormality defect ``δ_Q`` of ``Q̂`` and the
Cholesky factorisation. The one step taken on a model rather than a proof is the singular values of the
small ``b x n`` matrix ``Ĉ``: LAPACK's SVD is backward stable, ``σ̂_i = σ_i(Ĉ + F)`` with
``‖F‖_2 <= p(b, n)·u·‖Ĉ‖_2`` for a modest ``p``; the code takes ``e_svd = 4·max(b, n)·u·σ̂_1``, the same
``max(shape)·eps·σ_1`` rule as numpy's ``matrix_rank`` and as the advisor's ``svd_tolerance``.

The count is *settled* when the lower and upper counts agree. When they do not (a cluster of singular
values at ``τ``, or more values above ``τ`` than the largest block), :class:`PartialSpectrum` says so with the
interval, and the caller computes the full spectrum instead (``advise --spectrum auto``).

Shapes: the matrix ``A`` is ``m x n`` and is best given in its tall orientation (``m >= n``): the residual's
Gram matrix is ``n x n``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ._types import ArrayLike
from ._validate import as_array, as_int, rng_from
from .errors import InvalidArgumentError

__all__ = ["PartialSpectrum", "partial_spectrum", "partial_spectrum_from_blocks"]

U64 = 2.0**-53  # unit roundoff of float64, round to nearest
ETA = 2.0**-1074  # the smallest subnormal: an underflowing product or sum is off by at most this (Higham §2.1)

#: Entries' magnitude range in which the bounds are proved: ``max|A_ij|`` is 0 or in ``[2^-400, 2^400]``, so
#: that no square or Gram entry overflows and LAPACK's SVD is not in its rescaling range. Other matrices are
#: refused with a one-line error (scale by a power of two, which is exact, and scale ``τ`` alike).
MAGNITUDE_RANGE = (2.0**-400, 2.0**400)


def _gamma(k) -> float:
    """``γ_k = k·u / (1 - k·u)`` (Higham, §3.1): the relative error bound of a ``k``-term float64 dot product."""
    ku = float(k) * U64
    return ku / (1.0 - ku)


@dataclass(frozen=True, eq=False)
class PartialSpectrum:
    """Leading singular values of a matrix ``A`` (``m x n``) with certified bounds and a certified count.

    Attributes
    ----------
    shape : tuple (m, n)
    threshold : float
        ``τ``: the count is ``#{i : σ_i(A) > τ}``.
    values : ndarray (b,)
        The computed leading singular values ``σ̂_i`` (those of ``Q̂ᵀA``), descending.
    lower, upper : ndarray (b,)
        Certified bounds ``lower[i] <= σ_{i+1}(A) <= upper[i]``.
    residual : float
        Certified bound on every singular value past the block: ``σ_i(A) <= residual`` for ``i > b``.
    residual_method : str
        ``"frobenius"`` (``‖R‖_F``), ``"schatten4"`` (``‖RᵀR‖_F^{1/2}``), ``"cholesky"`` (the Cholesky
        test) or ``"none"`` (no residual bound: ``residual`` is ``‖A‖_F``).
    frobenius : float
        ``‖A‖_F`` as computed (float64, relative error below ``γ_{mn}``).
    rank_lower, rank_upper : int
        ``rank_lower <= #{i : σ_i(A) > τ} <= rank_upper``.
    block : int
        ``b``, the columns of the final basis.
    passes : int
        Passes over ``A`` (each reads every entry once).
    """

    shape: tuple
    threshold: float
    values: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    residual: float
    residual_method: str
    frobenius: float
    rank_lower: int
    rank_upper: int
    block: int
    passes: int

    @property
    def settled(self) -> bool:
        """Whether the count is proved: the lower and upper counts agree."""
        return self.rank_lower == self.rank_upper

    @property
    def rank(self) -> int | None:
        """``#{i : σ_i(A) > τ}`` when settled, ``None`` otherwise (never a guess)."""
        return self.rank_lower if self.settled else None

    def count(self, threshold: float) -> tuple[int, int]:
        """``(lo, hi)`` with ``lo <= #{i : σ_i(A) > threshold} <= hi``, from the same certified bounds."""
        t = float(threshold)
        lo = int(np.count_nonzero(self.lower > t))
        hi = int(np.count_nonzero(self.upper > t))
        if self.residual > t:
            hi = min(self.shape) if self.values.size < min(self.shape) else hi
        return lo, max(lo, hi)

    def energy_rank_bounds(self, energy: float) -> tuple[int, int]:
        """``(lo, hi)`` around the smallest ``r`` with ``Σ_{j<=r} σ_j² >= energy·‖A‖_F²``.

        ``hi``: the lower bounds already hold the share (``min(m, n)`` when they do not); ``lo``: the upper
        bounds (``residual`` past the block) cannot hold it before ``lo``. Exact when ``lo == hi``.
        """
        if self.frobenius == 0.0:
            return 0, 0
        k = min(self.shape)
        target = float(energy) * self.frobenius**2 * (1.0 - 1e-12)  # the advisor's own rounding allowance
        lo_sums = np.cumsum(self.lower**2)
        hit = np.nonzero(lo_sums >= target)[0]
        hi = int(hit[0]) + 1 if hit.size else k
        up_sums = np.cumsum(self.upper**2)
        hit = np.nonzero(up_sums >= target)[0]
        if hit.size:
            lo = int(hit[0]) + 1
        else:
            extra = self.residual**2
            deficit = target - (float(up_sums[-1]) if up_sums.size else 0.0)
            lo = k if extra == 0.0 else min(k, self.values.size + max(1, math.ceil(deficit / extra)))
        return min(lo, hi), hi

    def to_dict(self) -> dict:
        return {
            "shape": [int(v) for v in self.shape],
            "threshold": float(self.threshold),
            "values": [float(v) for v in self.values],
            "lower": [float(v) for v in self.lower],
            "upper": [float(v) for v in self.upper],
            "residual": float(self.residual),
            "residual_method": self.residual_method,
            "frobenius": float(self.frobenius),
            "rank_lower": int(self.rank_lower),
            "rank_upper": int(self.rank_upper),
            "settled": self.settled,
            "block": int(self.block),
            "passes": int(self.passes),
        }


def _check_threshold(threshold) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not math.isfinite(threshold)
        or threshold < 0
    ):
        raise InvalidArgumentError("threshold", f"must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def partial_spectrum(
    matrix: ArrayLike,
    threshold: float,
    *,
    block: int = 16,
    max_block: int | None = None,
    power_iterations: int = 2,
    seed: int = 0,
    block_rows: int = 1024,
) -> PartialSpectrum:
    """The certified count ``#{i : σ_i(matrix) > threshold}`` and the leading singular values (module docstring).

    Parameters
    ----------
    matrix : array (m, n)
        Finite real entries; computed in float64 (its wide orientation is transposed first).
    threshold : float >= 0, or callable
        ``τ``; or ``threshold(σ̂_1) -> τ`` when ``τ`` depends on the computed leading singular value (the
        advisor's ``svd_tolerance``), evaluated once per block.
    block : int
        Starting block size ``b`` (doubled while the count cannot be settled and ``b <= max_block``).
    max_block : int, optional
        Largest block (default ``min(m, n) // 4``, at least ``block``): past it a partial spectrum does not
        pay and the result is left unsettled.
    power_iterations : int
        Subspace iterations per block (each two passes over the matrix).
    seed : int
        Seed of the Gaussian starting block.
    block_rows : int
        Rows per pass step.

    Returns
    -------
    PartialSpectrum
        Of the tall orientation: ``shape`` is ``(max(m, n), min(m, n))``.

    Raises
    ------
    InvalidArgumentError
        Not a finite real 2-D matrix, entries outside :data:`MAGNITUDE_RANGE`, a negative or non-finite
        threshold, a block below 1, ``block_rows`` below 1, ``power_iterations`` outside ``0..100``, a bad seed.
    """
    a = as_array(matrix, "matrix", ndim=2)
    if 0 in a.shape:
        raise InvalidArgumentError("matrix", f"must be a non-empty 2-D matrix, got shape {a.shape}")
    block_rows = as_int(block_rows, "block_rows", 1)
    if a.shape[0] < a.shape[1]:
        a = a.T  # (m, n) tall: Gram is n x n

    def blocks():
        for start in range(0, a.shape[0], block_rows):
            yield a[start : start + block_rows]

    return partial_spectrum_from_blocks(
        a.shape, blocks, threshold, block=block, max_block=max_block, power_iterations=power_iterations, seed=seed
    )


def partial_spectrum_from_blocks(
    shape: tuple[int, int],
    blocks: Callable[[], Iterable[ArrayLike]],
    threshold: float,
    *,
    block: int = 16,
    max_block: int | None = None,
    power_iterations: int = 2,
    seed: int = 0,
) -> PartialSpectrum:
    """:func:`partial_spectrum` of a matrix given as row blocks (streaming callers; one block in memory).

    Parameters
    ----------
    shape : tuple (m, n)
        The matrix's shape (``m >= n`` keeps the residual's Gram matrix small).
    blocks : callable
        ``blocks()`` returns an iterator over consecutive real row blocks ``(rows, n)`` of the matrix (read
        as float64), the same entries every call; every pass checks the blocks' shapes and total row count
        ``m``, the first their finiteness.
    threshold, block, max_block, power_iterations, seed : as :func:`partial_spectrum`.

    Returns
    -------
    PartialSpectrum

    Raises
    ------
    InvalidArgumentError
        As :func:`partial_spectrum`; also a ``shape`` that is not two integers >= 1, ``blocks`` that is not
        callable or yields blocks that do not tile an ``m x n`` matrix.
    """
    tau_of = threshold if callable(threshold) else None
    tau = None if tau_of is not None else _check_threshold(threshold)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
        raise InvalidArgumentError("shape", f"must be a pair (m, n), got {shape!r}")
    m, n = as_int(shape[0], "shape[0]", 1), as_int(shape[1], "shape[1]", 1)
    if not callable(blocks):
        raise InvalidArgumentError("blocks", f"must be a callable returning row blocks, got {type(blocks).__name__}")
    block = as_int(block, "block", 1)
    max_block = None if max_block is None else as_int(max_block, "max_block", 1)
    power_iterations = as_int(power_iterations, "power_iterations", 0, 100)
    rng = rng_from(seed)
    blocks = _checked(blocks, m, n)
    k_all = min(m, n)
    top = max(block, k_all // 4) if max_block is None else max_block
    b = min(block, k_all)
    passes = 0

    # pass: ‖A‖_F², max|A_ij| and the first sketch Y = AΩ
    fro_sq = 0.0
    while True:
        omega = rng.standard_normal((n, b))  # (n, b)
        ys, fro_sq, amax = [], 0.0, 0.0
        for blk in blocks():
            blk_max = float(np.max(np.abs(blk), initial=0.0))
            if not math.isfinite(blk_max):  # NaN included: max() would drop it
                raise InvalidArgumentError("blocks", "contains NaN or infinite entries")
            amax = max(amax, blk_max)
            if amax > MAGNITUDE_RANGE[1]:
                _out_of_range(amax)
            fro_sq += float(np.einsum("ij,ij->", blk, blk))
            ys.append(blk @ omega)  # (rows, b)
        passes += 1
        if amax != 0.0 and amax < MAGNITUDE_RANGE[0]:
            _out_of_range(amax)
        q = np.linalg.qr(np.concatenate(ys))[0]  # (m, b)
        for _ in range(power_iterations):
            z = _left(blocks, q, n)  # (n, b) = Aᵀ Q
            p = np.linalg.qr(z)[0]
            q = np.linalg.qr(np.concatenate([blk @ p for blk in blocks()]))[0]  # (m, b)
            passes += 2
        c = _left(blocks, q, n).T  # (b, n) = Q̂ᵀA
        passes += 1
        fro = math.sqrt(fro_sq * (1.0 + _gamma(m * n + 1)) + m * n * ETA)  # upper bound on ‖A‖_F
        cert = _certify(q, c, fro, m, n)
        if tau_of is not None:  # τ from the computed σ̂_1
            tau = _check_threshold(tau_of(float(cert["values"][0]) if cert["values"].size else 0.0))
        lower, values, err = cert["lower"], cert["values"], cert
        lo = int(np.count_nonzero(lower > tau))
        grow = lo > b - max(2, b // 4) and b < k_all  # the rank may reach past the block
        if grow and 2 * b <= top:
            b *= 2
            continue
        if grow:  # past the largest block: unsettled
            return _result(
                (m, n), tau, values, lower, np.full_like(values, fro), fro, "none", fro_sq, lo, k_all, b, passes
            )
        result = _residual(blocks, q, c, err, (m, n), tau, fro, fro_sq, b, passes)
        if result.settled or 2 * b > top or b >= k_all:
            return result
        b *= 2


def _out_of_range(amax):
    raise InvalidArgumentError(
        "matrix",
        f"has entries up to {amax:.3g} in magnitude: certified bounds need max|A_ij| in [2^-400, 2^400] "
        "(scale the matrix and the threshold by a power of two)",
    )


def _checked(blocks, m, n):
    """``blocks`` with every block read as a finite float64 ``(rows, n)`` array and the rows counted to ``m``."""

    def checked():
        try:
            it = iter(blocks())
        except TypeError:
            raise InvalidArgumentError("blocks", "blocks() must return an iterable of row blocks") from None
        rows = 0
        for blk in it:
            if isinstance(blk, np.ndarray) and blk.dtype == np.float64 and blk.ndim == 2 and blk.shape[1] == n:
                a = blk  # as given, no copy (finiteness: the first pass's max|A_ij|)
            else:
                a = as_array(blk, "blocks", ndim=2, shape=(None, n))
            rows += a.shape[0]
            if rows > m:
                break
            yield a
        if rows != m:
            raise InvalidArgumentError("blocks", f"gave {rows}{'+' if rows > m else ''} rows, the shape says {m}")

    return checked


def _left(blocks, q, n):
    """``Aᵀ Q`` (``n x b``) accumulated over row blocks."""
    out = np.zeros((n, q.shape[1]))
    start = 0
    for blk in blocks():
        rows = blk.shape[0]
        out += blk.T @ q[start : start + rows]  # (n, b)
        start += rows
    return out


def _certify(q, c, fro, m, n) -> dict:
    """The lower bounds and the error terms of THEORY.md §5.5 for ``Q̂`` (``m x b``) and ``Ĉ`` (``b x n``)."""
    b = q.shape[1]
    gram_q = q.T @ q  # (b, b)
    # δ_Q >= ‖Q̂ᵀQ̂ - I‖_2: the computed defect plus the product's error γ_m·‖Q̂‖_F² (‖Q̂‖_F² <= b(1 + defect))
    defect = float(np.linalg.norm(gram_q - np.eye(b)))
    delta_q = defect * (1 + 4 * U64) + _gamma(m) * b * (1.0 + defect) * 1.01
    q_norm = math.sqrt(1.0 + delta_q)  # ‖Q̂‖_2
    q_fro = math.sqrt(b * (1.0 + delta_q))  # ‖Q̂‖_F
    # ‖Ĉ - Q̂ᵀA‖_F (|fl - exact| <= γ_m|Q̂ᵀ||A|, plus m·η per entry for underflow)
    e_c = _gamma(m) * q_fro * fro + math.sqrt(b * n) * m * ETA * 2
    values = np.linalg.svd(c, compute_uv=False)  # (b,)
    e_svd = 4.0 * max(b, n) * U64 * (float(values[0]) if values.size else 0.0)  # LAPACK backward error (model)
    lower = np.maximum(values - e_svd - e_c, 0.0) / q_norm * (1.0 - 2 * U64)
    c_norm = (float(values[0]) if values.size else 0.0) + e_svd
    # ‖Q̂ᵀR‖_2 <= ‖Q̂ᵀA - Ĉ‖ + ‖(I - Q̂ᵀQ̂)Ĉ‖, so ‖E‖ <= δ_Q‖Ĉ‖² + 2‖Ĉ‖·(e_C + δ_Q‖Ĉ‖) (THEORY.md §5.5)
    e_cross = delta_q * c_norm**2 + 2.0 * c_norm * (e_c + delta_q * c_norm)
    return {
        "values": values,
        "lower": lower,
        "e_svd": e_svd,
        "e_c": e_c,
        "e_cross": e_cross,
        "q_fro": q_fro,
        "c_fro": float(np.linalg.norm(c)) * (1 + 4 * U64) + 1e-300,
    }


def _uppers(values, e_svd, e_cross, eps):
    """``sqrt((σ̂_i + e_svd)² + ε² + ‖E‖)`` per value and ``sqrt(ε² + ‖E‖)`` past the block (slightly widened)."""
    widen = 1.0 + 8 * U64
    upper = np.sqrt((values + e_svd) ** 2 + eps**2 + e_cross) * widen
    return upper, math.sqrt(eps**2 + e_cross) * widen


def _result(shape, tau, values, lower, upper, residual, method, fro_sq, lo, hi, b, passes):
    return PartialSpectrum(
        shape=tuple(shape),
        threshold=tau,
        values=np.asarray(values, dtype=np.float64),
        lower=np.asarray(lower, dtype=np.float64),
        upper=np.asarray(upper, dtype=np.float64),
        residual=float(residual),
        residual_method=method,
        frobenius=math.sqrt(fro_sq),
        rank_lower=int(lo),
        rank_upper=int(max(lo, hi)),
        block=int(b),
        passes=int(passes),
    )


def _counts(lower, upper, tail, tau, k_all):
    lo = int(np.count_nonzero(lower > tau))
    hi = int(np.count_nonzero(upper > tau)) + ((k_all - upper.size) if tail > tau else 0)
    return lo, hi


def _residual(blocks, q, c, cert, shape, tau, fro, fro_sq, b, passes) -> PartialSpectrum:
    """Bound ``‖R‖_2``, ``R = A - Q̂Ĉ``: first ``‖R‖_F``; when that cannot settle the count, the Cholesky test
    on ``fl(RᵀR)`` (THEORY.md §5.5)."""
    import scipy.linalg

    m, n = shape
    k_all = min(m, n)
    values, lower, e_svd, e_cross = cert["values"], cert["lower"], cert["e_svd"], cert["e_cross"]
    # ‖R_exact - R̂‖_F <= γ_{b+1}(‖A‖_F + ‖Q̂‖_F‖Ĉ‖_F): forming Q̂Ĉ (b terms) and subtracting
    e_r = _gamma(b + 1) * (fro + cert["q_fro"] * cert["c_fro"]) + math.sqrt(m * n) * (b + 1) * ETA * 2
    # what ε must not exceed for the count to settle: the largest value not certified above τ, and the tail
    below = values[lower <= tau]
    s_star = float(below[0]) + e_svd if below.size else 0.0
    room = (tau**2 if tau < 2.0**500 else math.inf) - s_star**2 - e_cross
    gram = np.zeros((n, n)) if room > 0 else None
    r_sq = 0.0
    start = 0
    for blk in blocks():
        rows = blk.shape[0]
        r = blk - q[start : start + rows] @ c  # (rows, n)
        r_sq += float(np.einsum("ij,ij->", r, r))
        if gram is not None:
            gram += r.T @ r  # (n, n)
        start += rows
    passes += 1
    r_fro = math.sqrt(r_sq * (1.0 + _gamma(m * n + 1)) + m * n * ETA)  # upper bound on ‖R̂‖_F
    eps = r_fro + e_r
    upper, tail = _uppers(values, e_svd, e_cross, eps)
    lo, hi = _counts(lower, upper, tail, tau, k_all)
    if lo == hi or gram is None:
        return _result(shape, tau, values, lower, upper, tail, "frobenius", fro_sq, lo, hi, b, passes)
    e_gram = _gamma(m) * r_fro**2 + n * m * ETA * 2  # ‖fl(R̂ᵀR̂) - R̂ᵀR̂‖_F <= γ_m‖R̂‖_F² (+ underflow)
    # Schatten-4: ‖R̂‖_2² = ‖R̂ᵀR̂‖_2 <= ‖R̂ᵀR̂‖_F <= ‖Ĝ‖_F + e_gram (O(n²), tried before the O(n³) test)
    lam = float(np.linalg.norm(gram)) * (1.0 + _gamma(n * n + 1)) + e_gram
    eps4 = math.sqrt(lam) * (1 + 2 * U64) + e_r
    if eps4 < eps:  # the tighter of the two bounds stands
        eps, method = eps4, "schatten4"
        upper, tail = _uppers(values, e_svd, e_cross, eps)
        lo, hi = _counts(lower, upper, tail, tau, k_all)
    else:
        method = "frobenius"
    if lo == hi:
        return _result(shape, tau, values, lower, upper, tail, method, fro_sq, lo, hi, b, passes)
    # Cholesky test: μ chosen so that the certified ε just settles the count
    eps_need = math.sqrt(room) - e_r
    slack = 1.0 + 2.0 * _gamma(n + 1) * n * 1.01 + 4 * U64  # backward error of Cholesky, relative
    mu = (eps_need**2 - e_gram) / slack * (1.0 - 1e-9)
    if not (eps_need > 0 and 2.0**-900 <= mu <= 2.0**900):  # no Cholesky test near underflow or overflow
        return _result(shape, tau, values, lower, upper, tail, method, fro_sq, lo, hi, b, passes)
    h = np.negative(gram, out=gram)  # (n, n), in place: μI - Ĝ
    h[np.diag_indices(n)] += mu
    diag_max = float(np.max(np.abs(np.diag(h))))
    trace_h = float(np.trace(h))
    try:
        scipy.linalg.cholesky(h, lower=False, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return _result(shape, tau, values, lower, upper, tail, method, fro_sq, lo, hi, b, passes)
    # success: λ_min(H) >= -2γ_{n+1}·trace(H)/(1 - 2γ_{n+1}) (Higham Thm 10.3, constant doubled), the diagonal
    # subtraction rounded by u·|H_ii|; hence λ_max(R̂ᵀR̂) <= μ + those + γ_m‖R̂‖_F²
    g2 = 2.0 * _gamma(n + 1)
    lam = mu + g2 * abs(trace_h) * (1 + _gamma(n)) / (1.0 - g2) + 2 * U64 * diag_max + e_gram
    eps = math.sqrt(lam) * (1 + 2 * U64) + e_r
    upper, tail = _uppers(values, e_svd, e_cross, eps)
    lo, hi = _counts(lower, upper, tail, tau, k_all)
    return _result(shape, tau, values, lower, upper, tail, "cholesky", fro_sq, lo, hi, b, passes)
