"""Gradient-trained runs: the run list, stacking runs into one batched model, evaluation, CPU budget."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from ..outdir import CLIError
from ..trainer import FNNStack, TFNStack, fnn_apply, tfn_apply, train_stack
from .problems import _input_shape
from .protocol import TAG_INIT, Run, _hash, _seed_int, structure_of
from .records import _json_default


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; CUDA asked for where there
    is none is a :class:`CLIError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(name)
    raise CLIError(f"--device: unknown device {name!r} (use auto, cpu or cuda)")


def config_extra(spec, args) -> dict | None:
    """``spec.config_extra(args)`` as JSON values, ``None`` when the experiment declares nothing."""
    if spec.config_extra is None:
        return None
    extra = spec.config_extra(args)
    return json.loads(json.dumps(extra, sort_keys=True, default=_json_default)) if extra else None


def make_runs(spec, args, cells) -> list[Run]:
    """Every run of the sweep (a :class:`Run` each); ``id`` hashes ``config``,
    which holds everything the run's result depends on (cell, seed, grid point, steps, selection, dtype
    and the experiment's :attr:`ExperimentSpec.config_extra`)."""
    extra = config_extra(spec, args)
    runs = []
    for cell in cells:
        for seed in range(args.seeds):
            for lr in args.lr_grid:
                for wd in args.wd_grid:
                    config = {
                        "experiment": spec.name,
                        "cell": cell.as_dict(),
                        "seed": seed,
                        "lr": lr,
                        "weight_decay": wd,
                        "iterations": args.iterations,
                        "batch_size": 256,
                        "select": args.select,
                        "validate_every": args.validate_every if args.select == "best" else None,
                        "dtype": args.dtype,
                    }
                    if extra is not None:
                        config["extra"] = extra
                    runs.append(Run(_hash(config), config, cell, seed, lr, wd))
    return runs


def _chunks(runs, size, split_seeds=True):
    """Stacks of at most ``size`` runs of one structure and method; on a CPU also of one seed (then the
    batch and the target are broadcast, not gathered)."""
    groups = {}
    for r in runs:
        c = r.cell
        key = (c.structure, c.method) + ((r.seed,) if split_seeds else ())
        groups.setdefault(key, []).append(r)
    for key, group in groups.items():
        group.sort(key=lambda r: (r.seed, r.cell.kind))
        for i in range(0, len(group), size):
            yield key[:2], group[i : i + size]


def _stack_for(chunk, problems, dtype, device):
    """The stack of ``chunk``'s runs. LoRA ranks are padded to the width ``D`` whatever the chunk holds, so a
    run's arithmetic, hence its result, does not depend on ``--chunk`` or on the runs stacked with it."""
    cell0 = chunk[0].cell
    structure, method = cell0.structure, cell0.method  # a named structure (Cell converts)
    frozen = [problems.frozen(structure, r.cell.kind, r.seed) for r in chunk]
    init_seeds = [_seed_int(r.seed, TAG_INIT, int(_hash(r.cell.as_dict())[:12], 16)) for r in chunk]
    tune = [r.cell.tune_bias for r in chunk]
    if structure.family == "fnn":
        W = np.stack([np.stack(f.weights) for f in frozen])  # (R, L, D, D)
        b = np.stack([np.stack(f.biases) for f in frozen])  # (R, L, D)
        kw = dict(activation=structure.activation, final_relu=structure.final_relu, dtype=dtype, device=device)
        if method == "lora":
            return FNNStack(
                W,
                b,
                method="lora",
                ranks=[list(r.cell.ranks) for r in chunk],
                tune_bias=[t and structure.activation != "linear" for t in tune],
                init_seeds=init_seeds,
                rank_padding=structure.D,
                **kw,
            )
        return FNNStack(W, b, method="final_layers", tuned_layers=[r.cell.layers for r in chunk], **kw)
    params = {k: np.stack([f.parameters()[k] for f in frozen]) for k in frozen[0].parameters()}
    return TFNStack(
        params,
        method="lora",
        ranks=[r.cell.ranks[0] for r in chunk],
        tune_bias=tune,
        init_seeds=init_seeds,
        dtype=dtype,
        device=device,
        rank_padding=structure.D,
    )


def _target_stack(structure, targets, dtype, device):
    structure = structure_of(structure)
    if structure.family == "fnn":
        W = np.stack([np.stack(t.weights) for t in targets])  # (R, L̄, D, D)
        b = np.stack([np.stack(t.biases) for t in targets])  # (R, L̄, D)
        return FNNStack(
            W,
            b,
            method="none",
            activation=structure.activation,
            final_relu=structure.final_relu,
            dtype=dtype,
            device=device,
        )
    params = {k: np.stack([t.parameters()[k] for t in targets]) for k in targets[0].parameters()}
    return TFNStack(params, method="none", dtype=dtype, device=device)


def _eval_chunk_size(input_shape, L, n):
    """Runs evaluated at once on ``n`` inputs of ``input_shape`` through ``L`` layers (about 2e7 floats)."""
    per_run = n * int(np.prod(input_shape)) * (L + 2)
    return max(1, int(2e7 // per_run))


def _evaluate(stack, targets_out, target_index, X, device):
    """Per-run per-sample float64 errors (R, n) of the trained stack on inputs X (n, ...)."""
    structure_fnn = isinstance(stack, FNNStack)
    n = X.shape[0]
    R = stack.R
    size = _eval_chunk_size((stack.D,) if structure_fnn else (stack.D, X.shape[-1]), stack.L, n)
    Xd = X.to(device=device, dtype=torch.float64).unsqueeze(0)
    out = []
    with torch.no_grad():
        if structure_fnn:
            W, b = stack.weights_and_biases(dtype=torch.float64)
        else:
            eff = stack.effective(dtype=torch.float64)
        for i in range(0, R, size):
            sl = slice(i, i + size)
            if structure_fnn:
                pred = fnn_apply(W[sl], b[sl], Xd, stack.activation, stack.final_relu)
            else:
                pred = tfn_apply({k: v[sl] for k, v in eff.items()}, Xd)
            y = targets_out[target_index[sl]]
            err = ((pred - y) ** 2).mean(dim=tuple(range(2, pred.dim())))
            out.append(err.cpu().numpy())
    return np.concatenate(out)


def _finished(futures, handled) -> list:
    """The futures that finished cleanly and were not handled yet (after an interruption: keep their work)."""
    return [f for f in futures if f not in handled and f.done() and not f.cancelled() and f.exception() is None]


def estimate_rate(chunk, problems, dtype, device, structure, iterations) -> float:
    """Run-steps per second of a stack like ``chunk`` on this device (a few timed steps)."""
    stack = _stack_for(chunk, problems, dtype, device)
    targets = [problems.target(structure, chunk[0].seed)]
    tstack = _target_stack(structure, targets, dtype, device)
    R = len(chunk)
    kw = dict(
        data_index=[0] * R,
        target_index=[0] * R,
        target_data_index=[0],
        data_seeds=[0],
        lr=np.full(R, 1e-3),
        weight_decay=np.full(R, 0.0),
        batch_size=256,
        input_shape=_input_shape(structure),
    )
    steps = 3 if structure_of(structure).family == "tfn" else 10
    train_stack(stack, tstack, iterations=2, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    train_stack(stack, tstack, iterations=steps, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return R * steps / (time.perf_counter() - t)


def cpu_budget() -> dict:
    """The cores this process may use now: ``cores`` (those it may run on, ``os.sched_getaffinity``: a
    container's or ``taskset``'s limit, not the machine's count), ``load`` (the 1-minute load average: work of
    other processes, e.g. a second sweep) and ``free = cores - floor(load)``, at least 1. The default
    ``--workers`` is ``free``, and each worker gets ``free // workers`` torch threads, so that two sweeps
    started one after the other do not both take every core (oversubscribed threads slow each other down
    many times over)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return {"cores": cores, "load": load, "free": max(1, cores - min(cores, int(load)))}


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
