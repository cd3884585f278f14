"""The experiments' fixed protocol: grids, seeds, sizes, honesty limits, :class:`Cell` and :class:`ExperimentSpec`.

The protocol itself (instances, data, selection, constructions) is described in :mod:`verification.sweep`;
every constant here is recorded in the output it affects. Imports nothing else of the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

LR_GRID = (1e-2, 1e-3, 1e-4)


WD_GRID = (0.0, 1e-4, 1e-3, 1e-2)


VALIDATION_SEED = 1_000_003


TEST_SEED = 2_000_003


CALIBRATION_SEED = 3_000_017


N_VALIDATION, N_TEST, N_CALIBRATION = 256, 5000, 256


SHIFT = 5.0


PRETRAIN_LR, PRETRAIN_MAX_STEPS, PRETRAIN_FACTOR = 1e-3, 1000, 1.0 / 3.0


#: the pretraining above in words (THEORY.md §4), as the summaries record it
PRETRAINING_PROTOCOL = "Adam lr 1e-3, fresh 256-batches, float64, until loss < first/3 (<= 1000 steps)"


MAX_HONEST_BLOCK = 4


MAX_HONEST_ROUNDING = 1e-6


TAG_TARGET, TAG_FROZEN, TAG_PRETRAIN, TAG_DATA, TAG_INIT = 1, 2, 3, 4, 5


def _seed_int(*entropy) -> int:
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_rng(*entropy) -> np.random.Generator:
    """A numpy generator from ``SeedSequence(entropy)``: the experiment seed and a tag (``TAG_*``) name a stream."""
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


class FNNStructure(NamedTuple):
    """An FNN problem (a linear model when ``activation == "linear"``), as ``config.json`` stores it:
    ``["fnn", D, L, L̄, activation, final_relu]``.

    ``D``: the width; ``L``: the frozen model's depth; ``Lbar`` (the paper's ``L̄``): the target's depth;
    ``activation``: ``"relu"`` or ``"linear"``; ``final_relu``: whether the last layer has a ReLU.
    A tuple, so it hashes, compares and serialises as the plain tuple it replaces.
    """

    family: str  # always "fnn"
    D: int
    L: int
    Lbar: int
    activation: str
    final_relu: bool


class TFNStructure(NamedTuple):
    """A transformer problem, as ``config.json`` stores it: ``["tfn", D, L, H, N]``.

    ``D``: the embedding size; ``L``: the number of blocks (frozen and target alike); ``H``: heads per
    block; ``N``: tokens per input sequence. A tuple, like :class:`FNNStructure`.
    """

    family: str  # always "tfn"
    D: int
    L: int
    H: int
    N: int


Structure = FNNStructure | TFNStructure


def structure_of(value) -> Structure:
    """The named structure of a tuple or list such as ``("fnn", 8, 4, 2, "relu", True)`` (``config.json``
    stores lists); a named structure is returned as it is. Raises ``ValueError`` for anything else."""
    if isinstance(value, (FNNStructure, TFNStructure)):
        return value
    value = tuple(value)
    named = {"fnn": FNNStructure, "tfn": TFNStructure}.get(value[0] if value else None)
    if named is None or len(value) != len(named._fields):
        raise ValueError(
            f"a structure is ('fnn', D, L, L̄, activation, final_relu) or ('tfn', D, L, H, N), got {value!r}"
        )
    return named(*value)


@dataclass(frozen=True)
class Cell:
    """One row entry: a frozen-model kind, a structure and a method, trained for every seed and grid point.

    ``structure``: an :class:`FNNStructure` or a :class:`TFNStructure` (a plain tuple of the same fields is
    converted).
    ``method``: ``"lora"`` (``ranks`` per layer for an FNN, ``(R,)`` for a TFN) or ``"final_layers"``
    (``layers`` trained fully). ``axis``: the row's coordinates, e.g. ``(("rank", 3),)``. ``label`` names the
    curve (``"lora"``, ``"final_layers"``, ``"trained_biases"``...).
    """

    kind: str
    structure: tuple
    method: str
    axis: tuple
    label: str = "lora"
    ranks: tuple | None = None
    layers: int | None = None
    tune_bias: bool = True
    highprec_subsample: int = 0  # > 0: where float64 is not honest, mpmath on this many test/shifted inputs

    def __post_init__(self):
        object.__setattr__(self, "structure", structure_of(self.structure))

    @property
    def family(self) -> str:
        return self.structure.family

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "structure": list(self.structure),
            "method": self.method,
            "axis": [list(a) for a in self.axis],
            "label": self.label,
            "ranks": None if self.ranks is None else list(self.ranks),
            "layers": self.layers,
            "tune_bias": self.tune_bias,
        }

    def params(self) -> int:
        """Trained parameter count, the trained biases included.

        LoRA: ``Σ_l r_l (in + out)`` (``2RDL`` for rank ``R`` on ``L`` layers of width ``D``; a TFN has
        ``4LH + 2`` adapted matrices) plus the biases trained with it when ``tune_bias``: ``L·D`` for an FNN
        (none for a linear model, which has no biases), ``2·L·D`` for a TFN (``b1``, ``b2`` of every block).
        Final layers: ``l (D² + D)``, the weights and biases of the ``l`` tuned layers.
        (:func:`lora_theory.lora_parameter_count` and :func:`lora_theory.final_layers_parameter_count`
        count weights only.)
        """
        D, L = self.structure.D, self.structure.L
        if self.method == "final_layers":
            return self.layers * (D * D + D)
        if self.family == "tfn":
            H = self.structure.H
            return self.ranks[0] * 2 * D * (4 * L * H + 2) + (2 * L * D if self.tune_bias else 0)
        biases = L * D if self.tune_bias and self.structure.activation != "linear" else 0
        return sum(2 * r * D for r in self.ranks) + biases


@dataclass(frozen=True, eq=False)
class Run:
    """One training run of a sweep: a cell trained for one experiment seed at one grid point.

    ``id``: the hash of ``config``, the key of the run's line in ``runs.jsonl`` (written there as ``id`` and
    ``config_hash``); ``config``: everything the run's result depends on (the line's ``config``: the
    experiment, ``cell.as_dict()``, the seed, ``lr``, ``weight_decay``, iterations, batch size, selection,
    dtype and the experiment's extra settings); ``cell``, ``seed``, ``lr`` and ``wd`` (the weight decay):
    the same, as the sweep reads them.
    """

    id: str
    config: dict
    cell: Cell
    seed: int
    lr: float
    wd: float


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class ExperimentSpec:
    """What a CLI module declares: its name, extra flags, cells, threshold and how rows are labelled."""

    name: str
    description: str
    family: str  # "fnn" or "tfn"
    add_arguments: Callable[[argparse.ArgumentParser], None]
    cells: Callable[[argparse.Namespace], list]  # -> list of Cell (both kinds)
    threshold: Callable[[argparse.Namespace], object]
    axis_names: tuple = ("rank",)
    quick: Callable[[argparse.Namespace], None] | None = None
    validate: Callable[[argparse.Namespace], None] | None = None
    extra_summary: Callable[[argparse.Namespace, list], dict] | None = None
    default_depth: int | None = None
    make_target: Callable[[argparse.Namespace, tuple, int], object] | None = None  # default: make_target
    #: what else the results depend on beyond the cells and the training settings (e.g. a target's
    #: prescribed spectrum): it enters every run's config and id, and the pretrained-model cache key
    config_extra: Callable[[argparse.Namespace], dict] | None = None
