"""``python -m verification.advise BASE TUNED``: the LoRA rank each layer of a fine-tuning change needs.

Reads two checkpoints of one architecture safely (:mod:`verification.checkpoints`: safetensors, torch files
with ``weights_only=True``, ``.npz``; never unpickles objects), matches their weight matrices by name and shape
and reports, per layer, the singular values of ``ΔW``, its numeric rank at the stated tolerance (the smallest
LoRA rank that represents it exactly), the rank keeping a share of the spectrum's energy, the error of the
best rank-``r`` adapter against ``r`` and the bias change (:func:`lora_theory.advisor.advise_layers`).
That per-layer answer is all the theory supports for real checkpoints (the report says so).

``--fnn`` is the depth-aware mode of Zeng & Lee 2024, Theorems 3 and 6: BASE is a plain ReLU MLP
(``layers.{l}.weight/bias``, all ``D x D``) and TUNED a separately given *shallower* target MLP; it reports
``max_i ceil(rank(E_i) / |P_i|)`` for the uniform and the best partition. With ``--input-radius`` and
``--out`` it also builds the adapters (:func:`lora_theory.fnn.lora_fnn`) and exports them for PEFT.

Output: a table on stdout; under ``--out DIR``: ``report.json``, ``spectra.png`` and
``peft_rank_pattern.json`` (``LoraConfig`` keyword arguments under ``"lora_config"``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from lora_theory.advisor import RankReport, advise_fnn, advise_layers
from lora_theory.errors import LoraTheoryError

from .checkpoints import CheckpointError, fnn_from_state_dict, read_checkpoint

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
    dtypes = {k: base.dtypes[k] if base.dtypes[k] == tuned.dtypes.get(k, base.dtypes[k])
              else f"{base.dtypes[k]}/{tuned.dtypes[k]}" for k in base.tensors}
    return advise_layers(base.tensors, tuned.tensors, tol=tol, energy=energy, eps=eps, dtypes=dtypes)


def format_table(report: RankReport) -> str:
    """The per-layer table printed on stdout."""
    pct = f"{100 * report.energy:g}%"
    header = ("layer", "shape", "exact rank", f"rank {pct}", "sigma_1", "tolerance", "|dW|/|W|", "bias |db|")
    rows = []
    for a in report.layers:
        s1 = a.singular_values[0] if a.singular_values.size else 0.0
        bias = "-" if a.bias_key is None else (f"{a.bias_change_norm:.2e}" if a.bias_changed else "unchanged")
        rows.append((a.name, f"{a.shape[0]}x{a.shape[1]}", f"{a.exact_rank}/{a.max_rank}", str(a.energy_rank),
                     f"{s1:.3e}", f"{a.tolerance:.1e}", f"{a.relative_change:.2e}", bias))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for v in report.vectors:
        lines.append(f"vector {v['name']} {tuple(v['shape'])}: |change| = {v['change_norm']:.2e} (not a matrix; "
                     "LoRA does not adapt it)")
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
        line, = ax1.semilogy(idx, np.maximum(s / s[0], 1e-18), lw=1, label=None if many else a.name)
        ax1.axhline(a.tolerance / s[0], color=line.get_color(), ls=":", lw=0.8)
        ranks = np.arange(a.frobenius_tail.size)
        ax2.plot(ranks, a.frobenius_tail / a.frobenius_tail[0], lw=1, color=line.get_color(),
                 label=None if many else a.name)
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
    frozen = fnn_from_state_dict(base, final_relu=not args.no_final_relu)
    target = fnn_from_state_dict(tuned, final_relu=not args.no_final_relu)
    advice = advise_fnn(frozen, target)
    print(f"frozen MLP: D = {advice.width}, L = {advice.depth}; target MLP: L̄ = {advice.target_depth}")
    print(f"uniform partition {advice.uniform_partition}: block discrepancy ranks {advice.uniform_block_ranks}, "
          f"LoRA-rank needed {advice.uniform_rank} (Theorem 3)")
    print(f"best partition {advice.best_partition}: block discrepancy ranks {advice.best_block_ranks}, "
          f"LoRA-rank needed {advice.best_rank} (Theorem 6)")
    print(f"generic weights would need ceil(D / floor(L / L̄)) = {advice.generic_threshold}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
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
    only then is it renamed into place. Otherwise nothing is left and :class:`AdapterWriteError` says why.
    """
    import os
    import shutil
    import tempfile

    from lora_theory.fnn import lora_fnn

    from .peft_export import AdapterWriteError, check_fnn_adapter, export_peft

    fit = lora_fnn(frozen, target, advice.best_rank, partition=advice.best_partition,
                   input_radius=args.input_radius)
    final = out / "peft_adapter"
    if final.exists():
        raise AdapterWriteError(f"{final} exists: the adapter is written only into a new folder")
    tmp = Path(tempfile.mkdtemp(prefix=".peft_adapter.tmp-", dir=out))
    try:
        export_peft(fit, tmp, dtype=args.dtype, base_name=str(Path(args.base).resolve()))
        check = check_fnn_adapter(fit, tmp)
        if not fit.exact:
            raise AdapterWriteError(
                f"the construction at rank {advice.best_rank} is not exact on the ball of radius "
                f"{args.input_radius}; no adapter was written")
        if not check["holds"] and not check["tolerance"] < 1:
            raise AdapterWriteError(
                f"in {check['dtype']} the construction for the ball of radius {args.input_radius:g} has no useful "
                f"error bound (relative tolerance {check['tolerance']:.3g}); no adapter was written: use a wider "
                "--dtype or a smaller --input-radius")
        if not check["holds"] and check.get("max_error_to_target", 0.0) > check.get("allowed_error_to_target", 0.0):
            raise AdapterWriteError(
                f"the {check['dtype']} adapter for the ball of radius {args.input_radius:g} misses the target by "
                f"{check['max_error_to_target']:.3g}, above the fit's bound {check['allowed_error_to_target']:.3g}; "
                "no adapter was written")
        if not check["holds"]:
            where = "" if check["at_norm"] is None else f" at |x| = {check['at_norm']:.3g}"
            raise AdapterWriteError(
                f"the {check['dtype']} adapter for the ball of radius {args.input_radius:g} does not hold as written: "
                f"relative error {check['max_relative_error']:.3g}{where} against the built model, allowed "
                f"{check['tolerance']:.3g}; write it in float64 (--dtype float64) or for a smaller --input-radius")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"directory": str(final), "rank": advice.best_rank, "partition": list(advice.best_partition),
            "input_radius": args.input_radius, "exact": bool(fit.exact), "kappa": fit.kappa, "gamma": fit.gamma,
            "tolerance": fit.tolerance, "written_check": check}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m verification.advise",
        description="LoRA rank per layer of the change between two checkpoints (or, with --fnn, the "
                    "depth-aware requirement for a ReLU MLP and a shallower target MLP).")
    p.add_argument("base", help="the frozen / pre-trained checkpoint (safetensors, torch file, .npz or a directory)")
    p.add_argument("tuned", help="the fine-tuned checkpoint (with --fnn: the shallower target MLP)")
    p.add_argument("--out", help="directory for report.json, spectra.png and peft_rank_pattern.json")
    p.add_argument("--energy", type=float, default=0.99, help="spectrum energy share for the energy rank (default 0.99)")
    p.add_argument("--tol", type=float, default=None,
                   help="relative tolerance of the numeric rank (default max(out, in) * eps of the storage dtype)")
    p.add_argument("--choice", choices=("exact", "energy"), default="exact",
                   help="which rank the PEFT proposal uses (default exact)")
    p.add_argument("--fnn", action="store_true", help="depth-aware mode (Theorems 3 and 6) for plain ReLU MLPs")
    p.add_argument("--no-final-relu", action="store_true", help="--fnn: the MLPs' last layer is affine")
    p.add_argument("--input-radius", type=float, default=None,
                   help="--fnn with --out: build the adapters for this input ball and export them for PEFT")
    p.add_argument("--dtype", choices=("float32", "float64", "float16"), default="float32",
                   help="dtype of the exported adapter tensors (default float32); the adapter is checked as "
                        "written and refused when it does not hold in that precision")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.fnn:
            return _fnn_mode(args)
        report = advise_checkpoints(args.base, args.tuned, tol=args.tol, energy=args.energy)
        print(format_table(report))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(report.to_json())
            (out / "peft_rank_pattern.json").write_text(json.dumps(report.peft_proposal(args.choice), indent=2))
            plot_spectra(report, out / "spectra.png")
            print(f"wrote {out / 'report.json'}, {out / 'spectra.png'}, {out / 'peft_rank_pattern.json'}",
                  file=sys.stderr)
    except (CheckpointError, LoraTheoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
