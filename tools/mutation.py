"""Mutation testing of the core of ``lora_theory`` with mutmut 3, one module at a time.

    python tools/mutation.py                   # every module below, in order (hours on 2 cores)
    python tools/mutation.py linear bounds     # just these modules
    python tools/mutation.py --quick           # thresholds and partition only (minutes)
    python tools/mutation.py --report          # no run: the score of what mutants/ already holds

mutmut reads its settings from ``[tool.mutmut]`` in pyproject.toml (the files it mutates, the tests it may
run, pytest's arguments). It copies the package into ``mutants/`` with every mutant compiled in behind a
switch, runs the selected tests once to learn which tests call which function, then for each mutant runs
only the tests that call the mutated function (``-x``: the first failure kills it). Results are kept in
``mutants/`` between runs; a module run again is retested in full.

For each module this prints killed / survived / timeout / no tests / other, and every survivor. A
survivor must be answered in docs/mutation.md, by the test that kills it (a row ``killed``; once mutmut
retests it, it no longer survives) or by an argument that it is equivalent (a row ``equivalent``); the
command exits 1 when a survivor of a module it reports has no such answer there (``open`` rows included),
0 otherwise.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> the mutant-name patterns it runs. symbolic/: only the certificate code (the exact arithmetic
# behind certify_linear / certify_fnn / certify_tfn); its random-instance generators and printing are not
# claims of the paper and are left out.
MODULES = {
    "linear": ["lora_theory.linear.*"],
    "fnn": ["lora_theory.fnn.*"],
    "tfn": ["lora_theory.tfn.*"],
    "bounds": ["lora_theory.bounds.*"],
    "symbolic": [
        f"lora_theory.symbolic.{module}.{name}__mutmut_*"
        for module, name in (
            ("linear", "x_certify_linear"),
            ("fnn", "x_certify_fnn"),
            ("tfn", "x_certify_tfn"),
            ("linear", "x__exact_chain"),
            ("certificate", "x__finish"),
            ("certificate", "x__store"),
            ("linear", "x__rank_decomposition"),
            ("rational", "x__prod"),
            ("fnn", "x__positive_definite"),
            ("fnn", "x__spectral_sq_upper"),
            ("fnn", "x__relu_vec"),
            ("fnn", "x__choose_level"),
            ("rational", "x__fraction_upper"),
            ("rational", "x__square_list"),
            ("certificate", "xǁ_Recorderǁcheck"),
            ("certificate", "xǁ_Recorderǁinvertible"),
            ("certificate", "xǁ_Recorderǁequal"),
        )
    ],
    "partition": ["lora_theory.partition.*"],
    "thresholds": ["lora_theory.thresholds.*"],
    "final_layers": ["lora_theory.final_layers.*"],
}
QUICK = ["thresholds", "partition"]

STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
}
COLUMNS = ["killed", "survived", "timeout", "no tests", "other", "not checked"]


def _results(module: str) -> dict[str, str]:
    """``mutant name -> status`` for the mutants of ``module`` that mutants/ holds (a module file, or every
    file of a package such as ``symbolic/``)."""
    base = ROOT / "mutants" / "lora_theory"
    metas = [base / f"{module}.py.meta", *sorted((base / module).glob("*.py.meta"))]
    out = {}
    for meta in metas:
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        for name, code in codes.items():
            if any(fnmatch.fnmatch(name, p) for p in MODULES[module]):
                out[name] = "not checked" if code is None else STATUS.get(code, "other")
    return out


def _answered() -> set[str]:
    """Mutant names that docs/mutation.md answers: a row ``| `name` | killed |`` or ``| `name` | equivalent |``."""
    page = ROOT / "docs" / "mutation.md"
    if not page.exists():
        return set()
    rows = re.findall(
        r"^\| `(lora_theory\.[\w.ǁ]+__mutmut_\d+)` \| (killed|equivalent) \|", page.read_text(encoding="utf-8"), re.M
    )
    return {name for name, _ in rows}


def _run(module: str, max_children: int) -> int:
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *MODULES[module]]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "modules", nargs="*", metavar="MODULE", help=f"modules to mutate (default: all of {', '.join(MODULES)})"
    )
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")
    parser.add_argument("--report", action="store_true", help="run nothing; report what mutants/ holds")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args(argv)
    if args.quick and args.modules:
        parser.error("--quick and a list of modules exclude each other")
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown modules {unknown}; choose from {', '.join(MODULES)}")
    modules = QUICK if args.quick else (args.modules or list(MODULES))

    if not args.report:
        for module in modules:
            code = _run(module, args.max_children)
            if code != 0:
                print(f"mutmut stopped with exit status {code} on {module}", file=sys.stderr)
                return code

    answered = _answered()
    unanswered = []
    print(f"{'module':<14}" + "".join(f"{c:>13}" for c in COLUMNS) + f"{'score':>8}")
    for module in modules:
        results = _results(module)
        counts = Counter(results.values())
        tested = sum(counts[c] for c in ("killed", "survived", "timeout"))
        score = f"{100 * (counts['killed'] + counts['timeout']) / tested:.1f}%" if tested else "-"
        print(f"{module:<14}" + "".join(f"{counts[c]:>13}" for c in COLUMNS) + f"{score:>8}")
        for name, status in sorted(results.items()):
            if status == "survived":
                mark = "answered in docs/mutation.md" if name in answered else "UNANSWERED"
                print(f"    {name}: {mark}")
                if name not in answered:
                    unanswered.append(name)
    if unanswered:
        print(
            f"{len(unanswered)} survivors have no answer in docs/mutation.md; `python -m mutmut show NAME` prints one",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
