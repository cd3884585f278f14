"""The construction column of final_layers and depth_sweep comes from the high-precision path where float64
is not honest (THEORY.md §2.3, §3): exact from the threshold on, not before, digits and subsample recorded."""

import csv
import json

import lora_theory
from verification import depth_sweep, final_layers
from verification.sweep import HIGHPREC_QUICK_SUBSAMPLE, MAX_HONEST_BLOCK, Cell, highprec_estimate

RUN = ["--quick", "--seeds", "1", "--frozen", "random", "--iterations", "20", "--no-figure"]
EXACT = 1e-20  # MSE relative to the target's output power, from the threshold on: exact up to float64 rounding


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_final_layers_quick_fills_the_construction_column(tmp_path, capsys):
    out = tmp_path / "fl"
    assert final_layers.main(RUN + ["--ranks", "1,2", "--layers", "1", "--out", str(out)]) == 0
    summary = _summary(out)
    threshold = summary["threshold"]
    assert threshold == lora_theory.fnn_rank_threshold(16, 8, 1) == 2
    lora = [r for r in summary["rows"] if r["label"] == "lora"]
    assert [r["rank"] for r in lora] == [1, 2]
    for row in lora:
        mse, power = row["construction_test_mse"], row["target_power"]
        assert mse is not None and row["construction_shifted_mse"] is not None
        assert row["construction_subsample"] == HIGHPREC_QUICK_SUBSAMPLE
        assert isinstance(row["construction_precision_digits"], int) and row["construction_precision_digits"] > 16
        assert row["construction_note"].startswith("n/c (κ=")  # the float64 verdict is kept
        assert row["construction_kappa"] > 0
        if row["rank"] >= threshold:
            assert mse <= EXACT * power and row["construction_shifted_mse"] <= EXACT * 25 * power
        else:
            assert mse > EXACT * power
        assert row["per_seed"][0]["construction_precision_digits"] == row["construction_precision_digits"]
    for row in summary["rows"]:
        if row["label"] == "final_layers":
            assert row["construction_test_mse"] is None and row["construction_precision_digits"] is None
    with open(out / "summary.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert {"construction_precision_digits", "construction_subsample"} <= set(csv_rows[0])
    captured = capsys.readouterr()
    assert "high precision" in captured.out and "*" in captured.out
    assert "constructions in high precision" in captured.err  # the pre-run estimate


def test_no_highprec_keeps_the_float64_verdict(tmp_path):
    out = tmp_path / "fl"
    assert final_layers.main(RUN + ["--ranks", "2", "--layers", "1", "--no-highprec", "--out", str(out)]) == 0
    row = next(r for r in _summary(out)["rows"] if r["label"] == "lora")
    assert row["construction_test_mse"] is None and row["construction_precision_digits"] is None
    assert row["construction_note"].startswith("n/c (κ=")


def test_depth_sweep_deep_block_is_exact_at_its_threshold(tmp_path):
    out = tmp_path / "ds"
    assert depth_sweep.main(RUN + ["--depths", "6", "--ranks", "3", "--out", str(out)]) == 0
    summary = _summary(out)
    assert summary["threshold"] == {"6": 3}
    (row,) = summary["rows"]
    assert (
        row["construction_precision_digits"] is not None and row["construction_subsample"] == HIGHPREC_QUICK_SUBSAMPLE
    )
    assert row["construction_test_mse"] <= EXACT * row["target_power"]


def test_bad_subsample_exits_with_one_line(tmp_path, refused):
    out = tmp_path / "bad"
    line = refused("final_layers", RUN + ["--highprec-subsample", "0", "--out", str(out)])
    assert line.startswith("python -m verification.final_layers: error: --highprec-subsample must be in 1..5000")
    assert not (out / "summary.json").exists()


def test_estimate_counts_only_blocks_float64_cannot_do():
    def cell(L, n):
        return Cell(
            kind="random",
            structure=("fnn", 16, L, 1, "relu", True),
            method="lora",
            axis=(("rank", 1),),
            ranks=(1,) * L,
            highprec_subsample=n,
        )

    assert highprec_estimate([cell(MAX_HONEST_BLOCK, 256)], 5) == (0, 0.0)
    assert highprec_estimate([cell(8, 0)], 5) == (0, 0.0)
    count, seconds = highprec_estimate([cell(8, 256), cell(14, 256)], 5)
    assert count == 10 and seconds > 0
    assert highprec_estimate([cell(14, 256)], 5)[1] > highprec_estimate([cell(8, 256)], 5)[1]


def test_resume_with_highprec_adds_the_column_to_a_sweep_trained_without_it(tmp_path, monkeypatch):
    """A sweep trained with --no-highprec (e.g. on a GPU) gets its high-precision column from a later
    ``--resume DIR --highprec``, without training again; the constructions are kept in constructions.jsonl
    and a further resume reuses them instead of rebuilding."""
    from verification.sweep import constructions

    out = tmp_path / "ds"
    args = RUN + ["--depths", "6", "--ranks", "3", "--workers", "1"]
    assert depth_sweep.main(args + ["--no-highprec", "--out", str(out)]) == 0
    (row,) = _summary(out)["rows"]
    assert row["construction_test_mse"] is None and row["construction_note"].startswith("n/c (κ=")
    runs = (out / "runs.jsonl").read_text()

    assert depth_sweep.main(["--resume", str(out), "--highprec", "--workers", "1"]) == 0
    assert (out / "runs.jsonl").read_text() == runs  # nothing trained again
    (row,) = _summary(out)["rows"]
    assert row["construction_subsample"] == HIGHPREC_QUICK_SUBSAMPLE
    assert row["construction_test_mse"] <= EXACT * row["target_power"]
    cached = (out / "constructions.jsonl").read_text().splitlines()
    assert len(cached) == 1

    def rebuilt(*a, **k):
        raise AssertionError("a cached high-precision construction was rebuilt")

    monkeypatch.setattr(constructions, "_highprec_construction", rebuilt)
    assert depth_sweep.main(["--resume", str(out), "--highprec", "--workers", "1"]) == 0
    (again,) = _summary(out)["rows"]
    assert again["construction_test_mse"] == row["construction_test_mse"]
    assert (out / "constructions.jsonl").read_text().splitlines() == cached
    # the column asked for on a resume stays the folder's: a plain resume keeps it (from the cache), and a
    # line cut by an interruption does not swallow the next record
    with open(out / "constructions.jsonl", "a") as f:
        f.write('{"key": "cut-off", "constr')
    assert depth_sweep.main(["--resume", str(out), "--workers", "1"]) == 0
    (plain,) = _summary(out)["rows"]
    assert plain["construction_test_mse"] == row["construction_test_mse"]
    assert (out / "constructions.jsonl").read_text().splitlines()[:1] == cached


def test_highprec_constructions_in_processes_equal_the_serial_ones(tmp_path):
    out1, out2 = tmp_path / "one", tmp_path / "two"
    args = RUN + ["--depths", "6", "--ranks", "1,3"]
    assert depth_sweep.main(args + ["--workers", "1", "--out", str(out1)]) == 0
    assert depth_sweep.main(args + ["--workers", "2", "--out", str(out2)]) == 0
    for a, b in zip(_summary(out1)["rows"], _summary(out2)["rows"]):
        assert a["construction_test_mse"] == b["construction_test_mse"]
        assert a["construction_precision_digits"] == b["construction_precision_digits"]


def test_tfn_highprec_column_is_exact_from_the_threshold_and_keeps_the_float64_value(tmp_path, capsys):
    """``tfn --highprec``: Theorem 7's construction at raised precision, exact (relative 1e-20 and far below)
    from ceil(D/2) on and not before; the float64 MSE stays in the note. Off by default."""
    from verification import tfn

    out = tmp_path / "tfn"
    argv = [
        "--quick",
        "--seeds",
        "1",
        "--frozen",
        "random",
        "--construction-only",
        "--no-figure",
        "--workers",
        "1",
        "--highprec-subsample",
        "4",
    ]
    assert tfn.main(argv + ["--highprec", "--out", str(out)]) == 0
    rows = _summary(out)["rows"]
    assert [r["rank"] for r in rows] == [1, 8]
    for row in rows:
        assert row["construction_subsample"] == 4 and row["construction_precision_digits"] >= 30
        assert row["construction_note"].startswith("float64: test ")
        if row["rank"] >= lora_theory.tfn_rank_threshold(16):
            assert row["construction_test_mse"] <= EXACT * row["target_power"]
            assert row["construction_shifted_mse"] <= EXACT * 25 * row["target_power"]
        else:
            assert row["construction_test_mse"] > EXACT * row["target_power"]
    assert "float64 weights carry" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert tfn.main(argv[:-2] + ["--ranks", "8", "--out", str(plain)]) == 0
    (row,) = _summary(plain)["rows"]
    assert row["construction_precision_digits"] is None and row["construction_note"] is None


def test_subsample_without_the_high_precision_column_is_refused(tmp_path, refused):
    out = tmp_path / "t"
    refused("tfn", ["--quick", "--highprec-subsample", "4", "--out", str(out)], "add --highprec")
    assert not out.exists()
