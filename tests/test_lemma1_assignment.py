"""Lemma 1's construction searches which layer receives which block of singular directions.

The lower bound ``σ_{k+1}(E)`` needs no assumption; the construction attains it as soon as *some*
assignment of the blocks of directions to the layers needs no singular ``Q_l`` or ``P_l``. The fixed order
(layer ``l`` takes block ``l``) is only one of them. The references here are literal transcriptions that
try every assignment (permutations of the blocks), one in float64 with the SVD blocks of
:func:`lora_theory.lora_linear`, one in exact rationals with the rank-decomposition blocks of
:func:`lora_theory.certify_linear`.
"""

import itertools

import numpy as np
import pytest
import sympy
from hypothesis import example, given
from hypothesis import strategies as st

from lora_theory import certify_linear, lora_linear
from lora_theory.errors import SingularMatrixError
from lora_theory.highprec import lora_linear_mp
from lora_theory.linear import MAX_ASSIGNMENT_STEPS, _direction_blocks, _search_assignment, product
from lora_theory.numerics import check_invertible, tolerance
from lora_theory.symbolic import EXACT, NOT_MET

# the instance of THEORY.md §2.1: W_1 = diag(0, 1), W_2 = I, T = diag(1, -2), R = 1
W1, W2, T = np.diag([0.0, 1.0]), np.eye(2), np.diag([1.0, -2.0])


def test_lemma1_singular_first_direction_goes_to_the_second_layer():
    """E = diag(1, -3): its first direction e_2 would make W_1 + Δ_1 = diag(0, -2) singular; layer 1
    takes e_1 instead (W_1 + Δ_1 = I) and the rank-1 adapters are exact."""
    fit = lora_linear([W1, W2], T, 1)
    assert fit.exact and fit.ranks_used == (1, 1)
    np.testing.assert_allclose(fit.product, T, rtol=0, atol=tolerance(fit.kappa, fit.gamma) * 2)
    assert fit.achieved_error() <= tolerance(fit.kappa, fit.gamma) * 2
    assert all(np.linalg.matrix_rank(a.delta) <= 1 for a in fit.adapters)
    np.testing.assert_allclose(fit.weights[0], np.eye(2), atol=1e-15)  # layer 1 received e_1


def test_lemma1_assignment_agrees_in_three_arithmetics():
    cert = certify_linear([W1, W2], T, 1)
    assert cert.outcome == EXACT and cert.passed
    assert [sympy.Matrix(M) for M in cert.adapted][-1] * sympy.Matrix(cert.adapted[0]) == sympy.Matrix(
        [[1, 0], [0, -2]]
    )
    mp_fit = lora_linear_mp([W1, W2], T, 1, digits=30)
    assert mp_fit.exact and float(mp_fit.achieved_error) == 0.0
    # the exact chain's fixed order fails on the mirror instance, whose rank decomposition puts e_1 first
    cert = certify_linear([np.diag([1.0, 0.0]), W2], np.diag([-2.0, 1.0]), 1)
    assert cert.outcome == EXACT and cert.passed


def test_lemma1_raises_only_when_no_assignment_works():
    # W_1 = 0: W_1 + Δ_1 has rank <= R = 1 < 2 whichever block it takes
    target = np.array([[1.0, 2.0], [3.0, 5.0]])
    with pytest.raises(SingularMatrixError, match=r"^P_2 = \(W_1 \+ Δ\) .*no assignment of the 2 blocks"):
        lora_linear([np.zeros((2, 2)), W2], target, 1)
    with pytest.raises(SingularMatrixError, match=r"no assignment of the 2 blocks"):
        lora_linear_mp([np.zeros((2, 2)), W2], target, 1, digits=30)
    cert = certify_linear([sympy.zeros(2, 2), sympy.eye(2)], sympy.Matrix(target.astype(int)), 1)
    assert cert.outcome == NOT_MET and "no assignment of the 2 blocks" in cert.reason


def test_assignment_search_is_exhaustive_within_its_step_budget():
    """The search visits each (layer, set of blocks used) once: with only the full reverse order feasible
    it still finds it, in at most L·2^(L-1) steps, and the budget covers L <= 9."""
    for L in range(1, 8):
        blocks = _direction_blocks((1,) * L, L)
        wanted = tuple(reversed(range(L)))
        calls = []

        def step(l, b, state, wanted=wanted, calls=calls):
            calls.append((l, b))
            if b != wanted[l]:
                raise SingularMatrixError("P", np.inf)
            return state + (b,)

        assignment, _ = _search_assignment(blocks, (1,) * L, step, (), SingularMatrixError)
        assert assignment == wanted
        assert len(calls) <= L * 2 ** (L - 1)
    assert 9 * 2**8 <= MAX_ASSIGNMENT_STEPS


# ------------------------------------------------------------------------- property: literal brute force


def _float_brute_force(frozen, target, ranks):
    """Every assignment of the SVD blocks to layers, built literally with inverses; the first that works."""
    L, D = len(frozen), target.shape[0]
    E = target - product(frozen)
    U, s, Vt = np.linalg.svd(E)
    rank_E = int(
        np.sum(s > D * np.finfo(float).eps * max(np.linalg.norm(target, 2), np.linalg.norm(product(frozen), 2), s[0]))
    )
    blocks = _direction_blocks(ranks, rank_E)
    for perm in itertools.permutations(range(L)):
        if any(blocks[b][1] - blocks[b][0] > ranks[l] for l, b in enumerate(perm)):
            continue
        try:
            P = np.eye(D)
            for l, b in enumerate(perm):
                start, stop = blocks[b]
                M = frozen[l]
                if stop > start:
                    Q = product(frozen[l + 1 :]) if l < L - 1 else np.eye(D)
                    check_invertible(Q, "Q")
                    check_invertible(P, "P")
                    V = Vt[start:stop].T
                    M = M + np.linalg.inv(Q) @ E @ V @ V.T @ np.linalg.inv(P)
                P = M @ P
            return perm
        except SingularMatrixError:
            continue
    return None


@st.composite
def singular_chains(draw):
    """Chains of 2..3 layers of width 2..4 whose layers are often singular (rank 0..D)."""
    D = draw(st.integers(2, 4), label="D")
    L = draw(st.integers(2, 3), label="L")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    frozen = []
    for _ in range(L):
        r = draw(st.integers(0, D), label="rank(W_l)")
        frozen.append(rng.integers(-2, 3, (D, r)) @ rng.integers(-2, 3, (r, D)) * 1.0)
    target = rng.integers(-3, 4, (D, D)) * 1.0
    ranks = tuple(draw(st.lists(st.integers(0, D), min_size=L, max_size=L), label="ranks"))
    return frozen, target, ranks


@given(singular_chains())
@example(([W1, W2], T, (1, 1)))
def test_lemma1_succeeds_and_is_optimal_whenever_some_assignment_works(instance):
    frozen, target, ranks = instance
    works = _float_brute_force(frozen, target, ranks)
    if works is None:
        with pytest.raises(SingularMatrixError):
            lora_linear(frozen, target, ranks)
        return
    fit = lora_linear(frozen, target, ranks)
    s = fit.singular_values
    k = sum(ranks)
    optimum = s[k] if k < s.size and k < fit.error_rank else 0.0
    scale = max(np.linalg.norm(target, 2), np.linalg.norm(product(frozen), 2))
    assert abs(fit.achieved_error() - optimum) <= tolerance(fit.kappa, fit.gamma) * scale
    assert all(a.rank <= R for a, R in zip(fit.adapters, ranks))
    if fit.exact:  # at or above the threshold: T itself
        assert fit.achieved_error() <= tolerance(fit.kappa, fit.gamma) * scale


def _exact_brute_force(frozen, target, ranks):
    """Every assignment of the rank-decomposition blocks (pivot columns of E, rows of its RREF)."""
    L, D = len(frozen), target.shape[0]
    Wp = sympy.eye(D)
    for W in frozen:
        Wp = W * Wp
    E = target - Wp
    R_, pivots = E.rref()
    C, F = E[:, list(pivots)], R_[: len(pivots), :]
    blocks = _direction_blocks(ranks, len(pivots))
    for perm in itertools.permutations(range(L)):
        if any(blocks[b][1] - blocks[b][0] > ranks[l] for l, b in enumerate(perm)):
            continue
        P, ok = sympy.eye(D), True
        for l, b in enumerate(perm):
            start, stop = blocks[b]
            M = frozen[l]
            if stop > start:
                Q = sympy.eye(D)
                for W in frozen[l + 1 :]:
                    Q = W * Q
                if Q.det() == 0 or P.det() == 0:
                    ok = False
                    break
                M = M + Q.inv() * C[:, start:stop] * F[start:stop, :] * P.inv()
            P = M * P
        if ok:
            assert P == target  # the transcription itself is right
            return perm
    return None


@given(singular_chains())
@example(([np.diag([1.0, 0.0]), W2], np.diag([-2.0, 1.0]), (1, 1)))
def test_exact_lemma1_certifies_whenever_some_assignment_works(instance):
    frozen, target, ranks = instance
    Ws = [sympy.Matrix(W.astype(int)) for W in frozen]
    Ts = sympy.Matrix(target.astype(int))
    Wp = sympy.eye(Ts.shape[0])
    for W in Ws:
        Wp = W * Wp
    if (Ts - Wp).rank() > sum(ranks):
        return  # "impossible": not this property
    works = _exact_brute_force(Ws, Ts, ranks)
    cert = certify_linear(Ws, Ts, ranks)
    if works is None:
        assert cert.outcome == NOT_MET and "is singular" in cert.reason
    else:
        assert cert.outcome == EXACT and cert.passed


def test_assignment_search_that_runs_out_of_steps_says_one_may_exist(monkeypatch):
    """A search cut short must not claim that no assignment works."""
    import lora_theory.linear as linear

    monkeypatch.setattr(linear, "MAX_ASSIGNMENT_STEPS", 1)  # the fixed order's first step only
    with pytest.raises(SingularMatrixError, match=r"stopped after 1 steps .*\(one may exist\)"):
        lora_linear([W1, W2], T, 1)


def test_the_step_budget_counts_layer_steps(monkeypatch):
    """The budget counts layer steps: the instance above takes 4 (layer 1 with block 1, layer 2 with
    block 2, which fails; layer 1 with block 2, layer 2 with block 1, which works). A budget of 4 finds it;
    a budget of 3 stops before the fourth step and says that an assignment may exist."""
    import lora_theory.linear as linear

    monkeypatch.setattr(linear, "MAX_ASSIGNMENT_STEPS", 4)
    assert lora_linear([W1, W2], T, 1).exact
    monkeypatch.setattr(linear, "MAX_ASSIGNMENT_STEPS", 3)
    with pytest.raises(SingularMatrixError, match=r"stopped after 3 steps .*\(one may exist\)"):
        lora_linear([W1, W2], T, 1)


@pytest.mark.parametrize("L", [3, 4, 5])
@pytest.mark.parametrize("empty", [0, 1, 2])
def test_a_failing_search_tries_each_layer_and_set_of_blocks_once(L, empty):
    """Whether the rest of a chain can be built depends only on the layer and the *set* of non-empty blocks
    used before it, and empty blocks are interchangeable: so a search where every order fails at the last
    layer tries each (layer, set of non-empty blocks used before it, non-empty block) at most once, and at
    most one empty block per (layer, set). That is what keeps it within L·2^(L-1) steps."""
    rank_E = L - empty
    blocks = _direction_blocks((1,) * L, rank_E)
    nonempty = {b for b, (start, stop) in enumerate(blocks) if stop > start}
    assert len(nonempty) == rank_E
    calls = []

    def step(l, b, path):
        used = frozenset(x for x in path if x in nonempty)
        calls.append((l, used, b if b in nonempty else "empty"))
        if l == L - 1:
            raise SingularMatrixError("P", np.inf)
        return path + (b,)

    with pytest.raises(SingularMatrixError):
        _search_assignment(blocks, (1,) * L, step, (), SingularMatrixError)
    assert len(calls) == len(set(calls))
    assert len(calls) <= L * 2 ** (L - 1)
