"""Zeng & Lee 2024, Lemma 1 (linear models) in exact rational arithmetic: :func:`certify_linear`, with the chain of
:func:`lora_theory.linear._split_chain` over a rank decomposition of the discrepancy (the SVD is irrational).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from sympy.polys.matrices import DomainMatrix

from .._types import Rank
from .._validate import as_ranks
from ..linear import _ChainArithmetic, _search_note, _split_chain
from ..models import FNN
from ..thresholds import ceil_div
from .certificate import IMPOSSIBLE, Certificate, Check, _finish, _Recorder, _Stop, _store
from .rational import _dm, _prod, _square_list, _sym, _zeros


def _rank_decomposition(E: DomainMatrix):
    """``E = C F`` with ``C`` the pivot columns of ``E`` (``D x r``) and ``F`` the non-zero rows of its RREF."""
    R, pivots = E.rref()
    r = len(pivots)
    n = E.shape[0]
    C = E.extract(list(range(n)), list(pivots)) if r else _zeros(n, 0)
    F = R.extract(list(range(r)), list(range(E.shape[1]))) if r else _zeros(0, E.shape[1])
    return C.to_dense(), F.to_dense(), r


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
