"""``python -m verification.pretraining``: the discrepancy spectra of the sweeps' own random and pretrained
frozen models (THEORY.md §2.6), paired by seed."""

import json

import numpy as np
import pytest

import lora_theory
from verification import TOOLS, pretraining
from verification.experiment import Problems


def _run(tmp_path, argv, name="out"):
    out = tmp_path / name
    assert pretraining.main(["--quick", "--out", str(out)] + argv) == 0
    return out, json.loads((out / "summary.json").read_text())


def _expected_spectra(structure, seed):
    """The SVDs of the matched discrepancies, from the models an experiment sweep of this structure uses."""
    problems = Problems()
    problems.prepare(structure, [0, 1, 2])
    target = problems.target(structure, seed)
    out = {}
    for kind in ("random", "pretrained"):
        frozen = problems.frozen(structure, kind, seed)
        if structure[0] == "fnn":
            E = lora_theory.block_discrepancies(frozen, target)
        else:
            E = list(lora_theory.tfn_matched_discrepancies(frozen, target).values())
        out[kind] = [np.linalg.svd(e, compute_uv=False) for e in E]
    return out


@pytest.mark.parametrize("model,structure,names", [
    ("fnn", ("fnn", 4, 4, 2, "relu", True), ["E_1 (layers 1-2)", "E_2 (layers 3-4)"]),
    ("tfn", ("tfn", 4, 2, 2, 10), ["qk[0,0]", "ov[0,0]", "qk[0,1]", "ov[0,1]",
                                   "qk[1,0]", "ov[1,0]", "qk[1,1]", "ov[1,1]", "out"]),
])
def test_spectra_are_those_of_the_sweeps_models_and_pair_by_seed(model, structure, names, tmp_path, capsys):
    out, summary = _run(tmp_path, ["--model", model])
    assert (out / "figure.png").stat().st_size > 0 and summary["structure"] == list(structure)
    assert [row["name"] for row in summary["discrepancies"]] == names
    assert summary["seeds"] == [0, 1, 2] and len(summary["pretrain_info"]) == 3
    for seed in summary["seeds"]:
        expected = _expected_spectra(structure, seed)
        for kind in ("random", "pretrained"):
            for row, s in zip(summary["discrepancies"], expected[kind]):
                np.testing.assert_allclose(row[kind][seed], s, rtol=1e-12, atol=1e-15)
    for row in summary["discrepancies"]:
        rand, pre = np.array(row["random"]), np.array(row["pretrained"])      # (3, 4) each
        assert np.all(np.diff(rand, axis=1) <= 0) and np.all(np.diff(pre, axis=1) <= 0)
        assert row["pretrained_lower"] == (pre < rand).sum(0).tolist()
        np.testing.assert_allclose(row["median_ratio"], np.median(pre / rand, 0), rtol=1e-12)
        np.testing.assert_allclose(row["median_random"], np.median(rand, 0), rtol=1e-12)
        # rank R leaves σ_{MR+1} (M factors per chain: two here for the FNN's blocks and every TFN chain)
        assert row["factors"] == 2 and row["rank_leaving"] == [0, None, 1, None]
    # pretraining moved every frozen parameter, and the table says so
    assert all(c["median"] > 0 for c in summary["parameter_change"].values())
    printed = capsys.readouterr().out
    assert "paired by seed" in printed and names[-1] in printed and "median ratio" in printed


def test_a_rerun_reads_the_pretrained_models_back(tmp_path, monkeypatch, capsys):
    out, first = _run(tmp_path, ["--model", "fnn", "--no-figure"])
    from verification import experiment

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the pretrained models were trained again")

    monkeypatch.setattr(experiment, "pretrain", no_pretraining)
    monkeypatch.setattr(experiment, "pretrain_fnns", no_pretraining)
    _, again = _run(tmp_path, ["--model", "fnn", "--no-figure"])
    assert again["discrepancies"] == first["discrepancies"]
    assert not (out / "figure.png").exists()


@pytest.mark.parametrize("argv,match", [
    (["--depth", "2", "--target-depth", "3"], "--target-depth"),
    (["--seeds", "0"], "--seeds"),
    (["--width", "0"], "--width"),
    (["--model", "tfn", "--target-depth", "1"], "--target-depth"),
    (["--model", "cnn"], "--model"),
    (["--heads", "x"], "--heads"),
])
def test_bad_input_exits_with_one_line(argv, match, tmp_path, capsys):
    out = tmp_path / "bad"
    assert pretraining.main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (out / "summary.json").exists()


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert pretraining.main(["--quick", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0]


def test_listed_as_a_tool():
    assert "pretraining" in TOOLS
