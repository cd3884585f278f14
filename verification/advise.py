"""``python -m verification.advise BASE TUNED``: the LoRA rank each layer of a fine-tuning change needs.

BASE and TUNED are checkpoint files or model folders (Hugging Face ``save_pretrained`` output: shards read
through ``model.safetensors.index.json``, the architecture read from ``config.json``; torch files with
``weights_only=True`` and ``.npz`` also work; nothing is unpickled). The layers are read one at a time
(:mod:`verification.streaming`, ``--device cpu|cuda``) and reported in model order
(:mod:`verification.rank_report`): per layer the shape ``out x in``, the rank of ``ΔW`` above the noise floor
its storage rounding leaves (:func:`lora_theory.noise_floor`), the floor, the energy rank over the whole
spectrum and the bias change; the changed vectors (norms, biases) in one line. That per-layer answer is all
the theory supports for real checkpoints (Zeng & Lee 2024, Lemma 1 with ``L = 1``; the report says so).

* ``--budget PARAMS`` / ``--error REL``: ranks from :func:`lora_theory.allocate_ranks`, beside a uniform rank
  at the same budget, both errors measured;
* ``--extract DIR``: the PEFT adapter at the chosen ranks (:func:`verification.extract.extract_adapter`,
  ``--dtype float32`` by default), built and saved with PEFT's own classes, checked as written, and
  recording its base.

``--fnn`` is the depth-aware mode of Zeng & Lee 2024, Theorems 3 and 6: BASE is a plain ReLU MLP
(``layers.{l}.weight/bias``, all ``D x D``) and TUNED a separately given *shallower* target MLP; it reports
``max_i ceil(rank(E_i) / |P_i|)`` for the uniform and the best partition. With ``--input-radius`` and
``--out`` it also builds the adapters (:func:`lora_theory.fnn.lora_fnn`) and exports them for PEFT, only after
checking them as written, in the precision written, on the ball (a one-line refusal otherwise).

Output: a table on stdout; under ``--out DIR``: ``report.json``, ``spectra.png`` (a heatmap of the normalised
spectra by layer) and ``peft_rank_pattern.json`` (a ``LoraConfig`` built by PEFT, under ``"lora_config"``).
A missing optional package is named with the extra that installs it, in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lora_theory.advisor import RankReport, advise_fnn, advise_layers
from lora_theory.errors import LoraTheoryError

from .checkpoints import CheckpointError, fnn_from_state_dict, read_checkpoint
from .outdir import CLIError, OneLineParser, check_folder, claim_folder
from .streaming import SPECTRUM_CHOICES

__all__ = ["advise_checkpoints", "format_table", "plot_spectra", "main"]


def advise_checkpoints(base_path, tuned_path, *, tol: float | None = None, energy: float = 0.99) -> RankReport:
    """:func:`lora_theory.advisor.advise_layers` on two checkpoint files, with their storage precision.

    Raises
    ------
    CheckpointError, UnsafeCheckpointError
        A file that is missing, not a checkpoint, or a pickle with a payload (refused, not executed).
    InvalidArgumentError
        Mismatched architectures, missing layers, non-float weights (see ``advise_layers``).
    """
    base = read_checkpoint(base_path)
    tuned = read_checkpoint(tuned_path)
    eps = {k: max(base.eps.get(k, 0.0), tuned.eps.get(k, 0.0)) for k in base.tensors if k in base.eps}
    dtypes = {
        k: base.dtypes[k]
        if base.dtypes[k] == tuned.dtypes.get(k, base.dtypes[k])
        else f"{base.dtypes[k]}/{tuned.dtypes[k]}"
        for k in base.tensors
    }
    return advise_layers(base.tensors, tuned.tensors, tol=tol, energy=energy, eps=eps, dtypes=dtypes)


def format_table(report: RankReport) -> str:
    """The per-layer table printed on stdout."""
    pct = f"{100 * report.energy:g}%"
    header = ("layer", "shape", "exact rank", f"rank {pct}", "sigma_1", "tolerance", "|dW|/|W|", "bias |db|")
    rows = []
    for a in report.layers:
        s1 = a.singular_values[0] if a.singular_values.size else 0.0
        bias = "-" if a.bias_key is None else (f"{a.bias_change_norm:.2e}" if a.bias_changed else "unchanged")
        rows.append(
            (
                a.name,
                f"{a.shape[0]}x{a.shape[1]}",
                f"{a.exact_rank}/{a.max_rank}",
                str(a.energy_rank),
                f"{s1:.3e}",
                f"{a.tolerance:.1e}",
                f"{a.relative_change:.2e}",
                bias,
            )
        )
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for v in report.vectors:
        lines.append(
            f"vector {v['name']} {tuple(v['shape'])}: |change| = {v['change_norm']:.2e} (not a matrix; "
            "LoRA does not adapt it)"
        )
    for s in report.skipped:
        lines.append(f"skipped {s['name']} {tuple(s['shape'])}: {s['reason']}")
    exact = sum(a.parameters(a.exact_rank) for a in report.layers)
    full = sum(a.shape[0] * a.shape[1] for a in report.layers)
    lines.append(f"exact LoRA parameters: {exact} (the weight matrices hold {full})")
    lines.append("note: " + report.note)
    return "\n".join(lines)


def plot_spectra(report: RankReport, path) -> None:
    """Two panels: ``σ_j(ΔW) / σ_1`` (with each layer's tolerance) and the relative Frobenius error of the
    best rank-``r`` adapter against ``r``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    many = len(report.layers) > 12
    for a in report.layers:
        s = a.singular_values
        if s.size == 0 or s[0] == 0:
            continue
        idx = np.arange(1, s.size + 1)
        (line,) = ax1.semilogy(idx, np.maximum(s / s[0], 1e-18), lw=1, label=None if many else a.name)
        ax1.axhline(a.tolerance / s[0], color=line.get_color(), ls=":", lw=0.8)
        ranks = np.arange(a.frobenius_tail.size)
        ax2.plot(
            ranks, a.frobenius_tail / a.frobenius_tail[0], lw=1, color=line.get_color(), label=None if many else a.name
        )
    ax1.set_xlabel("index j")
    ax1.set_ylabel("sigma_j(dW) / sigma_1(dW)")
    ax1.set_title("spectra of the weight changes (dotted: tolerance)")
    ax2.set_xlabel("LoRA rank r")
    ax2.set_ylabel("||dW - LR_r(dW)||_F / ||dW||_F")
    ax2.set_title("error of the best rank-r adapter")
    ax2.axhline(np.sqrt(1 - report.energy), color="grey", ls="--", lw=0.8)
    if not many and report.layers:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fnn_mode(args) -> int:
    base = read_checkpoint(args.base)
    tuned = read_checkpoint(args.tuned)
    frozen = fnn_from_state_dict(base, final_relu=args.final_relu)
    target = fnn_from_state_dict(tuned, final_relu=args.final_relu)
    advice = advise_fnn(frozen, target)
    print(f"frozen MLP: D = {advice.width}, L = {advice.depth}; target MLP: L̄ = {advice.target_depth}")
    print(
        f"uniform partition {advice.uniform_partition}: block discrepancy ranks {advice.uniform_block_ranks}, "
        f"LoRA-rank needed {advice.uniform_rank} (Theorem 3)"
    )
    print(
        f"best partition {advice.best_partition}: block discrepancy ranks {advice.best_block_ranks}, "
        f"LoRA-rank needed {advice.best_rank} (Theorem 6)"
    )
    print(f"generic weights would need ceil(D / floor(L / L̄)) = {advice.generic_threshold}")
    if args.out:
        out = claim_folder(Path(args.out), "advise")
        record = {"mode": "fnn", "advice": advice.to_dict()}
        if args.input_radius is not None:
            record["export"] = _export_fnn(args, frozen, target, advice, out)
            print(f"adapters for the ball of radius {args.input_radius} exported to {out / 'peft_adapter'}")
        (out / "report.json").write_text(json.dumps(record, indent=2))
    return 0


def _export_fnn(args, frozen, target, advice, out) -> dict:
    """Build the adapters for the ball, write them, and keep them only if they hold as written.

    The adapter is written into a temporary folder beside ``out / "peft_adapter"``, read back and checked
    against the built model in the precision written (:func:`~verification.peft_export.check_fnn_adapter`);
    only then is it renamed into place, replacing the adapter of an earlier run into the same (advise's own)
    folder. Otherwise nothing new is left, an earlier adapter stays, and :class:`AdapterWriteError` says why.
    """
    import os
    import shutil
    import tempfile

    from lora_theory.fnn import lora_fnn

    from .outdir import fresh_modes_under
    from .peft_export import AdapterWriteError, check_fnn_adapter, export_peft

    fit = lora_fnn(frozen, target, advice.best_rank, partition=advice.best_partition, input_radius=args.input_radius)
    final = out / "peft_adapter"  # ``out`` is advise's own folder: an adapter there is an earlier run's
    tmp = Path(tempfile.mkdtemp(prefix=".peft_adapter.tmp-", dir=out))
    try:
        export_peft(fit, tmp, dtype=args.dtype, base_name=str(Path(args.base).resolve()))
        check = check_fnn_adapter(fit, tmp)
        if not fit.exact:
            raise AdapterWriteError(
                f"the construction at rank {advice.best_rank} is not exact on the ball of radius "
                f"{args.input_radius}; no adapter was written"
            )
        if not check["holds"] and not check["tolerance"] < 1:
            raise AdapterWriteError(
                f"in {check['dtype']} the construction for the ball of radius {args.input_radius:g} has no useful "
                f"error bound (relative tolerance {check['tolerance']:.3g}); no adapter was written: use a wider "
                "--dtype or a smaller --input-radius"
            )
        if not check["holds"] and check.get("max_error_to_target", 0.0) > check.get("allowed_error_to_target", 0.0):
            raise AdapterWriteError(
                f"the {check['dtype']} adapter for the ball of radius {args.input_radius:g} misses the target by "
                f"{check['max_error_to_target']:.3g}, above the fit's bound {check['allowed_error_to_target']:.3g}; "
                "no adapter was written"
            )
        if not check["holds"]:
            where = "" if check["at_norm"] is None else f" at |x| = {check['at_norm']:.3g}"
            raise AdapterWriteError(
                f"the {check['dtype']} adapter for the ball of radius {args.input_radius:g} does not hold as written: "
                f"relative error {check['max_relative_error']:.3g}{where} against the built model, allowed "
                f"{check['tolerance']:.3g}; write it in float64 (--dtype float64) or for a smaller --input-radius"
            )
        fresh_modes_under(tmp)  # mkdtemp's 0700 and safetensors' 0600 would outlive the rename
        if final.exists():  # the earlier adapter is replaced only once the new one holds
            old = Path(tempfile.mkdtemp(prefix=".peft_adapter.old-", dir=out))
            os.replace(final, old / "peft_adapter")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "directory": str(final),
        "rank": advice.best_rank,
        "partition": list(advice.best_partition),
        "input_radius": args.input_radius,
        "exact": bool(fit.exact),
        "kappa": fit.kappa,
        "gamma": fit.gamma,
        "tolerance": fit.tolerance,
        "written_check": check,
    }


PROG = "python -m verification.advise"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="LoRA rank per layer of the change between two checkpoints (or, with --fnn, the "
        "depth-aware requirement for a ReLU MLP and a shallower target MLP).",
    )
    p.add_argument("base", help="the frozen / pre-trained checkpoint (safetensors, torch file, .npz or a directory)")
    p.add_argument("tuned", help="the fine-tuned checkpoint (with --fnn: the shallower target MLP)")
    p.add_argument("--out", help="directory for report.json, spectra.png and peft_rank_pattern.json")
    p.add_argument(
        "--energy", type=float, default=0.99, help="spectrum energy share for the energy rank (default 0.99)"
    )
    p.add_argument(
        "--tol",
        type=float,
        default=None,
        help="count singular values above TOL * sigma_1(dW) instead of above the storage-rounding floor",
    )
    p.add_argument(
        "--choice",
        choices=("exact", "energy"),
        default="exact",
        help="which rank the PEFT proposal and --extract use: above the noise floor (exact, default) "
        "or the energy rank; --budget / --error replace both",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="LoRA parameters to spend: ranks from lora_theory.allocate_ranks, beside a uniform rank",
    )
    p.add_argument(
        "--error",
        type=float,
        default=None,
        help="relative Frobenius error to reach over all layers with the fewest parameters",
    )
    p.add_argument(
        "--extract",
        default=None,
        metavar="DIR",
        help="write the PEFT adapter (truncated SVDs at the chosen ranks) into this new folder",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where the SVDs run (float32; float64 for float64 checkpoints)",
    )
    p.add_argument(
        "--spectrum",
        metavar="{auto,full,partial}",
        default="auto",
        help="auto (default): a certified partial spectrum per layer (the singular values above the "
        "floor, the count proved), the full one where the count is not settled or the layer is "
        "small; full: every singular value; partial: never the full one (unsettled counts as "
        "intervals). --budget / --error use full",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fnn", action="store_true", help="depth-aware mode (Theorems 3 and 6) for plain ReLU MLPs")
    p.add_argument(
        "--final-relu",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--fnn: a ReLU after the MLPs' last layer (the default); --no-final-relu: the last layer is affine",
    )
    p.add_argument(
        "--input-radius",
        type=float,
        default=None,
        help="--fnn with --out: build the adapters for this input ball and export them for PEFT",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64", "float16", "bfloat16"),
        default="float32",
        help="dtype of the exported adapter tensors (default float32); the adapter is checked as "
        "written and refused when it does not hold in that precision",
    )
    return p


def _checkpoint_mode(args) -> int:
    from .rank_report import advise_stream, allocation, format_report, peft_proposal, plot_heatmap

    if args.budget is not None and args.error is not None:
        raise CheckpointError("--budget", "give --budget or --error, not both")
    spectrum = args.spectrum
    if args.budget is not None or args.error is not None:
        if spectrum == "partial":
            raise CheckpointError(
                "--spectrum", "--budget and --error need every singular value: use --spectrum full or auto"
            )
        spectrum = "full"
    report = advise_stream(
        args.base,
        args.tuned,
        energy=args.energy,
        device=args.device,
        tol=args.tol,
        progress=not args.quiet,
        spectrum=spectrum,
    )
    if args.budget is not None or args.error is not None:
        from dataclasses import replace

        report = replace(report, allocation=allocation(report, budget=args.budget, error=args.error))
    print(format_report(report))
    choice = "allocated" if report.allocation is not None else args.choice
    ranks = report.ranks(choice)
    if args.out:
        out = claim_folder(Path(args.out), "advise")
        record = report.to_dict()
        record["choice"] = choice
        (out / "report.json").write_text(json.dumps(record, indent=2))
        (out / "peft_rank_pattern.json").write_text(json.dumps(peft_proposal(report, ranks), indent=2))
        plot_heatmap(report, out / "spectra.png")
        print(f"wrote {out / 'report.json'}, {out / 'spectra.png'}, {out / 'peft_rank_pattern.json'}", file=sys.stderr)
    if args.extract:
        from .extract import extract_adapter

        if report.all_below_floor and not any(v["changed"] for v in report.vectors):
            raise CheckpointError(args.extract, "nothing to extract: every change is below the storage-rounding floor")
        written = extract_adapter(
            args.base, args.tuned, ranks, args.extract, dtype=args.dtype, device=args.device, progress=not args.quiet
        )
        print(f"adapter written to {args.extract} ({written['dtype']}, ranks {written['ranks']})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Run the command line; return the exit status (2: bad input, one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's one-line refusal
        return int(exc.code or 0)
    try:  # --out: new, empty or advise's own folder (its config.json), checked before any work
        check_folder(Path(args.out), "advise") if args.out else None
        if args.spectrum not in SPECTRUM_CHOICES:  # checked here, not by argparse: one line, before any work
            raise CheckpointError("--spectrum", f"must be one of {', '.join(SPECTRUM_CHOICES)}, got {args.spectrum!r}")
        if args.fnn:
            return _fnn_mode(args)
        return _checkpoint_mode(args)
    except ImportError as exc:  # MissingExtraError names the extra; a bare torch import does not
        from .architectures import MissingExtraError

        if isinstance(exc, MissingExtraError):
            return parser.refuse(exc)
        name = getattr(exc, "name", None) or "a dependency"
        return parser.refuse(f"{name} is not installed: pip install 'lora-theory[verify,peft]'")
    except (CheckpointError, LoraTheoryError, CLIError) as exc:
        return parser.refuse(exc)


if __name__ == "__main__":
    sys.exit(main())
