"""The pytest version guard of tests/conftest.py: under pytest < 9 the run stops with one line, because the
configuration (pyproject.toml's ``[tool.pytest]``) would be silently ignored."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _conftest():
    path = Path(__file__).resolve().parent / "conftest.py"
    spec = importlib.util.spec_from_file_location("_conftest_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", ["8.4.2", "8.0.0rc1", "7.4.4", "6.2.5", "9", "garbage"])
def test_old_or_unreadable_pytest_is_refused_with_one_line(version):
    problem = _conftest().old_pytest_problem(version)
    assert problem and "\n" not in problem
    assert version in problem and "pytest>=9" in problem and "[tool.pytest]" in problem


@pytest.mark.parametrize("version", ["9.0.0", "9.0.0rc2", "9.1.3", "10.0.0", "12.3.dev4"])
def test_pytest_9_and_later_pass(version):
    assert _conftest().old_pytest_problem(version) is None


def test_the_running_pytest_passes_the_guard():
    assert _conftest().old_pytest_problem(pytest.__version__) is None


def test_the_guard_stops_the_run(monkeypatch):
    """pytest_configure raises a usage error (pytest prints it as one ``ERROR:`` line and exits 4)."""
    conftest = _conftest()
    monkeypatch.setattr(pytest, "__version__", "8.3.5")
    with pytest.raises(pytest.UsageError, match="need pytest >= 9 \\(found 8.3.5\\)"):
        conftest.pytest_configure(None)
