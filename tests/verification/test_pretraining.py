"""``python -m verification.pretraining``: the discrepancy spectra of the sweeps' own random and pretrained
frozen models (THEORY.md §2.6), paired by seed."""

import json

import numpy as np
import pytest

import lora_theory
from verification import TOOLS, pretraining, sweep
from verification.sweep import Problems, problems


def _run(tmp_path, argv, name="out"):
    out = tmp_path / name
    assert pretraining.main(["--quick", "--out", str(out)] + argv) == 0
    return out, json.loads((out / "summary.json").read_text())


def _expected_spectra(problems, structure, seed):
    """The SVDs of the matched discrepancies, from the models an experiment sweep of this structure uses."""
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


@pytest.mark.parametrize(
    "model,structure,names",
    [
        ("fnn", ("fnn", 4, 4, 2, "relu", True), ["E_1 (layers 1-2)", "E_2 (layers 3-4)"]),
        ("linear", ("fnn", 4, 2, 1, "linear", True), ["E_1 (layers 1-2)"]),
        (
            "tfn",
            ("tfn", 4, 2, 2, 10),
            ["qk[0,0]", "ov[0,0]", "qk[0,1]", "ov[0,1]", "qk[1,0]", "ov[1,0]", "qk[1,1]", "ov[1,1]", "out"],
        ),
    ],
)
def test_spectra_are_those_of_the_sweeps_models_and_pair_by_seed(model, structure, names, tmp_path, capsys):
    out, summary = _run(tmp_path, ["--model", model])
    assert (out / "figure.png").stat().st_size > 0 and summary["structure"] == list(structure)
    assert [row["name"] for row in summary["discrepancies"]] == names
    assert summary["seeds"] == [0, 1, 2] and len(summary["pretrain_info"]) == 3
    problems = Problems()  # as an experiment sweep builds its models
    problems.prepare(structure, summary["seeds"])
    for seed in summary["seeds"]:
        expected = _expected_spectra(problems, structure, seed)
        for kind in ("random", "pretrained"):
            for row, s in zip(summary["discrepancies"], expected[kind]):
                np.testing.assert_allclose(row[kind][seed], s, rtol=1e-12, atol=1e-15)
    for row in summary["discrepancies"]:
        rand, pre = np.array(row["random"]), np.array(row["pretrained"])  # (3, 4) each
        assert np.all(np.diff(rand, axis=1) <= 0) and np.all(np.diff(pre, axis=1) <= 0)
        assert row["pretrained_lower"] == (pre < rand).sum(0).tolist()
        np.testing.assert_allclose(row["median_ratio"], np.median(pre / rand, 0), rtol=1e-12)
        np.testing.assert_allclose(row["median_random"], np.median(rand, 0), rtol=1e-12)
        # rank R leaves σ_{MR+1} (M factors per chain: two here for the FNN's blocks and every TFN chain)
        assert row["factors"] == 2 and row["rank_leaving"] == [0, None, 1, None]
    # pretraining moved every frozen parameter it trains, and the table says so (a linear model has no biases)
    assert all(c["median"] > 0 for c in summary["parameter_change"].values())
    assert any(name.startswith("b") for name in summary["parameter_change"]) == (structure[4] != "linear")
    printed = capsys.readouterr().out
    assert "paired by seed" in printed and names[-1] in printed and "median ratio" in printed


def test_a_block_of_three_layers_leaves_every_third_singular_value(tmp_path):
    """L = 5, L̄ = 2: the uniform partition has a block of 3 layers, where rank R leaves σ_{3R+1}."""
    _, summary = _run(tmp_path, ["--depth", "5", "--target-depth", "2", "--no-figure"])
    sizes = lora_theory.uniform_partition(5, 2)
    assert [row["factors"] for row in summary["discrepancies"]] == list(sizes)
    for row, M in zip(summary["discrepancies"], sizes):
        assert row["rank_leaving"] == [(k - 1) // M if (k - 1) % M == 0 else None for k in range(1, 5)]
    assert [row["rank_leaving"] for row in summary["discrepancies"] if row["factors"] == 3] == [[0, None, None, 1]]


def test_ratios_at_rounding_level():
    """Values at rounding level count as 0: a pair of zeros has no ratio (fewer seeds), a positive value
    over a zero an infinite one, which the median keeps."""
    rand = np.array([[1.0, 0.5, 1e-20], [1.0, 0.5, 1e-20], [1.0, 0.5, 0.2]])  # (3 seeds, D = 3)
    pre = np.array([[1.0, 0.4, 1e-19], [1.0, 0.6, 1e-3], [1.0, 0.4, 0.1]])
    result = {
        "names": ["E"],
        "factors": {"E": 1},
        "random": {"E": rand},
        "pretrained": {"E": pre},
        "change": {"W_1": np.array([0.1, 0.2, 0.3])},
    }
    info = {f"seed {s}": {"steps": 10, "first_loss": 3.0, "last_loss": 0.9} for s in range(3)}
    row = pretraining.summarize(("fnn", 3, 1, 1, "relu", True), [0, 1, 2], result, info)["discrepancies"][0]
    assert row["ratio_seeds"] == [3, 3, 2]  # seed 0's σ_3: both at rounding level
    assert row["median_ratio"][2] == pytest.approx(np.median([np.inf, 0.5]))
    assert row["pretrained_lower"] == [0, 2, 1]
    assert row["median_ratio"][1] == pytest.approx(0.8)


def test_capped_pretraining_is_reported(capsys):
    rand = np.ones((2, 2))
    result = {
        "names": ["E"],
        "factors": {"E": 2},
        "random": {"E": rand},
        "pretrained": {"E": rand / 2},
        "change": {"W_1": np.array([0.1, 0.2])},
    }
    info = {
        "seed 0": {"steps": sweep.PRETRAIN_MAX_STEPS, "first_loss": 3.0, "last_loss": 1.5},
        "seed 1": {"steps": 12, "first_loss": 3.0, "last_loss": 0.9},
    }
    summary = pretraining.summarize(("fnn", 2, 2, 1, "relu", True), [0, 1], result, info)
    assert summary["capped"] == ["seed 0"]
    assert "step limit" in pretraining.format_table(summary) and "1 of 2 seeds" in pretraining.format_table(summary)


def test_protocol_text_states_the_constants():
    assert sweep.PRETRAIN_LR == 1e-3 and sweep.PRETRAIN_FACTOR == pytest.approx(1 / 3)
    assert sweep.PRETRAIN_MAX_STEPS == 1000
    assert sweep.PRETRAINING_PROTOCOL == (
        "Adam lr 1e-3, fresh 256-batches, float64, until loss < first/3 (<= 1000 steps)"
    )


def test_a_rerun_reads_the_pretrained_models_back(tmp_path, monkeypatch, capsys):
    out, first = _run(tmp_path, ["--model", "fnn"])
    assert (out / "figure.png").exists()

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the pretrained models were trained again")

    monkeypatch.setattr(problems, "pretrain", no_pretraining)
    monkeypatch.setattr(problems, "pretrain_fnns", no_pretraining)
    _, again = _run(tmp_path, ["--model", "fnn", "--no-figure"])
    assert again["discrepancies"] == first["discrepancies"]
    assert not (out / "figure.png").exists()  # no stale figure beside the new summary


@pytest.mark.parametrize(
    "setup,match",
    [
        ("sweep", "holds the files of 'fnn'"),
        ("other_tool", "not a pretraining folder"),
        ("other_settings", "pretraining run for"),
    ],
)
def test_an_out_folder_of_something_else_is_refused(setup, match, tmp_path, refused):
    out = tmp_path / "out"
    out.mkdir()
    if setup == "sweep":
        (out / "config.json").write_text(json.dumps({"experiment": "fnn"}))
    elif setup == "other_tool":
        (out / "summary.json").write_text(json.dumps({"experiment": "fnn", "rows": []}))
    else:
        (out / "summary.json").write_text(
            json.dumps({"tool": "pretraining", "structure": ["tfn", 4, 2, 2, 10], "seeds": [0, 1, 2]})
        )
    before = {p.name: p.read_text() for p in out.iterdir()}
    refused("pretraining", ["--quick", "--out", str(out)], match)
    assert {p.name: p.read_text() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--depth", "2", "--target-depth", "3"], "--target-depth"),
        (["--seeds", "0"], "--seeds"),
        (["--width", "0"], "--width"),
        (["--model", "tfn", "--target-depth", "1"], "--target-depth"),
        (["--model", "linear", "--target-depth", "1"], "--target-depth"),
        (["--model", "linear", "--heads", "2"], "--heads"),
        (["--model", "cnn"], "--model"),
        (["--heads", "x"], "--heads"),
        (["--heads", "2"], "--heads"),
        (["--quick", "--seeds", "0"], "--seeds"),
    ],
)
def test_bad_input_exits_with_one_line(argv, match, tmp_path, refused):
    out = tmp_path / "bad"
    refused("pretraining", argv + ["--out", str(out)], match)
    assert not (out / "summary.json").exists()


def test_unwritable_out(tmp_path, refused):
    blocker = tmp_path / "file"
    blocker.write_text("")
    refused("pretraining", ["--quick", "--out", str(blocker / "sub")], "--out")


def test_listed_as_a_tool():
    assert "pretraining" in TOOLS
