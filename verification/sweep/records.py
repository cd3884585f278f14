"""JSON-lines records: reading them back (a cut last line tolerated), validating them, JSON encoding.

``runs.jsonl`` and ``constructions.jsonl`` hold one JSON object per line; :func:`_load_records` keeps the
complete, valid ones so that an interrupted folder resumes. Also the version record every run carries.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable
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


def _valid_run_record(rec) -> bool:
    """A ``runs.jsonl`` record the summaries can use: an id, a config and the three losses (numbers or null)."""
    if not (
        isinstance(rec, dict)
        and isinstance(rec.get("id"), str)
        and isinstance(rec.get("config"), dict)
        and isinstance(rec.get("losses"), dict)
        and isinstance(rec.get("experiment"), str)
    ):
        return False
    losses = rec["losses"]
    return all(
        k in losses and (losses[k] is None or (isinstance(losses[k], (int, float)) and not isinstance(losses[k], bool)))
        for k in ("val", "test", "shifted")
    )


def _valid_construction_record(rec) -> bool:
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
