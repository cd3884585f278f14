"""The real-data experiment: runs offline with --quick; stacked runs are independent; findings as computed."""

import json
import os

import numpy as np
import pytest
import torch

if os.environ.get("CI"):
    import sklearn  # noqa: F401  (CI installs the real extra: the experiment must run there, not be skipped)
else:
    pytest.importorskip("sklearn")

from verification.real_data import Config, adapt, findings, load_tasks, main, pretrain, select  # noqa: E402

torch.set_num_threads(1)


def test_quick_cli_writes_everything(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "digits: task-2 test accuracy" in text and "breast_cancer: task-2 test R2" in text
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {r["config"]["dataset"] for r in records} == {"digits", "breast_cancer"}
    assert all({"config_hash", "seed", "versions", "test_metric", "val_loss"} <= set(r) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    for ds in ("digits", "breast_cancer"):
        f = summary["findings"][ds]
        assert set(f) >= {"depth_vs_rank", "lora_vs_final_layers", "bias_tuning"}
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    # the summary can be recomputed from the runs without training
    again = tmp_path / "again"
    assert main(["--quick", "--from-runs", str(out / "runs.jsonl"), "--out", str(again)]) == 0
    assert json.loads((again / "summary.json").read_text())["findings"] == summary["findings"]


def test_checkpoints_feed_the_advisor(tmp_path):
    """Saved checkpoints: the LoRA-tuned model's changes have rank <= r per layer (float32 storage), the
    final-layers-tuned one's do not."""
    from verification.advise import advise_checkpoints
    from verification.real_data import QUICK, save_checkpoints

    paths = save_checkpoints(tmp_path, ("breast_cancer",), QUICK, rank=2)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "breast_cancer_frozen.safetensors",
        "breast_cancer_final_layers.safetensors",
        "breast_cancer_lora_r2.safetensors",
    ]
    lora = advise_checkpoints(paths[0], paths[2])
    assert all(0 < r <= 2 for r in lora.exact_ranks.values())
    full = advise_checkpoints(paths[0], paths[1])
    assert max(full.exact_ranks.values()) > 2
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(p).st_mode & 0o777 for p in paths} == {0o666 & ~umask}  # open()'s mode, not safetensors' 0600


def test_stacked_runs_are_independent():
    """A run's result does not depend on what else is stacked with it (sum of losses, per-run Adam)."""
    task1, task2, D = load_tasks("breast_cancer")
    frozen = pretrain(task1, D, 2, seed=0, steps=5)
    configs = [Config("lora", 2, 3, True, 1e-2), Config("final", 1, 0, True, 3e-2), Config("lora", 1, 1, False, 1e-2)]
    together = adapt(frozen, task2, configs, steps=8, seed=1)
    for i, c in enumerate(configs):
        alone = adapt(frozen, task2, [c], steps=8, seed=1)
        np.testing.assert_allclose(alone["test_loss"][0], together["test_loss"][i], rtol=1e-5)


def test_frozen_layers_and_padded_ranks_stay_untouched():
    """LoRA on the last layer leaves the other layers' effective weights exactly frozen; rank 0 with bias off
    is not a configuration, rank 0 with bias on tunes biases only."""
    task1, task2, D = load_tasks("breast_cancer")
    frozen = pretrain(task1, D, 2, seed=0, steps=3)
    assert Config("lora", 2, 0, True, 1e-2).parameters(D) == 2 * D
    assert Config("lora", 1, 4, False, 1e-2).parameters(D) == 2 * 4 * D
    assert Config("final", 2, 0, True, 1e-2).parameters(D) == 2 * (D * D + D)
    res = adapt(frozen, task2, [Config("lora", 1, 0, False, 1e-2)], steps=3, seed=0)
    # no trainable parameter at all: the run is the frozen model
    base = adapt(frozen, task2, [Config("lora", 1, 0, False, 1e-2)], steps=1, seed=5)
    assert res["test_loss"] == base["test_loss"]


def test_findings_on_constructed_rows():
    rows = []
    for k, needed in ((1, 4), (2, 2), (3, 1)):
        for r in (0, 1, 2, 4):
            for bias in (True, False):
                metric = 0.9 if r >= needed else 0.5
                rows.append(
                    {
                        "dataset": "toy",
                        "method": "lora",
                        "layers": k,
                        "rank": r,
                        "bias": bias,
                        "parameters": k * (2 * r * 4 + (4 if bias else 0)),
                        "metric": "accuracy",
                        "test_metric": metric + (0.01 if bias else 0.0),
                        "test_loss": 0.0,
                        "val_loss": 1 - metric - (0.01 if bias else 0.0),
                    }
                )
    rows.append(
        {
            "dataset": "toy",
            "method": "final",
            "layers": 1,
            "rank": 0,
            "bias": True,
            "parameters": 40,
            "metric": "accuracy",
            "test_metric": 0.8,
            "test_loss": 0.0,
            "val_loss": 0.2,
        }
    )
    f = findings(rows, tolerance=0.02)["toy"]
    assert f["depth_vs_rank"]["rank_needed"] == {"1": 4, "2": 2, "3": 1} and f["depth_vs_rank"]["holds"] is True
    assert f["bias_tuning"]["helps_count"] == f["bias_tuning"]["total"] == 9
    comp = f["lora_vs_final_layers"]["comparisons"][0]
    assert comp["lora_parameters"] <= 40 and comp["lora_metric"] == 0.91 and comp["lora_better"] is True


def test_selection_by_validation_loss():
    recs = []
    for lr, val, test in ((1e-2, 0.5, 0.7), (3e-2, 0.3, 0.6)):
        recs.append(
            {
                "config": {"dataset": "d", "method": "lora", "layers": 1, "rank": 1, "bias": True, "lr": lr},
                "seed": 0,
                "parameters": 10,
                "metric": "accuracy",
                "val_loss": val,
                "test_metric": test,
                "test_loss": 0.0,
            }
        )
    (row,) = select(recs)
    assert row["test_metric"] == 0.6 and row["lrs"] == [3e-2]


def test_bad_dataset(refused):
    refused("real_data", ["--quick", "--datasets", "mnist"], "--datasets")
    with pytest.raises(ValueError, match="dataset"):
        load_tasks("mnist")
