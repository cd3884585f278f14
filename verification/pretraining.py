"""``python -m verification.pretraining``: how pretraining moves the spectra the construction matches.

``python -m verification.pretraining --model fnn --depth 4 --seeds 100`` (or ``--model linear``,
``--model tfn``): for seeds ``0..N-1`` the random frozen model and the target of the experiments
(``python -m verification.fnn``, ``verification.linear``, ``verification.tfn`` with the same sizes draw the
same ones), the pretrained frozen model made from the random one (THEORY.md §4: all its weights and biases trained
toward the target until the loss is a third of the first), and, for both, the singular values ``σ_1 >= ... >= σ_D`` of
every discrepancy the construction matches: the FNN's block discrepancies ``E_i = T_i - Π_{l ∈ P_i} W_l`` (Theorem 3,
uniform partition, :func:`lora_theory.block_discrepancies`; for the linear model the one ``E = T - Π W``, Lemma 1, whose
tail gives its exact error: ``Σ_{k > RL} σ_k² / D`` per coordinate on ``N(0, I)`` inputs), the TFN's score, value and
output discrepancies (Theorem 7, :func:`lora_theory.tfn_matched_discrepancies`). THEORY.md §2.6: the threshold and the
error below it are set by these spectra (rank ``R`` leaves ``σ_{M R + 1}`` of a block of ``M`` layers, ``σ_{2R+1}`` of a
TFN chain), so a frozen model closer to the target helps exactly as far as pretraining lowers them.

Paired by seed, it prints per discrepancy and ``k`` in how many seeds the pretrained ``σ_k`` is lower and
the median ratio pretrained / random, then the median relative change of every frozen parameter; it writes
``summary.json`` (every seed's spectra) and ``figure.png`` (median ``σ_k`` against ``k``, interquartile
bands) under ``--out``, with the pretrained models in ``pretrained/`` (a rerun with the same ``--out``
reads them back).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

import lora_theory

from .outdir import (
    FolderLock,
    OneLineParser,
    atomic_write,
    check_folder,
    interrupts_deferred,
    positive_int,
    write_error_message,
)
from .sweep import (
    PRETRAIN_FACTOR,
    PRETRAIN_MAX_STEPS,
    PRETRAINING_PROTOCOL,
    CLIError,
    Problems,
    Structure,
    TFNStructure,
    default_out,
    fnn_structure,
    save_figure,
    structure_of,
    writable_folder,
)
from .sweep.cluster import RayBackend, add_backend_arguments, check_backend_arguments

__all__ = ["spectra", "summarize", "main"]

PROG = "python -m verification.pretraining"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        choices=("fnn", "linear", "tfn"),
        default="fnn",
        help="fnn (default; ReLU), linear (one target layer, no biases: verification.linear) or tfn",
    )
    p.add_argument("--width", type=positive_int, default=None, help="D (default 16)")
    p.add_argument(
        "--depth", type=positive_int, default=None, help="L, frozen layers or blocks (default 4 fnn, 2 linear and tfn)"
    )
    p.add_argument("--target-depth", type=int, default=None, help="L̄, fnn only (default max(1, L // 2))")
    p.add_argument("--heads", type=positive_int, default=None, help="H, tfn only (default 2)")
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="N, tokens per pretraining input, tfn only (default 10)"
    )
    p.add_argument("--seeds", type=positive_int, default=None, help="how many seeds (0..N-1; default 20)")
    p.add_argument("--out", default=None, help="output folder (default results/pretraining-<model>-<time>)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run: D = 4 and 3 seeds unless --width, --seeds say otherwise",
    )
    p.add_argument("--no-figure", action="store_true", help="skip figure.png")
    add_backend_arguments(p)  # the pretraining as Ray tasks with --backend ray
    return p


def _structure(args) -> Structure:
    """The sweeps' structure for these arguments (``args.width``, ``.seeds`` ... filled in), validated."""
    if args.width is None:
        args.width = 4 if args.quick else 16
    if args.seeds is None:
        args.seeds = 3 if args.quick else 20
    if args.model != "fnn" and args.target_depth is not None:
        raise CLIError("--target-depth applies to --model fnn only")
    if args.model != "tfn":
        for flag, value in (("--heads", args.heads), ("--seq-len", args.seq_len)):
            if value is not None:
                raise CLIError(f"{flag} applies to --model tfn only")
    args.heads = 2 if args.heads is None else args.heads
    args.seq_len = 10 if args.seq_len is None else args.seq_len
    L = args.depth if args.depth is not None else (4 if args.model == "fnn" else 2)
    if args.model == "linear":  # verification.linear's models: one target layer
        args.target_depth = 1
    if args.model == "tfn":
        return TFNStructure("tfn", args.width, L, args.heads, args.seq_len)
    Lbar = args.target_depth if args.target_depth is not None else max(1, L // 2)
    if not 1 <= Lbar <= L:
        raise CLIError(f"--target-depth: need 1 <= L̄ <= L = {L}, got {Lbar}")
    return fnn_structure(args, L, Lbar, activation="linear" if args.model == "linear" else "relu")


def _discrepancies(structure, frozen, target) -> dict:
    """``{name: (E, M)}``: every matched discrepancy ``(D, D)`` and how many factors its chain has."""
    structure = structure_of(structure)
    if structure.family == "fnn":
        sizes = lora_theory.uniform_partition(structure.L, structure.Lbar)
        blocks = lora_theory.partition_blocks(sizes)
        return {
            f"E_{i + 1} (layers {b.start + 1}-{b.stop})": (E, len(b))
            for i, (b, E) in enumerate(zip(blocks, lora_theory.block_discrepancies(frozen, target)))
        }
    out = {}
    for (kind, l, h), E in lora_theory.tfn_matched_discrepancies(frozen, target).items():
        out[f"{kind}[{l},{h}]" if h is not None else kind] = (E, 2)
    return out


def _parameters(structure, model) -> dict:
    if structure_of(structure).family == "fnn":
        return {
            **{f"W_{l + 1}": w for l, w in enumerate(model.weights)},
            **{f"b_{l + 1}": b for l, b in enumerate(model.biases)},
        }
    return dict(model.parameters())


def spectra(structure, seeds, problems: Problems, progress=None) -> dict:
    """Per frozen-model kind, discrepancy and seed the singular values, and the parameters' relative change.

    Returns ``{"names", "factors", "random", "pretrained", "change"}``: ``random[name]`` and
    ``pretrained[name]`` are ``(len(seeds), D)`` arrays (descending per row); ``factors[name]`` is ``M``, the
    number of frozen factors in that discrepancy's chain; ``change[param]`` the per-seed relative Frobenius
    change ``||P_pretrained - P_random|| / ||P_random||`` (``len(seeds)``,).
    """
    problems.prepare(structure, list(seeds))  # all FNN seeds in one batched pretraining
    out = {"random": {}, "pretrained": {}, "change": {}, "factors": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_theory.IllConditionedWarning)
        for seed in seeds:
            target = problems.target(structure, seed)
            models = {kind: problems.frozen(structure, kind, seed) for kind in ("random", "pretrained")}
            for kind, model in models.items():
                for name, (E, M) in _discrepancies(structure, model, target).items():
                    out[kind].setdefault(name, []).append(np.linalg.svd(E, compute_uv=False))  # (D,)
                    out["factors"][name] = M
            before, after = (_parameters(structure, models[k]) for k in ("random", "pretrained"))
            for name, value in before.items():
                if not np.any(value) and not np.any(after[name]):
                    continue  # a linear model's zero biases
                change = np.linalg.norm(np.asarray(after[name]) - value) / np.linalg.norm(value)
                out["change"].setdefault(name, []).append(float(change))
            if progress is not None:
                progress.update(1)
    out["names"] = list(out["random"])
    for kind in ("random", "pretrained"):
        out[kind] = {name: np.array(v) for name, v in out[kind].items()}  # (seeds, D)
    out["change"] = {name: np.array(v) for name, v in out["change"].items()}
    return out


def _zero_rounding(s: np.ndarray) -> np.ndarray:
    """Singular values (seeds, D) with those at rounding level, ``<= D·eps·σ_1`` of their matrix, set to 0."""
    tol = s.shape[1] * np.finfo(np.float64).eps * s[:, :1]  # (seeds, 1)
    return np.where(s > tol, s, 0.0)


def summarize(structure, seeds, result, pretrain_info) -> dict:
    """Medians, quartiles and the paired comparison of :func:`spectra`, with every seed's spectra.

    Per discrepancy and ``k``: ``pretrained_lower`` (seeds where the pretrained ``σ_k`` is lower),
    ``median_ratio`` (median of pretrained / random over ``ratio_seeds`` seeds: a pair of values both at
    rounding level, set to 0, has no ratio; a positive value over 0 counts as infinite). ``capped`` lists
    the seeds whose pretraining stopped at the step limit before reaching its loss target.
    """
    rows = []
    for name in result["names"]:
        rand, pre = (_zero_rounding(result[kind][name]) for kind in ("random", "pretrained"))  # (seeds, D)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = pre / rand  # 0/0 (both at rounding level): NaN, left out; x/0: inf
        M = result["factors"][name]
        D = rand.shape[1]
        rows.append(
            {
                "name": name,
                "factors": M,
                "rank_leaving": [(k - 1) // M if (k - 1) % M == 0 else None for k in range(1, D + 1)],
                "median_random": np.median(rand, 0).tolist(),
                "median_pretrained": np.median(pre, 0).tolist(),
                "q25_random": np.quantile(rand, 0.25, 0).tolist(),
                "q75_random": np.quantile(rand, 0.75, 0).tolist(),
                "q25_pretrained": np.quantile(pre, 0.25, 0).tolist(),
                "q75_pretrained": np.quantile(pre, 0.75, 0).tolist(),
                "pretrained_lower": (pre < rand).sum(0).tolist(),
                "median_ratio": [float(np.median(r[~np.isnan(r)])) if (~np.isnan(r)).any() else None for r in ratio.T],
                "ratio_seeds": (~np.isnan(ratio)).sum(0).tolist(),
                "random": rand.tolist(),
                "pretrained": pre.tolist(),
            }
        )
    capped = sorted(
        label
        for label, info in pretrain_info.items()
        if info["steps"] >= PRETRAIN_MAX_STEPS and info["last_loss"] >= PRETRAIN_FACTOR * info["first_loss"]
    )
    return {
        "tool": "pretraining",
        "structure": list(structure),
        "seeds": list(seeds),
        "pretraining": PRETRAINING_PROTOCOL,
        "pretrain_info": pretrain_info,
        "capped": capped,
        "discrepancies": rows,
        "parameter_change": {
            name: {
                "median": float(np.median(v)),
                "q25": float(np.quantile(v, 0.25)),
                "q75": float(np.quantile(v, 0.75)),
            }
            for name, v in result["change"].items()
        },
    }


def _describe(structure) -> str:
    s = structure_of(structure)
    if s.family == "fnn":
        return f"{'linear' if s.activation == 'linear' else 'FNN'} L̄={s.Lbar}, L={s.L}, D={s.D}"
    return f"TFN L={s.L}, H={s.H}, D={s.D}"


def format_table(summary) -> str:
    n = len(summary["seeds"])
    lines = [
        f"{_describe(summary['structure'])}, {n} seeds: singular values σ_k of the discrepancies the "
        f"construction matches, pretrained against random, paired by seed",
        "(k/n: the pretrained σ_k is lower in k of n seeds; ratio: median of pretrained / random; rank R "
        "leaves σ_k: the rank whose error that σ_k is)",
    ]
    for row in summary["discrepancies"]:
        D = len(row["median_random"])
        lines.append("")
        lines.append(f"{row['name']:<20}{'k':>18}" + "".join(f"{k:>8}" for k in range(1, D + 1)))
        lines.append(
            f"{'':<20}{'rank R leaves σ_k':>18}" + "".join(f"{'' if r is None else r:>8}" for r in row["rank_leaving"])
        )
        lines.append(f"{'':<20}{'median random':>18}" + "".join(f"{v:>8.3g}" for v in row["median_random"]))
        lines.append(f"{'':<20}{'pretrained':>18}" + "".join(f"{v:>8.3g}" for v in row["median_pretrained"]))
        lines.append(f"{'':<20}{'lower in':>18}" + "".join(f"{c:>8}" for c in row["pretrained_lower"]) + f"   (of {n})")
        lines.append(
            f"{'':<20}{'median ratio':>18}"
            + "".join(f"{'-' if v is None else format(v, '.3f'):>8}" for v in row["median_ratio"])
        )
    if any(c < n for row in summary["discrepancies"] for c in row["ratio_seeds"]):
        lines.append("")
        lines.append(
            "(some ratios are medians over fewer seeds: both singular values at rounding level, see "
            "ratio_seeds in summary.json)"
        )
    if summary["capped"]:
        lines.append("")
        lines.append(
            f"pretraining reached the step limit ({PRETRAIN_MAX_STEPS}) before a third of its first loss "
            f"in {len(summary['capped'])} of {n} seeds"
        )
    lines.append("")
    lines.append(
        "relative change of the frozen parameters, ||pretrained - random|| / ||random|| (median [q25, q75] over seeds):"
    )
    for name, c in summary["parameter_change"].items():
        lines.append(f"  {name:<8} {c['median']:.4f}  [{c['q25']:.4f}, {c['q75']:.4f}]")
    return "\n".join(lines)


def make_figure(summary, path: Path):
    """One panel per discrepancy: median ``σ_k`` against ``k`` (log scale), random and pretrained, IQR bands."""
    from matplotlib.figure import Figure

    rows = summary["discrepancies"]
    cols = min(len(rows), 4)
    nrows = -(-len(rows) // cols)
    fig = Figure(figsize=(max(3.2 * cols, 6.4), 2.7 * nrows + 0.5))
    colours = {"random": "tab:blue", "pretrained": "tab:orange"}
    for i, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        k = np.arange(1, len(row["median_random"]) + 1)
        for kind in ("random", "pretrained"):
            positive = lambda v: np.where(np.asarray(v) > 0, v, np.nan)  # noqa: E731  (zeros: not drawn on a log scale)
            ax.plot(k, positive(row[f"median_{kind}"]), marker="o", ms=2.5, color=colours[kind], label=kind)
            ax.fill_between(
                k, positive(row[f"q25_{kind}"]), positive(row[f"q75_{kind}"]), color=colours[kind], alpha=0.2
            )
        ax.set_yscale("log")
        ax.set_title(row["name"], fontsize=8)
        ax.set_xlabel("k", fontsize=7)
        ax.tick_params(labelsize=6)
        if i % cols == 0:
            ax.set_ylabel("σ_k (median, IQR)", fontsize=7)
        if i == 0:
            ax.legend(fontsize=6)
    fig.suptitle(
        f"{_describe(summary['structure'])}, {len(summary['seeds'])} seeds:\ndiscrepancy spectra, "
        "random vs pretrained frozen model",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path)


TOOL = "pretraining"


def _legacy_folder(out: Path) -> bool:
    """A folder written before config.json named the tool: its summary.json does (``"tool": "pretraining"``)."""
    if (out / "config.json").exists():
        return False
    try:
        old = json.loads((out / "summary.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and old.get("tool") == TOOL


def _check_out(out: Path, structure, seeds) -> bool:
    """Whether ``out`` may take this run (:func:`verification.outdir.check_folder`; reads only): new or empty
    (``False``), or this tool's with the same sizes and seeds (``True``, its pretrained models are reused).
    Anything else, another tool's folder or this tool's with other sizes or seeds, is refused (CLIError)."""
    if _legacy_folder(out):
        saved = json.loads((out / "summary.json").read_bytes().decode("utf-8"))
    elif check_folder(out, TOOL):
        try:
            saved = json.loads((out / "config.json").read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            saved = {}
    else:
        return False
    if saved.get("structure") != list(structure) or saved.get("seeds") != list(seeds):
        raise CLIError(
            f"--out {out}: holds a pretraining run for {saved.get('structure')} with "
            f"{len(saved.get('seeds') or [])} seeds; use another folder"
        )
    return True


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    lock = out = None
    try:
        check_backend_arguments(args)
        structure = _structure(args)
        seeds = list(range(args.seeds))
        out = Path(args.out) if args.out else default_out(f"pretraining-{args.model}")
        _check_out(out, structure, seeds)
        lock = FolderLock(out, PROG).acquire()
        own = _check_out(out, structure, seeds)  # again under the lock
        writable_folder(out)
        (out / "pretrained").mkdir(exist_ok=True)  # the cache of pretrained models
        if not own or _legacy_folder(out):
            command = list(argv if argv is not None else sys.argv[1:])
            atomic_write(
                out / "config.json",
                json.dumps({"tool": TOOL, "argv": command, "structure": list(structure), "seeds": seeds}, indent=1),
            )
        return _run(args, out, structure, seeds)
    except CLIError as exc:
        return parser.refuse(exc)
    except OSError as exc:
        if out is None or isinstance(exc, BrokenPipeError):  # not the folder's fault
            raise
        print(write_error_message(PROG, out, exc, "the same command"), file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()


def _run(args, out: Path, structure, seeds) -> int:
    import torch
    from tqdm import tqdm

    problems = Problems(cache=out / "pretrained")
    print(
        f"pretraining: {_describe(structure)}, {len(seeds)} seeds (the pretrained models are kept in "
        f"{out / 'pretrained'})",
        file=sys.stderr,
    )
    try:
        if args.backend == "ray":  # the pretraining as tasks, the models kept here; then the spectra here
            with RayBackend(args.address, f": the pretrained models so far are kept in {out}") as backend:
                print(backend.describe(torch.device("cpu"), "pretraining tasks"), file=sys.stderr)
                with tqdm(total=len(seeds), desc="pretraining (Ray)", unit="seed", file=sys.stderr) as bar:
                    bar.update(sum(problems._cached(structure, s) is not None for s in seeds))
                    backend.pretrain(problems, [structure], seeds, bar)
        with tqdm(total=len(seeds), desc="pretraining and spectra", unit="seed", file=sys.stderr) as bar:
            result = spectra(structure, seeds, problems, progress=bar)
        summary = summarize(structure, seeds, result, problems.pretrain_info)
        with interrupts_deferred():  # Ctrl-C now waits until the files are written whole
            written = _write(args, out, summary)  # first: a closed stdout cannot lose them
            print(format_table(summary))
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted: the pretrained models so far are kept; run the same command with --out {out} "
            "to go on",
            file=sys.stderr,
        )
        return 130
    print(f"wrote {out}/{', '.join(written)}", file=sys.stderr)
    return 0


def _write(args, out: Path, summary) -> list[str]:
    """summary.json written whole (the old one replaced only then), then the figure, whose failure is a
    warning; an old figure is removed when no new one is written (it would show other results)."""
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    written = ["summary.json"]
    if not args.no_figure:
        try:
            make_figure(summary, out / "figure.png")
            written.append("figure.png")
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the summary is written; the drawing is an extra
            print(
                f"warning: figure.png not written ({type(exc).__name__}: {exc}); summary.json is complete",
                file=sys.stderr,
            )
    if "figure.png" not in written:
        (out / "figure.png").unlink(missing_ok=True)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
