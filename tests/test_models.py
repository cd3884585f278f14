"""The paper's models (THEORY.md §1): evaluation conventions, immutability, generators (THEORY.md §4)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_theory.errors import InvalidArgumentError
from lora_theory.models import FNN, TFN, random_fnn, random_linear, random_tfn, relu, softmax_columns

SEEDS = st.integers(0, 2**32 - 1)


# --- FNN ---------------------------------------------------------------------------------------------


@given(D=st.integers(1, 16), L=st.integers(1, 4), final_relu=st.booleans(), seed=SEEDS)
def test_fnn_batched_equals_single(D, L, final_relu, seed):
    rng = np.random.default_rng(seed)
    model = random_fnn(D, L, seed=rng, final_relu=final_relu)
    x = rng.standard_normal((5, D))  # (n, D): batches are rows
    batched = model(x)
    assert batched.shape == (5, D)
    for i in range(5):
        np.testing.assert_allclose(model(x[i]), batched[i], rtol=1e-14, atol=1e-14)
    assert model(x[0]).shape == (D,)


@given(D=st.integers(1, 8), L=st.integers(1, 4), seed=SEEDS)
def test_fnn_is_the_layer_recursion(D, L, seed):
    # z_l = ReLU(W_l z_{l-1} + b_l), rows as in torch.nn.Linear: x @ W.T + b
    rng = np.random.default_rng(seed)
    model = random_fnn(D, L, seed=rng)
    x = rng.standard_normal(D)
    z = x
    for W, b in zip(model.weights, model.biases):
        z = np.maximum(W @ z + b, 0.0)
    np.testing.assert_allclose(model(x), z, rtol=1e-13, atol=1e-15)
    acts = model.activations(x)
    assert len(acts) == L + 1 and np.array_equal(acts[0], x)


def test_fnn_final_relu_false_leaves_the_output_layer_affine():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((4, 4)) for _ in range(2)]
    biases = [rng.standard_normal(4) for _ in range(2)]
    x = rng.standard_normal((10, 4))
    with_relu = FNN(weights, biases)
    without = FNN(weights, biases, final_relu=False)
    hidden = relu(x @ weights[0].T + biases[0])
    np.testing.assert_allclose(without(x), hidden @ weights[1].T + biases[1], rtol=1e-14)
    np.testing.assert_allclose(with_relu(x), relu(hidden @ weights[1].T + biases[1]), rtol=1e-14)
    assert (without(x) < 0).any() and (with_relu(x) >= 0).all()
    assert with_relu.final_relu is True and without.final_relu is False


@given(D=st.integers(1, 8), L=st.integers(1, 4), seed=SEEDS)
def test_linear_activation_is_the_matrix_product(D, L, seed):
    rng = np.random.default_rng(seed)
    model = random_linear(D, L, seed=rng)
    assert model.activation == "linear"
    assert all(not b.any() for b in model.biases)  # no biases
    x = rng.standard_normal((3, D))
    np.testing.assert_allclose(model(x), x @ model.linear_map().T, rtol=1e-12, atol=1e-14)
    # W_1 applied first: the map is W_L ... W_1
    expected = np.eye(D)
    for W in model.weights:
        expected = W @ expected
    np.testing.assert_allclose(model.linear_map(), expected, rtol=1e-14, atol=1e-15)


def test_fnn_arrays_are_read_only_copies():
    W = np.eye(3)
    b = np.ones(3)
    model = FNN([W], [b])
    W[0, 0] = 5.0  # the caller's array is copied
    b[0] = 5.0
    assert model.weights[0][0, 0] == 1.0 and model.biases[0][0] == 1.0
    for array in (model.weights[0], model.biases[0]):
        assert array.dtype == np.float64 and not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 2.0
    with pytest.raises(AttributeError):
        model.weights = (np.eye(3),)


def test_fnn_equality_is_identity():
    a = FNN([np.eye(2)])
    b = FNN([np.eye(2)])
    assert a != b and a == a  # eq=False: no elementwise ==


def test_fnn_missing_biases_are_zero_and_replace_keeps_the_convention():
    model = FNN([np.eye(2), 2 * np.eye(2)], activation="linear")
    assert len(model.biases) == 2 and all(not b.any() for b in model.biases)
    other = model.replace(weights=[np.eye(2), np.eye(2)])
    assert other.activation == "linear" and other.final_relu == model.final_relu
    assert model.depth == 2 and model.width == 2 and model.num_parameters() == 2 * (4 + 2)


# --- TFN ---------------------------------------------------------------------------------------------


@given(D=st.integers(1, 6), L=st.integers(1, 3), H=st.integers(1, 3), N=st.integers(1, 5), seed=SEEDS)
def test_tfn_batched_equals_single(D, L, H, N, seed):
    rng = np.random.default_rng(seed)
    model = random_tfn(D, L, H, seed=rng)
    X = rng.standard_normal((4, D, N))  # (n, D, N): tokens are columns
    batched = model(X)
    assert batched.shape == (4, D, N)
    for i in range(4):
        np.testing.assert_allclose(model(X[i]), batched[i], rtol=1e-12, atol=1e-12)


def test_tfn_is_the_papers_formula():
    # head = W_O W_V Z softmax((W_K Z)^T (W_Q Z)), softmax over keys (columns sum to 1); no residual,
    # no layer norm, no 1/sqrt(d); Z_l = W2 ReLU(W1 A + b1) + b2; f = W_out Z_L
    rng = np.random.default_rng(3)
    model = random_tfn(3, 2, 2, seed=rng)
    X = rng.standard_normal((3, 4))
    Z = X
    for l in range(2):
        A = np.zeros_like(Z)
        for h in range(2):
            S = (model.wk[l, h] @ Z).T @ (model.wq[l, h] @ Z)  # (N, N): scores[key, query]
            P = np.exp(S) / np.exp(S).sum(axis=0, keepdims=True)
            A += model.wo[l, h] @ model.wv[l, h] @ Z @ P
        Z = model.w2[l] @ np.maximum(model.w1[l] @ A + model.b1[l][:, None], 0) + model.b2[l][:, None]
    np.testing.assert_allclose(model(X), model.w_out @ Z, rtol=1e-12, atol=1e-13)
    outs = model.block_outputs(X)
    assert len(outs) == 3 and np.array_equal(outs[0], X)


@given(n=st.integers(1, 3), N=st.integers(1, 6), scale=st.floats(1e-3, 1e3), seed=SEEDS)
def test_softmax_columns_sum_to_one(n, N, scale, seed):
    scores = scale * np.random.default_rng(seed).standard_normal((n, N, N))
    P = softmax_columns(scores)
    assert np.isfinite(P).all() and (P >= 0).all()
    np.testing.assert_allclose(P.sum(axis=-2), 1.0, rtol=0, atol=1e-14)


def test_softmax_is_shift_invariant_per_column_and_stable():
    scores = np.array([[1000.0, -1000.0], [999.0, -1001.0]])  # would overflow exp without the shift
    P = softmax_columns(scores)
    e = np.exp(np.array([1.0, 0.0]))
    np.testing.assert_allclose(P[:, 0], e / e.sum(), rtol=1e-14)
    np.testing.assert_allclose(P[:, 1], e / e.sum(), rtol=1e-14)


def test_tfn_arrays_read_only_shapes_and_identity_equality():
    model = random_tfn(4, 2, 3, seed=0)
    assert (model.depth, model.heads, model.embed_dim, model.width) == (2, 3, 4, 4)
    shapes = {
        "wq": (2, 3, 4, 4),
        "wk": (2, 3, 4, 4),
        "wv": (2, 3, 4, 4),
        "wo": (2, 3, 4, 4),
        "w1": (2, 4, 4),
        "b1": (2, 4),
        "w2": (2, 4, 4),
        "b2": (2, 4),
        "w_out": (4, 4),
    }
    params = model.parameters()
    assert set(params) == set(shapes)
    for name, shape in shapes.items():
        assert params[name].shape == shape and not params[name].flags.writeable
    with pytest.raises(ValueError):
        model.wq[0, 0, 0, 0] = 1.0
    with pytest.raises(AttributeError):
        model.w_out = np.eye(4)
    assert model != random_tfn(4, 2, 3, seed=0)
    changed = model.replace(b1=np.zeros((2, 4)))
    assert not changed.b1.any() and changed.wq is not None and np.array_equal(changed.wq, model.wq)


# --- generators (THEORY.md §4) ----------------------------------------------------------------------


@given(D=st.integers(1, 16), L=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_generators_reproducible_by_seed(D, L, seed):
    a, b = random_fnn(D, L, seed=seed), random_fnn(D, L, seed=seed)
    for x, y in zip(a.weights + a.biases, b.weights + b.biases):
        np.testing.assert_array_equal(x, y)
    c = random_fnn(D, L, seed=seed + 1)
    assert not np.array_equal(a.weights[0], c.weights[0])
    t, u = random_tfn(D, L, 2, seed=seed), random_tfn(D, L, 2, seed=seed)
    for name, value in t.parameters().items():
        np.testing.assert_array_equal(value, u.parameters()[name])
    # a Generator is used as given (consumed), so successive draws differ
    rng = np.random.default_rng(seed)
    assert not np.array_equal(random_fnn(D, L, seed=rng).weights[0], random_fnn(D, L, seed=rng).weights[0])


def test_fnn_generator_uses_the_nn_linear_default():
    # weights and biases U(-1/sqrt(D), 1/sqrt(D)); D = 16 gives U(-1/4, 1/4)
    D = 16
    model = random_fnn(D, 200, seed=0)
    values = np.concatenate([np.ravel(w) for w in model.weights] + [np.ravel(b) for b in model.biases])
    s = 1 / np.sqrt(D)
    assert values.min() >= -s and values.max() <= s
    assert values.min() < -0.99 * s and values.max() > 0.99 * s  # the whole range is used
    # uniform: mean 0, variance s^2 / 3 (n = 54400 draws; 6 standard errors)
    n = values.size
    assert abs(values.mean()) <= 6 * s / np.sqrt(3 * n)
    assert abs(values.var() - s**2 / 3) <= 6 * s**2 * np.sqrt(4 / 45 / n)
    assert not any(b.any() for b in random_fnn(4, 2, seed=0, bias=False).biases)
    scaled = random_fnn(4, 50, seed=0, scale=0.1)
    assert max(np.abs(w).max() for w in scaled.weights) <= 0.1


@pytest.mark.parametrize("scale", [np.finfo(np.float64).max / 2, 1e308, np.finfo(np.float64).max])
def test_fnn_generator_at_scales_where_high_minus_low_overflows(scale):
    """Regression: ``random_fnn(1, 1, scale=1e308)`` raised numpy's OverflowError (``2s`` is inf) instead of
    returning a model; the weights are finite, within ``[-s, s]`` and use the whole range."""
    model = random_fnn(3, 40, seed=0, scale=scale)
    values = np.concatenate([np.ravel(w) for w in model.weights] + [np.ravel(b) for b in model.biases])
    assert np.isfinite(values).all()
    assert values.min() >= -scale and values.max() <= scale
    assert values.min() < -0.99 * scale and values.max() > 0.99 * scale


def test_tfn_generator_uses_the_authors_initialisation():
    # attention N(0, 1); feed-forward weights and biases and W_out U(-1/sqrt(D), 1/sqrt(D))
    D = 16
    model = random_tfn(D, 4, 4, seed=1)
    attention = np.concatenate([np.ravel(getattr(model, n)) for n in ("wq", "wk", "wv", "wo")])
    n = attention.size  # 16384 draws
    assert abs(attention.mean()) <= 6 / np.sqrt(n)
    assert abs(attention.var() - 1.0) <= 6 * np.sqrt(2 / n)
    assert np.abs(attention).max() > 3  # not a bounded distribution
    s = 1 / np.sqrt(D)
    for name in ("w1", "b1", "w2", "b2", "w_out"):
        values = getattr(model, name)
        assert values.min() >= -s and values.max() <= s, name


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: FNN([np.eye(2)], activation="tanh"), r"^activation: must be 'relu' or 'linear'"),
        (lambda: FNN([np.eye(2)], biases=[np.zeros(2), np.zeros(2)]), r"^biases: must give one bias per layer"),
        (lambda: FNN([np.eye(2)], biases=np.zeros(2)), r"^biases: must be a sequence of vectors"),
        (lambda: FNN([np.eye(2)], biases=[np.zeros(3)]), r"^biases\[0\]: must have shape \(2\)"),
        (lambda: FNN([np.eye(2)], biases=[[np.nan, 0.0]]), r"^biases\[0\]: contains NaN"),
        (lambda: FNN([np.eye(2)])(np.zeros(3)), r"^x: must have shape \(D,\) or \(n, D\) with D = 2"),
        (lambda: FNN([np.eye(2)])(np.zeros((1, 1, 2))), r"^x: must have shape"),
        (lambda: FNN([np.eye(2)])(np.array([np.inf, 0.0])), r"^x: contains NaN or infinite"),
        (lambda: random_tfn(2, 1, 1, seed=0)(np.zeros((3, 4))), r"^X: must have shape \(D, N\) or \(n, D, N\)"),
        (lambda: random_tfn(2, 1, 1, seed=0)(np.full((2, 4), np.nan)), r"^X: contains NaN"),
        (lambda: random_fnn(0, 1), r"^width: must be at least 1"),
        (lambda: random_fnn(2, 0), r"^depth: must be at least 1"),
        (lambda: random_fnn(2.0, 1), r"^width: must be an integer"),
        (lambda: random_tfn(2, 1, 0), r"^heads: must be at least 1"),
        (lambda: random_tfn(True, 1, 1), r"^embed_dim: must be an integer"),
    ],
)
def test_model_bad_input(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


def test_tfn_constructor_bad_shapes():
    params = random_tfn(3, 2, 2, seed=0).parameters()
    with pytest.raises(InvalidArgumentError, match=r"^wq: must have 4 dimensions"):
        TFN(**{**params, "wq": params["wq"][0]})
    with pytest.raises(InvalidArgumentError, match=r"^wq: must have shape \(L, H, D, D\)"):
        TFN(**{**params, "wq": np.zeros((2, 2, 3, 4))})
    with pytest.raises(InvalidArgumentError, match=r"^wk: must have shape \(2, 2, 3, 3\)"):
        TFN(**{**params, "wk": np.zeros((2, 1, 3, 3))})
    with pytest.raises(InvalidArgumentError, match=r"^w1: must have shape \(2, 3, 3\)"):
        TFN(**{**params, "w1": np.zeros((1, 3, 3))})
    with pytest.raises(InvalidArgumentError, match=r"^b2: must have shape \(2, 3\)"):
        TFN(**{**params, "b2": np.zeros(3)})
    with pytest.raises(InvalidArgumentError, match=r"^w_out: must have shape \(3, 3\)"):
        TFN(**{**params, "w_out": np.zeros((3, 2))})
    with pytest.raises(InvalidArgumentError, match=r"^wv: contains NaN or infinite"):
        TFN(**{**params, "wv": np.full((2, 2, 3, 3), np.inf)})
