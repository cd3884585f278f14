"""Regression tests for bad input to the library, one per bug found by fuzzing the public API.

Each test names the wrong answer or raw traceback it pins. The property-based fuzz of every public name is
tests/test_fuzz.py; these are the cases it started from, kept literal so that each failure mode stays checked
whatever hypothesis draws.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from _helpers import fnn_pair, ill_conditioned_ok

import lora_theory as lt
from lora_theory.errors import IllConditionedWarning, InvalidArgumentError, NumericalError
from lora_theory.highprec import MAX_DIGITS
from lora_theory.numerics import EXACT_TOLERANCE_LIMIT


def _ball_error(fit, n=200, seed=7):
    """``max ||f(x) - f̄(x)||_2`` over the centre, uniform points of the ball and points of its sphere."""
    rng = np.random.default_rng(seed)
    D, r = fit.target.width, fit.domain.radius
    g = rng.standard_normal((2 * n, D))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    radii = r * np.concatenate([rng.uniform(size=n) ** (1 / D), np.ones(n)]) * (1 - 1e-12)
    x = np.vstack([fit.domain.center, fit.domain.center + g * radii[:, None]])
    return float(np.max(np.linalg.norm(fit.model(x) - fit.target(x), axis=1)))


# ------------------------------------------------------------------ exact must mean what it says


def test_near_singular_frozen_fnn_is_not_called_exact():
    """A frozen layer with a singular value of 1e-13 gave exact=True with a relative error of 2.4e-2 (here
    1e-14, where the tolerance c·u·κ clearly exceeds 1)."""
    frozen, target = fnn_pair()
    W = [np.array(w) for w in frozen.weights]
    U, s, Vt = np.linalg.svd(W[1])
    s[-1] = 1e-14
    W[1] = (U * s) @ Vt
    with pytest.warns(IllConditionedWarning, match="not exact"):
        fit = lt.lora_fnn(lt.FNN(W, frozen.biases), target, 4, input_radius=1.0)
    assert fit.rank_sufficient and not fit.exact
    assert fit.tolerance > EXACT_TOLERANCE_LIMIT  # κ ≈ 1e14: the bound exceeds 100%
    # the measured error is what it is, and within the (large) tolerance the fit reports
    assert _ball_error(fit) <= fit.absolute_tolerance


@ill_conditioned_ok
@pytest.mark.parametrize("big", [1e12, 1e15])
def test_large_frozen_entry_against_a_small_target(big):
    """One frozen entry of 1e12 left an error of 8e-5 under tolerance 1e-10 with exact=True; from 1e15 the
    numeric rank dropped real directions (errors 0.3 to 2.8). The tolerance now counts the magnitudes added
    (it covers the error measured here), and at 1e15 it exceeds 1: not exact."""
    frozen, target = fnn_pair(seed=3)
    W = [np.array(w) for w in frozen.weights]
    W[0][0, 0] = big
    fit = lt.lora_fnn(lt.FNN(W), target, 4, input_radius=1.0)
    assert fit.rank_sufficient
    assert fit.exact == (fit.tolerance <= EXACT_TOLERANCE_LIMIT)
    if big >= 1e15:
        assert not fit.exact
    err = _ball_error(fit)
    assert err <= fit.absolute_tolerance  # the tolerance covers what happens
    assert fit.tolerance >= big * np.finfo(float).eps / fit.output_radius  # and it grew with the entry


@ill_conditioned_ok
def test_large_frozen_entry_in_a_linear_chain():
    """lora_linear: the same frozen entry of 1e15 against a target of norm 1 is not exact to the target."""
    rng = np.random.default_rng(0)
    W = [rng.uniform(-1, 1, (4, 4)) for _ in range(2)]
    W[0][0, 0] = 1e15
    T = rng.uniform(-1, 1, (4, 4))
    fit = lt.lora_linear(W, T, 4)
    miss = np.linalg.norm(lt.product(fit.weights) - T, 2) / np.linalg.norm(T, 2)
    assert fit.rank_sufficient and not fit.exact and miss > 1e-6


@pytest.mark.parametrize("scale", [1e150, 1e300])
def test_weights_scaled_beyond_float64_raise(scale):
    """Weights scaled by 1e150 gave exact=True with a relative error of inf."""
    frozen, target = fnn_pair()
    with pytest.raises(NumericalError, match="lora_fnn"):
        lt.lora_fnn(lt.FNN([w * scale for w in frozen.weights]), target, 4, input_radius=1.0)


@ill_conditioned_ok
@pytest.mark.parametrize("radius", [1e200, 1e300])
def test_huge_input_radius_is_not_exact(radius):
    """input_radius 1e200 or 1e300 gave exact=True with a relative error of 1 on unit inputs."""
    frozen, target = fnn_pair()
    try:
        fit = lt.lora_fnn(frozen, target, 4, input_radius=radius)
    except NumericalError:
        return
    assert not fit.exact


@ill_conditioned_ok
def test_ill_conditioned_transformer_is_not_called_exact():
    """lora_tfn with W1 of κ ≈ 1e13 reported exact=True while its outputs were off by more than 100%."""
    frozen, target = lt.random_tfn(4, 1, 1, seed=0), lt.random_tfn(4, 1, 1, seed=1)
    U, s, Vt = np.linalg.svd(frozen.w1[0])
    s[-1] = s[0] * 1e-13
    w1 = frozen.w1.copy()
    w1[0] = (U * s) @ Vt
    fit = lt.lora_tfn(frozen.replace(w1=w1), target, 2)
    X = np.random.default_rng(3).standard_normal((4, 4, 3))
    err = lt.relative_error(fit.model(X), target(X))
    assert fit.rank_sufficient
    assert fit.exact == (err <= lt.tolerance(fit.kappa) and lt.tolerance(fit.kappa) <= EXACT_TOLERANCE_LIMIT)
    assert not fit.exact


def test_well_conditioned_fits_stay_exact():
    """The check costs nothing where float64 holds: generic instances at the threshold are exact."""
    frozen, target = fnn_pair(D=6, seed=5)
    fit = lt.lora_fnn(frozen, target, 6, input_radius=1.0)
    assert fit.exact and fit.measured_error <= fit.tolerance
    rng = np.random.default_rng(1)
    lin = lt.lora_linear([rng.uniform(-1, 1, (5, 5)) for _ in range(2)], rng.uniform(-1, 1, (5, 5)), 3)
    assert lin.exact and lin.measured_error <= lt.tolerance(lin.kappa, lin.gamma)
    tfn = lt.lora_tfn(lt.random_tfn(4, 2, 2, seed=0), lt.random_tfn(4, 2, 2, seed=1), 2)
    assert tfn.exact and tfn.measured_error <= lt.tolerance(tfn.kappa)


# ------------------------------------------------------------------------- overflow and NaN


def test_error_bound_of_a_huge_model_is_not_zero():
    """fnn_error_bound of a 1e300-scale model gave 0.0."""
    frozen, target = fnn_pair()
    with pytest.raises(NumericalError):
        lt.fnn_error_bound(lt.FNN([w * 1e300 for w in frozen.weights]), target, 1)


def test_error_bound_with_a_1e308_target_weight_raises():
    """A target weight of 1e308 gave growth factors of inf and rms = NaN (Python floats overflow silently),
    or an OverflowError from rms ** 2."""
    frozen = lt.FNN([np.array([[0.3]]), np.array([[0.3]])], final_relu=False)
    target = lt.FNN([np.array([[0.3]]), np.array([[1e308]])], final_relu=False)
    with pytest.raises(NumericalError, match="fnn_error_bound"):
        lt.fnn_error_bound(frozen, target, 0)


@pytest.mark.parametrize("fn", [lt.numeric_rank, lt.condition_number, lt.Adapter.from_delta])
def test_singular_values_beyond_float64_raise(fn):
    """A 3 x 3 matrix of 1e308 entries has NaN singular values in LAPACK: numeric_rank returned 0."""
    with pytest.raises(NumericalError):
        fn(np.full((3, 3), 1e308))


@pytest.mark.parametrize("matrix", [np.ones((2, 3)), np.zeros((0, 0)), np.array([[np.nan, 0], [0, 1.0]])])
def test_condition_number_of_a_non_square_or_empty_matrix_raises(matrix):
    """condition_number of a non-square or empty matrix returned a number."""
    with pytest.raises(InvalidArgumentError, match="matrix"):
        lt.condition_number(matrix)


@pytest.mark.parametrize(
    "kwargs", [dict(kappa=math.nan), dict(gamma=math.inf), dict(kappa=-1.0), dict(c=math.nan), dict(floor=-1.0)]
)
def test_tolerance_refuses_non_finite_arguments(kwargs):
    """tolerance(kappa=nan) returned 1e-10, as if nothing had been inverted."""
    with pytest.raises(InvalidArgumentError, match=next(iter(kwargs))):
        lt.tolerance(**kwargs)


@pytest.mark.parametrize("dtype", [np.int64, int, "int32", bool, "not a dtype"])
def test_integer_dtypes_are_refused_by_name(dtype):
    """Integer dtypes in tolerance or unit_roundoff raised numpy's ValueError."""
    for fn in (lt.unit_roundoff, lambda d: lt.tolerance(dtype=d)):
        with pytest.raises(InvalidArgumentError, match="dtype"):
            fn(dtype)


def test_relative_error_refuses_mismatched_shapes():
    """relative_error broadcast a (3,) array against a (2, 3) one, or raised numpy's ValueError."""
    with pytest.raises(InvalidArgumentError, match="reference"):
        lt.relative_error(np.ones(3), np.ones((2, 3)))
    with pytest.raises(InvalidArgumentError, match="reference"):
        lt.relative_error(np.ones(3), np.ones(2))


def test_sample_ball_refuses_an_empty_centre():
    """sample_ball with an empty centre raised ZeroDivisionError."""
    with pytest.raises(InvalidArgumentError, match="center"):
        lt.sample_ball(np.zeros(0), 1.0, 3)


def test_tfn_refuses_zero_tokens():
    """A TFN called with zero tokens raised numpy's ValueError (max of an empty array)."""
    model = lt.random_tfn(3, 1, 1, seed=0)
    with pytest.raises(InvalidArgumentError, match="X"):
        model(np.zeros((3, 0)))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -1.0, "1"])
def test_random_fnn_refuses_a_bad_scale(scale):
    """scale of NaN, inf or below 0 gave NaN weights or numpy's OverflowError."""
    with pytest.raises(InvalidArgumentError, match="scale"):
        lt.random_fnn(3, 2, seed=0, scale=scale)


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True, [1, 2]])
@pytest.mark.parametrize(
    "fn",
    [
        lambda s: lt.random_fnn(2, 1, seed=s),
        lambda s: lt.random_tfn(2, 1, 1, seed=s),
        lambda s: lt.sample_ball(np.zeros(2), 1.0, 2, seed=s),
        lambda s: lt.random_rational_linear(2, 1, seed=s),
    ],
)
def test_bad_seeds_are_refused_by_name(fn, seed):
    """Negative, float and string seeds raised numpy's ValueError or TypeError."""
    with pytest.raises(InvalidArgumentError, match="seed"):
        fn(seed)


@pytest.mark.parametrize("value", ["no", 0, 1, None, np.array([True])])
def test_booleans_are_checked_not_their_truthiness(value):
    """FNN(..., final_relu='no') gave final_relu=True."""
    with pytest.raises(InvalidArgumentError, match="final_relu"):
        lt.FNN([np.eye(2)], final_relu=value)
    with pytest.raises(InvalidArgumentError, match="bias"):
        lt.random_fnn(2, 1, bias=value)
    assert lt.FNN([np.eye(2)], final_relu=np.bool_(False)).final_relu is False


@pytest.mark.parametrize("value", [(np.eye(2) for _ in range(2)), 3, np.eye(2), "ab"])
def test_a_sequence_argument_refuses_generators_ints_arrays_and_strings(value):
    """A generator, an int or an array where a sequence is expected failed deep inside numpy."""
    with pytest.raises(InvalidArgumentError):
        lt.product(value)
    with pytest.raises(InvalidArgumentError):
        lt.lora_linear(value, np.eye(2), 1)
    with pytest.raises(InvalidArgumentError, match="partition"):
        lt.partition_blocks(value if not isinstance(value, np.ndarray) else "x")


def test_linear_fnn_on_samples_with_an_inner_layer():
    """lora_fnn of a linear FNN (activation='linear') on a sample domain with a block of two layers raised
    UnboundLocalError: the size of the pre-activations was computed only when ReLUs were linearised."""
    frozen = lt.random_fnn(3, 2, seed=0, activation="linear")
    target = lt.random_fnn(3, 1, seed=1, activation="linear")
    X = np.random.default_rng(2).standard_normal((5, 3))
    fit = lt.lora_fnn(frozen, target, 3, inputs=X)
    assert fit.exact
    assert np.max(np.linalg.norm(fit.model(X) - target(X), axis=1)) <= fit.absolute_tolerance


def test_solve_that_overflows_in_the_transformer_raises():
    """W1 of 1e-14 against a target W1 of 1e299: LAPACK's solve returned inf without a word, and
    tfn_matched_discrepancies returned an infinite matched product."""
    one = np.array([[[[0.27]]]])
    frozen = lt.TFN(
        one,
        one,
        one,
        one,
        w1=np.array([[[2.7e-14]]]),
        b1=np.array([[0.27]]),
        w2=np.array([[[0.27]]]),
        b2=np.array([[0.27]]),
        w_out=np.array([[0.27]]),
    )
    target = frozen.replace(w1=np.array([[[2.7e299]]]))
    for fn in (lt.tfn_matched_discrepancies, lambda f, t: lt.lora_tfn(f, t, 1)):
        with pytest.raises(NumericalError, match="W1"):
            fn(frozen, target)


@pytest.mark.parametrize("norm", [np.array(["a", "b"]), np.array([1, 2])])
def test_norm_given_as_an_array_is_refused(norm):
    """linear_optimal_error(..., norm=array) raised numpy's 'truth value of an array is ambiguous'."""
    with pytest.raises(InvalidArgumentError, match="norm"):
        lt.linear_optimal_error([np.eye(2)], 2 * np.eye(2), 1, norm)
    with pytest.raises(InvalidArgumentError, match="norm"):
        lt.lora_linear([np.eye(2)], 2 * np.eye(2), 1).achieved_error(norm)


@ill_conditioned_ok
def test_tfn_mp_predict_at_width_one():
    """HighPrecisionTFNFit.predict of a (1, 2) input returned one value instead of two (found by the fuzz): at
    width 1 a (1, 1) weight was taken for a bias and flattened."""
    frozen, target = lt.random_tfn(1, 1, 1, seed=0), lt.random_tfn(1, 1, 1, seed=1)
    hp = lt.lora_tfn_mp(frozen, target, 1)
    X = np.random.default_rng(5).standard_normal((1, 2))
    assert hp.predict(X).shape == (1, 2)
    np.testing.assert_allclose(hp.predict(X), target(X), rtol=1e-8)


# ------------------------------------------------------------------ recursion and precision cap


def test_best_partition_at_depth_3000():
    """best_partition raised RecursionError for L = L̄ = 3000."""
    sizes, value = lt.best_partition(lambda i, start, stop: 1, 3000, 3000)
    assert sizes == (1,) * 3000 and value == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda d: lt.lora_linear_mp([np.eye(2)], 2 * np.eye(2), 1, digits=d),
        lambda d: lt.lora_fnn_mp(*fnn_pair(D=2), 1, input_radius=1.0, digits=d),
        lambda d: lt.lora_tfn_mp(lt.random_tfn(2, 1, 1, seed=0), lt.random_tfn(2, 1, 1, seed=1), 1, digits=d),
    ],
)
def test_precision_beyond_the_cap_is_refused_at_once(call):
    """lora_linear_mp(..., digits=10**7) did not return (killed after 20 s)."""
    start = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="MAX_DIGITS"):
        call(10**7)
    with pytest.raises(InvalidArgumentError, match="MAX_DIGITS"):
        call(MAX_DIGITS + 1)
    assert time.monotonic() - start < 5


def test_choose_digits_refuses_beyond_the_cap():
    """choose_digits could ask for any precision (target_digits=10**7): refused, as is a result above the cap."""
    with pytest.raises(InvalidArgumentError, match="target_digits"):
        lt.choose_digits(1.0, target_digits=10**7)
    with pytest.raises(InvalidArgumentError, match="MAX_DIGITS"):
        lt.choose_digits(1e300, 1e300, safety=MAX_DIGITS - 600)
    assert lt.choose_digits(1.7e308, 1.7e308) <= MAX_DIGITS  # every float64 κ, γ fits under the cap
