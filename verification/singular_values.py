"""Controlled singular values (Zeng & Lee 2024, Lemma 1): ``E = T - W_2 W_1`` with a prescribed spectrum.

``python -m verification.singular_values``: a linear model, ``L̄ = 1``, ``L = 2``, no biases. The target is
``T = W_2 W_1 + U diag(σ) V^T`` for the random frozen model ``W_1, W_2`` of the seed, with ``U``, ``V``
random orthogonal matrices drawn from the seed and ``σ`` prescribed: ``--decay q`` gives
``σ_k = q^(k-1)`` (default 0.7), ``--spectrum s_1,s_2,...`` lists them (padded with zeros to ``D``). The
construction's MSE on ``x ~ N(0, I)`` is then ``Σ_{k>2R} σ_k² / D`` exactly (the "predicted" column; the
prescribed values are in ``summary.json`` as ``spectrum`` and, per row, ``prescribed_prediction``), zero
from ``ceil(rank(E) / 2)`` on; gradient training is scored against it. The spectrum is prescribed for the
random frozen model; a pretrained one (``--frozen random,pretrained``) changes ``E``.
"""

from __future__ import annotations

import math

import numpy as np

import lora_theory

from .sweep import (
    CLIError,
    ExperimentSpec,
    apply_quick,
    fnn_structure,
    lora_cells,
    make_random_frozen,
    parse_ranks,
    run_cli,
    seeded_rng,
    structure_of,
)

TAG_SPECTRUM = 11
DEFAULT_DECAY = 0.7


def _add(p):
    p.add_argument(
        "--decay",
        type=float,
        default=None,
        help=f"geometric spectrum σ_k = decay^(k-1), 0 < decay <= 1 (default {DEFAULT_DECAY})",
    )
    p.add_argument("--spectrum", default=None, help="the singular values of E, comma-separated (padded with 0)")
    p.set_defaults(frozen="random")


def spectrum(args) -> np.ndarray:
    """The prescribed ``σ_1 >= ... >= σ_D >= 0`` of ``E`` (shape ``(D,)``)."""
    D = args.width
    if args.spectrum is not None and args.decay is not None:
        raise CLIError("--spectrum and --decay: give one of them")
    if args.spectrum is not None:
        try:
            s = [float(v) for v in str(args.spectrum).split(",") if v.strip()]
        except ValueError:
            raise CLIError(f"--spectrum: cannot read {args.spectrum!r} as comma-separated numbers") from None
        if not s or len(s) > D or any(not math.isfinite(v) or v < 0 for v in s):
            raise CLIError(f"--spectrum: need 1..{D} (the width) non-negative finite numbers, got {args.spectrum!r}")
        return np.array(sorted(s, reverse=True) + [0.0] * (D - len(s)))
    q = DEFAULT_DECAY if args.decay is None else args.decay
    if not (math.isfinite(q) and 0 < q <= 1):
        raise CLIError(f"--decay: need 0 < decay <= 1, got {q!r}")
    return q ** np.arange(D, dtype=np.float64)


def make_target(args, structure, seed):
    """``T = W_2 W_1 + U diag(σ) V^T``: ``W`` the seed's random frozen model, ``U``, ``V`` orthogonal from the seed."""
    frozen = make_random_frozen(structure, seed)
    D = structure_of(structure).D
    rng = seeded_rng(seed, TAG_SPECTRUM, D)
    U, V = (_orthogonal(rng, D) for _ in range(2))  # (D, D) each
    E = (U * spectrum(args)) @ V.T  # (D, D) = U diag(σ) V^T
    return lora_theory.FNN([frozen.linear_map() + E], activation="linear", final_relu=frozen.final_relu)


def _orthogonal(rng, D):
    Q, R = np.linalg.qr(rng.standard_normal((D, D)))
    return Q * np.sign(np.diag(R))  # Haar-distributed


def prescribed_prediction(sigma: np.ndarray, rank: int, depth: int = 2) -> float:
    """``Σ_{k > L·R} σ_k² / D``: the optimal per-coordinate MSE on ``N(0, I)`` inputs (THEORY.md §2.1)."""
    return float(np.sum(sigma[depth * rank :] ** 2) / sigma.size)


def _structure(args):
    return fnn_structure(args, 2, 1, activation="linear")


def _cells(args):
    return lora_cells(args, _structure(args), parse_ranks(args.ranks or f"1-{args.width}", args.width), tune_bias=False)


def _validate(args):
    spectrum(args)


def _threshold(args):
    rank_E = int(np.count_nonzero(spectrum(args)))
    return max(1, -(-rank_E // 2))


def _extra(args, rows):
    sigma = spectrum(args)
    n_random = sum(1 for c in _cells(args) if c.kind == "random")  # rows: the random ones first
    for i, row in enumerate(rows):
        row["prescribed_prediction"] = prescribed_prediction(sigma, row["rank"]) if i < n_random else None
    return {
        "spectrum": sigma.tolist(),
        "spectrum_source": "given"
        if args.spectrum is not None
        else f"geometric, decay {DEFAULT_DECAY if args.decay is None else args.decay}",
        "target": "T = W_2 W_1 + U diag(spectrum) V^T, U and V Haar-orthogonal from the seed; the spectrum "
        "is E's for the random frozen model",
    }


def _config_extra(args):
    """The prescribed spectrum: the target, hence every run's result, depends on it (``--decay``, ``--spectrum``)."""
    return {"spectrum": spectrum(args).tolist()}


SPEC = ExperimentSpec(
    name="singular_values",
    description=__doc__.splitlines()[0],
    family="fnn",
    add_arguments=_add,
    cells=_cells,
    threshold=_threshold,
    quick=apply_quick,
    validate=_validate,
    extra_summary=_extra,
    make_target=make_target,
    config_extra=_config_extra,
)


def main(argv=None) -> int:
    return run_cli(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
