"""The documentation says what the code does: docstrings exist, the API page lists them, examples run.

Every public name of ``lora_theory`` has a docstring and a section in docs/api.md with its summary line;
the README's notebook example runs; every short command in README.md and docs/*.md (``--quick`` runs,
certificates, the experiment list) runs as written and exits as the docs say.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import lora_theory

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def _public_objects():
    for name in lora_theory.__all__:
        obj = getattr(lora_theory, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield name, obj


def test_all_lists_every_public_object_once_and_nothing_else():
    """``__all__`` is written out by hand (grouped by result); every public function, class or constant the
    package root imports is in it exactly once, and every listed name exists."""
    import types

    listed = lora_theory.__all__
    assert len(listed) == len(set(listed)), sorted(n for n in set(listed) if listed.count(n) > 1)
    public = {
        name
        for name, value in vars(lora_theory).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(listed) == public, {
        "imported but not listed": public - set(listed),
        "listed but not defined": set(listed) - public,
    }


@pytest.mark.parametrize("name", [n for n, _ in _public_objects()])
def test_every_public_name_has_a_docstring(name):
    doc = inspect.getdoc(getattr(lora_theory, name))
    assert doc and doc.strip(), f"lora_theory.{name} has no docstring"


def test_api_page_lists_every_public_name_with_its_summary():
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    stale = []
    for name, obj in _public_objects():
        summary = inspect.getdoc(obj).strip().split("\n\n")[0].replace("\n", " ")
        if f"### `{name}`" not in page or summary not in page:
            stale.append(name)
    assert not stale, f"docs/api.md is out of date for {stale}: run `python docs/gen_api.py`"


def test_every_public_name_of_the_sweep_machinery_has_a_docstring_and_a_section():
    """``verification.sweep``'s public classes and functions, which the experiments and tools build on, are
    documented like ``lora_theory``'s: a docstring, and a section in docs/api.md with its summary line."""
    import verification.sweep as sweep

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing, stale = [], []
    for name in sweep.__all__:
        obj = getattr(sweep, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj)
        if not (doc and doc.strip()):
            missing.append(name)
            continue
        if f"### `{name}`" not in page or doc.strip().split("\n\n")[0].replace("\n", " ") not in page:
            stale.append(name)
    assert not missing, f"verification.sweep names without a docstring: {missing}"
    assert not stale, f"docs/api.md is out of date for {stale}: run `python docs/gen_api.py`"


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_readme_notebook_example_runs():
    blocks = _code_blocks((ROOT / "README.md").read_text(encoding="utf-8"), "python")
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    fit, target, x = namespace["fit"], namespace["target"], namespace["x"]
    assert fit.exact
    assert lora_theory.relative_error(fit.model(x), target(x)) <= fit.tolerance


def _short_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every documented command that is quick to run and needs no user files."""
    found = []
    for page in PAGES:
        for block in _code_blocks(page.read_text(encoding="utf-8"), "bash"):
            for line in block.splitlines():
                cmd = line.split("#")[0].strip()
                if not cmd.startswith("python -m verification"):
                    continue
                if re.search(r"\b[A-Z]{3,}\b", cmd):  # placeholders such as BASE TUNED DIR
                    continue
                short = "--quick" in cmd or ".certify" in cmd or cmd == "python -m verification"
                if short:
                    found.append((page.name, cmd))
    # inline commands in tables, e.g. `python -m verification.certify --model tfn ... --rank 3`
    for page in PAGES:
        for cmd in re.findall(r"`(python -m verification\.certify[^`]*)`", page.read_text(encoding="utf-8")):
            found.append((page.name, cmd))
    return sorted(set(found))


COMMANDS = _short_commands()


def test_docs_show_short_commands():
    assert any(".certify" in c for _, c in COMMANDS)
    assert any("--quick" in c for _, c in COMMANDS)


def _settings(module: str, argv: list[str]) -> dict | None:
    """What ``python -m verification.<module> argv`` runs, parsed as the experiment does (``--quick`` applied):
    its settings but the output folder and the optional target depth, and the cells that depth decides
    (``None`` for a module that is not one of the paper's sweeps)."""
    from verification import paper
    from verification.sweep.cli import _normalise, base_parser

    if module not in {s.module for s in paper.STEPS}:
        return None
    spec = importlib.import_module(f"verification.{module}").SPEC
    args = base_parser(spec).parse_args(argv)
    _normalise(spec, args)
    found = {k: v for k, v in vars(args).items() if k not in ("out", "target_depth")}
    return {"settings": found, "cells": spec.cells(args)}


def _paper_step_running(command: str):
    """The step of ``python -m verification.paper --quick`` that runs ``command``'s settings, if any."""
    from verification import paper

    words = shlex.split(command)
    module, argv = words[2].removeprefix("verification."), words[3:]
    if "--quick" not in argv or "--out" in argv or "--resume" in argv:
        return None
    wanted = _settings(module, argv)
    quick = paper._parser().parse_args(["--quick"])
    for step in paper.STEPS:
        if step.module == module and wanted is not None and _settings(module, paper.step_argv(step, quick)) == wanted:
            return step
    return None


def test_documented_quick_commands_shared_with_the_paper_run_are_found():
    """The documented ``--quick`` commands of the paper's experiments are matched to the steps of the shared
    ``verification.paper --quick`` run by their parsed settings; a changed flag is not."""
    assert _paper_step_running("python -m verification.final_layers --quick").name == "final_layers"
    assert _paper_step_running("python -m verification.fnn --depth 4 --quick").name == "fnn_L4"
    assert _paper_step_running("python -m verification.fnn --depth 4 --quick --seeds 1") is None
    assert _paper_step_running("python -m verification.fnn --depth 4 --width 8 --quick") is None
    assert _paper_step_running("python -m verification.fnn --depth 4 --target-depth 1 --quick") is None
    assert _paper_step_running("python -m verification.singular_values --quick") is None
    assert _paper_step_running("python -m verification.linear") is None


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[18:60]}" for p, c in COMMANDS])
def test_documented_command_runs_as_written(page, command, tmp_path, request):
    step = _paper_step_running(command)
    if step is not None:  # the same settings ran in the shared paper --quick run: its folder is the evidence
        status, out = request.getfixturevalue("paper_quick")
        assert status == 0, f"`python -m verification.paper --quick` exited {status}"
        assert (out / step.name / "summary.json").is_file() and (out / step.name / "runs.jsonl").is_file()
        return
    argv = shlex.split(command)
    argv[0] = sys.executable
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    expected = 1 if re.search(r"--rank 2\b", command) and "--model tfn --width 6" in command else 0
    assert done.returncode == expected, (
        f"`{command}` from {page} exited {done.returncode}, expected {expected}\n{done.stderr[-2000:]}"
    )


def _public_callables():
    """``(qualified name, function)`` for every public function of ``lora_theory.__all__`` and every public
    method (with ``__init__`` and ``__call__``) and property of its public classes, where defined in the
    package."""
    for name in lora_theory.__all__:
        obj = getattr(lora_theory, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_") and attr not in ("__init__", "__call__"):
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                elif isinstance(value, property):
                    value = value.fget
                if inspect.isfunction(value) and value.__module__.startswith("lora_theory"):
                    yield f"{name}.{attr}", value


def _missing_annotations(fn) -> list[str]:
    sig = inspect.signature(fn)
    missing = [
        p.name
        for i, p in enumerate(sig.parameters.values())
        if p.annotation is inspect.Parameter.empty and not (i == 0 and p.name in ("self", "cls"))
    ]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def test_every_public_function_and_method_is_annotated():
    """Every parameter and the return of every public function and method carries an annotation (the package
    ships py.typed: a type checker reads these), so a new one cannot go unannotated."""
    found = dict(_public_callables())
    assert "lora_linear" in found and "RankReport.to_dataframe" in found and "FNN.__call__" in found
    missing = {name: m for name, fn in found.items() if (m := _missing_annotations(fn))}
    assert not missing, f"unannotated parameters or returns: {missing}"


def test_the_annotation_check_can_fail():
    def unannotated(x, y: int = 1):
        return x

    def annotated(self, x: int) -> int:
        return x

    assert _missing_annotations(unannotated) == ["x", "return"]
    assert _missing_annotations(annotated) == []
