"""Checkpoint reading (safe: no unpickling) and the ``python -m verification.advise`` command line."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import error_line
from safetensors.torch import save_file

import lora_theory
from lora_theory.errors import InvalidArgumentError
from verification.advise import advise_checkpoints, main
from verification.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_format,
    fnn_from_state_dict,
    read_checkpoint,
)
from verification.models import TorchFNN

torch.set_num_threads(1)


class Payload:
    """Unpickling this runs ``exec`` and creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def state(seed, shapes=(("fc1", 5, 3), ("fc2", 2, 5))):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, o, i in shapes:
        out[f"{name}.weight"] = torch.randn(o, i, generator=g)
        out[f"{name}.bias"] = torch.randn(o, generator=g)
    return out


def pair(tmp_path, fmt="safetensors"):
    base = state(0)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["fc1.weight"] += torch.outer(torch.arange(5.0), torch.ones(3)) / 10  # rank 1
    tuned["fc2.bias"] += 0.5
    paths = []
    for tag, sd in (("base", base), ("tuned", tuned)):
        p = tmp_path / f"{tag}.{fmt}"
        save_file(sd, str(p)) if fmt == "safetensors" else torch.save(sd, p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- reading


def test_formats_are_recognised_by_content(tmp_path):
    sd = state(1)
    save_file(sd, str(tmp_path / "weights.bin"))  # safetensors under a misleading name
    torch.save(sd, tmp_path / "zip.safetensors")  # torch zip under a misleading name
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "arrays.npz", **{k: v.numpy() for k, v in sd.items()})
    expected = {
        "weights.bin": "safetensors",
        "zip.safetensors": "torch",
        "legacy.pt": "torch-legacy",
        "arrays.npz": "npz",
    }
    for name, fmt in expected.items():
        assert checkpoint_format(tmp_path / name) == fmt
        ck = read_checkpoint(tmp_path / name)
        assert ck.format == fmt and set(ck.tensors) == set(sd)
        for k, v in sd.items():
            np.testing.assert_array_equal(ck.tensors[k], v.double().numpy())
            assert ck.tensors[k].dtype == np.float64 and ck.dtypes[k] == "float32"
            assert ck.eps[k] == np.finfo(np.float32).eps


def test_nested_state_dict_bfloat16_and_directory(tmp_path):
    sd = {"w": torch.ones(2, 3, dtype=torch.bfloat16), "n": torch.tensor(3)}
    torch.save({"state_dict": sd, "epoch": 4, "hparams": {"lr": 0.1}}, tmp_path / "lightning.ckpt")
    ck = read_checkpoint(tmp_path / "lightning.ckpt")
    assert ck.source_key == "state_dict" and ck.dtypes == {"w": "bfloat16", "n": "int64"}
    assert ck.eps["w"] == 2.0**-7 and ck.tensors["n"].dtype == np.int64
    shards = tmp_path / "model"
    shards.mkdir()
    save_file({"a.weight": torch.ones(2, 2)}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.ones(3, 2)}, str(shards / "model-00002-of-00002.safetensors"))
    ck = read_checkpoint(shards)
    assert ck.format == "directory" and set(ck.tensors) == {"a.weight", "b.weight"}
    save_file({"a.weight": torch.ones(2, 2)}, str(shards / "model-dup.safetensors"))
    with pytest.raises(CheckpointError, match="more than one shard"):
        read_checkpoint(shards)


@pytest.mark.parametrize("kind", ["pickle", "torch-zip", "torch-legacy"])
def test_pickle_payload_is_refused_without_running(tmp_path, kind, refused):
    marker = tmp_path / "payload_ran.txt"
    path = tmp_path / "evil.pt"
    obj = {"w": torch.zeros(2, 2), "x": Payload(marker)}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=(kind == "torch-zip"))
    with pytest.raises(UnsafeCheckpointError, match="refused.*not executed"):
        read_checkpoint(path)
    assert not marker.exists()
    refused("advise", [str(path), str(path)], "not executed")
    assert not marker.exists()
    # the payload is real: an unrestricted unpickler would have run it
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("a text file, not weights")
    (tmp_path / "empty.bin").write_bytes(b"")
    import zipfile

    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as zf:
        zf.writestr("readme.md", "hello")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "hparams.pt")
    (tmp_path / "dir").mkdir()
    np.savez(tmp_path / "obj.npz", w=np.array([{"a": 1}], dtype=object))
    cases = {
        "notes.txt": "not a checkpoint",
        "empty.bin": "not a checkpoint",
        "docs.zip": "zip archive",
        "tensor.pt": "single tensor",
        "hparams.pt": "holds no tensors",
        "missing.pt": "no such file",
        "dir": "without",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(tmp_path / name)
    with pytest.raises(UnsafeCheckpointError, match="object arrays"):
        read_checkpoint(tmp_path / "obj.npz")
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes((1000).to_bytes(8, "little") + b"{" + b"x" * 2000)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(bad)


def test_fnn_from_state_dict(tmp_path):
    fnn = lora_theory.random_fnn(4, 3, seed=0)
    save_file({k: v.contiguous() for k, v in TorchFNN.from_numpy(fnn).state_dict().items()}, str(tmp_path / "m.st"))
    back = fnn_from_state_dict(read_checkpoint(tmp_path / "m.st"))
    for a, b in zip(back.weights + back.biases, fnn.weights + fnn.biases):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match="layers.0.weight"):
        fnn_from_state_dict({"fc.weight": np.eye(2)})
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        fnn_from_state_dict({"layers.0.weight": np.eye(2), "head.weight": np.eye(2)})
    with pytest.raises(CheckpointError, match="plain width-D MLP"):
        fnn_from_state_dict({"layers.0.weight": np.ones((2, 3))})


# ----------------------------------------------------------------------------- advising checkpoints


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_advise_checkpoints(tmp_path, fmt):
    report = advise_checkpoints(*pair(tmp_path, fmt))
    assert report.exact_ranks == {"fc1": 1, "fc2": 0}
    assert [a.bias_changed for a in report.layers] == [False, True]
    assert report.layer("fc1").storage_dtype == "float32"


def test_mismatched_architectures(tmp_path):
    save_file(state(0), str(tmp_path / "a.safetensors"))
    save_file(state(0, (("fc1", 5, 3),)), str(tmp_path / "b.safetensors"))
    save_file(state(0, (("fc1", 5, 4), ("fc2", 2, 5))), str(tmp_path / "c.safetensors"))
    sd = state(0)
    sd["fc2.weight"] = sd["fc2.weight"].to(torch.int32)
    save_file(sd, str(tmp_path / "d.safetensors"))
    with pytest.raises(InvalidArgumentError, match=r"missing from tuned: \['fc2.bias', 'fc2.weight'\]"):
        advise_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    with pytest.raises(InvalidArgumentError, match=r"has shape \(5, 4\) but base has \(5, 3\)"):
        advise_checkpoints(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    with pytest.raises(InvalidArgumentError, match="non-float tensor"):
        advise_checkpoints(tmp_path / "a.safetensors", tmp_path / "d.safetensors")


# ----------------------------------------------------------------------------- command line


def test_cli_writes_report_plot_and_proposal(tmp_path, capsys):
    base, tuned = pair(tmp_path)
    out = tmp_path / "out"
    assert main([str(base), str(tuned), "--out", str(out), "--energy", "0.9"]) == 0
    table = capsys.readouterr().out
    assert "fc1" in table and "1/3" in table and "energy 90%" in table and "Theorems 3 and 6" in table
    assert "5 x 3" in table  # shapes as out x in
    report = json.loads((out / "report.json").read_text())
    assert [(l["name"], l["exact_rank"]) for l in report["layers"]] == [("fc1", 1), ("fc2", 0)]
    assert isinstance(report["layers"][0]["singular_values"], list)
    proposal = json.loads((out / "peft_rank_pattern.json").read_text())
    assert proposal["lora_config"]["rank_pattern"] == {"fc1": 1, "fc2": 1}
    assert proposal["bias_only"] == ["fc2"]
    assert (out / "spectra.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors(tmp_path, refused):
    base, _ = pair(tmp_path)
    (tmp_path / "x.txt").write_text("nope")
    refused("advise", [str(base), str(tmp_path / "x.txt")], "not a checkpoint")
    refused("advise", [str(base), str(base), "--tol", "-1"], "tol")


def test_cli_fnn_mode_exports_a_peft_adapter(tmp_path, capsys, refused):
    D = 6
    frozen = lora_theory.random_fnn(D, 4, seed=1)
    target = lora_theory.random_fnn(D, 2, seed=2)
    for tag, m in (("frozen", frozen), ("target", target)):
        sd = TorchFNN.from_numpy(m).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{tag}.safetensors"))
    out = tmp_path / "out"
    args = [
        str(tmp_path / "frozen.safetensors"),
        str(tmp_path / "target.safetensors"),
        "--fnn",
        "--out",
        str(out),
        "--input-radius",
        "2",
        "--dtype",
        "float64",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "LoRA-rank needed 3 (Theorem 3)" in text and "ceil(D / floor(L / L̄)) = 3" in text
    record = json.loads((out / "report.json").read_text())
    assert record["advice"]["uniform_rank"] == 3 and record["export"]["exact"] is True
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3
    assert main([args[0], args[0], "--fnn"]) == 0  # same depth: rank 0 needed
    assert "LoRA-rank needed 0" in capsys.readouterr().out
    refused("advise", [args[1], args[0], "--fnn"], "target")  # target deeper than frozen


def _fnn_pair(tmp_path, D=6):
    frozen = lora_theory.random_fnn(D, 4, seed=1)
    target = lora_theory.random_fnn(D, 2, seed=2)
    for tag, m in (("frozen", frozen), ("target", target)):
        sd = TorchFNN.from_numpy(m).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{tag}.safetensors"))
    return str(tmp_path / "frozen.safetensors"), str(tmp_path / "target.safetensors")


@pytest.mark.parametrize(
    "radius,dtype,why",
    [
        (1e100, "float32", "beyond float32's range"),  # the adapter held inf and PEFT gave NaN
        (1e150, "float64", "not exact on the ball"),  # lora_fnn's checked claim: exact=False
        (1e300, "float64", "beyond what float64 can carry"),  # gamma overflowed; lora_fnn now refuses the scale
        (1e6, "float32", "does not hold as written"),  # off by 8.45 relative on the unit ball
        (2.0, "float16", "no useful error bound"),  # float16 wrote inf (or garbage) silently
    ],
)
def test_fnn_export_that_does_not_hold_is_refused_and_nothing_is_written(tmp_path, capsys, radius, dtype, why):
    """Regression: ``advise --fnn --input-radius R --out`` wrote a broken adapter and exited 0."""
    frozen, target = _fnn_pair(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([frozen, target, "--fnn", "--out", str(out), "--input-radius", str(radius), "--dtype", dtype]) == 2
    error_line("advise", capsys.readouterr().err, why)  # after the table of the advice on stdout
    assert not (out / "peft_adapter").exists()
    assert not [p for p in out.iterdir() if "tmp" in p.name] if out.exists() else True


@pytest.mark.parametrize("radius,dtype", [(2.0, "float32"), (2.0, "float64"), (1e6, "float64")])
def test_fnn_export_that_holds_records_its_check_and_its_base(tmp_path, capsys, radius, dtype):
    from verification.peft_export import AdapterBaseError, check_base

    frozen, target = _fnn_pair(tmp_path)
    out = tmp_path / "out"
    assert main([frozen, target, "--fnn", "--out", str(out), "--input-radius", str(radius), "--dtype", dtype]) == 0
    record = json.loads((out / "report.json").read_text())["export"]
    check = record["written_check"]
    assert check["holds"] and check["dtype"] == dtype
    assert check["max_relative_error"] <= check["tolerance"] < 1
    assert check["max_error_to_target"] <= check["allowed_error_to_target"]
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(frozen).resolve())
    check_base(out / "peft_adapter", frozen)  # the right base passes
    with pytest.raises(AdapterBaseError):
        check_base(out / "peft_adapter", _other_base(tmp_path))


def _other_base(tmp_path):
    other = lora_theory.random_fnn(6, 4, seed=9)  # same shapes, other weights
    sd = TorchFNN.from_numpy(other).state_dict()
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def test_a_refused_export_into_advise_s_own_folder_keeps_the_earlier_adapter(tmp_path, capsys):
    """A rerun into the same --out replaces the adapter only once the new one holds; a refused one leaves the
    earlier adapter byte-identical."""
    frozen, target = _fnn_pair(tmp_path)
    out = tmp_path / "out"
    assert main([frozen, target, "--fnn", "--out", str(out), "--input-radius", "1"]) == 0
    files = {p.name: p.read_bytes() for p in (out / "peft_adapter").iterdir()}
    assert main([frozen, target, "--fnn", "--out", str(out), "--input-radius", "2"]) == 0  # replaced
    assert main([frozen, target, "--fnn", "--out", str(out), "--input-radius", "1e6"]) == 2  # refused
    assert "does not hold as written" in capsys.readouterr().err
    assert {p.name for p in (out / "peft_adapter").iterdir()} == set(files)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".peft_adapter")) == []
    record = json.loads((out / "report.json").read_text())
    assert record["export"]["input_radius"] == 2.0


# ----------------------------------------------------------------------------- --spectrum


def _spectrum_pair(tmp_path):
    """float32 layers (no config.json: read as ``nn.Linear``): ``low`` 320 x 288 with a planted rank-3 change,
    ``small`` 40 x 24 with rank 2 (short side below 256), ``dense`` 288 x 272 with a full-rank change."""
    g = torch.Generator().manual_seed(3)
    base = {
        "low.weight": torch.randn(320, 288, generator=g),
        "small.weight": torch.randn(40, 24, generator=g),
        "dense.weight": torch.randn(288, 272, generator=g),
    }
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["low.weight"] += 0.1 * torch.randn(320, 3, generator=g) @ torch.randn(3, 288, generator=g)
    tuned["small.weight"] += 0.1 * torch.randn(40, 2, generator=g) @ torch.randn(2, 24, generator=g)
    tuned["dense.weight"] += 0.1 * torch.randn(288, 272, generator=g)
    for tag, sd in (("base", base), ("tuned", tuned)):
        save_file(sd, str(tmp_path / f"{tag}.safetensors"))
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), {"low": 3, "small": 2}


def _layers_with(tmp_path, base, tuned, spectrum, capsys):
    out = tmp_path / spectrum
    assert main([base, tuned, "--spectrum", spectrum, "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    return {l["name"]: l for l in json.loads((out / "report.json").read_text())["layers"]}, table


def test_cli_spectrum_partial_and_auto_give_the_full_spectrum_s_ranks(tmp_path, capsys):
    """``--spectrum partial`` settles the low-rank layers at the full spectrum's ranks and leaves the full-rank
    change as an interval that holds it; ``auto`` takes the full spectrum where the partial one is unsettled
    or the short side is below 256, and says so per layer in report.json."""
    from verification.streaming import PARTIAL_MIN_SIDE

    base, tuned, planted = _spectrum_pair(tmp_path)
    full, _ = _layers_with(tmp_path, base, tuned, "full", capsys)
    assert all(l["spectrum"] == "full" and l["settled"] for l in full.values())
    for name, r in planted.items():
        assert full[name]["rank_above_floor"] == r
    rank = {name: l["rank_above_floor"] for name, l in full.items()}
    assert rank["dense"] == 272  # a full-rank change: a partial spectrum cannot settle it

    partial, table = _layers_with(tmp_path, base, tuned, "partial", capsys)
    assert all(l["spectrum"] == "partial" for l in partial.values())
    for name, l in partial.items():
        lo, hi = l["rank_bounds"]
        assert lo <= rank[name] <= hi
        if l["settled"]:
            assert l["rank_above_floor"] == rank[name]
    assert partial["low"]["settled"] and partial["small"]["settled"]
    assert not partial["dense"]["settled"] and "(unsettled)" in table

    auto, table = _layers_with(tmp_path, base, tuned, "auto", capsys)
    assert {name: l["rank_above_floor"] for name, l in auto.items()} == rank
    assert all(l["settled"] for l in auto.values())
    assert auto["low"]["spectrum"] == "partial" and auto["low"]["spectrum_note"] is None
    assert auto["small"]["spectrum"] == "full"
    assert f"short side below {PARTIAL_MIN_SIDE}" in auto["small"]["spectrum_note"]
    assert auto["dense"]["spectrum"] == "full"
    assert "partial spectrum unsettled" in auto["dense"]["spectrum_note"]
    assert "full spectrum for 1 layers whose partial count was not settled" in table


@pytest.mark.parametrize("extra", [[], ["--fnn"]])
def test_cli_refuses_a_bad_spectrum_value_in_one_line(tmp_path, capsys, extra):
    base, tuned = pair(tmp_path)
    assert main([str(base), str(tuned), "--spectrum", "exact", *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--spectrum" in err[0] and "auto, full, partial" in err[0], err
    assert captured.out == ""
