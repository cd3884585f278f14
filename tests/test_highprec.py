"""The high-precision path (THEORY.md §2.3, §3): where float64 runs out of digits, mpmath does not."""

import warnings

import numpy as np
import pytest

from lora_theory.errors import IllConditionedWarning, InvalidArgumentError, SingularMatrixError
from lora_theory.fnn import lora_fnn, sample_ball
from lora_theory.highprec import (
    PrecisionAdvice,
    choose_digits,
    lora_fnn_mp,
    lora_linear_mp,
    suggest_precision,
)
from lora_theory.linear import lora_linear
from lora_theory.models import random_fnn, random_linear
from lora_theory.numerics import tolerance, unit_roundoff


def _deep_linear(seed, width=16, depth=8):
    """THEORY.md §2.3: D = 16, weights U(-1/4, 1/4), one block of 8 layers; a random target."""
    frozen = random_linear(width, depth, seed=seed, scale=0.25).weights
    target = np.random.default_rng(1000 + seed).uniform(-0.25, 0.25, (width, width))
    return frozen, target


def test_choose_digits():
    assert choose_digits(1.0) == 24
    assert choose_digits(1e10) == 34
    assert choose_digits(1e10, 1e5) == 39
    assert choose_digits(1e10, target_digits=30, safety=0) == 40
    with pytest.raises(InvalidArgumentError, match="kappa: is infinite"):
        choose_digits(float("inf"))
    with pytest.raises(InvalidArgumentError, match="gamma: must be a non-negative real number"):
        choose_digits(1.0, -1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_eight_layer_linear_block_float64_warns_and_50_digits_reach_1e30(seed):
    frozen, target = _deep_linear(seed)
    with pytest.warns(IllConditionedWarning, match="high-precision path"):
        fit = lora_linear(frozen, target, 2)
    assert unit_roundoff() * (fit.kappa + fit.gamma) > 1e-8  # float64 keeps fewer than 8 digits
    advice = suggest_precision(fit)
    assert isinstance(advice, PrecisionAdvice) and not advice.float64_sufficient
    assert "lora_linear_mp" in advice.message and advice.digits == choose_digits(fit.kappa, fit.gamma)

    hp = lora_linear_mp(frozen, target, 2, digits=50)
    assert hp.digits == 50 and hp.exact and hp.error_rank == 16
    assert hp.achieved_error <= 1e-30  # relative, Frobenius, at 50 digits
    # rounded once at the end, the product is the target to float64 rounding
    assert np.linalg.norm(hp.product() - target) <= tolerance() * np.linalg.norm(target)
    x = np.random.default_rng(seed).standard_normal((4, 16))
    assert np.linalg.norm(hp.predict(x) - x @ target.T) <= tolerance() * np.linalg.norm(x @ target.T)
    assert [a.rank for a in hp.adapters] == [2] * 8


def test_automatic_precision_is_reported_and_sufficient():
    frozen, target = _deep_linear(2)
    hp = lora_linear_mp(frozen, target, 2, digits=None)
    assert hp.digits >= choose_digits(hp.kappa, hp.gamma) - 2
    assert "log10 κ" in hp.digits_reason
    assert hp.achieved_error <= 1e-16  # the 16 target digits survive


def test_below_threshold_reaches_lemma1_optimum():
    # D = 8, L = 3, R = 2: k = 6 < rank(E) = 8; the Frobenius optimum sqrt(Σ_{j>6} σ_j^2) is attained
    frozen, target = _deep_linear(3, width=8, depth=3)
    hp = lora_linear_mp(frozen, target, 2, digits=40)
    assert not hp.exact and hp.optimal_error > 0
    assert abs(hp.achieved_error - hp.optimal_error) <= 1e-25 * hp.optimal_error
    float_fit = lora_linear(frozen, target, 2)
    assert np.linalg.norm(hp.product() - float_fit.product) <= tolerance(
        float_fit.kappa, float_fit.gamma
    ) * np.linalg.norm(target)


def test_per_layer_ranks_and_well_conditioned_agreement():
    frozen = random_linear(6, 2, seed=4).weights
    target = np.random.default_rng(5).standard_normal((6, 6))
    hp = lora_linear_mp(frozen, target, (4, 2), digits=30)
    assert hp.exact and [a.rank for a in hp.adapters] == [4, 2]
    assert suggest_precision(lora_linear(frozen, target, (4, 2))).float64_sufficient


def test_singular_matrices_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(SingularMatrixError, match="Q_1 = W_2"):
        lora_linear_mp([rng.standard_normal((3, 3)), np.zeros((3, 3))], rng.standard_normal((3, 3)), 2, digits=20)
    # W_1 = 0, W_2 = I, R = 1 < D: P_2 = W_1 + Δ_1 has rank 1
    with pytest.raises(SingularMatrixError, match="P_2"):
        lora_linear_mp([np.zeros((2, 2)), np.eye(2)], np.array([[1.0, 2.0], [3.0, 5.0]]), 1, digits=20)


def test_bad_arguments():
    frozen, target = _deep_linear(0, width=3, depth=2)
    with pytest.raises(InvalidArgumentError, match="digits: must be an integer >= 16"):
        lora_linear_mp(frozen, target, 1, digits=10)
    with pytest.raises(InvalidArgumentError, match="rank: must be at most 3"):
        lora_linear_mp(frozen, target, 4)
    with pytest.raises(InvalidArgumentError, match="fit: must be a fit"):
        suggest_precision(object())
    f0, t = random_fnn(3, 2, seed=0), random_fnn(3, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match="input_radius: must be a positive finite real number"):
        lora_fnn_mp(f0, t, 2, input_radius=None)
    with pytest.raises(InvalidArgumentError, match="center: must have shape"):
        lora_fnn_mp(f0, t, 2, input_radius=1.0, center=np.zeros(4))


def test_eight_layer_relu_block_needs_more_digits_for_its_biases():
    # D = 16, L̄ = 1, L = 8, R = 2 = ceil(16 / 8), certified ball of radius 10 (THEORY.md §2.3)
    frozen = random_fnn(16, 8, seed=0, scale=0.25)
    target = random_fnn(16, 1, seed=100, scale=0.25)
    with pytest.warns(IllConditionedWarning):
        fit = lora_fnn(frozen, target, 2, input_radius=10.0)
    advice = suggest_precision(fit)
    assert not advice.float64_sufficient and "lora_fnn_mp" in advice.message
    hp = lora_fnn_mp(frozen, target, 2, input_radius=10.0)
    assert hp.exact
    # the precision covers the biases: about log10 γ digits on top of the linear chain's log10 κ
    assert hp.digits >= choose_digits(hp.kappa, hp.gamma) - 2 > choose_digits(hp.kappa)
    assert "γ" in hp.digits_reason
    assert hp.max_block_error <= 1e-20
    x = sample_ball(np.zeros(16), 10.0, 12, seed=1)
    assert hp.relative_error(x) <= 1e-20  # on the ball, at working precision
    want = target(x)
    assert np.linalg.norm(hp.predict(x) - want) <= tolerance() * np.linalg.norm(want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        float_error = np.linalg.norm(fit.model(x) - want) / np.linalg.norm(want)
    assert float_error > 1e3 * float(hp.relative_error(x))


def test_four_layer_relu_block_agrees_with_float64():
    frozen = random_fnn(8, 4, seed=2, scale=0.3)
    target = random_fnn(8, 2, seed=3, scale=0.3)
    fit = lora_fnn(frozen, target, 4, input_radius=2.0)
    hp = lora_fnn_mp(frozen, target, 4, input_radius=2.0, digits=40)
    assert hp.exact and hp.max_block_error <= 1e-25
    # the same construction: κ and γ as the float64 fit reports them (up to its rounding)
    assert hp.gamma == pytest.approx(fit.gamma, rel=tolerance(fit.kappa, fit.gamma))
    assert hp.kappa == pytest.approx(fit.kappa, rel=tolerance(fit.kappa, fit.gamma))
    x = sample_ball(np.zeros(8), 2.0, 10, seed=4)
    want = target(x)
    assert np.linalg.norm(hp.predict(x) - want) <= tolerance() * np.linalg.norm(want)
    assert np.linalg.norm(fit.model(x) - want) <= fit.tolerance * np.linalg.norm(want)
    for beta_mp, beta in zip(hp.levels, (b.levels for b in fit.block_fits)):
        np.testing.assert_allclose([float(v) for v in beta_mp], beta, rtol=tolerance(fit.kappa, fit.gamma))


def test_suggest_precision_on_an_ill_conditioned_tfn_points_to_lora_tfn_mp_and_the_certificate():
    """A TFNFit's advice names the transformer's own high-precision path (never lora_linear_mp) and the
    exact certificate; the digits it names make lora_tfn_mp exact."""
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn
    from lora_theory.tfn import lora_tfn

    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    U, _, Vt = np.linalg.svd(np.random.default_rng(11).standard_normal((4, 4)))
    w1 = np.array(frozen.w1)
    w1[0] = U @ np.diag([1.0, 1.0, 1.0, 1e-10]) @ Vt  # κ(W1) = 1e10: u·κ ≈ 1e-6
    frozen = frozen.replace(w1=w1)
    with pytest.warns(IllConditionedWarning):
        fit = lora_tfn(frozen, target, 2)
    advice = suggest_precision(fit)
    assert not advice.float64_sufficient
    assert "lora_linear_mp" not in advice.message and "lora_fnn_mp" not in advice.message
    assert f"lora_tfn_mp(..., digits={advice.digits})" in advice.message and "certify_tfn" in advice.message
    hp = lora_tfn_mp(frozen, target, 2, digits=advice.digits)
    X = np.random.default_rng(3).standard_normal((2, 4, 3))
    assert hp.relative_error(X) < 1e-20
    assert "lora_tfn_mp(" in suggest_precision(hp).message and "lora_linear_mp" not in suggest_precision(hp).message
    well = suggest_precision(lora_tfn(random_tfn(4, 1, 1, seed=1), target, 2))
    assert well.float64_sufficient and "float64 suffices" in well.message


def test_explicit_digits_too_few_warn_with_the_digits_needed():
    """Chosen digits that the construction's κ eats (8-layer block at 16 digits: errors near 1e-6) warn;
    enough digits do not."""
    frozen, target = _deep_linear(0)
    with pytest.warns(IllConditionedWarning, match=r"at digits=16 .*κ = .*; (\d+) digits are needed") as record:
        hp = lora_linear_mp(frozen, target, 2, digits=16)
    needed = choose_digits(hp.kappa, hp.gamma)
    assert any(f"; {needed} digits are needed" in str(w.message) for w in record)
    assert 10.0**-16 * (hp.kappa + hp.gamma) > 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        lora_linear_mp(frozen, target, 2, digits=needed)
        small = random_linear(3, 2, seed=0).weights
        lora_linear_mp(small, np.eye(3), 1, digits=16)  # well conditioned: 16 digits are plenty
    f0, t = random_fnn(16, 8, seed=0, scale=0.25), random_fnn(16, 1, seed=1)
    with pytest.warns(IllConditionedWarning, match=r"high-precision FNN construction \(Theorem 3\) at digits=16"):
        lora_fnn_mp(f0, t, 2, input_radius=10.0, digits=16)


# ------------------------------------------------------------------------------------- transformer


def _tfn_pair(seed, D=6, L=2, H=2):
    from lora_theory.models import random_tfn

    return random_tfn(D, L, H, seed=seed), random_tfn(D, L, H, seed=seed + 100)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tfn_mp_equals_the_target_to_working_precision_from_the_threshold(seed):
    """Theorem 7 at raised precision: from ceil(D/2) on, the adapted network equals the target to the working
    precision less log10 κ (evaluated at that precision), far below what float64 weights can carry."""
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.tfn import lora_tfn

    frozen, target = _tfn_pair(seed)
    X = np.random.default_rng(seed).standard_normal((3, 6, 5))  # (n, D, N)
    fit = lora_tfn_mp(frozen, target, 3, digits=40)
    assert fit.exact and fit.required_rank == 3 and fit.matched_ranks == (6, 6)
    assert fit.relative_error(X) <= 10.0**-40 * fit.kappa * 1e6
    f64 = lora_tfn(frozen, target, 3)
    # the float64 construction is the same one: its adapted weights agree to float64 rounding (relative κ·u)
    for name, W in f64.model.parameters().items():
        assert np.allclose(
            fit.model.parameters()[name], W, rtol=0, atol=1e3 * f64.kappa * unit_roundoff() * max(1.0, np.abs(W).max())
        )
    y = target(X)
    assert np.max(np.abs(fit.predict(X) - y)) <= 1e-13 * np.max(np.abs(y))  # float64 rounding of the outputs


def test_tfn_mp_below_the_threshold_is_not_exact():
    from lora_theory.highprec import lora_tfn_mp

    frozen, target = _tfn_pair(3)
    X = np.random.default_rng(3).standard_normal((2, 6, 5))
    fit = lora_tfn_mp(frozen, target, 2, digits=30)
    assert not fit.exact and fit.relative_error(X) > 1e-3


def test_tfn_mp_bad_arguments():
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn

    frozen, target = _tfn_pair(0)
    with pytest.raises(InvalidArgumentError, match="rank"):
        lora_tfn_mp(frozen, target, 7)
    with pytest.raises(InvalidArgumentError, match="digits"):
        lora_tfn_mp(frozen, target, 3, digits=8)
    with pytest.raises(InvalidArgumentError, match="target"):
        lora_tfn_mp(frozen, random_tfn(6, 1, 2, seed=1), 3)
    fit = lora_tfn_mp(frozen, target, 3, digits=20)
    with pytest.raises(InvalidArgumentError, match="X"):
        fit.predict(np.zeros((5, 6)))


def test_tfn_mp_names_a_singular_matrix():
    from lora_theory.highprec import lora_tfn_mp

    frozen, target = _tfn_pair(4)
    w2 = np.array(frozen.w2)
    w2[0][:, 0] = 0.0  # W2 of the first block singular
    with pytest.raises(SingularMatrixError, match=r"W2\[0\]"):
        lora_tfn_mp(frozen.replace(w2=w2), target, 3, digits=30)


def test_tfn_mp_evaluates_the_same_without_gmpy2(monkeypatch):
    """The object-array evaluation uses gmpy2 when it is there and mpmath otherwise: the same numbers."""
    import sys

    from lora_theory.highprec import lora_tfn_mp

    frozen, target = _tfn_pair(5, D=4, L=1)
    X = np.random.default_rng(5).standard_normal((2, 4, 3))
    fit = lora_tfn_mp(frozen, target, 2, digits=30)
    fast = fit.predict(X)
    monkeypatch.setitem(sys.modules, "gmpy2", None)  # import gmpy2 now raises ImportError
    assert np.array_equal(fit.predict(X), fast)
    assert fit.relative_error(X) < 1e-20


@pytest.mark.parametrize("seed", [0, 4])
def test_two_block_float64_construction_sits_at_the_rounding_floor_of_its_weights(seed):
    """Paper sizes (D = 16, L = 2, H = 2): the float64 construction's error is what float64 weights allow
    (perturbing its adapted weights by one rounding unit moves the output about as much), while the same
    construction at raised precision, evaluated there, is exact to far below 1e-20 of the output power."""
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn
    from lora_theory.tfn import lora_tfn

    rng = np.random.default_rng(seed)
    frozen, target = random_tfn(16, 2, 2, seed=rng), random_tfn(16, 2, 2, seed=rng)
    X = rng.standard_normal((16, 16, 10))  # (n, D, N)
    y = target(X)
    power = np.mean(y**2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)  # κ reaches 1e8 on some seeds: the point
        fit = lora_tfn(frozen, target, 8)
    err = np.mean((fit.model(X) - y) ** 2) / power
    u = unit_roundoff()
    perturbed = fit.model.replace(
        **{k: v * (1 + u * rng.choice([-1.0, 1.0], size=np.shape(v))) for k, v in fit.model.parameters().items()}
    )
    floor = np.mean((perturbed(X) - fit.model(X)) ** 2) / power
    assert err <= 30 * floor  # at the floor (measured 0.2 to 2.3x)
    hp = lora_tfn_mp(frozen, target, 8)
    assert np.mean((hp.predict(X) - y) ** 2) / power <= 1e-24  # the float64 rounding of y itself
    assert hp.relative_error(X[:2]) <= 10.0 ** (-hp.digits) * hp.kappa * 1e6


def test_tfn_mp_rank_tolerance_counts_the_solves_behind_the_matched_products():
    """An exactly rank-1 change of T_V (dyadic entries: the float64 sum is exact) matched through an
    ill-conditioned W1 (κ = 1e8): rounding at the working precision is not counted as rank (the tolerance
    grows with the κ of the solves, as in float64), so G = 1 and rank 1 is exact. (A change added in float64
    without care is rank 1 plus its rounding: full rank at 40 digits, and rightly not exact at rank 1.)"""
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn
    from lora_theory.tfn import lora_tfn

    rng = np.random.default_rng(8)
    frozen = random_tfn(4, 1, 1, seed=rng)
    U, _, Vt = np.linalg.svd(rng.standard_normal((4, 4)))
    frozen = frozen.replace(w1=(U @ np.diag([1.0, 1.0, 1.0, 1e-8]) @ Vt)[None])
    wv = np.round(np.array(frozen.wv) * 1024) / 1024  # multiples of 2^-10
    frozen = frozen.replace(wv=wv.copy())
    wv[0, 0] += np.outer([1.0, -0.5, 0.25, 0.0], [0.5, 1.0, 0.0, -1.0])  # exact in float64: rank exactly 1
    target = frozen.replace(wv=wv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        assert lora_tfn(frozen, target, 1).matched_ranks == (1,)
    fit = lora_tfn_mp(frozen, target, 1, digits=40)
    assert fit.matched_ranks == (1,) and fit.required_rank == 1 and fit.exact
    assert fit.relative_error(rng.standard_normal((2, 4, 3))) < 1e-20


def test_tfn_mp_too_few_digits_warn_and_chosen_digits_suffice():
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn

    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    U, _, Vt = np.linalg.svd(np.random.default_rng(11).standard_normal((4, 4)))
    frozen = frozen.replace(w1=(U @ np.diag([1.0, 1.0, 1.0, 1e-13]) @ Vt)[None])  # κ(W1) = 1e13
    with pytest.warns(IllConditionedWarning, match="digits are needed"):
        lora_tfn_mp(frozen, target, 2, digits=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        fit = lora_tfn_mp(frozen, target, 2)  # digits chosen: no warning
    assert fit.digits >= choose_digits(fit.kappa) - 2
    assert fit.relative_error(np.random.default_rng(2).standard_normal((2, 4, 3))) < 1e-20


def test_tfn_mp_exactly_singular_matrix_is_named_with_chosen_digits():
    """digits=None on an exactly singular W1: the high-precision solve names it (float64's κ is inf)."""
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn

    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    with pytest.raises(SingularMatrixError, match=r"W1\[0\]"):
        lora_tfn_mp(frozen.replace(w1=np.zeros((1, 4, 4))), target, 2)


def test_tfn_mp_adapters_are_keyed_like_the_float64_ones_and_rebuild_its_weights():
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.tfn import lora_tfn

    frozen, target = _tfn_pair(7)
    hp, f64 = lora_tfn_mp(frozen, target, 2, digits=30), lora_tfn(frozen, target, 2)
    assert set(hp.adapters) == set(f64.adapters) and hp.num_parameters == f64.num_parameters
    for (name, l, h), a in hp.adapters.items():
        assert a.rank <= 2
        W = (
            getattr(frozen, name)[l]
            if name in ("w2",)
            else (frozen.w_out if name == "w_out" else getattr(frozen, name)[l, h])
        )
        adapted = hp.model.parameters()[name]
        adapted = adapted[l] if name == "w2" else (adapted if name == "w_out" else adapted[l, h])
        assert np.allclose(W + a.delta, adapted, rtol=0, atol=1e-12 * max(1.0, np.abs(adapted).max()))


# ------------------------------------------------------------- `exact` is checked at working precision


def _ill_conditioned_tfn(kappa_w1=1e13):
    from lora_theory.models import random_tfn

    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    U, _, Vt = np.linalg.svd(np.random.default_rng(11).standard_normal((4, 4)))
    return frozen.replace(w1=(U @ np.diag([1.0, 1.0, 1.0, 1 / kappa_w1]) @ Vt)[None]), target


def test_tfn_mp_with_too_few_digits_is_not_called_exact():
    """A raised-precision fit's ``exact`` was the rank condition alone: with κ(W1) = 1e13 at 16 or 20 digits the
    rank tolerance (which grows with the solves' κ) drops directions of the matched products, and the fit
    missed the target by more than 100% while reporting exact=True. The claim is now checked on the fit's own
    check inputs; a fresh evaluation here confirms the miss, and chosen digits keep the claim."""
    from lora_theory.highprec import lora_tfn_mp

    frozen, target = _ill_conditioned_tfn()
    X = np.random.default_rng(7).standard_normal((3, 4, 2))  # inputs the construction did not check
    for digits in (16, 20):
        with pytest.warns(IllConditionedWarning, match=f"{digits}-digit result is not exact"):
            hp = lora_tfn_mp(frozen, target, 2, digits=digits)
        assert hp.rank_sufficient and not hp.exact
        assert hp.relative_error(X) > hp.tolerance  # the miss is real, not a false alarm
    with warnings.catch_warnings():
        warnings.simplefilter("error", IllConditionedWarning)
        hp = lora_tfn_mp(frozen, target, 2)
    assert hp.exact and hp.relative_error(X) <= hp.tolerance


def test_fnn_mp_with_too_few_digits_is_not_called_exact():
    """An 8-layer block at radius 10 and 16 digits: biases near 1e16 times the signal (γ = 5e16) leave a rounding
    allowance far above 1, and the points of the ball where the first pre-activations are smallest miss by
    more than it; ``exact`` says so. At chosen digits the claim holds."""
    f0, t = random_fnn(16, 8, seed=0, scale=0.25), random_fnn(16, 1, seed=1)
    with pytest.warns(IllConditionedWarning, match="16-digit result is not exact"):
        hp = lora_fnn_mp(f0, t, 2, input_radius=10.0, digits=16)
    assert hp.rank_sufficient and not hp.exact
    assert hp.tolerance > 1 and hp.measured_error > hp.tolerance
    hp = lora_fnn_mp(f0, t, 2, input_radius=10.0)
    assert hp.exact and hp.measured_error <= hp.tolerance


def test_linear_mp_whose_tolerance_says_nothing_is_not_called_exact():
    """κ(Q_1) = 1e15 at 16 digits: the rounding allowance ``c·u·(κ + γ)`` exceeds 1, so the result keeps not even
    the target's order of magnitude by its own account; ``exact`` is False although the rank suffices. At
    chosen digits the product is the target."""
    W2 = np.diag([1.0, 1e-15])
    frozen, target = [np.eye(2), W2], np.array([[2.0, 1.0], [0.5, 3.0]])
    with pytest.warns(IllConditionedWarning, match="16-digit result is not exact"):
        hp = lora_linear_mp(frozen, target, 1, digits=16)
    assert hp.rank_sufficient and hp.tolerance > 1 and not hp.exact
    hp = lora_linear_mp(frozen, target, 1, digits=None)
    assert hp.exact and np.linalg.norm(hp.product() - target) <= tolerance() * np.linalg.norm(target)


@pytest.mark.parametrize("seed", range(4))
def test_raised_precision_exact_implies_the_target_on_fresh_inputs(seed):
    """Wherever a raised-precision fit says ``exact``, an evaluation here on inputs it did not check is within
    its tolerance (float64 rounding of the outputs added); below the threshold it never says ``exact``."""
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn

    rng = np.random.default_rng(100 + seed)
    frozen, target = random_linear(4, 2, seed=seed).weights, rng.standard_normal((4, 4))
    for R in range(3):
        hp = lora_linear_mp(frozen, target, R, digits=30)
        assert hp.exact == hp.rank_sufficient == (2 * R >= 4)
        if hp.exact:
            x = rng.standard_normal((5, 4))
            want = x @ target.T
            assert np.linalg.norm(hp.predict(x) - want) <= (hp.tolerance + 4e-16) * np.linalg.norm(want) * 4
    f0, t = random_fnn(4, 2, seed=seed), random_fnn(4, 1, seed=seed + 50)
    for R in (1, 2, 4):
        hp = lora_fnn_mp(f0, t, R, input_radius=2.0, digits=30)
        assert hp.exact <= hp.rank_sufficient
        if hp.exact:
            points = sample_ball(np.zeros(4), 2.0, 16, seed=seed)
            s_out = np.max(np.linalg.norm(t(points), axis=1))
            assert hp.max_row_error(points) <= hp.tolerance * hp.radius_amplification * max(s_out, 1.0) + 1e-300
    frozen, target = random_tfn(4, 2, 1, seed=seed), random_tfn(4, 2, 1, seed=seed + 50)
    for R in (1, 2):
        hp = lora_tfn_mp(frozen, target, R, digits=30)
        assert hp.exact == hp.rank_sufficient
        if hp.exact:
            assert hp.relative_error(rng.standard_normal((2, 4, 3))) <= hp.tolerance


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rank", [1, 3])
def test_fnn_mp_counts_the_rounding_gamma_as_the_float64_construction(seed, rank):
    """Both FNN paths count ``γ`` (the rounding a block's output carries, relative to its size) with one
    formula, ``lora_theory.fnn._block_gamma``: on the same instance and ball their ``γ`` agree up to the
    float64 rounding of the adapted weights whose norms enter it (measured: 8e-13 relative), far inside
    ``1e-9``; a term counted by one path only (the rounding of ``E_i``, say) moves ``γ`` by far more."""
    frozen, target = random_fnn(6, 4, seed=seed), random_fnn(6, 2, seed=100 + seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        float_fit = lora_fnn(frozen, target, rank, input_radius=2.0)
        mp_fit = lora_fnn_mp(frozen, target, rank, input_radius=2.0, digits=40)
    assert mp_fit.gamma == pytest.approx(float_fit.gamma, rel=1e-9)
