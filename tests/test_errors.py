"""Bad input to the core gets a clear exception naming the argument, never a wrong answer (issue item 8).

Covers the linear construction and its companions, adapters, thresholds and partitions; the models'
and the TFN construction's own bad input are tested beside them (test_models.py, test_tfn.py).
"""

import math

import numpy as np
import pytest

from lora_theory._validate import as_positive
from lora_theory.adapter import Adapter
from lora_theory.errors import InvalidArgumentError, LoraTheoryError, SingularMatrixError
from lora_theory.linear import (
    discrepancy,
    discrepancy_rank,
    linear_gaussian_mse,
    linear_optimal_error,
    linear_rank_requirement,
    lora_linear,
    optimality_gap,
)
from lora_theory.numerics import check_invertible
from lora_theory.partition import check_partition
from lora_theory.thresholds import fnn_rank_threshold

D = 3
GOOD = [2 * np.eye(D), np.eye(D) + 0.1]  # L = 2, D = 3
TARGET = np.arange(9.0).reshape(3, 3) / 10 + np.eye(3)

# every function that takes (frozen, target, ...) validates both the same way
WITH_RANK = [
    lambda f, t: lora_linear(f, t, 1),
    lambda f, t: linear_optimal_error(f, t, 1),
    lambda f, t: linear_gaussian_mse(f, t, 1),
]
WITHOUT_RANK = [
    discrepancy,
    discrepancy_rank,
    linear_rank_requirement,
    lambda f, t: optimality_gap(f, t, [np.zeros((D, D))] * 2),
]
ALL = WITH_RANK + WITHOUT_RANK


def _nan_matrix():
    m = np.eye(D)
    m[1, 2] = np.nan
    return m


def _inf_matrix():
    m = np.eye(D)
    m[0, 0] = -np.inf
    return m


BAD_FROZEN = [
    ([np.eye(3), np.eye(2)], r"^frozen\[1\]: must be 3 x 3 like the other matrices, got \(2, 2\)"),
    ([np.ones((3, 2)), np.eye(3)], r"^frozen\[0\]: must be a square matrix, got shape \(3, 2\)"),
    ([np.ones(3)], r"^frozen\[0\]: must have 2 dimensions, got shape \(3,\)"),
    (np.ones((2, 3, 3, 3)), r"^frozen\[0\]: must have 2 dimensions, got shape \(3, 3, 3\)"),
    ([np.zeros((0, 0))], r"^frozen\[0\]: must not be empty"),
    ([], r"^frozen: must hold at least one matrix"),
    (np.eye(3), r"^frozen: must be a sequence of matrices \(one per layer\), got one matrix"),
    ("W", r"^frozen: must be a sequence of matrices, got str"),
    (None, r"^frozen: must be a sequence of matrices, got NoneType"),
    ([_nan_matrix(), np.eye(3)], r"^frozen\[0\]: contains NaN or infinite entries"),
    ([np.eye(3), _inf_matrix()], r"^frozen\[1\]: contains NaN or infinite entries"),
    ([np.eye(3, dtype=complex)], r"^frozen\[0\]: must be real, got a complex array"),
    ([np.array([["a", "b"], ["c", "d"]])], r"^frozen\[0\]: must be a numeric array"),
]


@pytest.mark.parametrize("call", ALL)
@pytest.mark.parametrize("frozen, match", BAD_FROZEN)
def test_bad_frozen(call, frozen, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        call(frozen, TARGET)
    assert info.value.argument.startswith("frozen")


BAD_TARGET = [
    (np.eye(2), r"^target: must be 3 x 3 like the other matrices, got \(2, 2\)"),
    (np.ones((3, 4)), r"^target: must be a square matrix, got shape \(3, 4\)"),
    (np.ones(9), r"^target: must have 2 dimensions, got shape \(9,\)"),
    (_nan_matrix(), r"^target: contains NaN or infinite entries"),
    (_inf_matrix(), r"^target: contains NaN or infinite entries"),
    ([[1, 2, 3], [4, 5]], r"^target: could not be read as an array"),
    (None, r"^target: must be a numeric array"),
]


@pytest.mark.parametrize("call", ALL)
@pytest.mark.parametrize("target, match", BAD_TARGET)
def test_bad_target(call, target, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call(GOOD, target)


BAD_RANK = [
    (2.0, r"^rank: must be an integer, got 2.0"),
    (np.float64(1.0), r"^rank: must be an integer"),
    (True, r"^rank: must be an integer, got True"),
    (np.bool_(False), r"^rank: must be an integer"),
    (-1, r"^rank: must be at least 0, got -1"),
    (D + 1, r"^rank: must be at most 3, got 4"),
    ("1", r"^rank: must be an integer"),
    (None, r"^rank: must be an integer, got None"),
    # per-layer ranks (L = 2): wrong count, sign, type or size
    ([1], r"^rank: per-layer ranks must give one rank for each of the 2 layers, got 1"),
    ([1, 1, 1], r"^rank: per-layer ranks must give one rank for each of the 2 layers, got 3"),
    ([], r"^rank: per-layer ranks must give one rank for each of the 2 layers, got 0"),
    ([1, -1], r"^rank\[1\]: must be at least 0, got -1"),
    ([1.5, 1], r"^rank\[0\]: must be an integer, got 1.5"),
    ([1, True], r"^rank\[1\]: must be an integer, got True"),
    ([0, D + 1], r"^rank\[1\]: must be at most 3, got 4"),
]


@pytest.mark.parametrize("call", [lora_linear, linear_optimal_error, linear_gaussian_mse])
@pytest.mark.parametrize("rank, match", BAD_RANK)
def test_bad_rank(call, rank, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call(GOOD, TARGET, rank)


@pytest.mark.parametrize("rank", [0, D, (0, 0), (0, D), (D, D), np.int64(2), np.array(1), np.array([1, 2])])
def test_valid_ranks_include_zero_and_D(rank):
    fit = lora_linear(GOOD, TARGET, rank)
    expected = tuple(int(r) for r in np.broadcast_to(np.asarray(rank), (2,)))
    assert fit.ranks == expected and all(type(r) is int for r in fit.ranks)
    if sum(expected) == 0:  # rank 0: no adapter at all
        assert all(a.rank == 0 for a in fit.adapters)


def test_errors_are_value_errors_of_the_project():
    with pytest.raises(ValueError):
        lora_linear(GOOD, TARGET, -1)
    with pytest.raises(LoraTheoryError):
        lora_linear(GOOD, TARGET, -1)
    with pytest.raises(ValueError):
        check_invertible(np.zeros((2, 2)), "M")


def test_singular_matrix_error_names_the_matrix_and_gives_kappa():
    with pytest.raises(SingularMatrixError, match=r"^W_2 must be invertible .* κ = inf \(why\)$") as info:
        check_invertible(np.zeros((2, 2)), "W_2", "why")
    assert info.value.matrix == "W_2" and math.isinf(info.value.condition_number)
    M = np.diag([1.0, 1e-17])
    with pytest.raises(SingularMatrixError, match=r"κ = 1e\+17"):
        check_invertible(M, "M")
    assert check_invertible(np.diag([1.0, 1e-3]), "M") == pytest.approx(1e3)


def test_singular_matrix_in_the_construction_names_Q():
    # W_2 = 0: layer 1 receives directions and must solve with Q_1 = W_2
    with pytest.raises(
        SingularMatrixError, match=r"^Q_1 = W_2 must be invertible .*κ = inf.*singular directions 1\.\.1 of E"
    ):
        lora_linear([np.eye(3), np.zeros((3, 3))], TARGET, 1)


def test_bad_norm_argument():
    with pytest.raises(InvalidArgumentError, match=r"^norm: must be 'spectral' or 'fro', got 'nuclear'"):
        linear_optimal_error(GOOD, TARGET, 1, norm="nuclear")


@pytest.mark.parametrize("norm", ["nuclear", "Spectral", 2, None])
def test_achieved_error_nuclear_is_refused_not_frobenius(norm):
    # LinearFit.achieved_error('nuclear') used to return the Frobenius norm silently
    fit = lora_linear(GOOD, TARGET, 1)
    with pytest.raises(InvalidArgumentError, match=rf"^norm: must be 'spectral' or 'fro', got {norm!r}"):
        fit.achieved_error(norm)
    assert fit.achieved_error("fro") == pytest.approx(fit.frobenius_error, rel=1e-9, abs=1e-12)
    assert fit.achieved_error() == pytest.approx(fit.spectral_error, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "adapters, match",
    [
        ([np.zeros((D, D))], r"^adapters: must give one adapter per frozen layer \(2\), got 1"),
        (5, r"^adapters: must be a sequence with one adapter per frozen layer, got int"),
        (Adapter.zeros(1, D, D), r"^adapters: must be a sequence"),
        ([Adapter.zeros(1, 2, 2), Adapter.zeros(1, D, D)], r"^adapters\[0\]: must act on 3 x 3 layers"),
        ([(np.ones((1, D)), np.ones((D, 2))), np.zeros((D, D))], r"^B: must have as many columns as A has rows"),
        ([np.zeros((D, D)), np.ones((D, 2))], r"^adapters\[1\]: must be a square matrix"),
        ([np.zeros((D, D)), np.full((D, D), np.nan)], r"^adapters\[1\]: contains NaN"),
    ],
)
def test_optimality_gap_bad_adapters(adapters, match):
    with pytest.raises(InvalidArgumentError, match=match):
        optimality_gap(GOOD, TARGET, adapters)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: Adapter(np.ones((2, 3)), np.ones((3, 1))),
            r"^B: must have as many columns as A has rows \(the rank\)",
        ),
        (lambda: Adapter(np.ones(3), np.ones((3, 1))), r"^A: must have 2 dimensions"),
        (lambda: Adapter(np.ones((1, 3)), np.full((3, 1), np.inf)), r"^B: contains NaN or infinite"),
        (lambda: Adapter(np.ones((2, 3)), np.ones((3, 2))).padded(1), r"^rank: cannot pad a rank-2 adapter down to 1"),
    ],
)
def test_adapter_bad_input(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


def test_target_depth_above_depth_and_bad_partitions():
    with pytest.raises(
        InvalidArgumentError, match=r"^target_depth: the target depth L̄ = 5 exceeds the frozen depth L = 4"
    ):
        fnn_rank_threshold(16, 4, 5)
    with pytest.raises(InvalidArgumentError, match=r"^partition: every block must hold at least one layer"):
        check_partition((4, 0), 4, 2)
    with pytest.raises(
        InvalidArgumentError, match=r"^partition: block sizes must cover the L = 4 frozen layers exactly"
    ):
        check_partition((1, 2), 4, 2)


@pytest.mark.parametrize(
    "value, match",
    [
        (0, r"^radius: must be positive and finite, got 0.0"),
        (-1.5, r"^radius: must be positive and finite, got -1.5"),
        (math.inf, r"^radius: must be positive and finite, got inf"),
        (math.nan, r"^radius: must be positive and finite, got nan"),
        (True, r"^radius: must be a real number, got True"),
        ("1", r"^radius: must be a real number"),
    ],
)
def test_non_positive_numbers(value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        as_positive(value, "radius")
    assert as_positive(2, "radius") == 2.0


# A NaN rank tolerance compared false with every singular value: lora_linear(W, T, 1, rank_tol=nan) reported
# error_rank 0 and exact=True for a fit that was wrong. Every tolerance argument is now checked.
BAD_TOLERANCES = [
    (math.nan, r"must be finite and >= 0, got nan"),
    (math.inf, r"must be finite and >= 0, got inf"),
    (-1e-12, r"must be finite and >= 0, got -1e-12"),
    (True, r"must be a real number \(or None for the default\), got True"),
    ("1e-9", r"must be a real number"),
]


def _tolerance_calls():
    from lora_theory.fnn import Domain
    from lora_theory.highprec import lora_fnn_mp, lora_linear_mp
    from lora_theory.models import FNN
    from lora_theory.numerics import numeric_rank

    fnn = FNN([np.eye(D), np.eye(D)], [np.ones(D), np.ones(D)])
    target = FNN([TARGET], [np.ones(D)])
    ball = Domain("ball", np.zeros(D), 1.0, None, None)
    return [
        ("rank_tol", lambda t: lora_linear(GOOD, TARGET, 1, rank_tol=t)),
        ("tol", lambda t: discrepancy_rank(GOOD, TARGET, tol=t)),
        ("tol", lambda t: linear_rank_requirement(GOOD, TARGET, tol=t)),
        ("tol", lambda t: numeric_rank(TARGET, tol=t)),
        ("rank_tol", lambda t: lora_linear_mp(GOOD, TARGET, 1, digits=20, rank_tol=t)),
        ("rank_tol", lambda t: lora_fnn_mp(fnn, target, 2, input_radius=1.0, digits=20, rank_tol=t)),
        ("rtol", lambda t: ball.contains(np.zeros(D), rtol=t)),
    ]


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("tol, match", BAD_TOLERANCES)
def test_nan_or_negative_rank_tolerance_is_refused_not_reported_exact(index, tol, match):
    name, call = _tolerance_calls()[index]
    with pytest.raises(InvalidArgumentError, match=rf"^{name}: {match}") as info:
        call(tol)
    assert info.value.argument == name


def test_valid_rank_tolerances_still_work():
    from lora_theory.numerics import numeric_rank

    assert discrepancy_rank(GOOD, TARGET, tol=0.0) == np.linalg.matrix_rank(TARGET - GOOD[1] @ GOOD[0])
    assert numeric_rank(np.diag([1.0, 1e-3, 0.0]), tol=1e-2) == 1
    assert numeric_rank(np.diag([1.0, 1e-3, 0.0]), tol=np.float32(1e-4)) == 2
    fit = lora_linear(GOOD, TARGET, 1, rank_tol=0.0)
    assert fit.error_rank == 3 and not fit.exact


# Adapter.from_delta(np.eye(3), -1) sliced a rank-2 adapter from the end and 1.7 truncated to 1.
@pytest.mark.parametrize(
    "rank, match",
    [
        (-1, r"^rank: must be at least 0, got -1"),
        (1.7, r"^rank: must be an integer, got 1.7"),
        (4, r"^rank: must be at most 3, got 4"),
        (True, r"^rank: must be an integer, got True"),
    ],
)
def test_adapter_from_delta_rejects_negative_or_fractional_rank(rank, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Adapter.from_delta(np.eye(3), rank)


def test_adapter_from_delta_valid_ranks():
    assert Adapter.from_delta(np.eye(3), 0).rank == 0
    assert Adapter.from_delta(np.eye(3), np.int64(2)).rank == 2
    assert Adapter.from_delta(np.ones((3, 2)), 2).rank == 2  # up to min(delta.shape)
    assert Adapter.from_delta(np.ones((3, 2))).rank == 1  # default: the numeric rank
