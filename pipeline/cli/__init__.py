"""The `sparsegen` console script.

Each module in this package is one group of subcommands and defines ``register(subparsers)``; the module
adds its parsers and sets ``func`` on each, a callable taking the parsed ``argparse.Namespace`` and returning
an exit code. Modules import heavy libraries (torch, ray, mlflow) inside ``func`` only, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsegen",
        description="Train and evaluate sparse AND-OR generator networks (Xing et al., CVPR 2020) on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Before any tensor exists: keep freed host memory in the process (see pipeline/host_memory.py).
    from pipeline.host_memory import configure_host_allocator

    configure_host_allocator()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
