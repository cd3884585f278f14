"""Exact certificates (THEORY.md §3) and symbolic thresholds.

The certificates carry no tolerance; the float comparisons below only check that the exact adapted models,
rounded to float64, evaluate like the targets (an independent check of what the certificate proves).
"""

from fractions import Fraction

import mpmath
import numpy as np
import pytest
import sympy
from hypothesis import example, given
from hypothesis import strategies as st

from lora_theory.errors import InvalidArgumentError
from lora_theory.fnn import sample_ball
from lora_theory.models import FNN, random_linear
from lora_theory.numerics import TOLERANCE_CONSTANT, unit_roundoff
from lora_theory.symbolic import (
    EXACT,
    IMPOSSIBLE,
    NOT_MET,
    Certificate,
    RationalFNN,
    RationalTFN,
    certify_fnn,
    certify_linear,
    certify_tfn,
    fnn_rank_threshold_expr,
    linear_rank_threshold_expr,
    random_rational_fnn,
    random_rational_linear,
    random_rational_tfn,
    rational_matrix,
    tfn_rank_threshold_expr,
)
from lora_theory.symbolic import D as D_sym
from lora_theory.symbolic import L as L_sym
from lora_theory.symbolic import Lbar as Lbar_sym
from lora_theory.thresholds import fnn_rank_threshold, linear_rank_threshold, tfn_rank_threshold

# ----------------------------------------------------------------------------------- symbolic thresholds


def test_symbolic_thresholds_equal_integer_ones_on_grid():
    Ds, Ls, Lbars = np.meshgrid(np.arange(1, 65), np.arange(1, 17), np.arange(1, 17), indexing="ij")
    keep = Lbars <= Ls
    Ds, Ls, Lbars = Ds[keep], Ls[keep], Lbars[keep]
    # D / floor(L / Lbar) in float64: exact when the quotient is an integer, and at least 1/16 away from
    # one otherwise, so ceil is computed correctly
    fnn = sympy.lambdify((D_sym, L_sym, Lbar_sym), fnn_rank_threshold_expr(), "numpy")(Ds, Ls, Lbars)
    lin = sympy.lambdify((D_sym, L_sym), linear_rank_threshold_expr(), "numpy")(Ds, Ls)
    tfn = sympy.lambdify(D_sym, tfn_rank_threshold_expr(), "numpy")(Ds)
    want_fnn = [fnn_rank_threshold(int(d), int(l), int(lb)) for d, l, lb in zip(Ds, Ls, Lbars)]
    want_lin = [linear_rank_threshold(int(d), int(l)) for d, l in zip(Ds, Ls)]
    want_tfn = [tfn_rank_threshold(int(d)) for d in Ds]
    assert np.array_equal(fnn, want_fnn)
    assert np.array_equal(lin, want_lin)
    assert np.array_equal(tfn, want_tfn)


def test_symbolic_thresholds_exact_substitution_and_symbols():
    assert fnn_rank_threshold_expr().free_symbols == {D_sym, L_sym, Lbar_sym}
    assert linear_rank_threshold_expr().free_symbols == {D_sym, L_sym}
    # the paper's D = 16 examples (THEORY.md §2.3), by exact substitution
    expr = fnn_rank_threshold_expr()
    for (Lbar, L), want in {(1, 2): 8, (2, 4): 8, (1, 8): 2}.items():
        assert expr.subs({D_sym: 16, L_sym: L, Lbar_sym: Lbar}) == want
    assert tfn_rank_threshold_expr().subs(D_sym, 15) == 8


# ------------------------------------------------------------------------------------------ conversions


def test_floats_are_converted_exactly():
    M = rational_matrix([[0.1, 2], [Fraction(1, 3), sympy.Rational(-5, 7)]])
    assert M[0, 0] == sympy.Rational(3602879701896397, 36028797018963968)  # not 1/10
    assert M[1, 0] == sympy.Rational(1, 3) and M[0, 1] == 2


def test_float_models_round_trip_exactly():
    frozen, _ = random_rational_fnn(3, 2, 1, seed=0)
    f = frozen.to_float()
    back = RationalFNN.from_fnn(f)
    assert back.weights == frozen.weights and back.biases == frozen.biases  # k/4 is a binary fraction
    tf, _ = random_rational_tfn(2, 1, 1, seed=0)
    assert RationalTFN.from_tfn(tf.to_float()).wq == tf.wq


def test_float_instance_certified_exactly():
    frozen = random_linear(4, 2, seed=3).weights
    target = np.random.default_rng(4).uniform(-0.5, 0.5, (4, 4))
    cert = certify_linear(frozen, target, 2)
    assert cert.outcome == EXACT and cert.passed


# ----------------------------------------------------------------------------------------------- linear


def _check_named_singular(cert: Certificate):
    """A NOT_MET certificate for a singular matrix names it, keeps it, and it is exactly singular."""
    assert cert.outcome == NOT_MET
    assert "is singular" in cert.reason
    assert cert.singular_matrix is not None and cert.singular_matrix.det() == 0
    failed = cert.failed_checks
    assert len(failed) == 1 and failed[0].name.endswith("invertible")
    assert failed[0].name.removesuffix(" invertible") in cert.reason


def _invertibility_checks_pass(cert):
    return all(c.passed for c in cert.checks if c.name.endswith("invertible"))


@given(
    n=st.integers(2, 5),
    depth=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    error_rank=st.one_of(st.none(), st.integers(0, 5)),
)
def test_linear_certificate_at_threshold_and_below(n, depth, seed, error_rank):
    if error_rank is not None:
        error_rank = min(error_rank, n)
    frozen, target = random_rational_linear(n, depth, seed=seed, error_rank=error_rank)
    E = sympy.Matrix(target) - sympy.prod(reversed(frozen), start=sympy.eye(n))
    rank_E = E.rank()
    R = -(-rank_E // depth)
    cert = certify_linear(frozen, target, R)
    assert cert.required_rank == R
    if cert.outcome == EXACT:
        assert cert.passed and all(c.passed for c in cert.checks)
        prod = sympy.prod(reversed(cert.adapted), start=sympy.eye(n))
        assert prod == sympy.Matrix(target)
        for l, W in enumerate(frozen):
            assert (cert.adapted[l] - W).rank() <= R
    else:
        _check_named_singular(cert)
    # the outcome is "exact" exactly when every matrix the construction inverted is invertible
    assert (cert.outcome == EXACT) == _invertibility_checks_pass(cert)
    if R >= 1:
        below = certify_linear(frozen, target, R - 1)
        if (R - 1) * depth < rank_E:
            assert below.outcome == IMPOSSIBLE and not below.passed
            assert f"rank(E) = {rank_E}" in below.reason


def test_linear_full_rank_error_one_rank_below_is_impossible():
    frozen, target = random_rational_linear(5, 2, seed=11)
    assert certify_linear(frozen, target, 3).outcome == EXACT
    cert = certify_linear(frozen, target, 2)
    assert cert.outcome == IMPOSSIBLE
    assert "rank(E) = 5 exceeds Σ R_l = 4" in cert.reason


def test_linear_per_layer_ranks():
    frozen, target = random_rational_linear(4, 2, seed=5)
    assert certify_linear(frozen, target, (3, 1)).outcome == EXACT
    assert certify_linear(frozen, target, (0, 4)).outcome == EXACT
    assert certify_linear(frozen, target, (2, 1)).outcome == IMPOSSIBLE


def test_linear_singular_Q_is_named():
    frozen, target = random_rational_linear(3, 2, seed=1)
    cert = certify_linear([frozen[0], sympy.zeros(3, 3)], target, 2)
    _check_named_singular(cert)
    assert cert.reason.startswith("Q_1 = W_2 is singular")


def test_linear_singular_partial_product_is_named():
    # W_1 = 0, W_2 = I, R = 1 < D: P_2 = W_1 + Δ_1 = C_1 F_1 has rank 1 (THEORY.md §2.1: raise naming P_2)
    target = sympy.Matrix([[1, 2], [3, 5]])
    cert = certify_linear([sympy.zeros(2, 2), sympy.eye(2)], target, 1)
    _check_named_singular(cert)
    assert cert.reason.startswith("P_2 = (W_1 + Δ_1) is singular")
    assert "Π W + C_1 F_1" in cert.reason


def test_certificate_report():
    frozen, target = random_rational_linear(3, 3, seed=2)
    cert = certify_linear(frozen, target, 1)
    text = str(cert)
    assert text.startswith("Exact certificate (linear: D = 3, L = 3; LoRA-rank R = 1)")
    assert f"Outcome: {cert.outcome}" in text
    assert all(str(c) in text for c in cert.checks)


# ------------------------------------------------------------------------------------------------- FNN


def _fnn_agrees_in_float(cert, frozen, target, center, radius, seed):
    """The exact adapted FNN, rounded to float64, equals the target on samples of the ball (to rounding)."""
    f = cert.adapted.to_float()
    fbar = target.to_float()
    x = sample_ball(np.array(center, dtype=float), float(radius), 64, seed=seed)
    acts = f.activations(x)
    # absolute rounding of the forward pass: Σ_j (||W_j|| ||z_{j-1}|| + ||b_j||), amplified by later layers
    norms = [np.linalg.norm(W, 2) for W in f.weights]
    scale = sum(n * np.linalg.norm(z, axis=1) + np.linalg.norm(b) for n, z, b in zip(norms, acts[:-1], f.biases))
    growth = np.prod([max(1.0, n) for n in norms])
    err = np.linalg.norm(acts[-1] - fbar(x), axis=1)
    assert np.all(err <= TOLERANCE_CONSTANT * unit_roundoff() * growth * scale)


@given(
    n=st.integers(2, 4), depth=st.integers(1, 3), data=st.data(), seed=st.integers(0, 10_000), final_relu=st.booleans()
)
def test_fnn_certificate_at_threshold_and_below(n, depth, data, seed, final_relu):
    target_depth = data.draw(st.integers(1, depth))
    frozen, target = random_rational_fnn(n, depth, target_depth, seed=seed, final_relu=final_relu)
    rng = np.random.default_rng(seed)
    center = [sympy.Rational(int(k), 4) for k in rng.integers(-4, 5, n)]
    radius = sympy.Rational(int(rng.integers(1, 9)), 2)
    probe = certify_fnn(frozen, target, n, input_radius=radius, center=center)
    R = probe.required_rank
    cert = certify_fnn(frozen, target, R, input_radius=radius, center=center)
    if cert.outcome == EXACT:
        assert all(c.passed for c in cert.checks)
        _fnn_agrees_in_float(cert, frozen, target, center, radius, seed)
    else:
        _check_named_singular(cert)
    assert (cert.outcome == EXACT) == _invertibility_checks_pass(cert)
    if R >= 1:
        below = certify_fnn(frozen, target, R - 1, input_radius=radius, center=center)
        assert below.outcome == NOT_MET  # never "impossible" for FNNs
        assert "exceeds the budget" in below.reason or "is singular" in below.reason


def test_fnn_uniform_threshold_generic_instance():
    # D = 4, L = 4, L̄ = 2: threshold ceil(4 / 2) = 2 (Theorem 3); one below: not met, never impossible
    frozen, target = random_rational_fnn(4, 4, 2, seed=0)
    cert = certify_fnn(frozen, target, 2, input_radius=3)
    assert cert.outcome == EXACT and cert.required_rank == 2
    assert sum("ReLUs active" in c.name for c in cert.checks) == 2
    below = certify_fnn(frozen, target, 1, input_radius=3)
    assert below.outcome == NOT_MET
    assert "matched rank rank(E_1) = 4 exceeds the budget Σ R_l = 2" in below.reason


def test_fnn_general_partition_and_per_layer_ranks():
    frozen, target = random_rational_fnn(3, 3, 2, seed=4)
    cert = certify_fnn(frozen, target, (2, 1, 3), partition=(2, 1), input_radius=1)
    assert cert.outcome == EXACT and cert.sizes["partition"] == (2, 1)


def test_fnn_singular_is_named():
    frozen, target = random_rational_fnn(3, 2, 1, seed=3)
    broken = RationalFNN((frozen.weights[0], sympy.zeros(3, 3)), frozen.biases)
    cert = certify_fnn(broken, target, 2, input_radius=1)
    _check_named_singular(cert)
    assert cert.reason.startswith("block 1: Q_1 = W_2 is singular")


def test_fnn_accepts_float_models():
    rng = np.random.default_rng(0)
    frozen = FNN([rng.uniform(-0.5, 0.5, (3, 3)) for _ in range(2)], [rng.uniform(-0.5, 0.5, 3) for _ in range(2)])
    target = FNN([rng.uniform(-0.5, 0.5, (3, 3))], [rng.uniform(-0.5, 0.5, 3)])
    cert = certify_fnn(frozen, target, 2, input_radius=10.0)
    assert cert.outcome == EXACT


# ------------------------------------------------------------------------------------------------- TFN


def _tfn_at_digits(net, X, digits=50):
    """A :class:`RationalTFN` on float64 inputs ``X`` (n, D, N), every operation at ``digits`` digits from the
    exact rational parameters (the object-array forward of :mod:`lora_theory.highprec`); object array."""
    from lora_theory.highprec.tfn import _tfn_forward_objects

    with mpmath.workdps(digits):
        mpf = np.vectorize(lambda q: mpmath.mpf(int(q.p)) / int(q.q), otypes=[object])  # sympy Rational

        def entries(M):
            return np.array(M.tolist(), dtype=object)

        p = {
            name: mpf(np.array([[entries(M) for M in row] for row in getattr(net, name)]))
            for name in ("wq", "wk", "wv", "wo")
        }
        p.update({name: mpf(np.array([entries(M) for M in getattr(net, name)])) for name in ("w1", "w2")})
        p.update({name: mpf(np.array([entries(v).reshape(-1) for v in getattr(net, name)])) for name in ("b1", "b2")})
        p["w_out"] = mpf(entries(net.w_out))
        return _tfn_forward_objects(
            p, np.vectorize(mpmath.mpf, otypes=[object])(X), np.vectorize(mpmath.exp, otypes=[object])
        )


@given(n=st.integers(2, 4), depth=st.integers(1, 2), heads=st.integers(1, 2), seed=st.integers(0, 10_000))
@example(n=4, depth=2, heads=2, seed=110)  # float64-rounded weights were 4e-8 off the target here
@example(n=4, depth=2, heads=1, seed=176)  # a 50-digit evaluation was 7.6e-40 off: it amplifies its rounding
def test_tfn_certificate_at_threshold_and_below(n, depth, heads, seed):
    # nonsingular=True: every matrix Theorem 7 inverts as given is invertible (with the default small
    # entries about a third of the draws had a singular W_K^T, W_O, W1, W2, T2 or W_out and skipped the rest)
    frozen, target = random_rational_tfn(n, depth, heads, seed=seed, nonsingular=True)
    probe = certify_tfn(frozen, target, n)
    assert probe.outcome == EXACT  # at R = D no chain solves with a matrix it built itself
    R = probe.required_rank
    cert = certify_tfn(frozen, target, R)
    if cert.outcome != EXACT:  # rare (2 draws in 100): below D the chains also invert P_2 = W_Q + Δ_Q, ...
        _check_named_singular(cert)
        assert "P_2" in cert.reason or cert.reason.startswith("W_out + Δ_out")  # built by the construction
        return
    assert all(c.passed for c in cert.checks)
    # the exact adapted network and the target, evaluated from their rational parameters at 50 digits (exp is
    # not rational): equal to the working precision. Rounding the parameters to float64 first is not a check
    # of the certificate: two blocks amplify that rounding through C_1 = T2 W2^-1 (4e-8 relative at n = 4,
    # depth 2, heads 2, seed 110, where the 50-digit evaluation agrees to 1e-43)
    # At 50 digits an evaluation's own rounding, amplified by the network (seed 176: 7.6e-40 relative), can
    # exceed 1e-40; at 80 digits it is 1e-69 there, so a difference above 1e-40 is the networks' own
    X = np.random.default_rng(seed).standard_normal((3, n, 5))
    got, want = _tfn_at_digits(cert.adapted, X, digits=80), _tfn_at_digits(target, X, digits=80)
    with mpmath.workdps(80):
        assert mpmath.sqrt(np.sum((got - want) ** 2)) <= mpmath.mpf("1e-40") * mpmath.sqrt(np.sum(want**2))
    if R >= 1:
        below = certify_tfn(frozen, target, R - 1)
        assert below.outcome == NOT_MET  # never "impossible" for TFNs
        assert (
            "matched rank G" in below.reason and f"exceeds 2R = {2 * (R - 1)}" in below.reason
        ) or "is singular" in below.reason


@pytest.mark.parametrize(
    "seed, named",
    [
        (95, "qk[0,0]: Q_1 = W_K[0,0]^T is singular"),
        (310, "out: Q_1 = W_out is singular"),
        (8, "W1[0] is singular"),
        (457, "ov[0,0]: Q_1 = W_O[0,0] is singular"),
    ],
)
def test_tfn_singular_draws_are_named(seed, named):
    """The singular branch, explicitly: default draws (small entries) whose given matrices are singular
    in every assignment of the directions to the two factors (a singular second factor, and a first
    factor singular too)."""
    frozen, target = random_rational_tfn(2, 1, 1, seed=seed)
    cert = certify_tfn(frozen, target, 2)
    _check_named_singular(cert)
    assert cert.reason.startswith(named)
    if "Q_1" in named:
        assert "no assignment of the 2 blocks" in cert.reason


@pytest.mark.parametrize("seed, singular", [(5, ("wk", "qk")), (7, ("w_out", "out")), (11, ("wo", "ov"))])
def test_tfn_singular_second_factor_no_longer_stops_the_certificate(seed, singular):
    """Regression: the fixed order gave the directions to the first factor, which needs the second
    (W_K^T, W_O, W_out) inverted, and stopped on these draws; giving them to the second factor instead
    needs only the first inverted, and the certificate is exact."""
    frozen, target = random_rational_tfn(2, 1, 1, seed=seed)
    name, kind = singular
    matrix = frozen.w_out if name == "w_out" else getattr(frozen, name)[0][0]
    assert matrix.det() == 0  # the draw is the singular case
    cert = certify_tfn(frozen, target, 2)
    assert cert.outcome == EXACT and cert.passed
    assert not any(c.name.startswith(f"{kind}") and "Q_1" in c.name for c in cert.checks)


def test_random_rational_tfn_nonsingular_option():
    frozen, target = random_rational_tfn(2, 2, 2, seed=5, nonsingular=True)
    for model in (frozen, target):
        squares = [M for name in ("wq", "wk", "wv", "wo") for block in getattr(model, name) for M in block]
        squares += list(model.w1) + list(model.w2) + [model.w_out]
        assert all(M.det() != 0 for M in squares)
    with pytest.raises(InvalidArgumentError, match=r"^nonsingular: must be a bool"):
        random_rational_tfn(2, 1, 1, nonsingular="yes")


def test_tfn_acceptance_instance():
    frozen, target = random_rational_tfn(6, 2, 2, seed=0)
    assert certify_tfn(frozen, target, 3).outcome == EXACT
    below = certify_tfn(frozen, target, 2)
    assert below.outcome == NOT_MET and "matched rank G = 6 exceeds 2R = 4" in below.reason


def test_tfn_singular_W1_is_named():
    frozen, target = random_rational_tfn(3, 1, 1, seed=0)
    broken = RationalTFN(
        frozen.wq,
        frozen.wk,
        frozen.wv,
        frozen.wo,
        w1=[sympy.zeros(3, 3)],
        b1=frozen.b1,
        w2=frozen.w2,
        b2=frozen.b2,
        w_out=frozen.w_out,
    )
    cert = certify_tfn(broken, target, 2)
    _check_named_singular(cert)
    assert cert.reason.startswith("W1[0] is singular")


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_arguments():
    frozen, target = random_rational_linear(2, 2, seed=0)
    with pytest.raises(InvalidArgumentError, match="target: entries must be rational"):
        certify_linear(frozen, sympy.Matrix([[sympy.sqrt(2), 0], [0, 1]]), 1)
    with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
        certify_linear(frozen, [[float("nan"), 0], [0, 1]], 1)
    with pytest.raises(InvalidArgumentError, match=r"target: must have shape \(2, 2\)"):
        certify_linear(frozen, sympy.eye(3), 1)
    with pytest.raises(InvalidArgumentError, match="rank: must be at most 2"):
        certify_linear(frozen, target, 3)
    with pytest.raises(InvalidArgumentError, match="frozen: must hold at least one matrix"):
        certify_linear([], target, 1)
    with pytest.raises(InvalidArgumentError, match=r"frozen\[1\]: must be 2 x 2"):
        certify_linear([frozen[0], sympy.eye(3)], target, 1)
    f, t = random_rational_fnn(2, 2, 1, seed=0)
    with pytest.raises(InvalidArgumentError, match="input_radius: must be positive"):
        certify_fnn(f, t, 1, input_radius=0)
    with pytest.raises(InvalidArgumentError, match="center: must be a vector of length 2"):
        certify_fnn(f, t, 1, input_radius=1, center=[0, 0, 0])
    with pytest.raises(InvalidArgumentError, match="target: the target depth"):
        certify_fnn(t, f, 1, input_radius=1)
    with pytest.raises(InvalidArgumentError, match="target: must use the frozen model's activation"):
        certify_fnn(f, RationalFNN(t.weights, t.biases, final_relu=False), 1, input_radius=1)
    with pytest.raises(InvalidArgumentError, match="partition"):
        certify_fnn(f, t, 1, partition=(1, 1), input_radius=1)
    with pytest.raises(InvalidArgumentError, match="frozen: must be a lora_theory.FNN or a RationalFNN"):
        certify_fnn([sympy.eye(2)], t, 1, input_radius=1)
    a, b = random_rational_tfn(2, 1, 1, seed=0)
    c, _ = random_rational_tfn(2, 1, 2, seed=0)
    with pytest.raises(InvalidArgumentError, match="target: must have the frozen network's depth"):
        certify_tfn(a, c, 1)
    with pytest.raises(InvalidArgumentError, match="rank: must be an integer"):
        certify_tfn(a, b, 1.0)


def test_exact_linear_construction_equals_literal_transcription():
    # the construction written out with sympy's rank decomposition and explicit inverses (slow, literal):
    # E = C F, Δ_1 = W_2^{-1} C_1 F_1, Δ_2 = C_2 F_2 (W_1 + Δ_1)^{-1}
    frozen, target = random_rational_linear(3, 2, seed=7)
    cert = certify_linear(frozen, target, 2)
    assert cert.outcome == EXACT
    W1, W2 = (sympy.Matrix(W) for W in frozen)
    E = sympy.Matrix(target) - W2 * W1
    C, F = E.rank_decomposition()
    delta1 = W2.inv() * C[:, :2] * F[:2, :]
    delta2 = C[:, 2:] * F[2:, :] * (W1 + delta1).inv()
    assert cert.adapted[0] == W1 + delta1
    assert cert.adapted[1] == W2 + delta2
    A, B = cert.adapters["W_1"]
    assert B * A == delta1 and A.shape == (2, 3) and B.shape == (3, 2)


def test_fnn_with_linear_activation_needs_no_levels():
    f, t = random_rational_fnn(3, 2, 1, seed=1)
    frozen = RationalFNN(f.weights, f.biases, "linear")
    target = RationalFNN(t.weights, t.biases, "linear")
    cert = certify_fnn(frozen, target, 2, input_radius=1)
    assert cert.outcome == EXACT and not any("ReLUs active" in c.name for c in cert.checks)
    # affine maps equal exactly: the ball does not matter
    x = np.random.default_rng(0).uniform(-100, 100, (5, 3))
    want = target.to_float()(x)
    _fnn_agrees_in_float(cert, frozen, target, [0, 0, 0], 100, seed=0)
    assert np.allclose(cert.adapted.to_float()(x), want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_certificate_records_the_instance():
    """A certificate names the instance it is about: the exact frozen model and target, in every outcome."""
    W, T = random_rational_linear(3, 2, seed=1)
    exact, below = certify_linear(W, T, 3), certify_linear(W, T, 0)
    for cert in (exact, below):
        assert cert.frozen == tuple(sympy.ImmutableMatrix(M) for M in W) and cert.target == T
    floats = certify_linear([np.eye(2) * 0.1, np.eye(2)], np.eye(2), 1)
    assert floats.frozen[0][0, 0] == sympy.Rational(3602879701896397, 36028797018963968)  # the exact float
    broken = RationalFNN((sympy.eye(3), sympy.zeros(3, 3)), (sympy.zeros(3, 1),) * 2)
    f_frozen, f_target = random_rational_fnn(3, 2, 1, seed=3)
    for fr in (f_frozen, broken):
        cert = certify_fnn(fr, f_target, 2, input_radius=1)
        assert cert.frozen is fr and cert.target is f_target
    t_frozen, t_target = random_rational_tfn(2, 1, 1, seed=0)
    cert = certify_tfn(t_frozen, t_target, 1)
    assert cert.frozen is t_frozen and cert.target is t_target
    from_float = certify_tfn(t_frozen.to_float(), t_target.to_float(), 1)
    assert isinstance(from_float.frozen, RationalTFN) and from_float.frozen.wq == t_frozen.wq


@pytest.mark.parametrize("r", [1, 2, 3])
def test_theorem7_walk_agrees_in_three_arithmetics(r):
    """Theorem 7's walk is shared by the float64 construction, the mpmath one and the exact certificate: on a
    target that replaces ``r`` rows of block 0's ``W_Q`` (matched ranks ``G = (r, 0)``, threshold
    ``ceil(r/2)``) all three find the same matched ranks and threshold, and are exact from it on and not one
    rank below."""
    from lora_theory.highprec import lora_tfn_mp
    from lora_theory.models import random_tfn
    from lora_theory.tfn import lora_tfn

    frozen = random_tfn(4, 2, 1, seed=r)
    rng = np.random.default_rng(10 + r)
    wq = np.array(frozen.wq)
    wq[0, 0, :r] = rng.standard_normal((r, 4))  # new first r rows: a change of exact rank r, whatever the rounding
    target = frozen.replace(wq=wq)
    required = -(-r // 2)
    for R in (required - 1, required):
        fit, hp, cert = (
            lora_tfn(frozen, target, R),
            lora_tfn_mp(frozen, target, R, digits=30),
            certify_tfn(frozen, target, R),
        )
        assert fit.matched_ranks == hp.matched_ranks == (r, 0)
        assert fit.required_rank == hp.required_rank == required
        assert fit.exact == hp.exact == (cert.outcome == "exact") == (R >= required)
        if R >= required:
            assert cert.required_rank == required


def test_certify_fnn_with_target_weights_near_the_float64_limit_does_not_overflow():
    """Regression (found by the fuzz test): a target layer with entries near 1e300 made the float64 guess of
    ``||T||_2^2`` that the ball rule then certifies overflow, and ``certify_fnn`` raised a raw
    ``OverflowError``. Past float64's range the exact Frobenius bound is used, and the certificate is
    returned; the bound it uses is an upper bound of ``||T||_2^2``, checked exactly."""
    from lora_theory.symbolic.fnn import _spectral_sq_upper
    from lora_theory.symbolic.rational import _dm

    W = np.array([[0.27392337, -0.46042657], [-0.91805295, -0.96694473]])
    b = np.array([0.27392337, -0.46042657])
    frozen = FNN([W, W], [b, b], final_relu=False)
    target = FNN([W, 1e300 * W], [b, b], final_relu=False)
    cert = certify_fnn(frozen, target, 2, input_radius=1.0)
    assert cert.outcome in (EXACT, NOT_MET)
    for scale in (1.0, 1e150, 1e300):
        M = _dm(scale * W, "M")
        rho = _spectral_sq_upper(M)
        G = M.transpose() * M
        lam = sympy.Matrix(G.to_Matrix()).eigenvals()  # exact eigenvalues of M^T M
        assert all(sympy.re(sympy.N(rho - v, 50)) >= 0 for v in lam)
