"""The experiment folder: atomic writes, the default location, the writability check."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from ..outdir import CLIError, atomic_write


def _atomic_write(path: Path, text: str):
    """:func:`verification.outdir.atomic_write`: the old file or the new one, never a part."""
    atomic_write(path, text)


def default_out(name: str) -> Path:
    """``results/<name>-<time>``: the output folder when ``--out`` is not given."""
    return Path("results") / f"{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def writable_folder(out: Path) -> None:
    """Create ``out`` (the ``--out`` folder) and check that a file can be written there (CLIError if not)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
