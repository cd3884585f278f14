"""Benchmark: ``--backend ray`` against the local backend on this machine, and Ray's cost per task.

    python bench/ray.py                      # a Ray instance on this machine's cores
    python bench/ray.py --json ray.json      # also write the numbers

It reports
* the cost of a task: one empty task's round trip (median of ``--round-trips``) and the wall time per task
  of ``--tasks`` empty tasks submitted at once (warm workers, every CPU),
* the raised-precision construction stage: ``--highprec-cells`` constructions of a ReLU FNN whose block is
  deeper than float64 allows (D = ``--width``, ``L = --depth``, ``L̄ = 1``, ranks 1, 2, ..., evaluated on
  ``--subsample`` test and shifted inputs), built by
  :func:`verification.sweep.constructions.build_highprec_constructions` in its local process pool and as
  Ray tasks (:class:`verification.sweep.cluster.RayBackend`), each with every core: constructions per
  second, and the ratio Ray / local,
* a training sweep: ``python -m verification.fnn`` (random frozen model, ``--chunk`` runs per stack) end to
  end on each backend, the local one with ``--workers`` = the cores: run-steps per second of the whole
  command, and the ratio Ray / local.
Ray is started once, before the measurements (its start is reported apart); every rate is the median of
``--repeat`` interleaved repetitions.

Then a projection (not a measurement) of the paper's whole grid, ``python -m verification.paper`` with the
transformers' raised-precision column (``--highprec``), on ``--gpus`` GPUs and ``--cores`` CPU cores:
* the raised-precision constructions: the project's model of their serial time
  (:func:`verification.sweep.constructions.highprec_estimate`, counted per experiment as ``paper --plan``
  does), scaled by what the model gets wrong here (the core-seconds a construction of the benchmark took on
  Ray over the model's value for it), over ``--cores``, plus the measured cost of a task per task;
* the float64 constructions: their count times the measured core-seconds of one (D = 16, L = 4), over
  ``--cores``;
* the training: the H200 training times of :data:`GPU_SECONDS` (docs/reproduce.md's table, one GPU), each
  experiment over ``min(--gpus, its stacks)`` (stacks of 4096 runs, one task each, split evenly), one
  experiment after the other as ``paper`` runs them; and the bound ``sum / --gpus`` when every GPU is busy
  all along (several experiments at once, or a smaller ``--chunk``).
docs/reproduce.md ("On a cluster") quotes it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

# this file's folder off the path: here ``import ray`` must find Ray, not this script
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from verification import fnn  # noqa: E402
from verification.sweep import Cell, parse_ranks  # noqa: E402
from verification.sweep.cluster import RayBackend, import_ray  # noqa: E402
from verification.sweep.constructions import build_highprec_constructions  # noqa: E402
from verification.sweep.problems import Problems, evaluation_sets  # noqa: E402
from verification.sweep.training import cpu_budget  # noqa: E402

#: seconds of training of each experiment of ``python -m verification.paper`` on one NVIDIA H200 at the full
#: protocol (docs/reproduce.md's table; tfn_L2 measured for the random frozen model only, doubled here for
#: both kinds)
GPU_SECONDS = {
    "linear": 11,
    "fnn_L2": 8,
    "fnn_L4": 7,
    "tfn_L1": 191,
    "tfn_L2": 2 * 354,
    "final_layers": 26,
    "biases": 10,
    "rank_schedule": 10,
    "depth_sweep": 109,
}


def _noop(i):
    return i


def task_costs(backend, tasks: int, round_trips: int) -> dict:
    """Seconds of one empty task's round trip (median) and per task of ``tasks`` submitted at once."""
    fn = backend.remote(_noop, num_cpus=1)
    ray = backend.ray
    ray.get([fn.remote(i) for i in range(4 * max(1, backend.resources()["cpus"]))])  # warm workers
    trips = []
    for i in range(round_trips):
        t = time.perf_counter()
        ray.get(fn.remote(i))
        trips.append(time.perf_counter() - t)
    t = time.perf_counter()
    ray.get([fn.remote(i) for i in range(tasks)])
    return {"round_trip_s": statistics.median(trips), "per_task_s": (time.perf_counter() - t) / tasks}


def _highprec_jobs(args):
    structure = ("fnn", args.width, args.depth, 1, "relu", True)
    problems = Problems()
    jobs = []
    for r in range(1, args.highprec_cells + 1):
        rank = min(r, args.width)
        cell = Cell(
            kind="random",
            structure=structure,
            method="lora",
            axis=(("rank", rank), ("i", r)),
            ranks=(rank,) * args.depth,
            highprec_subsample=args.subsample,
        )
        jobs.append((cell, 0, problems.frozen(structure, "random", 0), problems.target(structure, 0)))
    return jobs, problems, evaluation_sets(structure)


def highprec_local(jobs, sets, workers) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_highprec_constructions(jobs, sets, Path(tmp) / "c.jsonl", workers, io.StringIO())
        return len(jobs) / (time.perf_counter() - t)


def highprec_ray(backend, jobs, problems, sets) -> float:
    """As the driver does it: the inputs into the object store once, every construction a task."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        stored = backend.store(problems, [c for c, *_ in jobs], [0])
        sets_ref = backend.put(sets)

        def run(todo, keep):
            keys = {(cell, seed): key for key, cell, seed, _f, _t in todo}
            backend.constructions(list(keys), stored, sets_ref, lambda m, _ref, value: keep(keys[m], *m, value))

        build_highprec_constructions(jobs, sets, Path(tmp) / "c.jsonl", 1, io.StringIO(), run=run)
        return len(jobs) / (time.perf_counter() - t)


def float64_seconds(count: int = 8) -> float:
    """Core-seconds of one float64 construction (ReLU FNN, D = 16, L = 4, L̄ = 2; ranks 1, 2, ...)."""
    from verification.sweep.constructions import build_construction

    structure = ("fnn", 16, 4, 2, "relu", True)
    problems = Problems()
    sets = evaluation_sets(structure)
    frozen, target = problems.frozen(structure, "random", 0), problems.target(structure, 0)
    t = time.perf_counter()
    for r in range(1, count + 1):
        cell = Cell(kind="random", structure=structure, method="lora", axis=(("rank", r),), ranks=(r,) * 4)
        build_construction(cell, frozen, target, sets)
    return (time.perf_counter() - t) / count


def paper_grid() -> list:
    """Per experiment of ``verification.paper`` (the transformers with ``--highprec``): ``(name, runs,
    stacks on CUDA, float64 constructions, raised-precision constructions, their modelled serial seconds)``."""
    import importlib

    from verification import paper
    from verification.sweep.cli import _normalise, base_parser
    from verification.sweep.constructions import _takes_highprec, highprec_estimate
    from verification.sweep.training import _chunks, make_runs

    out = []
    plain = paper._parser().parse_args([])
    for step in paper.STEPS:
        spec = importlib.import_module(f"verification.{step.module}").SPEC
        argv = paper.step_argv(step, plain) + (["--highprec"] if step.module == "tfn" else [])
        a = base_parser(spec).parse_args(argv)
        _normalise(spec, a)
        cells = spec.cells(a)
        runs = make_runs(spec, a, cells)
        count, seconds = highprec_estimate(cells, a.seeds)
        f64 = a.seeds * sum(1 for c in cells if not _takes_highprec(c))
        out.append((step.name, len(runs), len(list(_chunks(runs, 4096, False))), f64, count, seconds))
    return out


def projection(results: dict, args, bench_model_seconds: float) -> dict:
    """The paper's grid on ``args.gpus`` GPUs and ``args.cores`` cores (see the module's docstring)."""
    grid = paper_grid()
    cpus = results["cluster"]["cpus"]
    measured = cpus / results["highprec_ray"]  # core-seconds of one benchmark construction on Ray
    scale = measured / bench_model_seconds
    per_task = results["task"]["per_task_s"]
    hp_count = sum(g[4] for g in grid)
    hp = sum(g[5] for g in grid) * scale / args.cores + hp_count * per_task
    f64_count = sum(g[3] for g in grid)
    f64 = f64_count * results["float64_s"] / args.cores + f64_count * per_task
    sequential = sum(GPU_SECONDS[g[0]] / min(args.gpus, g[2]) for g in grid)
    return {
        "gpus": args.gpus,
        "cores": args.cores,
        "raised_precision_constructions": hp_count,
        "raised_precision_core_s": sum(g[5] for g in grid) * scale,
        "raised_precision_s": hp,
        "float64_constructions": f64_count,
        "float64_s": f64,
        "training_gpu_s": sum(GPU_SECONDS.values()),
        "training_s_paper_order": sequential,
        "training_s_all_gpus_busy": sum(GPU_SECONDS.values()) / args.gpus,
        "stacks": {g[0]: g[2] for g in grid},
        "model_scale": scale,
    }


def sweep(args, backend_name: str, cores: int) -> float:
    """Run-steps per second of the whole ``verification.fnn`` command on ``backend_name``."""
    flags = [
        "--width", str(args.width), "--depth", "4", "--ranks", args.ranks, "--seeds", str(args.seeds),
        "--iterations", str(args.iterations), "--frozen", "random", "--weight-decay", "0",
        "--chunk", str(args.chunk), "--no-figure", "--backend", backend_name,
    ]  # fmt: skip
    if backend_name == "local":
        flags += ["--workers", str(cores)]
    runs = len(parse_ranks(args.ranks, args.width)) * args.seeds * 3
    with tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        assert fnn.main(flags + ["--out", str(Path(tmp) / "s")]) == 0
        return runs * args.iterations / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/ray.py", description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="a running Ray cluster (default: one started here)")
    p.add_argument("--tasks", type=int, default=200, help="empty tasks submitted at once (default 200)")
    p.add_argument("--round-trips", type=int, default=20, help="empty tasks one after the other (default 20)")
    p.add_argument("--highprec-cells", type=int, default=8, help="raised-precision constructions (default 8)")
    p.add_argument("--width", type=int, default=16, help="D (default 16)")
    p.add_argument("--depth", type=int, default=8, help="L of the raised-precision block (default 8)")
    p.add_argument("--subsample", type=int, default=16, help="inputs each is evaluated on (default 16)")
    p.add_argument("--ranks", default="1-16", help="the sweep's ranks (default 1-16)")
    p.add_argument("--seeds", type=int, default=2, help="the sweep's seeds (default 2)")
    p.add_argument("--iterations", type=int, default=100, help="the sweep's Adam steps (default 100)")
    p.add_argument("--chunk", type=int, default=16, help="the sweep's runs per stack (default 16)")
    p.add_argument("--repeat", type=int, default=1, help="interleaved repetitions, medians reported")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the projected cluster (default 8)")
    p.add_argument("--cores", type=int, default=64, help="CPU cores of the projected cluster (default 64)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    ray = import_ray()
    budget = cpu_budget()
    cores = budget["cores"]
    t = time.perf_counter()
    ray.init(
        **({"address": args.address} if args.address else {"num_cpus": cores}),
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    start = time.perf_counter() - t
    results = {"cores": cores, "load": budget["load"], "ray_version": ray.__version__, "ray_start_s": start}
    try:
        with RayBackend(args.address) as backend:  # the connection made above
            results["cluster"] = backend.resources()
            results["task"] = task_costs(backend, args.tasks, args.round_trips)
            jobs, problems, sets = _highprec_jobs(args)
            results["float64_s"] = float64_seconds()
            rates = {"highprec_local": [], "highprec_ray": [], "sweep_local": [], "sweep_ray": []}
            for _ in range(args.repeat):
                rates["highprec_local"].append(highprec_local(jobs, sets, cores))
                rates["highprec_ray"].append(highprec_ray(backend, jobs, problems, sets))
                rates["sweep_local"].append(sweep(args, "local", cores))
                rates["sweep_ray"].append(sweep(args, "ray", cores))
            for k, v in rates.items():
                results[k] = statistics.median(v)
    finally:
        ray.shutdown()
    results["highprec_ratio"] = results["highprec_ray"] / results["highprec_local"]
    from verification.sweep.constructions import highprec_estimate

    bench_model = highprec_estimate([c for c, *_ in jobs], 1)[1] / len(jobs)
    results["projection"] = proj = projection(results, args, bench_model)
    results["sweep_ratio"] = results["sweep_ray"] / results["sweep_local"]
    c = results["cluster"]
    print(
        f"Ray {results['ray_version']} on {c['nodes']} node(s), {c['cpus']} CPUs ({cores} cores here, 1-minute "
        f"load {budget['load']:.1f}); Ray started in {start:.1f} s"
    )
    print(
        f"  a task: {1e3 * results['task']['round_trip_s']:.2f} ms round trip, "
        f"{1e3 * results['task']['per_task_s']:.2f} ms each of {args.tasks} at once"
    )
    print(
        f"  raised-precision constructions (D={args.width}, L={args.depth}, {args.subsample} inputs): "
        f"{results['highprec_local']:.3f}/s local pool, {results['highprec_ray']:.3f}/s Ray: "
        f"ratio {results['highprec_ratio']:.2f}"
    )
    print(
        f"  training sweep (fnn, D={args.width}, ranks {args.ranks}, {args.seeds} seeds x 3 lr, "
        f"{args.iterations} steps, {args.chunk} runs a stack): {results['sweep_local']:,.0f} run-steps/s local, "
        f"{results['sweep_ray']:,.0f} Ray: ratio {results['sweep_ratio']:.2f}"
    )
    print(f"  a float64 construction (D=16, L=4): {results['float64_s']:.3f} s")
    print(
        f"projection (computed, not measured) of python -m verification.paper with the transformers' --highprec, "
        f"on {proj['gpus']} GPUs and {proj['cores']} cores:\n"
        f"  {proj['raised_precision_constructions']} raised-precision constructions, "
        f"{proj['raised_precision_core_s'] / 3600:.1f} core-hours: {proj['raised_precision_s'] / 60:.1f} min; "
        f"{proj['float64_constructions']} float64 constructions: {proj['float64_s']:.0f} s\n"
        f"  training: {proj['training_gpu_s'] / 60:.1f} GPU-minutes (H200); {proj['training_s_paper_order'] / 60:.1f} "
        f"min with the default stacks one experiment after the other (stacks {proj['stacks']}), "
        f"{proj['training_s_all_gpus_busy'] / 60:.1f} min with every GPU busy"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
