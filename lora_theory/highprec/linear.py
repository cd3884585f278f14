"""Zeng & Lee 2024, Lemma 1 (linear models) at raised precision: :func:`lora_linear_mp`, the SVD split of
:func:`lora_theory.lora_linear` with ``mpmath.svd_r`` and ``mpmath.lu_solve`` (the chain itself is
:func:`lora_theory.linear._split_chain`, here over mpmath arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import _display
from .._guard import numeric_guard
from .._types import ArrayLike, Matrices, Rank
from .._validate import as_array, as_ranks, as_square, as_square_sequence, as_tolerance
from ..adapter import Adapter
from ..errors import InvalidArgumentError, SingularMatrixError
from ..linear import (
    _chain_gamma,
    _ChainArithmetic,
    _no_assignment_error,
    _rank_scale,
    _split_chain,
    lora_linear,
)
from ..models import FNN
from ..numerics import (
    _LargestConditionNumber,
)
from .arithmetic import _LU, _cols, _eye, _fro, _mp, _mpm, _np, _prod
from .precision import _at_precision, _check_digits, _working_tolerance


def _chain_mp(factors, target, ranks, names, rank_tol, kappa_target=0.0):
    """The SVD split of Lemma 1 at working precision (:func:`lora_theory.linear._split_chain` with mpmath
    arithmetic). Returns ``(adapters, adapted, s, rank_E, kappas)``.

    ``factors``, ``target`` are mpmath matrices; ``adapters[l] = (A, B)`` mpmath matrices (``Δ = B A``).
    ``kappa_target``: the condition numbers of the solves that formed ``target`` (it carries their rounding,
    so the default rank tolerance grows by ``1 + kappa_target``, as :func:`lora_theory.tfn._rank_tol`).
    Blocks of singular directions go to layers in the fixed order when it works, else in the first
    assignment :func:`lora_theory.linear._search_assignment` finds (as the float64 chain); a
    :class:`SingularMatrixError` only when none works.
    """
    m = len(factors)
    n = target.rows
    suffix = [None] * m  # suffix[l] = Q_l, frozen after l
    suffix[m - 1] = _eye(n)
    for l in range(m - 2, -1, -1):
        suffix[l] = suffix[l + 1] * factors[l + 1]
    frozen_product = suffix[0] * factors[0]
    E = target - frozen_product  # (n, n)
    U, s, V = _mp.svd_r(E)  # E = U diag(s) V, V's rows: V^T
    s = [s[i] for i in range(n)]
    if rank_tol is None:
        scale = max(_fro(target), _fro(frozen_product), s[0])
        rank_tol = n * _mp.eps * scale * 2**10 * (1 + kappa_target)
    rank_E = sum(1 for v in s if v > rank_tol)

    def solve_q(l, start, stop, Q, C):
        q_name = f"Q_{l + 1} = " + " ".join(reversed(names[l + 1 :]))
        lu = _LU(Q, q_name, f"it receives singular directions {start + 1}..{stop} of E")
        return lu.solve(C), ((f"Q_{l + 1}", lu.kappa),)  # (n, k) = Q^{-1} E V_l

    def solve_p(l, start, stop, P, F, given):
        p_name = f"P_{l + 1} = " + " ".join(f"({x} + Δ)" for x in reversed(names[:l]))
        lu = _LU(P.T, p_name, f"layer {l + 1} receives singular directions of E")
        return lu.solve(F.T).T, ((f"P_{l + 1}", lu.kappa),)  # (k, n) = V_l^T P^{-1}

    arith = _ChainArithmetic(
        directions=lambda start, stop: (_cols(U, start, stop) * _mp.diag(s[start:stop]), V[start:stop, :]),
        frozen_after=lambda l: suffix[l],  # (n, n)
        product=lambda adapted: _prod(adapted, n),
        solve_q=solve_q,
        solve_p=solve_p,
        adapt=lambda l, M, A, B: (M + B * A, (A, B), ()),
        singular=SingularMatrixError,
        no_assignment=lambda first, cut: _no_assignment_error(first, cut, m),
    )
    _, adapted, notes, given = _split_chain(arith, factors, ranks, rank_E)
    adapters = [given.get(l, (_mp.zeros(0, n), _mp.zeros(n, 0))) for l in range(m)]
    return adapters, list(adapted), s, rank_E, dict(notes)


@dataclass(frozen=True, eq=False)
class HighPrecisionLinearFit(_LargestConditionNumber):
    """Lemma 1's adapters computed at ``digits`` significant digits.

    Attributes
    ----------
    adapters_mp : tuple of (A, B)
        mpmath matrices, ``A`` ``(r_l, D)``, ``B`` ``(D, r_l)``, ``Δ_l = B A``.
    weights_mp : tuple of mpmath.matrix (D, D)
        ``W_l + Δ_l``.
    ranks : tuple of int
        Budgets ``R_l``.
    digits : int
        Working precision (significant decimal digits).
    digits_reason : str
        How ``digits`` was chosen.
    singular_values : tuple of mpmath.mpf
        ``σ(E)`` at working precision.
    error_rank : int
        ``rank(E)`` at working precision.
    achieved_error : mpmath.mpf
        ``||Π(W_l + Δ_l) - T||_F / ||T||_F``, computed at working precision.
    optimal_error : mpmath.mpf
        Lemma 1's optimum in the same norm, ``sqrt(Σ_{j>k} σ_j^2) / ||T||_F`` (0 when exact).
    exact : bool
        ``Σ R_l >= rank(E)`` (:attr:`rank_sufficient`) *and* the working precision kept it:
        :attr:`measured_error` is at most :attr:`tolerance`, itself at most
        :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT` (as :attr:`lora_theory.LinearFit.exact`).
    condition_numbers : dict of str -> float
        ``κ`` of every ``Q_l``, ``P_l`` solved with (see :class:`_LU`).
    rank_sufficient : bool
        ``Σ R_l >= rank(E)``: the product equals ``T`` in exact arithmetic.
    measured_error : float
        ``||Π(W_l + Δ_l) - T||_F / ||T||_2``, the product computed at working precision (the Frobenius norm
        bounds the spectral one from above).
    tolerance : float
        ``c·u_d·(κ + γ)·s / ||T||_2`` with ``s = max(||T||_2, ||Π W_l||_2)``: the float64 rule
        (:func:`lora_theory.numerics.tolerance`) at ``digits`` digits, relative to ``||T||_2`` as
        :attr:`measured_error` is.
    """

    adapters_mp: tuple
    weights_mp: tuple
    frozen: tuple
    target: np.ndarray
    ranks: tuple
    digits: int
    digits_reason: str
    singular_values: tuple
    error_rank: int
    achieved_error: object
    optimal_error: object
    exact: bool
    condition_numbers: dict = field(default_factory=dict)
    rank_sufficient: bool = False
    measured_error: float = float("nan")
    tolerance: float = float("nan")

    __repr__ = _display.high_precision_repr

    @property
    def gamma(self) -> float:
        """The size amplification of the chain, as :attr:`lora_theory.LinearFit.gamma` (from float64 roundings)."""
        return _chain_gamma(self.frozen, tuple(_np(M) for M in self.weights_mp), self.target)

    @property
    def adapters(self) -> tuple:
        """The adapters rounded to float64 (a float64 product of ``W + Δ`` loses the digits again)."""
        return tuple(
            Adapter(_np(A) if A.rows else np.zeros((0, B.rows)), _np(B) if B.cols else np.zeros((B.rows, 0)))
            for A, B in self.adapters_mp
        )

    def product(self) -> np.ndarray:
        """``Π(W_l + Δ_l)`` computed at working precision, rounded to float64, shape ``(D, D)``."""
        with _mp.workdps(self.digits):
            return _np(_prod(self.weights_mp, self.target.shape[0]))

    def predict(self, x: ArrayLike) -> np.ndarray:
        """The adapted linear model on ``x`` (``(D,)`` or ``(n, D)``), evaluated at working precision."""
        x = as_array(x, "x")
        X = np.atleast_2d(x)
        if X.shape[1] != self.target.shape[0]:
            raise InvalidArgumentError(
                "x", f"must have shape (D,) or (n, D) with D = {self.target.shape[0]}, got {x.shape}"
            )
        with _mp.workdps(self.digits):
            M = _prod(self.weights_mp, self.target.shape[0])
            Y = _np(M * _mpm(X.T)).T  # (n, D)
        return Y[0] if x.ndim == 1 else Y


@numeric_guard
def lora_linear_mp(
    frozen: Matrices | FNN, target: ArrayLike | FNN, rank: Rank, digits: int | None = 50, *, rank_tol: object = None
) -> HighPrecisionLinearFit:
    """Lemma 1's construction (Zeng & Lee 2024, Lemma 1 (linear models)) at raised precision.

    Parameters
    ----------
    frozen : sequence of L arrays (D, D)
        ``W_1 .. W_L`` (float64, taken exactly).
    target : array (D, D)
        ``T``.
    rank : int in 0..D, or sequence of L such ints
        ``R`` or per-layer ``R_l``.
    digits : int in 16..MAX_DIGITS (1000), or None
        Significant decimal digits. ``None`` chooses :func:`choose_digits` from the float64 construction's
        ``κ`` (and raises it if the ``κ`` found at that precision asks for more).
    rank_tol : float, optional
        Singular values of ``E`` at or below this are zero (default ``D · 10^-digits · scale · 2^10``: the
        float64 data are exact, so ``E``'s rank is the exact one up to the working precision). Finite and
        ``>= 0``; a NaN would count no singular value and call any fit exact.

    Returns
    -------
    HighPrecisionLinearFit

    Raises
    ------
    InvalidArgumentError
        As :func:`lora_theory.lora_linear`; ``digits`` not an int >= 16; ``rank_tol`` NaN, infinite or negative.
    SingularMatrixError
        ``Q_l`` or ``P_l`` singular at the working precision.

    Warns
    -----
    IllConditionedWarning
        When ``digits`` is given and too few: ``u·(κ + γ) > 1e-8`` at that precision; the message gives the
        digits :func:`choose_digits` asks for.
    """
    frozen = as_square_sequence(frozen, "frozen")
    n = frozen[0].shape[0]
    target = as_square(target, "target", n)
    ranks = as_ranks(rank, len(frozen), n)
    rank_tol = as_tolerance(rank_tol, "rank_tol")

    return _at_precision(
        lambda d, reason: _linear_mp(frozen, target, ranks, d, reason, rank_tol),
        lambda: lora_linear(frozen, target, ranks),
        _check_digits(digits),
        "high-precision linear construction (Lemma 1)",
    )


def _linear_mp(frozen, target, ranks, digits, reason, rank_tol):
    n = target.shape[0]
    with _mp.workdps(digits):
        W = [_mpm(w) for w in frozen]
        T = _mpm(target)
        tol = None if rank_tol is None else _mp.mpf(rank_tol)
        adapters, adapted, s, rank_E, kappas = _chain_mp(W, T, ranks, [f"W_{l + 1}" for l in range(len(W))], tol)
        norm_T = _fro(T)
        achieved = _fro(_prod(adapted, n) - T) / norm_T
        k = sum(ranks)
        tail = _mp.sqrt(_mp.fsum(v**2 for v in s[k:rank_E])) if k < rank_E else _mp.mpf(0)
        optimal = tail / norm_T
        miss = _fro(_prod(adapted, n) - T)  # >= the spectral norm of the miss
    kappa = max(kappas.values(), default=1.0)
    gamma = _chain_gamma(frozen, tuple(_np(M) for M in adapted), target)
    scale, norm_T2 = _rank_scale(frozen, target), float(np.linalg.norm(target, 2))
    ref = norm_T2 if norm_T2 > 0 else (scale if scale > 0 else 1.0)  # T = 0: relative to Π W, as in float64
    sufficient = sum(ranks) >= rank_E
    return HighPrecisionLinearFit(
        adapters_mp=tuple(adapters),
        weights_mp=tuple(adapted),
        frozen=tuple(frozen),
        target=target,
        ranks=ranks,
        digits=digits,
        digits_reason=reason,
        singular_values=tuple(s),
        error_rank=rank_E,
        achieved_error=achieved,
        optimal_error=optimal,
        exact=sufficient,
        condition_numbers=kappas,
        rank_sufficient=sufficient,
        measured_error=float(miss / ref),
        tolerance=_working_tolerance(digits, kappa, gamma) * (scale / ref if scale > 0 else 1.0),
    )
