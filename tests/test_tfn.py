"""Theorem 7 (transformers): the adapted TFN equals the target at R = ceil(D/2), for every input.

Tolerances are relative to the target's outputs on the batch, ``tolerance(κ)`` with ``κ`` the largest
condition number the construction solved with (THEORY.md §1).
"""

import re

import numpy as np
import pytest
from _helpers import ill_conditioned_ok
from hypothesis import assume, example, given
from hypothesis import strategies as st

from lora_theory.errors import IllConditionedWarning, InvalidArgumentError, NumericalError, SingularMatrixError
from lora_theory.models import TFN, random_tfn, relu, softmax_columns
from lora_theory.numerics import numeric_rank, relative_error, tolerance
from lora_theory.tfn import (
    CHECK_INPUTS,
    CHECK_TOKENS,
    lora_tfn,
    tfn_matched_discrepancies,
    tfn_matched_discrepancy_ranks,
    tfn_rank_requirement,
)
from lora_theory.thresholds import tfn_rank_threshold

SEEDS = st.integers(0, 2**32 - 1)


def _pair(D, L, H, seed):
    rng = np.random.default_rng(seed)
    return random_tfn(D, L, H, seed=rng), random_tfn(D, L, H, seed=rng), rng


def _inputs(rng, D, n=6, N=5):
    return rng.standard_normal((n, D, N))  # (n, D, N): tokens are columns


def _last_hidden(tfn, X):
    """The last block's hidden activations ``ReLU(W1_L A_L + b1_L)`` on ``X``."""
    Z = tfn.block_outputs(X)[-2]
    l = tfn.depth - 1
    A = sum(
        tfn.wo[l, h] @ tfn.wv[l, h] @ Z @ softmax_columns(np.swapaxes(tfn.wk[l, h] @ Z, -1, -2) @ (tfn.wq[l, h] @ Z))
        for h in range(tfn.heads)
    )
    return relu(tfn.w1[l] @ A + tfn.b1[l][:, None])


def _expected_keys(L, H):
    keys = {(n, l, h) for n in ("wq", "wk", "wv", "wo") for l in range(L) for h in range(H)}
    return keys | {("w2", L - 1, None), ("w_out", L - 1, None)}


@ill_conditioned_ok
@given(D=st.integers(2, 8), L=st.integers(1, 3), H=st.integers(1, 3), seed=SEEDS)
def test_exact_at_half_width_for_any_input(D, L, H, seed):
    frozen, target, rng = _pair(D, L, H, seed)
    R = tfn_rank_threshold(D)
    fit = lora_tfn(frozen, target, R)
    assert fit.exact and fit.rank == R
    # generic weights: every matched discrepancy has full rank, the instance needs ceil(D/2)
    assert fit.matched_ranks == (D,) * L and fit.required_rank == R
    tol = tolerance(fit.kappa)
    X = _inputs(rng, D)
    for scale in (1.0, 50.0):  # no bounded domain: exact on inputs scaled far beyond the unit scale too
        assert relative_error(fit.model(scale * X), target(scale * X)) <= tol


@ill_conditioned_ok
@given(D=st.integers(2, 8), L=st.integers(1, 3), H=st.integers(1, 3), seed=SEEDS)
def test_adapters_keyed_within_budget_and_applied(D, L, H, seed):
    frozen, target, _ = _pair(D, L, H, seed)
    R = tfn_rank_threshold(D)
    fit = lora_tfn(frozen, target, R)
    assert set(fit.adapters) == _expected_keys(L, H)
    for adapter in fit.adapters.values():
        assert adapter.A.shape[1] == D and adapter.B.shape[0] == D
        assert adapter.rank <= R
        assert numeric_rank(adapter.delta) <= R
    model = fit.model
    for (name, l, h), adapter in fit.adapters.items():
        if name in ("wq", "wk", "wv", "wo"):
            np.testing.assert_array_equal(getattr(model, name)[l, h], getattr(frozen, name)[l, h] + adapter.delta)
    np.testing.assert_array_equal(model.w2[L - 1], frozen.w2[L - 1] + fit.adapters[("w2", L - 1, None)].delta)
    np.testing.assert_array_equal(model.w_out, frozen.w_out + fit.adapters[("w_out", L - 1, None)].delta)
    # untouched: W1 of every block, W2 before the last block; b1 is the target's
    np.testing.assert_array_equal(model.w1, frozen.w1)
    np.testing.assert_array_equal(model.w2[: L - 1], frozen.w2[: L - 1])
    np.testing.assert_array_equal(model.b1, target.b1)


@ill_conditioned_ok
@given(D=st.integers(2, 8), H=st.integers(1, 3), seed=SEEDS)
def test_key_adapter_transposes_the_chain_factor(D, H, seed):
    # block 0 has C_0 = I: the adapted score matrix (W_K + Δ_K)^T (W_Q + Δ_Q) is the target's T_K^T T_Q,
    # which holds only if the W_K^T adapter was transposed into A_K = B_2^T, B_K = A_2^T
    frozen, target, _ = _pair(D, 1, H, seed)
    fit = lora_tfn(frozen, target, tfn_rank_threshold(D))
    for h in range(H):
        reference = target.wk[0, h].T @ target.wq[0, h]
        assert relative_error(fit.model.wk[0, h].T @ fit.model.wq[0, h], reference) <= tolerance(fit.kappa)
        reference = target.wo[0, h] @ target.wv[0, h]
        achieved = frozen.w1[0] @ fit.model.wo[0, h] @ fit.model.wv[0, h]
        assert relative_error(achieved, target.w1[0] @ reference) <= tolerance(fit.kappa)


@ill_conditioned_ok
@given(D=st.integers(2, 8), L=st.integers(1, 3), H=st.integers(1, 3), seed=SEEDS)
@example(D=7, L=3, H=3, seed=517385267)  # κ = 7.8e9: 1e3 tolerances exceed any relative error; set aside
def test_not_exact_one_rank_below_on_generic_weights(D, L, H, seed):
    frozen, target, rng = _pair(D, L, H, seed)
    R = tfn_rank_threshold(D) - 1
    fit = lora_tfn(frozen, target, R)
    assert not fit.exact and fit.required_rank == R + 1
    # the matched products miss their targets by σ_{2R+1} > 0 (Lemma 1 on a chain of two factors); in
    # block 0 (C_0 = I) the score product's target is T_K^T T_Q
    assert max(fit.matched_errors.values()) > 0
    for h in range(H):
        matched = target.wk[0, h].T @ target.wq[0, h]
        frozen_product = frozen.wk[0, h].T @ frozen.wq[0, h]
        sigma = np.linalg.svd(matched - frozen_product, compute_uv=False)[2 * R]
        assert fit.matched_errors[("qk", 0, h)] == pytest.approx(sigma, rel=1e-10)
        achieved = np.linalg.norm(fit.model.wk[0, h].T @ fit.model.wq[0, h] - matched, 2)
        scale = max(np.linalg.norm(matched, 2), np.linalg.norm(frozen_product, 2))
        assert abs(achieved - sigma) <= tolerance(fit.kappa) * scale
    assert all(a.rank <= R for a in fit.adapters.values())
    # ... and the network output visibly differs from the target's on some input (no error bound is
    # claimed below, and no impossibility: THEORY.md §3). Unit-scale inputs alone can miss it: with
    # D = 2 the target's negative b1 may switch every hidden ReLU off on the batch. For small D the
    # last block's ReLU can even be off on every input (its input, an affine image of a ReLU output,
    # lies in a cone that W1 maps below -b1): then the target is a constant function, which the
    # adapted network matches through its last bias. Such targets are set aside.
    X = _inputs(rng, D, n=16)
    scales = (1.0, 50.0)
    hidden_on = any(_last_hidden(target, s * X).any() for s in scales)
    assume(hidden_on)
    # "Visibly" is 1e3 times the fit's own rounding tolerance. Where that reaches the size of the outputs
    # (κ near 1e9: 1e3 tolerances near 1), no error of a relative size below 1 can show it, and the draw
    # says nothing about the theorem: it is set aside too.
    assume(1e3 * tolerance(fit.kappa) < 0.1)
    errors = [relative_error(fit.model(s * X), target(s * X)) for s in scales]
    assert max(errors) > 1e3 * tolerance(fit.kappa)


@ill_conditioned_ok
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("seed", range(5))
def test_paper_sizes_exact_to_1e_8(L, seed):
    # the authors' TFN setting: D = 16, H = 2, N = 10; threshold ceil(16 / 2) = 8
    frozen = random_tfn(16, L, 2, seed=seed)
    target = random_tfn(16, L, 2, seed=1000 + seed)
    assert tfn_rank_threshold(16) == 8
    assert tfn_rank_requirement(frozen, target) == 8
    fit = lora_tfn(frozen, target, 8)
    X = np.random.default_rng(seed).standard_normal((32, 16, 10))
    for scale in (1.0, 50.0):
        err = relative_error(fit.model(scale * X), target(scale * X))
        assert err <= 1e-8 and err <= tolerance(fit.kappa)
    below = lora_tfn(frozen, target, 7)
    assert not below.exact


def _low_rank_change(frozen, rng, rank_qk, rank_ov):
    """A target equal to ``frozen`` except in block 0 head 0: T_Q = W_Q + (rank rank_qk),
    T_V = W_V + (rank rank_ov). Matched discrepancy ranks: G_0 = max(rank_qk, rank_ov), 0 elsewhere."""
    D = frozen.embed_dim
    wq, wv = np.array(frozen.wq), np.array(frozen.wv)
    wq[0, 0] += rng.standard_normal((D, rank_qk)) @ rng.standard_normal((rank_qk, D))
    wv[0, 0] += rng.standard_normal((D, rank_ov)) @ rng.standard_normal((rank_ov, D))
    b1 = rng.uniform(-1, 1, frozen.b1.shape)
    b2 = rng.uniform(-1, 1, frozen.b2.shape)
    return frozen.replace(wq=wq, wv=wv, b1=b1, b2=b2)


@ill_conditioned_ok
@given(D=st.integers(2, 8), L=st.integers(1, 3), H=st.integers(1, 2), data=st.data())
def test_instance_requirement_follows_matched_ranks(D, L, H, data):
    rng = np.random.default_rng(data.draw(SEEDS))
    frozen = random_tfn(D, L, H, seed=rng)
    rank_qk = data.draw(st.integers(0, D), label="rank_qk")
    rank_ov = data.draw(st.integers(0, D), label="rank_ov")
    target = _low_rank_change(frozen, rng, rank_qk, rank_ov)
    G = max(rank_qk, rank_ov)
    assert tfn_matched_discrepancy_ranks(frozen, target) == (G,) + (0,) * (L - 1)
    required = tfn_rank_requirement(frozen, target)
    assert required == -(-G // 2)
    fit = lora_tfn(frozen, target, required)
    assert fit.exact and fit.required_rank == required
    X = _inputs(rng, D)
    for scale in (1.0, 50.0):
        assert relative_error(fit.model(scale * X), target(scale * X)) <= tolerance(fit.kappa)


@ill_conditioned_ok
@given(D=st.integers(2, 8), L=st.integers(1, 3), H=st.integers(1, 2), R=st.integers(0, 4), seed=SEEDS)
def test_matched_discrepancies_are_what_each_chain_leaves(D, L, H, R, seed):
    """The discrepancies the construction matches: their defining identities where no ``C_l`` or solve
    enters (block 0's scores, the output product), one per chain, and every adapted chain of the fit's
    model misses its matched product by exactly their ``σ_{2R+1}`` in the spectral norm (Lemma 1)."""
    frozen, target, rng = _pair(D, L, H, seed)
    R = min(R, D)
    E = tfn_matched_discrepancies(frozen, target)
    assert set(E) == ({(k, l, h) for k in ("qk", "ov") for l in range(L) for h in range(H)} | {("out", L - 1, None)})
    assert all(e.shape == (D, D) for e in E.values())
    for h in range(H):
        np.testing.assert_array_equal(
            E[("qk", 0, h)], target.wk[0, h].T @ target.wq[0, h] - frozen.wk[0, h].T @ frozen.wq[0, h]
        )
    np.testing.assert_array_equal(
        E[("out", L - 1, None)], target.w_out @ target.w2[L - 1] - frozen.w_out @ frozen.w2[L - 1]
    )
    fit = lora_tfn(frozen, target, R)
    m = fit.model

    def chain(model, kind, l, h):  # the product each chain forms, as the model stores it
        if kind == "qk":
            return model.wk[l, h].T @ model.wq[l, h]
        if kind == "ov":
            return model.wo[l, h] @ model.wv[l, h]
        return model.w_out @ model.w2[l]

    for (kind, l, h), e in E.items():
        s = np.linalg.svd(e, compute_uv=False)
        sigma = s[2 * R] if 2 * R < D else 0.0
        frozen_product = chain(frozen, kind, l, h)
        matched = e + frozen_product  # what the chain must form
        miss = np.linalg.norm(chain(m, kind, l, h) - matched, 2)
        scale = max(np.linalg.norm(matched, 2), np.linalg.norm(frozen_product, 2))
        assert abs(miss - sigma) <= tolerance(fit.kappa) * scale, (kind, l, h)
    assert tfn_matched_discrepancy_ranks(frozen, target) == fit.matched_ranks


def test_rank_zero_rechooses_biases_only():
    frozen = random_tfn(5, 2, 2, seed=3)
    rng = np.random.default_rng(4)
    target = frozen.replace(b1=rng.uniform(-1, 1, (2, 5)), b2=rng.uniform(-1, 1, (2, 5)))
    fit = lora_tfn(frozen, target, 0)
    assert fit.exact and fit.required_rank == 0 and fit.matched_ranks == (0, 0)
    assert all(a.rank == 0 for a in fit.adapters.values()) and fit.num_parameters == 0
    X = _inputs(rng, 5)
    assert relative_error(fit.model(X), target(X)) <= tolerance(fit.kappa)


def _with(tfn, name, index, matrix):
    value = np.array(getattr(tfn, name))
    if index is None:
        value = matrix
    else:
        value[index] = matrix
    return tfn.replace(**{name: value})


def _singular(D, rng):
    M = rng.standard_normal((D, D))
    M[-1] = M[0]  # two equal rows: rank D-1
    return M


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize(
    "name, index, where, match",
    [
        ("w1", 0, "frozen", r"W1\[0\]"),
        ("w1", 1, "frozen", r"W1\[1\]"),
        ("w2", 0, "frozen", r"W2\[0\]"),
        ("w2", 0, "target", r"T2\[0\] \(target\)"),
    ],
)
def test_singular_inverted_matrices_raise(rank, name, index, where, match):
    rng = np.random.default_rng(7)
    frozen, target = random_tfn(4, 2, 2, seed=1), random_tfn(4, 2, 2, seed=2)
    if where == "frozen":
        frozen = _with(frozen, name, index, _singular(4, rng))
    else:
        target = _with(target, name, index, _singular(4, rng))
    with pytest.raises(SingularMatrixError, match=match) as info:
        lora_tfn(frozen, target, rank)
    assert info.value.condition_number > 1e15
    with pytest.raises(SingularMatrixError, match=match):
        tfn_rank_requirement(frozen, target)


@ill_conditioned_ok
def test_singular_last_w2_is_fine():
    # W2_L is a first factor, never inverted; T2_L neither
    rng = np.random.default_rng(8)
    frozen, target = random_tfn(4, 2, 1, seed=1), random_tfn(4, 2, 1, seed=2)
    frozen = _with(frozen, "w2", 1, _singular(4, rng))
    target = _with(target, "w2", 1, _singular(4, rng))
    fit = lora_tfn(frozen, target, 2)
    X = _inputs(rng, 4)
    assert relative_error(fit.model(X), target(X)) <= tolerance(fit.kappa)


def test_singular_w_out_raises_naming_it():
    rng = np.random.default_rng(9)
    frozen, target = random_tfn(4, 1, 2, seed=1), random_tfn(4, 1, 2, seed=2)
    frozen = _with(frozen, "w_out", None, _singular(4, rng))
    # at rank 2 the output chain solves with W_out (second factor of (W2_L, W_out))
    with pytest.raises(SingularMatrixError, match=r"Q_1 = W_out"):
        lora_tfn(frozen, target, 2)
    # at rank 0 nothing adapts W_out, and the last bias needs (W_out + Δ_out)^-1
    with pytest.raises(SingularMatrixError, match=r"W_out \+ Δ_out"):
        lora_tfn(frozen, target, 0)


def test_singular_key_matrix_raises_naming_it():
    rng = np.random.default_rng(10)
    frozen, target = random_tfn(4, 1, 2, seed=1), random_tfn(4, 1, 2, seed=2)
    frozen = _with(frozen, "wk", (0, 1), _singular(4, rng))
    with pytest.raises(SingularMatrixError, match=r"W_K\[0,1\]\^T"):
        lora_tfn(frozen, target, 2)


def test_ill_conditioned_w1_warns_with_kappa():
    rng = np.random.default_rng(11)
    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    U, _, Vt = np.linalg.svd(rng.standard_normal((4, 4)))
    w1 = U @ np.diag([1.0, 1.0, 1.0, 1e-10]) @ Vt  # κ = 1e10: u·κ ≈ 1e-6 > 1e-8
    frozen = _with(frozen, "w1", 0, w1)
    with pytest.warns(IllConditionedWarning, match="κ = 1e\\+10"):
        fit = lora_tfn(frozen, target, 2)
    assert fit.condition_numbers["W1[0]"] == pytest.approx(1e10, rel=1e-3)


@ill_conditioned_ok
def test_condition_numbers_name_what_was_solved():
    frozen, target = random_tfn(4, 2, 2, seed=1), random_tfn(4, 2, 2, seed=2)
    fit = lora_tfn(frozen, target, 2)
    names = set(fit.condition_numbers)
    assert {"W1[0]", "W1[1]", "W2[0]", "T2[0]", "W_out + Δ_out"} <= names
    assert "W2[1]" not in names and "T2[1]" not in names  # the last block inverts neither
    assert {"qk[0,0] Q_1", "qk[0,0] P_2", "ov[1,1] Q_1", "ov[1,1] P_2", "out Q_1", "out P_2"} <= names
    assert fit.kappa == max(fit.condition_numbers.values())


@pytest.mark.parametrize("shape", [(2, 2, 4), (1, 1, 4), (1, 2, 3)])
def test_target_of_other_shape_is_rejected(shape):
    frozen = random_tfn(4, 1, 2, seed=1)
    L, H, D = shape
    target = random_tfn(D, L, H, seed=2)
    with pytest.raises(InvalidArgumentError, match=r"^target: .*\(L, H, D\)"):
        lora_tfn(frozen, target, 2)
    with pytest.raises(InvalidArgumentError, match=r"^target: "):
        tfn_rank_requirement(frozen, target)


def test_not_a_tfn_is_rejected():
    frozen = random_tfn(4, 1, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match=r"^frozen: must be a lora_theory.TFN"):
        lora_tfn(frozen.parameters(), frozen, 1)
    with pytest.raises(InvalidArgumentError, match=r"^target: must be a lora_theory.TFN"):
        lora_tfn(frozen, frozen.parameters(), 1)


@pytest.mark.parametrize(
    "rank, match",
    [
        (2.0, "must be an integer"),
        (True, "must be an integer"),
        (-1, "must be at least 0"),
        (5, "must be at most 4"),
        ("2", "must be an integer"),
        (None, "must be an integer"),
    ],
)
def test_bad_rank_is_rejected(rank, match):
    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    with pytest.raises(InvalidArgumentError, match=rf"^rank: {match}"):
        lora_tfn(frozen, target, rank)


@ill_conditioned_ok
def test_rank_d_and_numpy_integer_are_accepted():
    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    for rank in (4, np.int64(3)):
        fit = lora_tfn(frozen, target, rank)
        assert fit.exact and isinstance(fit.rank, int)


@ill_conditioned_ok
def test_fit_is_frozen_and_not_comparable_by_value():
    frozen, target = random_tfn(3, 1, 1, seed=1), random_tfn(3, 1, 1, seed=2)
    fit = lora_tfn(frozen, target, 2)
    with pytest.raises(AttributeError):
        fit.rank = 3
    assert fit != lora_tfn(frozen, target, 2)  # eq=False: identity comparison
    assert isinstance(fit.model, TFN)


@pytest.mark.parametrize("seed", range(3))
def test_rank_counts_real_changes_and_not_the_rounding_of_stored_weights(seed):
    """The numeric rank of each matched discrepancy (``_rank_tol``): a target that equals the frozen model up
    to the float64 rounding of its stored weights (``W_K·3`` and ``W_Q/3``, ``W_V·3`` and ``W_O/3``: the same
    products in exact arithmetic, each quotient rounded) needs rank 0 and is fitted exactly there; a real
    rank-1 change of relative size 1e-7 in one query matrix is counted, at exactly one direction."""
    frozen = random_tfn(4, 2, 2, seed=seed)
    rescaled = frozen.replace(wk=frozen.wk * 3.0, wq=frozen.wq / 3.0, wv=frozen.wv * 3.0, wo=frozen.wo / 3.0)
    assert not np.array_equal(rescaled.wq * 3.0, frozen.wq) or not np.array_equal(rescaled.wo * 3.0, frozen.wo)
    assert tfn_matched_discrepancy_ranks(frozen, rescaled) == (0, 0)
    assert tfn_rank_requirement(frozen, rescaled) == 0
    fit = lora_tfn(frozen, rescaled, 0)
    assert fit.exact

    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal(4), rng.standard_normal(4)
    wq = frozen.wq.copy()
    wq[1, 0] += 1e-7 * np.linalg.norm(wq[1, 0], 2) * np.outer(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    changed = frozen.replace(wq=wq)
    assert tfn_matched_discrepancy_ranks(frozen, changed) == (0, 1)
    assert not lora_tfn(frozen, changed, 0).exact and lora_tfn(frozen, changed, 1).exact


# --- claims pinned by mutation testing (docs/mutation.md) ---

EPS = np.finfo(np.float64).eps


def _diagonal_tfn(wq=(1, 1, 1, 1), wv=(1, 1, 1, 1), w1=(1, 1, 1, 1), w2=(1, 1, 1, 1), w_out=(1, 1, 1, 1), b2=0.0):
    """A one-block, one-head TFN of width 4 with the given diagonals of ``W_Q``, ``W_V``, ``W1``, ``W2`` and
    ``W_out``, ``W_K = W_O = I``: every product and solve the construction forms from small integers, powers of
    two and ``1 + k·eps`` is exact in float64, so its matched discrepancies are known to the last bit."""
    I = np.eye(4)
    return TFN(
        np.diag(wq)[None, None],
        I[None, None],
        np.diag(wv)[None, None],
        I[None, None],
        w1=np.diag(w1)[None],
        b1=np.zeros((1, 4)),
        w2=np.diag(w2)[None],
        b2=np.full((1, 4), b2),
        w_out=np.diag(w_out),
    )


@pytest.mark.parametrize(
    "kind, frozen_diag, target_diag, w1, scale, kappa",
    [
        # the matched product ||T_K^T T_Q|| = 4 is the largest of the three norms (||W_K^T W_Q|| = 1, ||E|| = 3)
        ("qk", (1, 1, 1, 1), (4, 4, 4, 1), (1, 1, 1, 1), 4, 0),
        # the frozen product is the largest (||W_K^T W_Q|| = 4, ||T_K^T T_Q|| = 1, ||E|| = 3)
        ("qk", (4, 4, 4, 1), (1, 1, 1, 1), (1, 1, 1, 1), 4, 0),
        # the discrepancy is the largest (||E|| = 4, both products 2)
        ("qk", (2, 2, 2, 1), (-2, -2, -2, 1), (1, 1, 1, 1), 4, 0),
        # a value product, matched through a solve with W1 = diag(1, 1, 1, 2): κ(W1) = 2 widens the tolerance
        ("ov", (1, 1, 1, 1), (4, 4, 4, 1), (1, 1, 1, 2), 4, 2),
        # the output product T_out T2_L, matched with no solve (κ = 0) whatever the other blocks solved with
        ("out", (1, 1, 1, 1), (4, 4, 4, 1), (1, 1, 1, 2), 4, 0),
    ],
    ids=["matched-largest", "frozen-largest", "discrepancy-largest", "value-product-kappa-2", "output-product"],
)
def test_the_numeric_rank_counts_singular_values_above_D_eps_largest_norm_one_plus_kappa(
    kind, frozen_diag, target_diag, w1, scale, kappa
):
    """``_rank_tol``'s claim, at its boundary: a matched discrepancy ``E = matched - Π frozen`` counts its singular
    values above ``D · eps · max(||matched||_2, ||Π W||_2, ||E||_2) · (1 + κ)`` (``κ`` that of the solves that
    formed ``matched``: none in block 0's scores, ``C_0 = I``; ``W1`` in its value products), and one at the
    tolerance or below it is rounding, as in :func:`lora_theory.numerics.numeric_rank`. The discrepancies here are
    exact (diagonal weights): three singular values far above the tolerance, and a fourth one of 7/8, exactly
    1 or 9/8 of it; the largest norm is, in turn, each of the three, so that a tolerance on a smaller norm, on a
    Frobenius norm or without ``1 + κ`` puts the fourth on the other side."""
    tol = 4 * EPS * scale * (1 + kappa)
    counted = {}
    for fraction in (7 / 8, 1, 9 / 8):
        delta = fraction * tol  # a multiple of eps, so 1 + delta is exact
        moved = np.array(target_diag, dtype=float)
        moved[3] += delta
        field = {"qk": "wq", "ov": "wv", "out": "w2"}[kind]
        frozen = _diagonal_tfn(w1=w1, **{field: frozen_diag})
        target = _diagonal_tfn(w1=w1, **{field: moved})
        E = tfn_matched_discrepancies(frozen, target)[(kind, 0, None if kind == "out" else 0)]
        assert abs(E[3, 3]) == delta and np.count_nonzero(E - np.diag(np.diag(E))) == 0  # exact, diagonal
        (counted[fraction],) = tfn_matched_discrepancy_ranks(frozen, target)
    assert counted == {7 / 8: 3, 1: 3, 9 / 8: 4}


@pytest.mark.parametrize(
    "name, index, where, why",
    [
        ("w1", 0, "frozen", r"block 0: the value products are matched to W1\^-1 T1 T_O T_V C"),
        ("w1", 1, "frozen", r"block 1: the value products are matched to W1\^-1 T1 T_O T_V C"),
        ("w2", 0, "frozen", r"block 0 < L-1: C = T2 W2\^-1 carries the target to the next block"),
        ("w2", 0, "target", r"block 0 < L-1: b2 = W2 T2\^-1 c2"),
    ],
    ids=["W1-block0", "W1-block1", "W2-block0", "T2-block0"],
)
def test_a_singular_inverted_matrix_is_refused_saying_where_and_why_it_is_inverted(name, index, where, why):
    """The theorem assumes ``W1_l`` and, before the last block, ``W2_l`` and ``T2_l`` invertible; a refusal names the
    matrix and says what the construction inverts it for, in which block (``SingularMatrixError.context``, also at
    the end of the message), from the construction and from the rank functions alike."""
    rng = np.random.default_rng(7)
    frozen, target = random_tfn(4, 2, 2, seed=1), random_tfn(4, 2, 2, seed=2)
    if where == "frozen":
        frozen = _with(frozen, name, index, _singular(4, rng))
    else:
        target = _with(target, name, index, _singular(4, rng))
    for call in (lambda: lora_tfn(frozen, target, 2), lambda: tfn_matched_discrepancy_ranks(frozen, target)):
        with pytest.raises(SingularMatrixError) as info:
            call()
        assert re.fullmatch(why, info.value.context)
        assert str(info.value).endswith(f"({info.value.context})")


@pytest.mark.parametrize("call", [lora_tfn, tfn_matched_discrepancy_ranks], ids=["lora_tfn", "ranks"])
def test_an_overflow_forming_the_next_blocks_change_of_basis_names_that_solve(call):
    """``C_l = T2_l W2_l^{-1}`` is formed by a solve with ``W2_l^T``; with ``W2_l = 1e-300·I`` (invertible, κ = 1)
    and a target ``T2_l`` of norm ~1e10 it exceeds the float64 range, which is refused as a
    :class:`NumericalError` naming that solve, not returned as infinite weights."""
    frozen, target = random_tfn(4, 2, 1, seed=1), random_tfn(4, 2, 1, seed=2)
    frozen = _with(frozen, "w2", 0, 1e-300 * np.eye(4))
    target = _with(target, "w2", 0, 1e10 * target.w2[0])
    args = (frozen, target, 2) if call is lora_tfn else (frozen, target)
    with pytest.raises(NumericalError, match=r"overflow in a solve with the transpose of a frozen W2: the solution"):
        call(*args)


@pytest.mark.parametrize(
    "where, solve",
    [("T2", r"T2\[0\]"), ("W_out", r"W_out \+ Δ_out")],
    ids=["b2-before-the-last-block", "b2-of-the-last-block"],
)
def test_an_overflowing_bias_solve_is_refused_naming_the_matrix_solved_with(where, solve):
    """The biases ``b2_l = W2_l T2_l^{-1} c2_l`` (``l < L``) and ``b2_L = (W_out + Δ_out)^{-1} T_out c2_L`` are
    solves; with the matrix solved with ``1e-300·I`` (invertible, κ = 1) and a target bias of 1e10 the solution
    exceeds the float64 range, refused as a :class:`NumericalError` naming that matrix. Rank 0: no adapter is
    built, so the bias solves are the only ones that can overflow."""
    frozen, target = random_tfn(4, 2, 1, seed=1), random_tfn(4, 2, 1, seed=2)
    if where == "T2":
        target = _with(_with(target, "w2", 0, 1e-300 * np.eye(4)), "b2", 0, np.full(4, 1e10))
    else:  # at rank 0 nothing adapts W_out: W_out + Δ_out = W_out
        frozen = _with(frozen, "w_out", None, 1e-300 * np.eye(4))
        target = _with(target, "b2", 1, np.full(4, 1e10))
    with pytest.raises(NumericalError, match=rf"overflow in a solve with {solve}: the solution exceeds"):
        lora_tfn(frozen, target, 0)


def test_a_singular_adapted_output_layer_is_refused_naming_it_and_the_bias_that_needs_it():
    """``b2_L = (W_out + Δ_out)^{-1} T_out c2_L``: a singular ``W_out`` at rank 0 (nothing adapts it) is refused as
    the matrix ``W_out + Δ_out``, with the last block's bias as the reason (``SingularMatrixError.matrix`` and
    ``.context``, not only somewhere in the message)."""
    rng = np.random.default_rng(9)
    frozen, target = random_tfn(4, 1, 2, seed=1), random_tfn(4, 1, 2, seed=2)
    frozen = _with(frozen, "w_out", None, _singular(4, rng))
    with pytest.raises(SingularMatrixError) as info:
        lora_tfn(frozen, target, 0)
    assert info.value.matrix == "W_out + Δ_out"
    assert info.value.context == "the last block's bias b2 = (W_out + Δ_out)^-1 T_out c2"


def test_a_singular_adapted_last_w2_is_refused_naming_it():
    """The output chain ``(W_out + Δ_out)(W2_L + Δ_2) = T_out T2_L`` inverts ``P_2 = W2_L + Δ`` when ``W_out``
    receives directions. With ``W2_L = diag(4, 3, 2, 1)``, ``W_out = T_out = I`` and ``T2_L = 0`` at rank 2, each
    adapted ``W2_L`` (``W2_L`` less either pair of its singular directions) is singular, so every assignment
    fails: the refusal names ``P_2 = (W2[L-1] + Δ)``, the last block's ``W2`` in the module's notation."""
    frozen = _diagonal_tfn(w2=(4, 3, 2, 1))
    target = _diagonal_tfn(w2=(0, 0, 0, 0))
    with pytest.raises(SingularMatrixError) as info:
        lora_tfn(frozen, target, 2)
    assert info.value.matrix == "P_2 = (W2[L-1] + Δ)"


def test_a_discrepancy_whose_norm_overflows_is_refused_naming_it():
    """``W_Q = -A`` frozen, ``T_Q = A`` target, ``A = 0.6e308·I``: the score discrepancy ``2A`` has finite entries
    and a finite spectral norm, but a Frobenius norm beyond the float64 range; it is refused as a
    :class:`NumericalError` naming the discrepancy and its block, before any chain is built from it."""
    A = (0.6e308,) * 4
    frozen, target = _diagonal_tfn(wq=tuple(-a for a in A)), _diagonal_tfn(wq=A)
    with pytest.raises(NumericalError, match=r"overflow: the norm of the qk discrepancy of block 0 exceeds"):
        lora_tfn(frozen, target, 2)


@ill_conditioned_ok
@pytest.mark.parametrize("seed", range(3))
def test_a_chain_whose_rank_suffices_leaves_no_matched_error(seed):
    """``matched_errors`` is ``σ_{2R+1}`` of a matched discrepancy, the error its chain leaves (Lemma 1); where
    ``2R`` covers the discrepancy's numeric rank the chain is exact and the entry is 0, also when the discrepancy
    is rounding noise (weights rescaled by 3 and 1/3, as in
    ``test_rank_counts_real_changes_and_not_the_rounding_of_stored_weights``: rank 0 at ``R = 0``) or has no
    ``(2R+1)``-th singular value at all (generic weights at ``R = ceil(D/2)``)."""
    frozen = random_tfn(4, 2, 2, seed=seed)
    rescaled = frozen.replace(wk=frozen.wk * 3.0, wq=frozen.wq / 3.0, wv=frozen.wv * 3.0, wo=frozen.wo / 3.0)
    E = tfn_matched_discrepancies(frozen, rescaled)
    assert any(np.any(e != 0) for e in E.values())  # rounding noise, not exactly zero
    fit = lora_tfn(frozen, rescaled, 0)
    assert fit.required_rank == 0 and set(fit.matched_errors.values()) == {0.0}
    for D in (4, 5):
        frozen, target = random_tfn(D, 2, 2, seed=seed), random_tfn(D, 2, 2, seed=100 + seed)
        fit = lora_tfn(frozen, target, tfn_rank_threshold(D))
        assert fit.rank_sufficient and set(fit.matched_errors.values()) == {0.0}


def test_a_refused_network_is_named_with_the_type_given():
    frozen = random_tfn(4, 1, 1, seed=1)
    with pytest.raises(InvalidArgumentError, match=r"^frozen: must be a lora_theory.TFN, got dict$"):
        lora_tfn(frozen.parameters(), frozen, 1)
    with pytest.raises(InvalidArgumentError, match=r"^target: must be a lora_theory.TFN, got dict$"):
        tfn_rank_requirement(frozen, frozen.parameters())


def test_the_warnings_of_an_ill_conditioned_construction_name_theorem_7():
    """Both warnings a badly conditioned instance raises (``κ(W1) = 1e10``: the ill-conditioning, and the check
    that finds the float64 result not exact although the rank suffices) say which construction they are about."""
    rng = np.random.default_rng(11)
    frozen, target = random_tfn(4, 1, 1, seed=1), random_tfn(4, 1, 1, seed=2)
    U, _, Vt = np.linalg.svd(rng.standard_normal((4, 4)))
    frozen = _with(frozen, "w1", 0, U @ np.diag([1.0, 1.0, 1.0, 1e-10]) @ Vt)
    with pytest.warns(IllConditionedWarning) as record:
        fit = lora_tfn(frozen, target, 2)
    assert fit.rank_sufficient and not fit.exact
    messages = [str(w.message) for w in record if issubclass(w.category, IllConditionedWarning)]
    assert any(m.startswith("transformer construction (Theorem 7) is ill-conditioned: κ = ") for m in messages)
    assert any(m.startswith("transformer construction (Theorem 7): the rank suffices but") for m in messages)


@ill_conditioned_ok
@pytest.mark.parametrize("D", [3, 4])
def test_measured_error_is_taken_on_the_documented_check_inputs(D):
    """``TFNFit.measured_error``: the relative error on ``CHECK_INPUTS`` inputs of ``CHECK_TOKENS`` tokens with
    ``N(0, 1)`` entries drawn with seed 0; below the threshold it is far from 0, so other inputs would give another
    value. The fit also keeps the networks it was built from (its summary reads ``D``, ``L``, ``H`` off them)."""
    frozen, target = random_tfn(D, 2, 2, seed=1), random_tfn(D, 2, 2, seed=2)
    R = tfn_rank_threshold(D) - 1
    fit = lora_tfn(frozen, target, R)
    X = np.random.default_rng(0).standard_normal((CHECK_INPUTS, D, CHECK_TOKENS))
    assert fit.measured_error == relative_error(fit.model(X), target(X)) > 1e-3
    assert fit.frozen is frozen and fit.target is target
    assert repr(fit).startswith(f"TFNFit(D={D}, L=2, H=2, rank={R},")
