"""Shared pytest configuration: hypothesis profiles, the gpu marker and its --require-gpu switch."""

import os

import pytest
from hypothesis import HealthCheck, settings

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
