"""LoRA vs final-layers tuning by trained parameter count (Zeng & Lee 2024, Lemma 4): ``L̄ = 1``, ``L = 8``.

``python -m verification.final_layers``: LoRA of rank ``R`` on all ``L`` layers trains ``2RDL`` adapter
parameters plus the ``L·D`` biases (``--tune-bias``, the default); tuning the last ``l`` layers trains
their weights and biases, ``l(D² + D)``; the ``params`` column counts both that way. The float64 construction of an
8-layer block is not computable honestly (its ``κ`` is recorded as ``n/c (κ=...)``); the construction column comes from
the high-precision path (mpmath, marked ``*``) on the first 256 test and shifted inputs (``--highprec-subsample``; the
full protocol's 80 take about 8 min on a 2-core CPU; ``--no-highprec``: float64 only).
"""

from __future__ import annotations

import lora_theory

from .outdir import int_at_least
from .sweep import (
    Cell,
    CLIError,
    ExperimentSpec,
    add_highprec_arguments,
    apply_quick,
    check_highprec_arguments,
    fnn_structure,
    highprec_subsample,
    parse_ranks,
    quick_highprec,
    run_cli,
)


def _add(p):
    p.add_argument(
        "--depth",
        type=int_at_least(2, "at least 2 (one frozen layer and one tuned)"),
        default=8,
        help="L, the frozen depth (default 8)",
    )
    p.add_argument("--layers", default=None, help="how many final layers to tune, e.g. 1-7 (default 1..L-1)")
    add_highprec_arguments(p)


def _validate(args):
    check_highprec_arguments(args, _cells(args))


def _cells(args):
    structure = fnn_structure(args, args.depth, 1)
    D, L = args.width, args.depth
    ranks = parse_ranks(args.ranks or f"1-{min(D, L)}", D)  # 2RDL + LD: rank R ~ R layers of D² + D, plus LD
    try:
        layers = parse_ranks(args.layers or f"1-{L - 1}", L - 1)
    except CLIError as exc:
        raise CLIError(str(exc).replace("--ranks", "--layers").replace("(the width)", "(depth - 1)")) from None
    out = []
    for kind in args.kinds:
        for R in ranks:
            out.append(
                Cell(
                    kind=kind,
                    structure=structure,
                    method="lora",
                    axis=(("layers", None), ("rank", R)),
                    label="lora",
                    ranks=(R,) * L,
                    tune_bias=args.tune_bias,
                    highprec_subsample=highprec_subsample(args),
                )
            )
        for l in layers:
            out.append(
                Cell(
                    kind=kind,
                    structure=structure,
                    method="final_layers",
                    axis=(("layers", l), ("rank", None)),
                    label="final_layers",
                    layers=l,
                    tune_bias=True,
                )
            )
    return out


def _quick(args):
    apply_quick(args, ranks="1,2")
    quick_highprec(args)
    if args.layers is None:
        args.layers = "1,2"


SPEC = ExperimentSpec(
    name="final_layers",
    description=__doc__.splitlines()[0],
    family="fnn",
    add_arguments=_add,
    cells=_cells,
    threshold=lambda a: lora_theory.fnn_rank_threshold(a.width, a.depth, 1),
    axis_names=("params",),
    quick=_quick,
    validate=_validate,
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
