"""Fixed vs trained biases (Zeng & Lee 2024, Theorem 3 re-chooses the biases): ``L̄ = 1``, ``L = 2``.

``python -m verification.biases``: LoRA with the frozen biases kept (``fixed_biases``) beside LoRA with the
biases trained (``trained_biases``), gradient runs only in each curve. The construction is the theorem's,
which re-chooses the biases: its column is filled on the ``trained_biases`` rows only (``null`` on the
``fixed_biases`` rows, whose runs keep the biases) and the figure draws it as one curve per frozen-model
kind, labelled "construction (biases re-chosen)".
"""

from __future__ import annotations

import lora_theory

from .outdir import positive_int
from .sweep import ExperimentSpec, apply_quick, fnn_structure, lora_cells, parse_ranks, run_cli


def _add(p):
    p.add_argument("--depth", type=positive_int, default=2, help="L, the frozen depth (default 2)")


def _cells(args):
    structure = fnn_structure(args, args.depth, 1)
    ranks = parse_ranks(args.ranks or f"1-{args.width}", args.width)
    return lora_cells(args, structure, ranks, label="fixed_biases", tune_bias=False) + lora_cells(
        args, structure, ranks, label="trained_biases", tune_bias=True
    )


SPEC = ExperimentSpec(
    name="biases",
    description=__doc__.splitlines()[0],
    family="fnn",
    add_arguments=_add,
    cells=_cells,
    threshold=lambda a: lora_theory.fnn_rank_threshold(a.width, a.depth, 1),
    quick=apply_quick,
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
