"""The torch models equal lora_theory's numpy models in float64."""

from pathlib import Path

import numpy as np
import pytest
import torch

import lora_theory
import verification
from lora_theory.numerics import relative_error
from verification.models import TorchFNN, TorchTFN, merge_adapter


def test_package_is_this_project():
    root = Path(__file__).resolve().parents[2]
    assert Path(verification.__file__).resolve().parent == root / "verification"


@pytest.mark.parametrize(
    "activation,final_relu,bias", [("relu", True, True), ("relu", False, True), ("linear", True, False)]
)
@pytest.mark.parametrize("depth", [1, 3])
def test_fnn_matches_numpy(activation, final_relu, bias, depth):
    fnn = lora_theory.random_fnn(7, depth, seed=depth, activation=activation, final_relu=final_relu, bias=bias)
    x = np.random.default_rng(1).standard_normal((50, 7))
    model = TorchFNN.from_numpy(fnn)
    out = model(torch.from_numpy(x)).detach().numpy()
    assert relative_error(out, fnn(x)) <= 1e-12
    back = model.to_numpy()
    assert back.activation == activation and back.final_relu == final_relu
    for a, b in zip(back.weights + back.biases, fnn.weights + fnn.biases):
        np.testing.assert_array_equal(a, b)
    assert [n for n, _ in model.named_modules() if n.startswith("layers.")] == [f"layers.{l}" for l in range(depth)]


@pytest.mark.parametrize("depth,heads", [(1, 1), (2, 2)])
def test_tfn_matches_numpy(depth, heads):
    tfn = lora_theory.random_tfn(6, depth, heads, seed=3)
    X = np.random.default_rng(2).standard_normal((9, 6, 5))
    model = TorchTFN.from_numpy(tfn)
    out = model(torch.from_numpy(X)).detach().numpy()
    assert relative_error(out, tfn(X)) <= 1e-12
    back = model.to_numpy()
    for name, value in tfn.parameters().items():
        np.testing.assert_array_equal(getattr(back, name), value)


def test_merge_adapter_is_b_at_a():
    layer = torch.nn.Linear(4, 4, dtype=torch.float64)
    W = layer.weight.detach().clone()
    A = np.random.default_rng(0).standard_normal((2, 4))
    B = np.random.default_rng(1).standard_normal((4, 2))
    merge_adapter(layer, A, B)
    np.testing.assert_allclose(layer.weight.detach().numpy(), W.numpy() + B @ A, rtol=1e-14, atol=1e-14)


def test_bad_activation():
    with pytest.raises(lora_theory.InvalidArgumentError, match="activation"):
        TorchFNN(4, 2, activation="tanh")
