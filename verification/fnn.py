"""ReLU FNNs (Zeng & Lee 2024, Theorem 3; error below the threshold): frozen depth ``L``, target depth ``L̄`` (default
``max(1, L // 2)``).

``python -m verification.fnn --depth 4``: the construction (certified ball covering the test and the x5
inputs) is exact from ``ceil(D / floor(L / L̄))`` on; the "predicted" column is the project's per-instance
error bound on the MSE (THEORY.md §2.4, derived along the paper's Theorem 5, not its statement); the "calibrated" column
sizes the biases on 256 ``N(0, I)`` samples (the authors' way) and fails on the shifted inputs.
"""

from __future__ import annotations

import lora_theory

from .outdir import positive_int
from .sweep import CLIError, ExperimentSpec, apply_quick, fnn_structure, lora_cells, parse_ranks, run_cli


def _add(p):
    p.add_argument("--depth", type=positive_int, default=2, help="L, the frozen depth (default 2)")
    p.add_argument("--target-depth", type=int, default=None, help="L̄ (default max(1, L // 2))")


def _target_depth(args):
    return args.target_depth if args.target_depth is not None else max(1, args.depth // 2)


def _validate(args):
    Lbar = _target_depth(args)
    if Lbar < 1 or Lbar > args.depth:
        raise CLIError(f"--target-depth must be in 1..depth ({args.depth}), got {Lbar}")


def _cells(args):
    structure = fnn_structure(args, args.depth, _target_depth(args))
    return lora_cells(args, structure, parse_ranks(args.ranks or f"1-{args.width}", args.width))


SPEC = ExperimentSpec(
    name="fnn",
    description=__doc__.splitlines()[0],
    family="fnn",
    add_arguments=_add,
    cells=_cells,
    threshold=lambda a: lora_theory.fnn_rank_threshold(a.width, a.depth, _target_depth(a)),
    quick=apply_quick,
    validate=_validate,
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
