"""What an exact certificate records and concludes: its checks (:class:`Check`), its outcome (``EXACT``,
``NOT_MET``, ``IMPOSSIBLE``) and the :class:`Certificate` a construction returns, built by a recorder that stops
at the first singular matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import sympy
from sympy import QQ
from sympy.polys.matrices import DomainMatrix

from .. import _display
from .rational import _count_nonzero, _sym

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
