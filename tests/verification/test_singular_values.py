"""The controlled-singular-values experiment: E has the prescribed spectrum, and the construction's MSE is
Lemma 1's optimum Σ_{k>2R} σ_k² / D (empirically on the test set, and within sampling error in expectation)."""

import argparse
import csv
import json
import math

import numpy as np
import pytest

from verification import EXPERIMENTS, TOOLS, singular_values
from verification.__main__ import main as list_main
from verification.sweep import evaluation_sets, make_random_frozen

RUN = ["--quick", "--seeds", "1", "--iterations", "20", "--no-figure"]


def _run(tmp_path, extra):
    out = tmp_path / "sv"
    assert singular_values.main(RUN + extra + ["--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def _problem(spectrum=None, decay=None, seed=0, width=16):
    args = argparse.Namespace(width=width, spectrum=spectrum, decay=decay)
    structure = ("fnn", width, 2, 1, "linear", True)
    frozen = make_random_frozen(structure, seed)
    return structure, frozen, singular_values.make_target(args, structure, seed), singular_values.spectrum(args)


def test_target_has_the_prescribed_discrepancy_spectrum():
    _, frozen, target, sigma = _problem(decay=0.5)
    E = target.weights[0] - frozen.linear_map()
    np.testing.assert_allclose(np.linalg.svd(E, compute_uv=False), sigma, rtol=1e-12, atol=1e-14)
    assert sigma[0] == 1.0 and sigma[3] == 0.125


def test_quick_run_construction_is_the_optimum(tmp_path, capsys):
    out, summary = _run(tmp_path, ["--ranks", "1,3,8"])
    assert summary["experiment"] == "singular_values" and summary["threshold"] == 8
    assert summary["pretrained_rows"] == []  # the spectrum is prescribed for the random frozen model
    sigma = np.array(summary["spectrum"])
    np.testing.assert_allclose(sigma, 0.7 ** np.arange(16))
    structure, frozen, target, _ = _problem()
    X = evaluation_sets(structure)["test"].numpy()  # (5000, 16): the construction's test set
    E = target.weights[0] - frozen.linear_map()
    U, s, Vt = np.linalg.svd(E)
    for row in summary["rows"]:
        k = 2 * row["rank"]
        expected = float(np.sum(sigma[k:] ** 2) / 16)
        assert row["prescribed_prediction"] == pytest.approx(expected, rel=1e-12, abs=1e-300)
        assert row["prediction"] == pytest.approx(expected, rel=1e-10, abs=1e-28)
        cons = row["construction_test_mse"]
        if k >= 16:
            assert cons <= 1e-20 * row["target_power"]
            continue
        # the residual T - (ΠW + LR_k(E)) = E - LR_k(E) on the same test inputs
        residual = (U[:, k:] * s[k:]) @ Vt[k:]  # (16, 16)
        per_sample = np.sum((X @ residual.T) ** 2, axis=1) / 16
        assert cons == pytest.approx(per_sample.mean(), rel=1e-9)
        se = per_sample.std(ddof=1) / math.sqrt(per_sample.size)
        assert abs(cons - expected) <= 4 * se
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == len(summary["rows"]) == 3
    records = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in records}) == len(records) == 3 * 2  # 3 ranks x the quick 2-point grid
    assert "singular_values" in capsys.readouterr().out


def test_given_spectrum_sets_the_threshold(tmp_path):
    _, summary = _run(tmp_path, ["--spectrum", "0.25,1,0.5", "--ranks", "1,2"])
    assert summary["threshold"] == 2  # rank(E) = 3, two layers: ceil(3 / 2)
    assert summary["spectrum"][:4] == [1.0, 0.5, 0.25, 0.0]
    by_rank = {r["rank"]: r for r in summary["rows"]}
    assert by_rank[1]["prescribed_prediction"] == pytest.approx(0.25**2 / 16)
    assert by_rank[2]["construction_test_mse"] <= 1e-20 * by_rank[2]["target_power"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--decay", "0"], "--decay: need 0 < decay <= 1"),
        (["--decay", "1.5"], "--decay: need 0 < decay <= 1"),
        (["--spectrum", "1,-1"], "--spectrum: need 1..16"),
        (["--spectrum", "1,x"], "--spectrum: cannot read"),
        (["--spectrum", "1", "--decay", "0.5"], "--spectrum and --decay"),
    ],
)
def test_bad_spectrum_exits_with_one_line(extra, message, tmp_path, refused):
    out = tmp_path / "bad"
    line = refused("singular_values", RUN + extra + ["--out", str(out)])
    assert line.startswith("python -m verification.singular_values: error: " + message)
    assert not (out / "summary.json").exists()


def test_listing_has_experiments_and_tools(capsys):
    assert "singular_values" in EXPERIMENTS
    assert list_main() == 0
    printed = capsys.readouterr().out
    experiments, tools = printed.split("Tools")
    assert "singular_values" in experiments
    for name in TOOLS:
        assert name in tools and name not in experiments
    assert set(TOOLS) == {"certify", "advise", "real_data", "pretraining", "paper"} and "unavailable" not in printed


def test_reused_out_folder_with_another_spectrum_is_refused(tmp_path, capsys, refused):
    """--decay / --spectrum change the target: they enter every run's id and the pretrained-model cache key,
    and a folder holding runs of another spectrum is refused (one line, folder unchanged) instead of mixed."""
    from verification.sweep import make_runs

    out = tmp_path / "x"
    base = ["--quick", "--iterations", "5", "--ranks", "1", "--seeds", "1", "--no-figure", "--out", str(out)]
    assert singular_values.main(base) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    line = refused("singular_values", base + ["--decay", "0.3"], "other settings")
    assert "--decay" in line and "--resume" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the same settings again: the runs are reused (nothing trained twice)
    assert singular_values.main(base) == 0
    assert "(2 already done)" in capsys.readouterr().err
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2

    def ids(extra):
        args = _parsed(extra)
        return {r.id for r in make_runs(singular_values.SPEC, args, singular_values.SPEC.cells(args))}

    assert ids([]).isdisjoint(ids(["--decay", "0.3"]))
    assert ids(["--decay", "0.7"]) == ids([])  # the same spectrum, the same runs
    assert ids(["--spectrum", "1,0.5"]).isdisjoint(ids(["--spectrum", "1,0.25"]))
    cached = []
    for decay in ("0.7", "0.3"):  # pretrained toward the target: cached under the spectrum's key
        folder = tmp_path / f"p{decay}"
        assert (
            singular_values.main(
                RUN
                + [
                    "--iterations",
                    "2",
                    "--ranks",
                    "1",
                    "--frozen",
                    "pretrained",
                    "--decay",
                    decay,
                    "--out",
                    str(folder),
                ]
            )
            == 0
        )
        cached.append({p.name for p in (folder / "pretrained").glob("*.npz")})
    assert len(cached[0]) == len(cached[1]) == 1 and cached[0] != cached[1]


def _parsed(extra):
    from verification.sweep import base_parser
    from verification.sweep.cli import _normalise

    args = base_parser(singular_values.SPEC).parse_args(RUN + ["--ranks", "1,2"] + extra)
    _normalise(singular_values.SPEC, args)
    return args
