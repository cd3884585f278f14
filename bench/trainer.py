"""Benchmark: the batched trainer against the same model trained one run at a time with torch.optim.Adam.

    python bench/trainer.py                 # CPU, FNN (L̄=2, L=4) and TFN (L=2, H=2, N=10), D=16, batch 256
    python bench/trainer.py --device cuda   # adds the CUDA column and an estimate of the paper's grid

For each model it reports run-steps per second of
* the baseline: one run at a time, the same model code (a stack of one run, autograd) with
  ``torch.optim.Adam``, a fresh batch and the target's output every step (the work of the authors' loop),
  on a CPU the better of one thread and all threads,
* the batched trainer (:func:`verification.trainer.train_stack`): on a CPU one stack per core trained at
  once, 64 FNN runs per stack as the CLIs use them and 8 TFN runs (the CLIs' 64 measured no faster for the
  TFN); on CUDA all runs in one stack,
the ratio, and the fraction of the arithmetic ceiling: FLOPs per run-step over the float32 matmul rate
measured here on one large square product with the same threads. The FLOPs are those of the baseline's step
for both (so the two fractions compare rates of the same work); the TFN's batched step reaches the same
result with a fifth fewer products, and a second row gives its fraction counting only those. Every rate is
measured ``--repeat`` times (default 3), interleaved, and reported as the median: on a shared machine single
measurements of the same code vary by a factor of up to 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_theory  # noqa: E402
from verification.trainer import BatchStream, FNNStack, TFNStack, train_stack  # noqa: E402

D, BATCH, RANK = 16, 256, 4
FNN_L, FNN_LBAR = 4, 2
TFN_L, TFN_H, TFN_N = 2, 2, 10
# the paper's grid (THEORY.md §4): 16,680 runs of 5000 steps, 3,840 of them TFN (L = 1, 2)
GRID_RUNS, GRID_TFN_RUNS, GRID_STEPS = 16_680, 3_840, 5000


def fnn_flops() -> float:
    """Per run-step: forward ``2nD²`` per layer, backward ``2nD²`` (weight gradient) + ``2nD²`` (input
    gradient, not for layer 1); the LoRA products ``B A`` and the optimiser are negligible."""
    return 2 * BATCH * D * D * (FNN_L + FNN_L + FNN_L - 1)


def _tfn_forward_flops() -> tuple[float, float, float]:
    """``(forward, projection, attention)``: the forward's FLOPs per run-step (per block and head three
    projections ``W_K Z``, ``W_Q Z``, ``W_O W_V Z`` and two ``N x N`` products, then the two feed-forward
    layers; the output layer) and the sizes of one projection and one attention product."""
    projection = 2 * BATCH * TFN_N * D * D
    attention = 2 * BATCH * TFN_N * TFN_N * D
    forward = TFN_L * (TFN_H * (3 * projection + 2 * attention) + 2 * projection) + projection
    return forward, projection, attention


def tfn_flops() -> float:
    """Per run-step, the products of the baseline's step (autograd through ``tfn_apply``): the forward, and
    backward two products of the forward's size for each (a weight and an input gradient; both operands'
    gradients for the ``N x N`` products) less what it does not compute: the input gradients of the first
    block's projections (the input needs none) and ``W1``'s weight gradients (never adapted). The ``D x D``
    products (``B A``, ``W_O W_V``, the adapters' gradients) are left out: a few per mille. Both fractions
    of the ceiling use this count, so they compare rates of the same work."""
    forward, projection, _ = _tfn_forward_flops()
    return 3 * forward - (TFN_H * 3 + TFN_L) * projection


def tfn_batched_flops() -> float:
    """Per run-step, the products the batched trainer's hand-written step runs for the same result
    (:meth:`verification.trainer.TFNStack.loss_and_grads`): the scores as the bilinear form
    ``Z (W_K^T W_Q) Z^T`` (one projection per head instead of two, one weight gradient instead of two, one
    input-gradient projection instead of two), and ``W2``'s weight gradient in the last block only."""
    forward, projection, attention = _tfn_forward_flops()
    forward -= TFN_L * TFN_H * projection
    first = TFN_H * (3 * attention + 2 * projection)  # dS, dV, dP; W_K^T W_Q's and W_O W_V's gradients
    later = TFN_H * (4 * attention + 4 * projection)  # ... and the block input's: dP G^T, dS^T P, dV OV
    blocks = TFN_L * 2 * projection + projection  # dH = dZ W2, dA = dH W1; W2's gradient (last block)
    return forward + first + (TFN_L - 1) * later + blocks + 2 * projection  # the output layer's two


def matmul_ceiling(device, seconds=1.0) -> float:
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c = a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    c.sum().item()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- baseline


def baseline(make, device, steps):
    """One run at a time: the same stacked model code with a single run (``R = 1``), autograd, and
    ``torch.optim.Adam(weight_decay=...)`` over its adapters and biases; a fresh batch and the target's
    output every step."""
    stack, tstack, shape = make(1, device)
    opt = torch.optim.Adam(list(stack.params.values()), lr=1e-3, weight_decay=1e-4)
    stream = BatchStream(4, BATCH, shape)

    def step():
        x = stream.next().to(device=device, dtype=torch.float32).unsqueeze(0)  # (1, n, *shape)
        with torch.no_grad():
            y = tstack.forward(x)
        loss = ((stack.forward(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _time_steps(step, steps, device)


def _time_steps(step, steps, device):
    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- batched


def _fnn_stack(R, device):
    frozen = [lora_theory.random_fnn(D, FNN_L, seed=i) for i in range(R)]
    target = lora_theory.random_fnn(D, FNN_LBAR, seed=1000)
    W = np.stack([np.stack(f.weights) for f in frozen])
    b = np.stack([np.stack(f.biases) for f in frozen])
    ranks = np.repeat((np.arange(R) % D + 1)[:, None], FNN_L, 1)
    stack = FNNStack(W, b, ranks=ranks, tune_bias=np.ones(R, bool), init_seeds=np.arange(R), device=device)
    tstack = FNNStack(np.stack(target.weights)[None], np.stack(target.biases)[None], method="none", device=device)
    return stack, tstack, (D,)


def _tfn_stack(R, device):
    frozen = [lora_theory.random_tfn(D, TFN_L, TFN_H, seed=i) for i in range(R)]
    target = lora_theory.random_tfn(D, TFN_L, TFN_H, seed=1000)
    params = {k: np.stack([f.parameters()[k] for f in frozen]) for k in frozen[0].parameters()}
    stack = TFNStack(
        params, ranks=np.arange(R) % D + 1, tune_bias=np.ones(R, bool), init_seeds=np.arange(R), device=device
    )
    tstack = TFNStack({k: v[None] for k, v in target.parameters().items()}, method="none", device=device)
    return stack, tstack, (D, TFN_N)


def batched(make, R, steps, device, workers):
    """Run-steps/s of ``workers`` stacks of ``R`` runs trained at once (threads on a CPU)."""
    stacks = [make(R, device) for _ in range(workers)]

    def train(item, it):
        stack, tstack, shape = item
        train_stack(
            stack,
            tstack,
            data_index=np.zeros(R, int),
            target_index=np.zeros(R, int),
            target_data_index=[0],
            data_seeds=[7],
            lr=np.full(R, 1e-3),
            weight_decay=np.full(R, 1e-4),
            iterations=it,
            batch_size=BATCH,
            input_shape=shape,
        )

    for item in stacks:
        train(item, 2)
    _sync(device)
    t0 = time.perf_counter()
    if workers == 1:
        train(stacks[0], steps)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda item: train(item, steps), stacks))
    _sync(device)
    return R * steps * workers / (time.perf_counter() - t0)


def measure(device, args) -> dict:
    """Every rate ``args.repeat`` times, the repetitions interleaved (ceilings, then each model's baseline
    and batched trainer, then again), so that a slow spell of a shared machine touches all of them alike;
    the medians are reported (and the spread under ``"samples"``), the fractions of the ceiling from them."""
    cores = os.cpu_count() or 1
    workers = 1 if device.type == "cuda" else (args.workers or cores)
    fnn_R = args.fnn_runs or (64 if device.type == "cpu" else 1920)
    tfn_R = args.tfn_runs or (8 if device.type == "cpu" else 512)
    models = (
        ("fnn", _fnn_stack, fnn_flops(), fnn_R, args.fnn_steps),
        ("tfn", _tfn_stack, tfn_flops(), tfn_R, args.tfn_steps),
    )
    runs_flops = {"fnn": fnn_flops(), "tfn": tfn_batched_flops()}  # what the batched step itself runs
    samples = {"ceiling_batched": [], "ceiling_loop": []}
    for name, *_ in models:
        samples[f"{name}_baseline"], samples[f"{name}_batched"] = [], []
    for _ in range(args.repeat):
        if device.type == "cpu":
            torch.set_num_threads(max(1, cores // workers))
        samples["ceiling_batched"].append(matmul_ceiling(device))
        if device.type == "cpu":
            torch.set_num_threads(cores)
        samples["ceiling_loop"].append(matmul_ceiling(device))
        for name, make, _flops, R, steps in models:
            if device.type == "cpu":
                torch.set_num_threads(1)
            loop = baseline(make, device, max(10, steps // 2))
            if device.type == "cpu" and cores > 1:  # the baseline gets the better of one thread and all of them
                torch.set_num_threads(cores)
                loop = max(loop, baseline(make, device, max(10, steps // 2)))
            if device.type == "cpu":
                torch.set_num_threads(max(1, cores // workers))
            samples[f"{name}_baseline"].append(loop)
            samples[f"{name}_batched"].append(batched(make, R, steps, device, workers))
    med = {k: float(np.median(v)) for k, v in samples.items()}
    if device.type == "cpu":
        torch.set_num_threads(cores)
    out = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "workers": workers,
        "repeat": args.repeat,
        "matmul_gflops": med["ceiling_loop"] / 1e9,
        "samples": samples,
    }
    batched_ceiling = med["ceiling_batched"] * (workers if device.type == "cpu" else 1)  # all stacks at once
    for name, _make, flops, R, _steps in models:
        loop, fast = med[f"{name}_baseline"], med[f"{name}_batched"]
        out[name] = {
            "runs_per_stack": R,
            "baseline_run_steps_per_s": loop,
            "batched_run_steps_per_s": fast,
            "ratio": fast / loop,
            "flops_per_run_step": flops,
            "baseline_fraction_of_ceiling": loop * flops / med["ceiling_loop"],
            "batched_fraction_of_ceiling": fast * flops / batched_ceiling,
            "batched_flops_run": runs_flops[name],
            "batched_fraction_of_ceiling_run": fast * runs_flops[name] / batched_ceiling,
        }
    fnn_rate, tfn_rate = out["fnn"]["batched_run_steps_per_s"], out["tfn"]["batched_run_steps_per_s"]
    out["fnn_depth4_default_minutes"] = 1920 * 5000 / fnn_rate / 60
    out["paper_grid_hours"] = (
        (GRID_RUNS - GRID_TFN_RUNS) * GRID_STEPS / fnn_rate + GRID_TFN_RUNS * GRID_STEPS / tfn_rate
    ) / 3600
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda", "both"), default="cpu")
    p.add_argument("--fnn-steps", type=int, default=200)
    p.add_argument("--tfn-steps", type=int, default=20)
    p.add_argument("--fnn-runs", type=int, default=None, help="runs per stack (default 64 CPU, 1920 CUDA)")
    p.add_argument("--tfn-runs", type=int, default=None, help="runs per stack (default 8 CPU, 512 CUDA)")
    p.add_argument("--workers", type=int, default=None, help="CPU stacks at once (default: CPU count)")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="measure every rate this many times, interleaved, and report the medians (default 3)",
    )
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.device in ("cuda", "both") and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    devices = {"cpu": ["cpu"], "cuda": ["cpu", "cuda"], "both": ["cpu", "cuda"]}[args.device]
    results = [measure(torch.device(d), args) for d in devices]
    cols = [r["device"] for r in results]
    print(f"{'':44}" + "".join(c.rjust(14) for c in cols))
    rows = [
        ("matmul ceiling (GFLOP/s, float32)", lambda r: f"{r['matmul_gflops']:.1f}"),
        (
            "stacks at once x threads each",
            lambda r: f"{r['workers']} x {max(1, r['threads'] // r['workers']) if r['device'] == 'cpu' else '-'}",
        ),
    ]
    for m in ("fnn", "tfn"):
        title = "FNN L̄=2 L=4" if m == "fnn" else "TFN L=2 H=2 N=10"
        rows += [
            (f"{title}: runs per stack", lambda r, m=m: f"{r[m]['runs_per_stack']}"),
            (f"{title}: baseline run-steps/s", lambda r, m=m: f"{r[m]['baseline_run_steps_per_s']:,.0f}"),
            (f"{title}: batched run-steps/s", lambda r, m=m: f"{r[m]['batched_run_steps_per_s']:,.0f}"),
            (f"{title}: ratio batched / baseline", lambda r, m=m: f"{r[m]['ratio']:.1f}x"),
            (f"{title}: baseline % of ceiling", lambda r, m=m: f"{100 * r[m]['baseline_fraction_of_ceiling']:.1f}%"),
            (f"{title}: batched % of ceiling", lambda r, m=m: f"{100 * r[m]['batched_fraction_of_ceiling']:.1f}%"),
        ]
        if m == "tfn":
            rows.append(
                (f"{title}: same, FLOPs it runs", lambda r: f"{100 * r['tfn']['batched_fraction_of_ceiling_run']:.1f}%")
            )
    rows += [
        ("fnn --depth 4 default (1,920 x 5000), min", lambda r: f"{r['fnn_depth4_default_minutes']:.1f}"),
        ("the paper's whole grid, hours", lambda r: f"{r['paper_grid_hours']:.1f}"),
    ]
    for label, fmt in rows:
        print(f"{label:44}" + "".join(fmt(r).rjust(14) for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
