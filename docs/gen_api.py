"""Generate docs/api.md from the docstrings of lora_theory's public names and of verification.sweep's.

Run ``python docs/gen_api.py`` after changing a public docstring; ``tests/test_docs.py`` fails when
docs/api.md is out of date or a public name has no docstring.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lora_theory  # noqa: E402

HEADER = """# API reference

Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.
Every name of the first part is importable from `lora_theory` (numpy, no torch); the second part lists
`verification.sweep`, the machinery the experiments share (torch), module by module. The theorem map is in
`theorems.md`.
"""


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "constant"


def _signature(name: str, obj) -> str:
    if callable(obj):
        try:
            return f"{name}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            return name
    return name


def _sweep():
    import verification.sweep

    return verification.sweep


def render() -> str:
    return _render(lora_theory, "lora_theory (constants)") + "\n# `verification.sweep`\n" + _render(_sweep(), None)


def _render(package, constants) -> str:
    by_module: dict[str, list[str]] = {}
    for name in package.__all__:
        obj = getattr(package, name)
        if constants is None and _kind(obj) == "constant":
            continue  # the sweep's protocol constants: documented in its module, recorded in every summary
        module = getattr(obj, "__module__", None) if _kind(obj) != "constant" else None
        module = module or constants
        doc = inspect.getdoc(obj) if _kind(obj) != "constant" else None
        first = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
        if _kind(obj) == "constant":
            first = f"`{obj!r}`" if not hasattr(obj, "free_symbols") else f"sympy symbol `{obj}`"
        entry = f"### `{name}`\n\n*{_kind(obj)}* — `{_signature(name, obj)}`\n\n{first}\n"
        by_module.setdefault(module, []).append(entry)
    parts = [HEADER] if package is lora_theory else []
    for module in sorted(by_module):
        parts.append(f"\n## `{module}`\n")
        parts.extend("\n" + e for e in by_module[module])
    return "".join(parts).rstrip() + "\n"


def main() -> int:
    (HERE / "api.md").write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
