"""Ranks under a budget: the exact optimum against brute force, the greedy counterexample, the error mode."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_theory import InvalidArgumentError, allocate_ranks, uniform_ranks
from lora_theory.allocation import RankAllocation


def brute_force(spectra, shapes, budget):
    """The literal problem: every rank vector, the smallest discarded energy within the budget."""
    best = None
    for ranks in itertools.product(*[range(len(s) + 1) for s in spectra]):
        cost = sum(r * (m + n) for r, (m, n) in zip(ranks, shapes))
        if cost > budget:
            continue
        discarded = sum(float(np.sum(np.asarray(s[r:]) ** 2)) for s, r in zip(spectra, ranks))
        if best is None or discarded < best[0]:
            best = (discarded, ranks)
    return best


@st.composite
def problems(draw):
    L = draw(st.integers(1, 4))
    shapes, spectra = [], []
    for _ in range(L):
        m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        k = draw(st.integers(0, min(m, n)))
        values = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 7.0]), min_size=k, max_size=k))
        shapes.append((m, n))
        spectra.append(np.sort(np.array(values, dtype=float))[::-1])
    full = sum(len(s) * (m + n) for s, (m, n) in zip(spectra, shapes))
    budget = draw(st.integers(0, full + 3))
    return spectra, shapes, budget


@settings(max_examples=150)
@given(problems())
def test_allocation_is_optimal_against_brute_force(problem):
    spectra, shapes, budget = problem
    alloc = allocate_ranks(spectra, shapes, budget=budget)
    discarded, _ = brute_force(spectra, shapes, budget)
    assert alloc.parameters <= budget
    assert alloc.parameters == sum(r * (m + n) for r, (m, n) in zip(alloc.ranks, shapes))
    assert alloc.discarded_energy == pytest.approx(discarded, rel=1e-12, abs=1e-12)
    recomputed = sum(float(np.sum(s[r:] ** 2)) for s, r in zip(spectra, alloc.ranks))
    assert alloc.discarded_energy == pytest.approx(recomputed, rel=1e-12, abs=1e-15)
    uniform = uniform_ranks(spectra, shapes, budget)
    assert uniform.parameters <= budget and alloc.discarded_energy <= uniform.discarded_energy + 1e-12
    assert len(set(r for r, s in zip(uniform.ranks, spectra) if r < len(s))) <= 1


def test_greedy_by_ratio_is_not_optimal_with_unequal_costs():
    """Budget 10: a layer of cost 6 with gain 7 has the best ratio; two ranks of a cost-5 layer give 10."""
    spectra = [np.sqrt([7.0]), np.sqrt([5.0, 5.0])]
    shapes = [(3, 3), (2, 3)]
    alloc = allocate_ranks(spectra, shapes, budget=10)
    assert alloc.ranks == (0, 2) and alloc.discarded_energy == pytest.approx(7.0)


@settings(max_examples=60)
@given(problems(), st.sampled_from([0.0, 0.05, 0.3, 0.6, 0.95]))
def test_error_target_gives_the_smallest_budget(problem, error):
    spectra, shapes, _ = problem
    alloc = allocate_ranks(spectra, shapes, error=error)
    total = sum(float(np.sum(s**2)) for s in spectra)
    assert alloc.relative_error <= error + 1e-12 and alloc.budget is None
    if alloc.parameters > 0:  # one parameter fewer cannot reach it
        below = brute_force(spectra, shapes, alloc.parameters - 1)[0]
        assert below > error**2 * total * (1 + 1e-12)


def test_larger_instances_agree_with_a_dense_dp():
    """Many layers of mixed shapes: the result equals a plain DP over every budget (costs are small)."""
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(2, 9)), int(rng.integers(2, 9))) for _ in range(12)]
    spectra = [np.sort(rng.exponential(1.0, min(s)))[::-1] for s in shapes]
    budget = 120
    dp = np.full(budget + 1, -np.inf)
    dp[0] = 0.0
    for s, (m, n) in zip(spectra, shapes):
        gains = np.concatenate([[0.0], np.cumsum(s**2)])
        new = np.full(budget + 1, -np.inf)
        for r, g in enumerate(gains):
            c = r * (m + n)
            if c > budget:
                break
            new[c:] = np.maximum(new[c:], dp[: budget + 1 - c] + g)
        dp = new
    total = sum(float(np.sum(s**2)) for s in spectra)
    alloc = allocate_ranks(spectra, shapes, budget=budget)
    assert total - alloc.discarded_energy == pytest.approx(dp.max(), rel=1e-12)


def test_bad_input():
    s, shape = [np.array([2.0, 1.0])], [(2, 2)]
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        allocate_ranks(s, shape)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        allocate_ranks(s, shape, budget=4, error=0.1)
    for budget in (-1, 2.5, True, "8"):
        with pytest.raises(InvalidArgumentError, match="budget"):
            allocate_ranks(s, shape, budget=budget)
    for error in (-0.1, 1.0, math.nan, True):
        with pytest.raises(InvalidArgumentError, match="error"):
            allocate_ranks(s, shape, error=error)
    with pytest.raises(InvalidArgumentError, match="one shape per"):
        allocate_ranks(s, [(2, 2), (2, 2)], budget=4)
    with pytest.raises(InvalidArgumentError, match="more than min"):
        allocate_ranks([np.ones(3)], [(2, 5)], budget=4)
    with pytest.raises(InvalidArgumentError, match="sorted"):
        allocate_ranks([np.array([1.0, 2.0])], shape, budget=4)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        allocate_ranks([np.array([np.nan])], shape, budget=4)
    with pytest.raises(InvalidArgumentError, match="overflow"):
        allocate_ranks([np.array([1e200])], shape, budget=4)
    with pytest.raises(InvalidArgumentError, match="shapes"):
        allocate_ranks(s, [(0, 2)], budget=4)
    with pytest.raises(InvalidArgumentError, match="holds no layers"):
        allocate_ranks([], [], budget=4)
    assert isinstance(allocate_ranks(s, shape, budget=0), RankAllocation)
    assert allocate_ranks(s, shape, budget=0).relative_error == 1.0


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e150])
def test_allocation_does_not_depend_on_the_units_of_the_spectra(scale):
    """Regression: spectra near 1e-160 squared to 0 (and 5.6e-295 to 0/0), so every layer looked unchanged
    and the relative error read 0. The ranks and the relative error are the same in any units."""
    rng = np.random.default_rng(3)
    spectra = [np.sort(rng.uniform(0, 1, k))[::-1] for k in (3, 4, 2)]
    shapes = [(3, 5), (4, 4), (2, 6)]
    for kwargs in ({"budget": 20}, {"error": 0.3}):
        unit = allocate_ranks(spectra, shapes, **kwargs)
        scaled = allocate_ranks([s * scale for s in spectra], shapes, **kwargs)
        assert scaled.ranks == unit.ranks and scaled.parameters == unit.parameters
        assert scaled.relative_error == pytest.approx(unit.relative_error, rel=1e-12) and unit.relative_error > 0
    base = uniform_ranks(spectra, shapes, 20)
    assert uniform_ranks([s * scale for s in spectra], shapes, 20).relative_error == pytest.approx(
        base.relative_error, rel=1e-12
    )
