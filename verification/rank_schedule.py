"""Per-layer rank schedules (Zeng & Lee 2024, Theorem 6): ``L̄ = 2``, ``L = 4``, ranks ``base + s(l - 1)``.

``python -m verification.rank_schedule``: Theorem 6 gives a sufficient condition: block ``i`` is exact if the
ranks of its layers sum to at least ``rank(E_i)``, which is ``D`` for generic weights. At ``D = 16``, base 8,
steps ``s = +1, +2`` give first-block sums 17, 18 (condition met: "sufficient") and ``s = -1, -2`` give 15,
14 (condition not met: "not sufficient"). Not meeting it promises nothing either way: the construction is
not exact there when ``rank(E_i) = D``, but a degenerate instance (``rank(E_i) < D``) is exact below it
(``tests/test_sufficient_conditions.py``). The label beside each result says which.
"""

from __future__ import annotations

import lora_theory
from lora_theory.partition import partition_blocks, uniform_partition

from .sweep import Cell, CLIError, ExperimentSpec, apply_quick, fnn_structure, run_cli


def _add(p):
    p.add_argument("--depth", type=int, default=4, help="L (default 4)")
    p.add_argument("--target-depth", type=int, default=2, help="L̄ (default 2)")
    p.add_argument("--base-rank", type=int, default=None, help="rank of layer 1 (default the threshold)")
    p.add_argument("--steps", default="-2,-1,1,2", help="rank steps s (default -2,-1,1,2)")


def _base(args):
    if args.base_rank is not None:
        return args.base_rank
    return lora_theory.fnn_rank_threshold(args.width, args.depth, args.target_depth)


def _steps(args):
    try:
        return [int(v) for v in args.steps.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--steps: cannot read {args.steps!r} as comma-separated integers") from None


def _validate(args):
    if args.depth < 1 or not 1 <= args.target_depth <= args.depth:
        raise CLIError(f"--target-depth must be in 1..depth ({args.depth}), got {args.target_depth}")
    if not 0 <= _base(args) <= args.width:
        raise CLIError(f"--base-rank must be in 0..{args.width}, got {_base(args)}")
    if not _steps(args):
        raise CLIError("--steps: give at least one step")


def schedule(args, s):
    D = args.width
    return tuple(min(max(_base(args) + s * l, 0), D) for l in range(args.depth))


def predicted_exact(args, ranks) -> bool:
    """Whether Theorem 6's sufficient condition holds for generic weights (``rank(E_i) = D``): every
    block's rank sum reaches ``D``. ``False`` means the condition is not met, not that no adapters exist."""
    blocks = partition_blocks(uniform_partition(args.depth, args.target_depth))
    return all(sum(ranks[l] for l in b) >= args.width for b in blocks)


def _cells(args):
    structure = fnn_structure(args, args.depth, args.target_depth)
    out = []
    for kind in args.kinds:
        for s in _steps(args):
            ranks = schedule(args, s)
            tag = "sufficient" if predicted_exact(args, ranks) else "not sufficient"
            out.append(
                Cell(
                    kind=kind,
                    structure=structure,
                    method="lora",
                    axis=(("step", s),),
                    label=f"{'-'.join(map(str, ranks))} {tag}",
                    ranks=ranks,
                    tune_bias=args.tune_bias,
                )
            )
    return out


def _extra(args, rows):
    return {
        "predictions": {
            str(s): {"ranks": list(schedule(args, s)), "predicted_exact": predicted_exact(args, schedule(args, s))}
            for s in _steps(args)
        }
    }


def _quick(args):
    apply_quick(args)


SPEC = ExperimentSpec(
    name="rank_schedule",
    description=__doc__.splitlines()[0],
    family="fnn",
    add_arguments=_add,
    cells=_cells,
    threshold=lambda a: lora_theory.fnn_rank_threshold(a.width, a.depth, a.target_depth),
    axis_names=("step",),
    quick=_quick,
    validate=_validate,
    extra_summary=_extra,
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
