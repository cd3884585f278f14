"""Transformer networks (Zeng & Lee 2024, Theorem 7): ``L`` blocks (default 2), ``H`` heads (2), ``N`` tokens (10).

``python -m verification.tfn``: the float64 construction is exact from ``ceil(D/2)`` on for every input
(no bounded domain; the calibrated column does not apply). The full protocol is hours of CPU arithmetic:
use ``--quick`` or ``--device cuda``.
"""

from __future__ import annotations

import lora_theory

from .experiment import CLIError, ExperimentSpec, apply_quick, lora_cells, parse_ranks, run_cli


def _add(p):
    p.add_argument("--depth", type=int, default=2, help="L, the number of blocks (default 2)")
    p.add_argument("--heads", type=int, default=2, help="H (default 2)")
    p.add_argument("--seq-len", type=int, default=10, help="N, tokens per input (default 10)")


def _validate(args):
    for flag, v in (("--depth", args.depth), ("--heads", args.heads), ("--seq-len", args.seq_len)):
        if v < 1:
            raise CLIError(f"{flag} must be at least 1, got {v}")


def _cells(args):
    structure = ("tfn", args.width, args.depth, args.heads, args.seq_len)
    return lora_cells(args, structure, parse_ranks(args.ranks or f"1-{args.width}", args.width))


def _quick(args):
    apply_quick(args, ranks="1,8", iterations=30)


SPEC = ExperimentSpec(
    name="tfn", description=__doc__.splitlines()[0], family="tfn", add_arguments=_add, cells=_cells,
    threshold=lambda a: lora_theory.tfn_rank_threshold(a.width), quick=_quick, validate=_validate)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
