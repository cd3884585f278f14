"""Transformer networks (Zeng & Lee 2024, Theorem 7): ``L`` blocks (default 2), ``H`` heads (2), ``N`` tokens (10).

``python -m verification.tfn``: the float64 construction is exact from ``ceil(D/2)`` on for every input
(no bounded domain; the calibrated column does not apply), up to the rounding its float64 weights carry:
a relative output error, measured per input with two blocks at ``D = 16``, ``H = 2``, ``N = 10``, ``R = 8``
(20 seed pairs, 1280 inputs): median 6e-13, up to 2e-7 (the second block reads the first one's output
through ``C_1 = T2 W2^{-1}``); with one block median 1e-13, up to 6e-11. ``--highprec`` builds the column at raised
precision instead (:func:`lora_theory.lora_tfn_mp`, evaluated on the first ``--highprec-subsample`` inputs, about 20 s
per construction on one core; the float64 MSE stays in ``construction_note``). The full protocol's training is hours of
CPU arithmetic: use ``--quick``, ``--device cuda``, or ``--construction-only``.
"""

from __future__ import annotations

import dataclasses

import lora_theory

from .outdir import positive_int
from .sweep import (
    ExperimentSpec,
    TFNStructure,
    add_highprec_arguments,
    apply_quick,
    check_highprec_arguments,
    highprec_subsample,
    lora_cells,
    parse_ranks,
    quick_highprec,
    run_cli,
)


def _add(p):
    p.add_argument("--depth", type=positive_int, default=2, help="L, the number of blocks (default 2)")
    p.add_argument("--heads", type=positive_int, default=2, help="H (default 2)")
    p.add_argument("--seq-len", type=positive_int, default=10, help="N, tokens per input (default 10)")
    add_highprec_arguments(p, default=False)


def _validate(args):
    check_highprec_arguments(args, _cells(args))


def _cells(args):
    structure = TFNStructure("tfn", args.width, args.depth, args.heads, args.seq_len)
    cells = lora_cells(args, structure, parse_ranks(args.ranks or f"1-{args.width}", args.width))
    return [dataclasses.replace(c, highprec_subsample=highprec_subsample(args)) for c in cells]


def _quick(args):
    apply_quick(args, ranks="1,8", iterations=30)
    quick_highprec(args)


SPEC = ExperimentSpec(
    name="tfn",
    description=__doc__.splitlines()[0],
    family="tfn",
    add_arguments=_add,
    cells=_cells,
    threshold=lambda a: lora_theory.tfn_rank_threshold(a.width),
    quick=_quick,
    validate=_validate,
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
