"""``python -m verification.certify``, run through ``main(argv)``."""

import time

import pytest

from verification.certify import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tfn_at_ceil_half_width_passes_in_under_a_minute(capsys):
    start = time.perf_counter()
    code, out, _ = _run(capsys, "--model", "tfn", "--width", "6", "--depth", "2", "--heads", "2", "--rank", "3")
    assert time.perf_counter() - start < 60
    assert code == 0
    assert "Outcome: exact" in out and "[FAIL]" not in out


def test_tfn_one_rank_below_fails_without_claiming_impossibility(capsys):
    code, out, _ = _run(capsys, "--model", "tfn", "--width", "6", "--depth", "2", "--heads", "2", "--rank", "2")
    assert code != 0
    assert "Outcome: sufficient condition not met" in out and "[FAIL]" in out
    assert "impossible" not in out


def test_linear_below_threshold_is_impossible(capsys):
    code, out, _ = _run(capsys, "--model", "linear", "--width", "5", "--depth", "2", "--rank", "2", "--seed", "3")
    assert code == 1
    assert "Outcome: impossible at this rank" in out


def test_fnn_at_threshold_passes(capsys):
    code, out, _ = _run(
        capsys,
        "--model",
        "fnn",
        "--width",
        "4",
        "--depth",
        "4",
        "--target-depth",
        "2",
        "--rank",
        "2",
        "--input-radius",
        "3/2",
    )
    assert code == 0 and "Outcome: exact" in out
    assert "||x - x0||^2 <= 9/4" in out
    code, out, _ = _run(
        capsys, "--model", "fnn", "--width", "4", "--depth", "4", "--target-depth", "2", "--rank", "1", "--quiet"
    )
    assert code == 1 and out.startswith("Outcome: sufficient condition not met")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "rnn", "--width", "3", "--depth", "1", "--rank", "1"], "invalid choice: 'rnn'"),
        (["--model", "tfn", "--width", "0", "--depth", "1", "--rank", "1"], "--width: must be at least 1"),
        (["--model", "tfn", "--width", "3", "--depth", "1"], "the following arguments are required: --rank"),
        (["--model", "tfn", "--width", "3", "--depth", "1", "--rank", "4"], "--rank: must be at most the width D = 3"),
        (["--model", "tfn", "--width", "3", "--depth", "1", "--rank", "x"], "--rank: must be an integer"),
        (["--model", "linear", "--width", "3", "--depth", "1", "--rank", "1", "--heads", "2"], "--heads applies"),
        (
            ["--model", "fnn", "--width", "3", "--depth", "1", "--target-depth", "2", "--rank", "1"],
            "--target-depth: L̄ = 2 exceeds the depth L = 1",
        ),
        (
            ["--model", "fnn", "--width", "3", "--depth", "1", "--rank", "1", "--input-radius", "-1"],
            "--input-radius: must be positive",
        ),
        (
            ["--model", "linear", "--width", "3", "--depth", "1", "--rank", "1", "--input-radius", "1"],
            "--input-radius applies",
        ),
    ],
)
def test_bad_arguments_one_line_nonzero(refused, argv, message):
    refused("certify", argv, message)


def test_help(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "--model" in out
