"""``python -m verification.certify``: an exact certificate for a random rational instance.

Builds a random instance with small rational entries (``k / 4``, ``|k| <= 4`` by default; seeded), runs the
construction of the chosen theorem in exact rational arithmetic (:mod:`lora_theory.symbolic`) and prints the
certificate: every exact check and the outcome, one of

* ``exact`` — the adapted model equals the target (linear: Lemma 1; fnn: Theorem 3 on the input ball;
  tfn: Theorem 7, every input);
* ``sufficient condition not met`` — a matrix the construction inverts is singular, or a matched rank
  exceeds the budget (named);
* ``impossible at this rank`` — linear models only, proved by rank counting.

Exit status 0 iff the outcome is ``exact``; 1 otherwise; 2 for bad arguments (one line on stderr).

Examples::

    python -m verification.certify --model tfn --width 6 --depth 2 --heads 2 --rank 3     # exact, exit 0
    python -m verification.certify --model tfn --width 6 --depth 2 --heads 2 --rank 2     # not met, exit 1
    python -m verification.certify --model fnn --width 4 --depth 4 --target-depth 2 --rank 2
    python -m verification.certify --model linear --width 5 --depth 2 --rank 2            # impossible, exit 1
"""

from __future__ import annotations

import argparse
import sys
import time

from lora_theory.errors import InvalidArgumentError
from lora_theory.symbolic import (
    certify_fnn,
    certify_linear,
    certify_tfn,
    random_rational_fnn,
    random_rational_linear,
    random_rational_tfn,
)

from .outdir import CLIError, OneLineParser, nonnegative_int, positive_int

__all__ = ["build_certificate", "main"]

PROG = "python -m verification.certify"


def _positive_rational(text):
    from fractions import Fraction

    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"must be a positive rational such as 1, 2.5 or 3/2, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        choices=("linear", "fnn", "tfn"),
        help="linear (Lemma 1), fnn (Theorem 3/6) or tfn (Theorem 7)",
    )
    p.add_argument("--width", type=positive_int, required=True, help="D, the width / embedding size")
    p.add_argument("--depth", type=positive_int, required=True, help="L, the frozen depth (blocks for tfn)")
    p.add_argument(
        "--target-depth", type=positive_int, default=None, help="L̄ <= L, the target depth (fnn only; default 1)"
    )
    p.add_argument("--heads", type=positive_int, default=None, help="H, attention heads (tfn only; default 1)")
    p.add_argument("--rank", type=nonnegative_int, required=True, help="R, the LoRA-rank of every adapter")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random instance (default 0)")
    p.add_argument(
        "--input-radius",
        type=_positive_rational,
        default=None,
        help="radius of the certified input ball, centre 0 (fnn only; default 1)",
    )
    p.add_argument(
        "--denominator", type=positive_int, default=4, help="entries are k / DENOMINATOR with |k| <= BOUND (default 4)"
    )
    p.add_argument("--bound", type=positive_int, default=4, help="see --denominator (default 4)")
    p.add_argument("--quiet", action="store_true", help="print the outcome line only")
    return p


def build_certificate(args):
    """The certificate for the instance the parsed arguments describe."""
    kw = dict(seed=args.seed, denominator=args.denominator, bound=args.bound)
    if args.model == "linear":
        frozen, target = random_rational_linear(args.width, args.depth, **kw)
        return certify_linear(frozen, target, args.rank)
    if args.model == "fnn":
        frozen, target = random_rational_fnn(args.width, args.depth, args.target_depth or 1, **kw)
        radius = args.input_radius if args.input_radius is not None else 1
        return certify_fnn(frozen, target, args.rank, input_radius=radius)
    frozen, target = random_rational_tfn(args.width, args.depth, args.heads or 1, **kw)
    return certify_tfn(frozen, target, args.rank)


def main(argv=None) -> int:
    """Run the command line; return the exit status (0 iff the certificate's outcome is ``exact``)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.model != "fnn" and args.target_depth is not None:
            raise CLIError("--target-depth applies to --model fnn only")
        if args.model != "fnn" and args.input_radius is not None:
            raise CLIError("--input-radius applies to --model fnn only")
        if args.model != "tfn" and args.heads is not None:
            raise CLIError("--heads applies to --model tfn only")
        if args.rank > args.width:
            raise CLIError(f"--rank: must be at most the width D = {args.width}, got {args.rank}")
        if args.target_depth is not None and args.target_depth > args.depth:
            raise CLIError(f"--target-depth: L̄ = {args.target_depth} exceeds the depth L = {args.depth}")
        start = time.perf_counter()
        certificate = build_certificate(args)
    except (CLIError, InvalidArgumentError) as exc:
        return parser.refuse(exc)
    except SystemExit as exc:  # --help, --version, or argparse's one-line refusal
        return int(exc.code or 0)
    elapsed = time.perf_counter() - start
    if args.quiet:
        print(f"Outcome: {certificate.outcome} — {certificate.reason}")
    else:
        print(f"random rational instance: seed {args.seed}, entries k/{args.denominator} with |k| <= {args.bound}")
        print(certificate)
    print(f"certified in {elapsed:.2f} s", file=sys.stderr)
    return 0 if certificate.passed else 1


if __name__ == "__main__":
    sys.exit(main())
