"""``python -m verification``: list the experiments and the tools."""

import importlib
import sys

from . import EXPERIMENTS, TOOLS


def _first_line(name):
    try:
        return (importlib.import_module(f"verification.{name}").__doc__ or "").strip().splitlines()[0]
    except ImportError as exc:  # a module missing from this checkout
        return f"(unavailable: {exc})"


def main(argv=None) -> int:
    print("Experiments (run `python -m verification.<name> --help`; `--quick` for a smoke run):")
    for name in EXPERIMENTS:
        print(f"  {name:<16} {_first_line(name)}")
    print("\nTools (run `python -m verification.<name> --help`):")
    for name in TOOLS:
        print(f"  {name:<16} {_first_line(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
