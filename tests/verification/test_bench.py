"""The benchmark script runs end to end with tiny settings and reports medians of its repetitions."""

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "trainer.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_trainer", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_reports_the_median_of_interleaved_repetitions(tmp_path, capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "matmul_ceiling", lambda device, seconds=1.0: 1e9)   # the 1 s probe, stubbed
    out = tmp_path / "bench.json"
    assert bench.main(["--fnn-steps", "4", "--tfn-steps", "2", "--fnn-runs", "2", "--tfn-runs", "1",
                       "--workers", "1", "--repeat", "3", "--json", str(out)]) == 0
    (cpu,) = json.loads(out.read_text())
    assert cpu["repeat"] == 3
    for name in ("fnn", "tfn"):
        for kind in ("baseline", "batched"):
            runs = cpu["samples"][f"{name}_{kind}"]
            assert len(runs) == 3 and all(r > 0 for r in runs)
            assert cpu[name][f"{kind}_run_steps_per_s"] == sorted(runs)[1]
        assert cpu[name]["ratio"] == cpu[name]["batched_run_steps_per_s"] / cpu[name]["baseline_run_steps_per_s"]
    assert "TFN L=2 H=2 N=10: batched % of ceiling" in capsys.readouterr().out


def test_bench_refuses_zero_repetitions():
    with pytest.raises(SystemExit) as e:
        _bench().main(["--repeat", "0"])
    assert e.value.code == 2
