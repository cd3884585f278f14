"""How pretraining moves the frozen model: the spectra of the discrepancies the construction matches.

``python -m verification.pretraining --model fnn --depth 4 --seeds 100`` (or ``--model tfn``): for seeds
``0..N-1`` the random frozen model and the target of the experiments (``python -m verification.fnn`` /
``verification.tfn`` with the same sizes draw the same ones), the pretrained frozen model made from the
random one (THEORY.md §4: all its weights and biases trained toward the target until the loss is a third of
the first), and, for both, the singular values ``σ_1 >= ... >= σ_D`` of every discrepancy the construction
matches: the FNN's block discrepancies ``E_i = T_i - Π_{l ∈ P_i} W_l`` (Theorem 3, uniform partition,
:func:`lora_theory.block_discrepancies`), the TFN's score, value and output discrepancies (Theorem 7,
:func:`lora_theory.tfn_matched_discrepancies`). THEORY.md §2.6: the threshold and the error below it are set
by these spectra (rank ``R`` leaves ``σ_{M R + 1}`` of a block of ``M`` layers, ``σ_{2R+1}`` of a TFN chain),
so a frozen model closer to the target helps exactly as far as pretraining lowers them.

Paired by seed, it prints per discrepancy and ``k`` in how many seeds the pretrained ``σ_k`` is lower and
the median ratio pretrained / random, then the median relative change of every frozen parameter; it writes
``summary.json`` (every seed's spectra) and ``figure.png`` (median ``σ_k`` against ``k``, interquartile
bands) under ``--out``, with the pretrained models in ``pretrained/`` (a rerun with the same ``--out``
reads them back).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import warnings
from pathlib import Path

import numpy as np

import lora_theory

from .experiment import CLIError, Problems, _atomic_write, _Parser, _save_figure, fnn_structure

__all__ = ["spectra", "summarize", "main"]

PROG = "python -m verification.pretraining"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("fnn", "tfn"), default="fnn", help="fnn (default) or tfn")
    p.add_argument("--width", type=int, default=16, help="D (default 16)")
    p.add_argument("--depth", type=int, default=None, help="L, frozen layers or blocks (default 4 fnn, 2 tfn)")
    p.add_argument("--target-depth", type=int, default=None, help="L̄, fnn only (default max(1, L // 2))")
    p.add_argument("--heads", type=int, default=2, help="H, tfn only (default 2)")
    p.add_argument("--seq-len", type=int, default=10, help="N, tokens per pretraining input, tfn only (default 10)")
    p.add_argument("--seeds", type=int, default=20, help="how many seeds (0..N-1; default 20)")
    p.add_argument("--out", default=None, help="output folder (default results/pretraining-<model>-<time>)")
    p.add_argument("--quick", action="store_true", help="a small smoke run (D = 4, 3 seeds)")
    p.add_argument("--no-figure", action="store_true", help="skip figure.png")
    return p


def _structure(args) -> tuple:
    if args.quick:
        args.width, args.seeds = 4, 3
    if args.model == "tfn" and args.target_depth is not None:
        raise CLIError("--target-depth applies to --model fnn only")
    L = args.depth if args.depth is not None else (4 if args.model == "fnn" else 2)
    for flag, value in (("--width", args.width), ("--depth", L), ("--seeds", args.seeds),
                        ("--heads", args.heads), ("--seq-len", args.seq_len)):
        if value < 1:
            raise CLIError(f"{flag}: must be at least 1, got {value}")
    if args.model == "tfn":
        return ("tfn", args.width, L, args.heads, args.seq_len)
    Lbar = args.target_depth if args.target_depth is not None else max(1, L // 2)
    if not 1 <= Lbar <= L:
        raise CLIError(f"--target-depth: need 1 <= L̄ <= L = {L}, got {Lbar}")
    return fnn_structure(args, L, Lbar)


def _discrepancies(structure, frozen, target) -> dict:
    """``{name: (E, M)}``: every matched discrepancy ``(D, D)`` and how many factors its chain has."""
    if structure[0] == "fnn":
        sizes = lora_theory.uniform_partition(structure[2], structure[3])
        blocks = lora_theory.partition_blocks(sizes)
        return {f"E_{i + 1} (layers {b.start + 1}-{b.stop})": (E, len(b))
                for i, (b, E) in enumerate(zip(blocks, lora_theory.block_discrepancies(frozen, target)))}
    out = {}
    for (kind, l, h), E in lora_theory.tfn_matched_discrepancies(frozen, target).items():
        out[f"{kind}[{l},{h}]" if h is not None else kind] = (E, 2)
    return out


def _parameters(structure, model) -> dict:
    if structure[0] == "fnn":
        return {**{f"W_{l + 1}": w for l, w in enumerate(model.weights)},
                **{f"b_{l + 1}": b for l, b in enumerate(model.biases)}}
    return dict(model.parameters())


def spectra(structure, seeds, problems: Problems, progress=None) -> dict:
    """Per frozen-model kind, discrepancy and seed the singular values, and the parameters' relative change.

    Returns ``{"names", "factors", "random", "pretrained", "change"}``: ``random[name]`` and
    ``pretrained[name]`` are ``(len(seeds), D)`` arrays (descending per row); ``factors[name]`` is ``M``, the
    number of frozen factors in that discrepancy's chain; ``change[param]`` the per-seed relative Frobenius
    change ``||P_pretrained - P_random|| / ||P_random||`` (``len(seeds)``,).
    """
    problems.prepare(structure, list(seeds))          # all FNN seeds in one batched pretraining
    out = {"random": {}, "pretrained": {}, "change": {}, "factors": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_theory.IllConditionedWarning)
        for seed in seeds:
            target = problems.target(structure, seed)
            models = {kind: problems.frozen(structure, kind, seed) for kind in ("random", "pretrained")}
            for kind, model in models.items():
                for name, (E, M) in _discrepancies(structure, model, target).items():
                    out[kind].setdefault(name, []).append(np.linalg.svd(E, compute_uv=False))   # (D,)
                    out["factors"][name] = M
            before, after = (_parameters(structure, models[k]) for k in ("random", "pretrained"))
            for name, value in before.items():
                change = np.linalg.norm(np.asarray(after[name]) - value) / np.linalg.norm(value)
                out["change"].setdefault(name, []).append(float(change))
            if progress is not None:
                progress.update(1)
    out["names"] = list(out["random"])
    for kind in ("random", "pretrained"):
        out[kind] = {name: np.array(v) for name, v in out[kind].items()}             # (seeds, D)
    out["change"] = {name: np.array(v) for name, v in out["change"].items()}
    return out


def summarize(structure, seeds, result, pretrain_info) -> dict:
    """Medians, quartiles and the paired comparison of :func:`spectra`, with every seed's spectra."""
    rows = []
    for name in result["names"]:
        rand, pre = result["random"][name], result["pretrained"][name]                  # (seeds, D) each
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = pre / rand
        M = result["factors"][name]
        D = rand.shape[1]
        rows.append({
            "name": name, "factors": M,
            "rank_leaving": [(k - 1) // M if (k - 1) % M == 0 else None for k in range(1, D + 1)],
            "median_random": np.median(rand, 0).tolist(), "median_pretrained": np.median(pre, 0).tolist(),
            "q25_random": np.quantile(rand, 0.25, 0).tolist(), "q75_random": np.quantile(rand, 0.75, 0).tolist(),
            "q25_pretrained": np.quantile(pre, 0.25, 0).tolist(),
            "q75_pretrained": np.quantile(pre, 0.75, 0).tolist(),
            "pretrained_lower": (pre < rand).sum(0).tolist(),
            "median_ratio": [float(np.median(r[np.isfinite(r)])) if np.isfinite(r).any() else None
                             for r in ratio.T],
            "random": rand.tolist(), "pretrained": pre.tolist()})
    return {"tool": "pretraining", "structure": list(structure), "seeds": list(seeds),
            "pretraining": "Adam lr 1e-3, fresh 256-batches, float64, until loss < first/3 (<= 1000 steps)",
            "pretrain_info": pretrain_info, "discrepancies": rows,
            "parameter_change": {name: {"median": float(np.median(v)), "q25": float(np.quantile(v, 0.25)),
                                        "q75": float(np.quantile(v, 0.75))}
                                 for name, v in result["change"].items()}}


def _describe(structure) -> str:
    if structure[0] == "fnn":
        _, D, L, Lbar, *_ = structure
        return f"FNN L̄={Lbar}, L={L}, D={D}"
    _, D, L, H, N = structure
    return f"TFN L={L}, H={H}, D={D}"


def format_table(summary) -> str:
    n = len(summary["seeds"])
    lines = [f"{_describe(summary['structure'])}, {n} seeds: singular values σ_k of the discrepancies the "
             f"construction matches, pretrained against random, paired by seed",
             "(k/n: the pretrained σ_k is lower in k of n seeds; ratio: median of pretrained / random; rank R "
             "leaves σ_k: the rank whose error that σ_k is)"]
    for row in summary["discrepancies"]:
        D = len(row["median_random"])
        lines.append("")
        lines.append(f"{row['name']:<20}{'k':>18}" + "".join(f"{k:>8}" for k in range(1, D + 1)))
        lines.append(f"{'':<20}{'rank R leaves σ_k':>18}"
                     + "".join(f"{'' if r is None else r:>8}" for r in row["rank_leaving"]))
        lines.append(f"{'':<20}{'median random':>18}" + "".join(f"{v:>8.4g}" for v in row["median_random"]))
        lines.append(f"{'':<20}{'pretrained':>18}" + "".join(f"{v:>8.4g}" for v in row["median_pretrained"]))
        lines.append(f"{'':<20}{'lower in':>18}" + "".join(f"{c:>8}" for c in row["pretrained_lower"])
                     + f"   (of {n})")
        lines.append(f"{'':<20}{'median ratio':>18}"
                     + "".join(f"{'-' if v is None else format(v, '.3f'):>8}" for v in row["median_ratio"]))
    lines.append("")
    lines.append("relative change of the frozen parameters, ||pretrained - random|| / ||random|| (median "
                 "[q25, q75] over seeds):")
    for name, c in summary["parameter_change"].items():
        lines.append(f"  {name:<8} {c['median']:.4f}  [{c['q25']:.4f}, {c['q75']:.4f}]")
    return "\n".join(lines)


def make_figure(summary, path: Path):
    """One panel per discrepancy: median ``σ_k`` against ``k`` (log scale), random and pretrained, IQR bands."""
    from matplotlib.figure import Figure

    rows = summary["discrepancies"]
    cols = min(len(rows), 4)
    nrows = -(-len(rows) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.7 * nrows))
    colours = {"random": "tab:blue", "pretrained": "tab:orange"}
    for i, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        k = np.arange(1, len(row["median_random"]) + 1)
        for kind in ("random", "pretrained"):
            floor = 1e-300                                  # exact zeros cannot be drawn on a log scale
            ax.plot(k, np.maximum(row[f"median_{kind}"], floor), marker="o", ms=2.5, color=colours[kind],
                    label=kind)
            ax.fill_between(k, np.maximum(row[f"q25_{kind}"], floor), np.maximum(row[f"q75_{kind}"], floor),
                            color=colours[kind], alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(row["name"], fontsize=8)
        ax.set_xlabel("k", fontsize=7)
        ax.tick_params(labelsize=6)
        if i % cols == 0:
            ax.set_ylabel("σ_k (median, IQR)", fontsize=7)
        if i == 0:
            ax.legend(fontsize=6)
    fig.suptitle(f"{_describe(summary['structure'])}, {len(summary['seeds'])} seeds: discrepancy spectra, "
                 "random vs pretrained frozen model", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def main(argv=None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        structure = _structure(args)
        out = Path(args.out) if args.out else Path("results") / f"pretraining-{args.model}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        try:
            (out / "pretrained").mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise CLIError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    except CLIError as exc:
        print(f"error: {PROG}: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    seeds = list(range(args.seeds))
    problems = Problems(cache=out / "pretrained")
    print(f"pretraining: {_describe(structure)}, {len(seeds)} seeds (the pretrained models are kept in "
          f"{out / 'pretrained'})", file=sys.stderr)
    with tqdm(total=len(seeds), desc="pretraining and spectra", unit="seed", file=sys.stderr) as bar:
        result = spectra(structure, seeds, problems, progress=bar)
    summary = summarize(structure, seeds, result, problems.pretrain_info)
    print(format_table(summary))
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    written = ["summary.json"]
    if not args.no_figure:
        make_figure(summary, out / "figure.png")
        written.append("figure.png")
    print(f"wrote {out}/{', '.join(written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
