"""``python -m verification``: list the experiments."""

import importlib
import sys

from . import EXPERIMENTS


def main(argv=None) -> int:
    print("Experiments (run `python -m verification.<name> --help`; `--quick` for a smoke run):")
    for name in EXPERIMENTS:
        try:
            doc = (importlib.import_module(f"verification.{name}").__doc__ or "").strip().splitlines()[0]
        except ImportError as exc:  # a module missing from this checkout
            doc = f"(unavailable: {exc})"
        print(f"  {name:<14} {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
