"""The notebooks of docs/notebooks: stored without outputs, and each runs from the first cell to the last without
an error (their cells assert what they show: exact from the threshold on, the optimum below it, the
certificates' outcomes). Run with nbclient on the ``python3`` kernel that ipykernel installs (the test extra)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))
#: Seconds one notebook may take; all of them together run in well under a minute on two cores.
PER_NOTEBOOK_SECONDS = 120

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat, nbclient and ipykernel")


def test_the_notebooks_are_there_and_linked():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_your_model.ipynb",
        "02_linear_and_fnn_results.ipynb",
        "03_certificates_and_high_precision.ipynb",
    ]
    for page in (ROOT / "README.md", ROOT / "docs" / "reproduce.md"):
        text = page.read_text(encoding="utf-8")
        assert all(f"notebooks/{name}" in text for name in names), page


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    """Outputs are not kept in the repository: a stored notebook shows what the code of that day printed, and
    its diffs would carry every number and figure."""
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    assert book.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(book.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_runs_without_error(path, monkeypatch):
    """Every cell runs; a failing cell (an exception or a false assertion) fails the test with its traceback."""
    nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # no display; the figure is still drawn
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=PER_NOTEBOOK_SECONDS, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError naming the cell
    ran = [c for c in book.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in ran)
    errors = [o for c in ran for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert time.monotonic() - start < PER_NOTEBOOK_SECONDS


def test_the_python3_kernel_is_installed():
    """ipykernel (the test extra) provides the ``python3`` kernel the notebooks name; jupyter_client starts it
    with this interpreter."""
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    spec = kernelspec.KernelSpecManager().get_kernel_spec("python3")
    assert spec.language == "python" and "ipykernel_launcher" in spec.argv
