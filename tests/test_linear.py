"""Lemma 1 (linear models): the construction attains the optimum σ_{k+1}(E), nothing beats it.

Reference scale for absolute quantities (errors of the product, which may be 0 at the optimum):
``scale = max(||T||_2, ||Π W_l||_2)``, the operands ``E = T - Π W_l`` is formed from; a rounding error of
the construction is ``<= tolerance(κ, γ) · scale`` with ``κ`` the largest condition number it solved with
and ``γ`` the size of its largest layer term ``Q_l (W_l + Δ_l) P_l`` relative to that scale
(``LinearFit.gamma``). ``κ`` alone is not enough from 3 layers on: a middle layer solves with both ``Q_l``
and ``P_l``, its ``Δ_l`` grows like ``κ(Q_l) κ(P_l)``, and errors of ``4·10^3 u κ`` were measured.
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_theory.adapter import Adapter
from lora_theory.errors import IllConditionedWarning, SingularMatrixError
from lora_theory.linear import (
    discrepancy,
    discrepancy_rank,
    linear_gaussian_mse,
    linear_optimal_error,
    linear_rank_requirement,
    lora_linear,
    optimality_gap,
    product,
)
from lora_theory.models import random_linear
from lora_theory.numerics import numeric_rank, relative_error, tolerance

SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def instances(draw, low_rank=None, per_layer=None):
    """``(frozen, target, ranks, rank_E or None, rng)``: D in 2..16, L in 1..4, every rank 0..D.

    ``low_rank=True`` draws ``T = Π W + C F`` with ``rank(C F) = r`` known (0..D); ``False`` a generic
    target (``rank E = D``); ``None`` either. Ranks: one int for every layer or per-layer ints.
    """
    D = draw(st.integers(2, 16), label="D")
    L = draw(st.integers(1, 4), label="L")
    rng = np.random.default_rng(draw(SEEDS, label="seed"))
    frozen = random_linear(D, L, seed=rng).weights
    if low_rank is None:
        low_rank = draw(st.booleans(), label="low_rank")
    if low_rank:
        r = draw(st.integers(0, D), label="rank_E")
        C = rng.standard_normal((D, r))
        F = rng.standard_normal((r, D))
        target = product(frozen) + C @ F / math.sqrt(D)  # rank(E) = r with probability 1
    else:
        r = None
        target = rng.uniform(-1, 1, (D, D))
    if per_layer is None:
        per_layer = draw(st.booleans(), label="per_layer")
    if per_layer:
        ranks = tuple(draw(st.lists(st.integers(0, D), min_size=L, max_size=L), label="ranks"))
    else:
        ranks = (draw(st.integers(0, D), label="rank"),) * L
    return frozen, target, ranks, r, rng


def _fit(frozen, target, ranks):
    # one rank for every layer is passed as an int, per-layer ranks as a tuple: both entry points
    rank = ranks[0] if len(set(ranks)) == 1 else ranks
    with warnings.catch_warnings():
        # random products are sometimes ill-conditioned; the tolerance scales with the κ the fit reports
        warnings.simplefilter("ignore", IllConditionedWarning)
        return lora_linear(frozen, target, rank)


def _scale(frozen, target):
    return max(np.linalg.norm(target, 2), np.linalg.norm(product(frozen), 2))


def _tail(s, k):
    return (s[k] if k < s.size else 0.0), math.sqrt(float(np.sum(s[k:] ** 2)))


@given(instances())
def test_construction_attains_the_optimum(instance):
    frozen, target, ranks, _, _ = instance
    fit = _fit(frozen, target, ranks)
    k = sum(ranks)
    s = np.linalg.svd(target - product(frozen), compute_uv=False)  # σ(E), computed independently
    spectral, frobenius = _tail(s, k)
    assert fit.spectral_error == pytest.approx(spectral, rel=1e-12, abs=0)
    assert fit.frobenius_error == pytest.approx(frobenius, rel=1e-12, abs=0)
    assert fit.gaussian_mse == pytest.approx(frobenius**2 / len(s), rel=1e-12, abs=0)
    assert linear_optimal_error(frozen, target, ranks) == pytest.approx(spectral, rel=1e-12, abs=0)
    assert linear_optimal_error(frozen, target, ranks, norm="fro") == pytest.approx(frobenius, rel=1e-12, abs=0)
    assert linear_gaussian_mse(frozen, target, ranks) == pytest.approx(fit.gaussian_mse, rel=1e-12, abs=0)
    bound = tolerance(fit.kappa, fit.gamma) * _scale(frozen, target)
    assert abs(fit.achieved_error("spectral") - spectral) <= bound
    assert abs(fit.achieved_error("fro") - frobenius) <= bound * math.sqrt(len(s))
    # the realised product is Π W + LR_k(E) (Lemma 1), not just some product at that distance
    U, S, Vt = np.linalg.svd(fit.discrepancy)
    kk = min(k, fit.error_rank)
    best = product(frozen) + (U[:, :kk] * S[:kk]) @ Vt[:kk]
    assert np.linalg.norm(fit.product - best, 2) <= bound


@given(instances())
def test_no_adapter_exceeds_its_budget(instance):
    frozen, target, ranks, _, _ = instance
    fit = _fit(frozen, target, ranks)
    assert fit.ranks == ranks and len(fit.adapters) == len(frozen)
    D = target.shape[0]
    for adapter, budget, W, M in zip(fit.adapters, ranks, frozen, fit.weights):
        assert adapter.A.shape[0] <= budget and adapter.B.shape[1] == adapter.A.shape[0]
        assert adapter.A.shape[1] == D and adapter.B.shape[0] == D
        assert numeric_rank(adapter.delta) <= budget
        np.testing.assert_array_equal(M, W + adapter.delta)
    assert fit.ranks_used == tuple(a.rank for a in fit.adapters)
    assert sum(fit.ranks_used) == min(sum(ranks), fit.error_rank)


@given(instances(low_rank=True))
def test_exact_iff_total_rank_covers_rank_of_E(instance):
    frozen, target, ranks, r, _ = instance
    fit = _fit(frozen, target, ranks)
    L = len(frozen)
    assert fit.error_rank == r == discrepancy_rank(frozen, target)
    assert linear_rank_requirement(frozen, target) == -(-r // L)
    assert fit.exact == (sum(ranks) >= r)
    err = fit.achieved_error("spectral")
    bound = tolerance(fit.kappa, fit.gamma) * _scale(frozen, target)
    if fit.exact:
        assert err <= bound
    else:
        # one direction short leaves σ_{k+1}(E) > 0, far above rounding
        assert err >= fit.singular_values[sum(ranks)] - bound
        assert fit.singular_values[sum(ranks)] > 1e3 * bound


@given(instances(), st.sampled_from(["random", "perturbed"]), st.floats(1e-6, 1.0))
def test_no_adapter_beats_the_lower_bound(instance, kind, size):
    # Lemma 1's lower bound needs no assumption: Π(W + Δ) - Π W has rank <= Σ R_l, so Eckart–Young
    # bounds the error below by σ_{k+1}(E) (spectral) and the tail sqrt(Σ_{j>k} σ_j^2) (Frobenius).
    frozen, target, ranks, _, rng = instance
    D = target.shape[0]
    if kind == "random":
        adapters = [Adapter(rng.standard_normal((r, D)), size * rng.standard_normal((D, r))) for r in ranks]
    else:
        fit = _fit(frozen, target, ranks)
        adapters = []
        for adapter, r in zip(fit.adapters, ranks):
            adapter = adapter.padded(r)
            adapters.append(
                Adapter(
                    adapter.A + size * rng.standard_normal(adapter.A.shape),
                    adapter.B + size * rng.standard_normal(adapter.B.shape),
                )
            )
    residual = product([W + a.delta for W, a in zip(frozen, adapters)]) - target
    s = np.linalg.svd(target - product(frozen), compute_uv=False)
    spectral, frobenius = _tail(s, sum(ranks))
    # the residual is computed in floating point: it may undercut the bound by rounding of its operands
    rounding = (
        1e3
        * np.finfo(float).eps
        * max(_scale(frozen, target), np.prod([np.linalg.norm(W + a.delta, 2) for W, a in zip(frozen, adapters)]))
    )
    assert np.linalg.norm(residual, 2) >= spectral - rounding
    assert np.linalg.norm(residual, "fro") >= frobenius - rounding * math.sqrt(D)
    gap = optimality_gap(frozen, target, adapters)
    assert gap.total_rank == sum(ranks)
    assert gap.optimal_spectral == pytest.approx(spectral, rel=1e-12, abs=0)
    if spectral > rounding:
        assert gap.spectral_ratio >= 1 - rounding / spectral
    if frobenius > rounding:
        assert gap.frobenius_ratio >= 1 - rounding * math.sqrt(D) / frobenius


@given(instances(low_rank=False))
def test_optimality_gap_of_the_construction_is_one(instance):
    frozen, target, ranks, _, _ = instance
    fit = _fit(frozen, target, ranks)
    gap = optimality_gap(frozen, target, fit.adapters)
    # the construction uses exactly k = min(Σ R_l, D) directions (generic E has rank D)
    assert gap.total_rank == min(sum(ranks), target.shape[0])
    bound = tolerance(fit.kappa, fit.gamma) * _scale(frozen, target)
    assert gap.achieved_spectral == pytest.approx(fit.achieved_error("spectral"), rel=1e-12, abs=0)
    assert gap.achieved_gaussian_mse == pytest.approx(gap.achieved_frobenius**2 / target.shape[0], rel=1e-12)
    if gap.total_rank < target.shape[0]:
        # below the threshold the optimum σ_{k+1}(E) > 0 and the ratio is 1 up to rounding
        assert gap.spectral_ratio == pytest.approx(1.0, abs=bound / gap.optimal_spectral)
        assert gap.frobenius_ratio == pytest.approx(1.0, abs=math.sqrt(target.shape[0]) * bound / gap.optimal_frobenius)
    else:
        # at or above the threshold the optimum is 0, the ratio is not informative (0 / 0 up to rounding:
        # OptimalityGap reports inf for any nonzero achieved error), and the construction reaches 0 up
        # to rounding
        assert gap.optimal_spectral == 0.0
        assert gap.achieved_spectral <= bound


def test_optimality_gap_accepts_pairs_and_update_matrices():
    frozen = random_linear(6, 2, seed=1).weights
    target = np.random.default_rng(2).uniform(-1, 1, (6, 6))
    fit = lora_linear(frozen, target, 2)
    from_adapters = optimality_gap(frozen, target, fit.adapters)
    from_pairs = optimality_gap(frozen, target, [(a.A, a.B) for a in fit.adapters])
    from_deltas = optimality_gap(frozen, target, [a.delta for a in fit.adapters])
    for gap in (from_pairs, from_deltas):
        assert gap.total_rank == from_adapters.total_rank == 4
        assert gap.achieved_spectral == pytest.approx(from_adapters.achieved_spectral, rel=1e-12)
        assert gap.optimal_spectral == from_adapters.optimal_spectral


@pytest.mark.parametrize("seed", range(4))
def test_gaussian_mse_matches_monte_carlo(seed):
    # statistical: n samples of x ~ N(0, I_D); per-sample y = ||(Π M - T) x||^2 / D has mean
    # ||Π M - T||_F^2 / D and variance 2 ||R^T R||_F^2 / D^2 (Gaussian quadratic form, R the residual).
    # The seeds are fixed; the check allows 5 standard errors (a false alarm has probability 6e-7).
    rng = np.random.default_rng(seed)
    D, L, R = 8, 2, 2
    frozen = random_linear(D, L, seed=rng).weights
    target = rng.uniform(-1, 1, (D, D))
    fit = lora_linear(frozen, target, R)
    residual = fit.product - target  # (D, D)
    n = 40_000
    x = rng.standard_normal((n, D))  # (n, D): rows are inputs
    y = np.sum((x @ residual.T) ** 2, axis=1) / D  # (n,)
    standard_error = math.sqrt(2 * np.linalg.norm(residual.T @ residual, "fro") ** 2 / D**2 / n)
    assert abs(y.mean() - fit.gaussian_mse) <= 5 * standard_error
    # and the prediction is the exact optimum formula Σ_{j>RL} σ_j(E)^2 / D
    s = fit.singular_values
    assert fit.gaussian_mse == pytest.approx(np.sum(s[R * L :] ** 2) / D, rel=1e-12)


@given(D=st.integers(2, 12), R=st.integers(1, 11), seed=SEEDS)
def test_singular_first_layer_is_fine_when_adapted_one_is_invertible(D, R, seed):
    # W_1 is never inverted by itself; with rank(W_1) + R >= D, W_1 + Δ_1 is generically invertible
    R = min(R, D)
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((D, D - R)) @ rng.standard_normal((D - R, D))  # rank D - R
    W2 = rng.standard_normal((D, D))
    target = rng.standard_normal((D, D))
    fit = _fit([W1, W2], target, (R, R))
    assert "P_2" in fit.condition_numbers or 2 * R >= D and fit.adapters[1].rank == 0
    s = np.linalg.svd(target - W2 @ W1, compute_uv=False)
    spectral = s[2 * R] if 2 * R < D else 0.0
    assert abs(fit.achieved_error() - spectral) <= tolerance(fit.kappa, fit.gamma) * _scale([W1, W2], target)


@given(D=st.integers(2, 12), R=st.integers(1, 11), seed=SEEDS)
def test_singular_adapted_first_layer_raises_naming_P2(D, R, seed):
    # rank(W_1) + R < D: W_1 + Δ_1 is singular, and layer 2 receives directions (2R > R): refuse
    R = min(R, D - 1)
    rng = np.random.default_rng(seed)
    r1 = D - R - 1
    W1 = rng.standard_normal((D, r1)) @ rng.standard_normal((r1, D))  # rank D - R - 1 (0 allowed)
    W2 = rng.standard_normal((D, D))
    target = rng.standard_normal((D, D))
    with pytest.raises(SingularMatrixError, match=r"^P_2 = \(W_1 \+ Δ\) must be invertible") as info:
        _fit([W1, W2], target, (R, R))
    assert info.value.condition_number > 1e15
    assert "layer 2 receives singular directions of E" in str(info.value)  # the error says why P_2 is needed


@given(D=st.integers(2, 12), data=st.data())
def test_one_layer_inverts_nothing(D, data):
    rng = np.random.default_rng(data.draw(SEEDS))
    r = data.draw(st.integers(0, D), label="rank(W)")
    R = data.draw(st.integers(0, D), label="R")
    W = rng.standard_normal((D, r)) @ rng.standard_normal((r, D))  # may be singular, even zero
    target = rng.standard_normal((D, D))
    fit = lora_linear([W], target, R)
    assert fit.condition_numbers == {} and fit.kappa == 1.0
    s = np.linalg.svd(target - W, compute_uv=False)
    spectral = s[R] if R < D else 0.0
    assert abs(fit.achieved_error() - spectral) <= tolerance(fit.kappa, fit.gamma) * _scale([W], target)


@given(D=st.integers(2, 12), L=st.integers(2, 4), seed=SEEDS)
def test_singular_frozen_layer_after_a_receiving_one_raises_naming_Q(D, L, seed):
    rng = np.random.default_rng(seed)
    frozen = list(random_linear(D, L, seed=rng).weights)
    frozen[-1] = np.zeros((D, D))  # Q_1 = W_L ... W_2 = 0
    target = rng.standard_normal((D, D))
    names = " ".join(f"W_{l}" for l in range(L, 1, -1))  # Q_1 = W_L ... W_2, in that order
    with pytest.raises(SingularMatrixError, match=rf"^Q_1 = {names} must be invertible"):
        lora_linear(frozen, target, 1)


def test_rank_zero_changes_nothing():
    frozen = random_linear(5, 3, seed=4).weights
    target = np.random.default_rng(5).uniform(-1, 1, (5, 5))
    fit = lora_linear(frozen, target, 0)
    assert all(a.rank == 0 for a in fit.adapters) and fit.condition_numbers == {}
    np.testing.assert_array_equal(fit.product, product(frozen))
    assert fit.spectral_error == pytest.approx(np.linalg.norm(discrepancy(frozen, target), 2), rel=1e-12)
    assert not fit.exact


def test_target_equal_to_frozen_needs_rank_zero():
    frozen = random_linear(6, 2, seed=6).weights
    target = product(frozen)
    assert discrepancy_rank(frozen, target) == 0 and linear_rank_requirement(frozen, target) == 0
    fit = lora_linear(frozen, target, 0)
    assert fit.exact and fit.achieved_error() == 0.0


# --- a literal, slow transcription of the construction (THEORY.md §2.1), the reference for lora_linear ---


def _textbook_delta(frozen, E, V_l, l, earlier_deltas):
    """``Δ_l = Q_l^{-1} E V_l V_l^T P_l^{-1}`` exactly as written, with explicit inverses."""
    D = E.shape[0]
    Q_l = np.eye(D)
    for W in frozen[l + 1 :]:
        Q_l = W @ Q_l  # frozen layers after l
    P_l = np.eye(D)
    for W, Delta in zip(frozen[:l], earlier_deltas):
        P_l = (W + Delta) @ P_l  # adapted layers before l
    return np.linalg.inv(Q_l) @ E @ V_l @ V_l.T @ np.linalg.inv(P_l)


def _textbook_blocks(frozen, target, ranks):
    """``E`` and the blocks ``V_l`` of its right singular vectors, ``R_l`` columns each, clipped at ``D``."""
    D = target.shape[0]
    Pi = np.eye(D)
    for W in frozen:
        Pi = W @ Pi
    E = target - Pi
    V = np.linalg.svd(E)[2].T
    blocks, start = [], 0
    for R_l in ranks:
        blocks.append(V[:, start : min(start + R_l, D)])
        start += R_l
    return E, blocks


@given(instances(low_rank=False))
def test_every_step_matches_the_textbook_formula(instance):
    # each Δ_l against the formula applied to the same earlier adapters: one step's rounding only
    frozen, target, ranks, _, _ = instance
    fit = _fit(frozen, target, ranks)
    E, blocks = _textbook_blocks(frozen, target, ranks)
    fast = [a.delta for a in fit.adapters]
    tol = tolerance(fit.kappa, fit.gamma)
    for l, V_l in enumerate(blocks):
        assert relative_error(fast[l], _textbook_delta(frozen, E, V_l, l, fast[:l])) <= tol


@given(instances(low_rank=False))
def test_fast_product_matches_the_textbook_construction(instance):
    # the whole textbook construction, run on its own: the adapted products agree. (The deltas of middle
    # layers need not agree to tolerance(κ, γ) in a chain of 3 or more: a forward error in Δ_{l-1} is
    # amplified by κ(P_l) in Δ_l, and so on, while the product stays accurate.)
    frozen, target, ranks, _, _ = instance
    fit = _fit(frozen, target, ranks)
    E, blocks = _textbook_blocks(frozen, target, ranks)
    slow = []
    for l, V_l in enumerate(blocks):
        slow.append(_textbook_delta(frozen, E, V_l, l, slow))
    slow_product = product([W + d for W, d in zip(frozen, slow)])
    assert np.linalg.norm(fit.product - slow_product, 2) <= tolerance(fit.kappa, fit.gamma) * _scale(frozen, target)


# --- claims pinned by mutation testing (docs/mutation.md) ---


@given(D=st.integers(2, 8), L=st.integers(1, 3), excess=st.integers(1, 3), seed=SEEDS)
def test_optimum_refuses_a_rank_above_the_width(D, L, excess, seed):
    # A LoRA-rank is at most D (Lemma 1's R in 0..D): an optimum quoted for R > D would describe adapters
    # that do not exist, so every quantity of the optimum refuses it, as the construction does.
    from lora_theory.errors import InvalidArgumentError

    rng = np.random.default_rng(seed)
    frozen = random_linear(D, L, seed=rng).weights
    target = rng.uniform(-1, 1, (D, D))
    for call in (
        lambda: linear_optimal_error(frozen, target, D + excess),
        lambda: linear_optimal_error(frozen, target, D + excess, norm="fro"),
        lambda: linear_gaussian_mse(frozen, target, D + excess),
        lambda: lora_linear(frozen, target, D + excess),
    ):
        with pytest.raises(InvalidArgumentError, match=r"^rank: must be at most"):
            call()


@given(D=st.integers(2, 10), L=st.integers(1, 4), data=st.data(), seed=SEEDS)
def test_requirement_with_a_tolerance_is_the_least_rank_within_it(D, L, data, seed):
    # Lemma 1 with singular values <= tol counted as zero: the requirement R = ceil(#{σ_j > tol} / L) is the
    # least uniform rank whose optimum σ_{RL+1}(E) is <= tol. E is planted with large and tiny singular
    # values, so a requirement that ignored tol would count the tiny ones and not be the least.
    big = data.draw(st.integers(0, D), label="big")
    tiny = data.draw(st.integers(0, D - big), label="tiny")
    rng = np.random.default_rng(seed)
    frozen = random_linear(D, L, seed=rng).weights
    Uo, _ = np.linalg.qr(rng.standard_normal((D, D)))
    Vo, _ = np.linalg.qr(rng.standard_normal((D, D)))
    sigma = np.concatenate([rng.uniform(0.5, 2.0, big), rng.uniform(1e-7, 1e-6, tiny), np.zeros(D - big - tiny)])
    target = product(frozen) + Uo @ np.diag(np.sort(sigma)[::-1]) @ Vo.T
    tol = 1e-3
    R = linear_rank_requirement(frozen, target, tol=tol)
    assert linear_optimal_error(frozen, target, R) <= tol
    if R > 0:
        assert linear_optimal_error(frozen, target, R - 1) > tol
    assert R == math.ceil(big / L)


@given(D=st.integers(2, 8), seed=SEEDS)
def test_gap_to_a_zero_optimum_is_one_when_reached_and_infinite_when_missed(D, seed):
    # With k >= D the optimum is 0. Adapters that reach T have ratio 1 (0 / 0 read as "optimal"); adapters
    # of the same rank that miss it are infinitely worse than the optimum, never a finite ratio. Frozen
    # W = 0 and Δ = T make the product T without rounding. The Gaussian optimum is Lemma 1's.
    rng = np.random.default_rng(seed)
    frozen, target = [np.zeros((D, D))], rng.uniform(-1, 1, (D, D))
    reached = optimality_gap(frozen, target, [target.copy()])
    assert reached.total_rank == D and reached.optimal_spectral == 0.0
    assert reached.spectral_ratio == reached.frobenius_ratio == 1.0
    missed = optimality_gap(frozen, target, [target + np.eye(D)])
    assert missed.spectral_ratio == missed.frobenius_ratio == math.inf
    assert missed.spectral_excess == missed.achieved_spectral > 0
    frozen = random_linear(D, 2, seed=rng).weights
    fit = lora_linear(frozen, target, 1)
    gap = optimality_gap(frozen, target, fit.adapters)
    assert gap.optimal_gaussian_mse == linear_gaussian_mse(frozen, target, 1)
    assert gap.optimal_frobenius == linear_optimal_error(frozen, target, 1, norm="fro")


def test_gap_reads_a_two_by_two_update_matrix_as_a_matrix_not_a_pair():
    # At D = 2 an update matrix has two rows, like an (A, B) pair has two members: only a tuple is a pair.
    rng = np.random.default_rng(5)
    frozen, target = random_linear(2, 2, seed=rng).weights, rng.uniform(-1, 1, (2, 2))
    deltas = [np.outer(rng.standard_normal(2), rng.standard_normal(2)) for _ in frozen]  # rank 1 each
    as_matrices = optimality_gap(frozen, target, deltas)
    as_adapters = optimality_gap(frozen, target, [Adapter(d[:1] / d[0, 0], d[:, :1]) for d in deltas])
    assert as_matrices.total_rank == as_adapters.total_rank == 2
    assert as_matrices.achieved_spectral == pytest.approx(as_adapters.achieved_spectral, rel=1e-12)


@pytest.mark.parametrize(
    "bad, argument",
    [
        (lambda D: [np.zeros((D + 1, D + 1)), np.zeros((D, D))], "adapters[0]"),
        (lambda D: [np.zeros((D, D)), Adapter(np.zeros((1, D + 1)), np.zeros((D, 1)))], "adapters[1]"),
        (lambda D: [Adapter(np.zeros((1, D)), np.zeros((D + 1, 1))), np.zeros((D, D))], "adapters[0]"),
    ],
)
def test_gap_refuses_adapters_of_another_width(bad, argument):
    # An adapter for a layer of another shape does not adapt this chain: scoring it is refused, naming it.
    from lora_theory.errors import InvalidArgumentError

    D = 3
    frozen, target = random_linear(D, 2, seed=0).weights, np.eye(D)
    with pytest.raises(InvalidArgumentError) as info:
        optimality_gap(frozen, target, bad(D))
    assert info.value.argument == argument


def test_singular_values_at_the_tolerance_count_as_zero():
    # discrepancy_rank counts σ_j > tol: with tol = 0 an exactly rank-1 discrepancy has rank 1, the exact
    # zeros are not directions (a rank counted >= 0 would be D and ask for D directions).
    frozen, target = [np.zeros((3, 3))], np.diag([2.0, 0.0, 0.0])
    assert discrepancy_rank(frozen, target, tol=0) == 1
    assert linear_rank_requirement(frozen, target, tol=0) == 1
    assert discrepancy_rank(frozen, target, tol=2.0) == 0  # σ_1 = 2 is at the tolerance
    fit = lora_linear(frozen, target, 1, rank_tol=0)
    assert fit.error_rank == 1 and fit.exact


def test_product_of_no_matrices_is_refused():
    # Π of an empty chain has no width to be an identity of: refused, naming the argument and why.
    from lora_theory.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"^matrices: the product of no matrices needs a width") as info:
        product([])
    assert info.value.argument == "matrices"


@given(seed=SEEDS, L=st.integers(1, 3))
def test_one_dimensional_chains_are_fitted_exactly(seed, L):
    # D = 1 is a chain of nonzero scalars: rank(E) <= 1 and one direction fits it (Lemma 1 with D = 1).
    rng = np.random.default_rng(seed)
    frozen = [np.array([[rng.uniform(0.5, 2.0) * rng.choice([-1, 1])]]) for _ in range(L)]
    target = np.array([[rng.uniform(-2, 2)]])
    assert discrepancy_rank(frozen, target) == 1
    fit = lora_linear(frozen, target, 1)
    assert fit.exact and fit.spectral_error == 0.0
    assert abs(fit.product[0, 0] - target[0, 0]) <= tolerance(fit.kappa, fit.gamma) * _scale(frozen, target)


@given(D=st.integers(2, 6), L=st.integers(1, 3), r=st.integers(0, 6), exponent=st.integers(-50, 50), seed=SEEDS)
def test_rank_of_E_does_not_depend_on_the_units(D, L, r, exponent, seed):
    # E(2^k W, 2^{kL} T) = 2^{kL} E(W, T) exactly in binary floating point: scaling the problem changes no
    # rank, however small or large the unit (the rank tolerance is relative to the operands, never absolute).
    rng = np.random.default_rng(seed)
    r = min(r, D)
    frozen = random_linear(D, L, seed=rng).weights
    target = product(frozen) + rng.standard_normal((D, r)) @ rng.standard_normal((r, D))
    scaled = [W * 2.0**exponent for W in frozen]
    scaled_target = target * 2.0 ** (exponent * L)
    assert discrepancy_rank(scaled, scaled_target) == discrepancy_rank(frozen, target) == r
    assert lora_linear(scaled, scaled_target, D).error_rank == r


@given(instances())
def test_adapted_model_is_the_linear_map_of_the_adapted_product(instance):
    # The adapted model of Lemma 1 is linear: x ↦ Π(W_l + Δ_l) x for every x, negative coordinates included.
    frozen, target, ranks, _, rng = instance
    fit = _fit(frozen, target, ranks)
    x = rng.standard_normal((5, target.shape[0]))
    allowed = tolerance(fit.kappa, fit.gamma) * _scale(frozen, target) * np.linalg.norm(x, axis=1)
    assert np.all(np.linalg.norm(fit.model(x) - x @ fit.product.T, axis=1) <= allowed)


def test_solving_with_an_ill_conditioned_matrix_warns_even_when_the_adapters_stay_small():
    # Lemma 1 solves with Q_1 = W_2 of κ = 1e12. E = e_1 e_1^T avoids W_2's small direction, so Δ_1 and
    # the layer terms stay of size 1 (γ ~ 1); the solve itself still loses ~12 digits, and the fit says so.
    W2 = np.diag([1.0, 1e-12])
    frozen = [np.eye(2), W2]
    target = W2 + np.diag([1.0, 0.0])
    with pytest.warns(IllConditionedWarning, match=r"^linear construction \(Lemma 1\) is ill-conditioned"):
        fit = lora_linear(frozen, target, 1)
    assert fit.kappa >= 1e11 and fit.gamma < 10


# ------------------------------------------------------------------ what the fit reports about its own rounding


def _gamma_reference(frozen, adapted, target):
    """γ as LinearFit.gamma defines it, written out: ``max_l ||Q_l|| (||W_l|| + ||Δ_l||) ||P_l||`` over
    ``max(||T||, ||Π W||)``, with ``Q_l = W_L ... W_{l+1}`` (frozen) and ``P_l = M_{l-1} ... M_1`` (adapted)."""
    two = lambda A: np.linalg.norm(A, 2)  # noqa: E731
    D = target.shape[0]
    terms = []
    for l in range(len(frozen)):
        Q = np.eye(D)
        for W in frozen[l + 1 :]:
            Q = W @ Q
        P = np.eye(D)
        for M in adapted[:l]:
            P = M @ P
        terms.append(two(Q) * (two(frozen[l]) + two(adapted[l] - frozen[l])) * two(P))
    return max(terms) / max(two(target), two(product(frozen)))


@pytest.mark.parametrize("target_scale", [1e-2, 1.0, 1e2])
@given(D=st.integers(2, 8), seed=SEEDS)
@settings(max_examples=10)
def test_gamma_is_the_largest_layer_term_of_the_adapted_product(D, seed, target_scale):
    rng = np.random.default_rng(seed)
    frozen = [s * rng.standard_normal((D, D)) for s in (3.0, 0.5, 1.5)]  # unequal, non-commuting layers
    target = target_scale * rng.standard_normal((D, D))
    for R in (0, 1, D):
        fit = lora_linear(frozen, target, R)
        assert fit.gamma == pytest.approx(_gamma_reference(frozen, fit.weights, target), rel=1e-9)


@pytest.mark.parametrize("target_scale", [1e-2, 1.0, 1e2])
@given(D=st.integers(3, 8), seed=SEEDS)
@settings(max_examples=10)
def test_measured_error_below_the_threshold_is_the_spectral_tail_relative_to_the_scale(D, seed, target_scale):
    """Below ``rank(E)`` the product misses the target by exactly σ_{k+1}(E) (Eckart–Young, spectral norm);
    ``measured_error`` is that miss relative to ``max(||T||_2, ||Π W||_2)``."""
    rng = np.random.default_rng(seed)
    frozen = [2.0 * rng.standard_normal((D, D)), 0.5 * rng.standard_normal((D, D))]
    target = target_scale * rng.standard_normal((D, D))
    fit = lora_linear(frozen, target, 1)  # k = 2 < D = rank(E)
    scale = max(np.linalg.norm(target, 2), np.linalg.norm(product(frozen), 2))
    assert not fit.exact
    assert fit.measured_error == pytest.approx(fit.singular_values[2] / scale, rel=1e-8)


def test_exact_means_a_small_bound_relative_to_the_target_that_the_product_meets():
    """``exact`` (LinearFit): the rank suffices, the error relative to ``max(||T||, ||Π W||)`` is within
    ``tolerance(κ, γ)``, and that bound carried to the target's own size is at most EXACT_TOLERANCE_LIMIT.
    A tiny target behind a huge frozen product fails the last part (its relative error is visibly
    nonzero); a well-scaled instance passes all three."""
    from lora_theory.numerics import EXACT_TOLERANCE_LIMIT

    rng = np.random.default_rng(7)
    D = 6
    orthogonal = [np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(2)]
    cases = {
        "huge product, tiny target": ([1e5 * Q for Q in orthogonal], 1e-3 * rng.standard_normal((D, D))),
        "well scaled": (orthogonal, rng.standard_normal((D, D))),
    }
    seen = {}
    for name, (frozen, target) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IllConditionedWarning)
            fit = lora_linear(frozen, target, D // 2)
        assert fit.rank_sufficient
        norm_T = np.linalg.norm(target, 2)
        scale = max(norm_T, np.linalg.norm(product(frozen), 2))
        bound = tolerance(fit.kappa, fit.gamma) * scale / norm_T  # relative to the target
        if fit.exact:
            assert bound <= EXACT_TOLERANCE_LIMIT, name
            assert fit.achieved_error() <= bound * norm_T, name
        seen[name] = fit.exact
    assert seen == {"huge product, tiny target": False, "well scaled": True}


@given(D=st.integers(1, 8), seed=SEEDS)
@settings(max_examples=20)
def test_a_zero_target_is_reached_exactly(D, seed):
    """T = 0 is reached by one layer at R = D (Δ = -W, nothing inverted), and with a zero frozen product
    nothing is needed (E = 0, rank 0). (Through two invertible layers it is not: a zero product needs a
    singular layer, and the chain's solves then meet κ near 1/u.)"""
    rng = np.random.default_rng(seed)
    zero = np.zeros((D, D))
    W = rng.standard_normal((D, D))
    fit = lora_linear([W], zero, D)
    assert fit.exact and fit.achieved_error() <= tolerance(fit.kappa, fit.gamma) * np.linalg.norm(W, 2)
    fit = lora_linear([zero, np.eye(D)], zero, 1)
    assert fit.exact and fit.achieved_error() == 0.0 and math.isfinite(fit.gamma)


def _message(call):
    """The one-line message of the error ``call()`` raises."""
    with pytest.raises(Exception) as info:
        call()
    return str(info.value)


def test_a_chain_that_cannot_be_adapted_names_its_singular_product_factor_by_factor():
    """The refusal names the matrix of the fixed order that is singular, written out factor by factor in
    the order they multiply, the directions or layer that needed it, and that every assignment of the
    blocks to the layers was tried (a 3-layer chain: the names join several factors)."""
    rng = np.random.default_rng(0)
    D, tail = 4, "no assignment of the 3 blocks of singular directions to the 3 layers avoids a singular"
    target = rng.standard_normal((D, D))
    W = [rng.standard_normal((D, D)) for _ in range(3)]
    no_last = W[:2] + [np.zeros((D, D))]  # Q_1 = W_3 W_2 = 0 whatever the assignment
    message = _message(lambda: lora_linear(no_last, target, 1))
    assert message.startswith("Q_1 = W_3 W_2 must be invertible but is singular to working precision, κ = ")
    assert message.endswith(f"(it receives singular directions 1..1 of E; {tail} Q_l or P_l: all were searched)")
    no_middle = [W[0], np.zeros((D, D)), W[2]]  # layer 1 takes nothing (R_1 = 0), so Q_1 is never needed;
    message = _message(lambda: lora_linear(no_middle, target, (0, 1, D)))  # P_3 = (Δ_2) W_1 has rank <= 1
    assert message.startswith("P_3 = (W_2 + Δ) (W_1 + Δ) must be invertible"), message
    assert "(layer 3 receives singular directions of E; " in message and message.endswith("all were searched)")


def test_a_search_cut_short_says_so_in_full(monkeypatch):
    """A search stopped by its step budget says that one assignment may still exist, in so many words."""
    import lora_theory.linear as linear

    W1, W2, T = np.diag([0.0, 1.0]), np.eye(2), np.diag([1.0, -2.0])  # the fixed order fails here
    monkeypatch.setattr(linear, "MAX_ASSIGNMENT_STEPS", 1)
    message = _message(lambda: lora_linear([W1, W2], T, 1))
    assert message.endswith(
        "the fixed order of the blocks of singular directions fails here, and the search over their 2 "
        "assignments to layers stopped after 1 steps without finding one that works (one may exist))"
    )


@pytest.mark.parametrize(
    "frozen,ranks,factor",
    [
        ([np.eye(2), 1e-307 * np.eye(2)], 1, "B"),  # Q_1^{-1} E V_1: a tiny Q_1 (κ = 1) overflows B
        ([1e-309 * np.eye(2), np.eye(2)], (0, 1), "A"),  # V_2^T P_2^{-1}: a tiny P_2 = W_1 overflows A
    ],
)
def test_adapter_factors_that_overflow_are_a_numerical_error_naming_the_solves(frozen, ranks, factor):
    """Well-conditioned but tiny ``Q_l`` or ``P_l``: the solves overflow float64. That is the arithmetic's
    failure, not a bad argument ``A`` or ``B`` the caller never passed."""
    from lora_theory.errors import NumericalError

    with pytest.raises(NumericalError) as info:
        lora_linear(frozen, np.diag([10.0, 20.0]), ranks)
    assert f"the adapter factors overflowed float64 in Lemma 1's solves ({factor}: " in str(info.value)


def test_a_discrepancy_whose_norm_overflows_is_refused_naming_E():
    """``E = T - Π W`` with finite entries but a Frobenius norm beyond float64 (64 x 64 entries of 6e306)
    is refused by name; ``T + Π W`` would be 0 here, so the check reads the difference."""
    from lora_theory.errors import NumericalError

    target = np.full((64, 64), 3e306)
    with pytest.raises(NumericalError, match=r"overflow: the norm of E = T - Π W exceeds the float64 range"):
        lora_linear([-target], target, 1)


def test_argument_errors_name_the_argument_and_the_choices():
    rng = np.random.default_rng(1)
    frozen, target = [rng.standard_normal((3, 3))], rng.standard_normal((3, 3))
    assert _message(lambda: linear_optimal_error(frozen, target, 1, norm="x")) == (
        "norm: must be 'spectral' or 'fro', got 'x'"
    )
    assert _message(lambda: product([np.eye(2), "a"])).startswith("matrices[1]: ")
    assert _message(lambda: discrepancy_rank(frozen, target, tol=-1.0)).startswith("tol: ")


def test_the_rank_tolerance_is_relative_to_spectral_norms():
    """``rank(E)`` counts singular values above ``D·u·max(||T||_2, ||Π W||_2, σ_1(E))``: a singular value
    3× that tolerance counts even though it is below ``D·u`` times the Frobenius norms (sqrt(D) = 4 times
    the spectral ones here); one a third of it does not."""
    D, u = 16, np.finfo(np.float64).eps
    frozen = [np.eye(D)]
    for factor, rank in ((3.0, 1), (1 / 3, 0)):
        target = np.eye(D)
        target[0, 0] += factor * D * u * (1 + factor * D * u)  # ||T||_2 = 1 + that: the tolerance's scale
        assert discrepancy_rank(frozen, target) == rank
        assert lora_linear(frozen, target, D).error_rank == rank


def test_rank_sufficient_from_the_threshold_on_and_not_before():
    rng = np.random.default_rng(3)
    D = 5
    frozen = list(random_linear(D, 2, seed=rng).weights)
    target = product(frozen) + rng.standard_normal((D, 3)) @ rng.standard_normal((3, D))  # rank(E) = 3
    for k in range(D + 1):
        ranks = (k // 2, k - k // 2)
        fit = lora_linear(frozen, target, ranks)
        assert fit.error_rank == 3 and fit.rank_sufficient == (k >= 3), k


@pytest.mark.parametrize("units", [1e-3, 1.0, 1e3])  # scales below 1 too: the scale divides, not its excess
def test_exactness_is_judged_with_the_allowance_of_the_reported_kappa_gamma_and_target_size(monkeypatch, units):
    """``exact`` is ``verified_exact`` applied to the fit's own reported quantities: the tolerance
    ``tolerance(fit.kappa, fit.gamma)``, the measured miss ``||Π M - T||_2 / max(||T||_2, ||Π W||_2)`` and
    the amplification ``max(||T||_2, ||Π W||_2) / ||T||_2`` to the target's size; the same κ and γ go to
    the conditioning warning. Checked by recording what the construction passes on, over 1-, 2- and 3-layer
    chains, at ranks below, at and above the threshold."""
    import lora_theory.linear as linear

    seen = {}
    real_exact, real_warn = linear.verified_exact, linear.warn_if_ill_conditioned

    def exact_spy(rank_sufficient, measured, tol, amplification=1.0, **kw):
        seen["exact"] = (measured, tol, amplification, kw.get("what"))
        return real_exact(rank_sufficient, measured, tol, amplification, **kw)

    def warn_spy(kappa, gamma=0.0, **kw):
        seen["warn"] = (kappa, gamma, kw.get("what"))
        return real_warn(kappa, gamma, **kw)

    monkeypatch.setattr(linear, "verified_exact", exact_spy)
    monkeypatch.setattr(linear, "warn_if_ill_conditioned", warn_spy)
    rng = np.random.default_rng(11)
    D = 4
    for L in (1, 2, 3):
        frozen = [units * rng.standard_normal((D, D)) for _ in range(L)]
        target = units**L * rng.standard_normal((D, D))
        for R in (0, 1, D):
            seen.clear()
            fit = lora_linear(frozen, target, R)
            norm_T = np.linalg.norm(target, 2)
            scale = max(norm_T, np.linalg.norm(product(frozen), 2))
            miss = np.linalg.norm(fit.product - target, 2) / scale
            measured, tol, amplification, what = seen["exact"]
            assert what == "linear construction (Lemma 1)"
            assert tol == tolerance(fit.kappa, fit.gamma)
            assert measured == pytest.approx(miss, rel=1e-12, abs=1e-300) and measured == fit.measured_error
            assert amplification == pytest.approx(scale / norm_T, rel=1e-12)
            if fit.condition_numbers:
                assert seen["warn"] == (fit.kappa, fit.gamma, "linear construction (Lemma 1)")
            else:
                assert "warn" not in seen and fit.kappa == 1.0
    # nothing solved (R = 0) but layers that cancel: γ = 9e6 lifts the allowance above its floor, where the
    # κ = 1 of a fit that inverted nothing is visible in it
    a = 3e3
    frozen, target = [np.diag([a, 1 / a]), np.diag([1 / a, a])], np.eye(2)
    fit = lora_linear(frozen, target, 0)
    assert fit.kappa == 1.0 and fit.gamma > 1e6 and seen["exact"][1] == tolerance(1.0, fit.gamma)
    assert tolerance(1.0, fit.gamma) != tolerance(2.0, fit.gamma)  # the case tells the two apart


def test_gamma_below_one_when_the_target_dwarfs_the_frozen_product():
    """With no adapter (R = 0) every layer term is at most ``||Π W||``-sized, so ``γ`` is far below 1 when
    the target is 1e6 times larger: ``γ`` starts from 0, not from 1, and divides by the scale even when
    that scale is below 1."""
    rng = np.random.default_rng(5)
    D = 4
    frozen = [1e-4 * np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(2)]  # ||Π W|| = 1e-8
    target = 1e-2 * np.eye(D)  # scale 1e-2 < 1
    fit = lora_linear(frozen, target, 0)
    assert fit.gamma == pytest.approx(_gamma_reference(frozen, fit.weights, target), rel=1e-9)
    assert fit.gamma == pytest.approx(1e-6, rel=1e-9)


def _model_and_matrices(seed, D=5, L=3, target_depth=2):
    """``(model, matrices, target model, target matrix)``: the same linear chain and target in both forms."""
    model = random_linear(D, L, seed=seed)
    target_model = random_linear(D, target_depth, seed=seed + 1)
    return model, [np.array(W) for W in model.weights], target_model, product(list(target_model.weights))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_model_of_random_linear_and_its_matrices_give_identical_results(seed):
    """Every function of Lemma 1 takes the model random_linear returns as well as its list of matrices (and a
    linear model as the target, standing for its matrix): the results are identical, bit for bit."""
    import lora_theory as lt

    model, W, target_model, T = _model_and_matrices(seed)
    forms = [(model, target_model), (model, T), (W, target_model)]
    assert np.array_equal(product(model), product(W))
    for frozen, target in forms:
        assert np.array_equal(discrepancy(frozen, target), discrepancy(W, T))
        assert discrepancy_rank(frozen, target) == discrepancy_rank(W, T)
        assert linear_rank_requirement(frozen, target) == linear_rank_requirement(W, T)
        for rank in (0, 1, [2, 0, 1]):
            for norm in ("spectral", "fro"):
                assert linear_optimal_error(frozen, target, rank, norm) == linear_optimal_error(W, T, rank, norm)
            assert linear_gaussian_mse(frozen, target, rank) == linear_gaussian_mse(W, T, rank)
            got, want = lora_linear(frozen, target, rank), lora_linear(W, T, rank)
            assert np.array_equal(got.product, want.product)
            assert (got.spectral_error, got.exact, got.error_rank) == (want.spectral_error, want.exact, want.error_rank)
            assert all(np.array_equal(a.delta, b.delta) for a, b in zip(got.adapters, want.adapters))
            gap_got = optimality_gap(frozen, target, want.adapters)
            assert gap_got == optimality_gap(W, T, want.adapters)
    assert lt.linear_rank_threshold(model) == lt.linear_rank_threshold(5, 3) == 2


def test_a_model_that_is_not_a_linear_chain_is_refused():
    """A ReLU model or one with biases is not the model of Lemma 1: reading its weights as a chain would answer
    for another model, so each function refuses it, naming the argument."""
    import lora_theory as lt
    from lora_theory.errors import InvalidArgumentError

    relu = lt.random_fnn(3, 2, seed=0)
    biased = lt.random_fnn(3, 2, seed=0, activation="linear")
    linear = random_linear(3, 2, seed=0)
    T = np.eye(3)
    for bad, what in ((relu, "activation='linear'"), (biased, "zero biases")):
        for call in (
            lambda m: discrepancy(m, T),
            lambda m: discrepancy_rank(m, T),
            lambda m: linear_rank_requirement(m, T),
            lambda m: linear_optimal_error(m, T, 1),
            lambda m: linear_gaussian_mse(m, T, 1),
            lambda m: lora_linear(m, T, 1),
            lambda m: optimality_gap(m, T, [np.zeros((3, 3))] * 2),
        ):
            with pytest.raises(InvalidArgumentError, match=what) as info:
                call(bad)
            assert info.value.argument == "frozen"
        with pytest.raises(InvalidArgumentError, match=what) as info:
            lora_linear(linear, bad, 1)
        assert info.value.argument == "target"
        with pytest.raises(InvalidArgumentError, match=what):
            product(bad)
        with pytest.raises(InvalidArgumentError, match=what):
            lt.linear_rank_threshold(bad)
    with pytest.raises(InvalidArgumentError, match="must be 3 x 3"):
        lora_linear(linear, random_linear(6, 1, seed=1), 1)
    with pytest.raises(InvalidArgumentError, match="left out"):
        lt.linear_rank_threshold(linear, 2)
    with pytest.raises(InvalidArgumentError, match="must be given"):
        lt.linear_rank_threshold(3)
