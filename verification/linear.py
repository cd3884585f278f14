"""Linear models (Zeng & Lee 2024, Lemma 1): ``L̄ = 1``, ``L = 2``, no biases, ranks 1..D.

``python -m verification.linear``: the construction's MSE equals the exact optimum ``Σ_{k>2R} σ_k(E)² / D``
(the "predicted" column) and is zero from ``ceil(D/2)`` on; gradient training is scored against it, paired
per seed on the same test inputs.
"""

from __future__ import annotations

import lora_theory

from .outdir import positive_int
from .sweep import ExperimentSpec, apply_quick, fnn_structure, lora_cells, parse_ranks, run_cli


def _add(p):
    p.add_argument("--depth", type=positive_int, default=2, help="L, the frozen depth (default 2)")


def _cells(args):
    structure = fnn_structure(args, args.depth, 1, activation="linear")
    return lora_cells(args, structure, parse_ranks(args.ranks or f"1-{args.width}", args.width), tune_bias=False)


SPEC = ExperimentSpec(
    name="linear",
    description=__doc__.splitlines()[0],
    family="fnn",
    add_arguments=_add,
    cells=_cells,
    threshold=lambda a: lora_theory.linear_rank_threshold(a.width, a.depth),
    quick=apply_quick,
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
