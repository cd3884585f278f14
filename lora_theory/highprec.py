"""The linear, FNN and transformer constructions in high-precision arithmetic (mpmath), for ill-conditioned cases.

THEORY.md §2.3 and §3: products of 8 frozen layers with weights ``U(-1/4, 1/4)`` (D = 16) have condition
numbers ``κ`` of 1e8 to 1e12, so the float64 construction of Lemma 1 loses up to every digit, and a ReLU
block loses about ``log10(γ)`` more digits in its linearising biases. The same constructions at ``digits``
significant decimal digits lose the same *number* of digits and keep the rest: at 50 digits the 8-layer
linear block reaches the target to 1e-30 or better.

* :func:`lora_linear_mp` — Zeng & Lee 2024, Lemma 1 (linear models), SVD split of
  :func:`lora_theory.lora_linear`, with ``mpmath.svd_r`` and ``mpmath.lu_solve``;
* :func:`lora_fnn_mp` — Theorem 3 / Theorem 6 on a certified ball, with the compensating biases of
  :func:`lora_theory.fnn.lora_fnn`;
* :func:`lora_tfn_mp` — Theorem 7, the transformer construction of :func:`lora_theory.lora_tfn`, evaluated
  at that precision (two-block float64 weights carry a relative output error up to 1e-10);
* :func:`choose_digits` — the precision for given ``κ`` and ``γ``: about ``16 + log10 κ + log10 γ + safety``;
* :func:`suggest_precision` — reads a float64 fit's ``κ`` and ``γ`` and says whether float64 suffices and,
  if not, how many digits the high-precision path needs.

The inputs are float64 arrays, taken *exactly* (every float64 is an mpmath number); only the construction
and the evaluation run at raised precision. Results round to float64 on request (:meth:`predict`,
:meth:`product`), which is where a float64 consumer should read them: a float64 forward pass through the
adapted weights would lose the digits again.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import mpmath
import numpy as np

from . import _display
from ._guard import numeric_guard
from ._types import ArrayLike, Matrices, Partition, Rank
from ._validate import as_array, as_int, as_ranks, as_square, as_square_sequence, as_tolerance
from .adapter import Adapter
from .errors import IllConditionedWarning, InvalidArgumentError, SingularMatrixError
from .fnn import (
    SAFETY,
    Domain,
    _ball_level_size,
    _block_gamma,
    _check_models,
    _check_points,
    _radius_amplification,
    lora_fnn,
)
from .linear import (
    _chain_gamma,
    _ChainArithmetic,
    _no_assignment_error,
    _rank_scale,
    _split_chain,
    lora_linear,
)
from .models import FNN, TFN
from .numerics import (
    TOLERANCE_CONSTANT,
    WARN_RELATIVE_ERROR,
    _LargestConditionNumber,
    condition_number,
    unit_roundoff,
    verified_exact,
)
from .partition import check_partition, partition_blocks, uniform_partition
from .tfn import CHECK_INPUTS, CHECK_TOKENS, TFNFit, _Carried, _check_pair, _walk, _WalkArithmetic, lora_tfn

__all__ = [
    "choose_digits",
    "PrecisionAdvice",
    "suggest_precision",
    "HighPrecisionLinearFit",
    "lora_linear_mp",
    "HighPrecisionFNNFit",
    "lora_fnn_mp",
    "HighPrecisionTFNFit",
    "lora_tfn_mp",
]

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
_mp = mpmath.mp


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


# --------------------------------------------------------------------------------------- mp helpers


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


# ------------------------------------------------------------------------------------------- linear


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


# ---------------------------------------------------------------------------------------------- FNN


def _forward(weights, biases, Z, relu):
    """``z_l = σ(W_l z_{l-1} + b_l)`` on the columns of ``Z`` (mpmath), ``relu[l]`` selecting ``σ``."""
    for l, (W, b) in enumerate(zip(weights, biases)):
        Z = W * Z
        for i in range(Z.rows):
            for j in range(Z.cols):
                v = Z[i, j] + b[i]
                Z[i, j] = v if (v > 0 or not relu[l]) else _mp.zero
    return Z


@dataclass(frozen=True, eq=False)
class HighPrecisionFNNFit:
    """Theorem 3 / Theorem 6's adapters and biases computed at ``digits`` significant digits.

    Attributes
    ----------
    weights_mp, biases_mp : tuple of mpmath.matrix
        ``W_l + Δ_l`` ``(D, D)`` and the new biases ``(D, 1)``.
    ranks, partition : tuple of int
    digits : int
    digits_reason : str
    kappa, gamma : float
        Largest condition number inverted and the bias amplification ``γ``
        (defined as in :class:`lora_theory.fnn.FNNFit`, from float64 roundings of the adapted weights).
    exact : bool
        ``Σ_{l ∈ P_i} R_l >= rank(E_i)`` for every block (:attr:`rank_sufficient`) *and* the working precision
        kept it, as :attr:`lora_theory.FNNFit.exact`: :attr:`measured_error` is at most :attr:`tolerance`,
        and that tolerance times :attr:`radius_amplification` is at most
        :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT`.
    block_errors : tuple of mpmath.mpf
        For each block, ``max(||W̃_i - T_i||_F / ||T_i||_F, ||o_i - c_i|| / ||c_i||)`` at working precision:
        how far the block's affine map (on its ball) is from the target layer's.
    levels : tuple of tuple of mpmath.mpf
        The linearising levels ``β_j`` of every block.
    center : ndarray (D,); radius : float
        The certified input ball.
    rank_sufficient : bool
        Every block's budget covers ``rank(E_i)``: ``f = f̄`` on the ball in exact arithmetic.
    measured_error : float
        ``max_x ||f(x) - f̄(x)||_2 / s_out`` over the check points of :func:`lora_theory.fnn.lora_fnn` (the
        centre, the points of the ball where each first-block pre-activation is smallest, and samples),
        both networks evaluated at working precision; ``s_out`` bounds the outputs on the ball.
    tolerance : float
        ``c·u_d·(κ + γ)``: :func:`lora_theory.numerics.tolerance`'s rule at ``digits`` digits.
    radius_amplification : float
        As :attr:`lora_theory.FNNFit.radius_amplification`, from the realised block products.
    """

    weights_mp: tuple
    biases_mp: tuple
    frozen: FNN
    target: FNN
    ranks: tuple
    partition: tuple
    digits: int
    digits_reason: str
    kappa: float
    gamma: float
    exact: bool
    block_errors: tuple
    levels: tuple
    center: np.ndarray
    radius: float
    condition_numbers: dict = field(default_factory=dict)
    rank_sufficient: bool = False
    measured_error: float = float("nan")
    tolerance: float = float("nan")
    radius_amplification: float = 1.0

    __repr__ = _display.high_precision_repr

    def _inputs(self, x):
        x = as_array(x, "x")
        X = np.atleast_2d(x)
        if X.ndim != 2 or X.shape[1] != self.frozen.width:
            raise InvalidArgumentError(
                "x", f"must have shape (D,) or (n, D) with D = {self.frozen.width}, got {x.shape}"
            )
        return x, X

    def _outputs(self, X):
        """``(f(X), f̄(X))`` as mpmath matrices ``(D, n)`` at working precision (call inside workdps)."""
        t = self.target
        Xm = _mpm(X.T)  # (D, n)
        relu_f = [
            self.frozen.activation == "relu" and (l < len(self.weights_mp) - 1 or self.frozen.final_relu)
            for l in range(len(self.weights_mp))
        ]
        relu_t = [t.activation == "relu" and (l < t.depth - 1 or t.final_relu) for l in range(t.depth)]
        f = _forward(self.weights_mp, self.biases_mp, Xm, relu_f)
        fbar = _forward([_mpm(T) for T in t.weights], [_mpm(c) for c in t.biases], Xm, relu_t)
        return f, fbar

    def predict(self, x: ArrayLike) -> np.ndarray:
        """The adapted FNN on ``x`` (``(D,)`` or ``(n, D)``), evaluated at working precision, rounded."""
        x, X = self._inputs(x)
        with _mp.workdps(self.digits):
            Xm = _mpm(X.T)
            relu = [
                self.frozen.activation == "relu" and (l < len(self.weights_mp) - 1 or self.frozen.final_relu)
                for l in range(len(self.weights_mp))
            ]
            Y = _np(_forward(self.weights_mp, self.biases_mp, Xm, relu)).T
        return Y[0] if x.ndim == 1 else Y

    def relative_error(self, x: ArrayLike) -> mpmath.mpf:
        """``||f(X) - f̄(X)||_F / ||f̄(X)||_F`` over the rows of ``x``, computed at working precision (mpf)."""
        _, X = self._inputs(x)
        with _mp.workdps(self.digits):
            f, fbar = self._outputs(X)
            den = _fro(fbar)
            return _fro(f - fbar) / den if den > 0 else _fro(f - fbar)

    def max_row_error(self, x: ArrayLike) -> float:
        """``max_x ||f(x) - f̄(x)||_2`` over the rows of ``x`` (``(n, D)``), both networks at working precision."""
        _, X = self._inputs(x)
        from_float, from_mpf, _, ctx = _object_arrays(self.digits)
        t = self.target
        relu_f = [
            self.frozen.activation == "relu" and (l < len(self.weights_mp) - 1 or self.frozen.final_relu)
            for l in range(len(self.weights_mp))
        ]
        relu_t = [t.activation == "relu" and (l < t.depth - 1 or t.final_relu) for l in range(t.depth)]
        with ctx:
            Xo = from_float(X)  # (n, D)
            f = _fnn_forward_objects(
                [from_mpf(np.array(_nested_objects(W), dtype=object)) for W in self.weights_mp],
                [from_mpf(np.array(_nested_objects(b, vector=True), dtype=object)) for b in self.biases_mp],
                Xo,
                relu_f,
            )  # (n, D)
            fbar = _fnn_forward_objects(
                [from_float(T) for T in t.weights], [from_float(c) for c in t.biases], Xo, relu_t
            )  # (n, D)
            worst = max(np.sum((f - fbar) ** 2, axis=1), default=0)
            return float(worst**0.5) if worst else 0.0

    @property
    def max_block_error(self) -> mpmath.mpf:
        """The largest of :attr:`block_errors` (mpf)."""
        return max(self.block_errors)


@numeric_guard
def lora_fnn_mp(
    frozen: FNN,
    target: FNN,
    rank: Rank,
    *,
    partition: Partition = None,
    input_radius: object,
    center: ArrayLike | None = None,
    digits: int | None = None,
    rank_tol: object = None,
) -> HighPrecisionFNNFit:
    """Theorem 3 (uniform partition) / Theorem 6 (general partition) of Zeng & Lee 2024 at raised precision.

    The construction of :func:`lora_theory.fnn.lora_fnn` on a certified ball, step for step: Lemma 1 in
    every block (:func:`lora_linear_mp`'s SVD split), compensating linearising biases
    ``b_j = β_j·1 - M_j β_{j-1}·1`` with ``β_j = max_k (r ||row_k(P_j)|| - (P_j u_0)_k)^+`` plus the same
    safety term (:data:`lora_theory.fnn.SAFETY`), the calibrating bias ``b_m = c_i - M_m β_{m-1}·1``, and the
    next ball (centre 0, radius ``||W̃_i||_2 r + ||W̃_i u_0 + c_i||``). The biases reach about ``γ`` times the
    signal, so the block needs about ``log10 γ`` digits more than the linear chain.

    Parameters
    ----------
    frozen, target : FNN
        As :func:`lora_theory.fnn.lora_fnn`.
    rank : int or sequence of L ints
    partition : block sizes, optional
    input_radius : float
        Radius of the certified input ball (ball domain only).
    center : array (D,), optional
    digits : int in 16..MAX_DIGITS (1000), or None
        ``None``: :func:`choose_digits` ``(κ, γ)`` of the float64 construction, raised when the values found
        at that precision ask for more.
    rank_tol : float, optional
        As in :func:`lora_linear_mp`.

    Returns
    -------
    HighPrecisionFNNFit

    Raises
    ------
    InvalidArgumentError, SingularMatrixError
        As :func:`lora_theory.fnn.lora_fnn` (a singular matrix at the working precision).

    Warns
    -----
    IllConditionedWarning
        As :func:`lora_linear_mp`: ``digits`` given and ``u·(κ + γ) > 1e-8`` at that precision.
    """

    L_, Lbar_, n = _check_models(frozen, target)
    ranks = as_ranks(rank, L_, n)
    sizes = uniform_partition(L_, Lbar_) if partition is None else check_partition(partition, L_, Lbar_)
    if (
        input_radius is None
        or isinstance(input_radius, (bool, np.bool_))
        or not isinstance(input_radius, numbers.Real)
        or not math.isfinite(input_radius)
        or input_radius <= 0
    ):
        raise InvalidArgumentError("input_radius", f"must be a positive finite real number, got {input_radius!r}")
    c0 = np.zeros(n) if center is None else as_array(center, "center", shape=(n,))
    rank_tol = as_tolerance(rank_tol, "rank_tol")
    r = float(input_radius)
    return _at_precision(
        lambda d, reason: _fnn_mp(frozen, target, ranks, sizes, r, c0, d, reason, rank_tol),
        lambda: lora_fnn(frozen, target, ranks, partition=sizes, input_radius=r, center=c0),
        _check_digits(digits),
        "high-precision FNN construction (Theorem 3)",
    )


def _fnn_mp(frozen, target, ranks, sizes, radius, center, digits, reason, rank_tol):

    n = frozen.width
    linearise = frozen.activation == "relu"
    weights, biases, kappas, block_errors, all_levels = [], [], {}, [], []
    first_partials, realised = [], []  # float64 P_j of block 1; W̃_i
    exact = True
    gamma = 0.0
    with _mp.workdps(digits):
        tol = None if rank_tol is None else _mp.mpf(rank_tol)
        u0 = _mpm(center)  # (n, 1)
        r = _mp.mpf(radius)
        one = _mp.matrix([[1] for _ in range(n)])
        for i, block in enumerate(partition_blocks(sizes)):
            factors = [_mpm(frozen.weights[l]) for l in block]
            T = _mpm(target.weights[i])
            c = _mpm(target.biases[i])
            names = [f"W_{l + 1}" for l in block]
            try:
                _, M, s, rank_E, block_kappas = _chain_mp(factors, T, ranks[block.start : block.stop], names, tol)
            except SingularMatrixError as exc:
                raise SingularMatrixError(
                    f"block {i + 1}: {exc.matrix}",
                    exc.condition_number,
                    f"block {i + 1} holds layers {block.start + 1}..{block.stop}",
                ) from None
            for key, k in block_kappas.items():
                kappas[f"block {i + 1}: {key}"] = k
            exact = exact and sum(ranks[block.start : block.stop]) >= rank_E
            m = len(M)
            in_size = float(_mp.norm(u0)) + float(r)
            level_sizes = []  # s_j, the size of layer j + 1's input (the rounding bookkeeping, _block_gamma)
            # magnitudes summed in M_j = W_j + Δ_j, as the float64 path counts them (FNNFit.gamma)
            added = [
                float(np.linalg.norm(frozen.weights[l], 2)) + float(np.linalg.norm(_np(Mj) - frozen.weights[l], 2))
                for l, Mj in zip(block, M)
            ]
            beta_prev = _mp.mpf(0)
            P = _eye(n)
            levels, block_biases = [], []
            for j in range(m - 1):
                P = M[j] * P  # (n, n) P_j
                Pu0 = P * u0  # (n, 1)
                if i == 0:
                    first_partials.append(_np(P))
                if linearise:
                    need = max(r * _mp.sqrt(_mp.fsum(P[k, q] ** 2 for q in range(n))) - Pu0[k] for k in range(n))
                    Pf = _np(P)
                    safety = SAFETY * (float(r) * float(np.linalg.norm(Pf, 2)) + float(_mp.norm(Pu0)))
                    beta = max(need, _mp.mpf(0)) + safety
                else:
                    beta = _mp.mpf(0)
                b = one * beta - M[j] * (one * beta_prev)  # (n, 1)
                block_biases.append(b)
                levels.append(beta)
                level_sizes.append(_ball_level_size(_mp.norm(Pu0), r, np.linalg.norm(_np(P), 2), beta, n))
                beta_prev = beta
            b_last = c - M[-1] * (one * beta_prev)
            block_biases.append(b_last)
            W_tilde = _prod(M, n)
            realised.append(_np(W_tilde))
            # the block's affine map on its ball: u -> W̃ u + o, o by propagating the biases
            o = _mp.zeros(n, 1)
            for Mj, bj in zip(M, block_biases):
                o = Mj * o + bj
            weight_err = _fro(W_tilde - T) / _fro(T)
            bias_err = _mp.norm(o - c) / _mp.norm(c) if _mp.norm(c) > 0 else _mp.norm(o - c)
            block_errors.append(max(weight_err, bias_err))
            all_levels.append(tuple(levels))
            norm_Wt = float(np.linalg.norm(_np(W_tilde), 2)) * (1 + 1e-12)
            out_size = norm_Wt * float(r) + float(_mp.norm(W_tilde * u0 + c))
            bias_norms = [float(_mp.norm(b)) for b in block_biases]
            # each layer's rounding reaches the block output through the adapted layers after it
            Mf = [_np(Mj) for Mj in M]
            after = [float(np.linalg.norm(_float_product(Mf[j + 1 :], n), 2)) for j in range(m - 1)] + [1.0]
            norms = (
                float(np.linalg.norm(target.weights[i], 2)),
                float(np.linalg.norm(_float_product([frozen.weights[l] for l in block], n), 2)),
            )
            # as the float64 path counts it
            gamma += _block_gamma(added, bias_norms, level_sizes, after, *norms, in_size, out_size)
            weights.extend(M)
            biases.extend(block_biases)
            u0, r = _mp.zeros(n, 1), _mp.mpf(out_size)
    kappa = max(kappas.values(), default=1.0)
    fit = HighPrecisionFNNFit(
        weights_mp=tuple(weights),
        biases_mp=tuple(biases),
        frozen=frozen,
        target=target,
        ranks=ranks,
        partition=sizes,
        digits=digits,
        digits_reason=reason,
        kappa=kappa,
        gamma=gamma,
        exact=exact,
        block_errors=tuple(block_errors),
        levels=tuple(all_levels),
        center=center,
        radius=radius,
        condition_numbers=kappas,
        rank_sufficient=exact,
        tolerance=_working_tolerance(digits, kappa, gamma),
        radius_amplification=_radius_amplification(realised, target.biases, center, radius, float(r)),
    )
    # check the claim on the fit's own ball, at working precision
    domain = Domain(kind="ball", center=center, radius=radius, margin=None, n_samples=None)
    points = _check_points(domain, None, first_partials)  # (p, n)
    s_out = float(r)
    miss = fit.max_row_error(points)
    object.__setattr__(fit, "measured_error", miss / s_out if s_out > 0 else miss)
    return fit


# ------------------------------------------------------------------------------------------ transformer


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


def _fnn_forward_objects(weights, biases, X, relu):
    """An FNN on object arrays: ``weights[l]`` ``(D, D)``, ``biases[l]`` ``(D,)``, ``X`` ``(n, D)``; ``relu[l]``
    whether layer ``l`` is followed by a ReLU."""
    Z = X  # (n, D)
    for W, b, act in zip(weights, biases, relu):
        Z = Z @ W.T + b  # (n, D)
        if act:
            Z = np.where(Z > 0, Z, 0)
    return Z


def _tfn_forward_objects(p, X, exp):
    """The TFN of :class:`lora_theory.TFN` on object arrays: ``p`` its parameters, ``X`` ``(n, D, N)``."""
    L, H = p["wq"].shape[:2]
    Z = X  # (n, D, N)
    for l in range(L):
        A = np.zeros_like(Z)
        for h in range(H):
            K = p["wk"][l, h] @ Z  # (n, D, N)
            Q = p["wq"][l, h] @ Z  # (n, D, N)
            S = np.swapaxes(K, -1, -2) @ Q  # (n, N, N) scores, keys on axis -2
            S = exp(S - S.max(axis=-2, keepdims=True))
            S = S / S.sum(axis=-2, keepdims=True)  # columns sum to 1
            A = A + p["wo"][l, h] @ (p["wv"][l, h] @ Z) @ S  # (n, D, N)
        H1 = p["w1"][l] @ A + p["b1"][l][:, None]  # (n, D, N)
        H1 = np.where(H1 > 0, H1, 0)
        Z = p["w2"][l] @ H1 + p["b2"][l][:, None]  # (n, D, N)
    return p["w_out"] @ Z  # (n, D, N)


@dataclass(frozen=True, eq=False)
class HighPrecisionTFNFit(_LargestConditionNumber):
    """Theorem 7's adapters and biases computed at ``digits`` significant digits.

    Attributes
    ----------
    params_mp : dict
        The adapted network's parameters under :class:`lora_theory.TFN`'s names, as nested lists of mpmath
        matrices: ``params_mp["wq"][l][h]`` ``(D, D)`` (likewise ``wk``, ``wv``, ``wo``), ``w1[l]``,
        ``w2[l]`` ``(D, D)``, ``b1[l]``, ``b2[l]`` ``(D, 1)``, ``w_out`` ``(D, D)``.
    adapters_mp : dict
        ``(name, block, head) -> (A, B)`` mpmath matrices (``A`` ``(r, D)``, ``B`` ``(D, r)``), keyed as
        :attr:`lora_theory.tfn.TFNFit.adapters`; :attr:`adapters` rounds them to float64.
    rank, digits : int
    digits_reason : str
    matched_ranks : tuple of int
        ``G_l`` per block at working precision; ``required_rank = max_l ceil(G_l / 2)``.
    exact : bool
        ``rank >= required_rank`` (:attr:`rank_sufficient`) *and* the working precision kept it, as
        :attr:`lora_theory.TFNFit.exact`: :attr:`measured_error` at most :attr:`tolerance`, itself at most
        :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT`.
    condition_numbers : dict of str -> float
        As :attr:`lora_theory.tfn.TFNFit.condition_numbers`.
    rank_sufficient : bool
        ``rank >= required_rank``: the adapted network equals the target for every input in exact arithmetic.
    measured_error : float
        :meth:`relative_error` on the check inputs of :func:`lora_theory.lora_tfn` (``CHECK_INPUTS`` standard
        normal sequences of ``CHECK_TOKENS`` tokens, seed 0), both networks at working precision.
    tolerance : float
        ``c·u_d·κ``: :func:`lora_theory.numerics.tolerance`'s rule at ``digits`` digits.
    """

    params_mp: dict
    adapters_mp: dict
    frozen: object
    target: object
    rank: int
    digits: int
    digits_reason: str
    matched_ranks: tuple
    required_rank: int
    exact: bool
    condition_numbers: dict = field(default_factory=dict)
    rank_sufficient: bool = False
    measured_error: float = float("nan")
    tolerance: float = float("nan")

    __repr__ = _display.high_precision_repr

    @property
    def gamma(self) -> float:
        """0: the transformer construction adds no linearising biases (the ``γ`` of the FNN path)."""
        return 0.0

    @property
    def adapters(self) -> dict:
        """The adapters rounded to float64, keyed as :attr:`lora_theory.tfn.TFNFit.adapters`."""
        D = self.frozen.embed_dim
        return {
            k: Adapter(_np(A) if A.rows else np.zeros((0, D)), _np(B) if B.cols else np.zeros((D, 0)))
            for k, (A, B) in self.adapters_mp.items()
        }

    @property
    def num_parameters(self) -> int:
        """Number of adapter parameters used, ``Σ r (in + out)``."""
        return sum(a.num_parameters for a in self.adapters.values())

    @property
    def model(self) -> TFN:
        """The adapted network rounded to float64 (:class:`lora_theory.TFN`; a float64 forward pass
        through it loses digits again: evaluate with :meth:`predict`)."""

        p = self.params_mp
        return TFN(**{k: np.array(_nested_np(v, k in _TFN_VECTORS)) if k != "w_out" else _np(v) for k, v in p.items()})

    def _inputs(self, X):
        X = as_array(X, "X")
        D = self.frozen.embed_dim
        if X.ndim not in (2, 3) or X.shape[-2] != D:
            raise InvalidArgumentError("X", f"must have shape (D, N) or (n, D, N) with D = {D}, got {X.shape}")
        return X

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The adapted network on ``X`` (``(D, N)`` or ``(n, D, N)``), evaluated at working precision, rounded
        to float64, shaped like ``X``."""
        X = self._inputs(X)
        from_float, from_mpf, exp, ctx = _object_arrays(self.digits)
        with ctx:
            p = {
                k: from_mpf(np.array(_nested_objects(v, k in _TFN_VECTORS), dtype=object))
                for k, v in self.params_mp.items()
            }
            Y = _tfn_forward_objects(p, from_float(X if X.ndim == 3 else X[None]), exp)  # (n, D, N)
            Y = np.vectorize(float, otypes=[np.float64])(Y)
        return Y if X.ndim == 3 else Y[0]

    def relative_error(self, X: ArrayLike) -> float:
        """``||f(X) - f̄(X)||_F / ||f̄(X)||_F``, adapted network and target both at working precision."""
        X = self._inputs(X)
        X3 = X if X.ndim == 3 else X[None]
        from_float, from_mpf, exp, ctx = _object_arrays(self.digits)
        with ctx:
            p = {
                k: from_mpf(np.array(_nested_objects(v, k in _TFN_VECTORS), dtype=object))
                for k, v in self.params_mp.items()
            }
            t = {k: from_float(v) for k, v in self.target.parameters().items()}
            Xo = from_float(X3)
            f, fbar = _tfn_forward_objects(p, Xo, exp), _tfn_forward_objects(t, Xo, exp)
            num, den = np.sum((f - fbar) ** 2), np.sum(fbar**2)
            return float((num / den) ** 0.5) if den > 0 else float(num**0.5)


#: The parameters of :class:`lora_theory.TFN` that are vectors (stored as ``(D, 1)`` mpmath matrices): told
#: apart by name, since at width ``D = 1`` a ``(1, 1)`` weight has the shape of a bias.
_TFN_VECTORS = ("b1", "b2")


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


@numeric_guard
def lora_tfn_mp(frozen: TFN, target: TFN, rank: int, digits: int | None = None) -> HighPrecisionTFNFit:
    """Theorem 7's construction (Zeng & Lee 2024, Theorem 7 (transformers)) at raised precision.

    The steps of :func:`lora_theory.tfn.lora_tfn` (``C_l = T2_l W2_l^{-1}``, Lemma 1 on the score products
    ``(W_Q, W_K^T)``, the value products ``(W_V, W_O)`` and the output product ``(W2_L, W_out)``, ``b1 = c1``,
    ``b2_l = W2_l T2_l^{-1} c2_l``, ``b2_L = (W_out + Δ_out)^{-1} T_out c2_L``) in mpmath. The float64
    construction is as accurate as float64 weights can be (perturbing its adapted weights by one rounding
    unit moves the output as much as its error), but for two blocks that is a relative output error up to
    1e-10: the adapted second block reads the first block's output through ``C_1``, which amplifies the
    rounding of every first-block weight. At raised precision and evaluated there (:meth:`predict`) the
    adapted network equals the target to the working precision less ``log10 κ``.

    Parameters
    ----------
    frozen, target : TFN
        As :func:`lora_theory.lora_tfn`.
    rank : int in 0..D
    digits : int in 16..MAX_DIGITS (1000), or None
        ``None``: :func:`choose_digits` of the float64 construction's ``κ`` (and at least 30), raised when
        the ``κ`` found at that precision asks for more.

    Raises
    ------
    InvalidArgumentError, SingularMatrixError
        As :func:`lora_theory.lora_tfn` (a singular matrix at the working precision).

    Warns
    -----
    IllConditionedWarning
        ``digits`` given and ``u·κ > 1e-8`` at that precision (as :func:`lora_linear_mp`).
    """

    _check_pair(frozen, target)
    R = as_int(rank, "rank", 0, frozen.embed_dim)
    return _at_precision(
        lambda d, reason: _tfn_mp(frozen, target, R, d, reason),
        lambda: lora_tfn(frozen, target, R),
        _check_digits(digits),
        "high-precision transformer construction (Theorem 7)",
        least=MIN_TFN_DIGITS,
    )


#: The least precision :func:`lora_tfn_mp` chooses by itself.
MIN_TFN_DIGITS = 30


def _tfn_mp(frozen, target, R, digits, reason) -> HighPrecisionTFNFit:
    L, H, D = frozen.depth, frozen.heads, frozen.embed_dim
    kappas: dict = {}
    adapters: dict = {}
    G = [0] * L
    with _mp.workdps(digits):
        f, t = frozen.parameters(), target.parameters()
        out = {name: [[None] * H for _ in range(L)] for name in ("wq", "wk", "wv", "wo")}
        out.update(
            w1=[_mpm(f["w1"][l]) for l in range(L)],
            b1=[_mpm(t["b1"][l]) for l in range(L)],
            w2=[_mpm(f["w2"][l]) for l in range(L)],
            b2=[None] * L,
        )

        def param(params, name, l, h):
            value = params[name]
            return _mpm(value if name == "w_out" else value[l, h] if h is not None else value[l])

        def inverse(M, name, context):
            lu = _LU(M, name, context)
            return lu.kappa, lu.solve

        def right_inverse(M, name, context):
            lu = _LU(M.T, name, context)
            return lu.kappa, lambda X: lu.solve(X.T).T

        arith = _WalkArithmetic(
            frozen=lambda name, l, h: param(f, name, l, h),
            target=lambda name, l, h: param(t, name, l, h),
            mul=lambda A, B: A * B,
            T=lambda A: A.T,
            eye=_eye(D),
            inverse=inverse,
            right_inverse=right_inverse,
        )
        for step in _walk(arith, L, H, kappas):
            if isinstance(step, _Carried):
                out["b2"][step.block] = step.b2  # (D, 1) W2 T2^-1 c2
                continue
            l, h = step.block, step.head
            (a1, a2), (m1, m2), _, rank_E, chain_kappas = _chain_mp(
                list(step.factors), step.matched, (R, R), list(step.names), None, step.kappa_solved
            )
            G[l] = max(G[l], rank_E)
            label = f"{step.kind}[{l},{h}]" if h is not None else step.kind
            kappas.update({f"{label} {k}": v for k, v in chain_kappas.items()})
            if step.kind == "qk":
                out["wq"][l][h], out["wk"][l][h] = m1, m2.T
                # W_K^T + B2 A2 = (W_K + A2^T B2^T)^T: the adapter of W_K is (A = B2^T, B = A2^T)
                adapters[("wq", l, h)], adapters[("wk", l, h)] = a1, (a2[1].T, a2[0].T)
            elif step.kind == "ov":
                out["wv"][l][h], out["wo"][l][h] = m1, m2
                adapters[("wv", l, h)], adapters[("wo", l, h)] = a1, a2
            else:
                out["w2"][L - 1], w_out = m1, m2
                adapters[("w2", L - 1, None)], adapters[("w_out", L - 1, None)] = a1, a2
        T_out = _mpm(t["w_out"])
        lu_out = _LU(w_out, "W_out + Δ_out", "the last block's bias b2 = (W_out + Δ_out)^-1 T_out c2")
        kappas["W_out + Δ_out"] = lu_out.kappa
        out["b2"][L - 1] = lu_out.solve(T_out * _mpm(t["b2"][L - 1]))
        out["w_out"] = w_out

    required = max((g + 1) // 2 for g in G)
    fit = HighPrecisionTFNFit(
        params_mp=out,
        adapters_mp=adapters,
        frozen=frozen,
        target=target,
        rank=R,
        digits=digits,
        digits_reason=reason,
        matched_ranks=tuple(G),
        required_rank=required,
        exact=R >= required,
        condition_numbers=kappas,
        rank_sufficient=R >= required,
        tolerance=_working_tolerance(digits, max(kappas.values(), default=1.0), 0.0),
    )
    # check the claim on the inputs the float64 construction checks, at working precision
    X = np.random.default_rng(0).standard_normal((CHECK_INPUTS, D, CHECK_TOKENS))  # (n, D, N)
    object.__setattr__(fit, "measured_error", fit.relative_error(X))
    return fit
