"""Every experiment CLI runs with --quick through main(argv), writes valid files, resumes without repeats
and refuses bad input with a one-line message and no summary."""

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import verification
from verification.__main__ import main as list_main

SMALL = ["--quick", "--width", "4", "--seeds", "1", "--iterations", "20", "--no-figure"]

CASES = {
    "linear": ["--ranks", "1,2"],
    "fnn": ["--ranks", "1,2"],
    "tfn": ["--ranks", "1,2", "--seq-len", "3", "--frozen", "random"],
    "final_layers": ["--depth", "3", "--ranks", "1", "--layers", "1,2"],
    "biases": ["--ranks", "2", "--select", "best", "--validate-every", "5"],
    "rank_schedule": ["--steps=-1,1"],
    "depth_sweep": ["--depths", "2,4", "--ranks", "1,2"],
}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_quick_writes_valid_files(name, tmp_path, capsys):
    module = importlib.import_module(f"verification.{name}")
    out = tmp_path / name
    assert module.main(SMALL + CASES[name] + ["--out", str(out)]) == 0
    summary = _summary(out)
    assert set(summary) >= {"experiment", "threshold", "domain", "rows", "pretrained_rows"}
    assert summary["experiment"] == name
    assert summary["rows"], "no rows"
    for row in summary["rows"] + summary["pretrained_rows"]:
        assert {
            "params",
            "construction_test_mse",
            "gradient_test_mse",
            "gradient_test_q25",
            "gradient_test_q75",
            "gradient_shifted_mse",
        } <= set(row)
        assert row["gradient_test_mse"] is None or row["gradient_test_mse"] >= 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(summary["rows"]) + len(summary["pretrained_rows"])
    records = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in records}) == len(records) > 0
    for r in records:
        assert {"config", "config_hash", "seed", "versions", "device", "losses", "wall_time_s"} <= set(r)
        if "best" in CASES[name]:  # --select best records the chosen iterate
            assert 1 <= r["best_step"] <= 20 and r["config"]["select"] == "best"
    printed = capsys.readouterr().out
    assert name in printed and "gradient" in printed


def test_fnn_figure_and_construction_domain(tmp_path):
    from verification import fnn

    out = tmp_path / "f"
    assert (
        fnn.main(
            [
                "--quick",
                "--width",
                "4",
                "--seeds",
                "1",
                "--iterations",
                "10",
                "--ranks",
                "1,4",
                "--frozen",
                "random",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "figure.png").stat().st_size > 1000
    s = _summary(out)
    assert s["domain"]["kind"] == "ball" and s["domain"]["radius"] > 0
    exact = [r for r in s["rows"] if r["rank"] >= s["threshold"]]
    for r in exact:  # at and above the threshold the float64 construction is exact (relative 1e-20 in MSE)
        assert r["construction_test_mse"] <= 1e-20 * r["target_power"]
        assert r["construction_shifted_mse"] <= 1e-20 * 25 * r["target_power"]


def test_resume_finishes_without_repeating(tmp_path):
    from verification import linear

    out = tmp_path / "lin"
    argv = [
        "--quick",
        "--width",
        "4",
        "--seeds",
        "2",
        "--iterations",
        "10",
        "--ranks",
        "1,2",
        "--frozen",
        "random",
        "--no-figure",
        "--out",
        str(out),
        "--chunk",
        "3",
    ]
    assert linear.main(argv) == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    full = {json.loads(l)["id"]: json.loads(l)["losses"]["test"] for l in lines}
    # an interruption: the log holds the first runs and a half-written line, and no summary
    (out / "runs.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    (out / "summary.json").unlink()
    assert linear.main(["--resume", str(out)]) == 0
    records = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines() if l.endswith("}")]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(full)
    for r in records:  # the rerun runs reproduce the first ones: data and init depend on the run alone
        assert r["losses"]["test"] == pytest.approx(full[r["id"]], rel=1e-5)
    assert _summary(out)["experiment"] == "linear"
    # resuming a finished sweep repeats nothing
    assert linear.main(["--resume", str(out)]) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(lines[:3]) + 1 + (len(full) - 3)


def test_resume_refuses_another_experiment(tmp_path, capsys, refused):
    from verification import linear

    out = tmp_path / "lin"
    assert (
        linear.main(
            [
                "--quick",
                "--width",
                "4",
                "--seeds",
                "1",
                "--iterations",
                "5",
                "--ranks",
                "1",
                "--frozen",
                "random",
                "--no-figure",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    refused("fnn", ["--resume", str(out)], "linear")


def _bad(refused, tool, argv, match, tmp_path):
    out = tmp_path / "bad"
    refused(tool, argv + ["--out", str(out)] if "--out" not in argv else argv, match)
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--device", "tpu"], "--device"),
        (["--ranks", "0,1"], "--ranks"),
        (["--ranks", "17"], "--ranks"),
        (["--ranks", "a-b"], "--ranks"),
        (["--depth", "2", "--target-depth", "3"], "--target-depth"),
        (["--seeds", "0"], "--seeds"),
        (["--lr=-1"], "--lr"),
        (["--iterations", "ten"], "--iterations"),
    ],
)
def test_bad_input_exits_with_one_line(argv, match, refused, tmp_path):
    _bad(refused, "fnn", ["--quick"] + argv, match, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(refused, tmp_path):
    _bad(refused, "linear", ["--quick", "--device", "cuda"], "CUDA", tmp_path)


def test_unwritable_out(refused, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _bad(refused, "linear", ["--quick", "--out", str(blocker / "sub")], "--out", tmp_path)


def test_listing(capsys):
    assert list_main() == 0
    printed = capsys.readouterr().out
    for name in verification.EXPERIMENTS:
        assert name in printed
    assert "unavailable" not in printed


@pytest.mark.parametrize(
    "structure", [("fnn", 4, 2, 1, "relu", True), ("fnn", 4, 2, 1, "linear", True), ("tfn", 4, 1, 1, 3)]
)
def test_pretrained_models_are_cached_for_resume(structure, tmp_path):
    from verification.sweep import Problems

    first = Problems(cache=tmp_path).frozen(structure, "pretrained", 0)
    assert list(tmp_path.glob("*.npz"))
    again = Problems(cache=tmp_path)
    second = again.frozen(structure, "pretrained", 0)
    assert again.pretrain_info  # read back with its record (steps, first and last loss)
    if structure[0] == "fnn":
        for a, b in zip(first.weights + first.biases, second.weights + second.biases):
            assert (a == b).all()
        assert second.activation == structure[4]
    else:
        for k, v in first.parameters().items():
            assert (v == second.parameters()[k]).all()


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_batched_pretraining_equals_the_one_run_loop(activation):
    """THEORY.md §4 pretraining: the stacked version (used by the CLIs) against the plain torch.optim.Adam loop."""
    import numpy as np

    from lora_theory.numerics import relative_error
    from verification.sweep import make_random_frozen, make_target, pretrain, pretrain_fnns

    structure = ("fnn", 6, 3, 1, activation, True)
    seeds = [0, 1, 2]
    batched = pretrain_fnns(
        [make_random_frozen(structure, s) for s in seeds], [make_target(structure, s) for s in seeds], structure, seeds
    )
    for s, (model, info) in zip(seeds, batched):
        ref, ref_info = pretrain(make_random_frozen(structure, s), make_target(structure, s), structure, s)
        assert info["steps"] == ref_info["steps"]
        assert info["last_loss"] < info["first_loss"] / 3 or info["steps"] == 1000
        assert relative_error(np.stack(model.weights), np.stack(ref.weights)) <= 1e-10
        assert relative_error(np.stack(model.biases), np.stack(ref.biases)) <= 1e-10 or activation == "linear"
        if activation == "linear":
            assert all((b == 0).all() for b in model.biases)


def _files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_bad_input_leaves_a_finished_folder_untouched(tmp_path, capsys, refused):
    """Bad ranks given with the --out of a finished sweep: exit 2, and the folder (summaries, figure,
    config.json) stays as it was, so that the sweep still resumes (the input is validated first)."""
    from verification import linear

    out = tmp_path / "a"
    assert (
        linear.main(
            [
                "--quick",
                "--width",
                "4",
                "--seeds",
                "1",
                "--iterations",
                "5",
                "--ranks",
                "1",
                "--frozen",
                "random",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    before = _files(out)
    assert {"summary.json", "summary.csv", "figure.png", "config.json", "runs.jsonl"} <= set(before)
    refused("linear", ["--quick", "--width", "4", "--out", str(out), "--ranks", "9"], "--ranks")
    assert _files(out) == before
    assert linear.main(["--resume", str(out)]) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(before["runs.jsonl"].splitlines())


def test_reused_out_folder_with_other_settings_is_refused(tmp_path, capsys, refused):
    """Without --resume, an --out folder holding runs of other settings is refused with one line and left
    as it was; with the same settings it goes on (nothing trained twice); with no run in it, it starts
    afresh. Folders written before config.json held the settings are compared through their command line."""
    from verification import linear

    out = tmp_path / "lin"
    argv = [
        "--quick",
        "--width",
        "4",
        "--seeds",
        "1",
        "--iterations",
        "5",
        "--ranks",
        "1",
        "--frozen",
        "random",
        "--no-figure",
        "--out",
        str(out),
    ]
    assert linear.main(argv) == 0
    before = _files(out)
    capsys.readouterr()
    for other, flag in (
        (["--iterations", "6"], "--iterations"),
        (["--ranks", "1,2"], "--ranks"),
        (["--fixed-bias"], "--tune-bias"),
        (["--lr", "0.5"], "--lr"),
    ):
        assert flag in refused("linear", argv + other, "other settings")
        assert _files(out) == before
    # flags that do not change results are no difference
    assert linear.main(argv + ["--workers", "1", "--chunk", "7"]) == 0
    assert "(2 already done)" in capsys.readouterr().err
    # an older folder (no settings in config.json): compared through its saved command line
    cfg = json.loads((out / "config.json").read_text())
    del cfg["settings"]
    (out / "config.json").write_text(json.dumps(cfg))
    refused("linear", argv + ["--iterations", "6"], "other settings")
    assert linear.main(argv) == 0
    # no run in the folder: started afresh with the new settings
    (out / "runs.jsonl").write_text("")
    assert linear.main(argv + ["--iterations", "6"]) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["iterations"] == 6


def test_interrupt_with_several_workers_keeps_finished_stacks_and_stops_the_others(tmp_path, monkeypatch, capsys):
    """Ctrl-C while several stacks train in threads: the stacks still training stop at their next step
    (a threading.Event checked by train_stack), every stack that finished is written to runs.jsonl before
    the interruption propagates, and --resume finishes the sweep without repeating a run."""
    import threading

    from verification import linear
    from verification.sweep import driver, training
    from verification.trainer import TrainingStopped

    real = driver.train_stack
    lock, first_done = threading.Lock(), threading.Event()
    started, finished, stopped = [], [], []

    def interrupted_after_the_first_stack(stack, target, **kw):
        if kw.get("stop") is None:  # the time estimate's stacks, not the sweep's
            return real(stack, target, **kw)
        with lock:
            n = len(started)
            started.append(n)
        if n == 1:  # the second stack: Ctrl-C, once the first has finished
            first_done.wait(60)
            raise KeyboardInterrupt
        try:
            result = real(stack, target, **kw)
        except TrainingStopped:
            stopped.append(n)
            raise
        finished.append(n)
        if n == 0:
            first_done.set()
        return result

    # the sweep's stacks train in the driver, the time estimate's in training
    monkeypatch.setattr(driver, "train_stack", interrupted_after_the_first_stack)
    monkeypatch.setattr(training, "train_stack", interrupted_after_the_first_stack)
    out = tmp_path / "lin"
    argv = [
        "--width",
        "4",
        "--seeds",
        "2",
        "--iterations",
        "1500",
        "--ranks",
        "1,2",
        "--lr",
        "1e-2,1e-3",
        "--weight-decay",
        "0",
        "--frozen",
        "random",
        "--no-figure",
        "--chunk",
        "2",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    assert linear.main(argv) == 130
    assert "--resume" in capsys.readouterr().err
    records = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert 0 in finished and len(records) == 2 * len(finished)  # every finished stack (2 runs) written
    assert len(started) < 4 or stopped  # the third stack did not train on
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(driver, "train_stack", real)
    monkeypatch.setattr(training, "train_stack", real)
    assert linear.main(["--resume", str(out)]) == 0
    ids = [json.loads(l)["id"] for l in (out / "runs.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 8
    assert {r["id"] for r in records} <= set(ids)


_RELU, _LINEAR, _TFN = ("fnn", 4, 3, 1, "relu", True), ("fnn", 4, 2, 1, "linear", True), ("tfn", 4, 2, 2, 3)


@pytest.mark.parametrize(
    "structure,method,ranks,layers,tune_bias",
    [
        (_RELU, "lora", (1, 1, 1), None, True),
        (_RELU, "lora", (1, 1, 1), None, False),
        (_RELU, "lora", (2, 1, 0), None, True),
        (_LINEAR, "lora", (2, 2), None, True),
        (_RELU, "final_layers", None, 2, True),
        (_TFN, "lora", (2,), None, True),
        (_TFN, "lora", (2,), None, False),
    ],
)
def test_parameter_counts_include_the_trained_biases(structure, method, ranks, layers, tune_bias):
    """Cell.params is the number of entries the stack really trains: LoRA's biases count when it trains
    them (as the final layers' do), so that the 'equal parameter count' comparison is honest."""
    import lora_theory
    from verification.sweep import Cell, Problems, Run
    from verification.sweep.training import _stack_for

    cell = Cell(
        kind="random",
        structure=structure,
        method=method,
        axis=(("rank", 1),),
        ranks=ranks,
        layers=layers,
        tune_bias=tune_bias,
    )
    stack = _stack_for([Run("", {}, cell, 0, 1e-3, 0.0)], Problems(), torch.float64, torch.device("cpu"))
    trained = sum(
        int(stack.masks[k].expand_as(p)[0].sum()) if stack.masks.get(k) is not None else p[0].numel()
        for k, p in stack.params.items()
    )
    assert cell.params() == trained
    if structure == _RELU and method == "lora" and ranks == (1, 1, 1):  # the Lemma 4 counts, weights only
        assert cell.params() == lora_theory.lora_parameter_count(4, 3, 1) + (3 * 4 if tune_bias else 0)
    if method == "final_layers":
        assert cell.params() == lora_theory.final_layers_parameter_count(4, 2, bias=True)


def test_structures_are_named_and_survive_config_json():
    """A problem structure reads by name (``s.L``, ``s.activation``), stays the tuple that config.json,
    run ids and cache keys were made from, and comes back from a JSON list as the same named structure;
    anything else is refused with a message naming both forms."""
    from verification.sweep import Cell, FNNStructure, TFNStructure, structure_of
    from verification.sweep.protocol import _hash

    fnn, tfn = structure_of(_RELU), structure_of(_TFN)
    assert isinstance(fnn, FNNStructure) and isinstance(tfn, TFNStructure)
    assert (fnn.D, fnn.L, fnn.Lbar, fnn.activation, fnn.final_relu) == (4, 3, 1, "relu", True)
    assert (tfn.D, tfn.L, tfn.H, tfn.N) == (4, 2, 2, 3)
    for named, plain in ((fnn, _RELU), (tfn, _TFN)):
        assert named == plain and hash(named) == hash(plain) and {plain: 1}[named] == 1
        back = structure_of(json.loads(json.dumps(list(named))))
        assert back == named and type(back) is type(named)
        cell = Cell(kind="random", structure=plain, method="lora", axis=(("rank", 1),), ranks=(1,))
        assert type(cell.structure) is type(named)
        assert _hash(cell.as_dict()) == _hash({**cell.as_dict(), "structure": list(plain)})
    for bad in [("fnn", 4, 3), ("tfn", 4, 2, 2), ("cnn", 4, 2, 2, 3), ()]:
        with pytest.raises(ValueError, match="'tfn', D, L, H, N"):
            structure_of(bad)


def test_biases_construction_is_not_drawn_as_the_fixed_biases_curve(tmp_path):
    """The construction re-chooses the biases: the fixed-biases rows have no construction value, and the
    figure draws one construction curve per kind, labelled 'construction (biases re-chosen)'."""
    from verification import biases, rank_schedule
    from verification.sweep import figure_series, make_figure

    out = tmp_path / "b"
    assert biases.main(SMALL + ["--ranks", "1,4", "--iterations", "5", "--out", str(out)]) == 0
    s = _summary(out)
    for row in s["rows"] + s["pretrained_rows"]:
        if row["label"] == "fixed_biases":
            assert row["construction_test_mse"] is None and row["prediction"] is None
            assert row["construction_note"].startswith("n/a")
        else:
            assert row["construction_test_mse"] is not None
    curves = figure_series(biases.SPEC, s)
    cons = [c for c in curves if c["curve"] == "construction"]
    assert sorted(c["kind"] for c in cons) == ["pretrained", "random"]
    for c in cons:
        assert c["label"] == f"{c['kind']}: construction (biases re-chosen)" and c["x"] == [1, 4]
    assert {c["label"] for c in curves if c["curve"] == "gradient"} == {
        f"{k} {label}: gradient" for k in ("random", "pretrained") for label in ("fixed_biases", "trained_biases")
    }
    make_figure(biases.SPEC, s, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 1000
    # one construction curve across the rows of an experiment whose rows each have their own label
    rows = [
        {
            "step": st,
            "label": f"schedule {st}",
            "construction_test_mse": 10.0**st,
            "gradient_test_mse": 1.0,
            "gradient_test_q25": 0.5,
            "gradient_test_q75": 2.0,
        }
        for st in (-1, 1)
    ]
    cons = [
        c
        for c in figure_series(rank_schedule.SPEC, {"rows": rows, "pretrained_rows": [], "domain": None})
        if c["curve"] == "construction"
    ]
    assert len(cons) == 1 and cons[0]["x"] == [-1, 1] and cons[0]["label"] == "random: construction"


def test_time_estimate_is_printed_before_pretraining(tmp_path, monkeypatch, capsys):
    """The run count and time estimate come before the (CPU) pretraining of the frozen models."""
    import sys

    from verification import fnn
    from verification.sweep import problems

    real = problems.pretrain_fnns

    def spy(*args, **kwargs):
        print("PRETRAINING NOW", file=sys.stderr)
        return real(*args, **kwargs)

    monkeypatch.setattr(problems, "pretrain_fnns", spy)
    assert (
        fnn.main(SMALL + ["--ranks", "1", "--iterations", "5", "--frozen", "pretrained", "--out", str(tmp_path / "f")])
        == 0
    )
    err = capsys.readouterr().err
    assert "PRETRAINING NOW" in err
    assert err.index("runs x 5 steps") < err.index("estimated") < err.index("PRETRAINING NOW")


def test_lora_init_shared_by_the_grid_points_is_declared(tmp_path):
    """The grid points of one (cell, seed) start from the same A (and runs of another cell or seed do not):
    summary.json declares it under protocol."""
    from verification import linear
    from verification.sweep import Problems, base_parser, make_runs
    from verification.sweep.cli import _normalise
    from verification.sweep.training import _stack_for

    args = base_parser(linear.SPEC).parse_args(["--width", "4", "--ranks", "1,2", "--seeds", "2", "--frozen", "random"])
    _normalise(linear.SPEC, args)
    runs = make_runs(linear.SPEC, args, linear.SPEC.cells(args))
    stack = _stack_for(runs, Problems(), torch.float64, torch.device("cpu"))
    A = stack.params["A"].detach()
    for i, r in enumerate(runs):
        for j, q in enumerate(runs):
            same = r.cell == q.cell and r.seed == q.seed
            assert torch.equal(A[i], A[j]) == same
    out = tmp_path / "lin"
    assert linear.main(SMALL + ["--ranks", "1", "--iterations", "2", "--frozen", "random", "--out", str(out)]) == 0
    declared = _summary(out)["protocol"]["initialisation"]
    assert "same A" in declared and "grid points" in declared


def test_resume_warns_about_the_flags_it_ignores(tmp_path, capsys):
    """--resume goes on with the saved settings: other flags are named in one warning line; the flags that
    do not change results (--device, --chunk, --workers, --no-figure) are taken from the command line."""
    from verification import linear

    out = tmp_path / "lin"
    assert (
        linear.main(
            [
                "--quick",
                "--width",
                "4",
                "--seeds",
                "1",
                "--iterations",
                "5",
                "--ranks",
                "1",
                "--frozen",
                "random",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (out / "figure.png").unlink()
    capsys.readouterr()
    assert (
        linear.main(
            [
                "--resume",
                str(out),
                "--ranks",
                "2",
                "--iter=7",
                "--fixed-bias",
                "--no-figure",
                "--workers",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    warnings = [l for l in captured.err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1
    assert "--ranks" in warnings[0] and "--iter" in warnings[0] and "--fixed-bias" in warnings[0]
    for honoured in ("--no-figure", "--workers", "--device"):
        assert honoured not in warnings[0]
    assert not (out / "figure.png").exists()  # --no-figure honoured
    assert [r["rank"] for r in _summary(out)["rows"]] == [1]  # --ranks ignored
    assert linear.main(["--resume", str(out), "--no-figure"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert linear.main(["--resume", str(out), "--figure"]) == 0  # the pair of --no-figure, taken on a resume
    assert "warning" not in capsys.readouterr().err
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_without_out_creates_no_folder(tmp_path, monkeypatch, refused):
    monkeypatch.chdir(tmp_path)
    refused("fnn", ["--quick", "--ranks", "0"], "--ranks")
    assert not (tmp_path / "results").exists()


def test_figure_failure_leaves_complete_summaries_and_a_warning(tmp_path, monkeypatch, capsys):
    from verification import linear
    from verification.sweep import driver

    def broken(spec, summary, path):
        raise RuntimeError("no drawing today")

    monkeypatch.setattr(driver, "make_figure", broken)
    out = tmp_path / "lin"
    assert (
        linear.main(
            [
                "--quick",
                "--width",
                "4",
                "--seeds",
                "1",
                "--iterations",
                "5",
                "--ranks",
                "1",
                "--frozen",
                "random",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err.splitlines()
    assert [l for l in err if l.startswith("warning:")] == [
        "warning: figure.png not written (RuntimeError: no drawing today); the summaries are complete"
    ]
    assert _summary(out)["rows"] and (out / "summary.csv").read_text().count("\n") == 2
    assert not (out / "figure.png").exists() and not list(out.glob(".tmp-*"))


def test_construction_only_trains_nothing_and_a_resume_trains_the_runs(tmp_path, capsys):
    """``--construction-only`` fills the construction columns in seconds and leaves the gradient ones empty; a
    later ``--resume`` without the flag trains the sweep (it is never inherited from the saved command line),
    and the construction columns are the same either way."""
    from verification import linear

    out = tmp_path / "lin"
    argv = [
        "--quick",
        "--width",
        "4",
        "--seeds",
        "2",
        "--iterations",
        "10",
        "--ranks",
        "1,2",
        "--frozen",
        "random",
        "--no-figure",
        "--out",
        str(out),
    ]
    assert linear.main(argv + ["--construction-only"]) == 0
    assert "constructions only, no training" in capsys.readouterr().err
    assert (out / "runs.jsonl").read_text() == ""
    first = _summary(out)["rows"]
    for row in first:
        assert row["construction_test_mse"] is not None
        assert row["gradient_test_mse"] is None and row["seeds"] == []
        # the per-seed constructions are kept (paired comparisons need them), the gradient fields empty
        assert [e["seed"] for e in row["per_seed"]] == [0, 1]
        assert all(e["gradient_test_mse"] is None and e["lr"] is None for e in row["per_seed"])
        assert np.median([e["construction_test_mse"] for e in row["per_seed"]]) == row["construction_test_mse"]
    assert linear.main(["--resume", str(out)]) == 0
    records = (out / "runs.jsonl").read_text().splitlines()
    protocol = _summary(out)["protocol"]
    assert len(records) == 2 * 2 * len(protocol["lr_grid"]) * len(protocol["weight_decay_grid"])  # ranks x seeds x grid
    for a, b in zip(first, _summary(out)["rows"]):
        assert b["gradient_test_mse"] is not None and b["seeds"] == [0, 1]
        assert a["construction_test_mse"] == b["construction_test_mse"]
        assert [e["construction_test_mse"] for e in a["per_seed"]] == [
            e["construction_test_mse"] for e in b["per_seed"]
        ]
        assert all(e["gradient_test_mse"] is not None for e in b["per_seed"])
    capsys.readouterr()
    assert linear.main(["--resume", str(out), "--construction-only"]) == 0  # a finished sweep: nothing new
    assert "ignoring" not in capsys.readouterr().err  # the flag is taken, not ignored
    assert (out / "runs.jsonl").read_text().splitlines() == records
    assert _summary(out)["rows"][0]["gradient_test_mse"] is not None  # its finished runs still count


def test_pretrained_vs_random_pairs_by_seed():
    """The paired comparison counts, per row and column, the seeds where the pretrained model's MSE is below
    the random one's *of the same seed*, over the seeds where both are there and not NaN (an infinite MSE,
    a diverged run, counts); ties apart; its ratio is the median of the per-seed ratios, null when a random
    MSE is 0; rows are matched on their axes and label, not their order, and keep both."""
    from verification.sweep import pretrained_vs_random

    inf, nan = float("inf"), float("nan")

    def row(rank, cons, grad, label=None):
        return {
            "rank": rank,
            "label": label or f"r={rank}",
            "per_seed": [
                {"seed": s, "construction_test_mse": c, "gradient_test_mse": g}
                for s, (c, g) in enumerate(zip(cons, grad))
            ],
        }

    random = [row(1, [4.0, 1.0, 2.0], [1.0, None, 1.0]), row(2, [0.0, 1.0, 1.0], [1.0, inf, 1.0])]
    pretrained = [row(2, [0.0, 2.0, 0.5], [2.0, 2.0, 2.0]), row(1, [2.0, 2.0, nan], [0.5, 0.5, 0.25])]
    out = pretrained_vs_random(random, pretrained)
    assert [(e["rank"], e["label"]) for e in out] == [(1, "r=1"), (2, "r=2")]
    assert out[0]["construction"] == {"seeds": 2, "pretrained_lower": 1, "ties": 0, "median_ratio": 1.25}  # 2/4, 2/1
    assert out[0]["gradient"] == {
        "seeds": 2,
        "pretrained_lower": 2,
        "ties": 0,
        "median_ratio": 0.375,
    }  # seed 1 unpaired
    assert out[1]["construction"] == {"seeds": 3, "pretrained_lower": 1, "ties": 1, "median_ratio": None}  # a random 0
    assert out[1]["gradient"] == {"seeds": 3, "pretrained_lower": 1, "ties": 0, "median_ratio": 2.0}  # inf diverged
    assert pretrained_vs_random(random, pretrained[:1])[0]["rank"] == 2  # rank 1 unmatched
    # two rows of one rank told apart by their label (the biases experiment: fixed and trained biases)
    two = [row(1, [1.0], [1.0], "fixed_biases"), row(1, [1.0], [1.0], "trained_biases")]
    lower = [row(1, [2.0], [2.0], "trained_biases"), row(1, [0.5], [0.5], "fixed_biases")]
    out = pretrained_vs_random(two, lower)
    assert [(e["label"], e["gradient"]["pretrained_lower"]) for e in out] == [
        ("fixed_biases", 1),
        ("trained_biases", 0),
    ]


def test_pretrained_vs_random_in_the_outputs(tmp_path, capsys):
    """With both frozen-model kinds the summary and the printed table carry the paired comparison, over every
    seed of a --construction-only sweep."""
    from verification import fnn

    out = tmp_path / "f"
    assert (
        fnn.main(
            [
                "--width",
                "4",
                "--seeds",
                "3",
                "--ranks",
                "1,4",
                "--construction-only",
                "--no-figure",
                "--workers",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    summary = _summary(out)
    paired = summary["pretrained_vs_random"]
    assert [e["rank"] for e in paired] == [1, 4]
    assert all(e["construction"]["seeds"] == 3 and e["gradient"]["seeds"] == 0 for e in paired)
    assert "pretrained vs random frozen model, paired by seed" in printed
    lower = paired[0]["construction"]["pretrained_lower"]
    assert f"{lower}/3" in printed.split("paired by seed")[1]


def test_depth_sweep_figure_orders_depths_by_value_and_marks_thresholds(tmp_path):
    """The depth sweep's figure: one panel per frozen-model kind, one curve pair per depth, depths in numeric
    order (2 before 10), the construction labelled with its depth's threshold."""
    from verification import depth_sweep
    from verification.sweep import figure_series, make_figure

    def row(depth, rank):
        return {
            "depth": depth,
            "rank": rank,
            "label": "lora",
            "construction_test_mse": 10.0**-rank,
            "gradient_test_mse": 1e-2,
            "gradient_test_q25": 5e-3,
            "gradient_test_q75": 2e-2,
        }

    rows = [row(d, r) for d in (10, 2) for r in (1, 2, 8)]
    summary = {"rows": rows, "pretrained_rows": rows, "domain": None, "threshold": {"2": 8, "10": 2}}
    curves = figure_series(depth_sweep.SPEC, summary)
    assert [c["group"] for c in curves if c["kind"] == "random" and c["curve"] == "gradient"] == [(2,), (10,)]
    make_figure(depth_sweep.SPEC, summary, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 1000


def test_depth_sweep_figure_with_nothing_to_draw_is_an_empty_panel(tmp_path):
    from verification import depth_sweep
    from verification.sweep import make_figure

    make_figure(
        depth_sweep.SPEC, {"rows": [], "pretrained_rows": [], "domain": None, "threshold": {}}, tmp_path / "figure.png"
    )
    assert (tmp_path / "figure.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ one convention, every tool

#: per tool, a flag value its argparse ``type`` refuses, and the flag the one line must name
BAD_VALUE = {
    **{name: (["--quick", "--seeds", "0"], "--seeds") for name in verification.EXPERIMENTS},
    "certify": (["--model", "fnn", "--width", "0", "--depth", "1", "--rank", "1"], "--width"),
    "advise": (["base", "tuned", "--budget", "many"], "--budget"),
    "real_data": (["--quick", "--seeds", "0"], "--seeds"),
    "pretraining": (["--quick", "--seeds", "0"], "--seeds"),
    "paper": (["--quick", "--seeds", "0"], "--seeds"),
}


def test_the_convention_lists_every_tool():
    assert set(BAD_VALUE) == set(verification.EXPERIMENTS) | set(verification.TOOLS)


@pytest.mark.parametrize("tool", verification.EXPERIMENTS + verification.TOOLS)
def test_every_tool_follows_one_command_line_convention(tool, refused, tmp_path, capsys):
    """``main(argv=None)``; ``--version`` prints ``<prog> <version>`` (status 0); an unknown flag and a value its
    type refuses each end with status 2 and the one line ``python -m verification.<tool>: error: ...``, and no
    folder is created."""
    import inspect

    import lora_theory

    main = importlib.import_module(f"verification.{tool}").main
    assert inspect.signature(main).parameters["argv"].default is None
    capsys.readouterr()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"python -m verification.{tool} {lora_theory.__version__}\n"
    out = tmp_path / "out"
    # advise and certify name their missing required arguments first
    refused(tool, ["--no-such-flag", "--out", str(out)], None if tool in ("advise", "certify") else "--no-such-flag")
    argv, flag = BAD_VALUE[tool]
    assert flag in refused(tool, argv + ["--out", str(out)])
    assert not out.exists()
