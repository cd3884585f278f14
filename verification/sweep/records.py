"""JSON-lines records: what they hold, reading them back (a cut last line tolerated), JSON encoding.

``runs.jsonl`` and ``constructions.jsonl`` hold one JSON object per line, a :class:`RunRecord` or a
:class:`ConstructionRecord` (whose fields document the lines); :func:`_load_records` keeps the complete,
valid ones so that an interrupted folder resumes. Also the version record every run carries.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import lora_theory


def versions(*extra: str) -> dict:
    """The version record every run carries: python, torch, numpy, this package, and the modules ``extra``
    names (``"sklearn"`` for :mod:`verification.real_data`)."""
    import importlib

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "lora_theory": getattr(lora_theory, "__version__", "?"),
        **{name: getattr(importlib.import_module(name), "__version__", "?") for name in extra},
    }


def _end_cut_line(path: Path):
    """End a last line cut by an interruption, so that the next record appended starts on its own line."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a") as log:
                log.write("\n")


def _is_loss(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


@dataclass(frozen=True)
class RunLosses:
    """The ``losses`` of a ``runs.jsonl`` line: mean squared errors of one trained run (``None`` where the
    value was not finite).

    ``train_final``: the training loss at the last step; ``train_curve``: ``{"steps": [...], "loss": [...]}``,
    the training loss at the logged steps; ``val``, ``test``, ``shifted``: the MSE against the target on the
    validation set, the test set and the shifted test set (the experiment's protocol defines them).
    """

    train_final: float | None
    train_curve: dict
    val: float | None
    test: float | None
    shifted: float | None


@dataclass(frozen=True)
class RunRecord:
    """One line of ``runs.jsonl``: a finished training run, written once, read back on ``--resume``.

    ``id`` (also written as ``config_hash``): the hash of ``config``, everything the result depends on
    (:class:`~verification.sweep.protocol.Run`); ``experiment``: the command's name; ``seed``: the experiment
    seed; ``versions``: :func:`versions`; ``device``: where it trained; ``stack_size``: how many runs trained
    in its stack (on CUDA the float32 rounding of a result depends on it); ``losses``: :class:`RunLosses`;
    ``wall_time_s``: its share of the stack's wall time in seconds; ``best_step``: the step whose
    validation loss selected the adapter (only with early selection); ``paired``: ``{"diff_mean",
    "diff_se"}``, the mean and standard error over the test points of (gradient error - constructed error),
    where a construction was evaluated on the same points.
    """

    id: str
    experiment: str
    config: dict
    seed: int
    versions: dict
    device: str
    stack_size: int
    losses: RunLosses
    wall_time_s: float
    best_step: int | None = None
    paired: dict | None = None

    def to_json(self) -> dict:
        """The line's JSON object (``best_step`` and ``paired`` only when set)."""
        rec = {
            "id": self.id,
            "experiment": self.experiment,
            "config": self.config,
            "config_hash": self.id,
            "seed": self.seed,
            "versions": self.versions,
            "device": self.device,
            "stack_size": self.stack_size,
            "losses": asdict(self.losses),
            "wall_time_s": self.wall_time_s,
        }
        if self.best_step is not None:
            rec["best_step"] = self.best_step
        if self.paired is not None:
            rec["paired"] = self.paired
        return rec

    @staticmethod
    def is_valid(rec) -> bool:
        """A line the summaries can use: an id, an experiment, a config and the three losses (numbers or
        null). Other fields are informative and not checked."""
        if not (
            isinstance(rec, dict)
            and isinstance(rec.get("id"), str)
            and isinstance(rec.get("config"), dict)
            and isinstance(rec.get("losses"), dict)
            and isinstance(rec.get("experiment"), str)
        ):
            return False
        losses = rec["losses"]
        return all(k in losses and _is_loss(losses[k]) for k in ("val", "test", "shifted"))


@dataclass(frozen=True)
class ConstructionRecord:
    """One line of the high-precision constructions' cache (``constructions.jsonl``).

    ``key``: the hash of the cell, seed, subsample and the experiment's extra settings; ``construction``: the
    construction's fields as :func:`~verification.sweep.constructions.build_construction` returns them, less
    those whose names start with ``_`` (arrays kept in memory only).
    """

    key: str
    construction: dict

    def to_json(self) -> dict:
        """The line's JSON object."""
        return {"key": self.key, "construction": self.construction}

    @staticmethod
    def is_valid(rec) -> bool:
        """A line that can be reused: a string key and a construction object."""
        return isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("construction"), dict)


def _load_records(path: Path, valid: Callable[[object], bool] | None = None, report: bool = False) -> list:
    """The records of the JSON Lines file ``path`` (``[]`` when missing), read as bytes.

    A line that is not UTF-8, not JSON, or not ``valid`` is skipped: a line cut by an interruption or a
    damaged one (its run is simply run again, its construction built again). With ``report``, the skipped
    lines are counted on stderr (one line per file); the file itself is never changed here.
    """
    records, bad = [], []
    if path.exists():
        for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                bad.append(number)
                continue
            if valid is not None and not valid(rec):
                bad.append(number)
                continue
            records.append(rec)
    if bad and report:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(
            f"warning: {path}: {len(bad)} damaged or cut line{'s' if len(bad) > 1 else ''} skipped (line "
            f"{shown}); what they held is computed again",
            file=sys.stderr,
        )
    return records


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
