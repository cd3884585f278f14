"""``--backend ray``: a sweep's units of work as Ray tasks on a cluster (or a Ray instance on this machine).

The units: a stack of runs (:func:`verification.sweep.driver.train_records`; one GPU under ``--device cuda``,
one CPU otherwise), a construction (:func:`verification.sweep.constructions.build_construction`, float64 or
raised precision; one CPU) and the pretraining of frozen models (one CPU). The large read-only inputs, the
frozen models, the targets and the evaluation sets, enter the object store once (``ray.put``) and every task
reads them from there. The driver alone writes ``runs.jsonl`` and ``constructions.jsonl``, a record as soon
as its task is back (``ray.wait``), so ``--resume`` finishes a sweep whichever backend started it. A task on
a worker or node that dies runs again elsewhere (``max_retries``); an exception raised inside a task stops
the sweep, the finished records kept, with one line naming the runs it belongs to.

Ray is an optional extra: ``pip install -e ".[cluster]"``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..outdir import CLIError
from .protocol import structure_of

#: the optional extra that installs Ray
EXTRA = "cluster"

#: how often a task whose worker or node died is run again (elsewhere) before the sweep stops
MAX_RETRIES = 3

BACKENDS = ("local", "ray")


def add_backend_arguments(p):
    """``--backend local|ray`` and ``--address`` (an existing Ray cluster)."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local (default: this machine's cores or GPU) or ray (Ray tasks, the optional extra "
        f'"{EXTRA}"; docs/reproduce.md, "On a cluster")',
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --backend ray: the address of a running Ray cluster (e.g. 10.0.0.1:6379 or auto); "
        "without it a Ray instance is started on this machine",
    )


def import_ray():
    """The ``ray`` module, or a one-line :class:`CLIError` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise CLIError(f'--backend ray needs Ray, which is not installed: pip install -e ".[{EXTRA}]"') from None
    return ray


def check_backend_arguments(args):
    """``--address`` only with ``--backend ray``; Ray installed when asked for (no fallback to local)."""
    backend = getattr(args, "backend", "local")
    # (a --resume on the local backend of a sweep started on a cluster leaves the saved address unused)
    if getattr(args, "address", None) is not None and backend != "ray" and not getattr(args, "resume", None):
        raise CLIError("--address names a Ray cluster: add --backend ray")
    if backend == "ray":
        import_ray()


class TaskFailed(CLIError):
    """A task raised (or its worker died more than :data:`MAX_RETRIES` times): the one-line report."""


def _get(value):
    """``value``, fetched from the object store when it is a reference (inside a task)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class StoredProblems:
    """The frozen models and targets of a sweep as object-store references: what a task's ``problems`` is
    (:func:`verification.sweep.training._stack_for` calls ``.frozen`` and ``.target``)."""

    def __init__(self, frozen: dict, targets: dict):
        self.frozen_refs, self.target_refs = frozen, targets

    def frozen(self, structure, kind, seed):
        return _get(self.frozen_refs[(tuple(structure), kind, seed)])

    def target(self, structure, seed):
        return _get(self.target_refs[(tuple(structure), seed)])

    def subset(self, runs) -> StoredProblems:
        """Only the references ``runs`` need (a task's arguments stay small)."""
        keys = {(tuple(r.cell.structure), r.cell.kind, r.seed) for r in runs}
        return StoredProblems(
            {k: self.frozen_refs[k] for k in keys}, {(k[0], k[2]): self.target_refs[(k[0], k[2])] for k in keys}
        )


def _threads(count: int):
    import torch

    torch.set_num_threads(max(1, int(count)))


def _task_device(device):
    """The device inside a task: a GPU task sees the one Ray gave it as ``cuda``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return device


def _train_task(name, structure, chunk, problems, eval_sets, constructions, settings, threads):
    from .driver import train_records

    _threads(threads)
    settings = {**settings, "device": _task_device(settings["device"])}
    test_errors = [None if c is None else _get(c).get("_test_errors") for c in constructions]
    return train_records(name, structure, chunk, problems, eval_sets, test_errors, settings)


def _construction_task(cell, frozen, target, sets):
    from .constructions import build_construction

    _threads(1)
    return build_construction(cell, frozen, target, sets)


def _rate_task(chunk, problems, dtype, device, structure, iterations, threads):
    from .training import estimate_rate

    _threads(threads)
    return estimate_rate(chunk, problems, dtype, _task_device(device), structure, iterations)


def _pretrain_fnns_task(frozens, targets, structure, seeds):
    from .problems import pretrain_fnns

    _threads(1)
    return pretrain_fnns(frozens, targets, structure, seeds)


def _pretrain_task(frozen, target, structure, seed):
    from .problems import pretrain

    _threads(1)
    return pretrain(frozen, target, structure, seed)


class RayBackend:
    """A connection to a Ray cluster (``address``) or a Ray instance started here, for the length of a
    ``with`` block; ``resume_hint`` ends the line of a failed task."""

    def __init__(self, address=None, resume_hint: str = "", progress_file=None):
        self.address, self.resume_hint = address, resume_hint
        self.progress_file = sys.stderr if progress_file is None else progress_file
        self._remote = {}
        self._started = False

    def __enter__(self):
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            root = str(Path(__file__).resolve().parents[2])  # the workers import this package from here
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            kw = dict(
                runtime_env={"env_vars": {"PYTHONPATH": path}},
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
            )
            try:
                ray.init(address=self.address, **kw) if self.address else ray.init(**kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"--address {self.address}" if self.address else "a local Ray instance"
                raise CLIError(f"--backend ray: cannot connect to {where} ({type(exc).__name__}: {exc})") from None
            self._started = True
        return self

    def __exit__(self, *exc):
        if self._started:
            self.ray.shutdown()
        return False

    # the cluster -------------------------------------------------------------------------------------------

    def resources(self) -> dict:
        """``{"nodes", "cpus", "gpus"}`` of the cluster now (alive nodes)."""
        res = self.ray.cluster_resources()
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        return {"nodes": nodes, "cpus": int(res.get("CPU", 0)), "gpus": int(res.get("GPU", 0))}

    def device(self, name: str):
        """The training device on the cluster's workers: ``auto`` is CUDA where the cluster has a GPU."""
        import torch

        gpus = self.resources()["gpus"]
        if name == "auto":
            return torch.device("cuda" if gpus else "cpu")
        if name == "cpu":
            return torch.device("cpu")
        if name == "cuda" or name.startswith("cuda:"):
            if not gpus:
                raise CLIError(f"--device {name}: the Ray cluster has no GPU (use --device cpu)")
            return torch.device("cuda")  # each stack gets one GPU of its node
        raise CLIError(f"--device: unknown device {name!r} (use auto, cpu or cuda)")

    def slots(self, device) -> int:
        """Stacks the cluster trains at once: one per GPU under CUDA, one per CPU otherwise."""
        res = self.resources()
        return max(1, res["gpus"] if device.type == "cuda" else res["cpus"])

    def describe(self, device, what: str = "stacks") -> str:
        res = self.resources()
        where = f"at {self.address}" if self.address else "started on this machine"
        unit = "GPU" if device.type == "cuda" else "CPU"
        return (
            f"  Ray cluster {where}: {res['nodes']} node{'s' if res['nodes'] != 1 else ''}, {res['cpus']} CPUs, "
            f"{res['gpus']} GPUs: up to {self.slots(device)} {what} at once, one {unit} each"
        )

    def status(self, in_flight: int, device=None) -> str:
        """The progress bar's postfix: workers (nodes, slots) and tasks in flight."""
        res = self.resources()
        slots = res["gpus"] if device is not None and device.type == "cuda" else res["cpus"]
        nodes = f"{res['nodes']} node{'s' if res['nodes'] != 1 else ''}"
        return f"{nodes}, {slots} workers, {min(in_flight, slots)} in flight, {in_flight} left"

    def remote(self, fn, **options):
        key = (fn, tuple(sorted(options.items())))
        if key not in self._remote:
            self._remote[key] = self.ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, **options)(fn)
        return self._remote[key]

    def put(self, value):
        return self.ray.put(value)

    # running tasks -----------------------------------------------------------------------------------------

    def run(self, tasks, keep, describe, bar=None, device=None):
        """Submit ``tasks`` (``(remote function, args, meta)``) and call ``keep(meta, value, ref)`` for each, in the
        order they finish. A task that raised (or whose worker died past the retries) stops the rest: those
        in flight are cancelled, those finished kept, and :class:`TaskFailed` names ``describe(meta)``. An
        interruption (Ctrl-C) does the same and goes on up."""
        ray = self.ray
        pending = {fn.remote(*args): meta for fn, args, meta in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0, fetch_local=False)
                for ref in ready:
                    meta = pending.pop(ref)
                    keep(meta, self._value(ref, describe(meta)), ref)
                if bar is not None:
                    bar.set_postfix_str(self.status(len(pending), device), refresh=True)
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            finished, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in finished:
                try:
                    value = ray.get(ref, timeout=0)
                except Exception:  # noqa: BLE001 - cancelled or failed: nothing to keep
                    continue
                keep(pending[ref], value, ref)
            raise

    def _value(self, ref, what: str):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            first = str(cause).strip().splitlines()[:1]  # one line: the message's first
            detail = f"{type(cause).__name__}{': ' + first[0] if first else ''}"
        except ray.exceptions.RayError as exc:  # a worker or node lost more often than the retries allow
            detail = f"{type(exc).__name__} after {MAX_RETRIES} retries"
        raise TaskFailed(f"{what} failed on the Ray cluster ({detail}){self.resume_hint}")

    # the units of work -------------------------------------------------------------------------------------

    def store(self, problems, cells, seeds) -> StoredProblems:
        """Every frozen model and target of ``cells`` x ``seeds`` into the object store, once."""
        frozen, targets = {}, {}
        for cell in cells:
            s = tuple(cell.structure)
            for seed in seeds:
                if (s, cell.kind, seed) not in frozen:
                    frozen[(s, cell.kind, seed)] = self.put(problems.frozen(s, cell.kind, seed))
                if (s, seed) not in targets:
                    targets[(s, seed)] = self.put(problems.target(s, seed))
        return StoredProblems(frozen, targets)

    def pretrain(self, problems, structures, seeds, bar=None):
        """The pretrained frozen models of ``structures`` x ``seeds`` not yet in ``problems``' cache, as tasks
        (an FNN structure: one task, every seed in one stack as :meth:`Problems.prepare` does; a TFN: a task
        per seed); each stored by ``problems`` (its cache file written here) as it comes back."""
        from .problems import make_random_frozen

        tasks = []
        for structure in structures:
            todo = [s for s in seeds if problems._cached(structure, s) is None]
            if not todo:
                continue
            if structure_of(structure).family == "fnn":
                frozens = [make_random_frozen(structure, s) for s in todo]
                targets = [problems.target(structure, s) for s in todo]
                fn = self.remote(_pretrain_fnns_task, num_cpus=1)
                tasks.append((fn, (frozens, targets, structure, todo), (structure, todo)))
            else:
                fn = self.remote(_pretrain_task, num_cpus=1)
                for s in todo:
                    args = (make_random_frozen(structure, s), problems.target(structure, s), structure, s)
                    tasks.append((fn, args, (structure, [s])))

        def keep(meta, value, _ref):
            structure, todo = meta
            for s, (model, info) in zip(todo, value if structure_of(structure).family == "fnn" else [value]):
                problems.store(structure, s, model, info)
            if bar is not None:
                bar.update(len(todo))

        self.run(tasks, keep, lambda m: f"the pretraining of {list(m[0])} seeds {m[1]}", bar)

    def constructions(self, jobs, stored: StoredProblems, sets_ref, keep, bar=None):
        """:func:`build_construction` of each ``(cell, seed)`` in ``jobs`` as a task; ``keep((cell, seed), ref,
        value)`` as each comes back (``ref``: its result in the object store, for the training tasks)."""
        fn = self.remote(_construction_task, num_cpus=1)
        tasks = []
        for cell, seed in jobs:
            s = tuple(cell.structure)
            args = (cell, stored.frozen_refs[(s, cell.kind, seed)], stored.target_refs[(s, seed)], sets_ref)
            tasks.append((fn, args, (cell, seed)))

        def keep_one(meta, value, ref):
            keep(meta, ref, value)
            if bar is not None:
                bar.update(1)

        self.run(tasks, keep_one, lambda m: f"the construction of {_cell_text(m[0])} seed {m[1]}", bar)

    def rate(self, probe, problems, dtype, device, structure, iterations) -> float:
        """Run-steps per second of a stack like ``probe`` on a worker (:func:`estimate_rate` as a task)."""
        s = tuple(structure)
        problems = StoredProblems(
            {(s, r.cell.kind, r.seed): problems.frozen(s, r.cell.kind, r.seed) for r in probe},
            {(s, r.seed): problems.target(s, r.seed) for r in probe},
        )
        options = {"num_gpus": 1} if device.type == "cuda" else {"num_cpus": 1}
        fn = self.remote(_rate_task, **options)
        return self.ray.get(fn.remote(probe, problems, dtype, str(device), structure, iterations, 1))

    def train(self, name, chunks, stored, eval_refs, construction_refs, settings, keep, bar=None):
        """Every stack of ``chunks`` (``((structure, method), runs)``) as a task; ``keep(records)`` as each
        comes back."""
        device = settings["device"]
        options = {"num_gpus": 1} if device.type == "cuda" else {"num_cpus": 1}
        fn = self.remote(_train_task, **options)
        remote_settings = {**settings, "device": str(device)}
        tasks = []
        for (structure, _method), chunk in chunks:
            cons = [construction_refs.get((r.cell, r.seed)) for r in chunk]
            args = (name, structure, chunk, stored.subset(chunk), eval_refs[structure], cons, remote_settings, 1)
            tasks.append((fn, args, chunk))

        def keep_chunk(chunk, records, _ref):
            keep(records)
            if bar is not None:
                bar.update(len(chunk) * settings["iterations"])

        def what(chunk):
            r = chunk[0]
            return f"the stack of {len(chunk)} runs from run {r.id} ({_cell_text(r.cell)}, seed {r.seed})"

        self.run(tasks, keep_chunk, what, bar, device)


def _cell_text(cell) -> str:
    axis = ", ".join(f"{k} {v}" for k, v in cell.axis)
    return f"{cell.kind} {list(cell.structure)} {cell.method} {axis}"
