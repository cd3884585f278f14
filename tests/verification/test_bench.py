"""The benchmark script runs end to end with tiny settings and reports medians of its repetitions."""

import json

import pytest
from _bench_scripts import load_bench

torch = pytest.importorskip("torch")


def _bench():
    return load_bench("trainer")


def test_bench_reports_the_median_of_interleaved_repetitions(tmp_path, capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "matmul_ceiling", lambda device, seconds=1.0: 1e9)  # the 1 s probe, stubbed
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--fnn-steps",
                "4",
                "--tfn-steps",
                "2",
                "--fnn-runs",
                "2",
                "--tfn-runs",
                "1",
                "--workers",
                "1",
                "--repeat",
                "3",
                "--json",
                str(out),
            ]
        )
        == 0
    )
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


def _counted_flops(step) -> int:
    """The matrix-product FLOPs ``step()`` runs, by ``torch.utils.flop_counter`` (in-place ``baddbmm_``,
    which it does not know, counted as ``baddbmm``)."""
    from torch.utils.flop_counter import FlopCounterMode

    def baddbmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
        b, m, k = a_shape
        return 2 * b * m * k * b_shape[-1]

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_})
    with counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("model", ["fnn", "tfn"])
def test_flop_counts_are_the_products_the_steps_run(model):
    """The fractions of the ceiling rest on these counts: the baseline's (autograd) step and the batched
    trainer's hand-written step each run, to the D x D products left out (under 1%), what the formulas say."""
    bench = _bench()
    from verification.trainer import BatchStream

    make = bench._fnn_stack if model == "fnn" else bench._tfn_stack
    stack, tstack, shape = make(1, torch.device("cpu"))
    x = BatchStream(4, bench.BATCH, shape).next().float().unsqueeze(0)  # (1, 256, *shape)
    y = tstack.forward(x).detach()

    def baseline_step():
        ((stack.forward(x) - y) ** 2).mean().backward()

    baseline = _counted_flops(baseline_step)
    batched = _counted_flops(lambda: stack.loss_and_grads(x, y))
    formula = bench.fnn_flops() if model == "fnn" else bench.tfn_flops()
    batched_formula = bench.fnn_flops() if model == "fnn" else bench.tfn_batched_flops()
    assert formula <= baseline <= 1.01 * formula
    assert batched_formula <= batched <= 1.01 * batched_formula
