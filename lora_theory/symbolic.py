"""Exact certificates and symbolic rank thresholds (THEORY.md §3).

Floating-point checks say "equal to 1e-12"; a theorem says "equal". For an instance with rational entries
(floats are converted *exactly*, as the binary fractions they are) this module runs the constructions of
Zeng & Lee (2024) in exact rational arithmetic and proves, with no tolerance, that the adapted model equals
the target:

* :func:`certify_linear` — Lemma 1 (linear models): ``Π(W_l + Δ_l) == T`` and ``rank(Δ_l) <= R_l``;
* :func:`certify_fnn` — Theorem 3 (uniform partition) / Theorem 6 (general partition): every block's affine
  map equals its target layer's, and every linearising bias keeps its ReLUs active on a stated ball,
  checked with squared comparisons (no square root is ever taken);
* :func:`certify_tfn` — Theorem 7 (transformers): every matched product equals its target, the biases too.

The construction needs only *some* rank decomposition ``E = C F`` of the discrepancy, in place of the SVD
(which is irrational): layer ``l`` receives the next ``R_l`` columns ``C_l`` of ``C`` and rows ``F_l`` of
``F``, and with ``Q_l = W_L ... W_{l+1}`` and ``P_l = (W_{l-1} + Δ_{l-1}) ... (W_1 + Δ_1)``::

    Δ_l = Q_l^{-1} C_l F_l P_l^{-1},    B_l = Q_l^{-1} C_l,    A_l = F_l P_l^{-1}     (exact solves)

By induction ``Q_l P_{l+1} = Π W + Σ_{k<=l} C_k F_k``: the matrices that must be invertible are ``Q_l`` and
``P_l`` (equivalently ``Π W + Σ_{k<l} C_k F_k`` once ``Q_{l-1}`` is), not the ``Π W + LR_r(E)`` of the SVD
construction. All exact linear algebra runs on sympy's ``DomainMatrix`` over ``QQ`` (fraction-free
where it matters), which is orders of magnitude faster than ``Matrix`` on rationals.

A :class:`Certificate` ends in one of three outcomes:

* ``"exact"`` — every exact check holds: the adapted model equals the target (on the ball, for FNNs);
* ``"sufficient condition not met"`` — a matrix the construction must invert is singular (named, and kept
  in :attr:`Certificate.singular_matrix`), or a matched rank exceeds the budget; this proves nothing about
  other constructions;
* ``"impossible at this rank"`` — linear models only, where rank counting proves it:
  ``rank(Π(W + Δ) - Π W) <= Σ R_l < rank(E)``. FNN and TFN certificates never claim impossibility (the paper
  proves none below their thresholds).

A singular matrix never raises out of a certificate: it becomes the outcome. Bad *arguments* (shapes,
non-rational entries, ranks out of range) raise :class:`~lora_theory.errors.InvalidArgumentError`.

Symbolic thresholds: :func:`linear_rank_threshold_expr`, :func:`fnn_rank_threshold_expr`,
:func:`tfn_rank_threshold_expr` are sympy expressions in the symbols :data:`D`, :data:`L`, :data:`Lbar`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy
from sympy import QQ
from sympy.polys.matrices import DomainMatrix

from . import _display
from ._types import Partition, Rank, Seed
from ._validate import as_bool, as_int, as_ranks, rng_from
from .errors import InvalidArgumentError
from .fnn import SAFETY
from .linear import _ChainArithmetic, _search_note, _split_chain
from .models import FNN, MAX_RANDOM_WIDTH, TFN
from .partition import MAX_DEPTH, check_partition, partition_blocks, uniform_partition
from .tfn import _Carried, _walk, _WalkArithmetic
from .thresholds import ceil_div

__all__ = [
    "D",
    "L",
    "Lbar",
    "linear_rank_threshold_expr",
    "fnn_rank_threshold_expr",
    "tfn_rank_threshold_expr",
    "EXACT",
    "NOT_MET",
    "IMPOSSIBLE",
    "Check",
    "Certificate",
    "RationalFNN",
    "RationalTFN",
    "rational_matrix",
    "certify_linear",
    "certify_fnn",
    "certify_tfn",
    "random_rational_linear",
    "random_rational_fnn",
    "random_rational_tfn",
]

# ------------------------------------------------------------------------------------ symbolic thresholds

#: Width ``D``, frozen depth ``L`` and target depth ``L̄`` as positive-integer sympy symbols.
D, L, Lbar = sympy.symbols("D L Lbar", integer=True, positive=True)


def linear_rank_threshold_expr() -> sympy.Expr:
    """``ceiling(D / L)``: Zeng & Lee 2024, Lemma 1 (linear models) with generic weights."""
    return sympy.ceiling(D / L)


def fnn_rank_threshold_expr() -> sympy.Expr:
    """``ceiling(D / floor(L / Lbar))``: Zeng & Lee 2024, Theorem 3 (ReLU FNN, uniform partition)."""
    return sympy.ceiling(D / sympy.floor(L / Lbar))


def tfn_rank_threshold_expr() -> sympy.Expr:
    """``ceiling(D / 2)``: Zeng & Lee 2024, Theorem 7 (transformer networks; any ``L``, any ``H``)."""
    return sympy.ceiling(D / 2)


# ------------------------------------------------------------------------------------------- outcomes

EXACT = "exact"
NOT_MET = "sufficient condition not met"
IMPOSSIBLE = "impossible at this rank"


@dataclass(frozen=True)
class Check:
    """One exact check of a certificate: what was checked, whether it holds, and the exact values."""

    name: str
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        mark = "pass" if self.passed else "FAIL"
        return f"[{mark}] {self.name}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True, eq=False)
class Certificate:
    """An exact (tolerance-free) certificate for one instance and one LoRA-rank.

    Attributes
    ----------
    model : {"linear", "fnn", "tfn"}
    sizes : dict
        ``{"D": width, "L": depth}``, plus ``"Lbar"`` and ``"partition"`` (FNN), ``"H"`` (TFN).
    rank : int or tuple of int
        ``R``, or the per-layer ranks ``R_l``.
    checks : tuple of Check
        Every exact check in the order made (invertibility, matched ranks, equalities, ReLU activity).
    outcome : str
        :data:`EXACT`, :data:`NOT_MET` or :data:`IMPOSSIBLE` (linear only).
    reason : str
        Why: the theorem for ``"exact"``; the singular matrix or the rank over budget otherwise.
    required_rank : int or None
        The instance's threshold (``ceil(rank E / L)``, ``max_i ceil(rank(E_i) / |P_i|)``,
        ``max_l ceil(G_l / 2)``) when the certificate got far enough to know it.
    singular_matrix : sympy.ImmutableMatrix or None
        The matrix named in ``reason`` when a singular matrix stopped the construction.
    adapters : dict
        The exact adapters ``name -> (A, B)`` (sympy matrices, ``Δ = B A``), as far as constructed.
    adapted : object or None
        The exact adapted model when the construction completed: a tuple of matrices ``W_l + Δ_l``
        (linear), a :class:`RationalFNN` or a :class:`RationalTFN`.
    domain : dict or None
        FNN only: ``{"center": ..., "radius_squared": ...}`` of the input ball, and the ball of every block.
    frozen, target : object
        The instance certified, exact, as the checks saw it: a tuple of sympy matrices ``W_1 .. W_L`` and a
        sympy matrix ``T`` (linear), two :class:`RationalFNN` (FNN) or two :class:`RationalTFN` (TFN).
        Floats given as input appear as the rationals they equal exactly. A certificate read without them
        would not say which instance it is about.
    """

    model: str
    sizes: dict
    rank: object
    checks: tuple
    outcome: str
    reason: str
    required_rank: int | None = None
    singular_matrix: object = None
    adapters: dict = field(default_factory=dict)
    adapted: object = None
    domain: dict | None = None
    frozen: object = None
    target: object = None

    __repr__ = _display.certificate_repr
    _repr_markdown_ = _display.certificate_markdown

    @property
    def passed(self) -> bool:
        """``True`` iff the outcome is ``"exact"`` (then every check passed)."""
        return self.outcome == EXACT

    @property
    def failed_checks(self) -> tuple:
        """The checks that do not hold (empty for an ``"exact"`` certificate)."""
        return tuple(c for c in self.checks if not c.passed)

    def __str__(self) -> str:
        sizes = ", ".join(f"{k} = {v}" for k, v in self.sizes.items())
        lines = [f"Exact certificate ({self.model}: {sizes}; LoRA-rank R = {self.rank})"]
        if self.required_rank is not None:
            lines.append(f"  instance threshold: R >= {self.required_rank}")
        if self.domain is not None:
            lines.append(
                f"  input ball: ||x - x0||^2 <= {_short(self.domain['radius_squared'])}, "
                f"x0 = {_short_vec(self.domain['center'])}"
            )
        lines.extend("  " + str(c) for c in self.checks)
        lines.append(f"Outcome: {self.outcome} — {self.reason}")
        return "\n".join(lines)


class _Stop(Exception):
    """Internal: the construction cannot go on; carries the outcome (never escapes a certificate)."""

    def __init__(self, outcome, reason, singular=None):
        super().__init__(reason)
        self.outcome, self.reason, self.singular = outcome, reason, singular


class _Recorder:
    def __init__(self, frozen, target):
        self.checks: list[Check] = []
        self.adapters: dict = {}
        self.frozen, self.target = frozen, target  # the instance, exact

    def check(self, name, passed, detail=""):
        self.checks.append(Check(name, bool(passed), detail))
        return bool(passed)

    def invertible(self, M: DomainMatrix, name: str, why: str = "", equivalent: str = ""):
        """Record ``det(M) != 0``; stop with NOT_MET naming ``name`` when it is singular."""
        det = M.det()
        ok = det != 0
        self.check(f"{name} invertible", ok, f"det = {_short(det)}" + (f" ({why})" if why else ""))
        if not ok:
            also = f"; equivalently {equivalent} is singular" if equivalent else ""
            raise _Stop(NOT_MET, f"{name} is singular{also}" + (f" ({why})" if why else ""), M)

    def equal(self, name, X: DomainMatrix, Y: DomainMatrix):
        X, Y = X.to_dense(), Y.to_dense()  # == also compares the storage format
        ok = X.shape == Y.shape and X.to_list() == Y.to_list()
        detail = "holds exactly" if ok else f"differs in {_count_nonzero(X - Y)} entries"
        self.check(name, ok, detail)
        return ok


# ---------------------------------------------------------------------------------- exact conversions


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


def _short(q) -> str:
    """A rational for a report: in full when short, else its float value and its size."""
    if isinstance(q, sympy.Rational):
        num, den = int(q.p), int(q.q)
    elif hasattr(q, "numerator") and hasattr(q, "denominator"):
        num, den = int(q.numerator), int(q.denominator)
    else:
        return str(q)
    # sizes from bit lengths: str() of an integer beyond 4300 digits raises, float() beyond 1e308 overflows
    digits = math.ceil((abs(num).bit_length() + den.bit_length()) * math.log10(2)) + 1
    if digits <= 24:
        text = str(q)
        if len(text) <= 24:
            return text
    try:
        value = f"{float(Fraction(num, den)):.6g}"
    except OverflowError:
        exponent = (abs(num).bit_length() - den.bit_length()) * math.log10(2)
        value = f"{'-' if num < 0 else ''}1e{exponent:.0f}"
    return f"≈ {value} (about {digits} digits exact)"


def _short_vec(v) -> str:
    vals = [v[i, 0] for i in range(v.shape[0])] if hasattr(v, "shape") else list(v)
    if all(x == 0 for x in vals):
        return "0"
    return (
        "(" + ", ".join(_short(QQ.convert(sympy.Rational(x)) if isinstance(x, sympy.Basic) else x) for x in vals) + ")"
    )


def _count_nonzero(M: DomainMatrix) -> int:
    return sum(1 for row in M.to_list() for v in row if v != 0)


def _rank_decomposition(E: DomainMatrix):
    """``E = C F`` with ``C`` the pivot columns of ``E`` (``D x r``) and ``F`` the non-zero rows of its RREF."""
    R, pivots = E.rref()
    r = len(pivots)
    n = E.shape[0]
    C = E.extract(list(range(n)), list(pivots)) if r else _zeros(n, 0)
    F = R.extract(list(range(r)), list(range(E.shape[1]))) if r else _zeros(0, E.shape[1])
    return C.to_dense(), F.to_dense(), r


# ------------------------------------------------------------------------------ the exact Lemma 1 chain


def _exact_chain(rec: _Recorder, factors, target, ranks, names, label, budget_outcome, budget_reason):
    """Lemma 1 on ``factors = [M_1, ..., M_m]`` toward ``target``, exactly, with a rank decomposition
    (:func:`lora_theory.linear._split_chain` in rational arithmetic, with the exact path's own checks).

    Records the checks in ``rec`` and returns ``(adapters, adapted, rank_E)``; ``adapters[l] = (A, B)``
    DomainMatrices (``Δ = B A``), ``adapted[l] = M_l + Δ_l``. Raises :class:`_Stop` with
    ``budget_outcome`` when ``Σ R_l < rank(E)`` and with NOT_MET on a singular ``Q_l`` / ``P_l``.

    The blocks ``C_b F_b`` of the rank decomposition go to the layers in the fixed order (layer ``l`` takes
    block ``l``) when that order meets no singular matrix, else in the first assignment of blocks to
    layers that :func:`lora_theory.linear._search_assignment` finds (the float64 chain's search); NOT_MET
    only when none works, with the checks of the fixed order, which name its singular matrix. The checks
    recorded are those of the assignment used.
    """
    m = len(factors)
    n = target.shape[0]
    frozen_product = _prod(factors, n)
    E = target - frozen_product  # (n, n)
    rank_E = E.rank()
    k = sum(ranks)
    ok = rec.check(f"{label}rank(E) <= Σ R_l", rank_E <= k, f"rank(E) = {rank_E} (exact), Σ R_l = {k}")
    if not ok:
        raise _Stop(budget_outcome, budget_reason(rank_E, k))
    C, F, _ = _rank_decomposition(E)  # (n, r), (r, n)
    rows = list(range(n))

    def checked(solve):
        """Run ``solve(local)`` with a recorder of its own; its checks are the notes, also on a stop."""
        local = _Recorder(None, None)
        try:
            return solve(local), tuple(local.checks)
        except _Stop as stop_:
            stop_.notes = tuple(local.checks)
            raise

    def solve_q(l, start, stop, Q, C_l):
        def solve(local):
            q_name = f"{label}Q_{l + 1} = " + " ".join(reversed(names[l + 1 :]))
            local.invertible(Q, q_name, f"it receives directions {start + 1}..{stop} of E = C F")
            return Q.lu_solve(C_l)  # (n, k_l) = Q^{-1} C_l

        return checked(solve)

    def solve_p(l, start, stop, P, F_l, given):
        def solve(local):
            p_name = f"{label}P_{l + 1} = " + " ".join(
                f"({x} + Δ_{j + 1})" for j, x in reversed(list(enumerate(names[:l])))
            )
            Q_prev = _prod(factors[l:], n)  # Q_{l-1} (1-based: frozen after l-1)
            sums = " + ".join(f"C_{b + 1} F_{b + 1}" for _, b, _ in given)
            equivalent = (f"Π W + {sums}" if sums else "Π W") if Q_prev.det() != 0 else ""
            local.invertible(P, p_name, f"layer {l + 1} receives directions {start + 1}..{stop}", equivalent)
            return P.transpose().lu_solve(F_l.transpose()).transpose()  # (k_l, n) = F_l P^{-1}

        return checked(solve)

    def adapt(l, M, A, B):
        delta = B * A  # (n, n)
        r_delta = delta.rank()
        rank_check = Check(
            f"{label}rank(Δ_{l + 1}) <= R_{l + 1}",
            bool(r_delta <= ranks[l]),
            f"rank = {r_delta} (exact), R_{l + 1} = {ranks[l]}",
        )
        return M + delta, (A, B), (rank_check,)

    def no_assignment(first, cut):
        rec.checks.extend(first.notes)
        note = _search_note(m, cut, "directions of E = C F")
        return _Stop(first.outcome, first.reason + (f"; {note}" if note else ""), first.singular)

    arith = _ChainArithmetic(
        directions=lambda start, stop: (
            C.extract(rows, list(range(start, stop))),  # (n, k_l)
            F.extract(list(range(start, stop)), rows),  # (k_l, n)
        ),
        frozen_after=lambda l: _prod(factors[l + 1 :], n),  # (n, n) frozen factors after l
        product=lambda adapted: _prod(adapted, n),  # (n, n) adapted factors before l
        solve_q=solve_q,
        solve_p=solve_p,
        adapt=adapt,
        singular=_Stop,
        no_assignment=no_assignment,
    )
    _, adapted, checks, placed = _split_chain(arith, factors, ranks, rank_E)
    rec.checks.extend(checks)
    adapters = [placed.get(l, (_zeros(0, n), _zeros(n, 0))) for l in range(m)]
    rec.equal(f"{label}Π(W_l + Δ_l) == target", _prod(adapted, n), target)
    return adapters, list(adapted), rank_E


def _finish(rec, model, sizes, rank, required, adapted=None, domain=None, stop=None, theorem=""):
    if stop is not None:
        singular = _sym(stop.singular) if stop.singular is not None else None
        return Certificate(
            model,
            sizes,
            rank,
            tuple(rec.checks),
            stop.outcome,
            stop.reason,
            required,
            singular,
            dict(rec.adapters),
            None,
            domain,
            rec.frozen,
            rec.target,
        )
    failed = [c for c in rec.checks if not c.passed]
    if failed:  # a completed construction whose exact check fails would be an error in this module
        return Certificate(
            model,
            sizes,
            rank,
            tuple(rec.checks),
            NOT_MET,
            f"the construction completed but the exact check '{failed[0].name}' failed "
            "(an error in the construction; please report it)",
            required,
            None,
            dict(rec.adapters),
            None,
            domain,
            rec.frozen,
            rec.target,
        )
    return Certificate(
        model,
        sizes,
        rank,
        tuple(rec.checks),
        EXACT,
        theorem,
        required,
        None,
        dict(rec.adapters),
        adapted,
        domain,
        rec.frozen,
        rec.target,
    )


def _store(rec, key, A, B):
    rec.adapters[key] = (_sym(A), _sym(B))


# ------------------------------------------------------------------------------------------- linear


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


def certify_linear(frozen: Sequence | FNN, target: object, rank: Rank) -> Certificate:
    """Exact certificate for Zeng & Lee 2024, Lemma 1 (linear models).

    Parameters
    ----------
    frozen : sequence of L rational matrices (D, D), or a linear :class:`~lora_theory.FNN`
        ``W_1 .. W_L`` (``W_1`` applied first). Entries: ints, floats (converted exactly), Fractions or
        sympy Rationals.
    target : rational matrix (D, D)
        ``T``.
    rank : int in 0..D, or sequence of L such ints
        ``R`` (every layer) or the per-layer ``R_l``.

    Returns
    -------
    Certificate
        ``"exact"`` when ``Π(W_l + Δ_l) == T`` and ``rank(Δ_l) <= R_l`` hold exactly; ``"impossible at this
        rank"`` when ``Σ R_l < rank(E)`` (no adapters of these ranks exist: the telescoping rank bound);
        ``"sufficient condition not met"`` naming ``Q_l`` or ``P_l`` when one of them is singular.

    Raises
    ------
    InvalidArgumentError
        Non-square or mismatched shapes, non-rational entries, a bad ``rank``.
    """
    W = _square_list(frozen, "frozen")
    n = W[0].shape[0]
    T = _dm(target, "target", (n, n))
    ranks = as_ranks(rank, len(W), n)
    rank_out = rank if isinstance(rank, numbers.Integral) else ranks
    sizes = {"D": n, "L": len(W)}
    rec = _Recorder(tuple(_sym(M) for M in W), _sym(T))
    names = [f"W_{l + 1}" for l in range(len(W))]
    required = ceil_div((T - _prod(W, n)).rank(), len(W))

    def impossible(rank_E, k):
        return (
            f"rank(E) = {rank_E} exceeds Σ R_l = {k}: rank(Π(W_l + Δ_l) - Π W_l) <= Σ R_l for any "
            f"adapters (telescoping), so no adapters of these ranks give T (Zeng & Lee 2024, Lemma 1)"
        )

    try:
        adapters, adapted, _ = _exact_chain(rec, W, T, ranks, names, "", IMPOSSIBLE, impossible)
    except _Stop as stop:
        return _finish(rec, "linear", sizes, rank_out, required, stop=stop)
    for l, (A, B) in enumerate(adapters):
        _store(rec, f"W_{l + 1}", A, B)
    return _finish(
        rec,
        "linear",
        sizes,
        rank_out,
        required,
        adapted=tuple(_sym(M) for M in adapted),
        theorem="Π(W_l + Δ_l) = T exactly with rank(Δ_l) <= R_l (Zeng & Lee 2024, Lemma 1)",
    )


# ---------------------------------------------------------------------------------------------- FNN


@dataclass(frozen=True, eq=False)
class RationalFNN:
    """A feed-forward network with exact rational weights (the exact twin of :class:`~lora_theory.FNN`).

    Attributes
    ----------
    weights : tuple of sympy.ImmutableMatrix (D, D)
        ``W_1 .. W_L`` (``T_i`` for a target).
    biases : tuple of sympy.ImmutableMatrix (D, 1)
        ``b_1 .. b_L`` (``c_i``).
    activation : {"relu", "linear"}
    final_relu : bool
    """

    weights: tuple
    biases: tuple
    activation: str = "relu"
    final_relu: bool = True

    def __post_init__(self):
        W = _square_list(self.weights, "weights")
        n = W[0].shape[0]
        if (
            isinstance(self.biases, (str, bytes))
            or not isinstance(self.biases, (Sequence, np.ndarray))
            or len(self.biases) != len(W)
        ):
            raise InvalidArgumentError("biases", f"must give one bias vector per layer ({len(W)})")
        b = [_vec(v, f"biases[{i}]", n) for i, v in enumerate(self.biases)]
        if not isinstance(self.activation, str) or self.activation not in ("relu", "linear"):
            raise InvalidArgumentError("activation", f"must be 'relu' or 'linear', got {self.activation!r}")
        object.__setattr__(self, "weights", tuple(_sym(M) for M in W))
        object.__setattr__(self, "biases", tuple(_sym(v) for v in b))
        object.__setattr__(self, "final_relu", as_bool(self.final_relu, "final_relu"))

    @property
    def width(self) -> int:
        """``D``."""
        return int(self.weights[0].shape[0])

    @property
    def depth(self) -> int:
        """``L`` (``L̄`` for a target)."""
        return len(self.weights)

    @classmethod
    def from_fnn(cls, model: FNN) -> RationalFNN:
        """The exact rational values of a float64 :class:`~lora_theory.FNN`."""
        return cls(model.weights, model.biases, model.activation, model.final_relu)

    def to_float(self) -> FNN:
        """The nearest float64 :class:`~lora_theory.FNN`."""
        return FNN(
            [np.array(W.tolist(), dtype=float) for W in self.weights],
            [np.array(b.tolist(), dtype=float).reshape(-1) for b in self.biases],
            activation=self.activation,
            final_relu=self.final_relu,
        )


def _as_rational_fnn(model, name) -> RationalFNN:
    if isinstance(model, RationalFNN):
        return model
    if isinstance(model, FNN):
        return RationalFNN.from_fnn(model)
    raise InvalidArgumentError(name, f"must be a lora_theory.FNN or a RationalFNN, got {type(model).__name__}")


def _fraction_upper(x: float) -> Fraction:
    """A short rational ``>= x`` (``x`` a finite float): rounded up on a grid of 2^-20 relative spacing."""
    if x <= 0:
        return Fraction(0)
    e = math.frexp(x)[1] - 20
    step = Fraction(2) ** e
    return Fraction(math.ceil(Fraction(x) / step)) * step


def _positive_definite(S: DomainMatrix) -> bool:
    """Exact test of positive definiteness of a symmetric rational matrix (all LDL^T pivots > 0)."""
    a = [row[:] for row in S.to_list()]
    n = len(a)
    for k in range(n):
        if a[k][k] <= 0:
            return False
        for i in range(k + 1, n):
            f = a[i][k] / a[k][k]
            if f:
                for j in range(k + 1, n):
                    a[i][j] -= f * a[k][j]
    return True


def _spectral_sq_upper(M: DomainMatrix):
    """A rational ``ρ >= ||M||_2^2``, certified: ``ρ I - M^T M`` positive definite (else ``||M||_F^2``)."""
    G = M.transpose() * M  # (n, n) symmetric
    n = G.shape[0]
    frob = sum((G.to_list()[i][i] for i in range(n)), QQ(0))
    Mf = np.array([[float(v) for v in row] for row in M.to_list()])
    s = float(np.linalg.norm(Mf, 2)) ** 2
    for slack in (1e-9, 1e-6, 1e-3):
        f = _fraction_upper(s * (1 + slack) + 1e-300)
        rho = QQ(f.numerator, f.denominator)
        if rho < frob and _positive_definite(_eye(n).scalarmul(rho) - G):
            return rho
    return frob


def _relu_vec(v: DomainMatrix) -> DomainMatrix:
    return DomainMatrix([[x if x > 0 else QQ(0)] for x in (row[0] for row in v.to_list())], v.shape, QQ)


def _ones(n):
    return DomainMatrix([[QQ(1)] for _ in range(n)], (n, 1), QQ)


def certify_fnn(
    frozen: FNN | RationalFNN,
    target: FNN | RationalFNN,
    rank: Rank,
    *,
    partition: Partition = None,
    input_radius: object,
    center: Sequence | None = None,
) -> Certificate:
    """Exact certificate for Zeng & Lee 2024, Theorem 3 (uniform partition) / Theorem 6 (general partition).

    Runs the construction of :func:`lora_theory.fnn.lora_fnn` in exact arithmetic, block by block: Lemma 1
    with a rank decomposition toward ``T_i``; compensating linearising biases ``b_j = β_j·1 - M_j β_{j-1}·1``
    (rational ``β_j``: the float level of ``lora_fnn``, safety term included, rounded up to a short
    rational, and raised if the exact check disagrees); the calibrating bias ``b_m = c_i - M_m β_{m-1}·1``.

    Checks, exactly: every block's affine map ``u -> P_m u + o_m`` equals ``u -> T_i u + c_i``; every inner
    pre-activation ``P_j u + β_j·1`` is positive on the block's input ball ``||u - u_0||^2 <= r^2``, i.e. for
    every row ``k``: ``β_j + (P_j u_0)_k > 0`` and ``(β_j + (P_j u_0)_k)^2 > r^2 ||row_k(P_j)||^2``.

    The next block's ball: centre ``ReLU(T_i u_0 + c_i)`` (the target's own activation; no ReLU after an
    affine output layer), squared radius ``ρ_i r^2`` with ``ρ_i >= ||T_i||_2^2`` a certified rational bound
    (``ρ I - T^T T`` positive definite) — valid because ReLU is 1-Lipschitz, and needing no square root
    (``lora_fnn`` uses the looser centre 0, radius ``||W̃_i|| r + ||W̃_i u_0 + c_i||``).

    Parameters
    ----------
    frozen, target : FNN or RationalFNN
        ``f0`` (depth ``L``, weights ``W_l``) and ``f̄`` (depth ``L̄ <= L``, ``T_i``, ``c_i``); same width,
        activation and ``final_relu``.
    rank : int in 0..D, or sequence of L such ints
        ``R`` or per-layer ``R_l``.
    partition : sequence of L̄ positive ints summing to L, optional
        Block sizes; default the uniform partition.
    input_radius : positive rational (int, float, Fraction, sympy Rational)
        Radius ``r`` of the certified input ball.
    center : rational vector (D,), optional
        Its centre ``x_0`` (default 0).

    Returns
    -------
    Certificate
        ``"exact"``: ``f(x) = f̄(x)`` for every ``||x - x_0|| <= r``. Otherwise ``"sufficient condition not
        met"`` (a block's ``rank(E_i)`` over its budget, or a singular ``Q_j`` / ``P_j``), never
        ``"impossible"``.

    Raises
    ------
    InvalidArgumentError
        Bad models, ranks, partition, radius or centre.
    """
    f0 = _as_rational_fnn(frozen, "frozen")
    fbar = _as_rational_fnn(target, "target")
    n, L_, Lbar_ = f0.width, f0.depth, fbar.depth
    if fbar.width != n:
        raise InvalidArgumentError("target", f"must have the frozen model's width D = {n}, got {fbar.width}")
    if Lbar_ > L_:
        raise InvalidArgumentError("target", f"the target depth L̄ = {Lbar_} exceeds the frozen depth L = {L_}")
    if fbar.activation != f0.activation or fbar.final_relu != f0.final_relu:
        raise InvalidArgumentError(
            "target",
            f"must use the frozen model's activation and final_relu ({f0.activation!r}, "
            f"final_relu={f0.final_relu}), got ({fbar.activation!r}, final_relu={fbar.final_relu})",
        )
    ranks = as_ranks(rank, L_, n)
    rank_out = rank if isinstance(rank, numbers.Integral) else ranks
    sizes_part = uniform_partition(L_, Lbar_) if partition is None else check_partition(partition, L_, Lbar_)
    if isinstance(input_radius, (str, bytes)) or input_radius is None:
        raise InvalidArgumentError("input_radius", f"must be a positive rational number, got {input_radius!r}")
    r = _q(input_radius, "input_radius")
    if not r > 0:
        raise InvalidArgumentError("input_radius", f"must be positive, got {input_radius!r}")
    u0 = _zeros(n, 1) if center is None else _vec(center, "center", n)
    r2 = r * r
    linearise = f0.activation == "relu"
    Wf = [_dm(W, "frozen") for W in f0.weights]
    Tt = [_dm(T, "target") for T in fbar.weights]
    cs = [_dm(c, "target") for c in fbar.biases]
    blocks = partition_blocks(sizes_part)
    sizes = {"D": n, "L": L_, "Lbar": Lbar_, "partition": sizes_part}
    block_ranks = [(Tt[i] - _prod(Wf[b.start : b.stop], n)).rank() for i, b in enumerate(blocks)]
    required = max(ceil_div(rk, len(b)) for rk, b in zip(block_ranks, blocks))
    rec = _Recorder(f0, fbar)
    domain = {
        "center": _sym(u0),
        "radius_squared": sympy.Rational(int(r2.numerator), int(r2.denominator)),
        "blocks": [],
    }
    weights, biases = [], []
    try:
        for i, block in enumerate(blocks):
            label = f"block {i + 1}: "
            domain["blocks"].append((_sym(u0), sympy.Rational(int(r2.numerator), int(r2.denominator))))
            layer_names = [f"W_{l + 1}" for l in block]

            def not_met(rank_E, k, i=i, block=block):
                return (
                    f"matched rank rank(E_{i + 1}) = {rank_E} exceeds the budget Σ R_l = {k} of block "
                    f"{i + 1} (layers {block.start + 1}..{block.stop}); Theorem 3 needs no more, but this "
                    "does not prove impossibility"
                )

            adapters, M, _ = _exact_chain(
                rec,
                Wf[block.start : block.stop],
                Tt[i],
                ranks[block.start : block.stop],
                layer_names,
                label,
                NOT_MET,
                not_met,
            )
            for l, (A, B) in zip(block, adapters):
                _store(rec, f"W_{l + 1}", A, B)
            m = len(M)
            one = _ones(n)
            beta_prev = QQ(0)
            P = _eye(n)
            offset = _zeros(n, 1)  # o_j: pre-activation = P_j u + o_j
            block_biases = []
            for j in range(m - 1):
                P = M[j] * P  # (n, n) P_j
                Pu0 = P * u0  # (n, 1)
                row_sq = [sum((x * x for x in row), QQ(0)) for row in P.to_list()]
                pu = [row[0] for row in Pu0.to_list()]
                beta = QQ(0)
                if linearise:
                    beta = _choose_level(P, pu, row_sq, r2)
                b = one.scalarmul(beta) - M[j] * one.scalarmul(beta_prev)
                block_biases.append(b)
                offset = M[j] * offset + b
                rec.equal(
                    f"{label}layer {block.start + j + 1} pre-activation offset == β_{j + 1}·1",
                    offset,
                    one.scalarmul(beta),
                )
                if linearise:
                    active = all(beta + p > 0 and (beta + p) ** 2 > r2 * s for p, s in zip(pu, row_sq))
                    rec.check(
                        f"{label}layer {block.start + j + 1} ReLUs active on the ball",
                        active,
                        f"β_{j + 1} = {_short(beta)}, r^2 = {_short(r2)}; "
                        "(β + (P_j u0)_k)^2 > r^2 ||row_k(P_j)||^2 and β + (P_j u0)_k > 0 for all k",
                    )
                    if not active:  # cannot happen: _choose_level verifies it; kept as a guard
                        raise _Stop(NOT_MET, f"{label}no linearising level found for layer {block.start + j + 1}")
                beta_prev = beta
            b_last = cs[i] - M[-1] * one.scalarmul(beta_prev)
            block_biases.append(b_last)
            offset = M[-1] * offset + b_last
            rec.equal(f"{label}affine map: weight == T_{i + 1}", _prod(M, n), Tt[i])
            rec.equal(f"{label}affine map: offset == c_{i + 1}", offset, cs[i])
            weights.extend(M)
            biases.extend(block_biases)
            # the next block's input ball: the target's activations z̄_i over the current ball
            y0 = Tt[i] * u0 + cs[i]
            last = block.stop == L_
            u0 = y0 if (not linearise or (last and not f0.final_relu)) else _relu_vec(y0)
            r2 = r2 * _spectral_sq_upper(Tt[i])
    except _Stop as stop:
        return _finish(rec, "fnn", sizes, rank_out, required, domain=domain, stop=stop)
    adapted = RationalFNN(tuple(_sym(W) for W in weights), tuple(_sym(b) for b in biases), f0.activation, f0.final_relu)
    return _finish(
        rec,
        "fnn",
        sizes,
        rank_out,
        required,
        adapted=adapted,
        domain=domain,
        theorem="every block's affine map equals its target layer's and every linearising ReLU "
        "is active on its ball, so f(x) = f̄(x) for ||x - x0|| <= r "
        "(Zeng & Lee 2024, Theorem 3 / Theorem 6)",
    )


def _choose_level(P, pu, row_sq, r2):
    """A short rational ``β`` with ``β + p_k > 0`` and ``(β + p_k)^2 > r^2 s_k`` for every row ``k``.

    Starts from the float level of :func:`lora_theory.fnn.lora_fnn` (``max_k (r ||row_k|| - p_k)^+`` plus
    its safety term) and doubles the safety term until the exact squared comparison holds.
    """

    r = math.sqrt(float(r2))
    pf = np.array([float(p) for p in pu])
    rows = np.sqrt(np.array([float(s) for s in row_sq]))
    Pf = np.array([[float(v) for v in row] for row in P.to_list()])
    need = float(np.max(r * rows - pf))
    safety = SAFETY * (r * float(np.linalg.norm(Pf, 2)) + float(np.linalg.norm(pf)))
    safety = max(safety, 1e-12 * (1 + abs(need)))
    for _ in range(200):
        f = _fraction_upper(max(need, 0.0) + safety)
        beta = QQ(f.numerator, f.denominator)
        if all(beta + p > 0 and (beta + p) ** 2 > r2 * s for p, s in zip(pu, row_sq)):
            return beta
        safety *= 2
    raise _Stop(NOT_MET, "no rational linearising level found")  # pragma: no cover


# ---------------------------------------------------------------------------------------------- TFN


_HEAD = ("wq", "wk", "wv", "wo")


@dataclass(frozen=True, eq=False)
class RationalTFN:
    """A transformer network with exact rational parameters (the exact twin of :class:`~lora_theory.TFN`).

    Attributes
    ----------
    wq, wk, wv, wo : tuple (L) of tuple (H) of sympy.ImmutableMatrix (D, D)
    w1, w2 : tuple (L) of sympy.ImmutableMatrix (D, D)
    b1, b2 : tuple (L) of sympy.ImmutableMatrix (D, 1)
    w_out : sympy.ImmutableMatrix (D, D)
    """

    wq: tuple
    wk: tuple
    wv: tuple
    wo: tuple
    w1: tuple
    b1: tuple
    w2: tuple
    b2: tuple
    w_out: object

    def __post_init__(self):
        def seq(v, name):
            if (
                isinstance(v, (str, bytes, sympy.MatrixBase))
                or not isinstance(v, (Sequence, np.ndarray))
                or len(v) == 0
            ):
                raise InvalidArgumentError(name, "must be a non-empty sequence (one entry per block)")
            return list(v)

        wq = seq(self.wq, "wq")
        Lb = len(wq)
        H = len(seq(wq[0], "wq[0]"))
        n = _dm(wq[0][0], "wq[0][0]").shape[0]
        vals = {}
        for name in _HEAD:
            stack = seq(getattr(self, name), name)
            if len(stack) != Lb:
                raise InvalidArgumentError(name, f"must have L = {Lb} blocks, got {len(stack)}")
            vals[name] = tuple(
                tuple(
                    _sym(_dm(M, f"{name}[{l}][{h}]", (n, n))) for h, M in enumerate(_heads(stack[l], H, f"{name}[{l}]"))
                )
                for l in range(Lb)
            )
        for name in ("w1", "w2"):
            stack = seq(getattr(self, name), name)
            if len(stack) != Lb:
                raise InvalidArgumentError(name, f"must have L = {Lb} blocks, got {len(stack)}")
            vals[name] = tuple(_sym(_dm(M, f"{name}[{l}]", (n, n))) for l, M in enumerate(stack))
        for name in ("b1", "b2"):
            stack = seq(getattr(self, name), name)
            if len(stack) != Lb:
                raise InvalidArgumentError(name, f"must have L = {Lb} blocks, got {len(stack)}")
            vals[name] = tuple(_sym(_vec(v, f"{name}[{l}]", n)) for l, v in enumerate(stack))
        vals["w_out"] = _sym(_dm(self.w_out, "w_out", (n, n)))
        for name, v in vals.items():
            object.__setattr__(self, name, v)

    @property
    def depth(self) -> int:
        """``L``, the number of blocks."""
        return len(self.wq)

    @property
    def heads(self) -> int:
        """``H``."""
        return len(self.wq[0])

    @property
    def embed_dim(self) -> int:
        """``D``."""
        return int(self.w_out.shape[0])

    width = embed_dim

    @classmethod
    def from_tfn(cls, model: TFN) -> RationalTFN:
        """The exact rational values of a float64 :class:`~lora_theory.TFN`."""
        return cls(
            *(list(getattr(model, n)) for n in _HEAD),
            w1=list(model.w1),
            b1=list(model.b1),
            w2=list(model.w2),
            b2=list(model.b2),
            w_out=model.w_out,
        )

    def to_float(self) -> TFN:
        """The nearest float64 :class:`~lora_theory.TFN`."""

        def f(M):
            return np.array(M.tolist(), dtype=float)

        heads = {n: np.array([[f(M) for M in row] for row in getattr(self, n)]) for n in _HEAD}
        return TFN(
            **heads,
            w1=np.array([f(M) for M in self.w1]),
            b1=np.array([f(v).reshape(-1) for v in self.b1]),
            w2=np.array([f(M) for M in self.w2]),
            b2=np.array([f(v).reshape(-1) for v in self.b2]),
            w_out=f(self.w_out),
        )


def _heads(value, H, name):
    if (
        isinstance(value, (str, bytes, sympy.MatrixBase))
        or not isinstance(value, (Sequence, np.ndarray))
        or len(value) != H
    ):
        raise InvalidArgumentError(name, f"must hold H = {H} head matrices")
    return list(value)


def _as_rational_tfn(model, name) -> RationalTFN:
    if isinstance(model, RationalTFN):
        return model
    if isinstance(model, TFN):
        return RationalTFN.from_tfn(model)
    raise InvalidArgumentError(name, f"must be a lora_theory.TFN or a RationalTFN, got {type(model).__name__}")


def certify_tfn(frozen: TFN | RationalTFN, target: TFN | RationalTFN, rank: int) -> Certificate:
    """Exact certificate for Zeng & Lee 2024, Theorem 7 (transformer networks).

    Runs the construction of :func:`lora_theory.tfn.lora_tfn` exactly (``C_0 = I``, ``C_l = T2_l W2_l^{-1}``;
    block ``l``, head ``h``: scores ``(W_K + Δ_K)^T (W_Q + Δ_Q) = C_{l-1}^T T_K^T T_Q C_{l-1}``, values
    ``(W_O + Δ_O)(W_V + Δ_V) = W1_l^{-1} T1_l T_O T_V C_{l-1}``; ``b1_l = c1_l``; ``b2_l = W2_l T2_l^{-1} c2_l``
    for ``l < L``; output ``(W_out + Δ_out)(W2_L + Δ_2) = T_out T2_L`` and
    ``b2_L = (W_out + Δ_out)^{-1} T_out c2_L``), each product by the exact Lemma 1 chain with two factors.

    Checks, exactly: each matched product equals its target; ``W1_l (W_O + Δ_O)(W_V + Δ_V) == T1_l T_O T_V
    C_{l-1}`` (hidden pre-activations equal the target's); ``C_l W2_l == T2_l`` and ``C_l b2_l == c2_l``
    (``Z̄_l = C_l Z_l``); ``(W_out + Δ_out) b2_L == T_out c2_L``; every ``rank(Δ) <= R``. Together they prove
    ``f(X) = f̄(X)`` for every input ``X``.

    Parameters
    ----------
    frozen, target : TFN or RationalTFN
        Same ``L``, ``H``, ``D``.
    rank : int in 0..D
        ``R`` for every adapter.

    Returns
    -------
    Certificate
        ``"exact"``, or ``"sufficient condition not met"`` naming the singular matrix or the matched rank
        ``G > 2R`` (never ``"impossible"``: the paper proves no lower bound for transformers).
    """
    f0 = _as_rational_tfn(frozen, "frozen")
    fbar = _as_rational_tfn(target, "target")
    Lb, H, n = f0.depth, f0.heads, f0.embed_dim
    if (fbar.depth, fbar.heads, fbar.embed_dim) != (Lb, H, n):
        raise InvalidArgumentError(
            "target",
            f"must have the frozen network's depth, heads and embedding size (L, H, D) = "
            f"{(Lb, H, n)}, got {(fbar.depth, fbar.heads, fbar.embed_dim)}",
        )
    R = as_int(rank, "rank", 0, n)
    sizes = {"D": n, "L": Lb, "H": H}
    rec = _Recorder(f0, fbar)
    G = [0] * Lb

    def g(M):
        return _dm(M, "model")

    def budget(kind, l, h):
        what = {
            "qk": "scores (W_K + Δ_K)^T (W_Q + Δ_Q)",
            "ov": "values (W_O + Δ_O)(W_V + Δ_V)",
            "out": "output (W_out + Δ_out)(W2_L + Δ_2)",
        }[kind]
        where = f"block {l}, head {h}" if h is not None else f"block {l}"

        def reason(rank_E, k):
            return (
                f"matched rank G = {rank_E} exceeds 2R = {k} ({what}, {where}); Theorem 7 needs no more, "
                "but this does not prove impossibility"
            )

        return reason

    def chain(kind, l, h, factors, names, matched):
        label = f"{kind}[{l},{h}]: " if h is not None else f"{kind}: "
        adapters, adapted, rank_E = _exact_chain(
            rec, factors, matched, (R, R), names, label, NOT_MET, budget(kind, l, h)
        )
        G[l] = max(G[l], rank_E)
        return adapters, adapted

    new = {name: [[None] * H for _ in range(Lb)] for name in _HEAD}
    b2 = [None] * Lb
    w2_last = w_out = None

    def param(model, name, l, h):
        value = getattr(model, name)
        return g(value if name == "w_out" else value[l][h] if h is not None else value[l])

    def inverse(M, name, context):
        rec.invertible(M, name, context)
        return 0.0, M.lu_solve

    def right_inverse(M, name, context):
        rec.invertible(M, name, context)
        Mt = M.transpose()
        return 0.0, lambda X: Mt.lu_solve(X.transpose()).transpose()

    arith = _WalkArithmetic(
        frozen=lambda name, l, h: param(f0, name, l, h),
        target=lambda name, l, h: param(fbar, name, l, h),
        mul=lambda A, B: A * B,
        T=lambda A: A.transpose(),
        eye=_eye(n),
        inverse=inverse,
        right_inverse=right_inverse,
    )
    try:
        for step in _walk(arith, Lb, H, {}):
            if isinstance(step, _Carried):
                l, C = step.block, step.C
                b2[l] = step.b2  # (n, 1) W2 T2^-1 c2
                rec.equal(f"block {l}: C_{l + 1} W2 == T2", C * step.W2, step.T2)
                rec.equal(f"block {l}: C_{l + 1} b2 == c2 (block output = C^-1 × target's)", C * b2[l], step.c2)
                continue
            l, h = step.block, step.head
            (a1, a2), (m1, m2) = chain(step.kind, l, h, list(step.factors), list(step.names), step.matched)
            if step.kind == "qk":
                _store(rec, ("wq", l, h), *a1)
                # W_K^T + B2 A2 = (W_K + A2^T B2^T)^T: the adapter of W_K is A_K = B2^T, B_K = A2^T
                _store(rec, ("wk", l, h), a2[1].transpose(), a2[0].transpose())
                new["wq"][l][h], new["wk"][l][h] = m1, m2.transpose()
            elif step.kind == "ov":
                _store(rec, ("wv", l, h), *a1)
                _store(rec, ("wo", l, h), *a2)
                new["wv"][l][h], new["wo"][l][h] = m1, m2
                W1 = param(f0, "w1", l, None)
                rec.equal(f"ov[{l},{h}]: W1 (W_O + Δ_O)(W_V + Δ_V) == T1 T_O T_V C", W1 * m2 * m1, step.hidden)
            else:
                (a_w2, a_out), (w2_last, w_out) = (a1, a2), (m1, m2)
        last = Lb - 1
        _store(rec, ("w2", last, None), *a_w2)
        _store(rec, ("w_out", last, None), *a_out)
        rec.invertible(w_out, "W_out + Δ_out", "the last block's bias b2 = (W_out + Δ_out)^-1 T_out c2")
        rhs = g(fbar.w_out) * g(fbar.b2[last])  # (n, 1) T_out c2_L
        b2[last] = w_out.lu_solve(rhs)
        rec.equal("out: (W_out + Δ_out) b2_L == T_out c2_L", w_out * b2[last], rhs)
    except _Stop as stop:  # the instance threshold needs every matched rank: unknown after a stop
        return _finish(rec, "tfn", sizes, R, None, stop=stop)
    adapted = RationalTFN(
        *([[_sym(M) for M in row] for row in new[nm]] for nm in _HEAD),
        w1=list(f0.w1),
        b1=list(fbar.b1),
        w2=[f0.w2[l] for l in range(Lb - 1)] + [_sym(w2_last)],
        b2=[_sym(v) for v in b2],
        w_out=_sym(w_out),
    )
    return _finish(
        rec,
        "tfn",
        sizes,
        R,
        max(ceil_div(x, 2) for x in G),
        adapted=adapted,
        theorem="every matched product and bias equals its target, so f(X) = f̄(X) for every input X "
        "(Zeng & Lee 2024, Theorem 7)",
    )


# ---------------------------------------------------------------------------------- random instances


def _rng(seed):
    return rng_from(seed, "seed")


def _rand(rng, shape, bound, denominator):
    """Entries ``k / denominator`` with integer ``k`` uniform in ``[-bound, bound]``, as a sympy matrix."""
    k = rng.integers(-bound, bound + 1, size=shape)
    return sympy.ImmutableMatrix(shape[0], shape[1], [sympy.Rational(int(v), denominator) for v in k.reshape(-1)])


def _instance_args(denominator, bound):
    den = as_int(denominator, "denominator", 1)
    b = as_int(bound, "bound", 1)
    return den, b


def random_rational_linear(
    width: int, depth: int, *, seed: Seed = None, error_rank: int | None = None, denominator: int = 4, bound: int = 4
) -> tuple[list[sympy.ImmutableMatrix], sympy.ImmutableMatrix]:
    """A random rational linear instance ``(frozen, target)`` for :func:`certify_linear`.

    Entries ``k / denominator`` with ``k`` uniform in ``-bound..bound`` (default multiples of 1/4 in
    ``[-1, 1]``). ``error_rank`` (default: generic, full) makes ``E = C F`` with ``C`` ``(D, r)`` and ``F``
    ``(r, D)`` random, so ``rank(E) <= r`` (equal for almost every draw; the certificate computes it exactly).

    Returns
    -------
    frozen : list of L sympy.ImmutableMatrix (D, D)
    target : sympy.ImmutableMatrix (D, D)
    """
    n = as_int(width, "width", 1, MAX_RANDOM_WIDTH)
    depth_ = as_int(depth, "depth", 1, MAX_DEPTH)
    den, b = _instance_args(denominator, bound)
    rng = _rng(seed)
    frozen = [_rand(rng, (n, n), b, den) for _ in range(depth_)]
    if error_rank is None:
        target = _rand(rng, (n, n), b, den)
    else:
        r = as_int(error_rank, "error_rank", 0, n)
        prod = sympy.eye(n)
        for W in frozen:
            prod = W * prod
        E = _rand(rng, (n, r), b, den) * _rand(rng, (r, n), b, den) if r else sympy.zeros(n, n)
        target = sympy.ImmutableMatrix(prod + E)
    return frozen, target


def random_rational_fnn(
    width: int,
    depth: int,
    target_depth: int,
    *,
    seed: Seed = None,
    final_relu: bool = True,
    denominator: int = 4,
    bound: int = 4,
) -> tuple[RationalFNN, RationalFNN]:
    """A random rational ReLU FNN pair ``(frozen, target)`` (:class:`RationalFNN`) for :func:`certify_fnn`.

    Weights and biases ``k / denominator``, ``k`` uniform in ``-bound..bound``.
    """
    n = as_int(width, "width", 1, MAX_RANDOM_WIDTH)
    depth_ = as_int(depth, "depth", 1, MAX_DEPTH)
    tdepth = as_int(target_depth, "target_depth", 1, MAX_DEPTH)
    if tdepth > depth_:
        raise InvalidArgumentError(
            "target_depth", f"the target depth L̄ = {tdepth} exceeds the frozen depth L = {depth_}"
        )
    den, b = _instance_args(denominator, bound)
    rng = _rng(seed)

    def model(m):
        return RationalFNN(
            tuple(_rand(rng, (n, n), b, den) for _ in range(m)),
            tuple(_rand(rng, (n, 1), b, den) for _ in range(m)),
            "relu",
            final_relu,
        )

    return model(depth_), model(tdepth)


def _rand_nonsingular(rng, n, bound, denominator):
    """As :func:`_rand` for an ``n x n`` matrix, redrawn until its determinant is non-zero (exactly)."""
    while True:
        M = _rand(rng, (n, n), bound, denominator)
        if M.det() != 0:
            return M


def random_rational_tfn(
    embed_dim: int,
    depth: int,
    heads: int,
    *,
    seed: Seed = None,
    denominator: int = 4,
    bound: int = 4,
    nonsingular: bool = False,
) -> tuple[RationalTFN, RationalTFN]:
    """A random rational transformer pair ``(frozen, target)`` (:class:`RationalTFN`) for :func:`certify_tfn`.

    Every parameter ``k / denominator``, ``k`` uniform in ``-bound..bound``. Small entries make singular
    matrices common (one ``2 x 2`` draw in ten or so); ``nonsingular=True`` redraws every ``D x D`` matrix
    until its determinant is non-zero, so the matrices Theorem 7 inverts as given (``W_K^T``, ``W_O``,
    ``W1_l``, ``W2_l``, ``T2_l``, ``W_out``) are invertible. (Matrices built by the construction, such as
    ``W_Q + Δ_Q``, can still be singular.)
    """
    n = as_int(embed_dim, "embed_dim", 1, MAX_RANDOM_WIDTH)
    depth_ = as_int(depth, "depth", 1, MAX_DEPTH)
    H = as_int(heads, "heads", 1, MAX_RANDOM_WIDTH)
    den, b = _instance_args(denominator, bound)
    if not isinstance(nonsingular, (bool, np.bool_)):
        raise InvalidArgumentError("nonsingular", f"must be a bool, got {nonsingular!r}")
    rng = _rng(seed)

    def square():
        return _rand_nonsingular(rng, n, b, den) if nonsingular else _rand(rng, (n, n), b, den)

    def model():
        att = [[[square() for _ in range(H)] for _ in range(depth_)] for _ in range(4)]
        return RationalTFN(
            *att,
            w1=[square() for _ in range(depth_)],
            b1=[_rand(rng, (n, 1), b, den) for _ in range(depth_)],
            w2=[square() for _ in range(depth_)],
            b2=[_rand(rng, (n, 1), b, den) for _ in range(depth_)],
            w_out=square(),
        )

    return model(), model()
