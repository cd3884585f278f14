"""The wheel a user installs: both packages with their py.typed markers, and nothing of the repository's tests,
benchmarks, tools or docs; the extras the notebooks and their test need are declared."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from this checkout with pip and the installed build backend (offline: no build isolation)."""
    pytest.importorskip("hatchling", reason="the build backend (the test extra installs it)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"},
    )
    (path,) = out.glob("lora_theory-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


@pytest.mark.slow
def test_the_wheel_holds_both_packages_typed_and_nothing_else(wheel):
    names = wheel.namelist()
    for required in (
        "lora_theory/__init__.py",
        "lora_theory/py.typed",
        "lora_theory/linear.py",
        "verification/__init__.py",
        "verification/py.typed",
        "verification/sweep/__init__.py",
    ):
        assert required in names, f"{required} missing from the wheel"
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"lora_theory", "verification", "lora_theory-0.1.0.dist-info"}, tops
    assert not [n for n in names if "/tests/" in n or n.startswith(("tests/", "bench/", "tools/", "docs/"))]


@pytest.mark.slow
def test_the_wheel_declares_the_notebook_and_test_extras(wheel):
    meta = email.message_from_bytes(wheel.read("lora_theory-0.1.0.dist-info/METADATA"))
    extras = set(meta.get_all("Provides-Extra"))
    assert {"notebook", "test", "all"} <= extras
    requires = meta.get_all("Requires-Dist")
    for package, extra in (("pandas", "notebook"), ("nbclient", "test"), ("ipykernel", "test"), ("hatchling", "test")):
        assert any(r.startswith(package) and f"extra == '{extra}'" in r for r in requires), (package, requires)
    assert not any(r.startswith(("pandas", "nbclient", "torch")) and "extra ==" not in r for r in requires)


def _relative_imports(path: Path):
    """``(module, inside_a_function)`` for every relative import of a source file (``from .x import y``)."""
    import ast

    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level >= 1:
                out.append((child.module or "", inner))
            visit(child, inner)

    visit(tree, False)
    return out


def test_lora_theory_imports_its_modules_at_the_top_only():
    """No function-level sibling import inside ``lora_theory``: every module's dependencies are read at its top."""
    root = Path(__file__).resolve().parents[1] / "lora_theory"
    hidden = [
        f"{path.name}: from .{module}"
        for path in sorted(root.glob("*.py"))
        for module, in_function in _relative_imports(path)
        if in_function
    ]
    assert not hidden, hidden


# The order of README's Layout: each module of verification.sweep imports (at its top) only modules before it.
SWEEP_ORDER = (
    "protocol records problems training constructions summary report figures folder cluster driver cli".split()
)


def test_verification_sweep_imports_run_one_way():
    root = Path(__file__).resolve().parents[1] / "verification" / "sweep"
    assert {p.stem for p in root.glob("*.py")} - {"__init__"} == set(SWEEP_ORDER)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    positions = [readme.index(f"`{name}` (") for name in SWEEP_ORDER]
    assert positions == sorted(positions), "README's Layout lists verification.sweep in another order"
    backwards = []
    for i, name in enumerate(SWEEP_ORDER):
        for module, in_function in _relative_imports(root / f"{name}.py"):
            sibling = module.split(".")[0]
            if not in_function and sibling in SWEEP_ORDER and SWEEP_ORDER.index(sibling) >= i:
                backwards.append(f"{name} imports {sibling}")
    assert not backwards, backwards
