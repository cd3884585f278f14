"""The command line shared by the experiments: one parser, flag checks, settings and resume, :func:`run_cli`."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

from lora_theory.errors import LoraTheoryError

from ..outdir import (
    CLIError,
    FolderLock,
    OneLineParser,
    check_folder,
    interrupts_deferred,
    positive_int,
    write_error_message,
)
from .cluster import add_backend_arguments, check_backend_arguments
from .driver import _write_summaries, execute
from .folder import _atomic_write, default_out, writable_folder
from .protocol import LR_GRID, WD_GRID, Cell, ExperimentSpec, FNNStructure, structure_of
from .records import _json_default
from .report import format_table
from .training import config_extra, make_runs, resolve_device


def parse_ranks(text: str, width: int) -> list:
    """``"1-16"``, ``"1,2,4"`` or ``"1-4,8"`` -> sorted distinct ints, each in ``1..width``."""
    out = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = (
                    part.split("-", 1)
                    if not part.startswith("-")
                    else ("-" + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1])
                )
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise CLIError(f"--ranks: cannot read {text!r} (use e.g. 1-16 or 1,2,4)") from None
    bad = [r for r in out if r < 1 or r > width]
    if bad or not out:
        raise CLIError(f"--ranks: every rank must be in 1..{width} (the width), got {sorted(out)}")
    return sorted(out)


def _floats(text, name):
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{name}: cannot read {text!r} as comma-separated numbers") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise CLIError(f"{name}: need non-negative finite numbers, got {text!r}")
    return vals


def _grid(name: str, positive: bool = False):
    """An argparse ``type`` for a comma-separated grid (``--lr``, ``--weight-decay``): the text, checked
    (non-negative finite numbers; positive ones with ``positive``); :func:`_check_common` reads the grid."""

    def check(text):
        try:
            vals = _floats(text, name)
        except CLIError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name}: ")) from None
        if positive and any(v <= 0 for v in vals):
            raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}")
        return text

    return check


def _frozen_kinds(text):
    """An argparse ``type`` for ``--frozen``: the text, its kinds checked (``random``, ``pretrained``)."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds or any(k not in ("random", "pretrained") for k in kinds):
        raise argparse.ArgumentTypeError(f"kinds are 'random' and 'pretrained', got {text!r}")
    return text


def base_parser(spec: ExperimentSpec) -> argparse.ArgumentParser:
    """The flags every experiment shares (width, ranks, seeds, steps, grids, device, output folder, resume,
    backend...), on the one-line-error parser; ``spec.add_arguments`` adds the experiment's own."""
    p = OneLineParser(prog=f"python -m verification.{spec.name}", description=spec.description)
    p.add_argument("--width", type=positive_int, default=16, help="D (default 16)")
    p.add_argument("--ranks", default=None, help="LoRA ranks, e.g. 1-16 (default) or 1,2,8")
    p.add_argument("--seeds", type=positive_int, default=5, help="how many seeds (0..N-1; default 5)")
    p.add_argument("--iterations", type=positive_int, default=5000, help="Adam steps per run (default 5000)")
    p.add_argument(
        "--lr", type=_grid("--lr", positive=True), default=",".join(str(v) for v in LR_GRID), help="learning-rate grid"
    )
    p.add_argument(
        "--weight-decay",
        type=_grid("--weight-decay"),
        default=",".join(str(v) for v in WD_GRID),
        help="weight-decay grid",
    )
    p.add_argument(
        "--frozen", type=_frozen_kinds, default="random,pretrained", help="frozen-model kinds: random,pretrained"
    )
    p.add_argument(
        "--tune-bias",
        dest="tune_bias",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the biases with the adapters (default; --no-tune-bias is --fixed-bias)",
    )
    p.add_argument("--fixed-bias", dest="tune_bias", action="store_false", help="keep the frozen biases")
    p.add_argument(
        "--select",
        choices=("final", "best"),
        default="final",
        help="final iterate (default) or best-validation iterate",
    )
    p.add_argument("--validate-every", type=positive_int, default=100, help="with --select best (default 100)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="training dtype")
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=None,
        help="runs per stack (default: 64 on CPU, 4096 on CUDA); the speed, not the results",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="stacks trained at once on a CPU (default: the cores free here, docs/reliability.md)",
    )
    p.add_argument("--out", default=None, help="output folder (default results/<experiment>-<time>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="finish an interrupted sweep in DIR")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--no-figure", action="store_true", help="skip figure.png")
    p.add_argument(
        "--figure",
        dest="no_figure",
        action="store_false",
        help="draw figure.png (the default); with --resume, for a sweep run with --no-figure",
    )
    p.add_argument(
        "--construction-only",
        action="store_true",
        help="build and evaluate the constructions only, train nothing (the gradient columns stay "
        "empty; a later --resume of the folder without this flag trains the runs)",
    )
    add_backend_arguments(p)  # --backend, --address (verification/sweep/cluster.py)
    spec.add_arguments(p)
    return p


def _check_common(args):
    """The grids and kinds read from their flags (each flag's value checked already by its ``type``)."""
    args.kinds = [k.strip() for k in args.frozen.split(",") if k.strip()]
    args.lr_grid = _floats(args.lr, "--lr")
    args.wd_grid = _floats(args.weight_decay, "--weight-decay")
    check_backend_arguments(args)


def _read_config(spec, out: Path, flag: str) -> dict:
    """The ``config.json`` of an experiment folder (read only); refuses one of another experiment."""
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise CLIError(f"{flag} {out}: no config.json there (not an experiment folder)")
    try:
        saved = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"{flag} {out}: cannot read config.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(saved, dict):
        raise CLIError(f"{flag} {out}: config.json is not a JSON object (edited or damaged); nothing was changed")
    if saved.get("experiment") != spec.name:
        raise CLIError(f"{flag} {out}: that folder holds the experiment {saved.get('experiment')!r}, not {spec.name!r}")
    argv = saved.get("argv")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        # never let argparse fall back to the live command line (argv null) or fail on a number or a list
        raise CLIError(
            f"{flag} {out}: config.json's argv is {type(argv).__name__ if argv is not None else 'null'}"
            f"{' (missing)' if 'argv' not in saved else ''}, not the list of strings of the command "
            f"line that made the sweep (edited or damaged); nothing was changed"
        )
    for key in ("settings", "construction"):
        if saved.get(key) is not None and not isinstance(saved[key], dict):
            raise CLIError(
                f"{flag} {out}: config.json's {key} is not a JSON object (edited or damaged); nothing was changed"
            )
    return saved


#: flags that change where or how fast a sweep runs, not its results
RUN_FLAGS = ("device", "chunk", "workers", "no_figure", "backend", "address")


#: flags that change only the construction column, never a training run: a ``--resume`` takes them from its
#: own command line, so a sweep trained with ``--no-highprec`` can get its high-precision column later
CONSTRUCTION_FLAGS = ("no_highprec", "highprec_subsample")


_NOT_SETTINGS = (
    RUN_FLAGS
    + CONSTRUCTION_FLAGS
    + ("construction_only", "out", "resume", "quick", "quick_applied", "ranks_list", "lr", "weight_decay", "frozen")
)  # the last three: parsed into the grids, kinds


_SETTING_FLAGS = {
    "kinds": "--frozen",
    "lr_grid": "--lr",
    "wd_grid": "--weight-decay",
    "tune_bias": "--tune-bias",
    "config_extra": "the experiment's target",
}


def run_settings(spec, args) -> dict:
    """Every setting the sweep's results depend on (all flags after ``--quick``, less :data:`RUN_FLAGS` and
    the output folder), as JSON values: two command lines with equal settings make the same sweep."""
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    if settings.get("select") != "best":
        settings["validate_every"] = None
    extra = config_extra(spec, args)
    if extra is not None:
        settings["config_extra"] = extra
    return json.loads(json.dumps(settings, sort_keys=True, default=_json_default))


def _saved_settings(spec, saved: dict) -> dict | None:
    """The settings of a folder's ``config.json`` (re-derived from its command line for older folders)."""
    if saved.get("settings") is not None:
        return saved["settings"]
    try:
        args = base_parser(spec).parse_args(saved["argv"])
        _normalise(spec, args)
        return run_settings(spec, args)
    except (SystemExit, CLIError, LoraTheoryError):
        return None


def _prepare_out(spec, args, settings: dict, out: Path, check_only: bool = False):
    """The output folder of a new sweep, checked writable (called once the input is valid, the folder's
    ownership checked and its lock held).

    A folder that already holds this experiment is reused only for the same settings (the sweep goes on
    where it stopped, as with ``--resume``). With other settings it is refused if it holds any run, so
    that runs of two sweeps are never mixed; a folder with no run is started afresh. ``check_only``: the
    refusal alone, nothing created or removed.
    """
    if not check_only:
        writable_folder(out)
    if (out / "config.json").exists():
        saved = _read_config(spec, out, "--out")
        old = _saved_settings(spec, saved)
        if old is not None:  # folders written before a flag stopped counting as a setting
            old = {k: v for k, v in old.items() if k not in _NOT_SETTINGS}
        if old != settings:
            if (out / "runs.jsonl").is_file() and (out / "runs.jsonl").read_bytes().strip():  # any line
                old = old or {}
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                flags = ", ".join(_SETTING_FLAGS.get(k, "--" + k.replace("_", "-")) for k in diff)
                raise CLIError(
                    f"--out {out}: holds a {spec.name} sweep with other settings "
                    f"({flags or 'its command line'}): use another --out, or --resume {out} to finish it"
                )
            if check_only:
                return out
            for stale in [out / "runs.jsonl", out / "constructions.jsonl", *sorted((out / "pretrained").glob("*.npz"))]:
                stale.unlink(missing_ok=True)  # no run in it: start afresh
    return out


def _given_flags(parser, argv) -> dict:
    """``{dest: option as typed}`` for the options that ``argv`` gives explicitly (abbreviations included)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.option_strings and a.dest != "help"})
    parser.parse_args(argv, namespace=ns)
    typed = [t.split("=", 1)[0] for t in argv if t.startswith("--")]
    options = {}  # dest -> its option strings (--tune-bias, --fixed-bias: one dest)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            options.setdefault(a.dest, []).extend(a.option_strings)
    given = {}
    for dest, strings in options.items():
        if getattr(ns, dest, unset) is not unset:
            names = [t for t in typed if any(o.startswith(t) for o in strings)]
            given[dest] = names[0] if names else strings[0]
    return given


def _normalise(spec, args):
    """The common checks and ``--quick`` applied to parsed arguments (in place)."""
    args.ranks_list = None
    _check_common(args)
    if args.quick and spec.quick is not None:
        spec.quick(args)


def run_cli(spec: ExperimentSpec, argv=None) -> int:
    """Parse ``argv``, run the experiment, print the table and write the files. Returns the exit status.

    Every input is validated (the cells built, so ranks, depths and the experiment's own flags are
    checked) before the output folder is created or touched: bad input exits with status 2 and a one-line
    message, and leaves an existing folder as it was. The folder must be new, empty or this experiment's own
    (:func:`verification.outdir.check_folder`); a second run on a folder another run is writing is refused
    (:class:`verification.outdir.FolderLock`). The old summaries stay until the new ones are written whole;
    a failed write (a full disk) ends with one line naming the folder (status 1); Ctrl-C while the
    summaries are written waits for them (status 130).
    """
    parser = base_parser(spec)
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    argv = list(argv if argv is not None else sys.argv[1:])
    out, lock = None, None
    try:
        saved, construction = None, {}
        if args.resume:
            resume_dir = Path(args.resume)
            saved = _read_config(spec, resume_dir, "--resume")
            given = _given_flags(parser, argv)
            try:
                resumed = parser.parse_args(saved["argv"])
            except SystemExit:
                raise CLIError(f"--resume {resume_dir}: its saved command line does not parse") from None
            # the construction column asked for on an earlier resume, then on this command line
            construction = {
                **(saved.get("construction") or {}),
                **{dest: getattr(args, dest) for dest in CONSTRUCTION_FLAGS if dest in given},
            }
            for dest, value in construction.items():
                setattr(resumed, dest, value)
            for dest in RUN_FLAGS:  # where and how fast it runs: from this command line
                if dest in given:
                    setattr(resumed, dest, getattr(args, dest))
            ignored = [
                flag
                for dest, flag in given.items()
                if dest not in RUN_FLAGS + CONSTRUCTION_FLAGS + ("resume", "construction_only")
            ]
            if ignored:
                print(
                    f"warning: --resume {resume_dir} goes on with the settings saved there; ignoring "
                    f"{', '.join(ignored)}",
                    file=sys.stderr,
                )
            resumed.construction_only = args.construction_only  # never inherited: a resume trains unless told
            args = resumed
            args.resume, args.out = str(resume_dir), str(resume_dir)
        _normalise(spec, args)
        if spec.validate is not None:
            spec.validate(args)
        if args.backend == "local":  # a cluster's devices are checked once connected
            resolve_device(args.device)
        cells = spec.cells(args)
        make_runs(spec, args, cells)
        # the input is valid: now the folder, whose ownership is checked before anything is created in it
        flag = "--out" if saved is None else "--resume"
        target = Path(args.out) if args.out else default_out(spec.name)
        if check_folder(target, spec.name, flag) and saved is None:  # refused settings leave it as it was
            _prepare_out(spec, args, run_settings(spec, args), target, check_only=True)
        lock = FolderLock(target, f"python -m verification.{spec.name}", flag).acquire()
        check_folder(target, spec.name, flag)  # again under the lock: another run may have been first
        if saved is None:
            settings = run_settings(spec, args)
            out = _prepare_out(spec, args, settings, target)
            _atomic_write(
                out / "config.json",
                json.dumps(
                    {
                        "experiment": spec.name,
                        "argv": argv,
                        "settings": settings,
                        "created": _dt.datetime.now().isoformat(timespec="seconds"),
                    },
                    indent=1,
                ),
            )
        else:
            out = target
            saved = _read_config(spec, out, "--resume")  # as it is now, under the lock
            if construction != (saved.get("construction") or {}):  # the folder's column from now on
                _atomic_write(out / "config.json", json.dumps({**saved, "construction": construction}, indent=1))
        summary = execute(spec, args, out, cells=cells)
        with interrupts_deferred():  # Ctrl-C now waits until the files are written whole
            written = _write_summaries(spec, args, summary, out)  # first: a closed stdout cannot lose them
            print(format_table(spec, summary))
        print(f"wrote {out}/{', '.join(written)}, runs.jsonl")
        return 0
    except (CLIError, LoraTheoryError) as exc:
        return parser.refuse(exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f": finish with --resume {out}" if out is not None else ""), file=sys.stderr)
        return 130
    except OSError as exc:
        if out is None or isinstance(exc, BrokenPipeError):  # not the folder's fault
            raise
        resume = f"--resume {out}" if (out / "config.json").is_file() else None  # else: the same command again
        print(write_error_message(prog, out, exc, resume), file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()


def fnn_structure(args, depth, target_depth, activation="relu") -> FNNStructure:
    """The FNN problem of width ``--width``, frozen depth ``depth`` and target depth ``target_depth``."""
    return FNNStructure("fnn", args.width, depth, target_depth, activation, True)


def lora_cells(args, structure, ranks, *, label="lora", tune_bias=None, axis_extra=()):
    """One LoRA :class:`Cell` per frozen-model kind of ``--frozen`` and rank ``R`` of ``ranks``: rank ``R`` on
    every layer of an FNN, ``(R,)`` for a TFN; ``axis_extra`` is appended to the row's ``("rank", R)``."""
    structure = structure_of(structure)
    L = structure.L
    tb = args.tune_bias if tune_bias is None else tune_bias
    out = []
    for kind in args.kinds:
        for R in ranks:
            per_layer = (R,) if structure.family == "tfn" else (R,) * L
            out.append(
                Cell(
                    kind=kind,
                    structure=structure,
                    method="lora",
                    axis=tuple(axis_extra) + (("rank", R),),
                    label=label,
                    ranks=per_layer,
                    tune_bias=tb,
                )
            )
    return out


def apply_quick(args, ranks="1,4,8,16", seeds=2, iterations=100):
    """``--quick``: a few ranks (unless ``--ranks`` is given), at most 2 seeds, a 2-point grid, at most 100 steps."""
    args.quick_applied = True
    if args.ranks is None:
        D = args.width
        args.ranks = ",".join(str(min(int(r), D)) for r in ranks.split(","))
    args.seeds = min(args.seeds, seeds)
    args.iterations = min(args.iterations, iterations)
    args.lr_grid = args.lr_grid[:2]
    args.wd_grid = args.wd_grid[:1]
