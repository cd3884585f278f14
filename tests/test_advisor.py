"""The rank advisor: per-layer exact and energy ranks, Eckart–Young error curves, PEFT proposal, bad input."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lora_theory
from lora_theory.advisor import PER_LAYER_NOTE, advise_fnn, advise_layers, energy_rank, tail_curves
from lora_theory.errors import InvalidArgumentError
from lora_theory.linear import product
from lora_theory.partition import partition_blocks, uniform_partition


def known_rank_change(rng, out, inp, rank, low=0.5, high=2.0):
    """``U diag(s) V^T`` with orthonormal ``U`` (out x rank), ``V`` (in x rank) and ``s`` in [low, high]:
    rank exactly ``rank``, singular values known."""
    U, _ = np.linalg.qr(rng.standard_normal((out, max(rank, 1))))
    V, _ = np.linalg.qr(rng.standard_normal((inp, max(rank, 1))))
    s = np.sort(rng.uniform(low, high, rank))[::-1]
    return (U[:, :rank] * s) @ V[:, :rank].T, s


@st.composite
def layer_pairs(draw):
    """1 to 4 layers of random (possibly rectangular) shapes, each with a change of known rank (0 allowed)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 4))
    base, tuned, ranks, spectra = {}, {}, {}, {}
    for l in range(n):
        out, inp = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        rank = draw(st.integers(0, min(out, inp)))
        W = rng.uniform(-1, 1, (out, inp))
        delta, s = known_rank_change(rng, out, inp, rank)
        base[f"block{l}.fc.weight"] = W
        tuned[f"block{l}.fc.weight"] = W + delta
        ranks[f"block{l}.fc"] = rank
        spectra[f"block{l}.fc"] = s
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    return (
        {k: v.astype(dtype) for k, v in base.items()},
        {k: v.astype(dtype) for k, v in tuned.items()},
        ranks,
        spectra,
        dtype,
    )


@given(layer_pairs())
def test_exact_rank_is_the_rank_of_the_change(case):
    base, tuned, ranks, spectra, dtype = case
    report = advise_layers(base, tuned)
    assert report.exact_ranks == ranks
    for a in report.layers:
        s = spectra[a.name]
        # stored in `dtype`: the spectrum is recovered to the storage precision
        u = np.finfo(dtype).eps
        assert a.singular_values.shape == (min(a.shape),)
        np.testing.assert_allclose(a.singular_values[: s.size], s, rtol=0, atol=50 * u * 4)
        assert a.energy_rank <= a.exact_rank
        assert a.parameters(a.exact_rank) == a.exact_rank * sum(a.shape)


@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 9))
def test_tail_curves_are_the_errors_of_truncated_svd(seed, out, inp):
    """Eckart–Young, literally: the best rank-r approximation's error is σ_{r+1} / the Frobenius tail."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, inp))
    delta = rng.standard_normal((out, inp))
    report = advise_layers({"w": W}, {"w": W + delta})
    a = report.layer("w")
    U, s, Vt = np.linalg.svd(a.delta, full_matrices=False)
    for r in range(min(out, inp) + 1):
        approx = (U[:, :r] * s[:r]) @ Vt[:r]
        scale = max(1.0, np.linalg.norm(a.delta))
        assert abs(np.linalg.norm(a.delta - approx, 2) - a.spectral_tail[r]) <= 1e-12 * scale
        assert abs(np.linalg.norm(a.delta - approx, "fro") - a.frobenius_tail[r]) <= 1e-12 * scale
        ad = a.adapter(r)
        assert ad.rank == r
        assert abs(np.linalg.norm(a.delta - ad.delta, "fro") - a.frobenius_tail[r]) <= 1e-12 * scale


def test_spectral_norm_of_large_matrices():
    """Above 512 on the short side the tolerance scale comes from power iteration: a few digits suffice."""
    from lora_theory.advisor import _spectral_norm

    M = np.random.default_rng(4).standard_normal((530, 520))
    assert _spectral_norm(M) == pytest.approx(np.linalg.norm(M, 2), rel=1e-2)
    assert _spectral_norm(np.zeros((600, 600))) == 0.0


def test_energy_rank_literal():
    s = np.array([3.0, 2.0, 1.0, 0.5])
    total = np.sum(s**2)
    for energy in (0.1, 0.5, 0.9, 0.99, 1.0):
        literal = next(r for r in range(1, 5) if np.sum(s[:r] ** 2) >= energy * total - 1e-12 * total)
        assert energy_rank(s, energy) == literal
    assert energy_rank(np.zeros(3), 0.9) == 0 and energy_rank(np.array([]), 0.9) == 0
    spectral, frob = tail_curves(s)
    np.testing.assert_allclose(spectral, [3, 2, 1, 0.5, 0])
    np.testing.assert_allclose(frob**2, [total, total - 9, 1.25, 0.25, 0])


def test_energy_rank_counts_only_numeric_directions():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 8))
    delta, s = known_rank_change(rng, 8, 8, 3)
    report = advise_layers({"fc.weight": W}, {"fc.weight": W + delta}, energy=1.0)
    assert report.layer("fc").energy_rank == report.layer("fc.weight").exact_rank == 3


def test_biases_vectors_and_skipped():
    rng = np.random.default_rng(1)
    base = {
        "a.weight": rng.standard_normal((5, 3)),
        "a.bias": rng.standard_normal(5),
        "b.weight": rng.standard_normal((4, 5)),
        "b.bias": rng.standard_normal(4),
        "norm.weight": np.ones(4),
        "steps": np.array(7),
        "pos_ids": np.arange(6).reshape(1, 6),
        "conv.weight": rng.standard_normal((2, 3, 3, 3)),
        "scale": np.array(1.5),
    }
    tuned = {k: np.array(v, copy=True) for k, v in base.items()}
    tuned["a.bias"] = tuned["a.bias"] + 0.1
    tuned["norm.weight"] = tuned["norm.weight"] * 2
    report = advise_layers(base, tuned)
    assert [a.name for a in report.layers] == ["a", "b"]
    a, b = report.layers
    assert a.bias_changed and a.exact_rank == 0 and a.bias_key == "a.bias"
    np.testing.assert_allclose(a.bias_change, np.full(5, 0.1), rtol=1e-12)
    assert not b.bias_changed and b.bias_change_norm == 0.0
    assert [v["name"] for v in report.vectors] == ["norm.weight"]
    assert report.vectors[0]["change_norm"] == pytest.approx(2.0)
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"steps", "pos_ids", "conv.weight", "scale"}
    assert "non-float buffer" in skipped["pos_ids"] and "4-D" in skipped["conv.weight"]
    proposal = report.peft_proposal()
    assert proposal["lora_config"]["rank_pattern"] == {"a": 1} and proposal["bias_only"] == ["a"]
    assert proposal["lora_config"]["lora_bias"] is True and proposal["untargeted"] == ["b"]


def test_storage_precision_sets_the_tolerance():
    """A float32 round-off of W + ΔW is full rank in float64 terms; the storage eps hides it, float64 eps not."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((10, 10)).astype(np.float32)
    delta, _ = known_rank_change(rng, 10, 10, 2)
    tuned = (W.astype(np.float64) + delta).astype(np.float32)
    as64 = {"w": W.astype(np.float64)}, {"w": tuned.astype(np.float64)}
    assert advise_layers(*as64).layer("w").exact_rank > 2  # storage precision unknown
    assert advise_layers(*as64, eps={"w": np.finfo(np.float32).eps}).layer("w").exact_rank == 2
    assert advise_layers({"w": W}, {"w": tuned}).layer("w").exact_rank == 2
    report = advise_layers({"w": W}, {"w": tuned}, tol=1e-3)
    assert report.layer("w").rtol == 1e-3 and report.rtol == 1e-3


def test_json_report_and_proposal():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 4))
    delta, s = known_rank_change(rng, 6, 4, 2)
    report = advise_layers(
        {"enc.weight": W, "enc.bias": np.zeros(6), "dec.weight": W.T},
        {"enc.weight": W + delta, "enc.bias": np.zeros(6), "dec.weight": W.T.copy()},
    )
    data = json.loads(report.to_json())
    assert data["note"] == PER_LAYER_NOTE and "Theorems 3 and 6" in data["note"]
    layer = data["layers"][0]
    assert layer["name"] == "enc" and layer["exact_rank"] == 2 and layer["shape"] == [6, 4]
    np.testing.assert_allclose(layer["singular_values"][:2], s, rtol=1e-12)
    assert len(layer["frobenius_tail"]) == 5 and layer["bias_changed"] is False
    assert data["layers"][1]["exact_rank"] == 0
    proposal = report.peft_proposal("energy")
    assert proposal["lora_config"]["target_modules"] == ["enc"] and proposal["choice"] == "energy"
    nothing = advise_layers({"w": W}, {"w": W.copy()}).peft_proposal()
    assert nothing["lora_config"]["target_modules"] == [] and "nothing" in nothing["note"]


def test_bad_input():
    W = np.eye(3)
    with pytest.raises(InvalidArgumentError, match="base: must be a mapping"):
        advise_layers([W], {"w": W})
    with pytest.raises(InvalidArgumentError, match="tuned: holds no tensors"):
        advise_layers({"w": W}, {})
    with pytest.raises(InvalidArgumentError, match=r"missing from tuned: \['v'\]"):
        advise_layers({"w": W, "v": W}, {"w": W})
    with pytest.raises(InvalidArgumentError, match=r"only in tuned: \['v'\]"):
        advise_layers({"w": W}, {"w": W, "v": W})
    with pytest.raises(InvalidArgumentError, match=r"tuned\['w'\]: has shape \(3, 4\) but base has \(3, 3\)"):
        advise_layers({"w": W}, {"w": np.ones((3, 4))})
    with pytest.raises(InvalidArgumentError, match=r"tuned\['fc.weight'\]: is a non-float tensor \(int8\)"):
        advise_layers({"fc.weight": W}, {"fc.weight": np.eye(3, dtype=np.int8)})
    with pytest.raises(InvalidArgumentError, match=r"base\['fc.bias'\]: is a non-float tensor"):
        advise_layers({"fc.bias": np.zeros(3, dtype=np.int64)}, {"fc.bias": np.zeros(3, dtype=np.int64)})
    with pytest.raises(InvalidArgumentError, match="non-float tensor .* differs"):
        advise_layers({"ids": np.arange(3)}, {"ids": np.arange(3) + 1})
    with pytest.raises(InvalidArgumentError, match="complex"):
        advise_layers({"w": W}, {"w": W + 1j})
    with pytest.raises(InvalidArgumentError, match="not a numeric tensor"):
        advise_layers({"w": np.array([object()])}, {"w": np.array([object()])})
    with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
        advise_layers({"w": W}, {"w": W * np.nan})
    for tol in (0, -1.0, float("nan"), True):
        with pytest.raises(InvalidArgumentError, match="tol"):
            advise_layers({"w": W}, {"w": W}, tol=tol)
    for energy in (0, 1.5, "0.9"):
        with pytest.raises(InvalidArgumentError, match="energy"):
            advise_layers({"w": W}, {"w": W}, energy=energy)
    report = advise_layers({"w": W}, {"w": W})
    with pytest.raises(InvalidArgumentError, match="choice"):
        report.peft_proposal("median")
    with pytest.raises(InvalidArgumentError, match="no layer 'v'"):
        report.layer("v")
    with pytest.raises(InvalidArgumentError, match="rank"):
        report.layer("w").adapter(4)


# ----------------------------------------------------------------------------- depth-aware mode


@pytest.mark.parametrize("block_ranks,depth", [((3, 5), 4), ((6, 1), 4), ((2, 2, 2), 6)])
def test_advise_fnn_known_block_ranks(block_ranks, depth):
    """Targets T_i = Π_{P_i} W_l + rank-ρ_i change: the uniform requirement is max_i ceil(ρ_i / |P_i|)."""
    D = 8
    rng = np.random.default_rng(sum(block_ranks))
    frozen = lora_theory.random_fnn(D, depth, seed=depth)
    sizes = uniform_partition(depth, len(block_ranks))
    weights = []
    for rho, blk in zip(block_ranks, partition_blocks(sizes)):
        change, _ = known_rank_change(rng, D, D, rho)
        weights.append(product(frozen.weights[blk.start : blk.stop]) + change)
    target = lora_theory.FNN(weights, [rng.uniform(-0.2, 0.2, D) for _ in weights])
    advice = advise_fnn(frozen, target)
    assert advice.uniform_block_ranks == block_ranks
    assert advice.uniform_rank == max(-(-r // s) for r, s in zip(block_ranks, sizes))
    assert advice.best_rank <= advice.uniform_rank
    assert advice.generic_threshold == -(-D // (depth // len(block_ranks)))
    assert advice.to_dict()["best_partition"] == list(advice.best_partition)


def test_advise_fnn_generic_and_bad():
    frozen = lora_theory.random_fnn(6, 2, seed=0)
    target = lora_theory.random_fnn(6, 1, seed=1)
    advice = advise_fnn(frozen, target)
    assert advice.uniform_rank == advice.best_rank == advice.generic_threshold == 3
    with pytest.raises(InvalidArgumentError, match="target"):
        advise_fnn(target, frozen)


# ----------------------------------------------------------------------------- edges (NaN, overflow, eps)


def test_huge_weights_are_rescaled_not_nan():
    """Regression: 1e308-scale weights gave singular values [nan, nan, nan] and rank 0. Weights near the top of
    float64 are rescaled by a power of two before the SVD; a norm that float64 cannot hold is a named error."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 3)) * 1e300
    delta, s = known_rank_change(rng, 3, 3, 2)
    a = advise_layers({"w": W}, {"w": W + delta * 1e299}).layer("w")
    assert a.exact_rank == 2 and np.isfinite(a.singular_values).all()
    np.testing.assert_allclose(a.singular_values[:2], s * 1e299, rtol=1e-3)
    with pytest.raises(InvalidArgumentError, match="overflows float64"):
        advise_layers({"w": W * 1e8}, {"w": W * 0.5e8})
    with pytest.raises(InvalidArgumentError, match=r"tuned\['l.bias'\]: its change overflows"):
        advise_layers(
            {"l.weight": np.eye(3), "l.bias": np.full(3, 1.7e308)},
            {"l.weight": np.eye(3), "l.bias": np.full(3, -1.7e308)},
        )
    Ws, Ts = W * 1e-300 * 1e-310, (W + delta * 1e299) * 1e-300 * 1e-310  # entries near 1e-310, subnormal
    assert 0 < np.abs(Ws).max() < np.finfo(np.float64).tiny
    tiny = advise_layers({"w": Ws}, {"w": Ts}).layer("w")
    assert tiny.exact_rank == 2  # subnormal-scale weights: same answer


@pytest.mark.parametrize("eps", [float("nan"), -1.0, 0.0, 1e-3, float("inf"), True, "2e-7"])
def test_eps_must_be_a_storage_epsilon(eps):
    """Regression: eps=nan gave rank 0 and eps=-1 full rank."""
    W = np.eye(3)
    with pytest.raises(InvalidArgumentError, match="eps"):
        advise_layers({"w": W}, {"w": 2 * W}, eps=eps)
    with pytest.raises(InvalidArgumentError, match=r"eps\['w'\]"):
        advise_layers({"w": W}, {"w": 2 * W}, eps={"w": eps})


def test_energy_rank_refuses_what_it_cannot_rank():
    """Regression: energy_rank(s, 2.0) and energy_rank of NaN or negative values returned numbers."""
    for energy in (2.0, 0.0, -0.5, float("nan"), True, "0.9"):
        with pytest.raises(InvalidArgumentError, match="energy"):
            energy_rank([2.0, 1.0], energy)
    for bad in ([1.0, float("nan")], [1.0, float("inf")], [1.0, -1.0], [1.0, 2.0], [[1.0]], ["a"]):
        with pytest.raises(InvalidArgumentError, match="singular_values"):
            energy_rank(bad, 0.9)
        with pytest.raises(InvalidArgumentError, match="singular_values"):
            tail_curves(bad)
    assert energy_rank([1e200, 1e199], 0.99) == 1  # squares would overflow: scaled first
    _, frob = tail_curves([1e200, 1e199])
    assert frob[0] == pytest.approx(math.hypot(1e200, 1e199), rel=1e-12)


def test_dtypes_and_floor_arguments():
    W = np.eye(3)
    with pytest.raises(InvalidArgumentError, match=r"dtypes\['w'\]"):
        advise_layers({"w": W}, {"w": W}, dtypes={"w": "int8"})
    with pytest.raises(InvalidArgumentError, match=r"dtypes\['w'\]"):
        advise_layers({"w": W}, {"w": W}, dtypes={"w": ("float32", "bfloat16", "float16")})
    with pytest.raises(InvalidArgumentError, match="dtypes"):
        advise_layers({"w": W}, {"w": W}, dtypes="bfloat16")
    with pytest.raises(InvalidArgumentError, match="floor"):
        advise_layers({"w": W}, {"w": W}, floor="gaussian")
    r = advise_layers({"w": W}, {"w": W}, dtypes={"w": "torch.float32/bfloat16"})
    assert r.layer("w").storage_dtype == "float32/bfloat16"
    assert r.layer("w").floor.bounds.entry_max == pytest.approx(2.0**-24 + 2.0**-8, rel=1e-6)


def _two_layer_report():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 4))
    delta, _ = known_rank_change(rng, 6, 4, 2)
    return advise_layers(
        {"enc.weight": W, "enc.bias": np.zeros(6), "dec.weight": W.T},
        {"enc.weight": W + delta, "enc.bias": np.full(6, 0.5), "dec.weight": W.T.copy()},
    )


def test_to_dataframe_has_one_row_per_layer_with_the_reports_numbers():
    """RankReport.to_dataframe: a row per weight matrix, in order, holding the same ranks and norms as the
    layers (pandas needed)."""
    pytest.importorskip("pandas")
    from lora_theory.advisor import DATAFRAME_COLUMNS

    report = _two_layer_report()
    frame = report.to_dataframe()
    assert list(frame.index) == ["enc", "dec"] and frame.index.name == "name"
    assert list(frame.columns) == list(DATAFRAME_COLUMNS[1:])
    for a in report.layers:
        row = frame.loc[a.name]
        assert (row["out_features"], row["in_features"]) == a.shape
        assert row["exact_rank"] == a.exact_rank and row["energy_rank"] == a.energy_rank
        assert row["rank_above_floor"] == a.rank_above_floor and row["max_rank"] == a.max_rank
        assert row["delta_norm"] == a.delta_norm and row["relative_change"] == a.relative_change
        assert row["floor"] == a.floor.spectral and row["relative_floor"] == a.relative_floor
        assert row["exact_parameters"] == a.parameters(a.exact_rank)
        assert row["bias_changed"] == a.bias_changed and row["storage_dtype"] == a.storage_dtype
    assert frame.loc["enc", "exact_rank"] == 2 and frame.loc["dec", "exact_rank"] == 0
    assert bool(frame.loc["enc", "bias_changed"]) and not bool(frame.loc["dec", "bias_changed"])


def test_to_dataframe_without_pandas_says_what_to_install(monkeypatch):
    """Without pandas, to_dataframe raises one ImportError line naming the package to install."""
    import builtins

    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "pandas", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError) as info:
        _two_layer_report().to_dataframe()
    message = str(info.value)
    assert "\n" not in message and "pip install pandas" in message and "to_dataframe" in message
