"""One sweep end to end: problems, constructions, stacked training, records, summaries (:func:`execute`)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from ..outdir import append_lines, open_log
from ..trainer import train_stack
from .constructions import _takes_highprec, build_construction, build_highprec_constructions, highprec_message
from .figures import make_figure
from .folder import _atomic_write
from .problems import Problems, _input_shape, _model_outputs, evaluation_sets
from .protocol import TAG_DATA, ExperimentSpec, _hash, _seed_int
from .records import RunLosses, RunRecord, _end_cut_line, _json_default, _load_records, _num, versions
from .report import format_csv
from .summary import summarize
from .training import (
    _chunks,
    _duration,
    _evaluate,
    _finished,
    _stack_for,
    _target_stack,
    config_extra,
    cpu_budget,
    estimate_rate,
    make_runs,
    resolve_device,
)


def execute(spec: ExperimentSpec, args, out: Path, progress_file=None, cells=None) -> dict:
    """The sweep of ``spec`` into ``out``, on this machine or, with ``--backend ray``, as Ray tasks
    (:mod:`verification.sweep.cluster`); the records and the summary do not depend on which."""
    if getattr(args, "backend", "local") == "ray":
        from .cluster import RayBackend

        hint = f": the finished records are kept, --resume {out} goes on"
        with RayBackend(getattr(args, "address", None), hint, progress_file) as backend:
            return _execute(spec, args, out, progress_file, cells, backend)
    return _execute(spec, args, out, progress_file, cells, None)


def _execute(spec: ExperimentSpec, args, out: Path, progress_file, cells, backend) -> dict:
    from tqdm import tqdm

    progress_file = sys.stderr if progress_file is None else progress_file
    device = resolve_device(args.device) if backend is None else backend.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    chunk_size = args.chunk or (4096 if device.type == "cuda" else 64)
    budget = cpu_budget()
    workers = args.workers if args.workers else (1 if device.type == "cuda" else budget["free"])
    cpu_line = None
    if backend is not None:
        workers = backend.slots(device)  # the stacks the cluster trains at once
        cpu_line = backend.describe(device)
    elif device.type == "cpu":
        threads = max(1, budget["free"] // workers)
        torch.set_num_threads(threads)
        cpu_line = (
            f"  CPU: {budget['free']} of {budget['cores']} cores free here (1-minute load "
            f"{budget['load']:.1f}): {workers} stack{'s' if workers > 1 else ''} at once, {threads} torch "
            f"thread{'s' if threads > 1 else ''} each (--workers sets it)"
        )
    cells = spec.cells(args) if cells is None else cells
    runs = make_runs(spec, args, cells)
    runs_path = out / "runs.jsonl"
    records = {}
    for r in _load_records(runs_path, RunRecord.is_valid, report=True):
        if r["experiment"] == spec.name:
            records.setdefault(r["id"], r)  # a run written twice (an older version's bug): the first
    records = list(records.values())
    done = {r["id"] for r in records}
    todo = [] if args.construction_only else [r for r in runs if r.id not in done]
    extra = config_extra(spec, args)
    problems = Problems(
        cache=out / "pretrained",
        make_target=None
        if spec.make_target is None
        else (lambda structure, seed: spec.make_target(args, structure, seed)),
        key="" if extra is None else _hash(extra)[:12],
    )
    if args.construction_only:
        print(
            f"{spec.name}: constructions only, no training ({len(done)} of {len(runs)} runs already done); "
            f"output {out}",
            file=progress_file,
        )
    else:
        print(
            f"{spec.name}: {len(runs)} runs x {args.iterations} steps ({len(runs) - len(todo)} already done); "
            f"device {device}, training in {args.dtype}; output {out}",
            file=progress_file,
        )
    if cpu_line and todo:
        print(cpu_line, file=progress_file)
    if todo:  # before any pretraining: the estimate times stacks on random frozen models (the speed is the same)
        first_key, first_chunk = next(_chunks(todo, chunk_size, device.type == "cpu"))
        probe = [dataclasses.replace(r, cell=dataclasses.replace(r.cell, kind="random")) for r in first_chunk]
        if backend is None:
            rate = estimate_rate(probe, problems, dtype, device, first_key[0], args.iterations)
        else:  # timed on a worker: the speed of the cluster's stacks, not this machine's
            rate = backend.rate(probe, problems, dtype, device, first_key[0], args.iterations)
        total = len(todo) * args.iterations
        parallel = max(1, min(workers, len(list(_chunks(todo, chunk_size, device.type == "cpu")))))
        eta = total / (rate * parallel)
        msg = (
            f"  about {rate:,.0f} run-steps/s per stack {'here' if backend is None else 'on a worker'} "
            f"({parallel} at once): {total:,} run-steps, "
            f"estimated {_duration(eta)} of training"
        )
        if eta > 3600:
            msg += " (hours of arithmetic on this device: consider --quick or --device cuda)"
        print(msg, file=progress_file)
    if "pretrained" in args.kinds:
        structures = list(dict.fromkeys(c.structure for c in cells))
        print(
            f"  first: the pretrained frozen models ({len(structures)} structure(s) x {args.seeds} seeds, float64 "
            f"on the CPU; cached in {out / 'pretrained'}) and the constructions",
            file=progress_file,
        )
        if backend is None:
            for structure in structures:
                problems.prepare(structure, range(args.seeds))
        else:
            backend.pretrain(problems, structures, range(args.seeds))

    sets = evaluation_sets(cells[0].structure) if cells else None
    constructions, deep = {}, []
    plain = [(cell, seed) for cell in cells for seed in range(args.seeds) if not _takes_highprec(cell)]
    stored, construction_refs, run_highprec = None, {}, None
    if backend is not None:  # the inputs into the object store once; every construction a task
        stored = backend.store(problems, cells, range(args.seeds))
        sets_ref = backend.put(sets)

        def keep_construction(key, ref, value):
            constructions[key], construction_refs[key] = value, ref

        def run_highprec(todo, keep):
            keys = {(cell, seed): key for key, cell, seed, _frozen, _target in todo}
            jobs = list(keys)
            backend.constructions(jobs, stored, sets_ref, lambda m, _ref, value: keep(keys[m], *m, value))

        msg = highprec_message(cells, args.seeds, backend.resources()["cpus"])
        if msg:
            print(msg, file=progress_file)
    with tqdm(
        total=len(plain),
        desc="constructions (float64)",
        unit="construction",
        file=progress_file,
        disable=not plain,
        mininterval=1.0,
    ) as bar:
        if backend is not None:
            backend.constructions(plain, stored, sets_ref, keep_construction, bar)
        for cell in cells if backend is None else [c for c in cells if _takes_highprec(c)]:
            for seed in range(args.seeds):
                frozen = problems.frozen(cell.structure, cell.kind, seed)
                target = problems.target(cell.structure, seed)
                if _takes_highprec(cell):
                    deep.append((cell, seed, frozen, target))
                else:
                    constructions[(cell, seed)] = build_construction(cell, frozen, target, sets)
                    bar.update()
    if deep:
        constructions.update(
            build_highprec_constructions(
                deep,
                sets,
                out / "constructions.jsonl",
                args.workers or budget["free"],
                progress_file,
                extra,
                run_highprec,
            )
        )

    bar = tqdm(
        total=len(todo) * args.iterations,
        desc=spec.name,
        unit="run-step",
        unit_scale=True,
        file=progress_file,
        disable=not todo,
        mininterval=1.0,
    )
    vers = versions()
    _end_cut_line(runs_path)
    eval_cache = {}
    stop = threading.Event()  # set on an interruption: every stack still training stops at its next step
    settings = chunk_settings(args, dtype, device, vers)

    def train_chunk(structure, chunk):
        if structure not in eval_cache:
            eval_cache[structure] = evaluation_sets(structure)
        return train_records(
            spec.name,
            structure,
            chunk,
            problems,
            eval_cache[structure],
            [(constructions.get((r.cell, r.seed)) or {}).get("_test_errors") for r in chunk],
            settings,
            progress=lambda k: bar.update(k * len(chunk)),
            stop=stop,
        )

    chunks = list(_chunks(todo, chunk_size, device.type == "cpu"))
    for structure, _ in {(k[0], None) for k, _ in chunks}:
        eval_cache[structure] = evaluation_sets(structure)
    if backend is not None:
        eval_refs = {structure: backend.put(sets) for structure, sets in eval_cache.items()}
        written = set(done)
        with open_log(runs_path) as log:

            def keep(recs):  # a stack whose task ran twice (a worker lost after it finished): written once
                recs = [rec for rec in recs if rec["id"] not in written]
                written.update(rec["id"] for rec in recs)
                append_lines(log, [json.dumps(rec) for rec in recs])
                records.extend(recs)

            try:
                backend.train(spec.name, chunks, stored, eval_refs, construction_refs, settings, keep, bar)
            finally:
                bar.close()
        return summarize(spec, args, cells, runs, records, constructions, problems)
    with open_log(runs_path) as log:

        def write(recs):
            append_lines(log, [json.dumps(rec) for rec in recs])  # a stack's records whole, or none of them
            records.extend(recs)

        try:
            if workers <= 1 or len(chunks) <= 1:
                for (structure, _method), chunk in chunks:
                    write(train_chunk(structure, chunk))
            else:
                # stacks are independent: train several at once, one torch thread each (ops release the GIL)
                pool = ThreadPoolExecutor(workers)
                futures = [pool.submit(train_chunk, key[0], chunk) for key, chunk in chunks]
                written = set()
                try:
                    for fut in as_completed(futures):
                        write(fut.result())
                        written.add(fut)
                except BaseException:
                    # an interruption (Ctrl-C, or a stack that failed): stop the stacks still training at their
                    # next step, drop those not started, and keep every stack that did finish
                    stop.set()
                    pool.shutdown(wait=True, cancel_futures=True)
                    for fut in _finished(futures, written):
                        write(fut.result())
                    raise
                pool.shutdown(wait=True)
        finally:
            bar.close()
    return summarize(spec, args, cells, runs, records, constructions, problems)


def chunk_settings(args, dtype, device, vers) -> dict:
    """What :func:`train_records` needs of the command line, as plain values (a remote task gets them)."""
    return {
        "dtype": dtype,
        "device": device,
        "iterations": args.iterations,
        "select": args.select,
        "validate_every": args.validate_every,
        "versions": vers,
    }


def train_records(name, structure, chunk, problems, eval_sets, test_errors, settings, progress=None, stop=None):
    """Train one stack of runs (``chunk``, one structure and method) and return their records.

    ``problems`` gives the frozen models and targets (``.frozen``, ``.target``), ``eval_sets`` the structure's
    :func:`evaluation_sets`, ``test_errors`` per run the construction's per-sample test errors (or ``None``),
    ``settings`` :func:`chunk_settings`. Depends on nothing else, so a run's record is the same wherever the
    stack is trained (this process's threads or a cluster's worker)."""
    dtype, device, iterations = settings["dtype"], settings["device"], settings["iterations"]
    t0 = time.perf_counter()
    stack = _stack_for(chunk, problems, dtype, device)
    seeds = sorted({r.seed for r in chunk})
    data_seeds = [_seed_int(s, TAG_DATA) for s in seeds]
    seed_pos = {s: i for i, s in enumerate(seeds)}
    targets = [problems.target(structure, s) for s in seeds]  # one target per seed and structure
    tstack = _target_stack(structure, targets, dtype, device)
    tindex = np.array([seed_pos[r.seed] for r in chunk])
    t_out = {
        k: torch.as_tensor(np.stack([_model_outputs(t, v.numpy()) for t in targets])).to(device)
        for k, v in eval_sets.items()
    }
    result = train_stack(
        stack,
        tstack,
        data_index=tindex,
        target_index=tindex,
        target_data_index=list(range(len(seeds))),
        data_seeds=data_seeds,
        lr=np.array([r.lr for r in chunk]),
        weight_decay=np.array([r.wd for r in chunk]),
        iterations=iterations,
        batch_size=256,
        input_shape=_input_shape(structure),
        select=settings["select"],
        validate_every=settings["validate_every"],
        val_inputs=eval_sets["val"],
        val_targets=t_out["val"],
        progress=progress,
        stop=stop,
    )
    ti = torch.as_tensor(tindex, device=device)
    errs = {k: _evaluate(stack, t_out[k], ti, eval_sets[k], device) for k in ("val", "test", "shifted")}
    wall = (time.perf_counter() - t0) / len(chunk)
    out = []
    for i, r in enumerate(chunk):
        losses = RunLosses(
            train_final=_num(result.final_train_loss[i]),
            train_curve={"steps": result.curve_steps, "loss": [_num(v) for v in result.curve[:, i]]},
            val=_num(errs["val"][i].mean()),
            test=_num(errs["test"][i].mean()),
            shifted=_num(errs["shifted"][i].mean()),
        )
        paired = None
        if test_errors[i] is not None:
            d = errs["test"][i] - test_errors[i]
            paired = {"diff_mean": _num(d.mean()), "diff_se": _num(d.std(ddof=1) / math.sqrt(d.size))}
        rec = RunRecord(
            id=r.id,
            experiment=name,
            config=r.config,
            seed=r.seed,
            versions=settings["versions"],
            device=str(device),
            # runs trained in this run's stack: on CUDA the kernels cuBLAS picks depend on it, so the
            # float32 rounding of a result does too (docs/reliability.md, "Results that do not depend
            # on how the work is split")
            stack_size=len(chunk),
            losses=losses,
            wall_time_s=wall,
            best_step=None if result.best_step is None else int(result.best_step[i]),
            paired=paired,
        ).to_json()
        out.append(rec)
    return out


def _write_summaries(spec, args, summary, out: Path) -> list[str]:
    """``summary.csv`` and ``summary.json`` (each written whole, the JSON last), then the figure, whose failure
    is a warning. The old files are replaced only by complete new ones; an old figure is removed once the
    new summaries are written and no new figure is (it would show other results). Returns the names written."""
    texts = {"summary.csv": format_csv(summary), "summary.json": json.dumps(summary, indent=1, default=_json_default)}
    for name, text in texts.items():
        _atomic_write(out / name, text)
    written = list(texts)
    if not args.no_figure:
        try:
            make_figure(spec, summary, out / "figure.png")
            written.append("figure.png")
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the results are written; the drawing is an extra
            print(
                f"warning: figure.png not written ({type(exc).__name__}: {exc}); the summaries are complete",
                file=sys.stderr,
            )
    if "figure.png" not in written:
        (out / "figure.png").unlink(missing_ok=True)
    return written
