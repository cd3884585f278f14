"""CUDA: the batched trainer on the GPU trains the same runs as on the CPU (same data, drawn on the CPU)."""

import json

import numpy as np
import pytest
import torch

import lora_theory
from lora_theory.numerics import relative_error
from verification.trainer import FNNStack, TFNStack, train_stack

pytestmark = pytest.mark.gpu


def _train(device, family, shared=False):
    R = 3
    if family == "fnn":
        frozen = [lora_theory.random_fnn(6, 3, seed=i) for i in range(R)]
        target = lora_theory.random_fnn(6, 1, seed=50)
        stack = FNNStack(
            np.stack([np.stack(f.weights) for f in frozen]),
            np.stack([np.stack(f.biases) for f in frozen]),
            ranks=[[1, 2, 3], [2, 2, 2], [6, 0, 1]],
            tune_bias=[True, False, True],
            init_seeds=[1, 2, 3],
            dtype=torch.float64,
            device=device,
        )
        tstack = FNNStack(
            np.stack(target.weights)[None],
            np.stack(target.biases)[None],
            method="none",
            dtype=torch.float64,
            device=device,
        )
        shape = (6,)
    else:
        frozen = [lora_theory.random_tfn(4, 2, 2, seed=i) for i in range(R)]
        target = lora_theory.random_tfn(4, 2, 2, seed=50)
        stack = TFNStack(
            {k: np.stack([f.parameters()[k] for f in frozen]) for k in frozen[0].parameters()},
            ranks=[1, 2, 4],
            tune_bias=[True, False, True],
            init_seeds=[1, 2, 3],
            dtype=torch.float64,
            device=device,
        )
        tstack = TFNStack(
            {k: v[None] for k, v in target.parameters().items()}, method="none", dtype=torch.float64, device=device
        )
        shape = (4, 3)
    # two data seeds: every run its own batch; one: a batch shared by every run (passed with stride 0)
    data = dict(data_index=[0, 0, 0], data_seeds=[5]) if shared else dict(data_index=[0, 1, 0], data_seeds=[5, 6])
    train_stack(
        stack,
        tstack,
        target_index=[0, 0, 0],
        target_data_index=[0],
        lr=[1e-2, 1e-3, 3e-3],
        weight_decay=[0, 1e-3, 1e-2],
        iterations=50,
        batch_size=32,
        input_shape=shape,
        **data,
    )
    return {k: p.detach().cpu().numpy() for k, p in stack.params.items()}


@pytest.mark.parametrize("family, shared", [("fnn", False), ("tfn", False), ("fnn", True), ("tfn", True)])
def test_cuda_trains_the_same_runs_as_cpu(family, shared):
    cpu, gpu = _train("cpu", family, shared), _train("cuda", family, shared)
    for k in cpu:
        assert relative_error(gpu[k], cpu[k]) <= 1e-9, k


def test_cli_on_cuda(tmp_path):
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
                "20",
                "--ranks",
                "1,4",
                "--device",
                "cuda",
                "--out",
                str(out),
                "--no-figure",
            ]
        )
        == 0
    )
    records = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert all(r["device"].startswith("cuda") for r in records)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_advise_on_cuda_finds_what_the_cpu_finds(tmp_path, capsys, arch):
    """The advisor's streaming pass with ``--device cuda``: the planted ranks, and the CPU's spectra to
    float32 rounding; the adapter it extracts on the GPU reproduces the tuned model."""
    import warnings

    from test_real_checkpoints import build_pair, load_float32, outputs, rel

    from verification.advise import main
    from verification.extract import STORAGE_ROUNDOFF
    from verification.peft_export import load_peft_adapter

    base, tuned, plants = build_pair(arch, tmp_path, torch.bfloat16, sharded=True)
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"out-{device}"
        extract = ["--extract", str(tmp_path / "adapter")] if device == "cuda" else []
        assert main([str(base), str(tuned), "--out", str(out), "--quiet", "--device", device, *extract]) == 0
        reports[device] = {l["name"]: l for l in json.loads((out / "report.json").read_text())["layers"]}
    capsys.readouterr()
    ranks = {k: l["rank_above_floor"] for k, l in reports["cuda"].items() if l["rank_above_floor"]}
    assert ranks == plants
    for name, layer in reports["cpu"].items():
        s_cpu, s_gpu = np.array(layer["singular_values"]), np.array(reports["cuda"][name]["singular_values"])
        assert relative_error(s_gpu, s_cpu) <= 1e-5, name
    want = outputs(arch, load_float32(arch, tuned))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = outputs(arch, load_peft_adapter(load_float32(arch, base), tmp_path / "adapter"))
    assert rel(got, want) <= 16 * STORAGE_ROUNDOFF["bfloat16"]
