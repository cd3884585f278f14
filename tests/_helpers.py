"""Helpers shared by the tests: the command-line refusal check, partitions, random FNN pairs, warning marks.

Imported as ``from _helpers import ...`` (``tests/`` is on the import path: ``tests/conftest.py`` lives there);
the refusal check is also the ``refused`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import pytest

#: files whose presence says an output folder holds a finished run (a summary, a report, a table)
COMPLETE_FILES = ("summary.json", "summary.csv", "table.txt", "report.md", "report.json", "verdicts.json")

#: the options whose value is a folder a command writes into
FOLDER_FLAGS = ("--out", "--resume", "--checkpoints", "--extract")


def _folders(argv) -> list[Path]:
    folders = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in FOLDER_FLAGS:
            if eq:
                folders.append(Path(value))
            elif i + 1 < len(argv):
                folders.append(Path(argv[i + 1]))
    return folders


def _complete(folder: Path) -> dict:
    """The files under ``folder`` that look like a finished run, with their bytes."""
    if not folder.is_dir():
        return {}
    return {str(p): p.read_bytes() for name in COMPLETE_FILES for p in sorted(folder.rglob(name))}


def error_line(tool: str, err: str, match: str | None = None) -> str:
    """The one line of ``err`` (a refused command's stderr): exactly one line, ``python -m
    verification.<tool>: error: <message>``, with ``match`` in it. Returns the line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    prefix = f"python -m verification.{tool}: error: "
    assert lines[0].startswith(prefix), lines
    if match is not None:
        assert match in lines[0], (match, lines)
    return lines[0]


def assert_refused(capsys, tool: str, argv: list, match: str | None = None) -> str:
    """Run ``python -m verification.<tool>`` on ``argv`` (through its ``main(argv)``) and check the command-line
    convention for bad input: exit status 2, nothing on stdout, exactly one line on stderr, that line
    ``python -m verification.<tool>: error: <message>`` with ``match`` in it, and no file that looks finished
    (:data:`COMPLETE_FILES`) created or changed in a folder ``argv`` writes into (:data:`FOLDER_FLAGS`).
    Returns the line."""
    main = importlib.import_module(f"verification.{tool}").main
    folders = _folders(argv)
    before = {f: _complete(f) for f in folders}
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert out == "", out
    line = error_line(tool, err, match)
    for folder in folders:
        assert _complete(folder) == before[folder], f"{folder}: a finished-looking file appeared or changed"
    return line


def partitions(L: int, Lbar: int):
    """Every consecutive partition of ``L`` layers into ``Lbar`` non-empty blocks, as block sizes, in
    lexicographic order."""
    for cuts in itertools.combinations(range(1, L), Lbar - 1):
        bounds = (0, *cuts, L)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


def fnn_pair(D: int = 4, L: int = 2, Lbar: int = 1, seed: int = 0):
    """A random frozen FNN of depth ``L`` (seed ``seed``) and a random target of depth ``Lbar`` (``seed + 1``)."""
    from lora_theory.models import random_fnn

    return random_fnn(D, L, seed=seed), random_fnn(D, Lbar, seed=seed + 1)


#: a test whose random instances may be ill-conditioned: its checks scale with the κ the fits report
ill_conditioned_ok = pytest.mark.filterwarnings("ignore::lora_theory.errors.IllConditionedWarning")
