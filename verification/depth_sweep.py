"""Frozen-depth sweep (Zeng & Lee 2024, Theorem 3): ``L̄ = 1``, ``L`` in 2, 4, ..., 14, threshold ``ceil(D / L)``.

``python -m verification.depth_sweep``: deeper frozen models need less rank. Constructions of blocks of
more than 4 layers are not computable honestly in float64 (their ``κ`` is recorded as ``n/c (κ=...)``);
their construction column comes from the high-precision path (mpmath, marked ``*``) on the first 256 test
and shifted inputs (``--highprec-subsample``). With the full protocol that is 800 constructions, about
1.5 to 2.5 h on a 2-core CPU before training starts (the estimate is printed): ``--no-highprec`` skips them.
"""

from __future__ import annotations

import dataclasses

import lora_theory

from .sweep import (
    CLIError,
    ExperimentSpec,
    add_highprec_arguments,
    apply_quick,
    check_highprec_arguments,
    fnn_structure,
    highprec_subsample,
    lora_cells,
    parse_ranks,
    quick_highprec,
    run_cli,
)


def _add(p):
    p.add_argument("--depths", default="2,4,6,8,10,12,14", help="frozen depths L (default 2,4,...,14)")
    add_highprec_arguments(p)


def _depths(args):
    try:
        depths = sorted({int(v) for v in args.depths.split(",") if v.strip()})
    except ValueError:
        raise CLIError(f"--depths: cannot read {args.depths!r} as comma-separated integers") from None
    if not depths or depths[0] < 1:
        raise CLIError(f"--depths: every depth must be at least 1, got {args.depths!r}")
    return depths


def _cells(args):
    ranks = parse_ranks(args.ranks or f"1-{args.width}", args.width)
    out = []
    for L in _depths(args):
        out += lora_cells(args, fnn_structure(args, L, 1), ranks, axis_extra=(("depth", L),))
    return [dataclasses.replace(c, highprec_subsample=highprec_subsample(args)) for c in out]


def _threshold(args):
    return {str(L): lora_theory.fnn_rank_threshold(args.width, L, 1) for L in _depths(args)}


def _quick(args):
    apply_quick(args, ranks="1,4,8")
    quick_highprec(args)
    if args.depths == "2,4,6,8,10,12,14":
        args.depths = "2,4"


SPEC = ExperimentSpec(
    name="depth_sweep",
    description=__doc__.splitlines()[0],
    family="fnn",
    add_arguments=_add,
    cells=_cells,
    threshold=_threshold,
    axis_names=("depth", "rank"),
    quick=_quick,
    validate=lambda a: check_highprec_arguments(a, _cells(a)),
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
