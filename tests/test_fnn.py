"""Theorems 3 and 6 (ReLU FNN): the adapted network equals the target on the certified domain.

Tolerances are relative to the target's outputs on the batch: ``fit.tolerance = tolerance(κ, γ)`` with ``κ``
the largest condition number inverted and ``γ`` the bias amplification (THEORY.md §1, §2.3).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from _fnn_strategies import fnn_instances, make_target
from _helpers import fnn_pair, ill_conditioned_ok, partitions
from hypothesis import given
from hypothesis import strategies as st

from lora_theory.errors import IllConditionedWarning, InvalidArgumentError, NumericalError, SingularMatrixError
from lora_theory.fnn import (
    SAFETY,
    block_discrepancies,
    fnn_best_partition,
    fnn_rank_requirement,
    lora_fnn,
    sample_ball,
)
from lora_theory.linear import lora_linear, product
from lora_theory.models import FNN, random_fnn
from lora_theory.numerics import relative_error, tolerance
from lora_theory.partition import partition_blocks, uniform_partition
from lora_theory.thresholds import ceil_div, fnn_rank_threshold

SEEDS = st.integers(0, 2**32 - 1)


# --------------------------------------------------------------------------- literal reference transcription


def reference_fnn(
    frozen, target, ranks, partition, *, ball=None, samples=None, margin=2.0, compensating=True, through_last_bias=True
):
    """A slow, literal transcription of THEORY.md §2.3, one coordinate at a time.

    ``compensating=False`` uses plain levels ``b_j = β_j·1`` (each ``β_j`` must then cover the constant the
    earlier layers carried); ``through_last_bias=False`` reproduces the authors' bug: the next block's
    biases are sized from activations that have not been through the block's last bias and ReLU.
    Returns ``(weights, biases, levels)`` with ``levels[i]`` the ``β_j`` of block ``i``.
    """
    D = frozen.width
    L = frozen.depth
    weights, biases, all_levels = [], [], []
    if ball is not None:
        u0, r = np.array(ball[0], dtype=float), float(ball[1])
    U = None if samples is None else np.array(samples, dtype=float)
    for i, block in enumerate(partition_blocks(partition)):
        lin = lora_linear(
            frozen.weights[block.start : block.stop], target.weights[i], list(ranks[block.start : block.stop])
        )
        M = list(lin.model.weights)
        m = len(M)
        carried = np.zeros(D)  # the constant in the pre-activation: P_j u + carried
        levels = []
        for j in range(m - 1):
            P = product(M[: j + 1])
            carried_next = M[j] @ carried  # what the earlier levels contribute before b_j
            level = 0.0
            for k in range(D):
                if ball is not None:
                    lowest = sum(P[k, q] * u0[q] for q in range(D)) - r * math.sqrt(sum(P[k, q] ** 2 for q in range(D)))
                    need = -(lowest + (0.0 if compensating else carried_next[k]))
                else:
                    values = U @ P[k] + (0.0 if compensating else carried_next[k])
                    need = margin * (-values.min())
                level = max(level, need)
            if ball is not None:
                level = max(level, 0.0) + SAFETY * (r * np.linalg.norm(P, 2) + np.linalg.norm(P @ u0))
            else:
                level = max(level, 0.0) + SAFETY * float(np.abs(U @ P.T).max())
            if compensating:
                b = level * np.ones(D) - M[j] @ carried
                carried = level * np.ones(D)
            else:
                b = level * np.ones(D)
                carried = carried_next + b
            biases.append(b)
            levels.append(level)
        biases.append(target.biases[i] - M[-1] @ carried)
        weights.extend(M)
        all_levels.append(levels)
        W_tilde = product(M)
        if ball is not None:
            r = np.linalg.norm(W_tilde, 2) * r + np.linalg.norm(W_tilde @ u0 + target.biases[i])
            u0 = np.zeros(D)
        else:
            Z = U
            for j in range(m):
                Z = Z @ M[j].T + biases[len(biases) - m + j]
                last = j == m - 1
                if last and not through_last_bias:
                    Z = Z - biases[-1]  # the bug: the last bias (and ReLU) never applied
                elif block.start + j < L - 1 or frozen.final_relu:
                    Z = np.maximum(Z, 0.0)
            U = Z
    return weights, biases, all_levels


def _reference_model(frozen, weights, biases):
    return FNN(weights, biases, final_relu=frozen.final_relu)


# ------------------------------------------------------------------------------------------- properties


@ill_conditioned_ok
@given(fnn_instances(), SEEDS, st.sampled_from([0.5, 1.0, 5.0, 10.0]))
def test_exact_iff_block_budgets_cover_discrepancy_ranks(inst, seed, radius):
    """Theorem 6: exact on the certified ball iff Σ_{l ∈ P_i} R_l >= rank(E_i) for every block."""
    rng = np.random.default_rng(seed)
    D = inst.width
    center = rng.uniform(-1, 1, size=D)
    fit = lora_fnn(inst.frozen, inst.target, inst.ranks, partition=inst.partition, input_radius=radius, center=center)
    assert fit.block_discrepancy_ranks == inst.block_ranks
    assert fit.exact == all(b >= rho for b, rho in zip(inst.budgets(), inst.block_ranks))
    assert all(a.rank <= R for a, R in zip(fit.adapters, fit.ranks))  # no adapter exceeds its budget
    assert all(np.linalg.matrix_rank(a.delta) <= R for a, R in zip(fit.adapters, fit.ranks))
    x = sample_ball(center, radius, 200, rng)
    assert fit.domain.contains(x).all()
    err = relative_error(fit.model(x), inst.target(x))
    if fit.exact:
        assert err <= fit.tolerance
        # the worst points of the ball for the first block: where each linearised unit is smallest
        extreme = [
            center - radius * (1 - 1e-12) * row / np.linalg.norm(row)
            for j in range(inst.partition[0] - 1)
            for row in product(fit.model.weights[: j + 1])
            if np.linalg.norm(row) > 0
        ]
        if extreme:
            extreme = np.array(extreme)  # (k, D)
            assert relative_error(fit.model(extreme), inst.target(extreme)) <= fit.tolerance
        if max(inst.partition) <= 2 and fit.kappa <= 1e6:
            # flat 1e-8 for blocks of at most 2 layers (THEORY.md §2.3), for frozen products that are not
            # near-singular: κ beyond 1e6 costs digits in Lemma 1 itself, whatever the biases
            assert err <= 1e-8
    else:
        # the block realises Π W + LR_{k_i}(E_i): its error is σ_{k_i+1}(E_i) > 0 where the budget is short
        for bf, budget, rho, i in zip(fit.block_fits, inst.budgets(), inst.block_ranks, itertools.count()):
            T = inst.target.weights[i]
            achieved = np.linalg.norm(bf.realised - T, 2)
            assert achieved == pytest.approx(bf.error, rel=1e-6, abs=fit.tolerance * np.linalg.norm(T, 2))
            if budget < rho:
                assert bf.error > 0 and bf.directions == budget


@ill_conditioned_ok
@given(fnn_instances(max_depth=3), SEEDS)
def test_exact_at_the_instance_requirement_with_one_rank(inst, seed):
    """Theorem 3: one rank R = max_i ceil(rank(E_i) / |P_i|) is exact, on the uniform or any partition."""
    R = fnn_rank_requirement(inst.frozen, inst.target, inst.partition)
    assert R == max(ceil_div(rho, s) for rho, s in zip(inst.block_ranks, inst.partition))
    radius = 3.0
    fit = lora_fnn(inst.frozen, inst.target, R, partition=inst.partition, input_radius=radius)
    assert fit.exact and fit.ranks == (R,) * inst.frozen.depth
    x = sample_ball(np.zeros(inst.width), radius, 200, seed)
    assert relative_error(fit.model(x), inst.target(x)) <= fit.tolerance
    if R > 0:
        below = lora_fnn(inst.frozen, inst.target, R - 1, partition=inst.partition, input_radius=radius)
        assert not below.exact


@ill_conditioned_ok
@given(fnn_instances(), SEEDS)
def test_matches_the_literal_transcription(inst, seed):
    """The fast construction equals the coordinate-by-coordinate transcription of THEORY.md §2.3."""
    center = np.random.default_rng(seed).uniform(-1, 1, inst.width)
    fit = lora_fnn(inst.frozen, inst.target, inst.ranks, partition=inst.partition, input_radius=2.0, center=center)
    weights, biases, levels = reference_fnn(inst.frozen, inst.target, inst.ranks, inst.partition, ball=(center, 2.0))
    for mine, ref in zip(fit.model.weights, weights):
        assert relative_error(mine, ref) <= 1e-12
    scale = max(np.linalg.norm(b) for b in biases) + 1
    for mine, ref in zip(fit.model.biases, biases):
        assert np.linalg.norm(mine - ref) <= 1e-10 * scale
    for bf, ref in zip(fit.block_fits, levels):
        assert np.allclose(bf.levels, ref, rtol=1e-10, atol=1e-12)


@ill_conditioned_ok
@given(fnn_instances(max_width=10, max_depth=4), st.integers(0, 10**6))
def test_below_threshold_rms_error_within_the_per_instance_bound(inst, seed):
    """The project's bound (THEORY.md §2.4): the measured RMS error on Gaussian inputs is at most Σ_i K_i ε_i
    a_{i-1}."""
    from lora_theory.bounds import fnn_error_bound

    rng = np.random.default_rng(seed)
    D = inst.width
    x = rng.standard_normal((500, D))  # (n, D)
    radius = float(np.linalg.norm(x, axis=1).max()) * (1 + 1e-9)  # a certified ball covering them
    fit = lora_fnn(inst.frozen, inst.target, inst.ranks, partition=inst.partition, input_radius=radius)
    diff = fit.model(x) - inst.target(x)
    rms = math.sqrt(np.mean(np.sum(diff**2, axis=1)))
    bound = fnn_error_bound(
        inst.frozen, inst.target, inst.ranks, partition=inst.partition, second_moment=x.T @ x / len(x)
    )
    assert bound.block_errors == pytest.approx(fit.block_errors, rel=1e-9, abs=1e-12)
    slack = fit.tolerance * math.sqrt(np.mean(np.sum(inst.target(x) ** 2, axis=1)))  # rounding at the threshold
    assert rms <= bound.rms + slack
    assert bound.mse == pytest.approx(bound.rms**2 / D)
    per_sample = np.linalg.norm(diff, axis=1)
    assert np.all(per_sample <= bound.at(x) * (1 + 1e-9) + slack)


@given(st.integers(1, 4).flatmap(lambda L: st.tuples(st.just(L), st.integers(1, L))), SEEDS, st.integers(2, 8))
def test_best_partition_equals_brute_force_and_beats_uniform(depths, seed, D):
    """Theorem 6: the dynamic programme finds min over all consecutive partitions of max ceil(rank(E_i)/|P_i|)."""
    L, Lbar = depths
    rng = np.random.default_rng(seed)
    frozen = random_fnn(D, L, seed=rng)
    # targets close to some partition's products, so that partitions differ in their requirements
    cuts = np.sort(rng.choice(np.arange(1, L), Lbar - 1, replace=False)) if Lbar > 1 else []
    planted = tuple(int(v) for v in np.diff(np.r_[0, cuts, L]))
    target = make_target(frozen, planted, tuple(int(rng.integers(0, D + 1)) for _ in planted), seed + 7)
    best, R_best = fnn_best_partition(frozen, target)
    assert sum(best) == L and len(best) == Lbar and min(best) >= 1
    assert R_best == fnn_rank_requirement(frozen, target, best)
    brute = min(fnn_rank_requirement(frozen, target, p) for p in partitions(L, Lbar))
    assert R_best == brute
    assert R_best <= fnn_rank_requirement(frozen, target)  # never worse than uniform
    assert R_best <= fnn_rank_requirement(frozen, target, planted)


# ------------------------------------------------------------------------------------------ plain tests


@ill_conditioned_ok
@pytest.mark.parametrize("L, Lbar, expected", [(2, 1, 8), (4, 2, 8), (8, 1, 2)])
def test_paper_thresholds_at_width_16(L, Lbar, expected):
    """Zeng & Lee 2024, Theorem 3 at D = 16: generic instances need exactly ceil(D / floor(L / L̄))."""
    assert fnn_rank_threshold(16, L, Lbar) == expected
    for seed in range(3):
        frozen, target = random_fnn(16, L, seed=seed), random_fnn(16, Lbar, seed=100 + seed)
        assert fnn_rank_requirement(frozen, target) == expected
        if L <= 4:  # 8-layer blocks: not float64 material
            fit = lora_fnn(frozen, target, expected, input_radius=10.0)
            assert fit.exact and not lora_fnn(frozen, target, expected - 1, input_radius=10.0).exact
            x = sample_ball(np.zeros(16), 10.0, 500, seed)
            err = relative_error(fit.model(x), target(x))
            assert err <= fit.tolerance and err <= 1e-8  # blocks of 2 layers: flat 1e-8


def test_not_exact_one_rank_below_on_generic_weights():
    """One rank below the threshold the function differs from the target (affine output layer)."""
    frozen = random_fnn(8, 2, seed=3, final_relu=False)
    target = random_fnn(8, 1, seed=4, final_relu=False)
    x = sample_ball(np.zeros(8), 5.0, 300, 0)
    fit = lora_fnn(frozen, target, 3, input_radius=5.0)
    assert not fit.exact
    assert relative_error(fit.model(x), target(x)) > 1e3 * fit.tolerance


def test_rank_zero_gives_biases_only():
    frozen, target = random_fnn(6, 2, seed=0), random_fnn(6, 1, seed=1)
    fit = lora_fnn(frozen, target, 0, input_radius=1.0)
    assert all(a.rank == 0 for a in fit.adapters)
    for W, M in zip(frozen.weights, fit.model.weights):
        assert np.array_equal(W, M)
    assert not fit.exact and fit.block_directions == (0,)


def test_equal_depth_needs_no_linearising_bias():
    """Blocks of one layer: b = c_i directly, and R >= rank(T_i - W_i) is exact for every input scale."""
    frozen, target = random_fnn(6, 3, seed=5), random_fnn(6, 3, seed=6)
    fit = lora_fnn(frozen, target, 6, input_radius=1.0)
    for b, c in zip(fit.model.biases, target.biases):
        assert np.array_equal(b, c)
    assert all(bf.levels == () for bf in fit.block_fits)
    x = 1e3 * np.random.default_rng(0).standard_normal((50, 6))
    assert relative_error(fit.model(x), target(x)) <= fit.tolerance


def test_final_relu_false_output_layer_is_affine():
    frozen = random_fnn(8, 4, seed=8, final_relu=False)
    target = random_fnn(8, 2, seed=9, final_relu=False)
    fit = lora_fnn(frozen, target, 4, input_radius=4.0, center=np.full(8, 0.5))
    assert fit.model.final_relu is False and fit.exact
    x = sample_ball(np.full(8, 0.5), 4.0, 400, 1)
    assert relative_error(fit.model(x), target(x)) <= fit.tolerance
    assert (target(x) < 0).any()  # the output really is affine


def test_records_ball_domain_and_condition_numbers():
    frozen, target = random_fnn(8, 4, seed=1), random_fnn(8, 2, seed=2)
    center = np.linspace(-1, 1, 8)
    fit = lora_fnn(frozen, target, 4, input_radius=2.5, center=center)
    d = fit.domain
    assert d.kind == "ball" and d.radius == 2.5 and np.array_equal(d.center, center)
    assert d.margin is None and d.n_samples is None
    assert len(d.block_input_radii) == 2 and d.block_input_radii[0] == 2.5
    # the second block's ball: radius ||W̃_1||_2 r + ||W̃_1 u_0 + c_1||, centre 0
    W1 = fit.block_fits[0].realised
    assert d.block_input_radii[1] == pytest.approx(
        np.linalg.norm(W1, 2) * 2.5 + np.linalg.norm(W1 @ center + target.biases[0])
    )
    assert set(fit.condition_numbers) == {"block 1: Q_1", "block 1: P_2", "block 2: Q_1", "block 2: P_2"}
    assert fit.kappa == max(fit.condition_numbers.values())
    assert fit.tolerance == tolerance(fit.kappa, fit.gamma)
    assert fit.gamma >= len(fit.block_fits)  # at least one per layer's output
    assert fit.partition == uniform_partition(4, 2) and fit.ranks == (4,) * 4


def test_sample_domain_with_margin_is_exact_on_its_samples():
    frozen, target = random_fnn(8, 4, seed=11), random_fnn(8, 2, seed=12)
    X = np.random.default_rng(0).standard_normal((256, 8))
    fit = lora_fnn(frozen, target, 4, inputs=X, margin=3.0)
    assert fit.exact
    d = fit.domain
    assert d.kind == "samples" and d.margin == 3.0 and d.n_samples == 256
    assert d.center is None and d.radius is None and not d.contains(X).any()
    assert relative_error(fit.model(X), target(X)) <= fit.tolerance
    # the literal transcription of the sample mode agrees
    _, biases, _ = reference_fnn(frozen, target, fit.ranks, fit.partition, samples=X, margin=3.0)
    for mine, ref in zip(fit.model.biases, biases):
        assert np.allclose(mine, ref, rtol=1e-10, atol=1e-12)


def test_distribution_shift_breaks_sample_calibration_not_a_certified_ball():
    """Biases sized on N(0, I) samples (margin 2) fail on inputs 5x larger for some instance; a ball
    certified for the shifted inputs stays exact on them (THEORY.md §2.3, the authors' shift test)."""
    rng = np.random.default_rng(0)
    failures = 0
    for seed in range(5):
        frozen, target = random_fnn(16, 2, seed=seed), random_fnn(16, 1, seed=50 + seed)
        train = rng.standard_normal((256, 16))
        shifted = 5 * rng.standard_normal((2000, 16))
        empirical = lora_fnn(frozen, target, 8, inputs=train)
        assert relative_error(empirical.model(train), target(train)) <= empirical.tolerance
        if relative_error(empirical.model(shifted), target(shifted)) > 1e-3:
            failures += 1
        radius = float(np.linalg.norm(shifted, axis=1).max())
        certified = lora_fnn(frozen, target, 8, input_radius=radius)
        assert relative_error(certified.model(shifted), target(shifted)) <= certified.tolerance
    assert failures >= 1


@ill_conditioned_ok
def test_compensating_biases_stay_small_unlike_plain_levels():
    """Regression (THEORY.md §2.3, non-compensating bias blow-up): with plain levels b_j = β_j·1 every β_j
    must cover the constant carried from the earlier layers times ||M_j||, and a 4-layer block's biases
    compound; compensating biases size each level for its own pre-activation P_j u only."""
    frozen, target = random_fnn(16, 4, seed=2), random_fnn(16, 1, seed=3)
    radius = 10.0
    fit = lora_fnn(frozen, target, 4, input_radius=radius)  # a 4-layer block: it may warn
    M = fit.model.weights
    for j, beta in enumerate(fit.block_fits[0].levels):
        P = product(M[: j + 1])
        own = radius * np.linalg.norm(P, axis=1).max()  # the pre-activation's own reach
        assert beta <= own * (1 + 2 * SAFETY) + SAFETY * radius * np.linalg.norm(P, 2)
    _, plain_biases, plain_levels = reference_fnn(
        frozen, target, fit.ranks, fit.partition, ball=(np.zeros(16), radius), compensating=False
    )
    levels = fit.block_fits[0].levels
    assert plain_levels[0][-1] > 10 * levels[-1]  # the last level compounds
    assert max(np.abs(b).max() for b in plain_biases) > 10 * max(np.abs(b).max() for b in fit.model.biases)
    x = sample_ball(np.zeros(16), radius, 1000, 0)
    assert relative_error(fit.model(x), target(x)) <= fit.tolerance


def test_next_block_sized_after_last_bias_and_relu():
    """Regression (the authors' bug, THEORY.md §4): sizing block 2's biases from block 1's activations before
    its last bias and ReLU breaks exactness; passing them through (as lora_fnn does) keeps it."""
    D = 8
    frozen = random_fnn(D, 4, seed=21)
    target = make_target(frozen, (2, 2), (D, D), seed=22, bias_scale=0.0)
    # a large positive first-layer target bias: the true block-2 inputs are shifted far from W̃_1 u
    target = target.replace(biases=[np.full(D, 5.0), np.zeros(D)])
    X = np.random.default_rng(1).standard_normal((256, D))
    fit = lora_fnn(frozen, target, D, partition=(2, 2), inputs=X)
    assert fit.exact and relative_error(fit.model(X), target(X)) <= fit.tolerance
    weights, biases, _ = reference_fnn(frozen, target, (D,) * 4, (2, 2), samples=X, through_last_bias=False)
    buggy = _reference_model(frozen, weights, biases)
    assert relative_error(buggy(X), target(X)) > 1e-3


def test_block_discrepancies_and_requirement():
    frozen, target = random_fnn(5, 3, seed=0), random_fnn(5, 2, seed=1)
    E = block_discrepancies(frozen, target, (2, 1))
    assert np.allclose(E[0], target.weights[0] - frozen.weights[1] @ frozen.weights[0])
    assert np.allclose(E[1], target.weights[1] - frozen.weights[2])
    assert fnn_rank_requirement(frozen, target, (2, 1)) == 5  # max(ceil(5/2), ceil(5/1))
    assert fnn_best_partition(frozen, target) == ((1, 2), 5)  # ties: lexicographically smallest


def test_singular_first_layer_is_fine_when_adapted_one_is_invertible():
    """THEORY.md §2.1: W_1 is never inverted by itself; rank(W_1) + R >= D makes W_1 + Δ_1 invertible."""
    rng = np.random.default_rng(4)
    frozen = random_fnn(6, 2, seed=4)
    W1 = frozen.weights[0].copy()
    W1[-1] = W1[0]  # rank D - 1
    frozen = frozen.replace(weights=[W1, frozen.weights[1]])
    target = random_fnn(6, 1, seed=rng)
    fit = lora_fnn(frozen, target, 3, input_radius=1.0)
    x = sample_ball(np.zeros(6), 1.0, 200, 0)
    assert fit.exact and relative_error(fit.model(x), target(x)) <= fit.tolerance


def test_sample_ball_stays_inside():
    x = sample_ball(np.ones(5), 2.0, 1000, 3)
    assert x.shape == (1000, 5)
    assert (np.linalg.norm(x - 1, axis=1) <= 2.0).all()
    assert np.linalg.norm(x - 1, axis=1).max() > 1.8  # reaches near the sphere


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, argument, message",
    [
        ({}, "input_radius", "no domain"),
        ({"input_radius": 1.0, "inputs": np.zeros((3, 4))}, "inputs", "two domains"),
        ({"input_radius": 0.0}, "input_radius", "positive"),
        ({"input_radius": -1.0}, "input_radius", "positive"),
        ({"input_radius": float("nan")}, "input_radius", "positive"),
        ({"input_radius": float("inf")}, "input_radius", "positive"),
        ({"input_radius": "1"}, "input_radius", "real number"),
        ({"center": np.zeros(4)}, "center", "needs input_radius"),
        ({"center": np.zeros(4), "inputs": np.zeros((2, 4))}, "center", "needs input_radius"),
        ({"input_radius": 1.0, "center": np.zeros(3)}, "center", "shape"),
        ({"input_radius": 1.0, "center": np.array([0, np.nan, 0, 0])}, "center", "NaN"),
        ({"inputs": np.zeros((3, 5))}, "inputs", "shape"),
        ({"inputs": np.zeros(4)}, "inputs", "dimensions"),
        ({"inputs": np.zeros((0, 4))}, "inputs", "at least one"),
        ({"inputs": np.full((2, 4), np.inf)}, "inputs", "NaN or infinite"),
        ({"inputs": np.zeros((2, 4)), "margin": 0.5}, "margin", ">= 1"),
        ({"inputs": np.zeros((2, 4)), "margin": float("nan")}, "margin", ">= 1"),
    ],
)
def test_bad_domain(kwargs, argument, message):
    frozen, target = fnn_pair()
    with pytest.raises(InvalidArgumentError, match=message) as info:
        lora_fnn(frozen, target, 2, **kwargs)
    assert info.value.argument == argument


@pytest.mark.parametrize(
    "rank, argument, message",
    [
        (1.5, "rank", "integer"),
        ("2", "rank", "integer"),
        (True, "rank", "integer"),
        (-1, "rank", "at least 0"),
        (5, "rank", "at most 4"),
        ([1, 2, 3], "rank", "one rank for each of the 2 layers"),
        ([1], "rank", "one rank for each of the 2 layers"),
        ([1, -2], r"rank[1]", "at least 0"),
        ([1, 2.0], r"rank[1]", "integer"),
    ],
)
def test_bad_rank(rank, argument, message):
    frozen, target = fnn_pair()
    with pytest.raises(InvalidArgumentError, match=message) as info:
        lora_fnn(frozen, target, rank, input_radius=1.0)
    assert info.value.argument == argument


@pytest.mark.parametrize(
    "partition, message",
    [
        ((3, 0), "empty block"),
        ((1, 1), "cover the L = 3"),
        ((3,), "one block per target layer"),
        ((1, 1, 1), "one block per target layer"),
        ("21", "sequence of block sizes"),
        ((1.5, 1.5), "integer"),
    ],
)
def test_bad_partition(partition, message):
    frozen, target = fnn_pair(L=3, Lbar=2)
    with pytest.raises(InvalidArgumentError, match=message):
        lora_fnn(frozen, target, 1, partition=partition, input_radius=1.0)
    with pytest.raises(InvalidArgumentError, match=message):
        fnn_rank_requirement(frozen, target, partition)


def test_bad_models():
    frozen, target = fnn_pair()
    with pytest.raises(InvalidArgumentError, match="exceeds the frozen depth") as info:
        lora_fnn(frozen, random_fnn(4, 3, seed=2), 1, input_radius=1.0)
    assert info.value.argument == "target"
    with pytest.raises(InvalidArgumentError, match="width D = 4") as info:
        lora_fnn(frozen, random_fnn(5, 1, seed=2), 1, input_radius=1.0)
    assert info.value.argument == "target"
    with pytest.raises(InvalidArgumentError, match="final_relu"):
        lora_fnn(frozen, random_fnn(4, 1, seed=2, final_relu=False), 1, input_radius=1.0)
    with pytest.raises(InvalidArgumentError, match="activation"):
        lora_fnn(frozen, random_fnn(4, 1, seed=2, activation="linear"), 1, input_radius=1.0)
    with pytest.raises(InvalidArgumentError, match="must be a lora_theory.FNN") as info:
        lora_fnn(list(frozen.weights), target, 1, input_radius=1.0)
    assert info.value.argument == "frozen"
    with pytest.raises(InvalidArgumentError, match="must be a lora_theory.FNN") as info:
        lora_fnn(frozen, target.weights[0], 1, input_radius=1.0)
    assert info.value.argument == "target"
    with pytest.raises(InvalidArgumentError, match="exceeds the frozen depth"):
        fnn_best_partition(frozen, random_fnn(4, 3, seed=2))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        FNN([np.full((4, 4), np.nan)])


def test_singular_matrix_named_with_its_block_and_kappa():
    frozen, target = fnn_pair(D=4, L=3, Lbar=2)
    W = list(frozen.weights)
    W[2] = np.zeros((4, 4))  # block 2 = layers 2, 3: Q_1 = W_3
    frozen = frozen.replace(weights=W)
    with pytest.raises(SingularMatrixError, match=r"block 2: Q_1 = W_3") as info:
        lora_fnn(frozen, target, 2, partition=(1, 2), input_radius=1.0)
    assert math.isinf(info.value.condition_number) or info.value.condition_number > 1e15
    assert "κ =" in str(info.value)
    # a zero first layer: W_1 + Δ_1 has rank <= R < D, and layer 2 must invert it
    frozen2 = random_fnn(4, 2, seed=3)
    frozen2 = frozen2.replace(weights=[np.zeros((4, 4)), frozen2.weights[1]])
    with pytest.raises(SingularMatrixError, match=r"P_2 = \(W_1 \+ Δ\)"):
        lora_fnn(frozen2, random_fnn(4, 1, seed=4), 2, input_radius=1.0)


def test_ill_conditioning_warns_with_kappa_and_gamma():
    frozen, target = random_fnn(6, 2, seed=0), random_fnn(6, 1, seed=1)
    W2 = frozen.weights[1].copy()
    u, s, vt = np.linalg.svd(W2)
    s[-1] = s[0] * 1e-10  # κ(W_2) = 1e10: Q_1 costs digits
    frozen = frozen.replace(weights=[frozen.weights[0], (u * s) @ vt])
    with pytest.warns(IllConditionedWarning, match=r"κ = .*γ = "):
        fit = lora_fnn(frozen, target, 3, input_radius=1.0)
    assert fit.kappa > 1e9


def test_linear_activation_needs_no_linearising_levels():
    """With activation="linear" no ReLU needs keeping active: the levels are 0 and the fit is exact for every
    input, inside the declared ball or not."""
    frozen = random_fnn(6, 4, seed=30, activation="linear")
    target = random_fnn(6, 2, seed=31, activation="linear")
    fit = lora_fnn(frozen, target, 3, input_radius=1.0)
    assert fit.exact and all(set(bf.levels) <= {0.0} for bf in fit.block_fits)
    x = 100 * np.random.default_rng(0).standard_normal((50, 6))
    assert relative_error(fit.model(x), target(x)) <= fit.tolerance


@pytest.mark.parametrize(
    "args, argument, message",
    [
        ((np.zeros(3), 0.0, 5), "radius", "positive"),
        ((np.zeros(3), -1.0, 5), "radius", "positive"),
        ((np.zeros(3), 1.0, -1), "n", "non-negative integer"),
        ((np.zeros(3), 1.0, 2.5), "n", "non-negative integer"),
        ((np.zeros((3, 3)), 1.0, 5), "center", "dimensions"),
        ((np.array([np.nan, 0.0]), 1.0, 5), "center", "NaN"),
    ],
)
def test_bad_sample_ball(args, argument, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        sample_ball(*args)
    assert info.value.argument == argument


def test_domain_contains():
    fit = lora_fnn(*fnn_pair(), 2, input_radius=1.0, center=np.ones(4))
    assert fit.domain.contains(np.ones(4)) and not fit.domain.contains(np.ones(4) * 3)
    assert fit.domain.contains(sample_ball(np.ones(4), 1.0, 20, 0)).all()


# ------------------------------------------- rounding far inside a large ball (absolute vs relative tolerance)


@pytest.mark.parametrize("D, r", [(16, 1e5), (4, 1e8)])
def test_relative_tolerance_does_not_cover_inputs_far_inside_a_large_ball(D, r):
    """The biases are sized for the radius, so the rounding is absolute, ``u·(κ + γ)·s_out`` anywhere in the
    ball; N(0, I) inputs have outputs ``s_out / ||f̄(x)||`` times smaller than the ball's. ``tolerance_at``
    states the per-sample relative tolerance that covers them; (the plain relative ``fit.tolerance`` is not a
    valid claim there: measured 6.6e-10 against 2.8e-10 at D = 16, r = 1e5)."""
    frozen, target = random_fnn(D, 2, seed=0), random_fnn(D, 1, seed=1)
    R = fnn_rank_requirement(frozen, target)
    with pytest.warns(IllConditionedWarning, match=r"radius amplification|a = .* times smaller"):
        fit = lora_fnn(frozen, target, R, input_radius=r)
    assert fit.exact
    x = np.random.default_rng(2).standard_normal((1000, D))  # ||x|| ~ sqrt(D) << r
    y, y_bar = fit.model(x), target(x)
    err = np.linalg.norm(y - y_bar, axis=1)  # (n,)
    assert np.all(err <= fit.absolute_tolerance)
    assert fit.absolute_tolerance == pytest.approx(fit.tolerance * fit.output_radius)
    tol_at = fit.tolerance_at(x)  # (n,)
    nonzero = np.linalg.norm(y_bar, axis=1) > 0
    assert np.all(err[nonzero] / np.linalg.norm(y_bar[nonzero], axis=1) <= tol_at[nonzero])
    assert np.all(np.isinf(tol_at[~nonzero]))
    assert np.all(tol_at[nonzero] >= fit.tolerance)  # outputs on the ball are <= s_out
    assert fit.tolerance_at(x[0]) == pytest.approx(tol_at[0])
    # the warning's amplification is the ratio of the ball's output size to a unit ball's around the centre
    assert fit.radius_amplification > 1e3
    assert fit.tolerance_at(np.full(D, 2 * r)) == math.inf  # outside the ball: no guarantee


@ill_conditioned_ok
def test_tolerance_at_on_the_sphere_and_small_balls():
    frozen, target = random_fnn(6, 2, seed=3), random_fnn(6, 1, seed=4)
    fit = lora_fnn(frozen, target, 3, input_radius=1.0)
    assert fit.radius_amplification == 1.0  # radius <= 1: nothing to dilute
    x = sample_ball(np.zeros(6), 1.0, 200, 5)
    err = np.linalg.norm(fit.model(x) - target(x), axis=1)
    assert np.all(err <= fit.absolute_tolerance)
    ref = np.linalg.norm(target(x), axis=1)
    tol_at = fit.tolerance_at(x)
    np.testing.assert_allclose(tol_at[ref > 0], fit.tolerance * fit.output_radius / ref[ref > 0], rtol=1e-12)
    with pytest.raises(InvalidArgumentError, match=r"^x: must have shape \(D,\) or \(n, D\) with D = 6"):
        fit.tolerance_at(np.zeros((2, 5)))
    samples = lora_fnn(frozen, target, 3, inputs=x)
    assert samples.radius_amplification == 1.0 and np.all(np.isfinite(samples.tolerance_at(x)[ref > 0]))


def test_moderate_ball_does_not_warn_and_large_ball_warns():
    frozen, target = random_fnn(16, 2, seed=0), random_fnn(16, 1, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        fit = lora_fnn(frozen, target, 8, input_radius=10.0)  # u·(κ + γ)·a ~ 2e-12
    assert 1 < fit.radius_amplification < 100
    with pytest.warns(IllConditionedWarning, match=r"u·\(κ \+ γ\)·a = .*certify a smaller ball"):
        lora_fnn(frozen, target, 8, input_radius=1e5)


def test_the_certified_ball_holds_its_sphere_and_nothing_beyond():
    """``Domain.contains``: the centre and points at distance ``r(1 - 1e-9)`` and ``r`` (within the rounding
    allowance ``rtol``) are in the ball, points at ``r(1 + 1e-9)`` are not, a wider ``rtol`` takes them in;
    one point gives a bool, ``n`` points an ``(n,)`` mask; a sample domain contains nothing."""
    frozen, target = random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1)
    center = np.array([0.5, -1.0, 2.0])
    fit = lora_fnn(frozen, target, 3, input_radius=2.0, center=center)
    ball = fit.domain
    direction = np.array([1.0, 2.0, -2.0]) / 3.0  # a unit vector
    on, inside, outside = (center + 2.0 * f * direction for f in (1.0, 1 - 1e-9, 1 + 1e-9))
    assert ball.contains(center) is True and ball.contains(inside) is True and ball.contains(on) is True
    assert ball.contains(outside) is False and ball.contains(outside, rtol=1e-8) is True
    mask = ball.contains(np.stack([center, outside, inside]))
    assert mask.shape == (3,) and mask.tolist() == [True, False, True]
    samples = lora_fnn(frozen, target, 3, inputs=np.random.default_rng(0).standard_normal((8, 3))).domain
    assert samples.contains(center) is False and samples.contains(np.stack([center, center])).tolist() == [False, False]


def test_per_sample_tolerance_bounds_the_error_inside_the_ball_and_nothing_outside():
    """``FNNFit.tolerance_at``: for an exact fit, every point of the ball has relative error at most its own
    tolerance, which is ``absolute_tolerance / ||f̄(x)||``; outside the ball, and where ``f̄(x) = 0``, there is
    no claim (``inf``). A single point gives a float."""
    frozen, target = random_fnn(4, 2, seed=3), random_fnn(4, 1, seed=4)
    fit = lora_fnn(frozen, target, 4, input_radius=1.5)
    assert fit.exact
    X = sample_ball(np.zeros(4), 1.5, 64, seed=5)  # (64, 4)
    tol = fit.tolerance_at(X)
    ref = np.linalg.norm(target(X), axis=1)
    assert tol.shape == (64,)
    np.testing.assert_allclose(tol[ref > 0], fit.absolute_tolerance / ref[ref > 0], rtol=1e-12)
    err = np.linalg.norm(fit.model(X) - target(X), axis=1)
    assert np.all(err <= tol * ref)
    far = np.full(4, 10.0)
    assert fit.tolerance_at(far) == np.inf and isinstance(fit.tolerance_at(X[0]), float)
    silent = FNN([np.zeros((4, 4))], [np.zeros(4)])  # a target that is 0 everywhere
    zero_fit = lora_fnn(FNN([np.eye(4)], [np.zeros(4)]), silent, 4, input_radius=1.0)
    assert zero_fit.tolerance_at(np.full(4, 0.1)) == np.inf


def test_check_points_hold_the_minimiser_of_every_first_block_pre_activation():
    """The points ``lora_fnn`` checks its own result on (``_check_points``): all in the certified ball; the
    centre; for every partial product ``P_j`` of the first block and every non-zero row ``p_k``, the point of the
    ball where ``p_k·u`` is smallest (``u_0 - r p_k/||p_k||``, where the linearising level is tight); and more
    samples. A sample domain is checked on its samples, at most 1024 of them spread over all."""
    from lora_theory.fnn import Domain, _check_points

    rng = np.random.default_rng(0)
    center, r = rng.standard_normal(3), 0.7
    partials = [rng.standard_normal((3, 3)), np.vstack([rng.standard_normal((2, 3)), np.zeros((1, 3))])]
    ball = Domain(kind="ball", center=center, radius=r, margin=None, n_samples=None)
    points = _check_points(ball, None, partials)  # (n, 3)
    assert np.all(np.linalg.norm(points - center, axis=1) <= r)
    assert any(np.array_equal(p, center) for p in points)
    for P in partials:
        for p in P[np.linalg.norm(P, axis=1) > 0]:
            lowest = center @ p - r * np.linalg.norm(p)  # min over the ball of p·u
            assert np.min(points @ p) <= lowest + 1e-9 * r * np.linalg.norm(p)
    assert len(points) > 1 + sum(int(np.sum(np.linalg.norm(P, axis=1) > 0)) for P in partials) + 16

    X = rng.standard_normal((3000, 3))
    samples = Domain(kind="samples", center=None, radius=None, margin=2.0, n_samples=3000)
    checked = _check_points(samples, X, partials)
    assert checked.shape == (1024, 3) and np.array_equal(checked[0], X[0]) and np.array_equal(checked[-1], X[-1])
    assert len({tuple(x) for x in checked}) == 1024
    assert np.array_equal(_check_points(samples, X[:10], partials), X[:10])


# ------------------------------------------------------------------------ claims pinned by mutation testing


def _scaled_domain_fit(frozen, target, t, rank, center, radius):
    """``lora_fnn`` with the ball and the target's biases scaled by ``t``: the same instance in other units."""
    scaled = FNN(target.weights, [t * c for c in target.biases], final_relu=target.final_relu)
    return lora_fnn(frozen, scaled, rank, input_radius=t * radius, center=t * center)


@pytest.mark.parametrize("t", [1e-3, 1e3])
def test_gamma_is_independent_of_the_units_of_inputs_and_biases(t):
    """``γ_i`` is a *relative* rounding (magnitudes summed over the output size): scaling the ball and the
    target's biases by ``t`` scales every magnitude and the output size alike (the levels ``β_j`` and the
    compensating biases are linear in the ball), so each block's ``γ_i`` and the radius amplification are
    unchanged, whether the output size falls below 1 or not."""
    frozen, target = random_fnn(4, 4, seed=11), random_fnn(4, 2, seed=12)
    center = np.array([0.3, -0.2, 0.1, 0.4])
    base = _scaled_domain_fit(frozen, target, 1.0, 4, center, 0.8)
    other = _scaled_domain_fit(frozen, target, t, 4, center, 0.8)
    assert [b.gamma for b in base.block_fits] == pytest.approx([b.gamma for b in other.block_fits], rel=1e-9)
    assert all(b.gamma > 0 for b in other.block_fits)


def test_gamma_counts_the_rounding_the_discrepancy_inherits_from_both_its_terms():
    """``E_i = T_i - Π W_l`` is a float64 difference whose rounding is relative to ``||T_i|| + ||Π W_l||``,
    not to their difference: a one-layer block whose frozen weight is 100 times the target's counts at
    least ``(||T|| + ||W||)·in_size`` over the output size in its ``γ`` (THEORY.md §2.3)."""
    rng = np.random.default_rng(3)
    T, W = rng.standard_normal((3, 3)), 100.0 * rng.standard_normal((3, 3))
    frozen = FNN([W], [np.zeros(3)])
    target = FNN([T], [rng.standard_normal(3)])
    fit = lora_fnn(frozen, target, 3, input_radius=1.0)
    (block,) = fit.block_fits
    floor = (np.linalg.norm(T, 2) + np.linalg.norm(W, 2)) * block.input_radius / block.output_radius
    assert block.gamma >= floor


def test_a_target_that_is_zero_has_no_relative_rounding_and_no_amplification():
    """A target whose output is 0 on the whole ball (zero weights and biases): the output size is 0, so there
    is no relative rounding to count (``γ = 0``) and no output the ball's size could magnify (``a = 1``);
    the construction is exact. (The frozen layer is the identity, so that ``W + Δ`` is exactly 0 in float64.)"""
    silent = FNN([np.zeros((3, 3))], [np.zeros(3)])
    fit = lora_fnn(FNN([np.eye(3)], [np.zeros(3)]), silent, 3, input_radius=5.0)  # Δ = -I, realised exactly
    assert fit.output_radius == 0.0
    assert fit.gamma == 0.0 and fit.radius_amplification == 1.0 and fit.exact


def test_radius_amplification_is_the_output_size_over_that_of_the_unit_ball():
    """``a = s_out / s_1``, ``s_1`` the output size of the inputs within distance 1 of the centre. With zero
    biases, centre 0 and orthogonal-times-scale realised blocks the output bound of the ball of radius ``ρ``
    is ``ρ·Π_i s_i`` exactly (attained on every direction), so a ball of radius 1.5 gives ``a = 1.5`` and
    a ball of radius 0.5, whose inputs are all unit-size or smaller, ``a = 1``; whatever the size of the
    product (the scales 0.3 and 0.2 make it small)."""
    Q1, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    Q2, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))
    target = FNN([0.3 * Q1, 0.2 * Q2], [np.zeros(3), np.zeros(3)], activation="linear")
    frozen = FNN([np.eye(3), np.eye(3)], [np.zeros(3), np.zeros(3)], activation="linear")
    for radius, a in ((1.5, 1.5), (0.5, 1.0), (4.0, 4.0)):
        fit = lora_fnn(frozen, target, 3, partition=(1, 1), input_radius=radius)
        assert fit.radius_amplification == pytest.approx(a, rel=1e-12)
    # a centre off 0 and a bias: s_1 = ||T||(1) + ||T u_0 + c||, through both blocks
    c1 = np.array([0.5, 0.0, 0.0])
    biased = FNN([0.3 * Q1, 0.2 * Q2], [c1, np.zeros(3)], activation="linear")
    u0 = np.array([0.0, 2.0, 0.0])
    fit = lora_fnn(frozen, biased, 3, partition=(1, 1), input_radius=3.0, center=u0)
    s1_first = 0.3 * 1.0 + np.linalg.norm(0.3 * Q1 @ u0 + c1)
    s_out_first = 0.3 * 3.0 + np.linalg.norm(0.3 * Q1 @ u0 + c1)
    assert fit.radius_amplification == pytest.approx(s_out_first / s1_first, rel=1e-12)


def test_the_fit_checks_itself_on_the_same_points_every_time():
    """``measured_error`` is reproducible: the sampled check points come from a fixed seed, so two identical
    constructions report the same measured error (and the same exactness), and the points are the same."""
    frozen, target = random_fnn(4, 2, seed=21), random_fnn(4, 1, seed=22)
    first, second = (lora_fnn(frozen, target, 4, input_radius=2.0) for _ in range(2))
    assert first.measured_error == second.measured_error
    from lora_theory.fnn import _check_points

    partials = [np.eye(4)]
    points = [_check_points(first.domain, None, partials) for _ in range(2)]
    assert np.array_equal(*points)


def test_a_sample_domain_is_checked_on_at_most_1024_samples():
    """More than 1024 samples (here 1025) are thinned to 1024 spread over all of them; 1024 are kept whole."""
    from lora_theory.fnn import Domain, _check_points

    X = np.random.default_rng(0).standard_normal((1025, 3))
    samples = Domain(kind="samples", center=None, radius=None, margin=2.0, n_samples=1025)
    assert _check_points(samples, X, []).shape == (1024, 3)
    assert np.array_equal(_check_points(samples, X[:1024], []), X[:1024])


def test_the_ball_holds_its_exact_sphere_and_the_default_allowance_is_1e_12():
    """``Domain.contains``: a point exactly at the radius is inside with no allowance (``rtol=0``);
    ``rtol=None`` is the default 1e-12 (a point 1e-9 outside is out, 1e-13 outside in); masks are boolean
    and keep every leading axis, for a ball and for samples."""
    from lora_theory.fnn import Domain

    ball = Domain(kind="ball", center=np.zeros(3), radius=2.0, margin=None, n_samples=None)
    assert ball.contains(np.array([2.0, 0.0, 0.0]), rtol=0.0) is True
    assert ball.contains(np.array([2.0 * (1 + 1e-9), 0.0, 0.0]), rtol=None) is False
    assert ball.contains(np.array([2.0 * (1 + 1e-13), 0.0, 0.0]), rtol=None) is True
    samples = Domain(kind="samples", center=None, radius=None, margin=2.0, n_samples=4)
    for domain in (ball, samples):
        mask = domain.contains(np.zeros((2, 5, 3)))
        assert mask.shape == (2, 5) and mask.dtype == bool


def test_per_sample_tolerance_refuses_a_batch_of_batches():
    """``tolerance_at`` takes ``(D,)`` or ``(n, D)``: a ``(2, n, D)`` array (whatever ``n``), the wrong width or
    a NaN is refused with a message naming ``x``."""
    fit = lora_fnn(random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1), 3, input_radius=1.0)
    for bad in (np.zeros((2, 3, 3)), np.zeros((2, 4, 3)), np.zeros((4, 2))):
        with pytest.raises(InvalidArgumentError, match=r"^x: must have shape \(D,\) or \(n, D\) with D = 3"):
            fit.tolerance_at(bad)
    with pytest.raises(InvalidArgumentError, match="^x: contains NaN or infinite entries$"):
        fit.tolerance_at(np.array([0.0, np.nan, 0.0]))


def test_domain_refusals_say_what_to_pass():
    """``lora_fnn``'s domain arguments: a centre without a radius, no domain, two domains and a margin that is
    not a real number ``>= 1`` (a bool or a string included) are refused with the whole reason."""
    frozen, target = random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1)
    X = np.zeros((4, 3))
    cases = [
        (
            {"center": np.zeros(3), "inputs": X},
            "center: a centre needs input_radius (it defines a ball); samples have none",
        ),
        ({}, "input_radius: no domain given: pass input_radius (a certified ball) or inputs (samples)"),
        (
            {"input_radius": 1.0, "inputs": X},
            "inputs: two domains given: pass either input_radius (a ball) or inputs (samples), not both",
        ),
        ({"inputs": X, "margin": True}, "margin: must be a finite real number >= 1 (multiplicative), got True"),
        ({"inputs": X, "margin": "2"}, "margin: must be a finite real number >= 1 (multiplicative), got '2'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidArgumentError) as info:
            lora_fnn(frozen, target, 3, **kwargs)
        assert str(info.value) == message


def _reference_bookkeeping(fit, frozen, target, X=None):
    """The documented rounding bookkeeping of an ``FNNFit`` (its ``gamma`` docstring), transcribed from the
    fit's own weights, adapters and levels: per block ``(γ_i, s_out_i)``, then ``measured_error``."""
    D, L = frozen.width, frozen.depth
    ball = fit.domain.kind == "ball"
    u0, r = (fit.domain.center, fit.domain.radius) if ball else (None, None)
    U = X
    out, first_partials = [], []
    for i, block in enumerate(partition_blocks(fit.partition)):
        M = [fit.model.weights[l] for l in block]
        Wf = [frozen.weights[l] for l in block]
        deltas = [fit.adapters[l].delta for l in block]
        bs = [fit.model.biases[l] for l in block]
        levels = fit.block_fits[i].levels
        sizes = [np.linalg.norm(u0) + r if ball else np.linalg.norm(U, axis=1).max()]  # s_0
        for j in range(len(M) - 1):
            P = product(M[: j + 1])  # P_j = M_j ... M_1
            if i == 0:
                first_partials.append(P)
            if ball:
                sizes.append(np.linalg.norm(P @ u0) + r * np.linalg.norm(P, 2) + levels[j] * math.sqrt(D))
            else:
                sizes.append(np.linalg.norm(U @ P.T + levels[j], axis=1).max())
        W_tilde = product(M)
        if ball:
            s_out = np.linalg.norm(W_tilde, 2) * r + np.linalg.norm(W_tilde @ u0 + target.biases[i])
        else:
            Z = U
            for j, (Mj, bj) in enumerate(zip(M, bs)):
                Z = Z @ Mj.T + bj
                if j == len(M) - 1:
                    s_out = np.linalg.norm(Z, axis=1).max()
                if frozen.activation == "relu" and (block.start + j < L - 1 or frozen.final_relu):
                    Z = np.maximum(Z, 0.0)
        after = [np.linalg.norm(product(M[j + 1 :]), 2) for j in range(len(M) - 1)] + [1.0]
        total = sum(
            after[j] * ((np.linalg.norm(Wf[j], 2) + np.linalg.norm(deltas[j], 2)) * sizes[j] + np.linalg.norm(bs[j]))
            for j in range(len(M))
        )
        total += (np.linalg.norm(target.weights[i], 2) + np.linalg.norm(product(Wf), 2)) * sizes[0]
        out.append((total / s_out, s_out))
        if ball:
            u0, r = np.zeros(D), s_out
        else:
            U = Z
    from lora_theory.fnn import _check_points

    points = _check_points(fit.domain, X, first_partials)
    miss = np.linalg.norm(fit.model(points) - target(points), axis=1).max()
    return out, miss / out[-1][1]


@pytest.mark.parametrize("mode", ["ball", "samples"])
@pytest.mark.parametrize(
    ("D", "L", "Lbar", "ranks", "activation", "final_relu", "partition"),
    [
        (3, 4, 2, 2, "relu", True, None),
        (4, 5, 2, 1, "relu", False, None),  # below the threshold: a measured error of order 1
        (3, 3, 1, 1, "relu", True, None),
        (3, 4, 2, 2, "linear", True, None),
        (3, 4, 2, 2, "relu", False, (3, 1)),  # a block ends at layer L - 1: its ReLU feeds the last block
    ],
)
def test_rounding_bookkeeping_matches_its_documented_definition(
    mode, D, L, Lbar, ranks, activation, final_relu, partition
):
    """Equivalence with a reference: every block's ``γ_i`` and output size ``s_out``, and the fit's
    ``measured_error``, are those the ``FNNFit`` docstring defines (spectral norms of the added factors and
    of the layers after each one, bias norms, the input sizes ``s_j`` of the ball or of the samples, the
    rounding ``E_i`` inherits from both its terms; the worst check point's error over ``s_out``),
    recomputed here from the fit's own weights, adapters and levels; on blocks of one to four layers, a
    final ReLU or none, linear activations, at and below the threshold, uniform and other partitions."""
    rng = np.random.default_rng(D * 100 + L * 10 + Lbar)
    frozen = random_fnn(D, L, seed=int(rng.integers(1000)), activation=activation, final_relu=final_relu)
    target = random_fnn(D, Lbar, seed=int(rng.integers(1000)), activation=activation, final_relu=final_relu)
    X = rng.standard_normal((40, D)) if mode == "samples" else None
    kwargs = {"input_radius": 1.7, "center": rng.uniform(-1, 1, D)} if mode == "ball" else {"inputs": X}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        fit = lora_fnn(frozen, target, ranks, partition=partition, **kwargs)
    blocks, measured = _reference_bookkeeping(fit, frozen, target, X)
    assert [b.gamma for b in fit.block_fits] == pytest.approx([g for g, _ in blocks], rel=1e-9)
    assert [b.output_radius for b in fit.block_fits] == pytest.approx([s for _, s in blocks], rel=1e-12)
    assert fit.measured_error == pytest.approx(measured, rel=1e-12)


def test_below_the_threshold_the_measured_error_does_not_depend_on_units():
    """``measured_error`` is relative to the output size ``s_out``: below the threshold (an error of order
    one), scaling the ball and the target's biases by ``t`` leaves it unchanged, whether ``s_out`` is below 1
    or above."""
    frozen, target = random_fnn(4, 4, seed=31), random_fnn(4, 2, seed=32)
    center = np.array([0.2, 0.1, -0.3, 0.0])
    errors = [_scaled_domain_fit(frozen, target, t, 1, center, 0.9).measured_error for t in (1e-4, 1.0, 1e4)]
    assert errors[1] > 1e-3
    assert errors == pytest.approx([errors[1]] * 3, rel=1e-6)


def test_block_fits_describe_their_blocks():
    """Each ``BlockFit`` holds its layers, the adapters of those layers (those of the fit), its discrepancy
    ``E_i = T_i - Π W_l`` and that matrix's singular values, the ``κ`` of what it inverted (also in the fit's
    ``condition_numbers`` under ``"block i: ..."``) and its input radius (the ball's, then the previous
    block's output radius); the fit keeps the frozen model and the target it was given."""
    frozen, target = random_fnn(3, 5, seed=41), random_fnn(3, 2, seed=42)
    fit = lora_fnn(frozen, target, 3, partition=(2, 3), input_radius=1.3, center=np.array([0.1, 0.0, -0.2]))
    assert fit.frozen is frozen and fit.target is target
    E = block_discrepancies(frozen, target, (2, 3))
    for i, (bf, block) in enumerate(zip(fit.block_fits, partition_blocks((2, 3)))):
        assert tuple(bf.layers) == tuple(block)
        assert bf.adapters == tuple(fit.adapters[l] for l in block)
        np.testing.assert_array_equal(bf.discrepancy, E[i])
        np.testing.assert_allclose(bf.singular_values, np.linalg.svd(E[i], compute_uv=False), rtol=1e-12)
        assert bf.condition_numbers and all(
            fit.condition_numbers[f"block {i + 1}: {k}"] == v for k, v in bf.condition_numbers.items()
        )
    assert fit.block_fits[0].input_radius == 1.3
    assert fit.block_fits[1].input_radius == fit.block_fits[0].output_radius


def test_kappa_is_1_when_nothing_is_inverted():
    """Blocks of one layer invert nothing (no ``P_j`` or ``Q_j``): no condition numbers, ``κ = 1``."""
    fit = lora_fnn(random_fnn(3, 2, seed=0), random_fnn(3, 2, seed=1), 3, input_radius=1.0)
    assert fit.condition_numbers == {} and fit.kappa == 1.0


def test_sample_domain_margin_defaults_to_2():
    """``margin`` defaults to 2 (the documented signature), recorded in the domain; 1 is allowed, less is not."""
    frozen, target = random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1)
    X = np.random.default_rng(0).standard_normal((10, 3))
    assert lora_fnn(frozen, target, 3, inputs=X).domain.margin == 2.0
    assert lora_fnn(frozen, target, 3, inputs=X, margin=1).domain.margin == 1.0
    with pytest.raises(InvalidArgumentError, match="^margin: "):
        lora_fnn(frozen, target, 3, inputs=X, margin=0.999)
    with pytest.raises(InvalidArgumentError, match="^inputs: must hold at least one sample$"):
        lora_fnn(frozen, target, 3, inputs=np.zeros((0, 3)))


def test_a_ball_too_large_for_unit_inputs_is_not_called_exact_and_the_warnings_say_why():
    """Radius 1e12: the tolerance relative to ``s_out`` holds, but inputs within distance 1 of the centre have
    outputs ``a ~ 5e11`` times smaller, so the claim says nothing about them: ``exact`` is False though the
    rank suffices, and the warnings name Theorem 3's construction, the amplification and its reason. A
    radius of 1 has ``a = 1`` and no amplification in its warnings."""
    frozen, target = random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = lora_fnn(frozen, target, 3, input_radius=1e12)
    assert fit.rank_sufficient and not fit.exact and fit.measured_error <= fit.tolerance
    texts = [str(w.message) for w in caught if issubclass(w.category, IllConditionedWarning)]
    assert any(
        t.startswith("FNN construction (Theorem 3) is ill-conditioned") and "certify a smaller ball" in t for t in texts
    )
    assert any(t.startswith("FNN construction (Theorem 3): the rank suffices") and "amplification" in t for t in texts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        assert lora_fnn(frozen, target, 3, input_radius=1.0).exact
    # a large ill-conditioned case without amplification: the warning has no reason about the ball
    silent = FNN([np.zeros((3, 3))], [np.zeros(3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_fnn(random_fnn(3, 1, seed=0), silent, 3, input_radius=1.0)
    texts = [str(w.message) for w in caught if issubclass(w.category, IllConditionedWarning)]
    assert texts and all("FNN construction (Theorem 3)" in t and "certify a smaller ball" not in t for t in texts)
    # the same target on a ball of radius 1.5: a = 1.5, and the warning gives the reason, κ and γ
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = lora_fnn(random_fnn(3, 1, seed=0), silent, 3, input_radius=1.5)
    assert fit.radius_amplification == pytest.approx(1.5)
    texts = [str(w.message) for w in caught if issubclass(w.category, IllConditionedWarning)]
    assert any(
        f"κ = {fit.kappa:.3g}, γ = {fit.gamma:.3g}" in t
        and "a = 1.5 times smaller" in t
        and "certify a smaller ball" in t
        for t in texts
    )


def test_an_overflowing_discrepancy_is_named_by_its_block():
    """``E_i = T_i - Π W_l`` whose entries are finite but whose norm is beyond the float64 range is refused
    naming ``E_i`` of the right block (``T_i + Π W_l`` would have a finite norm)."""
    frozen = FNN([np.eye(2), -0.5e308 * np.ones((2, 2))], [np.zeros(2), np.zeros(2)])
    target = FNN([np.eye(2), 1e308 * np.ones((2, 2))], [np.zeros(2), np.zeros(2)])  # entries of E_2: 1.5e308
    with pytest.raises(NumericalError, match=r"\(overflow: the norm of E_2 exceeds the float64 range\)"):
        lora_fnn(frozen, target, 2, partition=(1, 1), input_radius=1.0)


def test_a_singular_block_names_its_layers():
    """A chain that cannot be adapted in the second block is refused naming the block and its layers."""
    rng = np.random.default_rng(0)
    singular = np.diag([1.0, 0.0, 1.0])
    frozen = FNN([rng.standard_normal((3, 3)), singular, singular, np.eye(3)], [np.zeros(3)] * 4)
    target = random_fnn(3, 2, seed=5)
    with pytest.raises(SingularMatrixError) as info:
        lora_fnn(frozen, target, 1, partition=(1, 3), input_radius=1.0)
    assert "block 2 holds layers 2..4" in str(info.value)
    assert str(info.value).startswith("block 2: ")


def test_samples_drawn_at_the_full_radius_stay_in_the_ball():
    """``sample_ball`` shrinks the radius by one part in 1e12 so that the direction's rounding never puts a
    point outside the ball about 0: even a radius draw of exactly 1 gives norms at most ``radius``."""

    class AlwaysOne(np.random.Generator):
        def uniform(self, low=0.0, high=1.0, size=None):
            return np.ones(size)

    X = sample_ball(np.zeros(5), 3.0, 20000, seed=AlwaysOne(np.random.PCG64(0)))
    assert np.linalg.norm(X, axis=1).max() <= 3.0


def test_samples_are_uniform_in_the_ball():
    """Uniform in volume: the fraction of ``n`` points within radius ``ρ r`` is ``ρ^D``, within Monte Carlo
    error (5 standard errors ``sqrt(p(1 - p)/n)``), for ``D`` = 1, 3 and 6."""
    n = 20000
    for D in (1, 3, 6):
        X = sample_ball(np.full(D, 2.0), 0.5, n, seed=D)
        dist = np.linalg.norm(X - 2.0, axis=1) / 0.5
        for rho in (0.5, 0.8):
            p = rho**D
            assert abs(np.mean(dist <= rho) - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_sample_ball_refusals():
    """An empty centre and a negative count are refused with the reason; ``n = 0`` gives no points."""
    with pytest.raises(InvalidArgumentError) as info:
        sample_ball(np.zeros(0), 1.0, 3)
    assert str(info.value) == "center: must have at least one coordinate (D >= 1), got an empty array"
    with pytest.raises(InvalidArgumentError, match="^n: must be a non-negative integer, got -1$"):
        sample_ball(np.zeros(2), 1.0, -1)
    assert sample_ball(np.zeros(2), 1.0, 0).shape == (0, 2)


def test_model_refusals_name_the_model_and_what_it_got():
    """``lora_fnn`` refuses a frozen or target that is not an ``FNN`` naming its type, and a target of another
    activation or output convention naming ``target`` and both values."""
    frozen = random_fnn(3, 2, seed=0)
    cases = [
        ((np.eye(3), frozen), "frozen: must be a lora_theory.FNN, got ndarray"),
        ((frozen, [np.eye(3)]), "target: must be a lora_theory.FNN, got list"),
        (
            (frozen, random_fnn(3, 1, seed=1, activation="linear")),
            "target: must use the frozen model's activation 'relu', got 'linear'",
        ),
        (
            (frozen, random_fnn(3, 1, seed=1, final_relu=False)),
            "target: must use the frozen model's output convention final_relu=True, got final_relu=False",
        ),
    ]
    for (f, t), message in cases:
        with pytest.raises(InvalidArgumentError) as info:
            lora_fnn(f, t, 3, input_radius=1.0)
        assert str(info.value) == message


def test_a_large_ball_is_also_checked_near_its_centre():
    """The check points of a ball (``FNNFit.measured_error``): the centre, one minimiser per non-zero row of
    each first-block partial product, 64 points of the ball and 16 within distance 1 of the centre, so a
    ball of radius 5 has at least 17 check points within distance 1 of its centre (64 uniform points
    alone would put about 0.5 there)."""
    from lora_theory.fnn import Domain, _check_points

    center = np.array([1.0, -2.0, 0.5])
    ball = Domain(kind="ball", center=center, radius=5.0, margin=None, n_samples=None)
    partials = [np.eye(3), np.vstack([np.ones((2, 3)), np.zeros((1, 3))])]
    points = _check_points(ball, None, partials)
    assert len(points) == 1 + 3 + 2 + 64 + 16
    assert np.sum(np.linalg.norm(points - center, axis=1) <= 1.0) >= 17


def test_sample_levels_scale_with_the_inputs():
    """Sample mode: the level ``β_j`` is the margin times the most negative sampled pre-activation plus a
    safety share of the largest, both linear in the samples: scaling the samples and the target's biases
    by ``t`` scales every level by ``t`` (no absolute floor), and ``γ`` is unchanged."""
    frozen, target = random_fnn(3, 4, seed=51), random_fnn(3, 2, seed=52)
    X = np.random.default_rng(53).standard_normal((30, 3))

    def fit_at(t):
        scaled = FNN(target.weights, [t * c for c in target.biases])
        return lora_fnn(frozen, scaled, 3, inputs=t * X)

    base = fit_at(1.0)
    for t in (1e-4, 1e3):
        other = fit_at(t)
        for b0, b1 in zip(base.block_fits, other.block_fits):
            assert np.asarray(b1.levels) == pytest.approx(t * np.asarray(b0.levels), rel=1e-9)
            assert b1.gamma == pytest.approx(b0.gamma, rel=1e-9)
