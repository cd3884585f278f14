"""Shared pytest configuration: the pytest version guard, hypothesis profiles, the gpu marker and its
--require-gpu switch, the ``refused`` fixture (the command-line refusal check of ``tests/_helpers.py``)."""

import os
import re

import pytest
from _helpers import assert_refused
from hypothesis import HealthCheck, settings

#: The oldest pytest that reads the configuration: it lives in pyproject.toml's ``[tool.pytest]`` table, which
#: pytest reads from version 9 on; an older pytest ignores the table (markers, warning filters, testpaths).
MIN_PYTEST = (9, 0)


def old_pytest_problem(version: str) -> str | None:
    """One line saying why pytest ``version`` cannot run these tests, or ``None`` when it can (``>= 9``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match[1]), int(match[2])) >= MIN_PYTEST:
        return None
    return (
        f"these tests need pytest >= {MIN_PYTEST[0]} (found {version}): their configuration is pyproject.toml's "
        "[tool.pytest] table, which older pytest ignores (markers and warning filters would be silently lost); "
        "pip install 'pytest>=9'"
    )


def pytest_configure(config):
    problem = old_pytest_problem(pytest.__version__)
    if problem:
        raise pytest.UsageError(problem)


# hypothesis loads its own deterministic "ci" profile when CI is set; extend it, do not replace it.
settings.register_profile(
    "ci",
    parent=settings.get_profile("ci"),
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption(
        "--require-gpu",
        action="store_true",
        default=False,
        help="fail (instead of skip) tests marked gpu when CUDA is unavailable",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--require-gpu"):
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (pass --require-gpu on a GPU machine to make this a failure)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def refused(capsys):
    """``refused(tool, argv, match=None)``: :func:`_helpers.assert_refused` with this test's ``capsys``."""

    def check(tool, argv, match=None):
        return assert_refused(capsys, tool, argv, match)

    return check
