"""Optimal LoRA adapters for linear models (Zeng & Lee 2024, Lemma 1 (linear models) and its corollary).

Symbols: the frozen model is ``f0(x) = W_L ... W_1 x`` (``frozen = [W_1, ..., W_L]``, ``W_1`` applied first,
or the linear :class:`~lora_theory.models.FNN` that :func:`~lora_theory.models.random_linear` returns), the
target ``T`` (``target``: a ``(D, D)`` matrix or such a model, which stands for its matrix ``W_L ... W_1``),
the discrepancy ``E = T - Π W_l`` (:func:`discrepancy`), the LoRA-rank ``R``
(``rank``, or per-layer ranks ``R_l``) and ``k = Σ_l R_l``.

Lemma 1: ``min_{rank Δ_l <= R_l} ||Π(W_l + Δ_l) - T||_2 = σ_{k+1}(E)``, attained by
``Π(W_l + Δ_l) = Π W_l + LR_k(E)``; exact iff ``k >= rank(E)``. The lower bound needs no assumption:
``Π(W + Δ) - Π W`` has rank ``<= k`` (telescoping), so Eckart–Young gives ``σ_{k+1}(E)``.

Construction (SVD split, THEORY.md §2.1): ``E = U S V^T``; layer ``l`` receives a block ``V_l`` of right
singular vectors (``R_l`` of them, the blocks together the top ``min(Σ R_l, rank E)``), and with
``Q_l = W_L ... W_{l+1}`` (frozen, after ``l``) and ``P_l = (W_{l-1}+Δ_{l-1}) ... (W_1+Δ_1)`` (adapted,
before ``l``)::

    Δ_l = Q_l^{-1} E V_l V_l^T P_l^{-1},   B_l = Q_l^{-1} (E V_l),   A_l = V_l^T P_l^{-1}

computed with solves. By induction ``Q_l Π_{k<=l}(W_k + Δ_k) = Π W + E Σ_{k<=l} V_k V_k^T``. The blocks go
in the fixed order (layer 1 the largest singular values) when no ``Q_l`` or ``P_l`` it needs is singular;
otherwise the assignment of blocks to layers is searched (:func:`_search_assignment`), and the
construction raises only when no assignment works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import _display
from ._guard import numeric_guard
from ._types import ArrayLike, Matrices, Rank
from ._validate import as_ranks, as_square, as_square_sequence, as_tolerance, ceil_div
from .adapter import Adapter
from .errors import InvalidArgumentError, SingularMatrixError
from .models import FNN
from .numerics import (
    _LargestConditionNumber,
    check_invertible,
    check_norm_finite,
    numeric_rank,
    svd_values,
    tolerance,
    verified_exact,
    warn_if_ill_conditioned,
)

#: A chain of frozen matrices ``(W_1, ..., W_L)``, each ``(D, D)``, or the linear bias-free model holding them.
Chain = Matrices | FNN
#: A target matrix ``(D, D)``, or a linear bias-free model standing for its matrix.
Target = ArrayLike | FNN

__all__ = [
    "LinearFit",
    "lora_linear",
    "discrepancy",
    "product",
    "discrepancy_rank",
    "linear_optimal_error",
    "linear_gaussian_mse",
    "linear_rank_requirement",
    "OptimalityGap",
    "optimality_gap",
]


def _linear_model_layers(model: FNN, name: str) -> tuple[np.ndarray, ...]:
    """The weights ``(W_1, ..., W_L)`` of a linear, bias-free :class:`FNN` (the model of Lemma 1, as
    :func:`~lora_theory.models.random_linear` returns it); any other FNN is refused: its map is not a chain of
    matrices, and reading its weights as one would answer for another model."""
    if model.activation != "linear":
        raise InvalidArgumentError(
            name, f"a model passed as a linear chain must have activation='linear' (Lemma 1), got {model.activation!r}"
        )
    if any(np.any(b != 0) for b in model.biases):
        raise InvalidArgumentError(name, "a model passed as a linear chain must have zero biases (Lemma 1)")
    return model.weights


def as_chain(frozen: Chain, name: str = "frozen") -> tuple[np.ndarray, ...]:
    """``frozen`` as the matrices ``(W_1, ..., W_L)``, each ``(D, D)``: from a sequence of square matrices, or
    from a linear bias-free :class:`FNN` (its weights, ``W_1`` applied first).

    :class:`~lora_theory.errors.InvalidArgumentError` names ``name`` for anything else (a ReLU model, a model
    with biases, mismatched shapes, NaN/inf entries).
    """
    if isinstance(frozen, FNN):
        return as_square_sequence(_linear_model_layers(frozen, name), name)
    return as_square_sequence(frozen, name)


def as_target(target: Target, name: str = "target", size: int | None = None) -> np.ndarray:
    """``target`` as the matrix ``T`` of shape ``(size, size)``: a square matrix, or a linear bias-free
    :class:`FNN` standing for its matrix ``W_L ... W_1``."""
    if isinstance(target, FNN):
        target = product(as_chain(target, name))
    return as_square(target, name, size)


def product(matrices: Chain) -> np.ndarray:
    """``M_m ... M_1`` for ``matrices = [M_1, ..., M_m]`` (later factor on the left; at least one matrix), shape
    ``(D, D)``: the map of the linear model of Lemma 1.

    ``matrices``: a sequence of finite square float arrays of one side ``D``, or a linear bias-free
    :class:`FNN` (its weights) (:class:`~lora_theory.errors.InvalidArgumentError` otherwise).
    """
    if isinstance(matrices, (list, tuple)) and not matrices:
        raise InvalidArgumentError("matrices", "the product of no matrices needs a width; pass at least one")
    matrices = as_chain(matrices, "matrices")
    out = np.eye(matrices[0].shape[0])
    for M in matrices:
        out = M @ out
    return out


product = numeric_guard(product)


def discrepancy(frozen: Chain, target: Target) -> np.ndarray:
    """``E = T - W_L ... W_1``, shape ``(D, D)`` (the discrepancy of Lemma 1).

    ``frozen``: ``L`` matrices ``(D, D)`` or a linear bias-free :class:`FNN`; ``target``: a ``(D, D)``
    matrix or such a model (its matrix).
    """
    frozen = as_chain(frozen)
    target = as_target(target, "target", frozen[0].shape[0])
    return target - product(frozen)


discrepancy = numeric_guard(discrepancy)


def _rank_scale(frozen, target) -> float:
    """The size of the operands ``E`` is computed from; its rounding is relative to this."""
    return max(np.linalg.norm(target, 2), np.linalg.norm(product(frozen), 2))


def discrepancy_rank(frozen: Chain, target: Target, tol: float | None = None) -> int:
    """Numeric ``rank(E)`` of the discrepancy of Lemma 1 (``frozen`` and ``target`` as in :func:`discrepancy`).

    Default tolerance ``D · eps · max(||T||_2, ||Π W||_2, σ_1(E))``: ``E`` is a difference of two matrices
    of those norms and inherits their rounding, so singular values below it are noise. A given ``tol``
    must be finite and ``>= 0`` (:class:`~lora_theory.errors.InvalidArgumentError` otherwise: a NaN would
    count no singular value and report rank 0).
    """
    frozen = as_chain(frozen)
    target = as_target(target, "target", frozen[0].shape[0])
    tol = as_tolerance(tol, "tol")
    E = target - product(frozen)
    s = svd_values(E)
    if tol is None:
        tol = E.shape[0] * np.finfo(np.float64).eps * max(_rank_scale(frozen, target), s[0])
    return int(np.sum(s > tol))


discrepancy_rank = numeric_guard(discrepancy_rank)


def _tail(s: np.ndarray, k: int) -> tuple[float, float]:
    """``(σ_{k+1}, sqrt(Σ_{j>k} σ_j^2))`` with ``σ_j = 0`` past the end."""
    spectral = float(s[k]) if k < s.size else 0.0
    frob = float(np.sqrt(np.sum(s[k:] ** 2))) if k < s.size else 0.0
    return spectral, frob


def _total_rank(rank, depth, width) -> int:
    return sum(as_ranks(rank, depth, width))


def linear_optimal_error(frozen: Chain, target: Target, rank: Rank, norm: str = "spectral") -> float:
    """The optimum of Lemma 1: ``σ_{k+1}(E)`` (``norm="spectral"``) or ``sqrt(Σ_{j>k} σ_j(E)^2)`` (``"fro"``).

    ``k = Σ_l R_l`` (``R·L`` for one rank). Zeng & Lee 2024, Lemma 1 (linear models). ``frozen`` and
    ``target`` as in :func:`discrepancy`.
    """
    frozen = as_chain(frozen)
    E = discrepancy(frozen, target)
    k = _total_rank(rank, len(frozen), E.shape[0])
    spectral, frob = _tail(svd_values(E), k)
    if not isinstance(norm, str):
        raise InvalidArgumentError("norm", f"must be 'spectral' or 'fro', got {norm!r}")
    if norm == "spectral":
        return spectral
    if norm == "fro":
        return frob
    raise InvalidArgumentError("norm", f"must be 'spectral' or 'fro', got {norm!r}")


linear_optimal_error = numeric_guard(linear_optimal_error)


def linear_gaussian_mse(frozen: Chain, target: Target, rank: Rank) -> float:
    """Per-coordinate MSE of the optimum on ``x ~ N(0, I_D)``: ``Σ_{j>k} σ_j(E)^2 / D`` (Lemma 1; THEORY.md §2.1).

    ``frozen`` and ``target`` as in :func:`discrepancy`.
    """
    frozen = as_chain(frozen)
    E = discrepancy(frozen, target)
    k = _total_rank(rank, len(frozen), E.shape[0])
    return _tail(svd_values(E), k)[1] ** 2 / E.shape[0]


linear_gaussian_mse = numeric_guard(linear_gaussian_mse)


def linear_rank_requirement(frozen: Chain, target: Target, tol: float | None = None) -> int:
    """``ceil(rank(E) / L)``: the smallest uniform LoRA-rank that represents ``T`` exactly (Lemma 1).

    ``frozen`` and ``target`` as in :func:`discrepancy`; ``tol`` as in :func:`discrepancy_rank` (finite,
    ``>= 0``, or None for the default).
    """
    frozen = as_chain(frozen)
    return ceil_div(discrepancy_rank(frozen, target, tol), len(frozen))


linear_rank_requirement = numeric_guard(linear_rank_requirement)


@dataclass(frozen=True, eq=False)
class LinearFit(_LargestConditionNumber):
    """The adapters of Lemma 1 and what they predict.

    Attributes
    ----------
    adapters : tuple of Adapter
        One per frozen layer; ``adapters[l].rank`` = number of singular directions layer ``l`` received
        (``<= ranks[l]``; 0 where its block of ``V`` is empty or beyond the numeric rank of ``E``).
    ranks : tuple of int
        The rank budget ``R_l`` of every layer.
    model : FNN
        The adapted linear model, weights ``W_l + Δ_l``.
    discrepancy : ndarray (D, D)
        ``E``.
    singular_values : ndarray (D,)
        ``σ(E)``, descending.
    error_rank : int
        Numeric ``rank(E)``.
    spectral_error, frobenius_error, gaussian_mse : float
        Predicted optimum: ``σ_{k+1}(E)``, ``sqrt(Σ_{j>k} σ_j^2)``, ``Σ_{j>k} σ_j^2 / D``.
    exact : bool
        ``Σ R_l >= rank(E)`` (:attr:`rank_sufficient`) *and* float64 kept it: the measured
        ``||Π(W_l + Δ_l) - T||_2``, relative to ``max(||T||_2, ||Π W||_2)``, is within
        ``tolerance(kappa, gamma)``, and that tolerance times ``max(||T||, ||Π W||) / ||T||`` (the same
        bound relative to the target) is at most :data:`lora_theory.numerics.EXACT_TOLERANCE_LIMIT` (1).
    condition_numbers : dict of str -> float
        ``κ`` of every matrix the construction solved with (``"Q_l"``, ``"P_l"``, 1-based ``l``).
    rank_sufficient : bool
        Lemma 1's condition ``Σ R_l >= rank(E)`` (exact in exact arithmetic).
    measured_error : float
        ``||Π(W_l + Δ_l) - T||_2 / max(||T||_2, ||Π W||_2)`` as computed in float64 after the construction.

    The properties ``kappa`` (largest of those) and ``gamma`` (size of the largest layer term of the
    product, relative to ``max(||T||, ||Π W||)``) give the tolerance ``tolerance(kappa, gamma)``.
    """

    adapters: tuple
    ranks: tuple
    model: FNN
    frozen: tuple
    target: np.ndarray
    discrepancy: np.ndarray
    singular_values: np.ndarray
    error_rank: int
    spectral_error: float
    frobenius_error: float
    gaussian_mse: float
    exact: bool
    condition_numbers: dict = field(default_factory=dict)
    rank_sufficient: bool = False
    measured_error: float = float("nan")

    __repr__ = _display.linear_fit_repr
    _repr_markdown_ = _display.linear_fit_markdown

    @property
    def ranks_used(self) -> tuple:
        return tuple(a.rank for a in self.adapters)

    @property
    def gamma(self) -> float:
        """Amplification ``γ = max_l ||Q_l||_2 (||W_l||_2 + ||Δ_l||_2) ||P_l||_2 / max(||T||_2, ||Π W||_2)``.

        Layer ``l`` contributes ``Q_l (W_l + Δ_l) P_l`` to the product, and ``W_l + Δ_l`` is a float64 sum
        that rounds relative to the magnitudes added, ``||W_l|| + ||Δ_l||``, not to its own norm (a frozen entry of 1e12
        cancelled by ``Δ_l`` toward a small target leaves rounding of 1e12·u); when ``Δ_l`` is large (solves with
        ill-conditioned ``Q_l`` and ``P_l`` in chains of 3 or more layers, where ``κ(Q_l) κ(P_l)`` can far exceed either
        ``κ``), the rounding of the adapted product grows with this size, not with ``κ`` alone. The achieved product is
        within ``c·u·(κ + γ)`` (relative to the same scale) of ``Π W + LR_k(E)``: use ``tolerance(fit.kappa,
        fit.gamma)``.
        """
        return _chain_gamma(self.frozen, self.model.weights, self.target)

    @property
    def weights(self) -> tuple:
        """Adapted weights ``W_l + Δ_l``."""
        return self.model.weights

    @property
    def product(self) -> np.ndarray:
        """``Π (W_l + Δ_l)``."""
        return product(self.model.weights)

    def achieved_error(self, norm: str = "spectral") -> float:
        """``||Π(W_l + Δ_l) - T||`` actually reached: ``norm="spectral"`` (2-norm) or ``"fro"`` (Frobenius).

        Any other ``norm`` raises :class:`~lora_theory.errors.InvalidArgumentError`, as in
        :func:`linear_optimal_error` (it used to fall back to Frobenius silently).
        """
        if not isinstance(norm, str):
            raise InvalidArgumentError("norm", f"must be 'spectral' or 'fro', got {norm!r}")
        if norm == "spectral":
            return float(np.linalg.norm(self.product - self.target, 2))
        if norm == "fro":
            return float(np.linalg.norm(self.product - self.target, "fro"))
        raise InvalidArgumentError("norm", f"must be 'spectral' or 'fro', got {norm!r}")


def _chain_gamma(frozen, adapted, target) -> float:
    """``max_l ||Q_l|| (||W_l|| + ||M_l - W_l||) ||P_l|| / max(||T||, ||Π W||)`` (2-norms; see
    :attr:`LinearFit.gamma`)."""
    L = len(frozen)
    scale = _rank_scale(frozen, target)
    gamma, P = 0.0, np.eye(frozen[0].shape[0])
    for l in range(L):
        Q = product(frozen[l + 1 :]) if l < L - 1 else np.eye(frozen[0].shape[0])
        added = np.linalg.norm(frozen[l], 2) + np.linalg.norm(adapted[l] - frozen[l], 2)  # magnitudes summed
        size = np.linalg.norm(Q, 2) * added * np.linalg.norm(P, 2)
        gamma = max(gamma, size / scale if scale > 0 else size)
        P = adapted[l] @ P
    return float(gamma)


#: The most layer steps (a solve and an invertibility check each) the search of :func:`_search_assignment`
#: tries before it gives up. The search visits each (layer, set of blocks used before it) at most once, so
#: it is exhaustive while ``L·2^(L-1) <= MAX_ASSIGNMENT_STEPS``, i.e. for chains of up to 9 layers.
MAX_ASSIGNMENT_STEPS = 4096


def _direction_blocks(ranks, rank_E) -> tuple:
    """The default cut of the singular directions: block ``b`` is ``[start_b, stop_b)`` (0-based), layer
    ``b``'s share in the fixed order, ``R_1`` directions, then ``R_2``..., clipped at ``rank_E``."""
    blocks, start = [], 0
    for R in ranks:
        blocks.append((min(start, rank_E), min(start + R, rank_E)))
        start += R
    return tuple(blocks)


class _SearchCut(Exception):
    """Internal: :func:`_search_assignment` stopped after :data:`MAX_ASSIGNMENT_STEPS` steps."""


def _search_assignment(blocks, ranks, step, state, singular):
    """Find an assignment of the blocks of directions to the layers of a Lemma 1 chain that the
    construction can carry out; shared by the float64, mpmath and exact rational chains.

    Lemma 1's optimum needs the product to realise ``Π W + LR_k(E)``, i.e. every one of the top ``k``
    directions given to *some* layer; which layer gets which block is free. The fixed order (layer ``l``
    gets block ``l``) can meet a singular ``P_l`` where another order does not: with ``W_1 = diag(0, 1)``,
    ``W_2 = I``, ``T = diag(1, -2)`` and ``R = 1``, the first direction of ``E = diag(1, -3)`` (``e_2``)
    makes ``W_1 + Δ_1 = diag(0, -2)`` singular, the second (``e_1``) makes it ``I``.

    Search: depth first over the layers in order, layer ``l`` trying every unused block ``b`` that fits
    its budget (``stop_b - start_b <= R_l``; empty blocks are interchangeable and tried once), blocks in
    increasing order, so the fixed order is tried first and is the answer whenever it works. By the
    identity ``Q_{l-1} P_l = Π W + Σ_{b used before l} E_b`` (``E_b`` the block's part of ``E``), whether
    the rest of the chain can be built depends only on ``l`` and the *set* of blocks used before it, so a
    (layer, set) that failed once is never tried again: at most ``L·2^(L-1)`` steps, and once the fixed
    order has failed the search stops after :data:`MAX_ASSIGNMENT_STEPS` steps in all. Within that budget the search is
    exhaustive: it fails only when *no* assignment of blocks to layers avoids a singular ``Q_l`` or ``P_l``. Other rank
    splits of ``LR_k(E)`` (directions rotated within equal singular values, or other groupings) are not searched, so a
    failure is a failure of this construction, not a proof that the optimum is out of reach.

    Parameters
    ----------
    blocks : tuple of (start, stop)
        From :func:`_direction_blocks`.
    ranks : tuple of int
        The budgets ``R_l``.
    step : callable ``(l, b, state) -> state``
        Builds layer ``l`` with block ``b`` on top of ``state``; raises ``singular`` when a matrix it
        must invert is singular.
    state
        The state before layer 1.
    singular : exception class
        What ``step`` raises on a singular matrix.

    Returns
    -------
    (assignment, states)
        ``assignment[l]`` is the block layer ``l`` received; ``states[l]`` the state after layer ``l``.

    Raises
    ------
    singular
        The first failure met (on the fixed order, which is tried first) when no assignment works.
    _SearchCut
        With ``.first`` the first failure, when the step budget ran out before the search was done.
    """
    L = len(ranks)
    failed, first, steps = set(), [], [0]

    def dfs(l, used, state):
        if l == L:
            return (), ()
        key = (l, frozenset(b for b in used if blocks[b][1] > blocks[b][0]))
        if key in failed:
            return None
        tried_empty = False
        for b in range(L):
            size = blocks[b][1] - blocks[b][0]
            if b in used or size > ranks[l] or (size == 0 and tried_empty):
                continue
            tried_empty = tried_empty or size == 0
            if first and steps[0] >= MAX_ASSIGNMENT_STEPS:  # the fixed order always runs
                cut = _SearchCut()
                cut.first = first[0]
                raise cut
            steps[0] += 1
            try:
                new = step(l, b, state)
            except singular as exc:
                if not first:
                    first.append(exc)
                continue
            rest = dfs(l + 1, used | {b}, new)
            if rest is not None:
                return (b,) + rest[0], (new,) + rest[1]
        failed.add(key)
        return None

    found = dfs(0, frozenset(), state)
    if found is None:
        raise first[0]
    return found


def _search_note(L, cut, what="singular directions") -> str:
    """What the search of :func:`_search_assignment` tried, for the message of a failure."""
    if cut:
        return (
            f"the fixed order of the blocks of {what} fails here, and the search over their "
            f"{math.factorial(L)} assignments to layers stopped after {MAX_ASSIGNMENT_STEPS} steps "
            "without finding one that works (one may exist)"
        )
    if L == 1:
        return ""
    return (
        f"no assignment of the {L} blocks of {what} to the {L} layers avoids a singular Q_l or P_l: all were searched"
    )


@dataclass(frozen=True)
class _ChainArithmetic:
    """The operations in which Lemma 1's chain differs between its arithmetics; :func:`_split_chain` is the
    chain itself, written once over them.

    The float64 chain (:func:`_chain_adapters`), the mpmath one (:func:`lora_theory.highprec.linear._chain_mp`) and
    the exact rational one (:func:`lora_theory.symbolic.linear._exact_chain`) supply them. For factors ``M_1..M_m``
    of side ``n`` (0-based ``l`` below) and a decomposition ``E = C F`` whose first ``rank(E)`` columns of
    ``C`` / rows of ``F`` are the directions (``C = U S``, ``F = V^T`` for an SVD; a rank decomposition in
    exact arithmetic):

    ``directions(start, stop) -> (C_b, F_b)``
        The block's columns ``(n, k)`` and rows ``(k, n)``, ``k = stop - start``.
    ``frozen_after(l) -> Q``
        ``Q_l = M_m ... M_{l+2}``, the frozen factors after factor ``l`` (``l < m - 1``).
    ``product(adapted) -> P``
        ``P_l``, the product of the adapted factors before ``l``, later factors on the left.
    ``solve_q(l, start, stop, Q, C_b) -> (B, notes)`` and ``solve_p(l, start, stop, P, F_b, given) -> (A, notes)``
        ``B = Q^{-1} C_b`` and ``A = F_b P^{-1}``, checked: they raise ``singular`` naming the matrix when it is
        singular; ``notes`` are what the arithmetic records of the check (condition numbers, exact checks).
        ``given``: ``((l', b', adapter), ...)`` of the layers before ``l``.
    ``adapt(l, M, A, B) -> (M + B A, adapter, notes)``
        The adapted factor and the adapter as the arithmetic stores it.
    ``no_assignment(first, cut, notes) -> Exception``
        The error to raise when no assignment works (``first``: the fixed order's failure, with the notes of
        its assignment so far; ``cut``: the search ran out of steps).
    """

    directions: Callable
    frozen_after: Callable
    product: Callable
    solve_q: Callable
    solve_p: Callable
    adapt: Callable
    singular: type
    no_assignment: Callable


def _split_chain(arith: _ChainArithmetic, factors, ranks, rank_E):
    """Zeng & Lee 2024, Lemma 1: the SVD-split construction on a chain of factors, in any arithmetic.

    Layer ``l`` receives one block of directions ``(C_b, F_b)`` of ``E`` (:func:`_direction_blocks`): with
    ``Q_l`` the frozen factors after it and ``P_l`` the adapted ones before it, ``B_l = Q_l^{-1} C_b`` and
    ``A_l = F_b P_l^{-1}`` (the last layer has no ``Q``, the first no ``P``), so that by induction
    ``Q_l Π_{k<=l}(M_k + B_k A_k) = Π M + Σ_{blocks used} C_b F_b``. The blocks go in the fixed order when it
    works, else in the first assignment :func:`_search_assignment` finds.

    Returns ``(assignment, adapted, notes, adapters)``: the block of each layer, the adapted factors, the
    notes of the solves and adaptations in order, and ``{l: adapter}`` for the layers that received a block.
    """
    m = len(factors)
    blocks = _direction_blocks(ranks, rank_E)

    def step(l, b, state):
        adapted, notes, given = state  # tuples: the layers before l
        start, stop = blocks[b]
        if stop <= start:  # an empty block: the layer stays frozen
            return adapted + (factors[l],), notes, given
        C, F = arith.directions(start, stop)  # (n, k), (k, n)
        new = ()
        try:
            if l < m - 1:
                B, q_notes = arith.solve_q(l, start, stop, arith.frozen_after(l), C)  # (n, k) = Q_l^{-1} C_b
                new += tuple(q_notes)
            else:
                B = C
            if l > 0:
                A, p_notes = arith.solve_p(l, start, stop, arith.product(adapted), F, given)  # (k, n) = F_b P_l^{-1}
                new += tuple(p_notes)
            else:
                A = F
        except arith.singular as exc:
            exc.notes = notes + new + tuple(getattr(exc, "notes", ()))
            raise
        layer, adapter, a_notes = arith.adapt(l, factors[l], A, B)
        return adapted + (layer,), notes + new + tuple(a_notes), given + ((l, b, adapter),)

    try:
        assignment, states = _search_assignment(blocks, ranks, step, ((), (), ()), arith.singular)
    except (arith.singular, _SearchCut) as exc:
        cut = isinstance(exc, _SearchCut)
        raise arith.no_assignment(exc.first if cut else exc, cut) from None
    adapted, notes, given = states[-1]
    return assignment, adapted, notes, {l: adapter for l, _, adapter in given}


def _no_assignment_error(first, cut, m, what="singular directions"):
    """The float64 and mpmath chains' error when no assignment works: the fixed order's singular matrix,
    with what the search tried."""
    note = _search_note(m, cut, what)
    return SingularMatrixError(first.matrix, first.condition_number, "; ".join(x for x in (first.context, note) if x))


def _chain_adapters(frozen, target, ranks, names=None, rank_tol=None):
    """The SVD-split construction on a chain of float64 factors (:func:`_split_chain` with numpy arithmetic).
    Returns (adapters, E, s, rank_E, kappas).

    ``names[l]`` labels factor ``l`` in error messages (default ``W_{l+1}``). The blocks of singular
    directions go to the layers in the fixed order (layer ``l`` gets directions ``R_1 + .. + R_{l-1} + 1``
    onward) when that order needs no singular ``Q_l`` or ``P_l``; otherwise :func:`_search_assignment`
    looks for an assignment of the blocks to the layers that does, and raises
    :class:`~lora_theory.errors.SingularMatrixError` (naming the fixed order's singular matrix) only when
    none works. Every assignment realises the same product ``Π W + LR_k(E)``.
    """
    L = len(frozen)
    D = frozen[0].shape[0]
    names = names or [f"W_{l + 1}" for l in range(L)]
    rank_tol = as_tolerance(rank_tol, "rank_tol")
    E = target - product(frozen)  # (D, D)
    U, s, Vt = np.linalg.svd(E)
    if rank_tol is None:
        rank_tol = D * np.finfo(np.float64).eps * max(_rank_scale(frozen, target), s[0])
    rank_E = int(np.sum(s > rank_tol))

    def solve_q(l, start, stop, Q, C):
        q_name = f"Q_{l + 1} = " + " ".join(reversed(names[l + 1 :]))
        kappa = check_invertible(Q, q_name, f"it receives singular directions {start + 1}..{stop} of E")
        return np.linalg.solve(Q, C), ((f"Q_{l + 1}", kappa),)  # (D, k)

    def solve_p(l, start, stop, P, F, given):
        p_name = f"P_{l + 1} = " + " ".join(f"({n} + Δ)" for n in reversed(names[:l]))
        kappa = check_invertible(P, p_name, f"layer {l + 1} receives singular directions of E")
        return np.linalg.solve(P.T, F.T).T, ((f"P_{l + 1}", kappa),)  # (k, D) = V_l^T P^{-1}

    def adapt(l, M, A, B):
        adapter = Adapter(A, B)
        return M + adapter.delta, adapter, ()

    arith = _ChainArithmetic(
        directions=lambda start, stop: (U[:, start:stop] * s[start:stop], Vt[start:stop]),  # E V_l, V_l^T
        frozen_after=lambda l: product(frozen[l + 1 :]),  # (D, D)
        product=product,
        solve_q=solve_q,
        solve_p=solve_p,
        adapt=adapt,
        singular=SingularMatrixError,
        no_assignment=lambda first, cut: _no_assignment_error(first, cut, L),
    )
    _, _, notes, given = _split_chain(arith, frozen, ranks, rank_E)
    adapters = tuple(given.get(l, Adapter.zeros(0, D, D)) for l in range(L))
    return adapters, E, s, rank_E, dict(notes)


def _chain_checked(*args, **kwargs):
    """:func:`_chain_adapters`, with adapters that overflowed float64 in its solves (``Q_l^{-1} E V_l`` with a
    tiny ``Q_l``) raised as ``FloatingPointError`` (a :class:`~lora_theory.errors.NumericalError` at the public
    function) rather than as an invalid argument ``A`` or ``B`` the caller never passed."""
    try:
        return _chain_adapters(*args, **kwargs)
    except InvalidArgumentError as exc:
        if exc.argument in ("A", "B"):
            raise FloatingPointError(f"the adapter factors overflowed float64 in Lemma 1's solves ({exc})") from None
        raise


def lora_linear(frozen: Chain, target: Target, rank: Rank, *, rank_tol: float | None = None) -> LinearFit:
    """Optimal LoRA adapters for a chain of frozen matrices toward a target (Zeng & Lee 2024, Lemma 1).

    Parameters
    ----------
    frozen : sequence of L arrays, shape (D, D), or FNN
        ``W_1 .. W_L``, ``W_1`` applied first; or the linear bias-free model :func:`random_linear` returns
        (its weights).
    target : array (D, D), or FNN
        ``T``; or a linear bias-free model, which stands for its matrix ``W_L ... W_1``.
    rank : int in 0..D, or sequence of L such ints
        The LoRA-rank ``R`` of every layer, or per-layer ranks ``R_l``.
    rank_tol : float, optional
        Singular values of ``E`` at or below this are treated as zero (default: see
        :func:`discrepancy_rank`). Finite and ``>= 0``.

    Returns
    -------
    LinearFit
        Adapters with ``Π(W_l + Δ_l) = Π W_l + LR_k(E)``, ``k = min(Σ R_l, rank E)``.

    Raises
    ------
    InvalidArgumentError
        Mismatched or non-square shapes, NaN/inf, a rank outside ``0..D`` or per-layer ranks of the wrong count;
        ``rank_tol`` NaN, infinite or negative; a model with ReLU activations or nonzero biases.
    SingularMatrixError
        Every assignment of the blocks of singular directions to the layers meets a singular matrix it
        must invert (``Q_l`` or ``P_l``); names the one the fixed order meets and gives ``κ``. The fixed
        order (layer 1 the largest singular values) is used whenever it works; otherwise the first
        assignment that works (:func:`_search_assignment`; exhaustive for ``L <= 9``), so
        ``adapters[l]`` may hold smaller singular values than ``adapters[l + 1]``.

    Warns
    -----
    IllConditionedWarning
        When ``u·(κ + γ)`` exceeds 1e-8 (``γ``: :attr:`LinearFit.gamma`).
    """
    frozen = as_chain(frozen)
    D = frozen[0].shape[0]
    target = as_target(target, "target", D)
    ranks = as_ranks(rank, len(frozen), D)
    check_norm_finite(target - product(frozen), "E = T - Π W")
    adapters, E, s, rank_E, kappas = _chain_checked(frozen, target, ranks, rank_tol=rank_tol)  # checks rank_tol
    k = sum(ranks)
    spectral, frob = _tail(s, k)
    model = FNN([W + a.delta for W, a in zip(frozen, adapters)], activation="linear")
    kappa = max(kappas.values(), default=1.0)
    gamma = _chain_gamma(frozen, model.weights, target)
    if kappas:
        warn_if_ill_conditioned(kappa, gamma, what="linear construction (Lemma 1)")
    # check the claim on what float64 built: the adapted product against the target, relative to the scale
    # the tolerance is relative to; the amplification carries it to the target's own size
    scale = _rank_scale(frozen, target)
    miss = float(np.linalg.norm(product(model.weights) - target, 2))
    measured = miss / scale if scale > 0 else miss
    norm_T = float(np.linalg.norm(target, 2))
    amplification = scale / norm_T if norm_T > 0 else 1.0
    exact = verified_exact(
        k >= rank_E, measured, tolerance(kappa, gamma), amplification, what="linear construction (Lemma 1)"
    )
    return LinearFit(
        adapters=adapters,
        ranks=ranks,
        model=model,
        frozen=frozen,
        target=target,
        discrepancy=E,
        singular_values=s,
        error_rank=rank_E,
        spectral_error=spectral,
        frobenius_error=frob,
        gaussian_mse=frob**2 / D,
        exact=exact,
        condition_numbers=kappas,
        rank_sufficient=k >= rank_E,
        measured_error=measured,
    )


lora_linear = numeric_guard(lora_linear)


@dataclass(frozen=True)
class OptimalityGap:
    """How far some adapters are from the optimum of Lemma 1.

    ``ratio = achieved / optimal`` in the chosen norm (``>= 1`` up to rounding for every admissible
    adapter: the lower bound needs no assumption); ``inf`` when the optimum is 0 and the adapters miss it.
    ``total_rank`` is ``Σ_l adapter.rank``, the ``k`` the optimum is computed for.
    """

    achieved_spectral: float
    optimal_spectral: float
    achieved_frobenius: float
    optimal_frobenius: float
    achieved_gaussian_mse: float
    optimal_gaussian_mse: float
    total_rank: int

    @property
    def spectral_ratio(self) -> float:
        return _ratio(self.achieved_spectral, self.optimal_spectral)

    @property
    def frobenius_ratio(self) -> float:
        return _ratio(self.achieved_frobenius, self.optimal_frobenius)

    @property
    def spectral_excess(self) -> float:
        """``achieved - optimal`` in the 2-norm: meaningful where the ratio is not (an optimum of 0)."""
        return self.achieved_spectral - self.optimal_spectral


def _ratio(a, b):
    if b > 0:
        return a / b
    return 1.0 if a == 0 else float("inf")


def optimality_gap(frozen: Chain, target: Target, adapters: Sequence) -> OptimalityGap:
    """Score any adapters (trained, or the user's own) against the optimum of Lemma 1.

    Parameters
    ----------
    frozen : sequence of L arrays (D, D), or a linear bias-free FNN (its weights)
    target : array (D, D), or a linear bias-free FNN (its matrix)
    adapters : sequence of L :class:`Adapter` or ``(A, B)`` pairs, or ``(D, D)`` update matrices
        For update matrices the rank budget is their numeric rank.

    The optimum uses ``k = Σ_l r_l`` with ``r_l`` each adapter's rank; the Gaussian MSE of the adapters is
    ``||Π(W + Δ) - T||_F^2 / D`` (exact for ``x ~ N(0, I)``).
    """

    frozen = as_chain(frozen)
    D = frozen[0].shape[0]
    target = as_target(target, "target", D)
    if isinstance(adapters, (str, bytes, Adapter)) or not isinstance(adapters, (Sequence, np.ndarray)):
        raise InvalidArgumentError(
            "adapters", f"must be a sequence with one adapter per frozen layer, got {type(adapters).__name__}"
        )
    if len(adapters) != len(frozen):
        raise InvalidArgumentError(
            "adapters", f"must give one adapter per frozen layer ({len(frozen)}), got {len(adapters)}"
        )
    deltas, ranks = [], []
    for i, a in enumerate(adapters):
        if isinstance(a, Adapter):
            ad = a
        elif isinstance(a, tuple) and len(a) == 2:
            ad = Adapter(*a)
        else:
            ad = None
            delta = as_square(a, f"adapters[{i}]", D)
            deltas.append(delta)
            ranks.append(numeric_rank(delta))
        if ad is not None:
            if ad.in_features != D or ad.out_features != D:
                raise InvalidArgumentError(f"adapters[{i}]", f"must act on {D} x {D} layers, got {ad}")
            deltas.append(ad.delta)
            ranks.append(ad.rank)
    k = sum(ranks)
    residual = product([W + d for W, d in zip(frozen, deltas)]) - target
    s = svd_values(target - product(frozen))
    spectral, frob = _tail(s, k)
    achieved_f = float(np.linalg.norm(residual, "fro"))
    return OptimalityGap(
        achieved_spectral=float(np.linalg.norm(residual, 2)),
        optimal_spectral=spectral,
        achieved_frobenius=achieved_f,
        optimal_frobenius=frob,
        achieved_gaussian_mse=achieved_f**2 / D,
        optimal_gaussian_mse=frob**2 / D,
        total_rank=k,
    )


optimality_gap = numeric_guard(optimality_gap)
