"""PEFT and loralib export: what lora_theory builds (and what the rank advisor proposes) loads through PEFT
and reproduces the adapted model, biases included."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lora_theory
from lora_theory.adapter import Adapter
from lora_theory.errors import InvalidArgumentError
from lora_theory.fnn import lora_fnn
from lora_theory.linear import lora_linear
from lora_theory.numerics import relative_error
from lora_theory.thresholds import fnn_rank_threshold
from verification.advise import advise_checkpoints
from verification.models import TorchFNN
from verification.peft_export import export_loralib_state_dict, export_peft

if os.environ.get("CI"):
    import peft  # CI installs the peft extra: the round trip must run there, not be skipped
else:
    peft = pytest.importorskip("peft")

torch.set_num_threads(1)


def load_peft(model, directory):
    """``PeftModel.from_pretrained``, failing on PEFT's warnings about the files: config keys it does not know,
    tensors it expected or did not expect."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, str(directory))
    complaints = [
        str(w.message)
        for w in caught
        if any(word in str(w.message).lower() for word in ("unexpected", "missing", "invalid shape"))
    ]
    assert not complaints, complaints
    return loaded


def ball(D, n, radius, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * radius * rng.uniform(0, 1, (n, 1)) ** (1 / D)


def peft_forward(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("depth,target_depth,above", [(2, 1, 0), (2, 1, 1), (4, 2, 0), (4, 2, 2)])
def test_fnn_fit_round_trip_at_and_above_threshold(tmp_path, depth, target_depth, above):
    """Theorem 3 fits at the threshold ceil(D / floor(L / L̄)) and above: PEFT on TorchFNN(frozen) equals
    the adapted model, and the target on the certified ball."""
    D = 8
    frozen = lora_theory.random_fnn(D, depth, seed=10 + depth)
    target = lora_theory.random_fnn(D, target_depth, seed=20 + depth)
    rank = fnn_rank_threshold(D, depth, target_depth) + above
    fit = lora_fnn(frozen, target, rank, input_radius=3.0)
    assert fit.exact
    info = export_peft(fit, tmp_path, dtype="float64")
    model = load_peft(TorchFNN.from_numpy(frozen), tmp_path)
    x = ball(D, 200, 3.0, seed=depth + above)
    out = peft_forward(model, x)
    # the fit's rounding bound is absolute on the ball (FNNFit.absolute_tolerance), per sample
    assert np.linalg.norm(out - fit.model(x), axis=1).max() <= fit.absolute_tolerance
    assert np.linalg.norm(out - target(x), axis=1).max() <= fit.absolute_tolerance
    assert info.config["lora_alpha"] == info.config["r"] == max(info.ranks.values())
    assert info.config["rank_pattern"] == info.config["alpha_pattern"] == info.ranks
    assert info.config["lora_bias"] is True  # the construction re-chooses every bias


def test_rank_zero_layer_with_bias_change_is_a_zero_rank_one_adapter(tmp_path):
    """Per-layer ranks (R, 0): the second layer gets no directions but new (calibrating) biases."""
    D = 6
    frozen = lora_theory.random_fnn(D, 2, seed=3)
    target = lora_theory.random_fnn(D, 1, seed=4)
    fit = lora_fnn(frozen, target, [D, 0], input_radius=2.0)
    assert fit.adapters[1].rank == 0 and fit.exact
    info = export_peft(fit, tmp_path, dtype="float64")
    assert info.ranks["layers.1"] == 1 and info.notes["layers.1"]["bias_only"]
    record = json.loads((tmp_path / "lora_theory_export.json").read_text())
    assert record["bias_only"] == ["layers.1"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as fh:
        assert fh.metadata()["format"] == "pt"
        assert not fh.get_tensor("base_model.model.layers.1.lora_A.weight").any()
        assert not fh.get_tensor("base_model.model.layers.1.lora_B.weight").any()
        np.testing.assert_allclose(
            fh.get_tensor("base_model.model.layers.1.lora_B.bias"),
            fit.model.biases[1] - frozen.biases[1],
            rtol=0,
            atol=0,
        )
    model = load_peft(TorchFNN.from_numpy(frozen), tmp_path)
    x = ball(D, 100, 2.0, seed=5)
    assert np.linalg.norm(peft_forward(model, x) - target(x), axis=1).max() <= fit.absolute_tolerance


def test_linear_fit_and_clipped_ranks(tmp_path):
    """A linear fit (no biases) whose adapters are padded: exported at the numeric rank, noted as clipped;
    a layer without directions and without bias change is not targeted."""
    D = 6
    frozen = lora_theory.random_linear(D, 3, seed=1)
    rng = np.random.default_rng(2)
    target = lora_theory.linear.product(frozen.weights) + rng.standard_normal((D, 2)) @ rng.standard_normal((2, D))
    fit = lora_linear(frozen.weights, target, 2)  # rank(E) = 2: only the first layer gets directions
    assert [a.rank for a in fit.adapters] == [2, 0, 0]
    padded = [fit.adapters[0].padded(4), fit.adapters[1], fit.adapters[2]]
    info = export_peft(padded, tmp_path, dtype="float64")
    assert info.notes["layers.0"]["clipped"] and info.ranks == {"layers.0": 2}
    assert not info.notes["layers.1"]["targeted"] and info.config["lora_bias"] is False
    record = json.loads((tmp_path / "lora_theory_export.json").read_text())
    assert record["clipped"] == {"layers.0": [4, 2]} and record["untargeted"] == ["layers.1", "layers.2"]
    model = load_peft(TorchFNN.from_numpy(frozen), tmp_path)
    x = np.random.default_rng(3).standard_normal((50, D))
    assert relative_error(peft_forward(model, x), x @ target.T) <= lora_theory.tolerance(fit.kappa)


def test_target_modules_as_regex(tmp_path):
    D = 4
    frozen = lora_theory.random_fnn(D, 2, seed=0)
    adapters = [Adapter.from_delta(np.outer(np.arange(1.0, D + 1), np.ones(D)) / 10), Adapter.zeros(0, D, D)]
    info = export_peft(adapters, tmp_path, dtype="float64", target_regex=True)
    assert info.config["target_modules"] == r"^(layers\.0)$"
    model = load_peft(TorchFNN.from_numpy(frozen), tmp_path)
    x = np.random.default_rng(0).standard_normal((10, D))
    adapted = frozen.replace(weights=[frozen.weights[0] + adapters[0].delta, frozen.weights[1]])
    assert relative_error(peft_forward(model, x), adapted(x)) <= 1e-12


# ----------------------------------------------------------------------------- advisor -> PEFT on a real module


class MLP(nn.Module):
    """A small MLP with rectangular layers (6 -> 10 -> 10 -> 4 -> 4)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for l, layer in enumerate(self.layers):
            x = layer(x)
            if l < len(self.layers) - 1:
                x = torch.relu(x)
        return x


#: layer -> (rank of the weight change, bias changed)
KNOWN = {"layers.0": (2, True), "layers.1": (0, True), "layers.2": (3, False), "layers.3": (0, False)}


def synthetic_pair(seed=0):
    torch.manual_seed(seed)
    base = MLP()
    tuned = MLP()
    tuned.load_state_dict(base.state_dict())
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, (rank, bias_changed) in KNOWN.items():
            layer = tuned.get_submodule(name)
            out, inp = layer.weight.shape
            if rank:
                change = rng.uniform(-0.5, 0.5, (out, rank)) @ rng.uniform(-0.5, 0.5, (rank, inp))
                layer.weight += torch.from_numpy(change).float()
            if bias_changed:
                layer.bias += torch.from_numpy(rng.uniform(-0.5, 0.5, out)).float()
    return base, tuned


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_advisor_proposal_round_trips_through_peft(tmp_path, fmt):
    from safetensors.torch import save_file

    base, tuned = synthetic_pair()
    paths = []
    for tag, model in (("base", base), ("tuned", tuned)):
        path = tmp_path / f"{tag}.{fmt}"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
        paths.append(path)
    report = advise_checkpoints(*paths)
    assert report.exact_ranks == {name: rank for name, (rank, _) in KNOWN.items()}
    assert {a.name: a.bias_changed for a in report.layers} == {n: b for n, (_, b) in KNOWN.items()}
    proposal = report.peft_proposal()
    cfg = proposal["lora_config"]
    assert cfg["rank_pattern"] == {"layers.0": 2, "layers.1": 1, "layers.2": 3}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and cfg["r"] == cfg["lora_alpha"] == 3
    assert proposal["bias_only"] == ["layers.1"] and proposal["untargeted"] == ["layers.3"]

    info = export_peft(report, tmp_path / "adapter")  # float32 factors
    assert info.ranks == cfg["rank_pattern"]
    assert set(info.config["target_modules"]) == set(cfg["target_modules"])
    loaded = load_peft(base, tmp_path / "adapter")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((300, 6))).float()
    with torch.no_grad():
        got, want = loaded(x).numpy(), tuned(x).numpy()
    assert relative_error(got, want) < 1e-5

    # the proposal itself is a valid LoraConfig whose layers have the proposed ranks
    fresh = peft.get_peft_model(MLP(), peft.LoraConfig(**cfg))
    shapes = {n: tuple(p.shape) for n, p in fresh.named_parameters() if "lora_A" in n}
    assert shapes == {
        f"base_model.model.{n}.lora_A.default.weight": (r, tuned.get_submodule(n).in_features)
        for n, r in cfg["rank_pattern"].items()
    }


# ----------------------------------------------------------------------------- loralib


def test_loralib_state_dict(tmp_path):
    D = 6
    frozen = lora_theory.random_fnn(D, 2, seed=7)
    target = lora_theory.random_fnn(D, 1, seed=8)
    fit = lora_fnn(frozen, target, [D, 0], input_radius=1.0)
    sd = export_loralib_state_dict(fit, tmp_path / "lora.safetensors", dtype="float64")
    assert set(sd) == {"layers.0.lora_A", "layers.0.lora_B", "layers.0.bias", "layers.1.bias"}
    np.testing.assert_array_equal(sd["layers.0.lora_B"] @ sd["layers.0.lora_A"], fit.adapters[0].delta)
    np.testing.assert_array_equal(sd["layers.1.bias"], fit.model.biases[1])
    from safetensors.numpy import load_file

    back = load_file(str(tmp_path / "lora.safetensors"))
    assert set(back) == set(sd)
    padded = export_loralib_state_dict(fit, tmp_path / "lora.pt", pad_to=D, dtype="float32")
    assert padded["layers.1.lora_A"].shape == (D, D) and not padded["layers.1.lora_B"].any()
    assert set(torch.load(tmp_path / "lora.pt", weights_only=True)) == set(padded)
    with pytest.raises(InvalidArgumentError, match="pad_to"):
        export_loralib_state_dict(fit, pad_to=2)
    with pytest.raises(InvalidArgumentError, match="adapted_biases"):
        export_loralib_state_dict(list(fit.adapters), biases=[np.ones(D), None])


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path):
    a = Adapter.zeros(1, 3, 3)
    with pytest.raises(InvalidArgumentError, match="fit_or_adapters"):
        export_peft(42, tmp_path)
    with pytest.raises(InvalidArgumentError, match="fit_or_adapters"):
        export_peft([], tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"fit_or_adapters\[0\]"):
        export_peft([np.eye(3)], tmp_path)
    with pytest.raises(InvalidArgumentError, match="names"):
        export_peft([a, a], tmp_path, names=["x"])
    with pytest.raises(InvalidArgumentError, match="names"):
        export_peft([a, a], tmp_path, names=["x", "x"])
    with pytest.raises(InvalidArgumentError, match="biases"):
        export_peft([a], tmp_path, biases=[np.ones(3), np.ones(3)])
    with pytest.raises(InvalidArgumentError, match="biases"):
        export_peft([a], tmp_path, biases=[np.ones(4)])
    with pytest.raises(InvalidArgumentError, match="biases"):
        export_peft({"fc": a}, tmp_path, biases={"other": np.ones(3)})
    with pytest.raises(InvalidArgumentError, match="dtype"):
        export_peft([a], tmp_path, dtype="int8")


def test_float16_overflow_is_refused_not_written_as_inf(tmp_path):
    """Regression: float16 exports silently wrote inf."""
    from verification.peft_export import AdapterWriteError

    big = Adapter(np.full((1, 4), 1e5), np.full((3, 1), 1.0))  # A entries 1e5; float16 max 65504
    with pytest.raises(AdapterWriteError, match="float16"):
        export_peft([big], tmp_path / "a", dtype="float16")
    assert not (tmp_path / "a").exists()
    info = export_peft([big], tmp_path / "b", dtype="float32")
    assert info.ranks == {"layers.0": 1}
