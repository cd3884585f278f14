"""The project's per-instance error bound below the threshold (THEORY.md §2.4, derived along Zeng & Lee 2024,
Theorem 5): the measured error of the FNN construction never exceeds it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _fnn_strategies import fnn_instances
from _helpers import ill_conditioned_ok
from hypothesis import given
from hypothesis import strategies as st

from lora_theory.bounds import fnn_error_bound, fnn_error_bound_at
from lora_theory.errors import InvalidArgumentError
from lora_theory.fnn import fnn_rank_requirement, lora_fnn
from lora_theory.linear import linear_gaussian_mse, product
from lora_theory.models import FNN, random_fnn


def _rms(diff):
    return math.sqrt(np.mean(np.sum(diff**2, axis=1)))


@ill_conditioned_ok
@given(fnn_instances(max_width=12, max_depth=4), st.integers(0, 10**6))
def test_error_within_bound_per_sample_and_in_rms(inst, seed):
    """Per sample: ||f(x) - f̄(x)|| <= Σ_i K_i ε_i ||z̄_{i-1}(x)||; RMS with the samples' own second moment."""
    rng = np.random.default_rng(seed)
    D = inst.width
    x = rng.standard_normal((400, D))  # (n, D)
    radius = float(np.linalg.norm(x, axis=1).max()) * (1 + 1e-9)
    fit = lora_fnn(inst.frozen, inst.target, inst.ranks, partition=inst.partition, input_radius=radius)
    diff = fit.model(x) - inst.target(x)
    scale = _rms(inst.target(x))
    bound = fnn_error_bound(
        inst.frozen, inst.target, inst.ranks, partition=inst.partition, second_moment=x.T @ x / len(x)
    )
    assert _rms(diff) <= bound.rms + fit.tolerance * scale
    per = fnn_error_bound_at(inst.frozen, inst.target, inst.ranks, x, partition=inst.partition)
    assert np.all(np.linalg.norm(diff, axis=1) <= per * (1 + 1e-9) + fit.tolerance * scale)
    assert np.allclose(per, bound.at(x))


@given(fnn_instances(max_width=10, max_depth=4), st.integers(0, 10**6))
def test_bound_is_zero_exactly_when_the_construction_is_exact(inst, seed):
    bound = fnn_error_bound(inst.frozen, inst.target, inst.ranks, partition=inst.partition)
    exact = all(b >= rho for b, rho in zip(inst.budgets(), inst.block_ranks))
    assert (bound.rms == 0) == exact
    assert bound.mse == pytest.approx(bound.rms**2 / inst.width)
    assert bound.block_directions == tuple(min(b, rho) for b, rho in zip(inst.budgets(), inst.block_ranks))


@ill_conditioned_ok
def test_gaussian_rms_below_bound_with_default_second_moment():
    """Default Σ = I (x ~ N(0, I_D)): a large sample's RMS error stays below the bound, which is not tight."""
    frozen, target = random_fnn(16, 4, seed=0), random_fnn(16, 2, seed=1)
    x = np.random.default_rng(2).standard_normal((20000, 16))
    radius = float(np.linalg.norm(x, axis=1).max())
    for R in (0, 2, 4, 6):
        fit = lora_fnn(frozen, target, R, input_radius=radius)
        bound = fnn_error_bound(frozen, target, R)
        measured = _rms(fit.model(x) - target(x))
        assert 0 < measured <= bound.rms
        assert bound.mse == pytest.approx(bound.rms**2 / 16)
        assert measured**2 / 16 <= bound.mse  # the per-coordinate MSE form


def test_bound_formula_by_hand():
    """K_i = Π_{k>i}(||T_k|| + ε_k), a_0 = sqrt(tr Σ), a_i = ||T_i|| a_{i-1} + ||c_i||; ε_i = σ_{k_i+1}(E_i)."""
    frozen, target = random_fnn(6, 4, seed=3), random_fnn(6, 2, seed=4)
    Sigma = np.diag(np.arange(1.0, 7.0))
    bound = fnn_error_bound(frozen, target, [1, 0, 2, 1], partition=(3, 1), second_moment=Sigma)
    E1 = target.weights[0] - product(frozen.weights[:3])
    E2 = target.weights[1] - frozen.weights[3]
    eps1 = np.linalg.svd(E1, compute_uv=False)[3]  # k_1 = R_1 + R_2 + R_3 = 3
    eps2 = np.linalg.svd(E2, compute_uv=False)[1]  # k_2 = R_4 = 1
    n1, n2 = np.linalg.norm(target.weights[0], 2), np.linalg.norm(target.weights[1], 2)
    a0 = math.sqrt(21.0)
    a1 = n1 * a0 + np.linalg.norm(target.biases[0])
    assert bound.block_errors == pytest.approx((eps1, eps2))
    assert bound.growth_factors == pytest.approx((n2 + eps2, 1.0))
    assert bound.activation_bounds == pytest.approx((a0, a1))
    assert bound.rms == pytest.approx((n2 + eps2) * eps1 * a0 + eps2 * a1)


def test_one_block_linear_model_matches_lemma1_scale():
    """For a linear one-block model the bound reduces to σ_{k+1}(E)·sqrt(D), above the exact Lemma 1 RMS."""
    frozen = random_fnn(8, 2, seed=5, activation="linear", bias=False)
    target = random_fnn(8, 1, seed=6, activation="linear", bias=False)
    bound = fnn_error_bound(frozen, target, 2)
    s = np.linalg.svd(target.weights[0] - product(frozen.weights), compute_uv=False)
    assert bound.rms == pytest.approx(s[4] * math.sqrt(8))
    exact_mse = linear_gaussian_mse(frozen.weights, target.weights[0], 2)
    assert exact_mse <= bound.mse


def test_at_single_input_and_above_threshold():
    frozen, target = random_fnn(5, 2, seed=7), random_fnn(5, 1, seed=8)
    bound = fnn_error_bound(frozen, target, 1)
    x = np.ones(5)
    value = bound.at(x)
    assert isinstance(value, float) and value > 0
    R = fnn_rank_requirement(frozen, target)
    assert fnn_error_bound(frozen, target, R).rms == 0.0
    assert np.array_equal(fnn_error_bound(frozen, target, R).at(np.ones((3, 5))), np.zeros(3))


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "second_moment, message",
    [
        (np.eye(4), "5 x 5"),
        (np.ones((5, 2)), "square"),
        (np.array([[1.0, 2.0, 0, 0, 0]] + [[0.0] * 5] * 4), "symmetric"),
        (-np.eye(5), "positive semi-definite"),
        (np.full((5, 5), np.nan), "NaN"),
    ],
)
def test_bad_second_moment(second_moment, message):
    frozen, target = random_fnn(5, 2, seed=0), random_fnn(5, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match=message) as info:
        fnn_error_bound(frozen, target, 1, second_moment=second_moment)
    assert info.value.argument == "second_moment"


def test_bad_rank_partition_models_and_x():
    frozen, target = random_fnn(5, 2, seed=0), random_fnn(5, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match="at most 5"):
        fnn_error_bound(frozen, target, 6)
    with pytest.raises(InvalidArgumentError, match="one rank for each of the 2 layers"):
        fnn_error_bound(frozen, target, [1])
    with pytest.raises(InvalidArgumentError, match="cover the L = 2"):
        fnn_error_bound(frozen, target, 1, partition=(1,))
    with pytest.raises(InvalidArgumentError, match="exceeds the frozen depth"):
        fnn_error_bound(frozen, random_fnn(5, 3, seed=2), 1)
    with pytest.raises(InvalidArgumentError, match="shape") as info:
        fnn_error_bound_at(frozen, target, 1, np.ones(4))
    assert info.value.argument == "x"
    with pytest.raises(InvalidArgumentError, match="NaN"):
        fnn_error_bound_at(frozen, target, 1, np.full(5, np.nan))


# --- claims pinned by mutation testing (docs/mutation.md) ---


def _orthogonal(rng, D):
    Q, R = np.linalg.qr(rng.standard_normal((D, D)))
    return Q * np.sign(np.diag(R))


@st.composite
def aligned_instances(draw):
    """A linear-activation pair on which the bound is attained, with the input ``x0`` that attains it.

    Block i of the target is ``T_i = t_i Q_i`` (``Q_i`` orthogonal), the frozen block's product is
    ``(t_i + e_i) Q_i`` (any number of layers), so ``ε_i = e_i`` and every error term of the bound points
    the same way; the biases ``c_i = λ_i T_i z̄_{i-1}(x0)`` point along the activations at ``x0``, so
    ``||z̄_i(x0)|| = ||T_i|| ||z̄_{i-1}(x0)|| + ||c_i||`` as the bound assumes. At rank 0 the construction
    keeps the frozen weights; with the point mass ``Σ = x0 x0^T`` nothing in the bound's chain of triangle
    inequalities is slack.
    """
    D = draw(st.integers(1, 5), label="D")
    Lbar = draw(st.integers(1, 3), label="Lbar")
    sizes = tuple(draw(st.lists(st.integers(1, 3), min_size=Lbar, max_size=Lbar), label="partition"))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    x0 = rng.standard_normal(D)
    frozen_w, target_w, target_b, z = [], [], [], x0
    for m in sizes:
        t, e, lam = rng.uniform(0.5, 2.0), rng.uniform(0.05, 0.5), rng.uniform(0.0, 1.0)
        Q = _orthogonal(rng, D)
        T = t * Q
        c = lam * (T @ z)
        z = T @ z + c
        rots = [_orthogonal(rng, D) for _ in range(m - 1)]
        frozen_w += rots + [(t + e) * Q @ product(rots).T if rots else (t + e) * Q]
        target_w.append(T)
        target_b.append(c)
    frozen = FNN(frozen_w, [np.zeros(D)] * len(frozen_w), activation="linear")
    target = FNN(target_w, target_b, activation="linear")
    return frozen, target, sizes, x0


@ill_conditioned_ok
@given(aligned_instances())
def test_bound_is_attained_when_every_error_term_is_aligned(instance):
    # The bound's three ingredients are all tight here: each ε_i (σ_1 of E_i), each growth factor
    # K_i = Π_{k>i}(||T_k|| + ε_k), each activation bound a_i = ||T_i|| a_{i-1} + ||c_i|| from a_0 = sqrt(tr Σ).
    # A bound that skipped a block's growth, dropped a bias or mis-sized a_0 is either violated or slack.
    frozen, target, sizes, x0 = instance
    radius = 2 * float(np.linalg.norm(x0)) + 1
    fit = lora_fnn(frozen, target, 0, partition=sizes, input_radius=radius)
    error = float(np.linalg.norm(fit.model(x0) - target(x0)))
    bound = fnn_error_bound(frozen, target, 0, partition=sizes, second_moment=np.outer(x0, x0))
    assert bound.partition == sizes and bound.ranks == (0,) * frozen.depth  # what it was computed for
    assert bound.rms == pytest.approx(error, rel=1e-9)
    assert bound.mse == pytest.approx(error**2 / target.width, rel=1e-9)
    assert fnn_error_bound_at(frozen, target, 0, x0, partition=sizes) == pytest.approx(error, rel=1e-9)
    # Σ = I: the error map is linear, x ↦ G x with G a multiple of an orthogonal matrix when every c_i = 0,
    # and the RMS error over N(0, I) is ||G||_F = ||G||_2 sqrt(D), the bound with a_0 = sqrt(D).
    plain = FNN(target.weights, [np.zeros(target.width)] * target.depth, activation="linear")
    G = lora_fnn(frozen, plain, 0, partition=sizes, input_radius=radius).model(np.eye(target.width)) - plain(
        np.eye(target.width)
    )  # rows: G e_j
    default = fnn_error_bound(frozen, plain, 0, partition=sizes)
    assert default.rms == pytest.approx(float(np.linalg.norm(G, "fro")), rel=1e-9)
    # and per sample, for every input of a batch: ||G x|| = Σ_i K_i ε_i ||z̄_{i-1}(x)||
    X = np.random.default_rng(0).standard_normal((4, target.width))
    assert np.allclose(default.at(X), np.linalg.norm(X @ G, axis=1), rtol=1e-9, atol=0)


def test_per_sample_bound_refuses_non_finite_inputs_naming_x():
    frozen, target = random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match=r"^x: contains NaN or infinite entries") as info:
        fnn_error_bound_at(frozen, target, 1, np.array([0.0, np.nan, 1.0]))
    assert info.value.argument == "x"
    with pytest.raises(InvalidArgumentError, match=r"^x: must have shape \(D,\) or \(n, D\) with D = 3"):
        fnn_error_bound_at(frozen, target, 1, np.ones((2, 4)))


def test_second_moment_symmetry_is_judged_relative_to_its_size():
    # Σ = E[x x^T] is symmetric: an asymmetry of 1e-9 in a unit-size Σ is refused, while the rounding-size
    # asymmetry 1e-3 of a Σ of size 1e10 is accepted (the check is relative, 1e-12 of the largest entry).
    frozen, target = random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1)
    skew = np.zeros((3, 3))
    skew[0, 1] = 1.0
    with pytest.raises(InvalidArgumentError, match=r"^second_moment: must be symmetric \(it is E\[x x\^T\]\)"):
        fnn_error_bound(frozen, target, 1, second_moment=np.eye(3) + np.ones((3, 3)) + 1e-9 * skew)
    big = 1e10 * np.eye(3) + 1e-3 * skew
    assert fnn_error_bound(frozen, target, 1, second_moment=big).activation_bounds[0] == pytest.approx(
        math.sqrt(3e10), rel=1e-12
    )
    with pytest.raises(
        InvalidArgumentError, match=r"^second_moment: must be positive semi-definite \(it is E\[x x\^T\]\)"
    ):
        fnn_error_bound(frozen, target, 1, second_moment=np.diag([1.0, 1.0, -1e-3]))


@pytest.mark.parametrize("s, D", [(1.0, 2), (4.0, 2), (0.25, 4)])
def test_second_moment_negative_eigenvalues_are_allowed_up_to_1e_12_of_its_size_times_D(s, D):
    # Σ = E[x x^T] is positive semi-definite; rounding may leave eigenvalues down to -1e-12 · max|Σ| · D, and
    # no further. Σ = diag(s, ..., s, -t): t at the allowance is accepted, 1% beyond it refused. (s and D
    # powers of 2 keep the allowance an exact float.)
    frozen, target = random_fnn(D, 2, seed=0), random_fnn(D, 1, seed=1)
    allowance = 1e-12 * s * D
    at = np.diag([s] * (D - 1) + [-allowance])
    bound = fnn_error_bound(frozen, target, 1, second_moment=at)
    assert bound.activation_bounds[0] == pytest.approx(math.sqrt(s * (D - 1) - allowance), rel=1e-12)
    with pytest.raises(InvalidArgumentError, match=r"^second_moment: must be positive semi-definite"):
        fnn_error_bound(frozen, target, 1, second_moment=np.diag([s] * (D - 1) + [-1.01 * allowance]))


def _one_block_pair(target_scale: float):
    """A width-2, depth-2 frozen FNN and a two-layer target whose first weight is scaled (its block error)."""
    frozen = FNN([np.eye(2), np.eye(2)], [np.zeros(2), np.zeros(2)])
    target = FNN([np.diag([3.0, 2.0]) * target_scale, np.eye(2)], [np.zeros(2), np.zeros(2)])
    return frozen, target


def test_an_overflowing_bound_names_the_quantity_that_overflowed():
    from lora_theory.errors import NumericalError

    # the activation bound a_1 = ||T_1|| a_0 + ||b_1|| overflows while K and ε stay finite
    frozen, target = _one_block_pair(1e300)
    with pytest.raises(NumericalError, match=r"^fnn_error_bound: .*\(activation_bounds is not finite"):
        fnn_error_bound(frozen, target, 0, second_moment=1e300 * np.eye(2))
    # the growth factor K_1 = ||T_2|| + ε_2 overflows: a second block whose target is 1e308 wide
    frozen = FNN([np.eye(2)] * 2, [np.zeros(2)] * 2)
    target = FNN([np.eye(2) * 2.0, np.diag([1e308, 1e308])], [np.zeros(2)] * 2)
    with pytest.raises(NumericalError, match=r"^fnn_error_bound: .*\(growth_factors is not finite"):
        fnn_error_bound(frozen, target, 0)


def test_the_mean_square_is_the_rms_squared_over_D_and_overflows_only_when_it_does():
    # ε_1 = σ_1(T_1 - I) = 2 s at rank 0; a_0 = sqrt(tr Σ); with Σ = c I and one block: rms = ε_1 sqrt(2c).
    from lora_theory.errors import NumericalError

    frozen = FNN([np.eye(2)], [np.zeros(2)])
    target = FNN([np.diag([3.0, 2.0])], [np.zeros(2)])
    c = 2e307  # rms² = 8c = 1.6e308 is finite, and so is rms²/2; 2 rms² is not
    bound = fnn_error_bound(frozen, target, 0, second_moment=c * np.eye(2))
    assert bound.rms == pytest.approx(2.0 * math.sqrt(2 * c), rel=1e-12)
    assert math.isfinite(bound.mse) and bound.mse == pytest.approx(bound.rms**2 / 2, rel=1e-12)
    with pytest.raises(NumericalError, match=r"^fnn_error_bound: .*\(mse is not finite"):  # rms finite, rms²/D not
        fnn_error_bound(frozen, FNN([np.diag([3e10, 2.0])], [np.zeros(2)]), 0, second_moment=c * np.eye(2))
    with pytest.raises(NumericalError, match=r"^fnn_error_bound: .*\(rms is not finite"):
        fnn_error_bound(frozen, FNN([np.diag([3e300, 2.0])], [np.zeros(2)]), 0, second_moment=c * np.eye(2))
