"""Lemma 4: tuning the final layers cannot separate inputs the frozen first layer merges; LoRA can."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_theory.errors import InvalidArgumentError
from lora_theory.final_layers import (
    MIN_ROUNDING_RATIO,
    final_layers_parameter_count,
    final_layers_witness,
    lora_parameter_count,
)
from lora_theory.fnn import fnn_rank_requirement, lora_fnn
from lora_theory.models import FNN, random_fnn
from lora_theory.numerics import relative_error

SEEDS = st.integers(0, 2**32 - 1)


def _check_witness(w, frozen, target):
    """Everything a witness claims, recomputed from scratch."""
    W1, b1 = frozen.weights[0], frozen.biases[0]
    for z in (w.x, w.x_prime):
        assert np.linalg.norm(z - w.center) <= w.radius * (1 + 1e-12)
    y, yp = W1 @ w.x + b1, W1 @ w.x_prime + b1
    S = list(w.coordinates)
    assert S and (y[S] < 0).all() and (yp[S] < 0).all()
    off = np.setdiff1d(np.arange(frozen.width), S)
    assert np.allclose(W1 @ (w.x_prime - w.x), w.d, atol=1e-12 * np.abs(w.d).max())
    assert np.all(w.d[off] == 0)
    # the frozen first layer maps both inputs to the same point (to rounding)
    h, hp = np.maximum(y, 0), np.maximum(yp, 0)
    assert np.linalg.norm(h - hp) <= 1e-12 * max(np.linalg.norm(h), 1.0)
    assert w.first_layer_gap <= 1e-12
    sep = np.linalg.norm(target(w.x) - target(w.x_prime))
    assert w.separation == pytest.approx(sep)
    assert w.rounding_ratio > MIN_ROUNDING_RATIO
    assert w.lower_bound == pytest.approx(sep / 2)


@given(st.integers(2, 16), st.integers(2, 4), SEEDS)
def test_witness_found_for_generic_affine_targets(D, L, seed):
    """A one-layer affine target separates every pair with d != 0 (T W_1^{-1} d != 0): a witness exists iff
    some first-layer unit can be negative on the ball."""
    rng = np.random.default_rng(seed)
    frozen = random_fnn(D, L, seed=rng)
    target = random_fnn(D, 1, seed=rng, final_relu=False)
    radius = 5.0
    w = final_layers_witness(frozen, target, input_radius=radius, seed=seed, n_starts=16, n_refine=3)
    W1, b1 = frozen.weights[0], frozen.biases[0]
    lowest = b1 - radius * np.linalg.norm(W1, axis=1)  # smallest value of each unit
    assert w.found == bool((lowest < 0).any())
    if w.found:
        _check_witness(w, frozen, target)
        _check_definitions(w, frozen, target)
        assert w.relative_separation > 1e-6  # far above rounding


@given(st.integers(2, 10), st.integers(1, 2), SEEDS, st.sampled_from([0.5, 1.0, 3.0]))
def test_any_reported_witness_is_valid(D, Lbar, seed, radius):
    rng = np.random.default_rng(seed)
    frozen, target = random_fnn(D, 3, seed=rng), random_fnn(D, Lbar, seed=rng)
    center = rng.uniform(-0.5, 0.5, D)
    w = final_layers_witness(frozen, target, input_radius=radius, center=center, seed=seed, n_starts=16, n_refine=3)
    assert np.array_equal(w.center, center) and w.radius == radius
    if w.found:
        _check_witness(w, frozen, target)
        _check_definitions(w, frozen, target)
    else:
        assert w.x is None or w.rounding_ratio <= MIN_ROUNDING_RATIO
        assert w.reason


def test_final_layers_cannot_separate_what_lora_fits():
    """At D = 16, L = 2, L̄ = 1: every tuning of layer 2 gives the witness pair one output; LoRA at the
    threshold equals the target on the ball, so it separates them as the target does."""
    frozen, target = random_fnn(16, 2, seed=0), random_fnn(16, 1, seed=1)
    w = final_layers_witness(frozen, target, input_radius=2.0, seed=0)
    assert w.found and "same point" in w.reason
    _check_witness(w, frozen, target)
    assert w.relative_separation > 1e-3
    rng = np.random.default_rng(2)
    for _ in range(5):  # arbitrary tunings of the last layer
        tuned = FNN([frozen.weights[0], rng.standard_normal((16, 16))], [frozen.biases[0], rng.standard_normal(16)])
        assert relative_error(tuned(w.x_prime), tuned(w.x)) <= 1e-12
    R = fnn_rank_requirement(frozen, target)
    fit = lora_fnn(frozen, target, R, input_radius=2.0)
    pair = np.stack([w.x, w.x_prime])
    assert relative_error(fit.model(pair), target(pair)) <= fit.tolerance
    assert np.linalg.norm(fit.model(w.x) - fit.model(w.x_prime)) == pytest.approx(w.separation, rel=1e-6)


@pytest.mark.parametrize("D", [2, 8, 16])
def test_none_when_b1_keeps_the_first_layer_active(D):
    frozen, target = random_fnn(D, 2, seed=3), random_fnn(D, 1, seed=4)
    radius = 1.0
    shift = radius * np.linalg.norm(frozen.weights[0], axis=1) + 0.1  # every unit positive on the ball
    active = frozen.replace(biases=[shift, frozen.biases[1]])
    w = final_layers_witness(active, target, input_radius=radius)
    assert not w.found and not w
    assert "b_1" in w.reason and "positive" in w.reason
    assert w.x is None and w.separation == 0.0
    # and final-layers tuning can then fit a one-layer target: W_2 = T W_1^{-1}, b_2 = c - W_2 b_1
    W2 = np.linalg.solve(active.weights[0].T, target.weights[0].T).T
    tuned = FNN([active.weights[0], W2], [shift, target.biases[0] - W2 @ shift])
    x = np.random.default_rng(0).standard_normal((100, D))
    x *= (radius / np.linalg.norm(x, axis=1, keepdims=True)) * 0.999
    assert relative_error(tuned(x), target(x)) <= 1e-10


def test_none_for_a_linear_first_layer():
    frozen = random_fnn(4, 2, seed=0, activation="linear")
    w = final_layers_witness(frozen, random_fnn(4, 1, seed=1), input_radius=1.0)
    assert not w.found and "no ReLU" in w.reason


def test_rounding_level_separation_is_not_a_witness():
    """A target constant on the ball separates nothing: "none" with the reason, never a witness."""
    D = 4
    frozen = random_fnn(D, 2, seed=5)
    target = FNN([np.zeros((D, D))], [np.ones(D)], final_relu=False)
    w = final_layers_witness(frozen, target, input_radius=3.0)
    assert not w.found and "rounding level" in w.reason
    assert w.rounding_ratio <= MIN_ROUNDING_RATIO


def test_parameter_counts():
    assert lora_parameter_count(16, 8, 2) == 2 * 2 * 16 * 8
    assert lora_parameter_count(16, 4, [8, 9, 10, 11]) == 2 * 16 * 38
    assert lora_parameter_count(16, 2, 0) == 0
    assert final_layers_parameter_count(16, 2, bias=True) == 2 * 256 + 2 * 16
    assert final_layers_parameter_count(16, 2, bias=False) == 2 * 256


def test_parameter_counts_compare_like_for_like_by_default():
    """Neither count includes biases by default (final_layers_parameter_count used to add l·D), so the paper's
    comparison 2RDL = l·D^2 (L̄ = 1, L = 8, D = 16: R = 2 against l = 2 layers) holds with the defaults."""
    assert final_layers_parameter_count(16, 2) == 2 * 256
    assert lora_parameter_count(16, 8, 2) == final_layers_parameter_count(16, 2)


# -------------------------------------------------------------------------------------------- bad input


def test_singular_first_layer_gives_a_kernel_witness():
    """A singular W_1 merges x and x + v for v in its kernel (W_1 x + b_1 unchanged, ReLU or not): the pair of
    Lemma 4 exists trivially. It used to raise SingularMatrixError; it is now reported as a witness."""
    frozen = random_fnn(4, 2, seed=0)
    W1 = frozen.weights[0].copy()
    W1[1] = 2 * W1[0]  # rank 3: a one-dimensional kernel
    target = random_fnn(4, 1, seed=1, final_relu=False)
    for activation in ("relu", "linear"):
        broken = FNN([W1, frozen.weights[1]], frozen.biases, activation=activation)
        w = final_layers_witness(broken, target, input_radius=1.0, seed=0, n_starts=8, n_refine=3)
        assert w.found and w.mechanism == "kernel" and w.coordinates == ()
        assert "W_1 is singular" in w.reason and "kernel of dimension 1" in w.reason
        for z in (w.x, w.x_prime):
            assert np.linalg.norm(z - w.center) <= w.radius * (1 + 1e-12)
        assert np.linalg.norm(W1 @ (w.x_prime - w.x)) <= 1e-12 * np.linalg.norm(w.x_prime - w.x)
        assert w.first_layer_gap <= 1e-12
        sep = np.linalg.norm(target(w.x) - target(w.x_prime))
        assert w.separation == pytest.approx(sep) and w.lower_bound == pytest.approx(sep / 2)
        assert w.rounding_ratio > MIN_ROUNDING_RATIO
        _check_definitions(w, broken, target)  # a gap of rounding size, not 0: W_1 K is not exactly 0
        # the longest chord along the kernel has length 2r; an affine target separates its ends most
        v = np.linalg.svd(W1)[2][-1]
        assert sep >= 0.99 * 2 * np.linalg.norm(target.weights[0] @ v)
    # the same rounding-ratio rule: a target blind to the kernel separates nothing
    blind = FNN([np.outer(np.ones(4), W1[0])], [np.zeros(4)], final_relu=False)  # T v = 0
    w = final_layers_witness(
        frozen.replace(weights=[W1, frozen.weights[1]]), blind, input_radius=1.0, n_starts=8, n_refine=2
    )
    assert not w.found and w.mechanism == "kernel" and "rounding level" in w.reason


def test_missing_radius_and_bad_seed_are_project_errors():
    frozen, target = random_fnn(4, 2, seed=0), random_fnn(4, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match=r"^input_radius: is required") as info:
        final_layers_witness(frozen, target)  # was a TypeError
    assert info.value.argument == "input_radius"
    for seed in (-1, 1.5, "0", True):
        with pytest.raises(InvalidArgumentError, match=r"^seed: must be a non-negative int, None or a numpy Generator"):
            final_layers_witness(frozen, target, input_radius=1.0, seed=seed)
    for seed in (None, np.int64(3), np.random.default_rng(0)):
        final_layers_witness(frozen, target, input_radius=1.0, seed=seed, n_starts=2, n_refine=0)


@pytest.mark.parametrize(
    "kwargs, argument, message",
    [
        ({"input_radius": 0.0}, "input_radius", "positive"),
        ({"input_radius": -2.0}, "input_radius", "positive"),
        ({"input_radius": float("nan")}, "input_radius", "positive"),
        ({"input_radius": None}, "input_radius", "positive"),
        ({"input_radius": 1.0, "center": np.zeros(3)}, "center", "shape"),
        ({"input_radius": 1.0, "center": np.full(4, np.inf)}, "center", "NaN or infinite"),
        ({"input_radius": 1.0, "n_starts": 0}, "n_starts", "at least 1"),
        ({"input_radius": 1.0, "n_directions": 2.5}, "n_directions", "integer"),
    ],
)
def test_bad_witness_arguments(kwargs, argument, message):
    frozen, target = random_fnn(4, 2, seed=0), random_fnn(4, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match=message) as info:
        final_layers_witness(frozen, target, **kwargs)
    assert info.value.argument == argument


def test_bad_witness_models():
    frozen, target = random_fnn(4, 2, seed=0), random_fnn(4, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match="width D = 4") as info:
        final_layers_witness(frozen, random_fnn(5, 1, seed=1), input_radius=1.0)
    assert info.value.argument == "target"
    with pytest.raises(InvalidArgumentError, match="lora_theory.FNN") as info:
        final_layers_witness(frozen.weights, target, input_radius=1.0)
    assert info.value.argument == "frozen"


@pytest.mark.parametrize(
    "call, argument, message",
    [
        (lambda: lora_parameter_count(0, 2, 1), "width", "at least 1"),
        (lambda: lora_parameter_count(4, 0, 1), "depth", "at least 1"),
        (lambda: lora_parameter_count(4, 2, 5), "rank", "at most 4"),
        (lambda: lora_parameter_count(4, 2, [1, 2, 3]), "rank", "one rank for each of the 2 layers"),
        (lambda: lora_parameter_count(4, 2, 1.0), "rank", "integer"),
        (lambda: final_layers_parameter_count(4, -1), "layers", "at least 0"),
        (lambda: final_layers_parameter_count(4.0, 1), "width", "integer"),
    ],
)
def test_bad_parameter_count_arguments(call, argument, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        call()
    assert info.value.argument == argument


# ------------------------------------------------------------------------ claims pinned by mutation testing


def test_parameter_counts_refuse_what_no_model_has():
    """A width of 1 is a model (one weight per layer), 0 is not; ``bias`` must be a bool and is named when it
    is not; a depth beyond ``MAX_DEPTH`` is refused before any rank is built."""
    from lora_theory.partition import MAX_DEPTH

    assert final_layers_parameter_count(1, 3) == 3 and final_layers_parameter_count(1, 3, bias=True) == 6
    for call, argument in (
        (lambda: final_layers_parameter_count(0, 1), "width"),
        (lambda: final_layers_parameter_count(4, 1, bias="yes"), "bias"),
        (lambda: lora_parameter_count(4, MAX_DEPTH + 1, 1), "depth"),
    ):
        with pytest.raises(InvalidArgumentError) as info:
            call()
        assert info.value.argument == argument and str(info.value).startswith(f"{argument}: ")


def test_a_search_without_a_witness_reports_its_ball_and_no_separation():
    """No witness (a first layer without ReLU): the result names the ball searched (its centre and radius)
    and carries no pair: no coordinates, and every separation, ratio, gap and bound 0."""
    frozen = random_fnn(3, 2, seed=0, activation="linear")
    center = np.array([0.5, -1.0, 2.0])
    w = final_layers_witness(frozen, random_fnn(3, 1, seed=1, activation="linear"), input_radius=1.5, center=center)
    assert not w.found
    assert np.array_equal(w.center, center) and w.radius == 1.5
    assert w.coordinates == () and w.x is None and w.x_prime is None and w.d is None
    assert (w.separation, w.relative_separation, w.rounding_ratio, w.first_layer_gap, w.lower_bound) == (0.0,) * 5
    assert all(isinstance(v, float) for v in (w.relative_separation, w.rounding_ratio, w.first_layer_gap))


def test_the_kernel_witness_takes_the_longest_chord_in_the_best_kernel_direction():
    """A first layer with a two-dimensional kernel ``K``, an off-centre ball of radius 2 and an affine target
    ``T``: the pair lies on the sphere (the ends of a chord), differs along the kernel, and is separated by
    nearly ``2r·σ_max(T K)``, the most any pair merged by ``W_1`` can be (the longest chord, ``2r``, along the
    kernel direction ``T`` stretches most)."""
    rng = np.random.default_rng(7)
    W1 = rng.standard_normal((4, 4))
    W1[2], W1[3] = 2 * W1[0], W1[0] - W1[1]  # rank 2: a two-dimensional kernel
    frozen = FNN([W1, rng.standard_normal((4, 4))], [rng.standard_normal(4), np.zeros(4)])
    target = FNN([np.diag([3.0, 1.0, 0.5, 0.2]) @ rng.standard_normal((4, 4))], [np.zeros(4)], final_relu=False)
    center, r = np.array([1.0, -0.5, 0.3, 2.0]), 2.0
    w = final_layers_witness(frozen, target, input_radius=r, center=center, seed=0, n_starts=8, n_refine=3)
    assert w.found and w.mechanism == "kernel"
    for z in (w.x, w.x_prime):
        assert abs(np.linalg.norm(z - center) - r) <= 1e-6 * r
    K = np.linalg.svd(W1)[2][2:].T  # (4, 2) kernel basis
    assert np.linalg.norm(W1 @ (w.x_prime - w.x)) <= 1e-12 * np.linalg.norm(w.x_prime - w.x)
    best = 2 * r * np.linalg.norm(target.weights[0] @ K, 2)
    assert best * 0.99 <= w.separation <= best * (1 + 1e-9)


def test_a_chord_through_an_inner_point_spans_the_ball():
    """``_chord_search`` from the centre of an off-centre ball of radius 2 along a kernel direction ``v``:
    the chord's ends are ``c ± r·v`` (inside by the 1e-9 shrink), so an identity target separates them by
    ``2r``."""
    from lora_theory.final_layers import _chord_search

    center, r = np.array([3.0, -1.0, 0.5]), 2.0
    K = np.array([[0.0], [1.0], [0.0]])  # (3, 1) the kernel
    identity = FNN([np.eye(3)], [np.zeros(3)], final_relu=False)
    sep, x, xp = _chord_search(center[None, :], K, center, r, identity, np.random.default_rng(0), 0)
    assert sep == pytest.approx(2 * r, rel=1e-8)
    assert sorted([x[1], xp[1]]) == pytest.approx([center[1] - r, center[1] + r], rel=1e-8)


# ------------------------------------------------------- the witness search (claims pinned by mutation testing)


def _has_relu(frozen):
    """Whether the frozen first layer applies a ReLU (a one-layer model only with ``final_relu``)."""
    return frozen.activation == "relu" and (frozen.depth > 1 or frozen.final_relu)


def _check_definitions(w, frozen, target):
    """Every derived field of a witness equals its documented definition, recomputed from the pair."""
    W1, b1 = frozen.weights[0], frozen.biases[0]
    fx, fxp = target(w.x), target(w.x_prime)
    ref = max(np.linalg.norm(fx), np.linalg.norm(fxp))
    sep = np.linalg.norm(fx - fxp)
    assert w.separation == pytest.approx(sep, rel=1e-12)
    assert w.lower_bound == pytest.approx(sep / 2, rel=1e-12)
    assert w.relative_separation == pytest.approx(sep / ref, rel=1e-12)
    assert w.rounding_ratio == pytest.approx(sep / (np.finfo(float).eps / 2 * ref), rel=1e-12)
    h = (lambda z: np.maximum(W1 @ z + b1, 0.0)) if _has_relu(frozen) else (lambda z: W1 @ z + b1)
    hx, hxp = h(w.x), h(w.x_prime)
    h_ref = max(np.linalg.norm(hx), np.linalg.norm(hxp))
    gap = np.linalg.norm(hx - hxp) / h_ref if h_ref > 0 else 0.0  # both 0: no gap
    assert w.first_layer_gap == pytest.approx(gap, rel=1e-9, abs=0)
    for z in (w.x, w.x_prime):
        assert np.linalg.norm(z - w.center) <= w.radius * (1 + 1e-12)
    if w.mechanism == "kernel":
        assert np.array_equal(w.d, W1 @ (w.x_prime - w.x))
    else:
        assert np.allclose(W1 @ (w.x_prime - w.x), w.d, rtol=0, atol=1e-9 * np.abs(w.d).max())
    if w.found:
        assert f"{w.lower_bound:.3g} of the target" in w.reason and f"{w.separation:.3g}" in w.reason
        if w.mechanism == "relu":
            assert f"units {list(w.coordinates)} of the first layer" in w.reason


def _negative_on_the_whole_ball(rng, D, S, r, c, scale=1.0):
    """A first layer whose units ``S`` are negative on the whole ball (by a margin of 1) and the others
    positive on it; a random invertible ``W_1`` (rows not of unit norm)."""
    W1 = scale * rng.standard_normal((D, D))
    reach = np.abs(W1 @ c) + r * np.linalg.norm(W1, axis=1)  # (D,) how far each unit can move from 0
    b1 = np.where(np.isin(np.arange(D), S), -(reach + scale), reach + scale)
    return FNN([W1, rng.standard_normal((D, D))], [b1, np.zeros(D)])


@given(
    st.integers(2, 7),
    SEEDS,
    st.sampled_from([0.5, 2.0]),
    st.sampled_from([1e-3, 1.0, 1e3]),
    st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_the_witness_attains_the_best_separation_when_the_negative_units_span_the_ball(D, seed, r, scale, fscale):
    """Units ``S`` negative on the whole ball, the others positive, an affine target ``T``: a pair merged by
    the first layer differs by ``W_1^{-1} d`` with ``d`` on ``S``, so the best separation is ``2r·σ_max(T Q)``
    (``Q`` an orthonormal basis of the columns ``S`` of ``W_1^{-1}``: the diameter along the direction ``T``
    stretches most). The search attains it (its centre start and the target's steepest direction), never
    exceeds it, and its fields are what they are defined to be, whatever the units of target and first
    layer."""
    rng = np.random.default_rng(seed)
    S = sorted(rng.choice(D, int(rng.integers(1, D + 1)), replace=False).tolist())
    c = rng.uniform(-1, 1, D)
    frozen = _negative_on_the_whole_ball(rng, D, S, r, c, scale)
    T = fscale * rng.standard_normal((D, D))
    target = FNN([T], [fscale * rng.standard_normal(D)], final_relu=False)
    Q = np.linalg.qr(np.linalg.solve(frozen.weights[0], np.eye(D)[:, S]))[0]
    best = 2 * r * np.linalg.norm(T @ Q, 2)
    w = final_layers_witness(frozen, target, input_radius=r, center=c, seed=seed, n_starts=4, n_refine=1)
    assert w.found and w.mechanism == "relu" and list(w.coordinates) == S
    _check_witness(w, frozen, target)
    _check_definitions(w, frozen, target)
    assert best * (1 - 1e-8) <= w.separation <= best * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_unit_negative_only_on_a_small_cap_is_found_and_moved_along_its_whole_cap(seed, sign):
    """One unit ``k`` negative only on a cap of the ball (a tenth of the radius deep: about 1e-4 of its
    volume in 8 dimensions, which uniform starts miss), the others positive on the whole ball, a diagonal
    ``W_1`` with rows far from unit norm. The pair must differ along ``e_k`` within the cap, so the best
    separation is ``||T e_k||`` times the cap's depth ``h`` (to within ``η``); the search finds it from the
    point where unit ``k`` is most negative."""
    rng = np.random.default_rng(seed)
    D, r, k = 8, 0.5, int(rng.integers(8))
    c = rng.uniform(-1, 1, D)
    w1 = sign * rng.uniform(2.0, 5.0, D)  # (D,) the diagonal of W_1
    h = 0.1 * r
    b1 = np.abs(w1) * r - w1 * c + 1.0  # every unit positive on the ball ...
    b1[k] = -(w1[k] * c[k]) + abs(w1[k]) * (r - h)  # ... but unit k, negative only within h of its pole
    frozen = FNN([np.diag(w1), rng.standard_normal((D, D))], [b1, np.zeros(D)])
    T = rng.standard_normal((D, D))
    target = FNN([T], [np.zeros(D)], final_relu=False)
    w = final_layers_witness(frozen, target, input_radius=r, center=c, seed=seed, n_starts=16, n_refine=2)
    assert w.found and w.coordinates == (k,)
    _check_witness(w, frozen, target)
    _check_definitions(w, frozen, target)
    best = np.linalg.norm(T[:, k]) * h
    assert best * (1 - 1e-6) <= w.separation <= best * (1 + 1e-9)


def _singular_first_layer(rng, D, k, activation, depth, final_relu, r, c):
    """A first layer of rank ``D - k`` (a ``k``-dimensional kernel ``K``, orthonormal columns)."""
    U = np.linalg.qr(rng.standard_normal((D, D)))[0]
    s = np.concatenate([rng.uniform(1, 3, D - k), np.zeros(k)])
    V = np.linalg.qr(rng.standard_normal((D, D)))[0]
    W1 = U @ np.diag(s) @ V.T
    b1 = rng.standard_normal(D)
    frozen = FNN(
        [W1] + [rng.standard_normal((D, D))] * (depth - 1),
        [b1] + [np.zeros(D)] * (depth - 1),
        activation=activation,
        final_relu=final_relu,
    )
    return frozen, V[:, D - k :]


@given(
    st.integers(2, 6),
    SEEDS,
    st.sampled_from([("relu", 2, False), ("relu", 1, True), ("relu", 1, False), ("linear", 2, True)]),
    st.sampled_from([0.5, 2.0]),
    st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_a_kernel_witness_attains_the_longest_chord_along_the_steepest_kernel_direction(D, seed, layer, r, fscale):
    """A singular ``W_1`` with a ``k``-dimensional kernel ``K`` merges ``x`` and ``x + K a`` (ReLU or not); for
    an affine target ``T`` the best pair is the diameter along the kernel direction ``T`` stretches most,
    separated by ``2r·σ_max(T K)``. The search attains it from the centre, never exceeds it, and its
    fields are their definitions (the first-layer gap through the ReLU when the first layer has one)."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, D))
    c = rng.uniform(-1, 1, D)
    frozen, K = _singular_first_layer(rng, D, k, *layer, r, c)
    T = fscale * rng.standard_normal((D, D))
    target = FNN([T], [fscale * rng.standard_normal(D)], final_relu=False)
    w = final_layers_witness(frozen, target, input_radius=r, center=c, seed=seed, n_starts=4, n_refine=1)
    assert w.found and w.mechanism == "kernel" and w.coordinates == ()
    assert f"kernel of dimension {k}" in w.reason
    _check_definitions(w, frozen, target)
    best = 2 * r * np.linalg.norm(T @ K, 2)
    assert best * (1 - 1e-8) <= w.separation <= best * (1 + 1e-9)


@pytest.mark.parametrize("singular", [False, True])
def test_a_zero_target_separates_nothing(singular):
    """A target that is 0 everywhere: no witness, and a relative separation and rounding ratio of 0 (not a
    division by zero, not 1)."""
    rng = np.random.default_rng(0)
    c = np.zeros(4)
    frozen = (
        _singular_first_layer(rng, 4, 1, "relu", 2, False, 1.0, c)[0]
        if singular
        else _negative_on_the_whole_ball(rng, 4, [0, 1], 1.0, c)
    )
    zero = FNN([np.zeros((4, 4))], [np.zeros(4)], final_relu=False)
    w = final_layers_witness(frozen, zero, input_radius=1.0, n_starts=4, n_refine=1)
    assert not w.found and "rounding level" in w.reason and w.reason.endswith("(one may still exist)")
    assert (w.separation, w.relative_separation, w.rounding_ratio) == (0.0, 0.0, 0.0)
    assert w.mechanism == ("kernel" if singular else "relu")


def test_which_first_layers_have_a_relu():
    """The first layer applies a ReLU when the model's activation is ReLU and it is not the model's last,
    affine layer: a one-layer model with ``final_relu`` has one, one without it does not, and a two-layer
    model has one whatever ``final_relu`` says."""
    rng = np.random.default_rng(1)
    c = np.zeros(4)
    base = _negative_on_the_whole_ball(rng, 4, [0, 2], 1.0, c)
    target = FNN([rng.standard_normal((4, 4))], [np.zeros(4)], final_relu=False)
    W1, b1 = base.weights[0], base.biases[0]
    for frozen, relu in (
        (FNN([W1], [b1], final_relu=True), True),
        (FNN([W1], [b1], final_relu=False), False),
        (FNN(base.weights, base.biases, final_relu=False), True),
        (FNN(base.weights, base.biases, activation="linear"), False),
    ):
        w = final_layers_witness(frozen, target, input_radius=1.0, n_starts=4, n_refine=1)
        assert w.found == relu
        assert ("no ReLU" in w.reason) == (not relu)


def _unit_at_depth(theta):
    """A first layer ``3·I`` on a ball of radius 2 around ``c`` whose unit 0 reaches exactly ``-θ·η`` at its
    lowest (``η = NEGATIVITY·(||W_1||_2 (||c|| + r) + ||b_1||)``), the others positive on the ball."""
    from lora_theory.final_layers import NEGATIVITY

    D, r = 3, 2.0
    c = np.array([0.5, -1.0, 0.25])
    W1 = 3.0 * np.eye(D)
    b1 = 3.0 * r - W1 @ c + 1.0  # (D,) every unit at least 1 on the ball
    for _ in range(5):  # η depends on b_1: a fixed point, reached in two steps
        eta = NEGATIVITY * (np.linalg.norm(W1, 2) * (np.linalg.norm(c) + r) + np.linalg.norm(b1))
        b1[0] = 3.0 * r - 3.0 * c[0] - theta * eta
    lowest = (W1 @ c + b1 - r * np.linalg.norm(W1, axis=1))[0]
    assert lowest == pytest.approx(-theta * eta, rel=1e-6)
    return FNN([W1, np.eye(D)], [b1, np.zeros(D)]), r, c


@pytest.mark.parametrize("theta, searched", [(0.9, False), (1.1, True)])
def test_a_unit_counts_as_negative_only_below_minus_eta(theta, searched):
    """``η = NEGATIVITY·(||W_1||_2 (||c|| + r) + ||b_1||)`` as documented: a unit reaching ``-0.9η`` at its
    lowest leaves the first layer "positive on the ball" (no witness, that reason); one reaching ``-1.1η``
    makes the search run."""
    frozen, r, c = _unit_at_depth(theta)
    target = FNN([np.random.default_rng(0).standard_normal((3, 3))], [np.zeros(3)], final_relu=False)
    w = final_layers_witness(frozen, target, input_radius=r, center=c, n_starts=4, n_refine=1)
    assert ("keeps every first-layer pre-activation positive" in w.reason) == (not searched)
    if not searched:
        assert not w.found and w.x is None and np.array_equal(w.center, c) and w.radius == r


def test_a_singular_first_layer_names_its_condition_number():
    """The kernel witness's reason gives ``κ(W_1)``: ``inf`` for an exactly zero singular value, its value
    (3 significant digits) otherwise."""
    target = FNN([np.random.default_rng(0).standard_normal((3, 3))], [np.zeros(3)], final_relu=False)
    exact = FNN([np.diag([1.0, 2.0, 0.0]), np.eye(3)], [np.zeros(3), np.zeros(3)])
    w = final_layers_witness(exact, target, input_radius=1.0, n_starts=4, n_refine=1)
    assert w.found and "κ = inf" in w.reason
    W1 = np.diag([1.0, 2.0, 1e-17])
    near = FNN([W1, np.eye(3)], [np.zeros(3), np.zeros(3)])
    w = final_layers_witness(near, target, input_radius=1.0, n_starts=4, n_refine=1)
    assert w.found and f"κ = {2e17:.3g}" in w.reason


def test_a_search_is_reproducible_and_its_defaults_are_the_documented_ones():
    """The same seed gives the same pair (a Generator is used as given); a call without effort arguments is
    the call with the documented defaults: seed 0, 64 starts, 32 directions, 20 refinement rounds."""
    frozen, target = random_fnn(5, 2, seed=4), random_fnn(5, 2, seed=54)  # refinement still gains at round 21
    a = final_layers_witness(frozen, target, input_radius=2.0)
    b = final_layers_witness(frozen, target, input_radius=2.0, seed=0, n_starts=64, n_directions=32, n_refine=20)
    c = final_layers_witness(frozen, target, input_radius=2.0, seed=np.random.default_rng(0))
    for other in (b, c):
        assert np.array_equal(a.x, other.x) and np.array_equal(a.x_prime, other.x_prime)
    for changed in ({"n_refine": 21}, {"n_directions": 33}, {"seed": 1}):  # the comparison can fail
        other = final_layers_witness(frozen, target, input_radius=2.0, **changed)
        assert not np.array_equal(a.x, other.x), changed
    for seed in (1, 2):
        x1 = final_layers_witness(frozen, target, input_radius=2.0, seed=seed, n_starts=8, n_refine=2)
        x2 = final_layers_witness(frozen, target, input_radius=2.0, seed=seed, n_starts=8, n_refine=2)
        assert np.array_equal(x1.x, x2.x) and np.array_equal(x1.x_prime, x2.x_prime)
    d = final_layers_witness(frozen, target, input_radius=2.0, n_starts=65)
    assert not np.array_equal(a.x, d.x)


@pytest.mark.parametrize(
    "kwargs, argument, message",
    [
        ({"n_directions": 0}, "n_directions", "must be at least 1, got 0"),
        ({"n_refine": -1}, "n_refine", "must be at least 0, got -1"),
        ({"n_refine": 1.0}, "n_refine", "must be an integer, got 1.0"),
    ],
)
def test_search_effort_below_its_least_is_refused_and_the_least_is_accepted(kwargs, argument, message):
    frozen, target = random_fnn(4, 2, seed=0), random_fnn(4, 1, seed=1)
    with pytest.raises(InvalidArgumentError) as info:
        final_layers_witness(frozen, target, input_radius=1.0, **kwargs)
    assert info.value.argument == argument and str(info.value) == f"{argument}: {message}"
    final_layers_witness(frozen, target, input_radius=1.0, n_starts=1, n_directions=1, n_refine=0)


@pytest.mark.parametrize("which", ["frozen", "target"])
def test_a_model_that_is_not_an_fnn_is_named_with_its_type(which):
    frozen, target = random_fnn(4, 2, seed=0), random_fnn(4, 1, seed=1)
    args = {"frozen": frozen, "target": target, which: [np.eye(4)]}
    with pytest.raises(InvalidArgumentError) as info:
        final_layers_witness(args["frozen"], args["target"], input_radius=1.0)
    assert info.value.argument == which
    assert str(info.value) == f"{which}: must be a lora_theory.FNN, got list"


@pytest.mark.parametrize("activation, final_relu", [("relu", True), ("relu", False), ("linear", True)])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_the_jacobian_the_search_follows_is_the_models_derivative(activation, final_relu, depth):
    """``_jacobian`` (the map whose steepest direction the search tries) is the derivative of the model:
    central differences agree at points away from every kink, and a ReLU whose input is exactly 0 is counted
    off (its row is 0)."""
    from lora_theory.final_layers import _jacobian

    rng = np.random.default_rng(depth)
    D = 5
    model = random_fnn(D, depth, seed=rng, activation=activation, final_relu=final_relu)
    checked = 0
    for x in rng.standard_normal((40, D)):
        pres, z = [], x
        for l in range(depth):
            pre = model.weights[l] @ z + model.biases[l]
            pres.append(pre)
            z = model._activate(pre, l)
        if min(np.abs(p).min() for p in pres) < 1e-3:  # a kink within reach of the differences
            continue
        h = 1e-7
        fd = np.stack([(model(x + h * e) - model(x - h * e)) / (2 * h) for e in np.eye(D)], axis=1)
        J = _jacobian(model, x)
        assert np.allclose(J, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())
        checked += 1
    assert checked >= 5
    kink = FNN([np.eye(D), np.eye(D)], [np.zeros(D), np.zeros(D)], activation=activation, final_relu=final_relu)
    J0 = _jacobian(kink, np.zeros(D))  # every first-layer pre-activation exactly 0
    assert np.array_equal(J0, np.zeros((D, D)) if activation == "relu" else np.eye(D))


@given(st.integers(2, 6), SEEDS, st.sampled_from([0.5, 2.0]))
def test_a_kernel_witness_of_a_nonlinear_target_is_a_chord_of_the_ball(D, seed, r):
    """Whatever direction of the kernel wins for a ReLU target, the pair is the two ends of a chord: both on
    the sphere (to the 1e-9 shrink), merged by ``W_1``, its fields their definitions."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, D)
    frozen, K = _singular_first_layer(rng, D, int(rng.integers(1, D)), "relu", 2, False, r, c)
    target = random_fnn(D, 2, seed=rng)
    w = final_layers_witness(frozen, target, input_radius=r, center=c, seed=seed, n_starts=4, n_refine=2)
    assert w.mechanism == "kernel"
    if w.x is not None and w.separation > 0:
        for z in (w.x, w.x_prime):
            assert abs(np.linalg.norm(z - c) - r) <= 1e-6 * r
        assert np.linalg.norm(K.T @ (w.x_prime - w.x)) == pytest.approx(np.linalg.norm(w.x_prime - w.x), rel=1e-9)
        _check_definitions(w, frozen, target)


def test_a_kernel_search_is_reproducible():
    """The same seed gives the same pair on the kernel path too (its random starts come from the seed)."""
    rng = np.random.default_rng(5)
    frozen, _ = _singular_first_layer(rng, 4, 2, "relu", 2, False, 1.0, np.zeros(4))
    target = random_fnn(4, 2, seed=6)
    a, b = (final_layers_witness(frozen, target, input_radius=1.0, seed=3, n_starts=6, n_refine=2) for _ in range(2))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.x_prime, b.x_prime)


def test_the_reason_of_a_first_layer_without_relu():
    frozen = random_fnn(4, 2, seed=0, activation="linear")
    w = final_layers_witness(frozen, random_fnn(4, 1, seed=1), input_radius=1.0)
    assert w.reason == (
        "the frozen first layer has no ReLU: it is affine, injective as W_1 is invertible, and the final "
        "layers can undo it"
    )


@pytest.mark.parametrize("radius", [True, "1.0", np.bool_(True)])
def test_a_radius_that_is_not_a_real_number_is_refused(radius):
    frozen, target = random_fnn(4, 2, seed=0), random_fnn(4, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match=r"^input_radius: must be positive and finite, got "):
        final_layers_witness(frozen, target, input_radius=radius)


def test_the_documented_search_defaults_are_the_signatures():
    """The docstring's "Defaults: 64, 32 and 20." for ``n_starts, n_directions, n_refine`` is what a call
    without them uses."""
    import inspect
    import re

    doc = re.search(r"Defaults: (\d+), (\d+) and (\d+)\.", final_layers_witness.__doc__)
    params = inspect.signature(final_layers_witness).parameters
    documented = tuple(int(g) for g in doc.groups())
    assert documented == tuple(params[n].default for n in ("n_starts", "n_directions", "n_refine"))
    assert params["seed"].default == 0


@pytest.mark.parametrize("singular", [False, True])
def test_more_refinement_never_reports_less(singular):
    """Each refinement round draws the same random numbers whatever the rounds before it found, so a search
    with one round more continues the same search: for a ReLU target its separation never decreases with
    ``n_refine``, and over a few rounds it increases."""
    rng = np.random.default_rng(11)
    if singular:
        frozen, _ = _singular_first_layer(rng, 6, 2, "relu", 2, False, 2.0, np.zeros(6))
    else:
        frozen = random_fnn(6, 2, seed=rng)
    target = random_fnn(6, 3, seed=rng)
    seps = [
        final_layers_witness(frozen, target, input_radius=2.0, seed=4, n_starts=6, n_refine=n).separation
        for n in range(6)
    ]
    assert all(b >= a for a, b in zip(seps, seps[1:])), seps
    assert seps[-1] > seps[0], seps


@pytest.mark.slow
@pytest.mark.parametrize("seed, singular", [(2, False), (8, False), (11, False), (5, True), (12, True)])
def test_the_default_refinement_recovers_what_the_first_pass_misses(seed, singular):
    """ReLU frozen and target models (an invertible first layer, ``D = 16``, two layers each; or a first layer
    with a 3-dimensional kernel, ``D = 8``, and a three-layer target), radius 2, on which the first pass (no
    refinement) reaches at most 80% of the separation a search with 4× the starts and 3× the rounds finds:
    the default 20 rounds reach at least 80% of it."""
    if singular:
        rng = np.random.default_rng(seed)
        frozen = _singular_first_layer(rng, 8, 3, "relu", 2, False, 2.0, np.zeros(8))[0]
        target = random_fnn(8, 3, seed=rng)
    else:
        frozen, target = random_fnn(16, 2, seed=100 + seed), random_fnn(16, 2, seed=200 + seed)
    big = final_layers_witness(frozen, target, input_radius=2.0, seed=seed + 1000, n_starts=256, n_refine=60)
    first = final_layers_witness(frozen, target, input_radius=2.0, seed=seed, n_refine=0)
    default = final_layers_witness(frozen, target, input_radius=2.0, seed=seed)
    assert first.separation <= 0.8 * big.separation  # the instance needs the refinement
    assert default.separation >= 0.8 * big.separation


def test_the_witness_does_not_depend_on_the_units_of_the_first_layer():
    """Scaling an invertible ``W_1`` and ``b_1`` by a power of two (exact in floating point) from 2^-990 to
    2^990 changes nothing but ``d``, which scales with them: the same pair, units and separation, bit for bit
    (the norms of rows, biases and activations are taken scaled; an unscaled norm underflowed near 1e-300 and
    overflowed near 1e300). (A singular ``W_1``'s kernel basis is the SVD's choice, which may rotate within
    the kernel when the matrix is scaled: there only the separation's optimum is claimed, above.)"""
    frozen = random_fnn(5, 2, seed=3)
    target = random_fnn(5, 2, seed=4)
    base = final_layers_witness(frozen, target, input_radius=2.0, n_starts=8, n_refine=3)
    assert base.found
    for e in (-990, -500, 500, 990):
        s = 2.0**e
        scaled = frozen.replace(
            weights=[s * frozen.weights[0], frozen.weights[1]], biases=[s * frozen.biases[0], frozen.biases[1]]
        )
        w = final_layers_witness(scaled, target, input_radius=2.0, n_starts=8, n_refine=3)
        assert np.array_equal(w.x, base.x) and np.array_equal(w.x_prime, base.x_prime), e
        assert (w.coordinates, w.separation, w.first_layer_gap) == (
            base.coordinates,
            base.separation,
            base.first_layer_gap,
        )
        assert np.array_equal(w.d, s * base.d)


def test_a_solve_with_w1_beyond_float64_is_named():
    """An invertible ``W_1`` of entries near 1e-300 and κ near 1e12: ``W_1^{-1}`` exceeds float64's range.
    The search stops with a NumericalError that names the solve with ``W_1``, and no warning escapes."""
    import warnings

    from lora_theory.errors import NumericalError

    W1 = 1e-300 * np.array([[1.0, 1.0], [1.0, 1.0 + 1e-12]])
    frozen = FNN([W1, np.eye(2)], [1e-300 * np.array([-1.0, 1.0]), np.zeros(2)])
    target = FNN([np.eye(2)], [np.zeros(2)], final_relu=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NumericalError, match="overflow in a solve with W_1"):
            final_layers_witness(frozen, target, input_radius=1.0)


def test_the_units_of_a_pair_are_those_negative_at_both_points():
    """Unit 1 sits at +η/2 where unit 0 is most negative (the start ``-e_0``), negative elsewhere on the
    ball; the target sees ``x_0`` only. The best pair moves along ``e_0`` through that start, where unit 1
    is positive: it is not one of the pair's units (a support taken with ``y < +η`` listed it)."""
    from lora_theory.final_layers import NEGATIVITY

    b1 = np.array([0.5, 0.0, 10.0])
    for _ in range(3):  # η depends on b_1
        eta = NEGATIVITY * (1.0 + np.linalg.norm(b1))
        b1[1] = 0.5 * eta
    frozen = FNN([np.eye(3), np.eye(3)], [b1, np.zeros(3)])
    target = FNN([np.diag([3.0, 0.0, 0.0])], [np.zeros(3)], final_relu=False)
    w = final_layers_witness(frozen, target, input_radius=1.0, n_starts=8, n_refine=2)
    assert w.found
    _check_witness(w, frozen, target)
    assert w.separation == pytest.approx(3.0 * 0.5, rel=1e-6)  # x_0 from -1 to -0.5, the cap of unit 0


def test_a_first_layer_off_at_both_points_has_no_gap():
    """Every unit negative on the whole ball: the frozen first layer maps the whole ball to 0, so both points
    of the pair go to 0 and the first-layer gap is 0 (not a division by zero, not 1)."""
    rng = np.random.default_rng(0)
    frozen = _negative_on_the_whole_ball(rng, 4, [0, 1, 2, 3], 1.0, np.zeros(4))
    target = random_fnn(4, 1, seed=1, final_relu=False)
    w = final_layers_witness(frozen, target, input_radius=1.0, n_starts=4, n_refine=1)
    assert w.found and w.coordinates == (0, 1, 2, 3)
    assert w.first_layer_gap == 0.0
    _check_witness(w, frozen, target)
