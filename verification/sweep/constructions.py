"""The paper's LoRA constructions as a baseline column: float64 and raised precision (mpmath).

Built by :mod:`lora_theory` (Zeng & Lee 2024, Theorems 3, 5 and 7); where float64 is not honest the
construction is rebuilt with :mod:`lora_theory.highprec` in a process pool and cached in
``constructions.jsonl`` (one record per cell and seed).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
import torch

import lora_theory
from lora_theory.errors import LoraTheoryError

from ..outdir import CLIError, append_lines, open_log
from ..trainer import gaussian_inputs
from .problems import _model_outputs, _per_sample_errors
from .protocol import CALIBRATION_SEED, MAX_HONEST_BLOCK, MAX_HONEST_ROUNDING, N_CALIBRATION, N_TEST, Cell, _hash
from .records import ConstructionRecord, _end_cut_line, _json_default, _load_records
from .training import _duration, _finished, cpu_budget


def build_construction(cell: Cell, frozen, target, sets) -> dict:
    """The float64 construction for one cell and seed, evaluated on the test and shifted sets.

    Returns a dict with ``test_mse``, ``shifted_mse``, ``calibrated_test_mse``, ``calibrated_shifted_mse``
    (``None`` where not computable or not applicable: final-layers cells, and LoRA cells of an FNN with biases
    that keep the frozen biases, since the construction re-chooses them), ``kappa``, ``gamma``, ``exact``, ``note``, the
    domain, ``prediction`` (linear: the exact Gaussian MSE; FNN: the project's error bound, THEORY.md §2.4; TFN: none)
    and the per-sample test errors (``_test_errors``) used to pair gradient runs with it.
    """
    out = {
        "test_mse": None,
        "shifted_mse": None,
        "calibrated_test_mse": None,
        "calibrated_shifted_mse": None,
        "kappa": None,
        "gamma": None,
        "exact": None,
        "note": None,
        "prediction": None,
        "_test_errors": None,
    }
    if cell.method != "lora":
        return out
    if cell.family == "fnn" and cell.structure.activation != "linear" and not cell.tune_bias:
        # the construction (and the error bound) re-chooses the biases: not these runs' method
        out["note"] = "n/a: the construction re-chooses the biases; these runs keep them fixed"
        return out
    test = sets["test"].numpy()
    shifted = sets["shifted"].numpy()
    y_test, y_shift = _model_outputs(target, test), _model_outputs(target, shifted)
    out["target_power"] = float(np.mean(y_test**2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_theory.IllConditionedWarning)
        try:
            if cell.family == "tfn":
                from lora_theory.tfn import lora_tfn

                fit = lora_tfn(frozen, target, cell.ranks[0])
                out.update(kappa=fit.kappa, gamma=0.0, exact=bool(fit.exact))
                honest = lora_theory.unit_roundoff() * fit.kappa <= MAX_HONEST_ROUNDING
                models = {"": fit.model}
            elif frozen.activation == "linear":
                fit = (
                    lora_theory.lora_linear(frozen.weights, target.weights[0], list(cell.ranks))
                    if target.depth == 1
                    else None
                )
                if fit is None:
                    out["note"] = "linear construction needs a one-layer target"
                    return out
                out.update(kappa=fit.kappa, gamma=0.0, exact=bool(fit.exact), prediction=fit.gaussian_mse)
                honest = (
                    frozen.depth <= MAX_HONEST_BLOCK and lora_theory.unit_roundoff() * fit.kappa <= MAX_HONEST_ROUNDING
                )
                models = {"": fit.model}
            else:
                from lora_theory.bounds import fnn_error_bound
                from lora_theory.fnn import lora_fnn

                radius = float(np.linalg.norm(shifted, axis=1).max()) * (1 + 1e-9)
                fit = lora_fnn(frozen, target, list(cell.ranks), input_radius=radius)
                out.update(
                    kappa=fit.kappa,
                    gamma=fit.gamma,
                    exact=bool(fit.exact),
                    domain={
                        "kind": "ball",
                        "center": 0.0,
                        "radius": radius,
                        "calibrated": {"kind": "samples", "n": N_CALIBRATION, "margin": 2.0},
                    },
                )
                try:
                    out["prediction"] = fnn_error_bound(frozen, target, list(cell.ranks)).mse
                except LoraTheoryError:
                    pass
                block = max(fit.partition)
                honest = (
                    block <= MAX_HONEST_BLOCK
                    and lora_theory.unit_roundoff() * (fit.kappa + fit.gamma) <= MAX_HONEST_ROUNDING
                )
                models = {"": fit.model}
                if honest:  # the authors' biases: sized on 256 N(0, I) samples, multiplicative margin 2
                    calib = gaussian_inputs(CALIBRATION_SEED, N_CALIBRATION, (frozen.width,)).numpy()
                    models["calibrated_"] = lora_fnn(frozen, target, list(cell.ranks), inputs=calib, margin=2.0).model
        except lora_theory.SingularMatrixError as exc:
            # singular to working precision: not computable in float64 (the high-precision path may be)
            out.update(
                kappa=exc.condition_number, note=f"n/c (κ={exc.condition_number:.1e}; {exc.matrix.split(' =')[0]})"
            )
            return _highprec_construction(cell, frozen, target, sets, out)
        except LoraTheoryError as exc:
            out["note"] = f"construction failed: {exc}"
            return out
    if not honest:
        out["note"] = f"n/c (κ={out['kappa']:.1e})"
        return _highprec_construction(cell, frozen, target, sets, out)
    for prefix, model in models.items():
        e_test = _per_sample_errors(_model_outputs(model, test), y_test)
        e_shift = _per_sample_errors(_model_outputs(model, shifted), y_shift)
        out[f"{prefix}test_mse"] = float(e_test.mean())
        out[f"{prefix}shifted_mse"] = float(e_shift.mean())
        if prefix == "":
            out["_test_errors"] = e_test
    if cell.family == "tfn" and cell.highprec_subsample > 0:
        # float64 weights of Theorem 7's two-block construction carry a relative output error (measured at
        # D = 16, H = 2, N = 10, R = 8: median 6e-13, up to 2e-7 per input)
        # (lora_theory.highprec.lora_tfn_mp): the column then comes from the construction at raised precision
        out["note"] = (
            f"float64: test {out['test_mse']:.3g}, x5 {out['shifted_mse']:.3g} "
            f"(relative {out['test_mse'] / out['target_power']:.2g}) on {len(test)} inputs"
        )
        return _highprec_construction(cell, frozen, target, sets, out)
    return out


#: Extra digits over :func:`lora_theory.highprec.choose_digits` of the float64 ``κ``, ``γ`` (which
#: underestimate the deep blocks' values), and at least this many digits per layer of the largest block:
#: measured at D = 16, the 8-layer blocks need 57 to 59 digits and the 14-layer ones 57 to 117.
HIGHPREC_EXTRA_DIGITS = 6


HIGHPREC_DIGITS_PER_LAYER = 8


def _largest_block(cell) -> int:
    s = cell.structure
    return max(lora_theory.partition.uniform_partition(s.L, s.Lbar)) if s.activation != "linear" else s.L


def _highprec_construction(cell: Cell, frozen, target, sets, out: dict) -> dict:
    """The construction at raised precision (THEORY.md §3), where float64 is not honest; ``out`` completed.

    Only for LoRA cells with ``highprec_subsample > 0``. TFN: :func:`lora_theory.highprec.lora_tfn_mp`
    (digits chosen from its float64 ``κ``). FNN family: Lemma 1 (linear models,
    :func:`lora_theory.highprec.lora_linear_mp`) or Theorem 3 on the certified ball of the float64 path
    (:func:`lora_theory.highprec.lora_fnn_mp`), at ``max(choose_digits(κ, γ) + 6, 8·(largest block))``
    digits, redone at :func:`~lora_theory.highprec.choose_digits` of the ``κ``, ``γ`` found when those ask
    for more. Evaluated at working precision (:meth:`predict`) on the first ``highprec_subsample`` test and
    shifted inputs; sets ``test_mse``, ``shifted_mse``, ``precision_digits``, ``subsample``,
    ``highprec_kappa``, ``highprec_gamma``, ``highprec_seconds``. The float64 ``note`` and ``kappa`` stay.
    """
    n = int(cell.highprec_subsample)
    if n <= 0 or cell.method != "lora":
        return out
    from lora_theory.highprec import choose_digits, lora_fnn_mp, lora_linear_mp, lora_tfn_mp

    t0 = time.perf_counter()
    test, shifted = sets["test"].numpy()[:n], sets["shifted"].numpy()[:n]  # (n, D) or (n, D, N) each
    linear = frozen.activation == "linear" if cell.family == "fnn" else False
    kappa = out["kappa"] if out["kappa"] is not None and math.isfinite(out["kappa"]) else 1e16
    gamma = out["gamma"] if out["gamma"] is not None and math.isfinite(out["gamma"]) else 0.0
    radius = float(np.linalg.norm(sets["shifted"].numpy(), axis=1).max()) * (1 + 1e-9)

    def fit_at(digits):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lora_theory.IllConditionedWarning)
            if linear:
                return lora_linear_mp(frozen.weights, target.weights[0], list(cell.ranks), digits=digits)
            return lora_fnn_mp(frozen, target, list(cell.ranks), input_radius=radius, digits=digits)

    try:
        if cell.family == "tfn":
            fit = lora_tfn_mp(frozen, target, cell.ranks[0])
        else:
            digits = max(
                choose_digits(max(kappa, 1.0), max(gamma, 0.0)) + HIGHPREC_EXTRA_DIGITS,
                HIGHPREC_DIGITS_PER_LAYER * _largest_block(cell),
            )
            fit = fit_at(digits)
            needed = choose_digits(fit.kappa, fit.gamma)
            if needed > digits:
                fit = fit_at(needed)
    except LoraTheoryError as exc:
        out["note"] = f"{out['note']}; high precision failed: {exc}"
        return out
    if cell.family == "fnn" and not linear:
        out["domain"] = {
            "kind": "ball",
            "center": 0.0,
            "radius": radius,
            "calibrated": {"kind": "samples", "n": N_CALIBRATION, "margin": 2.0},
        }
    y_test, y_shift = _model_outputs(target, test), _model_outputs(target, shifted)
    out.update(
        test_mse=float(_per_sample_errors(fit.predict(test), y_test).mean()),
        shifted_mse=float(_per_sample_errors(fit.predict(shifted), y_shift).mean()),
        precision_digits=int(fit.digits),
        subsample=n,
        highprec_kappa=float(fit.kappa),
        highprec_gamma=float(fit.gamma),
        exact=bool(fit.exact),
        _test_errors=None,
        highprec_seconds=time.perf_counter() - t0,
    )
    return out


def _takes_highprec(cell: Cell) -> bool:
    """Whether ``cell``'s construction takes the high-precision path whatever the instance: FNN blocks of more
    than 4 layers, and every TFN cell that asks for it."""
    if cell.highprec_subsample <= 0 or cell.method != "lora":
        return False
    return cell.family == "tfn" or _largest_block(cell) > MAX_HONEST_BLOCK


_POOL_SETS = None


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> str:
    """Make this worker process end when its parent does, even when the parent is killed by SIGKILL (which no
    handler of the parent sees). Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a daemon thread that
    polls the parent's pid every second. Returns which of the two is in place."""
    import signal

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the request took effect
                    os._exit(1)
                return "prctl"
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    return "watchdog"


def _pool_init(sets, parent_pid=None, threads=1):
    """Initializer of a construction worker: dies with its parent, ``threads`` torch threads, the input sets."""
    global _POOL_SETS
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    torch.set_num_threads(max(1, int(threads)))
    _POOL_SETS = {k: torch.from_numpy(v) for k, v in sets.items()}


def construction_pool(workers: int, sets: dict):
    """The process pool of the raised-precision constructions: ``workers`` spawned processes (not forked: the
    parent holds torch's thread pools), each ending with this process (:func:`_die_with_parent`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_pool_init,
        initargs=({k: np.asarray(v) for k, v in sets.items()}, os.getpid(), 1),
    )


def _pool_construction(cell, frozen, target):
    return build_construction(cell, frozen, target, _POOL_SETS)


def _construction_key(cell: Cell, seed: int, extra=None) -> str:
    return _hash({"cell": cell.as_dict(), "seed": seed, "subsample": cell.highprec_subsample, "extra": extra})


def build_highprec_constructions(jobs, sets, cache: Path, workers: int, progress_file, extra=None, run=None) -> dict:
    """:func:`build_construction` for ``jobs`` (``(cell, seed, frozen, target)`` of deep blocks), in
    ``workers`` processes, each result appended to ``cache`` as it comes: a rerun (``--resume``) reads the
    finished ones back instead of rebuilding them (minutes each at 60 to 120 digits). The key of a result
    hashes its cell, seed, subsample and the experiment's ``config_extra`` (``extra``). ``run(todo, keep)``,
    when given, builds them elsewhere instead (a cluster's tasks, :mod:`verification.sweep.cluster`):
    ``todo`` holds ``(key, cell, seed, frozen, target)``, and ``keep(key, cell, seed, construction)`` is
    called here for each as it comes back."""
    from tqdm import tqdm

    _end_cut_line(cache)
    done = {}
    for rec in _load_records(cache, ConstructionRecord.is_valid, report=True):
        done.setdefault(rec["key"], rec["construction"])
    results, todo = {}, []
    for cell, seed, frozen, target in jobs:
        key = _construction_key(cell, seed, extra)
        if isinstance(done.get(key), dict):
            results[(cell, seed)] = {**done[key], "_test_errors": None}
        else:
            todo.append((key, cell, seed, frozen, target))
    if not todo:
        return results
    workers = max(1, min(workers, len(todo)))
    bar = tqdm(
        total=len(todo), desc="high-precision constructions", unit="construction", file=progress_file, mininterval=1.0
    )
    with open_log(cache) as log:

        def keep(key, cell, seed, cons):
            results[(cell, seed)] = cons
            stored = {k: v for k, v in cons.items() if not k.startswith("_")}
            append_lines(log, [json.dumps(ConstructionRecord(key, stored).to_json(), default=_json_default)])
            bar.update(1)

        try:
            if run is not None:
                run(todo, keep)
            elif workers == 1:
                for key, cell, seed, frozen, target in todo:
                    keep(key, cell, seed, build_construction(cell, frozen, target, sets))
            else:
                with construction_pool(workers, {k: v.numpy() for k, v in sets.items()}) as pool:
                    futures = {
                        pool.submit(_pool_construction, cell, frozen, target): (key, cell, seed)
                        for key, cell, seed, frozen, target in todo
                    }
                    kept = set()
                    try:
                        for fut in as_completed(futures):
                            keep(*futures[fut], fut.result())
                            kept.add(fut)
                    except BaseException:
                        # an interruption or a failed construction: keep every one that did finish
                        pool.shutdown(wait=True, cancel_futures=True)
                        for fut in _finished(futures, kept):
                            keep(*futures[fut], fut.result())
                        raise
        finally:
            bar.close()
    return results


def _mp_speed() -> float:
    """Seconds for one 16 x 16 mpmath matrix product at 50 digits here (the unit of the estimate)."""
    import mpmath

    with mpmath.mp.workdps(50):
        A = mpmath.mp.matrix(np.linspace(-1, 1, 256).reshape(16, 16).tolist())
        t = time.perf_counter()
        for _ in range(3):
            A * A
    return (time.perf_counter() - t) / 3


def highprec_estimate(cells, seeds: int) -> tuple:
    """``(count, seconds)``: the constructions that will take the high-precision path and their serial time.

    Counts LoRA cells with ``highprec_subsample > 0`` whose largest block exceeds
    :data:`MAX_HONEST_BLOCK` layers, and TFN cells with ``highprec_subsample > 0`` (times ``seeds``). The
    TFN's model: about ``1.2·L·H`` s to build and ``8·L·H`` ms per evaluated input (10x that without gmpy2).
    The FNN's model, measured at D = 16 on a 2-core CPU
    where one 16 x 16 product at 50 digits takes 9 ms: about ``0.15·L`` s to build a block of ``L`` layers
    and ``1.1·L`` ms per evaluated input (256 test and 256 shifted inputs: 4 s at L = 6, 5.5 s at L = 8,
    7 s at L = 10, 10 to 14 s at L = 14), scaled by ``(D/16)³`` and ``(D/16)²`` and by this machine's speed.
    """
    unit = _mp_speed() / 0.009
    try:
        import gmpy2  # noqa: F401  (the object-array evaluation of the TFN is ~10x faster with it)

        tfn_eval = 0.008
    except ImportError:
        tfn_eval = 0.08
    count, seconds = 0, 0.0
    for cell in filter(_takes_highprec, cells):
        if cell.family == "tfn":  # measured at D = 16, N = 10: ~1.2 s per head and block to build, 8 ms to evaluate
            D, L, H, N = cell.structure.D, cell.structure.L, cell.structure.H, cell.structure.N
            per = (
                1.2 * L * H * (D / 16) ** 3
                + tfn_eval * L * H * (N / 10) ** 2 * (D / 16) ** 2 * 2 * cell.highprec_subsample
            )
        else:
            D, L = cell.structure.D, cell.structure.L
            per = 0.15 * L * (D / 16) ** 3 + 0.0011 * L * 2 * cell.highprec_subsample * (D / 16) ** 2
        count += seeds
        seconds += seeds * per * unit
    return count, seconds


def highprec_message(cells, seeds: int, workers: int = 1) -> str | None:
    """The pre-run line on the high-precision construction column (``None`` when it is not used)."""
    count, seconds = highprec_estimate(cells, seeds)
    if not count:
        return None
    n = max(c.highprec_subsample for c in cells)
    workers = max(1, min(workers, count))
    return (
        f"  construction column: {count} constructions in high precision (mpmath) on {n} test and {n} "
        f"shifted inputs each, in {workers} process{'es' if workers > 1 else ''}: estimated "
        f"{_duration(seconds / workers)} before training (those already in constructions.jsonl are "
        f"reused; --no-highprec skips them)"
    )


HIGHPREC_SUBSAMPLE, HIGHPREC_QUICK_SUBSAMPLE = 256, 16


def add_highprec_arguments(p, default: bool = True):
    """``--no-highprec``, ``--highprec`` and ``--highprec-subsample N`` for experiments whose constructions
    take the high-precision path: by default (``default=True``, deep FNN blocks) or on request (the TFN)."""
    p.add_argument(
        "--no-highprec",
        action="store_true",
        default=not default,
        help="float64 constructions only"
        + (": deep blocks are reported n/c with their κ" if default else " (the default)"),
    )
    p.add_argument(
        "--highprec",
        dest="no_highprec",
        action="store_false",
        help=(
            "the high-precision column (the default); with --resume, adds it to a sweep run with "
            "--no-highprec (for example trained on a GPU, its constructions then built on a CPU)"
        )
        if default
        else "the construction column at raised precision (mpmath) on a subsample of the "
        "inputs, the float64 value kept in construction_note; with --resume, adds it "
        "to a finished sweep",
    )
    p.add_argument(
        "--highprec-subsample",
        type=int,
        default=None,
        help=f"test and shifted inputs the high-precision construction is evaluated on "
        f"(default {HIGHPREC_SUBSAMPLE}; {HIGHPREC_QUICK_SUBSAMPLE} with --quick)",
    )


def highprec_subsample(args) -> int:
    """The ``highprec_subsample`` of the experiment's LoRA cells (0 with ``--no-highprec``)."""
    if getattr(args, "no_highprec", True):
        return 0
    return HIGHPREC_SUBSAMPLE if args.highprec_subsample is None else int(args.highprec_subsample)


def quick_highprec(args):
    """``--quick``: the high-precision construction (when it is on) on :data:`HIGHPREC_QUICK_SUBSAMPLE` inputs."""
    if args.highprec_subsample is None and not args.no_highprec:
        args.highprec_subsample = HIGHPREC_QUICK_SUBSAMPLE


def check_highprec_arguments(args, cells):
    """Validate ``--highprec-subsample`` and print the high-precision estimate (stderr) before the run."""
    n = args.highprec_subsample
    if n is not None and not 1 <= n <= N_TEST:
        raise CLIError(f"--highprec-subsample must be in 1..{N_TEST}, got {n}")
    if n is not None and args.no_highprec:
        raise CLIError("--highprec-subsample sizes the high-precision column, which is off here: add --highprec")
    msg = highprec_message(cells, args.seeds, args.workers or cpu_budget()["free"])
    if msg and getattr(args, "backend", "local") == "local":  # a cluster's: once connected (its cores)
        print(msg.strip(), file=sys.stderr)
