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

from lora_theory.errors import IllConditionedWarning, InvalidArgumentError, SingularMatrixError
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
