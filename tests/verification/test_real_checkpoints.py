"""Adapters extracted from real checkpoint layouts load through PEFT and reproduce the fine-tune.

Models are built locally from tiny configs (random init, never downloaded) and saved with
``save_pretrained``; the tuned model is the base plus planted low-rank changes (and changed biases and
norms). The claim checked: ``PeftModel.from_pretrained(base, DIR)`` gives the tuned model's logits up to the
storage precision when every layer's rank is at least its change's rank, and is measurably off when a rank
is below it.
"""

import json
import math
import os
import warnings

import pytest
import torch
from _helpers import error_line
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

if os.environ.get("CI"):
    import peft  # CI installs the peft extra: the round trips must run there
    import transformers
else:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from lora_theory.errors import InvalidArgumentError
from verification.architectures import layout
from verification.extract import STORAGE_ROUNDOFF, extract_adapter
from verification.peft_export import AdapterBaseError, AdapterWriteError, check_base, load_peft_adapter
from verification.streaming import (
    ROUNDOFF,
    RoundingStatistics,
    TensorSource,
    layer_delta,
    logical,
    open_pair,
    rounding_statistics,
    stream_spectra,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the models


def gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=61,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        vocab_size=61,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    return transformers.BertForMaskedLM(cfg)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 40)
        self.out = nn.Linear(40, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


#: Per architecture: planted (module, rank), a changed bias, a changed norm, an input.
PLANTS = {
    "gpt2": (
        gpt2,
        {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.mlp.c_fc": 3, "transformer.wte": 1},
        None,
        "transformer.ln_f",
    ),
    "llama": (
        llama,
        {
            "model.layers.0.self_attn.k_proj": 2,
            "model.layers.1.mlp.down_proj": 3,
            "model.embed_tokens": 1,
            "lm_head": 2,
        },
        None,
        "model.layers.0.input_layernorm",
    ),
    "bert": (
        bert,
        {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.1.intermediate.dense": 3},
        "bert.encoder.layer.1.output.dense",
        "bert.encoder.layer.0.output.LayerNorm",
    ),
    "mlp": (MLP, {"fc1": 2, "fc2": 3}, "out", None),
}


def logical_weight(model, name):
    mod = model.get_submodule(name)
    w = mod.weight
    from transformers.pytorch_utils import Conv1D

    return w.T if isinstance(mod, (Conv1D, nn.Embedding)) else w


def build_pair(arch, tmp_path, dtype, sharded, seed=0):
    """Save base and tuned (planted changes) in ``dtype``; return their folders and the planted ranks."""
    make, plants, bias_module, norm_module = PLANTS[arch]
    torch.manual_seed(seed)
    base = make().eval()
    tuned = make().eval()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, r in plants.items():
            W = logical_weight(tuned, name)
            delta = torch.randn(W.shape[0], r, generator=g) @ torch.randn(r, W.shape[1], generator=g)
            W += 0.3 * delta * W.norm() / delta.norm()
        if bias_module:
            tuned.get_submodule(bias_module).bias += 0.1
        if norm_module:
            tuned.get_submodule(norm_module).weight += 0.2
    folders = []
    for tag, model in (("base", base), ("tuned", tuned)):
        folder = tmp_path / f"{arch}-{tag}"
        model = model.to(dtype)
        if arch == "mlp":
            folder.mkdir()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(folder, max_shard_size="20KB" if sharded else "1GB")
        folders.append(folder)
    if sharded and arch != "mlp":
        assert (folders[1] / "model.safetensors.index.json").is_file()
    return folders[0], folders[1], plants


def load_float32(arch, folder):
    """The saved model, weights upcast exactly to float32 (so the comparison sees the stored values)."""
    if arch == "mlp":
        model = MLP()
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
        return model.eval()
    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "bert": transformers.BertForMaskedLM,
    }[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(folder, dtype=torch.float32).eval()


def outputs(arch, model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if arch == "mlp":
            return model(torch.randn(64, 24, generator=g))
        return model(torch.randint(0, 61, (3, 10), generator=g)).logits


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- layouts


def test_gpt2_layout_conv1d_fused_tied_in_model_order(tmp_path):
    base, _, _ = build_pair("gpt2", tmp_path, torch.float32, sharded=True)
    src = TensorSource(base)
    lay = src.layout()
    assert lay.architecture == "GPT2LMHeadModel"
    names = [m.name for m in lay.matrices]
    assert names[:4] == [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
    ]
    c_attn = lay.matrix("transformer.h.0.attn.c_attn")
    assert c_attn.kind == "conv1d" and c_attn.stored_shape == (32, 96) and c_attn.shape == (96, 32)
    wte = lay.matrix("transformer.wte")
    assert wte.kind == "embedding" and wte.shape == (32, 61) and wte.tied == (("lm_head", "linear"),)
    assert "lm_head" not in names  # the tied head is counted once
    assert any(v.module == "transformer.ln_f" for v in lay.vectors)
    assert not any(v.key.endswith("c_attn.bias") for v in lay.vectors)  # biases belong to their layer


def test_generic_layout_orders_numbers_as_numbers():
    shapes = {f"layers.{i}.weight": (4, 4) for i in (10, 2, 1)} | {"layers.2.bias": (4,), "norm.weight": (4,)}
    lay = layout(shapes, {k: "float32" for k in shapes})
    assert [m.name for m in lay.matrices] == ["layers.1", "layers.2", "layers.10"]
    assert lay.matrix("layers.2").bias_key == "layers.2.bias"
    assert [v.key for v in lay.vectors] == ["norm.weight"]


def test_shard_index_decides_over_a_consolidated_file(tmp_path):
    base, tuned, _ = build_pair("llama", tmp_path, torch.float32, sharded=True)
    # a consolidated file holding other values under the same names: the index must win
    state = {k: torch.zeros_like(v) for k, v in load_file(str(next(tuned.glob("model-0000*.safetensors")))).items()}
    save_file(state, str(tuned / "consolidated.safetensors"))
    src = TensorSource(tuned)
    for key in state:
        assert src.files[key].endswith(".safetensors") and "consolidated" not in src.files[key]
        assert torch.count_nonzero(src.get(key)) > 0
    # without the index the duplicates are refused, with one line naming the tensor
    (tuned / "model.safetensors.index.json").unlink()
    from verification.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        TensorSource(tuned)


def test_streamed_spectra_match_the_planted_changes(tmp_path):
    base, tuned, plants = build_pair("gpt2", tmp_path, torch.float32, sharded=True)
    src_b, src_t, lay = open_pair(base, tuned)
    spectra = {
        s.spec.name: s for s in stream_spectra(src_b, src_t, lay, progress=False) if hasattr(s, "singular_values")
    }
    assert list(spectra) == [m.name for m in lay.matrices]
    for name, r in plants.items():
        s = spectra[name].singular_values
        assert s[r - 1] > 1e3 * s[r]  # rank r up to float32 rounding of the stored weights
    assert spectra["transformer.h.0.attn.c_attn"].shape == (96, 32)


def test_resized_vocabulary_is_compared_on_common_rows(tmp_path):
    base, tuned, _ = build_pair("llama", tmp_path, torch.float32, sharded=False)
    model = load_float32("llama", tuned)
    model.resize_token_embeddings(67)
    model.save_pretrained(tuned)
    src_b, src_t, lay = open_pair(base, tuned)
    spectra = {
        s.spec.name: s
        for s in stream_spectra(src_b, src_t, lay, progress=False)
        if hasattr(s, "new_rows") and hasattr(s.spec, "name")
    }
    assert spectra["model.embed_tokens"].new_rows == 6 and spectra["lm_head"].new_rows == 6
    assert spectra["model.embed_tokens"].shape == (32, 61)
    record = extract_adapter(
        base, tuned, {"model.embed_tokens": 1, "model.layers.0.self_attn.k_proj": 2}, tmp_path / "ad", progress=False
    )
    assert "6 new rows" in record["left_out"]["model.embed_tokens"]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "mlp"])
def test_round_trip_reproduces_the_tuned_logits(tmp_path, arch, dtype, sharded):
    base, tuned, plants = build_pair(arch, tmp_path, dtype, sharded)
    record = extract_adapter(base, tuned, plants, tmp_path / "adapter", progress=False)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    assert record["base_fingerprint"]["digest"]
    ranks = {k: v for k, v in record["ranks"].items() if k not in record["notes"]}
    assert {k: v for k, v in ranks.items() if k in plants} == plants
    want = outputs(arch, load_float32(arch, tuned))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_peft_adapter(load_float32(arch, base), tmp_path / "adapter")
    got = outputs(arch, loaded)
    untouched = rel(outputs(arch, load_float32(arch, base)), want)
    u = STORAGE_ROUNDOFF[str(dtype).replace("torch.", "")]
    # the stored change is the planted one plus the rounding of the stored tuned weights (|.| <= u |W_t|):
    # the adapter reproduces it up to that, so the logits agree to a small multiple of u
    assert rel(got, want) <= 16 * u, (rel(got, want), untouched)
    if dtype == torch.float32:
        assert untouched > 1e3 * rel(got, want)  # the change matters; the adapter carries it
    # weight space, layer by layer (PEFT's own delta of each layer): the stored change minus its best rank-r
    # part is the rounding of the stored tuned weights, |.| <= u|W_t| entrywise (Eckart-Young), plus float32
    # arithmetic
    tuned32, base32, u32 = load_float32(arch, tuned), load_float32(arch, base), 2.0**-24
    for name, r in plants.items():
        W_t = logical_weight(tuned32, name).detach().double()
        W_b = logical_weight(base32, name).detach().double()
        layer = loaded.base_model.model.get_submodule(name)
        delta = layer.get_delta_weight("default").detach().double()  # stored layout
        if layer.base_layer.weight.shape != W_t.shape:  # Conv1D, Embedding
            delta = delta.T
        dW = W_t - W_b
        err = float((W_b + delta - W_t).norm())
        bound = u * float(W_t.norm()) + 4 * u32 * (r**0.5 * float(dW.norm()) + float(W_t.norm()))
        assert err <= bound, (name, err, bound)


def test_a_rank_below_the_change_is_measurably_off(tmp_path):
    base, tuned, plants = build_pair("llama", tmp_path, torch.float32, sharded=False)
    short = dict(plants, **{"model.layers.1.mlp.down_proj": 2})
    record = extract_adapter(base, tuned, short, tmp_path / "adapter", progress=False)
    assert record["truncation"]["model.layers.1.mlp.down_proj"] > 0.01
    assert record["truncation"]["model.layers.0.self_attn.k_proj"] < 1e-5
    want = outputs("llama", load_float32("llama", tuned))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = outputs("llama", load_peft_adapter(load_float32("llama", base), tmp_path / "adapter"))
    assert rel(got, want) > 1e-3


# ----------------------------------------------------------------------------- precision and base


def test_float16_overflow_is_refused_and_nothing_is_written(tmp_path):
    base, tuned, plants = build_pair("mlp", tmp_path, torch.float32, sharded=False)
    state = load_file(str(tuned / "model.safetensors"))
    state["fc1.weight"] = state["fc1.weight"] + 1e10 * torch.outer(torch.ones(40), torch.ones(24))
    save_file(state, str(tuned / "model.safetensors"))
    with pytest.raises(AdapterWriteError, match="float16"):
        extract_adapter(base, tuned, {"fc1": 1}, tmp_path / "adapter", dtype="float16", progress=False)
    assert not (tmp_path / "adapter").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    extract_adapter(base, tuned, {"fc1": 1}, tmp_path / "adapter", dtype="float32", progress=False)
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in written.values())


def test_float64_factors_when_asked(tmp_path):
    base, tuned, plants = build_pair("mlp", tmp_path, torch.float32, sharded=False)
    extract_adapter(base, tuned, plants, tmp_path / "adapter", dtype="float64", progress=False)
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.float64}


def test_a_different_base_of_the_same_shape_is_detected(tmp_path):
    base, tuned, plants = build_pair("llama", tmp_path, torch.float32, sharded=False)
    extract_adapter(base, tuned, plants, tmp_path / "adapter", progress=False)
    check_base(tmp_path / "adapter", base)  # the right base passes, as a path
    check_base(tmp_path / "adapter", load_float32("llama", base))  # and as a model
    (tmp_path / "other").mkdir()
    other, _, _ = build_pair("llama", tmp_path / "other", torch.float32, sharded=False, seed=5)
    with pytest.raises(AdapterBaseError, match="differs"):
        check_base(tmp_path / "adapter", other)
    with pytest.raises(AdapterBaseError, match="differs"):
        load_peft_adapter(load_float32("llama", other), tmp_path / "adapter")


def test_extract_refuses_a_folder_that_is_not_empty(tmp_path):
    base, tuned, plants = build_pair("mlp", tmp_path, torch.float32, sharded=False)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterWriteError, match="not an empty folder"):
        extract_adapter(base, tuned, plants, tmp_path / "adapter", progress=False)
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- rounding statistics, extras


@settings(deadline=None, max_examples=25)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    block=st.integers(1, 16),
    d0=st.sampled_from(["float32", "bfloat16", "float16", "float64"]),
    d1=st.sampled_from(["float32", "bfloat16", "float16", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_rounding_statistics_bound_the_exact_ones_from_above_and_closely(m, n, block, d0, d1, seed):
    """The blocked, device-side statistics of B = u_b|W_b| + u_t|W_t| + eta_b + eta_t are upper bounds of the
    exact ones (float64 on the whole matrix) and within a relative 1e-5 of them plus the subnormal terms."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(m, n, generator=g, dtype=torch.float64) * 3).to(getattr(torch, d0))
    w1 = (w0.double() + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)).to(getattr(torch, d1))
    got = rounding_statistics(w0, w1, (d0, d1), block_rows=block)
    (ub, eb), (ut, et) = ROUNDOFF[d0], ROUNDOFF[d1]
    B = ub * w0.double().abs() + ut * w1.double().abs() + eb + et
    exact = {
        "row_max": float(B.norm(dim=1).max()),
        "col_max": float(B.norm(dim=0).max()),
        "entry_max": float(B.max()),
        "frobenius": float(B.norm()),
    }
    assert got["shape"] == (m, n)
    # upper bounds; above the exact value by float32 rounding (relative 2^-20) and by the triangle inequality
    # on the subnormal terms (eta times sqrt of the count of entries summed), no more
    eta = eb + et
    slack = {"row_max": eta * n**0.5, "col_max": eta * m**0.5, "entry_max": 0.0, "frobenius": eta * (m * n) ** 0.5}
    for key, value in exact.items():
        assert value <= got[key] <= value * (1 + 1e-5) + slack[key], (key, value, got[key])


def whole_tensor_layer(src_b, src_t, spec):
    """The reference for :func:`layer_delta`: both stored tensors read whole, ``ΔW``, ``||W_base||_F`` in
    float64 and the rounding statistics of the logical matrices (:func:`rounding_statistics`)."""
    w0, w1 = src_b.get(spec.weight_key), src_t.get(spec.weight_key)[: src_b.shapes[spec.weight_key][0]]
    d0, d1 = src_b.dtypes[spec.weight_key], src_t.dtypes[spec.weight_key]
    cd = torch.float64 if "float64" in (d0, d1) else torch.float32
    delta = logical(w1, spec).to(cd) - logical(w0, spec).to(cd)  # (out, in)
    return delta, float(w0.double().norm()), rounding_statistics(logical(w0, spec), logical(w1, spec), (d0, d1))


@pytest.mark.parametrize(
    "arch, dtype, resize",
    [("gpt2", torch.bfloat16, False), ("llama", torch.float32, True), ("bert", torch.float16, False)],
)
def test_blocked_reading_equals_the_whole_tensors(tmp_path, arch, dtype, resize):
    """ΔW written block by block (1, 3 or 7 stored rows, or one block) equals the whole tensors' difference
    entry for entry, so no row is dropped or read twice; the rounding statistics and ||W_base||_F differ
    from the whole-matrix ones by summation order only. Conv1D (stored (in, out)), embeddings and a resized
    vocabulary (common rows) included."""
    base, tuned, _ = build_pair(arch, tmp_path, dtype, sharded=not resize)  # resaving would leave stale shards
    if resize:
        model = load_float32(arch, tuned)
        model.resize_token_embeddings(67)
        model.save_pretrained(tuned)
    src_b, src_t, lay = open_pair(base, tuned)
    kinds = {spec.kind for spec in lay.matrices}
    assert kinds >= ({"conv1d", "embedding"} if arch == "gpt2" else {"linear", "embedding"})
    for spec in lay.matrices:
        ref_delta, ref_fro, ref_stats = whole_tensor_layer(src_b, src_t, spec)
        for rows in (1, 3, 7, None):
            delta, base_fro, stats = layer_delta(src_b, src_t, spec, rounding=True, block_rows=rows)
            assert tuple(delta.shape) == tuple(ref_delta.shape) == spec.shape
            assert delta.dtype == ref_delta.dtype and torch.equal(delta, ref_delta), (spec.name, rows)
            # float64 sum of float32 block norms: float32 accuracy
            assert base_fro == pytest.approx(ref_fro, rel=1e-5), (spec.name, rows)
            assert stats["shape"] == ref_stats["shape"] == tuple(delta.shape)
            for key in ("row_max", "col_max", "entry_max", "frobenius"):
                # float64 sums of the same float32 squares in another order
                assert stats[key] == pytest.approx(ref_stats[key], rel=1e-12, abs=0), (spec.name, rows, key)
    if resize:
        assert src_t.shapes["model.embed_tokens.weight"][0] == src_b.shapes["model.embed_tokens.weight"][0] + 6


def test_blocked_statistics_of_entries_beyond_float32_squares_run_in_float64(tmp_path):
    """An entry beyond 1e18 in one block (its float32 square could overflow) makes the blocked statistics
    run again in float64, as the whole-tensor ones do; they then agree to float64 summation order."""
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(9, 5, generator=g)
    w1 = w0 + 0.01 * torch.randn(9, 5, generator=g)
    w0[7, 2] = 3e19  # in the last block of 2 rows, after float32 statistics of the first blocks
    for tag, w in (("base", w0), ("tuned", w1)):
        (tmp_path / tag).mkdir()
        save_file({"fc.weight": w.contiguous()}, str(tmp_path / tag / "model.safetensors"))
    src_b, src_t, lay = open_pair(tmp_path / "base", tmp_path / "tuned")
    (spec,) = lay.matrices
    ref = rounding_statistics(w0, w1, ("float32", "float32"))
    _, _, stats = layer_delta(src_b, src_t, spec, rounding=True, block_rows=2)
    for key in ("row_max", "col_max", "entry_max", "frobenius"):
        assert math.isfinite(stats[key]) and stats[key] == pytest.approx(ref[key], rel=1e-14, abs=0), key
    # the float32 accumulator saw the entry and says so rather than answer
    acc = RoundingStatistics((9, 5), ("float32", "float32"))
    for start in range(0, 9, 2):
        acc.add(w0[start : start + 2], w1[start : start + 2])
    assert acc.needs_float64
    with pytest.raises(InvalidArgumentError, match="float64"):
        acc.result()


def test_rounding_statistics_refuse_missing_or_extra_rows():
    w = torch.ones(6, 4)
    acc = RoundingStatistics((6, 4), ("float32", "bfloat16"))
    acc.add(w[:4], w[:4])
    with pytest.raises(InvalidArgumentError, match="4 rows of 6"):
        acc.result()
    with pytest.raises(InvalidArgumentError, match="7 rows fed"):
        acc.add(w[:3], w[:3])
    with pytest.raises(InvalidArgumentError, match="shapes"):
        acc.add(w[:2, :3], w[:2, :3])


def test_a_missing_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    import sys

    from verification.advise import main

    base, tuned, plants = build_pair("mlp", tmp_path, torch.float32, sharded=False)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    capsys.readouterr()
    assert main([str(base), str(tuned), "--quiet", "--extract", str(tmp_path / "ad")]) == 2
    error_line("advise", capsys.readouterr().err, "pip install 'lora-theory[peft]'")  # after the report on stdout


def test_certify_runs_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from verification.certify import main\n"
        "sys.exit(main(['--model', 'linear', '--width', '3', '--depth', '2', '--rank', '2']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
    )
    assert out.returncode == 0, out.stderr
    assert "exact" in out.stdout


# ----------------------------------------------------------------------------- the command line on real layouts


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"]
)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cli_finds_the_planted_ranks_and_extracts_an_adapter_that_reproduces_them(tmp_path, capsys, arch, dtype):
    from verification.advise import main

    base, tuned, plants = build_pair(arch, tmp_path, dtype, sharded=True)
    out, ad = tmp_path / "out", tmp_path / "adapter"
    assert main([str(base), str(tuned), "--out", str(out), "--extract", str(ad), "--quiet"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    ranks = {l["name"]: l["rank_above_floor"] for l in report["layers"]}
    assert {k: v for k, v in ranks.items() if v} == plants  # nothing else above the floor
    names = [l["name"] for l in report["layers"]]
    assert names == [m.name for m in TensorSource(base).layout().matrices]  # model order
    assert "vectors: 1 of" in table  # the one changed norm, one line
    written = json.loads((ad / "lora_theory_export.json").read_text())
    assert {k: v for k, v in written["ranks"].items() if k in plants} == plants
    want = outputs(arch, load_float32(arch, tuned))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = outputs(arch, load_peft_adapter(load_float32(arch, base), ad))
    assert rel(got, want) <= 16 * STORAGE_ROUNDOFF[str(dtype).replace("torch.", "")]


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_an_unchanged_model_resaved_in_lower_precision_is_below_the_floor(tmp_path, capsys, low):
    """Regression: bf16 checkpoints read as "nothing changed" for real changes; the converse must hold too:
    a model only re-saved in a lower precision has rank 0 everywhere, and the report says what the floor is."""
    from verification.advise import main

    torch.manual_seed(0)
    model = llama()
    model.save_pretrained(tmp_path / "base")
    model.to(low).save_pretrained(tmp_path / "tuned")
    out = tmp_path / "out"
    assert main([str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["all_below_floor"] and all(l["rank_above_floor"] == 0 for l in report["layers"])
    assert "below its storage-rounding floor" in table
    assert not any(v["changed"] for v in report["vectors"])
    assert main([str(tmp_path / "base"), str(tmp_path / "tuned"), "--quiet", "--extract", str(tmp_path / "ad")]) == 2
    error_line("advise", capsys.readouterr().err, "nothing to extract")  # after the report on stdout


def test_heatmap_for_many_layers(tmp_path):
    from verification.advise import main

    g = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.proj.weight": torch.randn(16, 12, generator=g) for i in range(60)}
    tuned = {
        k: v + (torch.randn(16, 1 + i % 5, generator=g) @ torch.randn(1 + i % 5, 12, generator=g)) * 0.1
        for i, (k, v) in enumerate(base.items())
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    assert (
        main(
            [
                str(tmp_path / "base.safetensors"),
                str(tmp_path / "tuned.safetensors"),
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [l["rank_above_floor"] for l in report["layers"]] == [1 + i % 5 for i in range(60)]
    assert (tmp_path / "out" / "spectra.png").read_bytes()[:4] == b"\x89PNG"


def test_budget_allocation_beside_a_uniform_rank(tmp_path, capsys):
    """--budget: the allocation's measured error is at most the uniform rank's at the same budget, both are
    written, and --extract writes the allocated ranks."""
    from verification.advise import main

    base, tuned, plants = build_pair("llama", tmp_path, torch.float32, sharded=False)
    out, ad = tmp_path / "out", tmp_path / "ad"
    budget = 2 * sum(r * sum(logical_weight(llama(), n).shape) for n, r in plants.items()) // 3
    assert (
        main([str(base), str(tuned), "--out", str(out), "--budget", str(budget), "--extract", str(ad), "--quiet"]) == 0
    )
    assert "uniform rank" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    al = report["allocation"]
    assert al["parameters"] <= budget and al["uniform"]["parameters"] <= budget
    assert al["relative_error"] <= al["uniform"]["relative_error"]
    # the measured error is the Eckart-Young tail of the spectra at those ranks
    layers = {l["name"]: l for l in report["layers"]}
    num = sum(layers[n]["frobenius_tail"][r] ** 2 for n, r in al["ranks"].items())
    den = sum(l["frobenius_tail"][0] ** 2 for l in layers.values())
    assert al["relative_error"] == pytest.approx((num / den) ** 0.5, rel=1e-12)
    written = json.loads((ad / "lora_theory_export.json").read_text())
    assert written["requested_ranks"] == {k: v for k, v in al["ranks"].items() if v}


def test_an_architecture_transformers_cannot_build_is_read_generically_with_a_warning(tmp_path, capsys):
    from verification.advise import main

    base, tuned, _ = build_pair("mlp", tmp_path, torch.float32, sharded=False)
    for folder in (base, tuned):
        (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"], "model_type": "nosuch"}))
    assert main([str(base), str(tuned), "--quiet"]) == 0
    assert "warning: config.json names NoSuchModel" in capsys.readouterr().out
