"""Per-layer LoRA ranks under a parameter budget: the exact minimiser of the discarded spectral energy.

Given the singular values ``σ_{l,1} >= σ_{l,2} >= ...`` of each layer's change ``ΔW_l`` (shape ``m_l x n_l``),
a rank-``r_l`` adapter on layer ``l`` costs ``r_l (m_l + n_l)`` parameters and, at best (Eckart–Young; Zeng &
Lee 2024, Lemma 1 with ``L = 1``), leaves ``Σ_{k > r_l} σ_{l,k}^2`` of the change's squared Frobenius norm
undone. :func:`allocate_ranks` chooses the ranks minimising the total left undone under a budget
(THEORY.md §6; the allocation problem and its solution are the project's, not the paper's).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._types import ArrayLike
from .advisor import _spectrum
from .errors import InvalidArgumentError, LoraTheoryError

__all__ = ["RankAllocation", "allocate_ranks", "uniform_ranks", "MAX_FRONTIER", "MAX_CANDIDATES"]

#: The largest Pareto frontier the exact search keeps (states); beyond it the search stops with an error.
MAX_FRONTIER = 2_000_000


@dataclass(frozen=True)
class RankAllocation:
    """Per-layer ranks and what they cost and leave undone.

    Attributes
    ----------
    ranks : tuple of int
        ``r_l``, in the order of the spectra given.
    parameters : int
        ``Σ_l r_l (m_l + n_l)``.
    budget : int or None
        The budget it was chosen under (``None`` when chosen for an error target).
    discarded_energy : float
        ``Σ_l Σ_{k > r_l} σ_{l,k}^2``: the squared Frobenius norm of the changes the adapters leave undone.
    total_energy : float
        ``Σ_l Σ_k σ_{l,k}^2``.
    relative_error : float
        ``sqrt(discarded_energy / total_energy)`` (0 when the total is 0): the relative Frobenius error of
        all layers' changes together.
    method : str
        ``"optimal"`` (:func:`allocate_ranks`) or ``"uniform"`` (:func:`uniform_ranks`).
    """

    ranks: tuple
    parameters: int
    budget: int | None
    discarded_energy: float
    total_energy: float
    relative_error: float
    method: str

    def to_dict(self) -> dict:
        """A JSON-ready record."""
        return {
            "ranks": list(self.ranks),
            "parameters": self.parameters,
            "budget": self.budget,
            "discarded_energy": self.discarded_energy,
            "total_energy": self.total_energy,
            "relative_error": self.relative_error,
            "method": self.method,
        }


def _problem(spectra, shapes):
    """Validated ``(energies, costs, shift)``: per layer the squared singular values (non-increasing) of the
    spectra scaled by ``2^-shift`` (one power of two for all layers, so the largest singular value lies in
    ``[0.5, 1)``: no square underflows to 0 unless it is below ``2^-1074`` of the largest, none overflows),
    and ``m + n``."""
    if isinstance(spectra, (str, bytes)) or not isinstance(spectra, (Sequence, np.ndarray)):
        raise InvalidArgumentError(
            "spectra", f"must be a sequence of singular-value vectors, got {type(spectra).__name__}"
        )
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, (Sequence, np.ndarray)):
        raise InvalidArgumentError("shapes", f"must be a sequence of (out, in) shapes, got {type(shapes).__name__}")
    if len(spectra) != len(shapes):
        raise InvalidArgumentError("shapes", f"must have one shape per spectrum: {len(shapes)} for {len(spectra)}")
    if len(spectra) == 0:
        raise InvalidArgumentError("spectra", "holds no layers")

    values, costs = [], []
    for l, (s, shape) in enumerate(zip(spectra, shapes)):
        s = _spectrum(s, f"spectra[{l}]")
        if (
            not isinstance(shape, (Sequence, np.ndarray))
            or len(shape) != 2
            or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in shape)
        ):
            raise InvalidArgumentError(f"shapes[{l}]", f"must be (out, in) with positive integers, got {shape!r}")
        if s.size > min(int(shape[0]), int(shape[1])):
            raise InvalidArgumentError(
                f"spectra[{l}]", f"has {s.size} singular values, more than min(out, in) = {min(shape)}"
            )
        values.append(s)
        costs.append(int(shape[0]) + int(shape[1]))
    top = max((float(s[0]) for s in values if s.size), default=0.0)
    shift = math.frexp(top)[1] if top > 0 else 0
    energies = [np.ldexp(s, -shift) ** 2 for s in values]
    if not math.isfinite(_unscaled(sum(float(np.sum(e)) for e in energies), shift)):
        raise InvalidArgumentError("spectra", "the total squared singular values overflow float64: rescale the spectra")
    return energies, costs, shift


def _unscaled(energy: float, shift: int) -> float:
    """An energy of the scaled spectra in the units of the given ones (``2^(2 shift)`` times; may overflow)."""
    try:
        return math.ldexp(energy, 2 * shift)
    except OverflowError:
        return math.inf


def _result(ranks, energies, costs, budget, method, shift) -> RankAllocation:
    total = float(sum(float(np.sum(e)) for e in energies))
    discarded = float(sum(float(np.sum(e[r:])) for e, r in zip(energies, ranks)))
    return RankAllocation(
        ranks=tuple(int(r) for r in ranks),
        parameters=int(sum(r * c for r, c in zip(ranks, costs))),
        budget=None if budget is None else int(budget),
        discarded_energy=_unscaled(discarded, shift),
        total_energy=_unscaled(total, shift),
        relative_error=math.sqrt(discarded / total) if total > 0 else 0.0,
        method=method,
    )


def _budget(value, name="budget") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidArgumentError(name, f"must be an integer number of parameters >= 0, got {value!r}")
    return int(value)


def _optimal_ranks(energies, costs, budget: int) -> list[int]:
    """The exact maximiser of ``Σ_l Σ_{k <= r_l} e_{l,k}`` subject to ``Σ_l r_l c_l <= budget``.

    Items ``(l, k)`` (gain ``e_{l,k}``, cost ``c_l``); a rank choice is a per-layer prefix of items.
    1. Greedy by gain per parameter (prefix-closed: within a layer gains do not increase) gives a feasible
       value ``V`` and the critical ratio ``λ`` (the first item that does not fit).
    2. Lagrangian bound: ``U = λ·budget + Σ_i max(0, e_i - λ c_i)`` bounds every feasible value.
    3. Reduced-cost fixing: an item with ``e_i - λ c_i > U - V`` is in every optimal solution, one with
       ``λ c_i - e_i > U - V`` in none (dropping / adding it bounds the value below ``V``).
    4. The remaining core is solved exactly by dynamic programming over layers on the Pareto frontier of
       (cost, gain) pairs within the residual budget; the last layer takes the most ranks that fit.
    """
    L = len(energies)
    scale = max((float(e[0]) for e in energies if e.size), default=0.0)
    if scale == 0.0 or budget == 0:
        return [0] * L
    gains = [e / scale for e in energies]  # in units of the largest σ^2
    # ---- 1. greedy by ratio, prefix-closed
    items = [(-(g[k] / costs[l]), l, k) for l, g in enumerate(gains) for k in range(g.size)]
    items.sort()
    taken = [0] * L
    blocked = [False] * L
    left = budget
    value = 0.0
    lam = None
    for neg_ratio, l, k in items:
        if blocked[l]:
            continue
        if costs[l] <= left:
            taken[l] += 1
            left -= costs[l]
            value += gains[l][k]
        else:
            if lam is None:
                lam = -neg_ratio  # critical ratio
            blocked[l] = True
    if lam is None:  # everything fits
        return taken
    # ---- 2. Lagrangian upper bound, 3. reduced-cost fixing
    reduced = [g - lam * c for g, c in zip(gains, costs)]  # per layer, non-increasing in k
    upper = lam * budget + sum(float(np.sum(np.maximum(r, 0.0))) for r in reduced)
    total = float(sum(float(np.sum(g)) for g in gains))
    gap = max(upper - value, 0.0) + 1e-9 * total + 1e-300  # slack for rounding: fixes fewer items
    fixed_in = [int(np.count_nonzero(r > gap)) for r in reduced]
    fixed_out_from = [int(np.count_nonzero(r >= -gap)) for r in reduced]  # ranks k >= this index are out
    residual = budget - sum(f * c for f, c in zip(fixed_in, costs))
    if residual < 0:  # cannot happen (a fixed-in set that
        raise LoraTheoryError("rank allocation: reduced-cost fixing exceeded the budget")  # overflows is infeasible)
    # ---- 4. Pareto DP over the core, the widest core last: the last layer needs no frontier, its best
    #         choice after any frontier state is the most ranks that fit (its gains are >= 0)
    cores = [gains[l][fixed_in[l] : fixed_out_from[l]] for l in range(L)]
    order = sorted(range(L), key=lambda l: cores[l].size)
    cost_f = np.zeros(1, dtype=np.int64)  # frontier costs, increasing
    gain_f = np.zeros(1)  # frontier gains, increasing
    choices = []  # per layer: (parent index, j) arrays
    for l in order[:-1]:
        prefix = np.concatenate([[0.0], np.cumsum(cores[l])])  # (n_core + 1,)
        j = np.arange(prefix.size)
        if cost_f.size * j.size > MAX_CANDIDATES:
            raise LoraTheoryError(
                f"rank allocation: the exact search would examine {cost_f.size * j.size} states at one step "
                f"(more than {MAX_CANDIDATES}); allocate over fewer layers or a smaller budget"
            )
        cand_cost = (cost_f[:, None] + j[None, :] * costs[l]).ravel()
        cand_gain = (gain_f[:, None] + prefix[None, :]).ravel()
        cand_parent = np.repeat(np.arange(cost_f.size), j.size)
        cand_j = np.tile(j, cost_f.size)
        ok = cand_cost <= residual
        cand_cost, cand_gain, cand_parent, cand_j = cand_cost[ok], cand_gain[ok], cand_parent[ok], cand_j[ok]
        by_cost = np.lexsort((-cand_gain, cand_cost))  # by cost, then larger gain first
        cand_cost, cand_gain = cand_cost[by_cost], cand_gain[by_cost]
        cand_parent, cand_j = cand_parent[by_cost], cand_j[by_cost]
        best_before = np.maximum.accumulate(np.concatenate([[-np.inf], cand_gain[:-1]]))
        keep = cand_gain > best_before  # strictly better than every cheaper one
        cost_f, gain_f = cand_cost[keep], cand_gain[keep]
        choices.append((l, cand_parent[keep], cand_j[keep]))
        if cost_f.size > MAX_FRONTIER:
            raise LoraTheoryError(
                f"rank allocation: the exact search needs more than {MAX_FRONTIER} states (layer {l}); "
                "allocate over fewer layers or a smaller budget"
            )
    last = order[-1]
    prefix = np.concatenate([[0.0], np.cumsum(cores[last])])
    j_last = np.minimum((residual - cost_f) // costs[last], cores[last].size)  # (frontier,), >= 0
    idx = int(np.argmax(gain_f + prefix[j_last]))  # the largest gain; cheapest on ties
    ranks = list(fixed_in)
    ranks[last] += int(j_last[idx])
    for l, parents, js in reversed(choices):
        ranks[l] += int(js[idx])
        idx = int(parents[idx])
    return ranks


#: The largest number of (frontier state, option) pairs one step of the exact search may examine.
MAX_CANDIDATES = 20_000_000


def _grouped_optimal_ranks(energies, costs, budget: int) -> list[int]:
    """:func:`_optimal_ranks` after merging the layers of equal cost ``c_l`` into one group each.

    Within a group every item costs the same, so the best value of ``j`` ranks spread over the group is the
    sum of its ``j`` largest gains, and those form a prefix in every layer of the group (gains do not increase
    within a layer; ties are taken in layer order): the group is one concave "layer" of the same problem.
    """
    groups = {}
    for l, c in enumerate(costs):
        groups.setdefault(c, []).append(l)
    group_costs = list(groups)
    merged, owners = [], []
    for c in group_costs:
        members = groups[c]
        gains = np.concatenate([energies[l] for l in members]) if members else np.zeros(0)
        owner = np.concatenate([np.full(energies[l].size, l) for l in members]).astype(np.int64)
        position = np.concatenate([np.arange(energies[l].size) for l in members])
        order = np.lexsort((position, owner, -gains))  # largest gain first; ties in layer order
        merged.append(gains[order])
        owners.append(owner[order])
    group_ranks = _optimal_ranks(merged, group_costs, budget)
    ranks = [0] * len(costs)
    for j, owner in zip(group_ranks, owners):
        for l in owner[:j]:
            ranks[int(l)] += 1
    return ranks


def allocate_ranks(
    spectra: Sequence[ArrayLike],
    shapes: Sequence[tuple[int, int]],
    budget: int | None = None,
    error: float | None = None,
) -> RankAllocation:
    """Per-layer ranks minimising the total discarded energy under a parameter budget (THEORY.md §6).

    Minimises ``Σ_l Σ_{k > r_l} σ_{l,k}^2`` subject to ``Σ_l r_l (m_l + n_l) <= budget`` and
    ``0 <= r_l <= len(spectra[l])``; or, with ``error``, the smallest budget whose optimum has
    ``sqrt(discarded / total) <= error``. By Eckart–Young (Zeng & Lee 2024, Lemma 1 with ``L = 1``) the discarded
    energy is the smallest squared Frobenius error rank-``r_l`` adapters can leave on these layers.

    Optimality (proof). Write ``e_{l,k} = σ_{l,k}^2`` and ``c_l = m_l + n_l``. A choice of ranks is a set ``S`` of
    items ``(l, k)``, prefix-closed in each layer (``(l, k) ∈ S`` implies ``(l, k-1) ∈ S``), of value
    ``Σ_S e`` and cost ``Σ_S c``; minimising the discarded energy is maximising the value. (a) For every
    ``λ >= 0`` and every feasible ``S``: ``Σ_S e <= λ·budget + Σ_S (e - λ c) <= U(λ) := λ·budget +
    Σ_{all items} max(0, e - λ c)`` (weak Lagrangian duality). (b) Let ``V`` be the value of a feasible ``S_0``
    (the greedy one by ratio ``e / c``, prefix-closed because ``e_{l,k}`` does not increase in ``k``) and
    ``Δ = U(λ) - V``. An optimal ``S*`` has value ``>= V``; if it left out an item ``i`` with
    ``e_i - λ c_i > Δ``, (a) with that term removed gives ``Σ_{S*} e <= U(λ) - (e_i - λ c_i) < V``, a
    contradiction; if it held an item with ``λ c_i - e_i > Δ``, likewise. So every optimum contains the first
    set ("fixed in") and avoids the second ("fixed out"); within a layer ``e - λ c`` does not increase in ``k``,
    so the fixed-in items are a prefix and the fixed-out ones a suffix, and the rest (the core) is a middle
    run of ranks. (c) The core is solved by dynamic programming over layers that keeps, after each layer,
    every pair (cost, value) reachable within the residual budget that no other pair dominates (no more cost
    and more value); a dominated partial choice can be replaced by its dominator in any completion without
    losing value or feasibility, so the last frontier holds an optimum; the last layer is not put on a frontier:
    its gains are ``>= 0``, so after any state the most of its ranks that fit is best. (d) Layers of equal cost
    are first merged into one (:func:`_grouped_optimal_ranks`): with equal item costs, the best ``j`` items of a
    group are its ``j`` largest gains, a prefix in each of its layers, so the group is one layer of the same
    problem with the merged, sorted gains. The slack ``1e-9·Σ e`` added to ``Δ``
    only moves items into the core. Greedy alone is *not* optimal when the ``c_l`` differ (budget 10, one layer
    of cost 6 and gain 7, another of cost 5 and gains 5, 5: greedy takes 7, the optimum 10); with equal
    ``c_l`` it is, and the core is then at most one item wide.

    Parameters
    ----------
    spectra : sequence of array (k_l,)
        Singular values of each layer's change, non-increasing (all ``min(m_l, n_l)`` of them, or the ones
        above the noise floor, ``k_l <= min(m_l, n_l)``: ranks are capped at ``k_l``).
    shapes : sequence of (m_l, n_l)
        ``(out, in)`` of each layer.
    budget : int, optional
        Parameters allowed, ``Σ_l r_l (m_l + n_l) <= budget``.
    error : float in [0, 1), optional
        Target relative error ``sqrt(discarded / total)``: the smallest budget reaching it is found (by
        bisection on the exact optimum, which does not decrease with the budget). Exactly one of ``budget``,
        ``error``.

    Returns
    -------
    RankAllocation
        ``method="optimal"``; ``budget`` the one given, or the smallest one reaching ``error``.

    Raises
    ------
    InvalidArgumentError
        Both or neither of ``budget`` / ``error``; a negative or non-integer budget; ``error`` outside
        ``[0, 1)``; spectra that are not finite, non-negative, non-increasing vectors, longer than
        ``min(m_l, n_l)``, or whose squares overflow; shapes that are not pairs of positive integers.
    LoraTheoryError
        The exact search would exceed :data:`MAX_FRONTIER` states or :data:`MAX_CANDIDATES` candidates.

    Notes
    -----
    Its cost on layers shaped like a 7B model's is measured in THEORY.md §5.
    """
    energies, costs, shift = _problem(spectra, shapes)
    if (budget is None) == (error is None):
        raise InvalidArgumentError("budget", "give exactly one of budget= and error=")
    if budget is not None:
        budget = _budget(budget)
        return _result(_grouped_optimal_ranks(energies, costs, budget), energies, costs, budget, "optimal", shift)
    if isinstance(error, bool) or not isinstance(error, numbers.Real) or not 0 <= error < 1:
        raise InvalidArgumentError("error", f"must be a relative error in [0, 1), got {error!r}")
    allowed = float(error)  # compared as relative errors: scale-free

    def reaches(b):
        ranks = _grouped_optimal_ranks(energies, costs, b)
        return _result(ranks, energies, costs, b, "optimal", shift), ranks

    full = sum(e.size * c for e, c in zip(energies, costs))
    best, _ = reaches(full)
    if best.relative_error > allowed:  # rounding only: the full ranks keep all
        allowed = best.relative_error
    lo, hi = -1, full  # invariant: hi reaches, lo does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        alloc, _ = reaches(mid)
        if alloc.relative_error <= allowed:
            hi, best = mid, alloc
        else:
            lo = mid
    return RankAllocation(
        ranks=best.ranks,
        parameters=best.parameters,
        budget=None,
        discarded_energy=best.discarded_energy,
        total_energy=best.total_energy,
        relative_error=best.relative_error,
        method="optimal",
    )


def uniform_ranks(spectra: Sequence[ArrayLike], shapes: Sequence[tuple[int, int]], budget: int) -> RankAllocation:
    """The baseline extraction tools use: one rank ``r`` for every layer (capped at each layer's ``k_l``), the
    largest with ``Σ_l min(r, k_l)(m_l + n_l) <= budget``.

    Same arguments, checks and result as :func:`allocate_ranks` with ``budget`` (``method="uniform"``), for
    comparing the two at equal budget.
    """
    energies, costs, shift = _problem(spectra, shapes)
    budget = _budget(budget)
    top = max(e.size for e in energies)
    r = 0
    while r < top and sum(min(r + 1, e.size) * c for e, c in zip(energies, costs)) <= budget:
        r += 1
    return _result([min(r, e.size) for e in energies], energies, costs, budget, "uniform", shift)
