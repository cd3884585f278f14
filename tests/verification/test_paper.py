"""``python -m verification.paper``: every experiment in one resumable command, and verdicts that can fail.

The verdict rules are checked on hand-made summaries where the claim is false (each must say so) and where
it cannot be tested (``not measured``); the command itself runs at ``--quick`` over all experiments.
"""

import json

import pytest

from verification import paper

STATUSES = {"holds", "does not hold", "partly", "not measured"}


def _row(rank, exact, *, power=1.0, depth=None, **extra):
    row = {
        "rank": rank,
        "label": "lora",
        "method": "lora",
        "params": 10 * rank,
        "target_power": power,
        "construction_test_mse": 1e-30 if exact else 1e-3 * power,
    }
    if depth is not None:
        row["depth"] = depth
    row.update(extra)
    return row


def _summary(rows, threshold=2, **extra):
    return {"threshold": threshold, "rows": rows, "pretrained_rows": [], **extra}


def _status(rule, summaries, index=0):
    return rule(summaries)[index]["status"]


def test_threshold_verdict_holds_only_when_exactness_starts_at_the_threshold():
    good = {"fnn_L4": _summary([_row(1, False), _row(2, True), _row(3, True)])}
    assert [v["status"] for v in paper.verdict_threshold(good)] == ["holds", "holds"]
    late = {"fnn_L4": _summary([_row(1, False), _row(2, False), _row(3, True)])}
    assert [v["status"] for v in paper.verdict_threshold(late)] == ["partly", "holds"]
    early = {"fnn_L4": _summary([_row(1, True), _row(2, True)])}
    assert [v["status"] for v in paper.verdict_threshold(early)] == ["holds", "does not hold"]
    assert [v["status"] for v in paper.verdict_threshold({})] == ["not measured"] * 2


def test_threshold_verdict_reads_the_depth_sweeps_threshold_per_depth():
    sweep = _summary(
        [_row(2, False, depth=2), _row(4, True, depth=2), _row(2, True, depth=4)], threshold={"2": 4, "4": 2}
    )
    assert [v["status"] for v in paper.verdict_threshold({"depth_sweep": sweep})] == ["holds", "holds"]
    sweep["threshold"] = {"2": 4, "4": 4}  # exact at rank 2 for L = 4 is then below its threshold
    assert [v["status"] for v in paper.verdict_threshold({"depth_sweep": sweep})] == ["holds", "partly"]


def test_depth_verdict_fails_when_a_deeper_model_needs_more_rank():
    falls = _summary(
        [_row(4, True, depth=2), _row(2, False, depth=2), _row(2, True, depth=4)], threshold={"2": 4, "4": 2}
    )
    assert _status(paper.verdict_depth, {"depth_sweep": falls}) == "holds"
    rises = _summary(
        [_row(2, True, depth=2), _row(2, False, depth=4), _row(4, True, depth=4)], threshold={"2": 4, "4": 2}
    )
    assert _status(paper.verdict_depth, {"depth_sweep": rises}) == "does not hold"
    assert _status(paper.verdict_depth, {}) == "not measured"


def _final_layers(lora_mse, tuned_mse):
    lora = _row(1, False, gradient_test_mse=lora_mse)
    tuned = {
        "rank": None,
        "layers": 1,
        "label": "final_layers",
        "method": "final_layers",
        "params": 20,
        "gradient_test_mse": tuned_mse,
    }
    return {"final_layers": _summary([lora, tuned])}


def test_final_layers_verdict_compares_at_no_more_trained_parameters():
    assert _status(paper.verdict_final_layers, _final_layers(0.1, 0.2)) == "holds"
    assert _status(paper.verdict_final_layers, _final_layers(0.3, 0.2)) == "does not hold"
    pricier = _final_layers(0.1, 0.2)
    pricier["final_layers"]["rows"][0]["params"] = 30  # LoRA trains more: no fair comparison left
    assert _status(paper.verdict_final_layers, pricier) == "not measured"


def test_schedule_verdict_fails_when_exactness_disagrees_with_the_rank_sum():
    predictions = {"1": {"ranks": [8, 9], "predicted_exact": True}, "-1": {"ranks": [8, 7], "predicted_exact": False}}
    rows = [dict(_row(8, True), step=1), dict(_row(8, False), step=-1)]
    assert _status(paper.verdict_schedule, {"rank_schedule": _summary(rows, predictions=predictions)}) == "holds"
    rows[1] = dict(_row(8, True), step=-1)
    assert _status(paper.verdict_schedule, {"rank_schedule": _summary(rows, predictions=predictions)}) == "partly"


def test_pretrained_verdict_counts_seeds_per_rank_below_the_threshold():
    def entry(rank, lower, seeds=5):
        return {"rank": rank, "construction": {"seeds": seeds, "pretrained_lower": lower, "median_ratio": 0.5}}

    summary = _summary([], threshold=4, pretrained_vs_random=[entry(1, 5), entry(2, 3), entry(4, 0)])
    assert _status(paper.verdict_pretrained, {"fnn_L4": summary}) == "holds"  # rank 4 is at the threshold
    summary["pretrained_vs_random"][1] = entry(2, 2)
    assert _status(paper.verdict_pretrained, {"fnn_L4": summary}) == "partly"


def test_tfn_gradient_verdict_fails_when_training_reaches_the_target():
    fails = _summary([_row(2, True, gradient_test_mse=0.5)])
    assert _status(paper.verdict_tfn_gradient, {"tfn_L2": fails}) == "holds"
    learns = _summary([_row(2, True, gradient_test_mse=1e-4)])
    assert _status(paper.verdict_tfn_gradient, {"tfn_L2": learns}) == "does not hold"


def test_shift_verdict_needs_the_certified_column_exact_and_the_calibrated_one_not():
    ok = _summary([_row(2, True, construction_shifted_mse=1e-28, calibrated_shifted_mse=10.0)])
    assert _status(paper.verdict_shift, {"fnn_L4": ok}) == "holds"
    both = _summary([_row(2, True, construction_shifted_mse=1e-28, calibrated_shifted_mse=1e-28)])
    assert _status(paper.verdict_shift, {"fnn_L4": both}) == "does not hold"
    broken = _summary([_row(2, True, construction_shifted_mse=1.0, calibrated_shifted_mse=10.0)])
    assert _status(paper.verdict_shift, {"fnn_L4": broken}) == "does not hold"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "nope"], "--only: unknown experiments"),
        (["--seeds", "0"], "--seeds: must be at least 1"),
        (["--only", "linear", "--iterations", "x"], "--iterations: must be an integer"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, refused):
    out = tmp_path / "paper"
    refused("paper", [*argv, "--out", str(out)], message)
    assert not out.exists()


def test_a_foreign_folder_is_refused(tmp_path, refused):
    (tmp_path / "notes.txt").write_text("mine")
    refused("paper", ["--only", "linear", "--out", str(tmp_path)], "not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


FAST = ["--quick", "--iterations", "20", "--seeds", "1", "--no-figure"]


@pytest.mark.slow
def test_quick_runs_every_experiment_and_judges_every_claim(tmp_path, capsys):
    """``--quick`` exactly as documented (docs/reproduce.md), figures included."""
    out = tmp_path / "paper"
    assert paper.main(["--quick", "--out", str(out)]) == 0
    found = json.loads((out / "verdicts.json").read_text())["verdicts"]
    assert len(found) == 8 and {v["status"] for v in found} <= STATUSES
    # every experiment ran, so every claim was tested by something
    assert all(v["status"] != "not measured" for v in found)
    # the constructions are the theorems': exact from each threshold on, whatever the gradient runs did
    assert found[0]["status"] == "holds" and found[0]["measured"]
    report = (out / "report.md").read_text()
    positions = [report.index(f"files in `{s.name}/`") for s in paper.STEPS]
    assert positions == sorted(positions)  # the paper's order
    assert "## Verdicts" in report
    assert all((out / s.name / "figure.png").is_file() for s in paper.STEPS)


def test_resume_reruns_only_what_did_not_finish(tmp_path, capsys, monkeypatch):
    out = tmp_path / "paper"
    argv = [*FAST, "--only", "linear,fnn_L2", "--frozen", "random"]
    assert paper.main([*argv, "--out", str(out)]) == 0
    (out / "fnn_L2" / "summary.json").unlink()  # as if stopped before fnn_L2 wrote its summary
    kept = (out / "linear" / "runs.jsonl").read_text()
    ran = []
    original = paper._run_step
    monkeypatch.setattr(paper, "_run_step", lambda step, *a: ran.append(step.name) or original(step, *a))
    assert paper.main(["--resume", str(out)]) == 0
    assert ran == ["fnn_L2"]
    assert (out / "linear" / "runs.jsonl").read_text() == kept
    assert (out / "fnn_L2" / "summary.json").is_file()
    assert paper.main([*argv, "--out", str(out)]) == 2  # a second --out on it is refused, not overwritten
    assert "--resume" in capsys.readouterr().err


def test_plan_counts_the_work_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "paper"
    assert paper.main(["--plan", "--quick", "--only", "linear,tfn_L2", "--seeds", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # linear --quick: ranks 1,4,8,16 x 2 frozen kinds x 1 seed x a 2-point grid = 16 runs of 100 steps
    assert "linear" in err and "1,600" in err and "whole: about" in err
    assert not out.exists()
